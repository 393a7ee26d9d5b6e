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
* ``Engine`` runs ``workers`` threads (one per core by default).  Each worker
  has its own epoll set, eventfd, slots and counters, and owns a disjoint set
  of sessions: it alone reads their TUN fds, so one session's outbound
  sequence numbers come from one thread (``sa_take_seq`` reserves them per
  batch, the one place they are handed out).  The ESP-in-UDP socket (RFC 3948)
  is read either by worker 0 alone, which then decrypts for every session and
  writes into TUNs other workers read (sessions go to the other workers), or,
  when the caller's socket has SO_REUSEPORT, by every worker through a sibling
  socket the engine binds to the same address; the kernel then keeps each
  peer on one socket, so its packets stay in order.  Raw ESP sockets (IP
  protocol 50, SAs with ``encap=False``) are read by worker 0.
* Locking: workers hold the table lock (a writer-preferring rwlock) for
  reading while they handle one batch; Python mutators take it for writing,
  so no worker sees an SA half installed or freed.  Each SA has a spinlock
  for what two workers may touch at once: the replay window (checked before
  the ICV, re-checked and updated after it) and the inbound counters.  IKE
  datagrams (non-ESP marker) stay in the receive slots and are handed to the
  Python callback once the lock is released, with the GIL.
* TUN to UDP: read until EAGAIN or ``batch`` reads.  A TUN opened with a vnet
  header hands over TCP/UDP super-packets; ``gso_split`` cuts them into MTU-sized
  packets in the tx slots (headers fixed up, checksums completed).  Each slot
  is classified first: the session's newest outbound SA whose selectors take
  the packet's addresses, protocol and ports (none: counted ``no_policy``); an
  SA whose selectors cover everything skips the parse.  Then, per SA present
  in the batch, one sequence reservation; its slots are sealed in place and
  runs of equal-size ESP packets (the last may be shorter) leave as one
  ``sendmmsg`` entry with ``UDP_SEGMENT``.  A kernel that refuses
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
    PTHREAD_PROCESS_PRIVATE,
    PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP,
    pthread_rwlock_init,
    pthread_rwlock_destroy,
    pthread_rwlock_rdlock,
    pthread_rwlock_t,
    pthread_rwlock_unlock,
    pthread_rwlock_wrlock,
    pthread_rwlockattr_destroy,
    pthread_rwlockattr_init,
    pthread_rwlockattr_setkind_np,
    pthread_rwlockattr_t,
    pthread_spin_destroy,
    pthread_spin_init,
    pthread_spin_lock,
    pthread_spin_unlock,
    pthread_spinlock_t,
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

from fastpath.sa import SAParams, parse_ts
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
cdef uint64_t TAG_RAW = 1ULL << 35

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


cdef bytes replay_seen_bytes(object seen):
    # the portable bitmap (bit i: top - i arrived) as 512 little-endian bytes
    if seen < 0:
        raise ValueError(f"Bad replay bitmap {seen}")
    return (seen & ((1 << (64 * 64)) - 1)).to_bytes(64 * 8, "little")


cdef int replay_merge(replay_t *r, uint64_t top, const uint8_t *seen) noexcept nogil:
    # mark top and every number seen holds (bit i: top - i) as received, oldest
    # first, so nothing already seen reopens; -1 if top exceeds a 32-bit counter
    cdef uint32_t i, n
    if not r.esn and top > 0xFFFFFFFFULL:
        return -1
    if top == 0:
        return 0
    n = r.size
    if <uint64_t>n > top:
        n = <uint32_t>top
    i = n
    while i > 1:
        i -= 1
        if seen[i >> 3] & (1 << (i & 7)):
            replay_update(r, top - i)
    replay_update(r, top)
    return 0


cdef object replay_dump(const replay_t *r):
    # (top, seen) with bit i of seen set when top - i arrived
    cdef uint32_t i, idx
    cdef uint64_t s
    cdef uint8_t out[512]
    memset(out, 0, sizeof(out))
    i = 0
    while i < r.size and <uint64_t>i < r.top:
        s = r.top - i
        idx = <uint32_t>(s & (r.size - 1))
        if r.bits[idx >> 6] & (1ULL << (idx & 63)):
            out[i >> 3] |= <uint8_t>(1 << (i & 7))
        i += 1
    return r.top, int.from_bytes(PyBytes_FromStringAndSize(<char *>out, 512), "little")


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

    def state(self) -> tuple:
        """Return (top, seen): bit i of seen is set when top - i has arrived."""
        return replay_dump(&self.r)

    def merge(self, uint64_t top, seen) -> None:
        """Mark top and the numbers (top, seen) holds as received.

        The layout is :meth:`state`'s; bits at or beyond ``size`` and numbers
        below 1 are ignored; nothing already seen reopens.  Without ESN a top
        above 2^32 - 1 is a ValueError.
        """
        cdef bytes raw = replay_seen_bytes(seen)
        if replay_merge(&self.r, top, <const uint8_t *>PyBytes_AS_STRING(raw)) != 0:
            raise ValueError(f"Bad replay top {top} for a 32-bit counter")


# ---------------------------------------------------------------- SAs and ESP


cdef struct ts_t:
    # one traffic selector (RFC 7296 section 3.13.1): inclusive address range
    # (4 or 16 octets used), IP protocol (0 = any) and inclusive port range
    int family
    int proto
    int port_lo
    int port_hi
    uint8_t start[16]
    uint8_t end[16]


cdef struct flow_t:
    # what selectors look at in one inner packet
    int family
    int proto
    int has_ports          # ports (or ICMP type/code) were readable
    int sport              # ICMP: type << 8 | code, in both
    int dport
    const uint8_t *src
    const uint8_t *dst


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
    sockaddr_storage peer  # in the engine's UDP family (v4-mapped on a v6 socket)
    socklen_t peer_len
    int encap              # ESP in UDP (RFC 3948), else raw IP protocol 50
    int raw_family         # the peer's own family, for the raw socket
    sockaddr_storage raw_peer
    socklen_t raw_peer_len
    pthread_spinlock_t lock  # guards next_seq, the replay window, rx counters
    int n_rts              # remote side: the client's TSi
    int n_lts              # local side: our TSr
    int match_all          # both sides cover every address, protocol and port
    ts_t rts[16]
    ts_t lts[16]
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
        pthread_spin_destroy(&sa.lock)
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


cdef int fill_raw_peer(sockaddr_storage *ss, socklen_t *slen,
                       object addr) except -1:
    """Fill the peer's address in its own family, port 0; return the family."""
    cdef int family = AF_INET if ipaddress.ip_address(addr[0]).version == 4 else (
        AF_INET6)
    fill_sockaddr(ss, slen, addr, family)
    # raw sockets have no ports; the port field is the protocol or must be 0
    if family == AF_INET:
        (<sockaddr_in *>ss).sin_port = 0
    else:
        (<sockaddr_in6 *>ss).sin6_port = 0
    return family


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


cdef int ts_fill(ts_t *out, object texts) except -1:
    """Copy parsed selectors into out; return how many."""
    cdef int i
    for i, text in enumerate(texts):
        sel = parse_ts(text)
        out[i].family = sel.version
        out[i].proto = sel.protocol
        out[i].port_lo = sel.port_lo
        out[i].port_hi = sel.port_hi
        memcpy(out[i].start, PyBytes_AS_STRING(sel.start), len(sel.start))
        memcpy(out[i].end, PyBytes_AS_STRING(sel.end), len(sel.end))
    return len(texts)


cdef int ts_all(const ts_t *ts, int n) noexcept:
    """1 when the selectors cover all of IPv4 and IPv6, every protocol and port."""
    cdef int i, v4 = 0, v6 = 0, full
    for i in range(n):
        if ts[i].proto != 0 or ts[i].port_lo != 0 or ts[i].port_hi != 65535:
            continue
        full = 4 if ts[i].family == 4 else 16
        if any_range(ts[i].start, ts[i].end, full):
            if full == 4:
                v4 = 1
            else:
                v6 = 1
    return v4 and v6


cdef int any_range(const uint8_t *start, const uint8_t *end, int alen) noexcept:
    cdef int i
    for i in range(alen):
        if start[i] != 0 or end[i] != 0xFF:
            return 0
    return 1


cdef sa_t *sa_from_params(object params, int backend, int family) except NULL:
    cdef sa_t *sa
    cdef bytes key = params.key
    cdef bytes packed
    cdef int i
    if not isinstance(params, SAParams):
        raise TypeError(f"Expected SAParams, got {type(params).__name__}")
    if len(params.remote_ts) > MAX_TS or len(params.local_ts) > MAX_TS:
        raise ValueError("Too many traffic selectors")
    sa = <sa_t *>calloc(1, sizeof(sa_t))
    if sa == NULL:
        raise MemoryError()
    pthread_spin_init(&sa.lock, PTHREAD_PROCESS_PRIVATE)
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
        sa.encap = bool(params.encap)
        sa.raw_family = fill_raw_peer(&sa.raw_peer, &sa.raw_peer_len, params.peer)
        sa.n_rts = ts_fill(sa.rts, params.remote_ts)
        sa.n_lts = ts_fill(sa.lts, params.local_ts)
        sa.match_all = ts_all(sa.rts, sa.n_rts) and ts_all(sa.lts, sa.n_lts)
        if cipher_init(&sa.cipher, backend, <const uint8_t *>PyBytes_AS_STRING(key),
                       len(key)) != 0:
            raise MemoryError("Cannot set up AES-GCM key")
    except BaseException:
        sa_free(sa)
        raise
    return sa


cdef uint64_t sa_take_seq(sa_t *sa, int n, int *got) noexcept nogil:
    """Reserve up to n consecutive outbound sequence numbers; return the first.

    The one place outbound numbers are handed out (engine and batch API).
    got receives how many were reserved; fewer than n means the SA is spent.
    """
    cdef uint64_t first, avail
    cdef int k = 0
    pthread_spin_lock(&sa.lock)
    first = sa.next_seq
    # RFC 4303 section 3.3.3: the counter must not cycle; 0 marks a spent
    # 64-bit counter (next_seq wrapped past 2^64 - 1), rekey first
    if first != 0 and first <= sa.seq_limit:
        avail = sa.seq_limit - first + 1
        k = n if <uint64_t>n <= avail else <int>avail
        sa.next_seq = first + <uint64_t>k
    pthread_spin_unlock(&sa.lock)
    got[0] = k
    return first


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


cdef int flow_parse(const uint8_t *p, int total, int family,
                    flow_t *f) noexcept nogil:
    """Fill f from an inner packet whose header length checks passed."""
    cdef int hl, more
    cdef const uint8_t *l4
    f.has_ports = 0
    f.sport = 0
    f.dport = 0
    f.family = family
    if family == 4:
        hl = (p[0] & 15) * 4
        f.proto = p[9]
        f.src = p + 12
        f.dst = p + 16
        # a fragment other than the first carries no ports
        more = ((p[6] & 0x1F) << 8) | p[7]
        if hl < 20 or more != 0:
            return 0
    else:
        # FIXME: IPv6 extension headers are not walked; their type is the protocol
        hl = 40
        f.proto = p[6]
        f.src = p + 8
        f.dst = p + 24
    l4 = p + hl
    if f.proto == 6 or f.proto == 17 or f.proto == 132:
        if total >= hl + 4:
            f.sport = (l4[0] << 8) | l4[1]
            f.dport = (l4[2] << 8) | l4[3]
            f.has_ports = 1
    # RFC 7296 section 3.13.1: ICMP type and code form one 16-bit "port"
    elif f.proto == 1 or f.proto == 58:
        if total >= hl + 2:
            f.sport = (l4[0] << 8) | l4[1]
            f.dport = f.sport
            f.has_ports = 1
    return 0


cdef inline int ts_match(const ts_t *ts, int n, const flow_t *f, const uint8_t *addr,
                         int port) noexcept nogil:
    """1 when addr/port of the flow lies in one of the n selectors."""
    cdef int i, alen = 4 if f.family == 4 else 16
    for i in range(n):
        if ts[i].family != f.family:
            continue
        if ts[i].proto != 0 and ts[i].proto != f.proto:
            continue
        if memcmp(ts[i].start, addr, alen) > 0 or memcmp(addr, ts[i].end, alen) > 0:
            continue
        # RFC 7296 section 3.13.1: 0-65535 means any port, even none
        if ts[i].port_lo == 0 and ts[i].port_hi == 65535:
            return 1
        if f.has_ports and ts[i].port_lo <= port <= ts[i].port_hi:
            return 1
    return 0


cdef inline int flow_inbound(const sa_t *sa, const flow_t *f) noexcept nogil:
    # RFC 4301 section 5.2: from the client's selectors to ours
    return (ts_match(sa.rts, sa.n_rts, f, f.src, f.sport)
            and ts_match(sa.lts, sa.n_lts, f, f.dst, f.dport))


cdef inline int flow_outbound(const sa_t *sa, const flow_t *f) noexcept nogil:
    # RFC 4301 section 5.1: from our selectors to the client's
    return (ts_match(sa.lts, sa.n_lts, f, f.src, f.sport)
            and ts_match(sa.rts, sa.n_rts, f, f.dst, f.dport))


cdef int inner_check(const sa_t *sa, const uint8_t *p, int plen,
                     int nh) noexcept nogil:
    """Return the inner packet length to deliver, or ERR_*."""
    cdef int total, family
    cdef flow_t f
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
    elif nh == 41:
        if plen < 40 or p[0] >> 4 != 6:
            return ERR_MALFORMED
        total = 40 + ((p[4] << 8) | p[5])
        if total > plen:
            return ERR_MALFORMED
        family = 6
    else:
        return ERR_MALFORMED
    if sa.match_all:
        return total
    flow_parse(p, total, family, &f)
    # RFC 4301 section 5.2: the inner packet must match the SA's selectors
    if flow_inbound(sa, &f):
        return total
    return ERR_POLICY


def flow_selects(sa, bytes packet) -> bool:
    """Return whether an outbound SA's selectors take this inner IP packet."""
    cdef sa_t *s
    cdef flow_t f
    cdef int family, n = len(packet)
    cdef const uint8_t *p = <const uint8_t *>PyBytes_AS_STRING(packet)
    if n >= 20 and p[0] >> 4 == 4 and (p[0] & 15) * 4 <= n:
        family = 4
    elif n >= 40 and p[0] >> 4 == 6:
        family = 6
    else:
        raise ValueError("Inner packet is neither IPv4 nor IPv6")
    s = sa_from_params(sa, BACKEND_OPENSSL, AF_INET6)
    try:
        flow_parse(p, n, family, &f)
        return bool(s.match_all or (flow_outbound(s, &f) if not sa.inbound
                                    else flow_inbound(s, &f)))
    finally:
        sa_free(s)


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
    cdef int ln, nh, got = 0
    cdef uint64_t seq
    cdef uint8_t *p
    if lengths.shape[0] < rows:
        raise ValueError(f"Lengths shorter than the batch: {lengths.shape[0]}")
    for i in range(rows):
        if lengths[i] < 1 or ESP_HEAD + lengths[i] + ESP_TAIL_MAX > width:
            raise ValueError(f"Bad length {lengths[i]} in row {i}")
    with nogil:
        seq = sa_take_seq(sa, <int>rows, &got)
        for i in range(got):
            p = &packets[i, ESP_HEAD]
            nh = 41 if p[0] >> 4 == 6 else 4
            ln = esp_seal(sa, p, lengths[i], seq + <uint64_t>i, nh, NULL)
            if ln < 0:
                break
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
    int worker             # the worker that reads this TUN
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
    uint64_t raw_rx            # raw ESP packets received (IP protocol 50)
    uint64_t raw_tx            # raw ESP packets sent
    uint64_t wrong_encap       # ESP for an SA that uses the other transport
    uint64_t no_policy         # TUN packets no outbound SA's selectors take


cdef struct worker_t:
    # one thread's epoll set, sockets, slots and counters; only it touches them
    int index
    int ep_fd
    int ev_fd
    int udp_fd             # sends here; reads it too when reads_udp
    int reads_udp
    int n_sessions
    counters_t c
    uint8_t *rx_buf
    uint8_t *tx_buf
    mmsghdr *rx_msgs
    mmsghdr *tx_msgs
    iovec *rx_iov
    iovec *tx_iov
    sockaddr_storage *rx_addr
    int *tx_len
    uint8_t *stage
    uint8_t *rx_ctrl
    uint8_t *tx_ctrl
    int *tx_first
    sa_t **tx_sa           # the outbound SA chosen for each tx slot
    session_t **in_sess
    uint8_t **in_ptr
    int *in_len
    int in_n
    iovec wiov[64]
    uint8_t **ike_ptr
    int *ike_len
    int *ike_src
    int ike_n


cdef enum:
    MAX_WORKERS = 64
    SOL_SOCKET_ = 1
    SO_REUSEPORT_ = 15
    IPPROTO_ESP_ = 50


cdef inline uint32_t hash32(uint32_t v) noexcept nogil:
    return ((v * 2654435761U) >> 22) & (HASH_SIZE - 1)


cdef void worker_free(worker_t *w) noexcept nogil:
    if w.ep_fd >= 0:
        close(w.ep_fd)
    if w.ev_fd >= 0:
        close(w.ev_fd)
    free(w.rx_buf)
    free(w.tx_buf)
    free(w.rx_msgs)
    free(w.tx_msgs)
    free(w.rx_iov)
    free(w.tx_iov)
    free(w.rx_addr)
    free(w.tx_len)
    free(w.stage)
    free(w.rx_ctrl)
    free(w.tx_ctrl)
    free(w.tx_first)
    free(w.tx_sa)
    free(w.in_sess)
    free(w.in_ptr)
    free(w.in_len)
    free(w.ike_ptr)
    free(w.ike_len)
    free(w.ike_src)


cdef int worker_init(worker_t *w, int index, int batch, size_t rx_slot) noexcept nogil:
    """Allocate one worker's slots, epoll set and eventfd; -1 on failure."""
    cdef epoll_event ev
    cdef int i
    w.index = index
    w.ep_fd = -1
    w.ev_fd = -1
    w.udp_fd = -1
    # rx holds datagrams (64 KB with GRO), tx holds TUN packets or the
    # segments of TUN super-packets at HEADROOM
    w.rx_buf = <uint8_t *>malloc(<size_t>batch * rx_slot)
    w.tx_buf = <uint8_t *>malloc(<size_t>TX_SLOTS * SLOT)
    w.stage = <uint8_t *>malloc(STAGE)
    w.rx_msgs = <mmsghdr *>calloc(batch, sizeof(mmsghdr))
    w.tx_msgs = <mmsghdr *>calloc(TX_SLOTS, sizeof(mmsghdr))
    w.rx_iov = <iovec *>calloc(batch, sizeof(iovec))
    w.tx_iov = <iovec *>calloc(TX_SLOTS, sizeof(iovec))
    w.rx_addr = <sockaddr_storage *>calloc(batch, sizeof(sockaddr_storage))
    w.rx_ctrl = <uint8_t *>calloc(batch, CTRL_LEN)
    w.tx_ctrl = <uint8_t *>calloc(TX_SLOTS, CTRL_LEN)
    w.tx_len = <int *>calloc(TX_SLOTS, sizeof(int))
    w.tx_first = <int *>calloc(TX_SLOTS + 1, sizeof(int))
    w.tx_sa = <sa_t **>calloc(TX_SLOTS, sizeof(sa_t *))
    w.in_sess = <session_t **>calloc(PENDING, sizeof(session_t *))
    w.in_ptr = <uint8_t **>calloc(PENDING, sizeof(uint8_t *))
    w.in_len = <int *>calloc(PENDING, sizeof(int))
    w.ike_ptr = <uint8_t **>calloc(PENDING, sizeof(uint8_t *))
    w.ike_len = <int *>calloc(PENDING, sizeof(int))
    w.ike_src = <int *>calloc(PENDING, sizeof(int))
    if (w.rx_buf == NULL or w.tx_buf == NULL or w.stage == NULL
            or w.rx_msgs == NULL or w.tx_msgs == NULL
            or w.rx_iov == NULL or w.tx_iov == NULL
            or w.rx_addr == NULL or w.rx_ctrl == NULL
            or w.tx_ctrl == NULL or w.tx_len == NULL
            or w.tx_first == NULL or w.tx_sa == NULL or w.in_sess == NULL
            or w.in_ptr == NULL or w.in_len == NULL
            or w.ike_ptr == NULL or w.ike_len == NULL
            or w.ike_src == NULL):
        return -1
    for i in range(batch):
        w.rx_iov[i].iov_base = w.rx_buf + <size_t>i * rx_slot
        w.rx_iov[i].iov_len = rx_slot
        w.rx_msgs[i].msg_hdr.msg_iov = &w.rx_iov[i]
        w.rx_msgs[i].msg_hdr.msg_iovlen = 1
        w.rx_msgs[i].msg_hdr.msg_name = &w.rx_addr[i]
    w.ep_fd = epoll_create1(EPOLL_CLOEXEC)
    if w.ep_fd < 0:
        return -1
    w.ev_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
    if w.ev_fd < 0:
        return -1
    ev.events = EPOLLIN
    ev.data.u64 = TAG_WAKE
    if epoll_ctl(w.ep_fd, EPOLL_CTL_ADD, w.ev_fd, &ev) != 0:
        return -1
    return 0


cdef int poll_add(int ep_fd, int fd, uint64_t tag) noexcept nogil:
    cdef epoll_event ev
    ev.events = EPOLLIN
    ev.data.u64 = tag
    return epoll_ctl(ep_fd, EPOLL_CTL_ADD, fd, &ev)


def _default_workers() -> int:
    import os

    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


@cython.final
cdef class Engine:
    """The ESP dataplane over ESP-in-UDP (and raw ESP) and one TUN per session.

    The caller owns the UDP socket (bound to 4500, non-blocking) and the TUN
    fds; the engine only reads and writes them, plus the sockets it opens
    itself (SO_REUSEPORT siblings, raw ESP), which it closes.  ``workers``
    (default: one per usable core) sets the thread count; ``esp_fd`` is an
    optional raw IP protocol 50 socket for ``encap=False`` SAs, opened on
    demand when absent.  All methods are safe to call from another thread
    while the workers run.
    """

    cdef int udp_fd
    cdef int batch
    cdef int backend
    cdef int family
    cdef int stopping
    cdef pthread_rwlock_t lock
    cdef sa_t *sa_in[1024]
    cdef sa_t *sa_out[1024]
    cdef session_t *sessions[1024]
    cdef counters_t c          # what no worker counts (IKE sent)
    cdef int gso
    cdef int gro
    cdef int coalesce
    cdef size_t rx_slot
    cdef int n_workers
    cdef int reuseport
    cdef worker_t *workers
    cdef int own_fds[64]
    cdef int n_own
    cdef int raw_fd[2]         # raw ESP sockets: [0] IPv4, [1] IPv6, -1 none
    cdef int raw_owned[2]
    cdef object _threads
    cdef object _callback
    cdef object _send_lock

    def __cinit__(self, int udp_fd, *, int batch=64, str crypto="ipsec-mb",
                  bint gso=True, bint gro=True, bint coalesce=True, workers=None,
                  esp_fd=None):
        cdef sockaddr_storage ss
        cdef socklen_t sl = sizeof(ss)
        cdef pthread_rwlockattr_t attr
        cdef int i, n
        self.raw_fd[0] = self.raw_fd[1] = -1
        if batch < 1 or batch > MAX_BATCH:
            raise ValueError(f"Bad batch size {batch}")
        n = _default_workers() if workers is None else workers
        if n < 1 or n > MAX_WORKERS:
            raise ValueError(f"Bad worker count {workers}")
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
        # writers (Python mutators) go first, so busy workers cannot starve them
        pthread_rwlockattr_init(&attr)
        pthread_rwlockattr_setkind_np(&attr,
                                      PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP)
        pthread_rwlock_init(&self.lock, &attr)
        pthread_rwlockattr_destroy(&attr)
        self._send_lock = threading.Lock()
        self._threads = []
        if esp_fd is not None:
            self._adopt_raw(esp_fd)

        # one worker per core: own epoll set and slots, sessions spread over them
        self.workers = <worker_t *>calloc(n, sizeof(worker_t))
        if self.workers == NULL:
            raise MemoryError()
        self.n_workers = n
        for i in range(n):
            if worker_init(&self.workers[i], i, batch, self.rx_slot) != 0:
                raise MemoryError("Cannot set up a fastpath worker")
            self.workers[i].udp_fd = udp_fd
        self._open_siblings(udp_fd)
        for i in range(n):
            if i > 0 and not self.reuseport:
                continue
            self.workers[i].reads_udp = 1
            if poll_add(self.workers[i].ep_fd, self.workers[i].udp_fd, TAG_UDP) != 0:
                raise OSError(errno, "epoll_ctl on the UDP socket failed")
        for i in range(2):
            if self.raw_fd[i] >= 0 and poll_add(self.workers[0].ep_fd,
                                                self.raw_fd[i], TAG_RAW) != 0:
                raise OSError(errno, "epoll_ctl on the raw ESP socket failed")

    cdef _open_siblings(self, int udp_fd):
        """Give every other worker its own SO_REUSEPORT socket when allowed.

        The kernel hashes each peer's address to one socket of the group, so a
        peer's datagrams stay in order on one worker.  Without SO_REUSEPORT on
        the caller's socket, worker 0 alone reads it (one reader).
        """
        import socket

        if self.n_workers == 1:
            return
        base = socket.socket(fileno=udp_fd)
        try:
            if not base.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT):
                return
            addr = base.getsockname()
            rcv = base.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
            snd = base.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
            v6only = (base.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
                      if self.family == AF_INET6 else 0)
        finally:
            base.detach()
        for i in range(1, self.n_workers):
            s = socket.socket(self.family, socket.SOCK_DGRAM)
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                # the kernel doubles what it is given; hand back half
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcv // 2)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, snd // 2)
                if self.family == AF_INET6:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, v6only)
                if self.gro:
                    s.setsockopt(SOL_UDP_, UDP_GRO_, 1)
                s.bind(addr)
                s.setblocking(False)
            except BaseException:
                s.close()
                raise
            self.workers[i].udp_fd = s.detach()
            self.own_fds[self.n_own] = self.workers[i].udp_fd
            self.n_own += 1
        self.reuseport = 1

    cdef _adopt_raw(self, int fd):
        cdef sockaddr_storage ss
        cdef socklen_t sl = sizeof(ss)
        if getsockname(fd, <sockaddr *>&ss, &sl) != 0:
            raise OSError(errno, f"Bad raw ESP socket fd {fd}")
        if ss.ss_family != AF_INET and ss.ss_family != AF_INET6:
            raise ValueError(f"Raw ESP socket fd {fd} is not an inet socket")
        self.raw_fd[0 if ss.ss_family == AF_INET else 1] = fd

    cdef int _raw_for(self, int family) except -1:
        """Return the raw ESP socket for a family, opening it on first use."""
        cdef int k = 0 if family == AF_INET else 1
        import socket

        if self.raw_fd[k] >= 0:
            return self.raw_fd[k]
        s = socket.socket(family, socket.SOCK_RAW, IPPROTO_ESP_)
        s.setblocking(False)
        fd = s.detach()
        if poll_add(self.workers[0].ep_fd, fd, TAG_RAW) != 0:
            close(fd)
            raise OSError(errno, "epoll_ctl on the raw ESP socket failed")
        self.raw_fd[k] = fd
        self.raw_owned[k] = 1
        return fd

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
        if self.workers != NULL:
            for i in range(self.n_workers):
                worker_free(&self.workers[i])
            free(self.workers)
        for i in range(self.n_own):
            close(self.own_fds[i])
        for i in range(2):
            if self.raw_owned[i]:
                close(self.raw_fd[i])
        pthread_rwlock_destroy(&self.lock)

    # -- tables (workers hold self.lock for reading, mutators for writing)

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

    cdef inline void _lock(self) noexcept:
        with nogil:
            pthread_rwlock_wrlock(&self.lock)

    cdef inline void _unlock(self) noexcept:
        pthread_rwlock_unlock(&self.lock)

    cdef int _pick_worker(self) noexcept:
        # worker 0 reads the only UDP socket when there are no siblings: TUN
        # reads go to the others, so decryption and encryption overlap
        cdef int i, best = 0
        if not self.reuseport and self.n_workers > 1:
            best = 1
        for i in range(best, self.n_workers):
            if self.workers[i].n_sessions < self.workers[best].n_sessions:
                best = i
        return best

    # -- control-plane API

    def add_session(self, int session, int tun_fd, *, vnet_hdr=None) -> None:
        """Attach a session and its TUN fd (non-blocking) to the engine.

        vnet_hdr says whether the fd carries virtio-net headers (``open_tun``
        with offload); None asks the kernel.  The session goes to the worker
        with the fewest sessions, which alone reads its TUN.
        """
        cdef session_t *s
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
        s.worker = self._pick_worker()
        rc = poll_add(self.workers[s.worker].ep_fd, tun_fd,
                      TAG_TUN | <uint32_t>session)
        if rc == 0:
            s.hnext = self.sessions[hash32(session)]
            self.sessions[hash32(session)] = s
            self.workers[s.worker].n_sessions += 1
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
            epoll_ctl(self.workers[s.worker].ep_fd, EPOLL_CTL_DEL, s.tun_fd, NULL)
            self.workers[s.worker].n_sessions -= 1
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

    def install_sa(self, params, replay=None) -> None:
        """Install one SA; a new outbound SA takes over the traffic it selects.

        ``replay`` = (top, seen) as :meth:`replay_window` returns it starts an
        inbound SA with that window already marked (a live move), before its
        first packet.

        A session's TUN packets go out on its newest outbound SA whose
        selectors take them (make before break across a rekey); a packet no
        outbound SA takes is dropped and counted as ``no_policy``.

        An SA with ``encap=False`` sends and receives raw ESP; the engine opens
        the raw socket for the peer's family on first use (needs CAP_NET_RAW).
        """
        cdef sa_t *sa
        cdef session_t *s
        cdef sa_t **bucket
        cdef str err = None
        cdef bytes raw = None
        if params.engine == "kernel":
            raise ValueError(f"SA 0x{params.spi:08x} asks for the kernel engine")
        if replay is not None:
            if not params.inbound:
                raise ValueError(f"SA 0x{params.spi:08x}: replay state is inbound only")
            raw = replay_seen_bytes(replay[1])
        sa = sa_from_params(params, self.backend, self.family)
        if replay is not None and replay_merge(
            &sa.replay, replay[0], <const uint8_t *>PyBytes_AS_STRING(raw)
        ) != 0:
            sa_free(sa)
            raise ValueError(f"Bad replay top {replay[0]} for a 32-bit counter")
        if not sa.encap:
            try:
                self._raw_for(sa.raw_family)
            except BaseException:
                sa_free(sa)
                raise
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
        self._unlock()
        if err is not None:
            sa_free(sa)
            raise ValueError(err)

    def remove_sa(self, uint32_t spi, bint inbound) -> None:
        """Remove one SA; its traffic falls back to the newest remaining match."""
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
        cdef sockaddr_storage ss, raw
        cdef socklen_t sl = 0, rl = 0
        cdef int raw_family
        cdef session_t *s
        cdef sa_t *sa
        fill_sockaddr(&ss, &sl, addr, self.family)
        raw_family = fill_raw_peer(&raw, &rl, addr)
        self._lock()
        s = self._session(session)
        if s != NULL:
            sa = s.sas
            while sa != NULL:
                sa.peer = ss
                sa.peer_len = sl
                if sa.encap or raw_family == sa.raw_family:
                    sa.raw_peer = raw
                    sa.raw_peer_len = rl
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

    def replay_window(self, uint32_t spi) -> tuple:
        """Return an inbound SA's anti-replay window as (top, seen).

        top is the highest authenticated number (64-bit with ESN); bit i of
        the integer seen is set when top - i has arrived, for i below the
        window size.  This is what a live move carries to another engine.
        """
        cdef sa_t *sa
        cdef replay_t copy
        self._lock()
        sa = self._sa(spi, True)
        if sa != NULL:
            pthread_spin_lock(&sa.lock)
            memcpy(&copy, &sa.replay, sizeof(replay_t))
            pthread_spin_unlock(&sa.lock)
        self._unlock()
        if sa == NULL:
            raise KeyError(f"No SA 0x{spi:08x} inbound=True")
        return replay_dump(&copy)

    def set_replay_window(self, uint32_t spi, uint64_t top, seen) -> None:
        """Mark top and every number the window (top, seen) holds as received.

        Same layout as :meth:`replay_window`.  The window is merged, not
        replaced: it ends at the higher of the two tops and nothing the SA had
        already seen reopens, so a late second copy of the source engine's
        window (a live move) only closes more numbers.
        """
        cdef sa_t *sa
        cdef int rc = 0
        cdef bytes raw = replay_seen_bytes(seen)
        self._lock()
        sa = self._sa(spi, True)
        if sa != NULL:
            pthread_spin_lock(&sa.lock)
            rc = replay_merge(&sa.replay, top,
                              <const uint8_t *>PyBytes_AS_STRING(raw))
            pthread_spin_unlock(&sa.lock)
        self._unlock()
        if sa == NULL:
            raise KeyError(f"No SA 0x{spi:08x} inbound=True")
        if rc != 0:
            raise ValueError(f"Bad replay top {top} for SA 0x{spi:08x} without ESN")

    def features(self) -> dict:
        """Return which offloads are in use (they turn off when refused)."""
        return {
            "udp_gso": bool(self.gso),
            "udp_gro": bool(self.gro),
            "tun_coalesce": bool(self.coalesce),
            "workers": self.n_workers,
            "reuseport": bool(self.reuseport),
        }

    def counters(self) -> dict:
        """Return the engine-wide counters, summed over the workers."""
        cdef counters_t total
        cdef uint64_t *acc = <uint64_t *>&total
        cdef uint64_t *one
        cdef int i, k
        self._lock()
        total = self.c
        for i in range(self.n_workers):
            one = <uint64_t *>&self.workers[i].c
            for k in range(<int>(sizeof(counters_t) // sizeof(uint64_t))):
                acc[k] += one[k]
        self._unlock()
        return dict(total)

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

    # -- workers

    def start(self, ike_callback) -> None:
        """Start the worker threads; ike_callback(data, addr) gets IKE datagrams.

        With several workers the callback may run on any of their threads.
        """
        assert not self._threads, "Engine already started"
        self._callback = ike_callback
        self.stopping = 0
        for i in range(self.n_workers):
            t = threading.Thread(
                target=self._run, args=(i,), name=f"espgate-fastpath-{i}", daemon=True
            )
            self._threads.append(t)
            t.start()

    def stop(self) -> None:
        """Wake the workers, let each finish its batch and join them."""
        cdef uint64_t one = 1
        cdef int i
        if not self._threads:
            return
        self.stopping = 1
        for i in range(self.n_workers):
            write(self.workers[i].ev_fd, &one, 8)
        for t in self._threads:
            t.join()
        self._threads = []

    def _run(self, int index) -> None:
        cdef int rc = 0
        cdef worker_t *w = &self.workers[index]
        log.debug("fastpath worker %d up, batch %d", index, self.batch)
        while rc == 0:
            with nogil:
                rc = self._poll(w)
            if w.ike_n:
                self._deliver_ike(w)
        log.debug("fastpath worker %d down", index)

    cdef int _poll(self, worker_t *w) noexcept nogil:
        cdef epoll_event evs[64]
        cdef uint64_t tag, junk
        cdef int n, i
        n = epoll_wait(w.ep_fd, evs, MAX_EVENTS, -1)
        if n < 0:
            if errno == EINTR:
                return 0
            w.c.poll_errors += 1
            return -1
        for i in range(n):
            tag = evs[i].data.u64
            if tag == TAG_WAKE:
                read(w.ev_fd, &junk, 8)
                continue
            pthread_rwlock_rdlock(&self.lock)
            if tag == TAG_UDP:
                self._rx(w, w.udp_fd, 1)
            elif tag == TAG_RAW:
                self._rx(w, self.raw_fd[0], 0)
                self._rx(w, self.raw_fd[1], 0)
            else:
                self._tx(w, <uint32_t>tag)
            pthread_rwlock_unlock(&self.lock)
            # IKE datagrams sit in the rx slots: hand them over before reusing
            # them (level-triggered epoll reports the rest again)
            if w.ike_n:
                break
        return -1 if self.stopping else 0

    cdef void _rx(self, worker_t *w, int fd, int udp) noexcept nogil:
        cdef int n, i, gso, ihl
        cdef unsigned int ln, off, sl
        cdef uint8_t *p
        cdef msghdr *mh
        if fd < 0:
            return
        for i in range(self.batch):
            mh = &w.rx_msgs[i].msg_hdr
            mh.msg_namelen = sizeof(sockaddr_storage)
            mh.msg_flags = 0
            mh.msg_control = w.rx_ctrl + <size_t>i * CTRL_LEN
            mh.msg_controllen = CTRL_LEN
        n = recvmmsg(fd, w.rx_msgs, self.batch, MSG_DONTWAIT, NULL)
        if n <= 0:
            return
        for i in range(n):
            p = w.rx_buf + <size_t>i * self.rx_slot
            ln = w.rx_msgs[i].msg_len
            if w.rx_msgs[i].msg_hdr.msg_flags & MSG_TRUNC:
                w.c.malformed += 1
                continue
            if not udp:
                w.c.raw_rx += 1
                # an IPv4 raw socket hands over the IP header; IPv6 does not
                if w.rx_addr[i].ss_family == AF_INET:
                    ihl = (p[0] & 15) * 4 if ln >= 20 else 0
                    if ihl < 20 or <unsigned int>ihl > ln or p[9] != IPPROTO_ESP_:
                        w.c.malformed += 1
                        continue
                    p += ihl
                    ln -= ihl
                w.c.rx_esp += 1
                self._rx_esp(w, p, ln, 0)
                continue
            w.c.udp_rx += 1
            # UDP_GRO: equal-size datagrams back to back, the last may be shorter
            gso = gro_size(&w.rx_msgs[i].msg_hdr)
            if gso <= 0 or <unsigned int>gso >= ln:
                self._rx_one(w, p, ln, i)
                continue
            w.c.udp_gro_rx += 1
            off = 0
            while off < ln:
                sl = ln - off if ln - off < <unsigned int>gso else <unsigned int>gso
                self._rx_one(w, p + off, sl, i)
                w.c.udp_gro_segs += 1
                off += sl
        self._flush_tun(w)

    cdef void _rx_one(self, worker_t *w, uint8_t *p, unsigned int ln,
                      int src) noexcept nogil:
        # RFC 3948 section 2.3: a lone 0xFF octet is a NAT-keepalive
        if ln == 1 and p[0] == 0xFF:
            w.c.keepalives += 1
        elif ln < 4:
            w.c.malformed += 1
        # RFC 3948 section 2.2: a zero SPI field is the non-ESP marker (IKE)
        elif be32(p) == 0:
            w.c.rx_ike += 1
            if w.ike_n == PENDING:
                w.c.ike_dropped += 1
                return
            w.ike_ptr[w.ike_n] = p
            w.ike_len[w.ike_n] = ln
            w.ike_src[w.ike_n] = src
            w.ike_n += 1
        else:
            w.c.rx_esp += 1
            self._rx_esp(w, p, ln, 1)

    cdef void _rx_esp(self, worker_t *w, uint8_t *p, unsigned int n,
                      int udp) noexcept nogil:
        cdef sa_t *sa
        cdef session_t *s
        cdef uint64_t seq
        cdef int plen, total, nh = 0
        if n < ESP_HEAD + 2 + ICV_LEN:
            w.c.malformed += 1
            return
        sa = self._sa(be32(p), 1)
        if sa == NULL:
            w.c.no_sa += 1
            return
        # RFC 3948 section 5.1: an SA negotiated with UDP encapsulation takes
        # ESP in UDP only, and one without it raw ESP only
        if sa.encap != udp:
            w.c.wrong_encap += 1
            return

        # RFC 4303 section 3.4.3: duplicate check before the ICV ...
        pthread_spin_lock(&sa.lock)
        seq = replay_infer(&sa.replay, be32(p + 4))
        if not replay_check(&sa.replay, seq):
            sa.drop_replay += 1
            pthread_spin_unlock(&sa.lock)
            return
        # an EVP context is not shared between threads; ipsec-mb keys are
        if sa.cipher.backend == BACKEND_IPSECMB:
            pthread_spin_unlock(&sa.lock)
            plen = esp_open(sa, p, n, seq, &nh)
            pthread_spin_lock(&sa.lock)
        else:
            plen = esp_open(sa, p, n, seq, &nh)
        if plen == ERR_AUTH:
            sa.drop_auth += 1
            pthread_spin_unlock(&sa.lock)
            return
        # ... and the window update only once the ICV verified; another
        # worker may have taken the same number meanwhile
        if not replay_check(&sa.replay, seq):
            sa.drop_replay += 1
            pthread_spin_unlock(&sa.lock)
            return
        replay_update(&sa.replay, seq)
        total = ERR_MALFORMED if plen < 0 else inner_check(sa, p + ESP_HEAD, plen, nh)
        if total >= 0:
            sa.packets += 1
            sa.bytes += total
        elif total == ERR_POLICY:
            sa.drop_policy += 1
        elif total != ERR_DUMMY:
            sa.drop_malformed += 1
        pthread_spin_unlock(&sa.lock)
        if total < 0:
            if total == ERR_DUMMY:
                w.c.dummy += 1
            return
        s = self._session(sa.session)
        if s == NULL:
            w.c.no_session += 1
            return
        # queue for the TUN; the ESP header in front leaves room for a vnet header
        w.in_sess[w.in_n] = s
        w.in_ptr[w.in_n] = p + ESP_HEAD
        w.in_len[w.in_n] = total
        w.in_n += 1
        if w.in_n == PENDING:
            self._flush_tun(w)

    cdef void _flush_tun(self, worker_t *w) noexcept nogil:
        """Write the queued inner packets, runs of one TCP flow as one."""
        cdef int i = 0, k, m, n, hl = 0
        cdef session_t *s
        cdef uint8_t *p
        cdef long r
        while i < w.in_n:
            s = w.in_sess[i]
            p = w.in_ptr[i]
            n = w.in_len[i]
            k = 1
            if not s.vnet:
                r = write(s.tun_fd, p, n)
            else:
                # the packets after i that go to the same TUN, then the TCP run
                m = 1
                while i + m < w.in_n and w.in_sess[i + m] == s:
                    m += 1
                k = tcp_run(w.in_ptr + i, w.in_len + i, m, &hl) if (
                    self.coalesce) else 1
                if k == 1:
                    memset(p - VNET_LEN, 0, VNET_LEN)
                    r = write(s.tun_fd, p - VNET_LEN, n + VNET_LEN)
                else:
                    self._write_run(w, s, i, k, hl)
                    r = 0
            if r < 0:
                w.c.tun_errors += k
            else:
                w.c.tun_tx += k
            i += k
        w.in_n = 0

    cdef void _write_run(self, worker_t *w, session_t *s, int i, int k,
                         int hl) noexcept nogil:
        cdef int j
        w.wiov[0].iov_base = w.in_ptr[i] - VNET_LEN
        w.wiov[0].iov_len = w.in_len[i] + VNET_LEN
        for j in range(1, k):
            w.wiov[j].iov_base = w.in_ptr[i + j] + hl
            w.wiov[j].iov_len = w.in_len[i + j] - hl
        if writev(s.tun_fd, w.wiov, k) < 0:
            w.c.tun_errors += k
            w.c.tun_tx -= k
            return
        w.c.tun_gro_tx += 1
        w.c.tun_gro_segs += k

    cdef inline uint8_t *_slot(self, worker_t *w, int i) noexcept nogil:
        return w.tx_buf + <size_t>i * SLOT + HEADROOM

    cdef void _tx(self, worker_t *w, uint32_t sid) noexcept nogil:
        cdef session_t *s = self._session(sid)
        cdef int n = 0, reads = 0, k
        cdef long r
        cdef int cap = SLOT - HEADROOM - ESP_TAIL_MAX
        cdef vnet_hdr_t h
        cdef uint8_t *pkt
        if s == NULL:
            return

        # read the TUN until EAGAIN or batch reads; a super-packet fills many slots
        while reads < self.batch:
            if n == TX_SLOTS:
                self._seal_send(w, s, n)
                n = 0
            if not s.vnet:
                r = read(s.tun_fd, self._slot(w, n), cap)
            else:
                r = read(s.tun_fd, w.stage, STAGE)
            if r <= 0:
                if r < 0 and errno != EAGAIN:
                    w.c.tun_errors += 1
                break
            reads += 1
            if not s.vnet:
                w.tx_len[n] = <int>r
                n += 1
                continue
            if r <= VNET_LEN:
                w.c.tun_malformed += 1
                continue
            memcpy(&h, w.stage, VNET_LEN)
            pkt = w.stage + VNET_LEN
            r -= VNET_LEN
            if h.gso_type == GSO_NONE:
                if r > cap:
                    w.c.tun_malformed += 1
                    continue
                memcpy(self._slot(w, n), pkt, r)
                if (h.flags & VNET_F_NEEDS_CSUM
                        and csum_complete(&h, self._slot(w, n), <int>r) != 0):
                    w.c.tun_malformed += 1
                    continue
                w.tx_len[n] = <int>r
                n += 1
                continue
            k = gso_split(&h, pkt, <int>r, self._slot(w, n), SLOT, cap, &w.tx_len[n],
                          TX_SLOTS - n)
            if k == ERR_ROOM and n > 0:
                self._seal_send(w, s, n)
                n = 0
                k = gso_split(&h, pkt, <int>r, self._slot(w, 0), SLOT, cap, w.tx_len,
                              TX_SLOTS)
            if k < 0:
                w.c.tun_malformed += 1
                continue
            w.c.tun_gso_rx += 1
            w.c.tun_segments += k
            n += k
        w.c.tun_rx += reads
        if n:
            self._seal_send(w, s, n)

    cdef void _seal_send(self, worker_t *w, session_t *s, int n) noexcept nogil:
        cdef int i, j
        cdef sa_t *sa
        cdef sa_t *first = s.sas
        cdef flow_t f
        while first != NULL and first.inbound:
            first = first.snext
        if first == NULL:
            w.c.no_sa_tx += n
            return

        # classify: each slot's outbound SA, newest first so that a rekeyed SA
        # wins; NULL marks a slot that is not IP or that no SA takes
        for i in range(n):
            w.tx_sa[i] = self._classify(w, first, self._slot(w, i), w.tx_len[i], &f)

        # one sequence reservation and one send per SA present in the batch
        for i in range(n):
            sa = w.tx_sa[i]
            if sa == NULL:
                continue
            self._seal_run(w, sa, i, n)
            for j in range(i, n):
                if w.tx_sa[j] == sa:
                    w.tx_sa[j] = NULL

    cdef sa_t *_classify(self, worker_t *w, sa_t *first, uint8_t *p, int ln,
                         flow_t *f) noexcept nogil:
        cdef sa_t *sa
        cdef int family
        # inner version to next header, kept in the octet before the slot's
        # packet (headroom the ESP header overwrites)
        if ln >= 20 and p[0] >> 4 == 4 and (p[0] & 15) >= 5:
            family = 4
            (p - 1)[0] = 4
        elif ln >= 40 and p[0] >> 4 == 6:
            family = 6
            (p - 1)[0] = 41
        else:
            w.c.tun_malformed += 1
            return NULL
        if first.match_all:
            return first
        flow_parse(p, ln, family, f)
        sa = first
        while sa != NULL:
            if not sa.inbound and flow_outbound(sa, f):
                return sa
            sa = sa.snext
        w.c.no_policy += 1
        return NULL

    cdef void _seal_run(self, worker_t *w, sa_t *sa, int start, int n) noexcept nogil:
        """Seal and send the slots in start..n-1 whose chosen SA is sa."""
        cdef int m = 0, i, ln, nh, valid = 0, got = 0
        cdef uint64_t seq
        cdef uint8_t *p
        for i in range(start, n):
            if w.tx_sa[i] == sa:
                valid += 1

        # one reservation of sequence numbers for the run, then seal in place
        seq = sa_take_seq(sa, valid, &got)
        if got < valid:
            # below the hard maximum the limit is the durably reserved mark
            # (control/seqstore.py): those packets wait for the next block
            if sa.seq_limit < seq_cap(sa, 0xFFFFFFFFFFFFFFFFULL):
                sa.seq_blocked += valid - got
            else:
                sa.seq_exhausted += valid - got
        for i in range(start, n):
            if w.tx_sa[i] != sa:
                continue
            if got == 0:
                break
            p = self._slot(w, i)
            nh = (p - 1)[0]
            ln = esp_seal(sa, p, w.tx_len[i], seq, nh, NULL)
            seq += 1
            got -= 1
            if ln < 0:
                w.c.crypto_errors += 1
                continue
            sa.packets += 1
            sa.bytes += w.tx_len[i]
            w.tx_iov[m].iov_base = p - ESP_HEAD
            w.tx_iov[m].iov_len = ln
            m += 1
        if sa.encap:
            self._send(w, sa, 0, m)
        else:
            self._send_raw(w, sa, m)

    cdef void _send_raw(self, worker_t *w, sa_t *sa, int m) noexcept nogil:
        """Send tx_iov[:m] as raw ESP, one packet per entry (no GSO for raw)."""
        cdef int i, off = 0, r
        cdef int fd = self.raw_fd[0 if sa.raw_family == AF_INET else 1]
        cdef msghdr *mh
        for i in range(m):
            mh = &w.tx_msgs[i].msg_hdr
            mh.msg_name = &sa.raw_peer
            mh.msg_namelen = sa.raw_peer_len
            mh.msg_iov = &w.tx_iov[i]
            mh.msg_iovlen = 1
            mh.msg_flags = 0
            mh.msg_control = NULL
            mh.msg_controllen = 0
        while off < m:
            r = sendmmsg(fd, w.tx_msgs + off, m - off, MSG_DONTWAIT)
            if r < 0:
                if errno == EINTR:
                    continue
                if errno == EAGAIN:
                    w.c.send_errors += m - off
                    return
                w.c.send_errors += 1
                off += 1
                continue
            w.c.raw_tx += r
            off += r

    cdef void _send(self, worker_t *w, sa_t *sa, int first, int m) noexcept nogil:
        """Send tx_iov[first:m] to sa's peer, equal-size runs as one GSO datagram."""
        cdef int g = 0, i = first, start
        cdef size_t size, total
        cdef msghdr *mh
        cdef cmsghdr *cm
        cdef uint16_t seg
        while i < m:
            start = i
            size = w.tx_iov[i].iov_len
            total = size
            i += 1
            if self.gso:
                # a shorter datagram ends the run as its last segment
                while (i < m and i - start < GSO_MAX_SEGS
                        and w.tx_iov[i].iov_len <= size
                        and total + w.tx_iov[i].iov_len <= GSO_MAX_BYTES):
                    total += w.tx_iov[i].iov_len
                    i += 1
                    if w.tx_iov[i - 1].iov_len < size:
                        break
            mh = &w.tx_msgs[g].msg_hdr
            mh.msg_name = &sa.peer
            mh.msg_namelen = sa.peer_len
            mh.msg_iov = &w.tx_iov[start]
            mh.msg_iovlen = i - start
            mh.msg_flags = 0
            mh.msg_control = NULL
            mh.msg_controllen = 0
            if i - start > 1:
                mh.msg_control = w.tx_ctrl + <size_t>g * CTRL_LEN
                mh.msg_controllen = CMSG_SPACE(sizeof(uint16_t))
                cm = CMSG_FIRSTHDR(mh)
                cm.cmsg_level = SOL_UDP_
                cm.cmsg_type = UDP_SEGMENT_
                cm.cmsg_len = CMSG_LEN(sizeof(uint16_t))
                seg = <uint16_t>size
                memcpy(CMSG_DATA(cm), &seg, sizeof(uint16_t))
            w.tx_first[g] = start
            g += 1
        w.tx_first[g] = m
        self._sendmmsg(w, sa, g, m)

    cdef void _sendmmsg(self, worker_t *w, sa_t *sa, int g, int m) noexcept nogil:
        cdef int off = 0, r, j, segs
        while off < g:
            r = sendmmsg(w.udp_fd, w.tx_msgs + off, g - off, MSG_DONTWAIT)
            if r < 0:
                if errno == EINTR:
                    continue
                segs = w.tx_first[off + 1] - w.tx_first[off]
                if segs > 1 and (errno == EIO or errno == EINVAL):
                    # the kernel or the device cannot segment: stop asking
                    self.gso = 0
                    w.c.udp_gso_fallbacks += 1
                    self._send(w, sa, w.tx_first[off], m)
                    return
                if errno == EAGAIN:
                    w.c.send_errors += m - w.tx_first[off]
                    return
                # skip the datagram the kernel refused and carry on
                w.c.send_errors += segs
                off += 1
                continue
            for j in range(off, off + r):
                segs = w.tx_first[j + 1] - w.tx_first[j]
                w.c.udp_tx += segs
                if segs > 1:
                    w.c.udp_gso_tx += 1
                    w.c.udp_gso_segs += segs
            off += r

    cdef void _deliver_ike(self, worker_t *w):
        cdef int k
        n = w.ike_n
        for k in range(n):
            data = PyBytes_FromStringAndSize(<char *>w.ike_ptr[k] + 4,
                                             w.ike_len[k] - 4)
            addr = sockaddr_tuple(&w.rx_addr[w.ike_src[k]])
            try:
                self._callback(data, addr)
            except Exception:
                w.c.ike_callback_errors += 1
                if w.c.ike_callback_errors == 1:
                    log.exception("ike callback failed; further failures only counted")
        w.ike_n = 0


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
