# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The userspace ESP dataplane: AES-GCM, ESP framing, anti-replay and the worker.

Theory of operation
-------------------
Everything on the packet path is C, reached through a handful of ``nogil``
functions that work in place on buffers with headroom:

* ``cipher_t`` wraps one AES-GCM key for either backend: intel-ipsec-mb (expanded
  key in a 64-byte aligned ``gcm_key_data``) or OpenSSL EVP (one context per key).
  The key is expanded once, when the SA is installed; only the nonce changes per
  packet.
* ``esp_seal`` writes the ESP header and IV into the 16 bytes in front of the
  payload, the RFC 4303 trailer after it, encrypts in place and appends the ICV.
  ``esp_open`` verifies the ICV, decrypts in place and strips the trailer.
* ``replay_t`` is the RFC 4303 section 3.4.3 sliding window with the appendix A
  ESN inference; it is checked before the ICV and updated only after it.
* ``Engine`` owns an epoll set over the ESP-in-UDP socket (RFC 3948), every
  session's TUN fd and an eventfd.  One worker thread loops: ``epoll_wait``, then
  for each ready fd takes the table lock and handles one batch.  IKE datagrams
  (non-ESP marker) stay in the receive slots and are handed to the Python
  callback after the lock is released, with the GIL.  Python mutators take the
  same lock, so the worker never sees an SA half installed or freed.
* TUN to UDP: read until EAGAIN or ``batch`` reads.  A TUN opened with a vnet
  header hands over TCP/UDP super-packets; ``gso_split`` cuts them into MTU-sized
  packets in the tx slots (headers fixed up, checksums completed).  The slots are
  sealed in place and runs of equal-size ESP packets (the last may be shorter)
  leave as one ``sendmmsg`` entry with ``UDP_SEGMENT``.  A kernel that refuses
  (EIO/EINVAL) switches the engine to one datagram per entry for good.
* UDP to TUN: ``recvmmsg`` into 64 KB slots with ``UDP_GRO``; each coalesced
  datagram is split by its gso_size cmsg, every ESP packet opened in place and
  queued.  The queue is written per session: on a vnet TUN, in-order segments of
  one TCP flow become one super-packet (``tcp_run``, one ``writev``), anything
  else goes alone behind an empty vnet header written over the spent ESP header.

Drops are counted, per SA where an SA is known and globally otherwise, and never
logged.  The module-level wrappers (``gcm_seal``, ``esp_encrypt``, ...) call the
same C functions so the known-answer tests exercise the packet path's code.
"""

import ipaddress
import logging
import threading

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.errno cimport EAGAIN, EINTR, EINVAL, EIO, errno
from libc.stdint cimport int32_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcmp, memcpy, memset

from fastpath._ipsecmb cimport (
    IMB_AES128_GCM_DEC,
    IMB_AES128_GCM_ENC,
    IMB_AES128_GCM_PRE,
    IMB_AES256_GCM_DEC,
    IMB_AES256_GCM_ENC,
    IMB_AES256_GCM_PRE,
    IMB_ARCH,
    IMB_MGR,
    alloc_mb_mgr,
    gcm_context_data,
    gcm_key_data,
    imb_get_errno,
    init_mb_mgr_auto,
)
from fastpath._libcrypto cimport (
    CRYPTO_memcmp,
    EVP_aes_128_gcm,
    EVP_aes_256_gcm,
    EVP_CIPHER,
    EVP_CIPHER_CTX,
    EVP_CIPHER_CTX_ctrl,
    EVP_CIPHER_CTX_free,
    EVP_CIPHER_CTX_new,
    EVP_CipherFinal_ex,
    EVP_CipherInit_ex,
    EVP_CipherUpdate,
    EVP_CTRL_GCM_GET_TAG,
    EVP_CTRL_GCM_SET_TAG,
)
from fastpath._sys cimport (
    AF_INET,
    AF_INET6,
    CMSG_DATA,
    CMSG_FIRSTHDR,
    CMSG_LEN,
    CMSG_NXTHDR,
    CMSG_SPACE,
    cmsghdr,
    EFD_CLOEXEC,
    EFD_NONBLOCK,
    EPOLL_CLOEXEC,
    EPOLL_CTL_ADD,
    EPOLL_CTL_DEL,
    EPOLLIN,
    MSG_DONTWAIT,
    MSG_TRUNC,
    close,
    epoll_create1,
    epoll_ctl,
    epoll_event,
    epoll_wait,
    eventfd,
    getsockname,
    htons,
    iovec,
    mmsghdr,
    msghdr,
    ntohs,
    pthread_mutex_destroy,
    pthread_mutex_init,
    pthread_mutex_lock,
    pthread_mutex_t,
    pthread_mutex_unlock,
    read,
    recvmmsg,
    sendmmsg,
    sendmsg,
    setsockopt,
    sockaddr,
    sockaddr_in,
    sockaddr_in6,
    sockaddr_storage,
    socklen_t,
    write,
    writev,
)

from fastpath.sa import SAParams
from fastpath.tun import tun_vnet_hdr

log = logging.getLogger("espgate.fastpath")

cdef extern from "<stdlib.h>" nogil:
    int posix_memalign(void **memptr, size_t alignment, size_t size)


cdef enum:
    ESP_HEAD = 16          # SPI, sequence number, 8-byte IV
    ICV_LEN = 16
    ESP_TAIL_MAX = 21      # up to 3 pad octets, pad length, next header, ICV
    BACKEND_IPSECMB = 0
    BACKEND_OPENSSL = 1
    MAX_TS = 16
    HASH_SIZE = 1024
    SLOT = 16384 + 128     # one packet buffer; fits a 9000-byte jumbo frame
    HEADROOM = 64
    MAX_BATCH = 1024
    MAX_EVENTS = 64

# esp_open / inner_check results below zero
cdef enum:
    ERR_MALFORMED = -1
    ERR_AUTH = -2
    ERR_POLICY = -3
    ERR_DUMMY = -4
    ERR_CRYPTO = -5

# epoll tags: session id in the low 32 bits for TUN fds
cdef uint64_t TAG_TUN = 1ULL << 32
cdef uint64_t TAG_UDP = 1ULL << 33
cdef uint64_t TAG_WAKE = 1ULL << 34

BATCH_HEADROOM = ESP_HEAD
BATCH_TAILROOM = ESP_TAIL_MAX

# ---------------------------------------------------------------- byte order


cdef inline uint32_t be32(const uint8_t *p) noexcept nogil:
    return ((<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16)
            | (<uint32_t>p[2] << 8) | <uint32_t>p[3])


cdef inline void put32(uint8_t *p, uint32_t v) noexcept nogil:
    p[0] = <uint8_t>(v >> 24)
    p[1] = <uint8_t>(v >> 16)
    p[2] = <uint8_t>(v >> 8)
    p[3] = <uint8_t>v


# ---------------------------------------------------------------- AES-GCM

cdef IMB_MGR *_mgr = NULL
cdef IMB_ARCH _arch


cdef struct cipher_t:
    int backend
    int keylen
    gcm_key_data *kd
    EVP_CIPHER_CTX *ctx


cdef int cipher_init(cipher_t *c, int backend, const uint8_t *key,
                     int keylen) noexcept nogil:
    cdef const EVP_CIPHER *alg
    memset(c, 0, sizeof(cipher_t))
    c.backend = backend
    c.keylen = keylen
    if backend == BACKEND_IPSECMB:
        if _mgr == NULL:
            return -1
        if posix_memalign(<void **>&c.kd, 64, sizeof(gcm_key_data)) != 0:
            c.kd = NULL
            return -1
        if keylen == 16:
            IMB_AES128_GCM_PRE(_mgr, key, c.kd)
        else:
            IMB_AES256_GCM_PRE(_mgr, key, c.kd)
        return 0
    c.ctx = EVP_CIPHER_CTX_new()
    if c.ctx == NULL:
        return -1
    alg = EVP_aes_128_gcm() if keylen == 16 else EVP_aes_256_gcm()
    if EVP_CipherInit_ex(c.ctx, alg, NULL, key, NULL, 1) != 1:
        return -1
    return 0


cdef void cipher_free(cipher_t *c) noexcept nogil:
    if c.kd != NULL:
        # the expanded key is as secret as the key
        memset(c.kd, 0, sizeof(gcm_key_data))
        free(c.kd)
        c.kd = NULL
    if c.ctx != NULL:
        EVP_CIPHER_CTX_free(c.ctx)
        c.ctx = NULL


cdef int gcm_seal_raw(cipher_t *c, const uint8_t *nonce, const uint8_t *aad,
                      size_t aadlen, const uint8_t *src, uint8_t *dst, size_t n,
                      uint8_t *tag) noexcept nogil:
    """Encrypt n bytes (in place allowed) and write the 16-byte tag."""
    cdef gcm_context_data gctx
    cdef int outl = 0
    if c.backend == BACKEND_IPSECMB:
        if c.keylen == 16:
            IMB_AES128_GCM_ENC(_mgr, c.kd, &gctx, dst, src, n, nonce, aad, aadlen,
                               tag, ICV_LEN)
        else:
            IMB_AES256_GCM_ENC(_mgr, c.kd, &gctx, dst, src, n, nonce, aad, aadlen,
                               tag, ICV_LEN)
        return 0
    if EVP_CipherInit_ex(c.ctx, NULL, NULL, NULL, nonce, 1) != 1:
        return -1
    if aadlen and EVP_CipherUpdate(c.ctx, NULL, &outl, aad, <int>aadlen) != 1:
        return -1
    if n and EVP_CipherUpdate(c.ctx, dst, &outl, src, <int>n) != 1:
        return -1
    if EVP_CipherFinal_ex(c.ctx, dst + n, &outl) != 1:
        return -1
    if EVP_CIPHER_CTX_ctrl(c.ctx, EVP_CTRL_GCM_GET_TAG, ICV_LEN, tag) != 1:
        return -1
    return 0


cdef int gcm_open_raw(cipher_t *c, const uint8_t *nonce, const uint8_t *aad,
                      size_t aadlen, const uint8_t *src, uint8_t *dst, size_t n,
                      const uint8_t *tag) noexcept nogil:
    """Decrypt n bytes (in place allowed); 0 if the tag verifies, else -1."""
    cdef gcm_context_data gctx
    cdef uint8_t calc[16]
    cdef int outl = 0
    if c.backend == BACKEND_IPSECMB:
        if c.keylen == 16:
            IMB_AES128_GCM_DEC(_mgr, c.kd, &gctx, dst, src, n, nonce, aad, aadlen,
                               calc, ICV_LEN)
        else:
            IMB_AES256_GCM_DEC(_mgr, c.kd, &gctx, dst, src, n, nonce, aad, aadlen,
                               calc, ICV_LEN)
        return 0 if CRYPTO_memcmp(calc, tag, ICV_LEN) == 0 else -1
    if EVP_CipherInit_ex(c.ctx, NULL, NULL, NULL, nonce, 0) != 1:
        return -1
    if aadlen and EVP_CipherUpdate(c.ctx, NULL, &outl, aad, <int>aadlen) != 1:
        return -1
    if n and EVP_CipherUpdate(c.ctx, dst, &outl, src, <int>n) != 1:
        return -1
    if EVP_CIPHER_CTX_ctrl(c.ctx, EVP_CTRL_GCM_SET_TAG, ICV_LEN, <void *>tag) != 1:
        return -1
    if EVP_CipherFinal_ex(c.ctx, dst + n, &outl) != 1:
        return -1
    return 0


cdef int _backend_id(str name) except -1:
    if name == "ipsec-mb":
        if _mgr == NULL:
            raise ValueError(f"Crypto backend {name!r} is not available")
        return BACKEND_IPSECMB
    if name == "openssl":
        return BACKEND_OPENSSL
    raise ValueError(f"Unknown crypto backend {name!r}")


def crypto_backends() -> list:
    """Return the AES-GCM backends compiled in and usable on this CPU."""
    return (["ipsec-mb"] if _mgr != NULL else []) + ["openssl"]


cdef int _cipher_from_key(cipher_t *c, bytes key, str backend) except -1:
    if len(key) not in (16, 32):
        raise ValueError(f"Bad key length {len(key)}")
    if cipher_init(c, _backend_id(backend), <const uint8_t *>PyBytes_AS_STRING(key),
                   len(key)) != 0:
        cipher_free(c)
        raise MemoryError("Cannot set up AES-GCM key")
    return 0


def gcm_seal(bytes key, bytes nonce, bytes aad, bytes plaintext, *,
             str backend="ipsec-mb") -> bytes:
    """Encrypt and authenticate; return ciphertext || 16-byte tag."""
    cdef cipher_t c
    cdef Py_ssize_t n = len(plaintext)
    cdef bytes out
    cdef int rc
    if len(nonce) != 12:
        raise ValueError(f"Bad nonce length {len(nonce)}")
    _cipher_from_key(&c, key, backend)
    out = PyBytes_FromStringAndSize(NULL, n + ICV_LEN)
    rc = gcm_seal_raw(&c, <const uint8_t *>PyBytes_AS_STRING(nonce),
                      <const uint8_t *>PyBytes_AS_STRING(aad), len(aad),
                      <const uint8_t *>PyBytes_AS_STRING(plaintext),
                      <uint8_t *>PyBytes_AS_STRING(out), n,
                      <uint8_t *>PyBytes_AS_STRING(out) + n)
    cipher_free(&c)
    if rc != 0:
        raise RuntimeError("AES-GCM encryption failed")
    return out


def gcm_open(bytes key, bytes nonce, bytes aad, bytes data, *,
             str backend="ipsec-mb") -> bytes:
    """Verify and decrypt ciphertext || tag; raise ValueError on a bad tag."""
    cdef cipher_t c
    cdef Py_ssize_t n = len(data) - ICV_LEN
    cdef bytes out
    cdef int rc
    if len(nonce) != 12:
        raise ValueError(f"Bad nonce length {len(nonce)}")
    if n < 0:
        raise ValueError(f"Data shorter than the tag: {len(data)}")
    _cipher_from_key(&c, key, backend)
    out = PyBytes_FromStringAndSize(NULL, n)
    rc = gcm_open_raw(&c, <const uint8_t *>PyBytes_AS_STRING(nonce),
                      <const uint8_t *>PyBytes_AS_STRING(aad), len(aad),
                      <const uint8_t *>PyBytes_AS_STRING(data),
                      <uint8_t *>PyBytes_AS_STRING(out), n,
                      <const uint8_t *>PyBytes_AS_STRING(data) + n)
    cipher_free(&c)
    if rc != 0:
        raise ValueError("Authentication failed")
    return out


# ---------------------------------------------------------------- anti-replay


cdef struct replay_t:
    uint64_t top           # highest authenticated sequence number, 0 = none yet
    uint32_t size          # window size in packets, a power of two
    int esn
    uint64_t bits[64]      # ring bitmap indexed by seq mod size (4096 bits max)


cdef void replay_init(replay_t *r, uint32_t size, int esn) noexcept nogil:
    memset(r, 0, sizeof(replay_t))
    r.size = size
    r.esn = esn


cdef inline uint64_t replay_infer(const replay_t *r, uint32_t lo) noexcept nogil:
    """Return the full sequence number for the low 32 bits on the wire, 0 if none."""
    cdef uint32_t tl = <uint32_t>r.top
    cdef uint64_t th = r.top >> 32
    cdef uint32_t bottom
    if not r.esn:
        return lo
    # RFC 4303 appendix A2.2: pick the high half that puts seq nearest the window
    bottom = tl - r.size + 1
    if tl >= r.size - 1:
        if lo < bottom:
            th += 1
    elif lo >= bottom:
        if th == 0:
            return 0
        th -= 1
    return (th << 32) | lo


cdef inline int replay_check(const replay_t *r, uint64_t seq) noexcept nogil:
    cdef uint32_t idx
    # RFC 4303 section 3.3.3: sequence number 0 is never sent
    if seq == 0:
        return 0
    if seq > r.top:
        return 1
    # RFC 4303 section 3.4.3: left of the window is a reject
    if r.top - seq >= r.size:
        return 0
    idx = <uint32_t>(seq & (r.size - 1))
    return 0 if r.bits[idx >> 6] & (1ULL << (idx & 63)) else 1


cdef inline void replay_update(replay_t *r, uint64_t seq) noexcept nogil:
    cdef uint32_t idx
    cdef uint64_t s
    if seq <= r.top and r.top - seq >= r.size:
        return
    if seq > r.top:
        if seq - r.top >= r.size:
            memset(r.bits, 0, sizeof(r.bits))
        else:
            s = r.top + 1
            while s < seq:
                idx = <uint32_t>(s & (r.size - 1))
                r.bits[idx >> 6] &= ~(1ULL << (idx & 63))
                s += 1
        r.top = seq
    idx = <uint32_t>(seq & (r.size - 1))
    r.bits[idx >> 6] |= 1ULL << (idx & 63)


cdef class ReplayWindow:
    """RFC 4303 anti-replay window (section 3.4.3, ESN per appendix A).

    Rules: sequence number 0 is never valid; anything above the highest
    authenticated number is new; anything ``size`` or more below it is too old;
    in between, a bit per number marks the ones seen.  ``check`` changes nothing;
    ``update`` must be called only after the ICV verified.  With ESN the peer
    sends only the low 32 bits; ``infer`` recovers the full number relative to
    the window (appendix A2.2).
    """

    cdef replay_t r

    def __init__(self, int size=1024, bint esn=False):
        if size < 64 or size > 4096 or size & (size - 1):
            raise ValueError(f"Bad replay window {size}")
        replay_init(&self.r, size, esn)

    @property
    def size(self) -> int:
        return self.r.size

    @property
    def top(self) -> int:
        """Highest authenticated sequence number (0 before the first)."""
        return self.r.top

    def infer(self, uint32_t seq_lo) -> int:
        """Return the full sequence number for the low 32 bits (0 if impossible)."""
        return replay_infer(&self.r, seq_lo)

    def check(self, uint64_t seq) -> bool:
        """Return whether seq would be accepted; the window is not changed."""
        return replay_check(&self.r, seq) == 1

    def update(self, uint64_t seq) -> None:
        """Record seq as received; call only after its ICV verified."""
        if seq == 0:
            raise ValueError("Bad sequence number 0")
        replay_update(&self.r, seq)


# ---------------------------------------------------------------- SAs and ESP


cdef struct ts_t:
    int family
    int plen
    uint8_t addr[16]


cdef struct sa_t:
    uint32_t spi
    int inbound
    uint32_t session
    int esn
    uint8_t salt[4]
    cipher_t cipher
    uint64_t next_seq
    uint64_t seq_limit
    replay_t replay
    sockaddr_storage peer
    socklen_t peer_len
    int n_ts
    ts_t ts[16]
    uint64_t packets
    uint64_t bytes
    uint64_t drop_replay
    uint64_t drop_auth
    uint64_t drop_malformed
    uint64_t drop_policy
    uint64_t seq_exhausted
    uint64_t seq_blocked
    sa_t *hnext
    sa_t *snext


cdef inline uint64_t seq_cap(const sa_t *sa, uint64_t limit) noexcept nogil:
    # RFC 4303 section 3.3.3: 2^32 - 1 is the last number without ESN
    cdef uint64_t top = 0xFFFFFFFFFFFFFFFFULL if sa.esn else 0xFFFFFFFFULL
    return limit if limit < top else top


cdef void sa_free(sa_t *sa) noexcept nogil:
    if sa != NULL:
        cipher_free(&sa.cipher)
        memset(sa, 0, sizeof(sa_t))
        free(sa)


cdef int fill_sockaddr(sockaddr_storage *ss, socklen_t *slen, object addr,
                       int family) except -1:
    cdef sockaddr_in *sin
    cdef sockaddr_in6 *sin6
    cdef bytes packed
    host, port = addr
    ip = ipaddress.ip_address(host)
    if not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"Bad port {port!r}")
    memset(ss, 0, sizeof(sockaddr_storage))
    if ip.version == 4 and family == AF_INET:
        packed = ip.packed
        sin = <sockaddr_in *>ss
        sin.sin_family = AF_INET
        sin.sin_port = htons(port)
        memcpy(&sin.sin_addr, PyBytes_AS_STRING(packed), 4)
        slen[0] = sizeof(sockaddr_in)
        return 0
    if family != AF_INET6:
        raise ValueError(f"Address {host!r} does not fit an IPv4 socket")
    # an IPv4 peer on a dual-stack socket is a v4-mapped address
    packed = ip.packed if ip.version == 6 else b"\0" * 10 + b"\xff\xff" + ip.packed
    sin6 = <sockaddr_in6 *>ss
    sin6.sin6_family = AF_INET6
    sin6.sin6_port = htons(port)
    memcpy(&sin6.sin6_addr, PyBytes_AS_STRING(packed), 16)
    slen[0] = sizeof(sockaddr_in6)
    return 0


cdef object sockaddr_tuple(const sockaddr_storage *ss):
    cdef const sockaddr_in *sin
    cdef const sockaddr_in6 *sin6
    if ss.ss_family == AF_INET:
        sin = <const sockaddr_in *>ss
        raw = PyBytes_FromStringAndSize(<const char *>&sin.sin_addr, 4)
        return (str(ipaddress.IPv4Address(raw)), ntohs(sin.sin_port))
    sin6 = <const sockaddr_in6 *>ss
    raw = PyBytes_FromStringAndSize(<const char *>&sin6.sin6_addr, 16)
    ip6 = ipaddress.IPv6Address(raw)
    host = str(ip6.ipv4_mapped) if ip6.ipv4_mapped else str(ip6)
    return (host, ntohs(sin6.sin6_port))


cdef sa_t *sa_from_params(object params, int backend, int family) except NULL:
    cdef sa_t *sa
    cdef bytes key = params.key
    cdef bytes packed
    cdef int i
    if not isinstance(params, SAParams):
        raise TypeError(f"Expected SAParams, got {type(params).__name__}")
    if len(params.remote_ts) > MAX_TS:
        raise ValueError(f"Too many traffic selectors {len(params.remote_ts)}")
    sa = <sa_t *>calloc(1, sizeof(sa_t))
    if sa == NULL:
        raise MemoryError()
    try:
        sa.spi = params.spi
        sa.inbound = bool(params.inbound)
        sa.session = params.session
        sa.esn = bool(params.esn)
        memcpy(sa.salt, PyBytes_AS_STRING(params.salt), 4)
        sa.next_seq = params.next_seq
        sa.seq_limit = 0xFFFFFFFFFFFFFFFFULL if sa.esn else 0xFFFFFFFFULL
        # a reserved limit (control/seqstore.py) caps what may be sent before the
        # store has the next block on disk
        if params.seq_limit and params.seq_limit < sa.seq_limit:
            sa.seq_limit = params.seq_limit
        replay_init(&sa.replay, params.replay_window, sa.esn)
        # an inbound SA resumed from stored state expects next_seq next: the
        # window starts just below it (nothing marked), so ESN inference works
        if sa.inbound and sa.next_seq > 1:
            sa.replay.top = sa.next_seq - 1
        fill_sockaddr(&sa.peer, &sa.peer_len, params.peer, family)
        for i, ts in enumerate(params.remote_ts):
            net = ipaddress.ip_network(ts, strict=False)
            packed = net.network_address.packed
            sa.ts[i].family = net.version
            sa.ts[i].plen = net.prefixlen
            memcpy(sa.ts[i].addr, PyBytes_AS_STRING(packed), len(packed))
        sa.n_ts = len(params.remote_ts)
        if cipher_init(&sa.cipher, backend, <const uint8_t *>PyBytes_AS_STRING(key),
                       len(key)) != 0:
            raise MemoryError("Cannot set up AES-GCM key")
    except BaseException:
        sa_free(sa)
        raise
    return sa


cdef int esp_seal(sa_t *sa, uint8_t *payload, size_t plen, uint64_t seq, int nh,
                  const uint8_t *iv) noexcept nogil:
    """Seal payload in place; ESP starts at payload - ESP_HEAD. Return its length.

    The caller provides ESP_HEAD bytes of headroom and ESP_TAIL_MAX of tailroom.
    """
    cdef uint8_t *pkt = payload - ESP_HEAD
    cdef uint8_t nonce[12]
    cdef uint8_t aad[12]
    cdef size_t aadlen = 8
    cdef size_t padlen = (4 - ((plen + 2) & 3)) & 3
    cdef size_t ctlen, i
    # RFC 4303 section 2.4: default padding is 1, 2, 3, ... and the payload,
    # pad length and next header end on a 4-octet boundary
    for i in range(padlen):
        payload[plen + i] = <uint8_t>(i + 1)
    payload[plen + padlen] = <uint8_t>padlen
    payload[plen + padlen + 1] = <uint8_t>nh
    ctlen = plen + padlen + 2
    put32(pkt, sa.spi)
    put32(pkt + 4, <uint32_t>seq)
    # RFC 4106 section 3.1: the IV must not repeat under a key; the 64-bit
    # sequence number never does
    if iv == NULL:
        put32(pkt + 8, <uint32_t>(seq >> 32))
        put32(pkt + 12, <uint32_t>seq)
    else:
        memcpy(pkt + 8, iv, 8)
    # RFC 4106 section 4: nonce = salt || IV
    memcpy(nonce, sa.salt, 4)
    memcpy(nonce + 4, pkt + 8, 8)
    # RFC 4106 section 5: AAD = SPI || seq, or SPI || seq_hi || seq_lo with ESN
    if sa.esn:
        put32(aad, sa.spi)
        put32(aad + 4, <uint32_t>(seq >> 32))
        put32(aad + 8, <uint32_t>seq)
        aadlen = 12
    else:
        memcpy(aad, pkt, 8)
    if gcm_seal_raw(&sa.cipher, nonce, aad, aadlen, payload, payload, ctlen,
                    payload + ctlen) != 0:
        return ERR_CRYPTO
    return <int>(ESP_HEAD + ctlen + ICV_LEN)


cdef int esp_open(sa_t *sa, uint8_t *pkt, size_t n, uint64_t seq,
                  int *nh) noexcept nogil:
    """Verify and decrypt in place; the payload starts at pkt + ESP_HEAD.

    seq is the full sequence number (its high half feeds the ESN AAD).  Return
    the payload length, or ERR_AUTH / ERR_MALFORMED.
    """
    cdef uint8_t nonce[12]
    cdef uint8_t aad[12]
    cdef size_t aadlen = 8
    cdef size_t ctlen, padlen, plen, i
    cdef uint8_t *ct = pkt + ESP_HEAD
    if n < ESP_HEAD + 2 + ICV_LEN:
        return ERR_MALFORMED
    ctlen = n - ESP_HEAD - ICV_LEN
    memcpy(nonce, sa.salt, 4)
    memcpy(nonce + 4, pkt + 8, 8)
    # RFC 4106 section 5: with ESN the high half joins the AAD, never the wire
    if sa.esn:
        memcpy(aad, pkt, 4)
        put32(aad + 4, <uint32_t>(seq >> 32))
        memcpy(aad + 8, pkt + 4, 4)
        aadlen = 12
    else:
        memcpy(aad, pkt, 8)
    if gcm_open_raw(&sa.cipher, nonce, aad, aadlen, ct, ct, ctlen, ct + ctlen) != 0:
        return ERR_AUTH
    padlen = ct[ctlen - 2]
    nh[0] = ct[ctlen - 1]
    if padlen + 2 > ctlen:
        return ERR_MALFORMED
    plen = ctlen - 2 - padlen
    # RFC 4303 section 2.4: the receiver should inspect the default padding
    for i in range(padlen):
        if ct[plen + i] != <uint8_t>(i + 1):
            return ERR_MALFORMED
    return <int>plen


cdef inline int prefix_match(const uint8_t *net, const uint8_t *a,
                             int plen) noexcept nogil:
    cdef int full = plen >> 3
    cdef int rem = plen & 7
    cdef int i
    cdef uint8_t mask
    for i in range(full):
        if net[i] != a[i]:
            return 0
    if rem:
        mask = <uint8_t>(0xFF << (8 - rem))
        if (net[full] ^ a[full]) & mask:
            return 0
    return 1


cdef int inner_check(const sa_t *sa, const uint8_t *p, int plen,
                     int nh) noexcept nogil:
    """Return the inner packet length to deliver, or ERR_*."""
    cdef int total, family, i
    cdef const uint8_t *src
    # RFC 4303 section 2.6: next header 59 marks a dummy packet, discarded
    if nh == 59:
        return ERR_DUMMY
    # RFC 4303 section 2.7: trailing TFC padding is cut by the inner length
    if nh == 4:
        if plen < 20 or p[0] >> 4 != 4:
            return ERR_MALFORMED
        total = (p[2] << 8) | p[3]
        if total < 20 or total > plen:
            return ERR_MALFORMED
        family = 4
        src = p + 12
    elif nh == 41:
        if plen < 40 or p[0] >> 4 != 6:
            return ERR_MALFORMED
        total = 40 + ((p[4] << 8) | p[5])
        if total > plen:
            return ERR_MALFORMED
        family = 6
        src = p + 8
    else:
        return ERR_MALFORMED
    # RFC 4301 section 5.2: the inner source must match the SA's selectors
    for i in range(sa.n_ts):
        if sa.ts[i].family == family and prefix_match(sa.ts[i].addr, src,
                                                      sa.ts[i].plen):
            return total
    return ERR_POLICY


cdef int _nh_for(bytes inner) except -1:
    if len(inner) and inner[0] >> 4 == 4:
        return 4
    if len(inner) and inner[0] >> 4 == 6:
        return 41
    raise ValueError("Inner packet is neither IPv4 nor IPv6")


def esp_seal_payload(sa, uint64_t seq, bytes payload, int next_header, *,
                     bytes iv=None, str backend="ipsec-mb") -> bytes:
    """Build one ESP packet around payload with an explicit next header.

    iv overrides the sequence-number IV; it exists for known-answer tests only.
    """
    cdef sa_t *s
    cdef uint8_t *buf
    cdef const uint8_t *ivp = NULL
    cdef Py_ssize_t n = len(payload)
    cdef int ln
    if iv is not None:
        if len(iv) != 8:
            raise ValueError(f"Bad IV length {len(iv)}")
        ivp = <const uint8_t *>PyBytes_AS_STRING(iv)
    if seq == 0 or (not sa.esn and seq > 0xFFFFFFFF):
        raise ValueError(f"Bad sequence number {seq}")
    s = sa_from_params(sa, _backend_id(backend), AF_INET6)
    buf = <uint8_t *>malloc(ESP_HEAD + n + ESP_TAIL_MAX)
    if buf == NULL:
        sa_free(s)
        raise MemoryError()
    memcpy(buf + ESP_HEAD, PyBytes_AS_STRING(payload), n)
    ln = esp_seal(s, buf + ESP_HEAD, n, seq, next_header, ivp)
    out = PyBytes_FromStringAndSize(<char *>buf, ln) if ln > 0 else None
    free(buf)
    sa_free(s)
    if out is None:
        raise RuntimeError("AES-GCM encryption failed")
    return out


def esp_open_payload(sa, bytes esp, *, uint32_t seq_hi=0,
                     str backend="ipsec-mb") -> tuple:
    """Verify and decrypt one ESP packet; return (seq, payload, next_header).

    seq_hi is the ESN high half the receiver expects (ignored without ESN).
    Raise ValueError when the packet is malformed or fails authentication.
    """
    cdef sa_t *s
    cdef uint8_t *buf
    cdef Py_ssize_t n = len(esp)
    cdef int ln, nh = 0
    cdef uint64_t seq
    if n < ESP_HEAD + 2 + ICV_LEN:
        raise ValueError(f"ESP packet too short: {n}")
    s = sa_from_params(sa, _backend_id(backend), AF_INET6)
    buf = <uint8_t *>malloc(n)
    if buf == NULL:
        sa_free(s)
        raise MemoryError()
    memcpy(buf, PyBytes_AS_STRING(esp), n)
    seq = be32(buf + 4)
    if s.esn:
        seq |= (<uint64_t>seq_hi) << 32
    if be32(buf) != s.spi:
        ln = ERR_MALFORMED
    else:
        ln = esp_open(s, buf, n, seq, &nh)
    out = PyBytes_FromStringAndSize(<char *>buf + ESP_HEAD, ln) if ln >= 0 else None
    free(buf)
    sa_free(s)
    if ln == ERR_AUTH:
        raise ValueError("Authentication failed")
    if ln < 0:
        raise ValueError("Malformed ESP packet")
    return seq, out, nh


def esp_encrypt(sa, uint64_t seq, bytes inner, *, bytes iv=None,
                str backend="ipsec-mb") -> bytes:
    """Encapsulate one inner IPv4/IPv6 packet in ESP (tunnel mode)."""
    return esp_seal_payload(sa, seq, inner, _nh_for(inner), iv=iv, backend=backend)


def esp_decrypt(sa, bytes esp, *, uint32_t seq_hi=0,
                str backend="ipsec-mb") -> tuple:
    """Decapsulate one ESP packet; return (seq, inner packet).

    Raise ValueError on authentication failure, a malformed packet or a next
    header other than IPv4 (4) or IPv6 (41).
    """
    seq, payload, nh = esp_open_payload(sa, esp, seq_hi=seq_hi, backend=backend)
    if nh not in (4, 41):
        raise ValueError(f"Bad next header {nh}")
    return seq, payload


# ---------------------------------------------------------------- batch API


cdef class SAHandle:
    """An SA expanded once, for batch calls outside an Engine (benchmarks)."""

    cdef sa_t *sa

    def __cinit__(self, params, *, str backend="ipsec-mb"):
        self.sa = sa_from_params(params, _backend_id(backend), AF_INET6)

    def __dealloc__(self):
        sa_free(self.sa)

    @property
    def next_seq(self) -> int:
        return self.sa.next_seq

    @property
    def seq_limit(self) -> int:
        return self.sa.seq_limit

    def set_seq_limit(self, uint64_t limit) -> None:
        """Allow sending up to limit (inclusive), capped at the SA's hard maximum."""
        self.sa.seq_limit = seq_cap(self.sa, limit)


def encrypt_batch(SAHandle handle, uint8_t[:, ::1] packets,
                  int32_t[::1] lengths) -> int:
    """Seal rows of packets in place in one nogil call; return how many were.

    Row i holds an inner packet of lengths[i] bytes at offset BATCH_HEADROOM;
    afterwards the ESP packet starts at offset 0 and lengths[i] is its length.
    Rows need BATCH_TAILROOM spare bytes after the inner packet.  Sequence
    numbers come from the handle.
    """
    cdef Py_ssize_t rows = packets.shape[0], width = packets.shape[1]
    cdef Py_ssize_t i, done = 0
    cdef sa_t *sa = handle.sa
    cdef int ln, nh
    cdef uint8_t *p
    if lengths.shape[0] < rows:
        raise ValueError(f"Lengths shorter than the batch: {lengths.shape[0]}")
    for i in range(rows):
        if lengths[i] < 1 or ESP_HEAD + lengths[i] + ESP_TAIL_MAX > width:
            raise ValueError(f"Bad length {lengths[i]} in row {i}")
    with nogil:
        for i in range(rows):
            if sa.next_seq > sa.seq_limit:
                break
            p = &packets[i, ESP_HEAD]
            nh = 41 if p[0] >> 4 == 6 else 4
            ln = esp_seal(sa, p, lengths[i], sa.next_seq, nh, NULL)
            if ln < 0:
                break
            sa.next_seq += 1
            lengths[i] = ln
            done += 1
    return done


def decrypt_batch(SAHandle handle, uint8_t[:, ::1] packets,
                  int32_t[::1] lengths) -> int:
    """Open rows of ESP packets in place in one nogil call; return how many did.

    Row i holds an ESP packet of lengths[i] bytes at offset 0; afterwards the
    payload starts at BATCH_HEADROOM and lengths[i] is its length, or -1 when
    the row failed (authentication or format).  No anti-replay here.
    """
    cdef Py_ssize_t rows = packets.shape[0], width = packets.shape[1]
    cdef Py_ssize_t i, ok = 0
    cdef sa_t *sa = handle.sa
    cdef int ln, nh
    cdef uint8_t *p
    if lengths.shape[0] < rows:
        raise ValueError(f"Lengths shorter than the batch: {lengths.shape[0]}")
    for i in range(rows):
        if lengths[i] > width:
            raise ValueError(f"Bad length {lengths[i]} in row {i}")
    with nogil:
        for i in range(rows):
            p = &packets[i, 0]
            if lengths[i] < ESP_HEAD + 2 + ICV_LEN:
                lengths[i] = -1
                continue
            ln = esp_open(sa, p, lengths[i], replay_infer(&sa.replay, be32(p + 4)),
                          &nh)
            lengths[i] = ln if ln >= 0 else -1
            if ln >= 0:
                ok += 1
    return ok


# ---------------------------------------------------------------- offloads
#
# A TUN opened with IFF_VNET_HDR prefixes every packet with a virtio_net_hdr.
# On reads it may describe a TCP or UDP super-packet (gso_type, gso_size) whose
# L4 checksum is only partial (NEEDS_CSUM: the field holds the pseudo-header
# sum, csum_start/csum_offset say where the rest goes); ``gso_split`` cuts it
# into MTU-sized packets with complete headers and checksums.  On writes the
# engine hands runs of in-order TCP segments of one flow back as one super-packet
# (``tcp_run``), with a partial checksum the kernel finishes if it must.
#
# Checksums are summed in memory byte order (the one's-complement sum does not
# care) and stored back the same way, so no byte swapping happens per word.


cdef enum:
    VNET_LEN = 10
    VNET_F_NEEDS_CSUM = 1
    GSO_NONE = 0
    GSO_TCPV4 = 1
    GSO_TCPV6 = 4
    GSO_UDP_L4 = 5
    GSO_ECN = 0x80
    TCP_FIN = 0x01
    TCP_PSH = 0x08
    TCP_ACK = 0x10
    TCP_CWR = 0x80
    SOL_UDP_ = 17
    UDP_SEGMENT_ = 103
    UDP_GRO_ = 104
    GSO_MAX_SEGS = 64        # UDP_MAX_SEGMENTS on older kernels
    GSO_MAX_BYTES = 65535 - 8 - 40
    COALESCE_MAX = 64
    STAGE = 65536 + 64       # one TUN super-packet with its vnet header
    TX_SLOTS = 256           # segments sealed and sent per flush
    RX_SLOT = 65536 + 64     # one GRO datagram
    CTRL_LEN = 64
    PENDING = 1024           # decrypted packets queued for the TUN
    ERR_ROOM = -6


cdef struct vnet_hdr_t:
    # struct virtio_net_hdr, little-endian fields (the TUN default on x86)
    uint8_t flags
    uint8_t gso_type
    uint16_t hdr_len
    uint16_t gso_size
    uint16_t csum_start
    uint16_t csum_offset


cdef inline uint16_t be16(const uint8_t *p) noexcept nogil:
    return <uint16_t>((p[0] << 8) | p[1])


cdef inline void put16(uint8_t *p, uint32_t v) noexcept nogil:
    p[0] = <uint8_t>(v >> 8)
    p[1] = <uint8_t>v


cdef inline uint64_t csum_add(const uint8_t *p, size_t n, uint64_t acc) noexcept nogil:
    """Add n bytes (starting at an even offset) to a one's-complement sum."""
    cdef uint32_t w
    cdef uint16_t h = 0
    cdef size_t i
    for i in range(n >> 2):
        memcpy(&w, p + 4 * i, 4)
        acc += w
    p += n & ~(<size_t>3)
    if n & 2:
        memcpy(&h, p, 2)
        acc += h
        p += 2
    if n & 1:
        h = 0
        memcpy(&h, p, 1)
        acc += h
    return acc


cdef inline uint16_t csum_fold(uint64_t acc) noexcept nogil:
    acc = (acc & 0xFFFFFFFFULL) + (acc >> 32)
    acc = (acc & 0xFFFFFFFFULL) + (acc >> 32)
    acc = (acc & 0xFFFF) + (acc >> 16)
    acc = (acc & 0xFFFF) + (acc >> 16)
    acc = (acc & 0xFFFF) + (acc >> 16)
    return <uint16_t>acc


cdef inline uint64_t pseudo_sum(const uint8_t *ip, int v6, int proto,
                                uint32_t l4len) noexcept nogil:
    # RFC 9293 section 3.1 / RFC 8200 section 8.1: addresses, protocol, length
    cdef uint64_t acc = csum_add(ip + 8, 32, 0) if v6 else csum_add(ip + 12, 8, 0)
    return acc + htons(<uint16_t>proto) + htons(<uint16_t>l4len)


cdef inline void ipv4_csum(uint8_t *p, int ihl) noexcept nogil:
    cdef uint16_t v
    p[10] = 0
    p[11] = 0
    v = <uint16_t>~csum_fold(csum_add(p, ihl, 0))
    memcpy(p + 10, &v, 2)


cdef int csum_complete(const vnet_hdr_t *h, uint8_t *p, int n) noexcept nogil:
    """Finish a partial checksum as the device would; -1 if it does not fit."""
    cdef int start = h.csum_start
    cdef int at = start + h.csum_offset
    cdef uint16_t v
    if start >= n or at + 2 > n:
        return -1
    v = <uint16_t>~csum_fold(csum_add(p + start, n - start, 0))
    # a computed zero goes out as 0xFFFF (RFC 768: zero means no checksum)
    if v == 0:
        v = 0xFFFF
    memcpy(p + at, &v, 2)
    return 0


cdef int gso_split(const vnet_hdr_t *h, const uint8_t *pkt, int plen, uint8_t *out,
                   size_t stride, int cap, int *lens, int room) noexcept nogil:
    """Cut one TUN super-packet into packets at out + i * stride.

    Return how many, ERR_MALFORMED when the headers do not parse, or ERR_ROOM
    when more than room packets would be needed.
    """
    cdef int typ = h.gso_type & ~GSO_ECN
    cdef int v6, ihl, proto, l4hl, hlen, gso, pay, nseg, i, chunk, total, ck, tcp
    cdef uint32_t seq = 0
    cdef uint16_t ipid = 0, v
    cdef uint8_t *q
    if plen < 20:
        return ERR_MALFORMED
    if pkt[0] >> 4 == 6:
        if plen < 40:
            return ERR_MALFORMED
        v6, ihl, proto = 1, 40, pkt[6]
    elif pkt[0] >> 4 == 4:
        v6, ihl, proto = 0, (pkt[0] & 15) * 4, pkt[9]
        if ihl < 20:
            return ERR_MALFORMED
    else:
        return ERR_MALFORMED
    tcp = typ == GSO_TCPV4 or typ == GSO_TCPV6
    if tcp:
        if proto != 6 or plen < ihl + 20:
            return ERR_MALFORMED
        l4hl = (pkt[ihl + 12] >> 4) * 4
        if l4hl < 20:
            return ERR_MALFORMED
        seq = be32(pkt + ihl + 4)
        ck = ihl + 16
    elif typ == GSO_UDP_L4:
        if proto != 17:
            return ERR_MALFORMED
        l4hl = 8
        ck = ihl + 6
    else:
        return ERR_MALFORMED
    hlen = ihl + l4hl
    gso = h.gso_size
    pay = plen - hlen
    if pay < 0 or gso == 0 or hlen + gso > cap:
        return ERR_MALFORMED
    nseg = (pay + gso - 1) // gso if pay else 1
    if nseg > room:
        return ERR_ROOM
    if not v6:
        ipid = be16(pkt + 4)
    for i in range(nseg):
        q = out + <size_t>i * stride
        chunk = pay - i * gso
        if chunk > gso:
            chunk = gso
        total = hlen + chunk
        memcpy(q, pkt, hlen)
        memcpy(q + hlen, pkt + hlen + i * gso, chunk)
        if v6:
            put16(q + 4, total - 40)
        else:
            put16(q + 2, total)
            put16(q + 4, <uint16_t>(ipid + i))
            ipv4_csum(q, ihl)
        if tcp:
            put32(q + ihl + 4, seq + <uint32_t>(i * gso))
            # FIN and PSH belong to the last segment, CWR to the first
            if i < nseg - 1:
                q[ihl + 13] &= ~(TCP_FIN | TCP_PSH)
            if i > 0:
                q[ihl + 13] &= ~TCP_CWR
        else:
            put16(q + ihl + 4, total - ihl)
        q[ck] = 0
        q[ck + 1] = 0
        v = <uint16_t>~csum_fold(csum_add(q + ihl, total - ihl,
                                          pseudo_sum(q, v6, proto, total - ihl)))
        if v == 0 and not tcp:
            v = 0xFFFF
        memcpy(q + ck, &v, 2)
        lens[i] = total
    return nseg


cdef inline int tcp_head(const uint8_t *p, int n, int *ihl) noexcept nogil:
    """Return the IP + TCP header length of a segment tcp_run may join, else 0."""
    cdef int thl
    if p[0] == 0x45:
        # IPv4 without options and not a fragment
        if p[9] != 6 or (p[6] & 0x3F) or p[7]:
            return 0
        ihl[0] = 20
    elif p[0] >> 4 == 6:
        if p[6] != 6:
            return 0
        ihl[0] = 40
    else:
        return 0
    if n < ihl[0] + 20:
        return 0
    thl = (p[ihl[0] + 12] >> 4) * 4
    # only data-carrying ACK segments (PSH allowed) take part
    if thl < 20 or ihl[0] + thl >= n or (p[ihl[0] + 13] & ~TCP_PSH) != TCP_ACK:
        return 0
    return ihl[0] + thl


cdef inline int tcp_follows(const uint8_t *f, const uint8_t *prev, int prevpay,
                            const uint8_t *c, int hl, int ihl) noexcept nogil:
    """Return whether segment c continues the run that starts at f, after prev."""
    if f[0] != c[0]:
        return 0
    if ihl == 20:
        # same TOS, DF, TTL, protocol and addresses
        if f[1] != c[1] or f[6] != c[6] or f[8] != c[8]:
            return 0
        if memcmp(f + 12, c + 12, 8) != 0:
            return 0
    elif memcmp(f, c, 4) != 0 or f[7] != c[7] or memcmp(f + 8, c + 8, 32) != 0:
        return 0
    # same ports, ack, header length, flags, window and options
    if memcmp(f + ihl, c + ihl, 4) != 0 or memcmp(f + ihl + 8, c + ihl + 8, 4) != 0:
        return 0
    if f[ihl + 12] != c[ihl + 12] or memcmp(f + ihl + 14, c + ihl + 14, 2) != 0:
        return 0
    if memcmp(f + ihl + 20, c + ihl + 20, hl - ihl - 20) != 0:
        return 0
    return be32(c + ihl + 4) == be32(prev + ihl + 4) + <uint32_t>prevpay


cdef int tcp_run(uint8_t **ptr, const int *lens, int n, int *hl_out) noexcept nogil:
    """Find the TCP run at ptr[0]; if longer than one, make ptr[0] its head.

    Return the run length k: segments 1..k-1 then contribute only their payload
    (after hl_out[0] header octets), behind ptr[0]'s headers and vnet header.
    """
    cdef int k = 1, ihl = 0, cihl = 0, hl, total, fpay, prevpay, ch
    cdef uint8_t *p = ptr[0]
    cdef uint8_t *prev = p
    hl = tcp_head(p, lens[0], &ihl)
    if not hl:
        return 1
    fpay = lens[0] - hl
    prevpay = fpay
    total = lens[0]
    # all segments but the last carry the first one's size; PSH ends a run
    while k < n and k < COALESCE_MAX and prevpay == fpay:
        if prev[ihl + 13] & TCP_PSH:
            break
        ch = tcp_head(ptr[k], lens[k], &cihl)
        if ch != hl or cihl != ihl or lens[k] - hl > fpay:
            break
        if total + lens[k] - hl > 65535:
            break
        if not tcp_follows(p, prev, prevpay, ptr[k], hl, ihl):
            break
        total += lens[k] - hl
        prev = ptr[k]
        prevpay = lens[k] - hl
        k += 1
    if k > 1:
        tcp_run_head(p, hl, ihl, total, fpay, prev[ihl + 13] & TCP_PSH)
    hl_out[0] = hl
    return k


cdef void tcp_run_head(uint8_t *p, int hl, int ihl, int total, int gso,
                       int psh) noexcept nogil:
    """Turn the first segment's headers and vnet header into a super-packet's."""
    cdef vnet_hdr_t h
    cdef uint16_t v
    cdef int v6 = ihl == 40
    if v6:
        put16(p + 4, total - 40)
    else:
        put16(p + 2, total)
        ipv4_csum(p, ihl)
    if psh:
        p[ihl + 13] |= TCP_PSH
    # partial checksum: the pseudo-header sum, not inverted, as a device expects
    v = csum_fold(pseudo_sum(p, v6, 6, total - ihl))
    memcpy(p + ihl + 16, &v, 2)
    h.flags = VNET_F_NEEDS_CSUM
    h.gso_type = GSO_TCPV6 if v6 else GSO_TCPV4
    h.hdr_len = <uint16_t>hl
    h.gso_size = <uint16_t>gso
    h.csum_start = <uint16_t>ihl
    h.csum_offset = 16
    memcpy(p - VNET_LEN, &h, VNET_LEN)


def tun_segment(bytes vnet_hdr, bytes packet, int mtu=9000) -> list:
    """Cut a TUN super-packet (vnet header + packet) as the engine does.

    Return packets of at most mtu octets with complete headers and checksums;
    a packet without GSO comes back alone with its partial checksum finished.
    Raise ValueError when the headers do not parse.
    """
    cdef vnet_hdr_t h
    cdef Py_ssize_t n = len(packet)
    cdef int room = 1024, k, i
    cdef uint8_t *out
    cdef int *lens
    if len(vnet_hdr) != VNET_LEN or n > 65535:
        raise ValueError(f"Bad vnet header or packet length {len(vnet_hdr)}, {n}")
    memcpy(&h, PyBytes_AS_STRING(vnet_hdr), VNET_LEN)
    out = <uint8_t *>malloc(<size_t>room * SLOT)
    lens = <int *>malloc(room * sizeof(int))
    if out == NULL or lens == NULL:
        free(out)
        free(lens)
        raise MemoryError()
    try:
        if h.gso_type == GSO_NONE:
            memcpy(out, PyBytes_AS_STRING(packet), n)
            lens[0] = <int>n
            k = 1
            if h.flags & VNET_F_NEEDS_CSUM and csum_complete(&h, out, <int>n) != 0:
                k = ERR_MALFORMED
        else:
            k = gso_split(&h, <const uint8_t *>PyBytes_AS_STRING(packet), <int>n,
                          out, SLOT, mtu, lens, room)
        if k < 0:
            raise ValueError("Malformed super-packet")
        return [PyBytes_FromStringAndSize(<char *>out + <size_t>i * SLOT, lens[i])
                for i in range(k)]
    finally:
        free(out)
        free(lens)


def tun_coalesce(list packets) -> list:
    """Fold in-order TCP segments as the engine does before a TUN write.

    Return one buffer per write: a vnet header and the packet, a run's payloads
    appended behind its first segment.
    """
    cdef Py_ssize_t n = len(packets)
    cdef int i = 0, k, j, hl = 0
    cdef uint8_t *buf
    cdef uint8_t **ptr
    cdef int *lens
    for pkt in packets:
        if not isinstance(pkt, bytes) or not 40 <= len(pkt) <= SLOT - HEADROOM:
            raise ValueError("Bad packet in batch")
    buf = <uint8_t *>malloc(<size_t>(n + 1) * SLOT)
    ptr = <uint8_t **>malloc((n + 1) * sizeof(uint8_t *))
    lens = <int *>malloc((n + 1) * sizeof(int))
    out = []
    try:
        if buf == NULL or ptr == NULL or lens == NULL:
            raise MemoryError()
        for j in range(n):
            ptr[j] = buf + <size_t>j * SLOT + HEADROOM
            lens[j] = len(packets[j])
            memcpy(ptr[j], PyBytes_AS_STRING(packets[j]), lens[j])
        while i < n:
            k = tcp_run(ptr + i, lens + i, <int>(n - i), &hl)
            if k == 1:
                memset(ptr[i] - VNET_LEN, 0, VNET_LEN)
                out.append(PyBytes_FromStringAndSize(<char *>ptr[i] - VNET_LEN,
                                                     lens[i] + VNET_LEN))
            else:
                one = [PyBytes_FromStringAndSize(<char *>ptr[i] - VNET_LEN,
                                                 lens[i] + VNET_LEN)]
                for j in range(i + 1, i + k):
                    one.append(PyBytes_FromStringAndSize(<char *>ptr[j] + hl,
                                                         lens[j] - hl))
                out.append(b"".join(one))
            i += k
        return out
    finally:
        free(buf)
        free(ptr)
        free(lens)


cdef inline int gro_size(msghdr *mh) noexcept nogil:
    """Return the UDP_GRO segment size a receive reported, 0 if none."""
    cdef cmsghdr *c = CMSG_FIRSTHDR(mh)
    cdef int v
    while c != NULL:
        if c.cmsg_level == SOL_UDP_ and c.cmsg_type == UDP_GRO_:
            memcpy(&v, CMSG_DATA(c), sizeof(int))
            return v
        c = CMSG_NXTHDR(mh, c)
    return 0


# ---------------------------------------------------------------- engine


cdef struct session_t:
    uint32_t id
    int tun_fd
    int vnet               # reads and writes carry a virtio_net_hdr
    sa_t *out_sa           # newest outbound SA, used for TUN traffic
    sa_t *sas              # every SA of the session, newest first (snext)
    session_t *hnext


cdef struct counters_t:
    uint64_t udp_rx
    uint64_t rx_esp
    uint64_t rx_ike
    uint64_t keepalives
    uint64_t no_sa
    uint64_t malformed
    uint64_t dummy
    uint64_t no_session
    uint64_t tun_rx
    uint64_t tun_tx
    uint64_t tun_errors
    uint64_t tun_malformed
    uint64_t no_sa_tx
    uint64_t udp_tx
    uint64_t send_errors
    uint64_t crypto_errors
    uint64_t ike_tx
    uint64_t ike_callback_errors
    uint64_t poll_errors
    uint64_t tun_gso_rx        # TUN super-packets read and segmented
    uint64_t tun_segments      # packets cut from them
    uint64_t tun_gro_tx        # coalesced TCP super-packets written to TUNs
    uint64_t tun_gro_segs      # segments folded into them
    uint64_t udp_gso_tx        # sendmsg calls carrying UDP_SEGMENT
    uint64_t udp_gso_segs      # datagrams sent that way
    uint64_t udp_gso_fallbacks
    uint64_t udp_gro_rx        # coalesced datagrams received (UDP_GRO)
    uint64_t udp_gro_segs      # datagrams split out of them
    uint64_t ike_dropped


cdef inline uint32_t hash32(uint32_t v) noexcept nogil:
    return ((v * 2654435761U) >> 22) & (HASH_SIZE - 1)


@cython.final
cdef class Engine:
    """The ESP dataplane over one ESP-in-UDP socket and one TUN per session.

    The caller owns the UDP socket (bound to 4500, non-blocking) and the TUN
    fds; the engine only reads and writes them.  All methods are safe to call
    from another thread while the worker runs.
    """

    cdef int udp_fd
    cdef int ep_fd
    cdef int ev_fd
    cdef int batch
    cdef int backend
    cdef int family
    cdef int stopping
    cdef pthread_mutex_t lock
    cdef sa_t *sa_in[1024]
    cdef sa_t *sa_out[1024]
    cdef session_t *sessions[1024]
    cdef counters_t c
    cdef uint8_t *rx_buf
    cdef uint8_t *tx_buf
    cdef mmsghdr *rx_msgs
    cdef mmsghdr *tx_msgs
    cdef iovec *rx_iov
    cdef iovec *tx_iov
    cdef sockaddr_storage *rx_addr
    cdef int *tx_len
    cdef int gso
    cdef int gro
    cdef int coalesce
    cdef size_t rx_slot
    cdef uint8_t *stage
    cdef uint8_t *rx_ctrl
    cdef uint8_t *tx_ctrl
    cdef int *tx_first
    cdef session_t **in_sess
    cdef uint8_t **in_ptr
    cdef int *in_len
    cdef int in_n
    cdef iovec wiov[64]
    cdef uint8_t **ike_ptr
    cdef int *ike_len
    cdef int *ike_src
    cdef int ike_n
    cdef object _thread
    cdef object _callback
    cdef object _send_lock

    def __cinit__(self, int udp_fd, *, int batch=64, str crypto="ipsec-mb",
                  bint gso=True, bint gro=True, bint coalesce=True):
        cdef sockaddr_storage ss
        cdef socklen_t sl = sizeof(ss)
        cdef epoll_event ev
        cdef int i
        self.ep_fd = -1
        self.ev_fd = -1
        if batch < 1 or batch > MAX_BATCH:
            raise ValueError(f"Bad batch size {batch}")
        self.backend = _backend_id(crypto)
        if getsockname(udp_fd, <sockaddr *>&ss, &sl) != 0:
            raise OSError(errno, f"Bad UDP socket fd {udp_fd}")
        if ss.ss_family != AF_INET and ss.ss_family != AF_INET6:
            raise ValueError(f"UDP socket fd {udp_fd} is not an inet socket")
        self.family = ss.ss_family
        self.udp_fd = udp_fd
        self.batch = batch
        self.gso = gso
        self.coalesce = coalesce
        self.gro = 0
        if gro:
            self.gro = 1
            # fall back to one datagram per receive where the kernel refuses
            if setsockopt(udp_fd, SOL_UDP_, UDP_GRO_, &self.gro, sizeof(int)) != 0:
                self.gro = 0
        self.rx_slot = RX_SLOT if self.gro else SLOT
        pthread_mutex_init(&self.lock, NULL)
        self._send_lock = threading.Lock()

        # preallocated slots: rx holds datagrams (64 KB with GRO), tx holds
        # TUN packets or the segments of TUN super-packets at HEADROOM
        self.rx_buf = <uint8_t *>malloc(<size_t>batch * self.rx_slot)
        self.tx_buf = <uint8_t *>malloc(<size_t>TX_SLOTS * SLOT)
        self.stage = <uint8_t *>malloc(STAGE)
        self.rx_msgs = <mmsghdr *>calloc(batch, sizeof(mmsghdr))
        self.tx_msgs = <mmsghdr *>calloc(TX_SLOTS, sizeof(mmsghdr))
        self.rx_iov = <iovec *>calloc(batch, sizeof(iovec))
        self.tx_iov = <iovec *>calloc(TX_SLOTS, sizeof(iovec))
        self.rx_addr = <sockaddr_storage *>calloc(batch, sizeof(sockaddr_storage))
        self.rx_ctrl = <uint8_t *>calloc(batch, CTRL_LEN)
        self.tx_ctrl = <uint8_t *>calloc(TX_SLOTS, CTRL_LEN)
        self.tx_len = <int *>calloc(TX_SLOTS, sizeof(int))
        self.tx_first = <int *>calloc(TX_SLOTS + 1, sizeof(int))
        self.in_sess = <session_t **>calloc(PENDING, sizeof(session_t *))
        self.in_ptr = <uint8_t **>calloc(PENDING, sizeof(uint8_t *))
        self.in_len = <int *>calloc(PENDING, sizeof(int))
        self.ike_ptr = <uint8_t **>calloc(PENDING, sizeof(uint8_t *))
        self.ike_len = <int *>calloc(PENDING, sizeof(int))
        self.ike_src = <int *>calloc(PENDING, sizeof(int))
        if (self.rx_buf == NULL or self.tx_buf == NULL or self.stage == NULL
                or self.rx_msgs == NULL or self.tx_msgs == NULL
                or self.rx_iov == NULL or self.tx_iov == NULL
                or self.rx_addr == NULL or self.rx_ctrl == NULL
                or self.tx_ctrl == NULL or self.tx_len == NULL
                or self.tx_first == NULL or self.in_sess == NULL
                or self.in_ptr == NULL or self.in_len == NULL
                or self.ike_ptr == NULL or self.ike_len == NULL
                or self.ike_src == NULL):
            raise MemoryError()
        for i in range(batch):
            self.rx_iov[i].iov_base = self.rx_buf + <size_t>i * self.rx_slot
            self.rx_iov[i].iov_len = self.rx_slot
            self.rx_msgs[i].msg_hdr.msg_iov = &self.rx_iov[i]
            self.rx_msgs[i].msg_hdr.msg_iovlen = 1
            self.rx_msgs[i].msg_hdr.msg_name = &self.rx_addr[i]

        # epoll over the UDP socket and the wake-up eventfd
        self.ep_fd = epoll_create1(EPOLL_CLOEXEC)
        if self.ep_fd < 0:
            raise OSError(errno, "epoll_create1 failed")
        self.ev_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        if self.ev_fd < 0:
            raise OSError(errno, "eventfd failed")
        ev.events = EPOLLIN
        ev.data.u64 = TAG_UDP
        if epoll_ctl(self.ep_fd, EPOLL_CTL_ADD, udp_fd, &ev) != 0:
            raise OSError(errno, "epoll_ctl on the UDP socket failed")
        ev.data.u64 = TAG_WAKE
        if epoll_ctl(self.ep_fd, EPOLL_CTL_ADD, self.ev_fd, &ev) != 0:
            raise OSError(errno, "epoll_ctl on the eventfd failed")

    def __dealloc__(self):
        cdef int i, tab
        cdef sa_t *sa
        cdef sa_t *nxt
        cdef session_t *s
        cdef session_t *snx
        for i in range(HASH_SIZE):
            for tab in range(2):
                sa = self.sa_in[i] if tab == 0 else self.sa_out[i]
                while sa != NULL:
                    nxt = sa.hnext
                    sa_free(sa)
                    sa = nxt
            s = self.sessions[i]
            while s != NULL:
                snx = s.hnext
                free(s)
                s = snx
        if self.ep_fd >= 0:
            close(self.ep_fd)
        if self.ev_fd >= 0:
            close(self.ev_fd)
        free(self.rx_buf)
        free(self.tx_buf)
        free(self.rx_msgs)
        free(self.tx_msgs)
        free(self.rx_iov)
        free(self.tx_iov)
        free(self.rx_addr)
        free(self.tx_len)
        free(self.stage)
        free(self.rx_ctrl)
        free(self.tx_ctrl)
        free(self.tx_first)
        free(self.in_sess)
        free(self.in_ptr)
        free(self.in_len)
        free(self.ike_ptr)
        free(self.ike_len)
        free(self.ike_src)
        pthread_mutex_destroy(&self.lock)

    # -- tables (callers hold self.lock)

    cdef session_t *_session(self, uint32_t sid) noexcept nogil:
        cdef session_t *s = self.sessions[hash32(sid)]
        while s != NULL and s.id != sid:
            s = s.hnext
        return s

    cdef sa_t **_bucket(self, uint32_t spi, int inbound) noexcept nogil:
        if inbound:
            return &self.sa_in[hash32(spi)]
        return &self.sa_out[hash32(spi)]

    cdef sa_t *_sa(self, uint32_t spi, int inbound) noexcept nogil:
        cdef sa_t *sa = self._bucket(spi, inbound)[0]
        while sa != NULL and sa.spi != spi:
            sa = sa.hnext
        return sa

    cdef void _unlink_sa(self, sa_t *sa) noexcept nogil:
        cdef sa_t **pp = self._bucket(sa.spi, sa.inbound)
        cdef session_t *s
        while pp[0] != NULL and pp[0] != sa:
            pp = &pp[0].hnext
        if pp[0] == sa:
            pp[0] = sa.hnext
        s = self._session(sa.session)
        if s == NULL:
            return
        pp = &s.sas
        while pp[0] != NULL and pp[0] != sa:
            pp = &pp[0].snext
        if pp[0] == sa:
            pp[0] = sa.snext
        if s.out_sa == sa:
            # make before break: fall back to the newest remaining outbound SA
            s.out_sa = s.sas
            while s.out_sa != NULL and s.out_sa.inbound:
                s.out_sa = s.out_sa.snext

    cdef inline void _lock(self) noexcept:
        with nogil:
            pthread_mutex_lock(&self.lock)

    cdef inline void _unlock(self) noexcept:
        pthread_mutex_unlock(&self.lock)

    # -- control-plane API

    def add_session(self, int session, int tun_fd, *, vnet_hdr=None) -> None:
        """Attach a session and its TUN fd (non-blocking) to the engine.

        vnet_hdr says whether the fd carries virtio-net headers (``open_tun``
        with offload); None asks the kernel.
        """
        cdef session_t *s
        cdef epoll_event ev
        cdef int rc
        if session < 0 or tun_fd < 0:
            raise ValueError(f"Bad session {session} or TUN fd {tun_fd}")
        if vnet_hdr is None:
            vnet_hdr = tun_vnet_hdr(tun_fd)
        s = <session_t *>calloc(1, sizeof(session_t))
        if s == NULL:
            raise MemoryError()
        s.id = session
        s.tun_fd = tun_fd
        s.vnet = bool(vnet_hdr)
        self._lock()
        if self._session(session) != NULL:
            self._unlock()
            free(s)
            raise ValueError(f"Session {session} already exists")
        ev.events = EPOLLIN
        ev.data.u64 = TAG_TUN | <uint32_t>session
        rc = epoll_ctl(self.ep_fd, EPOLL_CTL_ADD, tun_fd, &ev)
        if rc == 0:
            s.hnext = self.sessions[hash32(session)]
            self.sessions[hash32(session)] = s
        self._unlock()
        if rc != 0:
            free(s)
            raise OSError(errno, f"Cannot poll TUN fd {tun_fd}")

    def remove_session(self, int session) -> None:
        """Detach a session and free all of its SAs; the TUN fd stays open."""
        cdef session_t **pp
        cdef session_t *s
        cdef sa_t *sa
        cdef sa_t *nxt
        cdef sa_t *doomed = NULL
        self._lock()
        pp = &self.sessions[hash32(session)]
        while pp[0] != NULL and pp[0].id != <uint32_t>session:
            pp = &pp[0].hnext
        s = pp[0]
        if s != NULL:
            pp[0] = s.hnext
            epoll_ctl(self.ep_fd, EPOLL_CTL_DEL, s.tun_fd, NULL)
            sa = s.sas
            while sa != NULL:
                nxt = sa.snext
                s.sas = nxt
                self._unlink_sa(sa)
                sa.snext = doomed
                doomed = sa
                sa = nxt
        self._unlock()
        if s == NULL:
            raise KeyError(f"No session {session}")
        free(s)
        while doomed != NULL:
            nxt = doomed.snext
            sa_free(doomed)
            doomed = nxt

    def install_sa(self, params) -> None:
        """Install one SA; a new outbound SA takes over its session's traffic."""
        cdef sa_t *sa
        cdef session_t *s
        cdef sa_t **bucket
        cdef str err = None
        if params.engine == "kernel":
            raise ValueError(f"SA 0x{params.spi:08x} asks for the kernel engine")
        sa = sa_from_params(params, self.backend, self.family)
        self._lock()
        s = self._session(sa.session)
        if s == NULL:
            err = f"No session {sa.session}"
        elif self._sa(sa.spi, sa.inbound) != NULL:
            err = f"SA 0x{sa.spi:08x} already installed"
        else:
            bucket = self._bucket(sa.spi, sa.inbound)
            sa.hnext = bucket[0]
            bucket[0] = sa
            sa.snext = s.sas
            s.sas = sa
            if not sa.inbound:
                s.out_sa = sa
        self._unlock()
        if err is not None:
            sa_free(sa)
            raise ValueError(err)

    def remove_sa(self, uint32_t spi, bint inbound) -> None:
        """Remove one SA; outbound traffic falls back to the newest remaining."""
        cdef sa_t *sa
        self._lock()
        sa = self._sa(spi, inbound)
        if sa != NULL:
            self._unlink_sa(sa)
        self._unlock()
        if sa == NULL:
            raise KeyError(f"No SA 0x{spi:08x} inbound={inbound}")
        sa_free(sa)

    def set_peer(self, int session, addr) -> None:
        """Point every SA of a session at a new peer (NAT mapping change)."""
        cdef sockaddr_storage ss
        cdef socklen_t sl = 0
        cdef session_t *s
        cdef sa_t *sa
        fill_sockaddr(&ss, &sl, addr, self.family)
        self._lock()
        s = self._session(session)
        if s != NULL:
            sa = s.sas
            while sa != NULL:
                sa.peer = ss
                sa.peer_len = sl
                sa = sa.snext
        self._unlock()
        if s == NULL:
            raise KeyError(f"No session {session}")

    def sa_counters(self, uint32_t spi, bint inbound) -> dict:
        """Return one SA's packet, byte, sequence and drop counters."""
        cdef sa_t *sa
        cdef sa_t copy
        self._lock()
        sa = self._sa(spi, inbound)
        if sa != NULL:
            memcpy(&copy, sa, sizeof(sa_t))
        self._unlock()
        if sa == NULL:
            raise KeyError(f"No SA 0x{spi:08x} inbound={inbound}")
        out = {"packets": copy.packets, "bytes": copy.bytes}
        if inbound:
            out["highest_seq"] = copy.replay.top
        else:
            out["next_seq"] = copy.next_seq
            out["seq_exhausted"] = copy.seq_exhausted
            out["seq_limit"] = copy.seq_limit
            out["seq_blocked"] = copy.seq_blocked
        out["drops"] = {
            "replay": copy.drop_replay,
            "auth": copy.drop_auth,
            "malformed": copy.drop_malformed,
            "policy": copy.drop_policy,
        }
        return out

    def set_seq_limit(self, uint32_t spi, uint64_t limit) -> None:
        """Let an outbound SA send up to limit (inclusive), capped at its maximum.

        The sequence store calls this only after the block ending at limit is
        durable; lowering the limit is allowed (a soft stop before a rekey).
        """
        cdef sa_t *sa
        self._lock()
        sa = self._sa(spi, False)
        if sa != NULL:
            sa.seq_limit = seq_cap(sa, limit)
        self._unlock()
        if sa == NULL:
            raise KeyError(f"No SA 0x{spi:08x} inbound=False")

    def features(self) -> dict:
        """Return which offloads are in use (they turn off when refused)."""
        return {
            "udp_gso": bool(self.gso),
            "udp_gro": bool(self.gro),
            "tun_coalesce": bool(self.coalesce),
        }

    def counters(self) -> dict:
        """Return the engine-wide counters."""
        cdef counters_t copy
        self._lock()
        copy = self.c
        self._unlock()
        return dict(copy)

    def send_ike(self, bytes data, addr) -> None:
        """Send an IKE message on the 4500 socket behind the non-ESP marker."""
        cdef sockaddr_storage ss
        cdef socklen_t sl = 0
        cdef uint8_t marker[4]
        cdef iovec iov[2]
        cdef msghdr mh
        cdef ssize_t rc
        fill_sockaddr(&ss, &sl, addr, self.family)
        # RFC 3948 section 2.2: four zero octets where an ESP SPI would be
        memset(marker, 0, 4)
        iov[0].iov_base = marker
        iov[0].iov_len = 4
        iov[1].iov_base = PyBytes_AS_STRING(data)
        iov[1].iov_len = len(data)
        memset(&mh, 0, sizeof(mh))
        mh.msg_name = &ss
        mh.msg_namelen = sl
        mh.msg_iov = iov
        mh.msg_iovlen = 2
        with nogil:
            rc = sendmsg(self.udp_fd, &mh, 0)
        if rc < 0:
            raise OSError(errno, "Cannot send IKE datagram")
        with self._send_lock:
            self.c.ike_tx += 1

    # -- worker

    def start(self, ike_callback) -> None:
        """Start the worker thread; ike_callback(data, addr) gets IKE datagrams."""
        assert self._thread is None, "Engine already started"
        self._callback = ike_callback
        self.stopping = 0
        self._thread = threading.Thread(
            target=self._run, name="espgate-fastpath", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Wake the worker, let it finish its batch and join it."""
        cdef uint64_t one = 1
        if self._thread is None:
            return
        self.stopping = 1
        write(self.ev_fd, &one, 8)
        self._thread.join()
        self._thread = None

    def _run(self) -> None:
        cdef int rc = 0
        log.debug("fastpath worker up, batch %d", self.batch)
        while rc == 0:
            with nogil:
                rc = self._poll()
            if self.ike_n:
                self._deliver_ike()
        log.debug("fastpath worker down")

    cdef int _poll(self) noexcept nogil:
        cdef epoll_event evs[64]
        cdef uint64_t tag, junk
        cdef int n, i
        n = epoll_wait(self.ep_fd, evs, MAX_EVENTS, -1)
        if n < 0:
            if errno == EINTR:
                return 0
            self.c.poll_errors += 1
            return -1
        for i in range(n):
            tag = evs[i].data.u64
            if tag == TAG_WAKE:
                read(self.ev_fd, &junk, 8)
                continue
            pthread_mutex_lock(&self.lock)
            if tag == TAG_UDP:
                self._rx()
            else:
                self._tx(<uint32_t>tag)
            pthread_mutex_unlock(&self.lock)
        return -1 if self.stopping else 0

    cdef void _rx(self) noexcept nogil:
        cdef int n, i, gso
        cdef unsigned int ln, off, sl
        cdef uint8_t *p
        cdef msghdr *mh
        for i in range(self.batch):
            mh = &self.rx_msgs[i].msg_hdr
            mh.msg_namelen = sizeof(sockaddr_storage)
            mh.msg_flags = 0
            mh.msg_control = self.rx_ctrl + <size_t>i * CTRL_LEN
            mh.msg_controllen = CTRL_LEN
        n = recvmmsg(self.udp_fd, self.rx_msgs, self.batch, MSG_DONTWAIT, NULL)
        if n <= 0:
            return
        self.c.udp_rx += n
        self.ike_n = 0
        for i in range(n):
            p = self.rx_buf + <size_t>i * self.rx_slot
            ln = self.rx_msgs[i].msg_len
            if self.rx_msgs[i].msg_hdr.msg_flags & MSG_TRUNC:
                self.c.malformed += 1
                continue
            # UDP_GRO: equal-size datagrams back to back, the last may be shorter
            gso = gro_size(&self.rx_msgs[i].msg_hdr)
            if gso <= 0 or <unsigned int>gso >= ln:
                self._rx_one(p, ln, i)
                continue
            self.c.udp_gro_rx += 1
            off = 0
            while off < ln:
                sl = ln - off if ln - off < <unsigned int>gso else <unsigned int>gso
                self._rx_one(p + off, sl, i)
                self.c.udp_gro_segs += 1
                off += sl
        self._flush_tun()

    cdef void _rx_one(self, uint8_t *p, unsigned int ln, int src) noexcept nogil:
        # RFC 3948 section 2.3: a lone 0xFF octet is a NAT-keepalive
        if ln == 1 and p[0] == 0xFF:
            self.c.keepalives += 1
        elif ln < 4:
            self.c.malformed += 1
        # RFC 3948 section 2.2: a zero SPI field is the non-ESP marker (IKE)
        elif be32(p) == 0:
            self.c.rx_ike += 1
            if self.ike_n == PENDING:
                self.c.ike_dropped += 1
                return
            self.ike_ptr[self.ike_n] = p
            self.ike_len[self.ike_n] = ln
            self.ike_src[self.ike_n] = src
            self.ike_n += 1
        else:
            self.c.rx_esp += 1
            self._rx_esp(p, ln)

    cdef void _rx_esp(self, uint8_t *p, unsigned int n) noexcept nogil:
        cdef sa_t *sa
        cdef session_t *s
        cdef uint64_t seq
        cdef int plen, total, nh = 0
        if n < ESP_HEAD + 2 + ICV_LEN:
            self.c.malformed += 1
            return
        sa = self._sa(be32(p), 1)
        if sa == NULL:
            self.c.no_sa += 1
            return
        # RFC 4303 section 3.4.3: duplicate check before the ICV ...
        seq = replay_infer(&sa.replay, be32(p + 4))
        if not replay_check(&sa.replay, seq):
            sa.drop_replay += 1
            return
        plen = esp_open(sa, p, n, seq, &nh)
        if plen == ERR_AUTH:
            sa.drop_auth += 1
            return
        # ... and the window update only once the ICV verified
        replay_update(&sa.replay, seq)
        if plen < 0:
            sa.drop_malformed += 1
            return
        total = inner_check(sa, p + ESP_HEAD, plen, nh)
        if total < 0:
            if total == ERR_DUMMY:
                self.c.dummy += 1
            elif total == ERR_POLICY:
                sa.drop_policy += 1
            else:
                sa.drop_malformed += 1
            return
        sa.packets += 1
        sa.bytes += total
        s = self._session(sa.session)
        if s == NULL:
            self.c.no_session += 1
            return
        # queue for the TUN; the ESP header in front leaves room for a vnet header
        self.in_sess[self.in_n] = s
        self.in_ptr[self.in_n] = p + ESP_HEAD
        self.in_len[self.in_n] = total
        self.in_n += 1
        if self.in_n == PENDING:
            self._flush_tun()

    cdef void _flush_tun(self) noexcept nogil:
        """Write the queued inner packets, runs of one TCP flow as one."""
        cdef int i = 0, k, m, n, hl = 0
        cdef session_t *s
        cdef uint8_t *p
        cdef long r
        while i < self.in_n:
            s = self.in_sess[i]
            p = self.in_ptr[i]
            n = self.in_len[i]
            k = 1
            if not s.vnet:
                r = write(s.tun_fd, p, n)
            else:
                # the packets after i that go to the same TUN, then the TCP run
                m = 1
                while i + m < self.in_n and self.in_sess[i + m] == s:
                    m += 1
                k = tcp_run(self.in_ptr + i, self.in_len + i, m, &hl) if (
                    self.coalesce) else 1
                if k == 1:
                    memset(p - VNET_LEN, 0, VNET_LEN)
                    r = write(s.tun_fd, p - VNET_LEN, n + VNET_LEN)
                else:
                    self._write_run(s, i, k, hl)
                    r = 0
            if r < 0:
                self.c.tun_errors += k
            else:
                self.c.tun_tx += k
            i += k
        self.in_n = 0

    cdef void _write_run(self, session_t *s, int i, int k, int hl) noexcept nogil:
        cdef int j
        self.wiov[0].iov_base = self.in_ptr[i] - VNET_LEN
        self.wiov[0].iov_len = self.in_len[i] + VNET_LEN
        for j in range(1, k):
            self.wiov[j].iov_base = self.in_ptr[i + j] + hl
            self.wiov[j].iov_len = self.in_len[i + j] - hl
        if writev(s.tun_fd, self.wiov, k) < 0:
            self.c.tun_errors += k
            self.c.tun_tx -= k
            return
        self.c.tun_gro_tx += 1
        self.c.tun_gro_segs += k

    cdef inline uint8_t *_slot(self, int i) noexcept nogil:
        return self.tx_buf + <size_t>i * SLOT + HEADROOM

    cdef void _tx(self, uint32_t sid) noexcept nogil:
        cdef session_t *s = self._session(sid)
        cdef sa_t *sa
        cdef int n = 0, reads = 0, k
        cdef long r
        cdef int cap = SLOT - HEADROOM - ESP_TAIL_MAX
        cdef vnet_hdr_t h
        cdef uint8_t *pkt
        if s == NULL:
            return
        sa = s.out_sa

        # read the TUN until EAGAIN or batch reads; a super-packet fills many slots
        while reads < self.batch:
            if n == TX_SLOTS:
                self._seal_send(sa, n)
                n = 0
            if not s.vnet:
                r = read(s.tun_fd, self._slot(n), cap)
            else:
                r = read(s.tun_fd, self.stage, STAGE)
            if r <= 0:
                if r < 0 and errno != EAGAIN:
                    self.c.tun_errors += 1
                break
            reads += 1
            if not s.vnet:
                self.tx_len[n] = <int>r
                n += 1
                continue
            if r <= VNET_LEN:
                self.c.tun_malformed += 1
                continue
            memcpy(&h, self.stage, VNET_LEN)
            pkt = self.stage + VNET_LEN
            r -= VNET_LEN
            if h.gso_type == GSO_NONE:
                if r > cap:
                    self.c.tun_malformed += 1
                    continue
                memcpy(self._slot(n), pkt, r)
                if (h.flags & VNET_F_NEEDS_CSUM
                        and csum_complete(&h, self._slot(n), <int>r) != 0):
                    self.c.tun_malformed += 1
                    continue
                self.tx_len[n] = <int>r
                n += 1
                continue
            k = gso_split(&h, pkt, <int>r, self._slot(n), SLOT, cap, &self.tx_len[n],
                          TX_SLOTS - n)
            if k == ERR_ROOM and n > 0:
                self._seal_send(sa, n)
                n = 0
                k = gso_split(&h, pkt, <int>r, self._slot(0), SLOT, cap, self.tx_len,
                              TX_SLOTS)
            if k < 0:
                self.c.tun_malformed += 1
                continue
            self.c.tun_gso_rx += 1
            self.c.tun_segments += k
            n += k
        self.c.tun_rx += reads
        if n:
            self._seal_send(sa, n)

    cdef void _seal_send(self, sa_t *sa, int n) noexcept nogil:
        cdef int m = 0, i, ln, nh
        cdef uint8_t *p
        if sa == NULL:
            self.c.no_sa_tx += n
            return
        for i in range(n):
            p = self._slot(i)
            nh = 4 if p[0] >> 4 == 4 else (41 if p[0] >> 4 == 6 else 0)
            if nh == 0:
                self.c.tun_malformed += 1
                continue
            # RFC 4303 section 3.3.3: the counter must not cycle; rekey first.
            # Below the hard maximum the limit is the durably reserved mark.
            if sa.next_seq > sa.seq_limit:
                if sa.seq_limit < seq_cap(sa, 0xFFFFFFFFFFFFFFFFULL):
                    sa.seq_blocked += 1
                else:
                    sa.seq_exhausted += 1
                continue
            ln = esp_seal(sa, p, self.tx_len[i], sa.next_seq, nh, NULL)
            if ln < 0:
                self.c.crypto_errors += 1
                continue
            sa.next_seq += 1
            sa.packets += 1
            sa.bytes += self.tx_len[i]
            self.tx_iov[m].iov_base = p - ESP_HEAD
            self.tx_iov[m].iov_len = ln
            m += 1
        self._send(sa, 0, m)

    cdef void _send(self, sa_t *sa, int first, int m) noexcept nogil:
        """Send tx_iov[first:m] to sa's peer, equal-size runs as one GSO datagram."""
        cdef int g = 0, i = first, start
        cdef size_t size, total
        cdef msghdr *mh
        cdef cmsghdr *cm
        cdef uint16_t seg
        while i < m:
            start = i
            size = self.tx_iov[i].iov_len
            total = size
            i += 1
            if self.gso:
                # a shorter datagram ends the run as its last segment
                while (i < m and i - start < GSO_MAX_SEGS
                        and self.tx_iov[i].iov_len <= size
                        and total + self.tx_iov[i].iov_len <= GSO_MAX_BYTES):
                    total += self.tx_iov[i].iov_len
                    i += 1
                    if self.tx_iov[i - 1].iov_len < size:
                        break
            mh = &self.tx_msgs[g].msg_hdr
            mh.msg_name = &sa.peer
            mh.msg_namelen = sa.peer_len
            mh.msg_iov = &self.tx_iov[start]
            mh.msg_iovlen = i - start
            mh.msg_flags = 0
            mh.msg_control = NULL
            mh.msg_controllen = 0
            if i - start > 1:
                mh.msg_control = self.tx_ctrl + <size_t>g * CTRL_LEN
                mh.msg_controllen = CMSG_SPACE(sizeof(uint16_t))
                cm = CMSG_FIRSTHDR(mh)
                cm.cmsg_level = SOL_UDP_
                cm.cmsg_type = UDP_SEGMENT_
                cm.cmsg_len = CMSG_LEN(sizeof(uint16_t))
                seg = <uint16_t>size
                memcpy(CMSG_DATA(cm), &seg, sizeof(uint16_t))
            self.tx_first[g] = start
            g += 1
        self.tx_first[g] = m
        self._sendmmsg(sa, g, m)

    cdef void _sendmmsg(self, sa_t *sa, int g, int m) noexcept nogil:
        cdef int off = 0, r, j, segs
        while off < g:
            r = sendmmsg(self.udp_fd, self.tx_msgs + off, g - off, MSG_DONTWAIT)
            if r < 0:
                if errno == EINTR:
                    continue
                segs = self.tx_first[off + 1] - self.tx_first[off]
                if segs > 1 and (errno == EIO or errno == EINVAL):
                    # the kernel or the device cannot segment: stop asking
                    self.gso = 0
                    self.c.udp_gso_fallbacks += 1
                    self._send(sa, self.tx_first[off], m)
                    return
                if errno == EAGAIN:
                    self.c.send_errors += m - self.tx_first[off]
                    return
                # skip the datagram the kernel refused and carry on
                self.c.send_errors += segs
                off += 1
                continue
            for j in range(off, off + r):
                segs = self.tx_first[j + 1] - self.tx_first[j]
                self.c.udp_tx += segs
                if segs > 1:
                    self.c.udp_gso_tx += 1
                    self.c.udp_gso_segs += segs
            off += r

    cdef void _deliver_ike(self):
        cdef int k
        n = self.ike_n
        self.ike_n = 0
        for k in range(n):
            data = PyBytes_FromStringAndSize(<char *>self.ike_ptr[k] + 4,
                                             self.ike_len[k] - 4)
            addr = sockaddr_tuple(&self.rx_addr[self.ike_src[k]])
            try:
                self._callback(data, addr)
            except Exception:
                self.c.ike_callback_errors += 1
                if self.c.ike_callback_errors == 1:
                    log.exception("ike callback failed; further failures only counted")


# ---------------------------------------------------------------- module init


cdef void _init_ipsecmb():
    global _mgr
    _mgr = alloc_mb_mgr(0)
    if _mgr == NULL:
        return
    init_mb_mgr_auto(_mgr, &_arch)
    if imb_get_errno(_mgr) != 0:
        _mgr = NULL


_init_ipsecmb()
