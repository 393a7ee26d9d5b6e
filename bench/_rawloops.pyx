# cython: boundscheck=False, wraparound=False, cdivision=True
"""Raw AES-GCM reference loops in C: intel-ipsec-mb and OpenSSL EVP.

Theory of operation: each loop expands its key (ipsec-mb ``gcm_key_data``) or
sets up its EVP context once, then seals or opens ``count`` packets of ``size``
bytes with an 8-byte AAD (an ESP SPI and sequence number) and a 16-byte tag,
all inside one ``nogil`` block timed with ``CLOCK_MONOTONIC``.  No Python runs
per packet, so these are the ceilings the engine's batch calls are compared
against.  Encryption changes the 8-byte explicit IV per packet as ESP does;
decryption opens the same sealed packet over and over, out of place, and
checks every tag, so a wrong key or a broken loop fails loudly.

The UDP loops are the packet benchmark's load generator and sink: ``sendmmsg``
and ``recvmmsg`` in batches inside one ``nogil`` block, bounded in count and
time, paced by sleeping for a batch's worth of the rate, so 64-byte figures
are not capped by the sender as iperf3's are (~65 k datagrams/s here).
"""

from libc.stdint cimport int64_t, uint8_t, uint64_t
from libc.stdlib cimport free
from libc.string cimport memcpy, memset

from bench._rawloops cimport (
    CLOCK_MONOTONIC,
    clock_gettime,
    iovec,
    mmsghdr,
    nanosleep,
    poll,
    pollfd,
    POLLIN,
    MSG_DONTWAIT,
    EAGAIN,
    EINTR,
    ENOBUFS,
    errno,
    recvmmsg,
    sendmmsg,
    timespec,
)
from fastpath._ipsecmb cimport (
    IMB_AES128_GCM_DEC,
    IMB_AES128_GCM_ENC,
    IMB_AES128_GCM_PRE,
    IMB_AES256_GCM_DEC,
    IMB_AES256_GCM_ENC,
    IMB_AES256_GCM_PRE,
    IMB_ARCH,
    IMB_ARCH_AVX,
    IMB_ARCH_AVX2,
    IMB_ARCH_AVX512,
    IMB_ARCH_SSE,
    IMB_MGR,
    alloc_mb_mgr,
    gcm_context_data,
    gcm_key_data,
    imb_get_version_str,
    init_mb_mgr_auto,
)
from fastpath._libcrypto cimport (
    CRYPTO_memcmp,
    EVP_aes_128_gcm,
    EVP_aes_256_gcm,
    EVP_CIPHER_CTX,
    EVP_CIPHER_CTX_ctrl,
    EVP_CIPHER_CTX_free,
    EVP_CIPHER_CTX_new,
    EVP_CipherFinal_ex,
    EVP_CipherInit_ex,
    EVP_CipherUpdate,
    EVP_CTRL_GCM_GET_TAG,
    EVP_CTRL_GCM_SET_TAG,
    OPENSSL_VERSION,
    OpenSSL_version,
)


cdef extern from "<stdlib.h>" nogil:
    int posix_memalign(void **memptr, size_t alignment, size_t size)


cdef enum:
    TAG_LEN = 16
    AAD_LEN = 8

cdef IMB_MGR *_mgr = alloc_mb_mgr(0)
cdef IMB_ARCH _arch = IMB_ARCH_SSE
if _mgr != NULL:
    init_mb_mgr_auto(_mgr, &_arch)


cdef inline int64_t _now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


cdef inline void _put_iv(uint8_t *nonce, uint64_t i) noexcept nogil:
    cdef int k
    for k in range(8):
        nonce[4 + k] = <uint8_t>(i >> (56 - 8 * k))


def ipsec_mb_version() -> str:
    """Return the linked intel-ipsec-mb library's version string."""
    return imb_get_version_str().decode()


def ipsec_mb_arch() -> str:
    """Return the code path intel-ipsec-mb picked on this CPU."""
    names = {IMB_ARCH_SSE: "sse", IMB_ARCH_AVX: "avx", IMB_ARCH_AVX2: "avx2",
             IMB_ARCH_AVX512: "avx512"}
    return names.get(_arch, "none") if _mgr != NULL else "unavailable"


def openssl_version() -> str:
    """Return the linked libcrypto's version string."""
    return OpenSSL_version(OPENSSL_VERSION).decode()


cdef uint8_t *_buffer(size_t n) except NULL:
    cdef void *p = NULL
    if posix_memalign(&p, 64, n + 64) != 0:
        raise MemoryError("Cannot allocate the packet buffer")
    memset(p, 0xA5, n + 64)
    return <uint8_t *>p


def _check_args(bytes key, Py_ssize_t size, int64_t count) -> None:
    assert len(key) in (16, 32), f"Bad key length {len(key)}"
    assert size >= 1, f"Bad size {size}"
    assert count >= 1, f"Bad count {count}"


def ipsec_mb_loop(bytes key, Py_ssize_t size, int64_t count, bint decrypt) -> int:
    """Seal or open ``count`` packets of ``size`` bytes; return elapsed ns."""
    cdef gcm_key_data *kd = NULL
    cdef gcm_context_data gctx
    cdef uint8_t *src
    cdef uint8_t *dst
    cdef uint8_t nonce[12]
    cdef uint8_t aad[AAD_LEN]
    cdef uint8_t tag[TAG_LEN]
    cdef uint8_t want[TAG_LEN]
    cdef const uint8_t *k = key
    cdef bint k128 = len(key) == 16
    cdef int64_t i, t0 = 0, t1 = 0, bad = 0
    _check_args(key, size, count)
    assert _mgr != NULL, "intel-ipsec-mb is not available"
    if posix_memalign(<void **>&kd, 64, sizeof(gcm_key_data)) != 0:
        raise MemoryError("Cannot allocate the key schedule")
    src = _buffer(size)
    dst = _buffer(size)
    memset(nonce, 0x42, 12)
    memset(aad, 0x17, AAD_LEN)
    try:
        with nogil:
            # key schedule and GHASH tables: once, outside the timed loop
            if k128:
                IMB_AES128_GCM_PRE(_mgr, k, kd)
            else:
                IMB_AES256_GCM_PRE(_mgr, k, kd)
            if decrypt:
                # seal one packet in place; every iteration opens that packet
                if k128:
                    IMB_AES128_GCM_ENC(_mgr, kd, &gctx, src, src, size, nonce, aad,
                                       AAD_LEN, want, TAG_LEN)
                else:
                    IMB_AES256_GCM_ENC(_mgr, kd, &gctx, src, src, size, nonce, aad,
                                       AAD_LEN, want, TAG_LEN)
                t0 = _now_ns()
                for i in range(count):
                    if k128:
                        IMB_AES128_GCM_DEC(_mgr, kd, &gctx, dst, src, size, nonce,
                                           aad, AAD_LEN, tag, TAG_LEN)
                    else:
                        IMB_AES256_GCM_DEC(_mgr, kd, &gctx, dst, src, size, nonce,
                                           aad, AAD_LEN, tag, TAG_LEN)
                    bad += CRYPTO_memcmp(tag, want, TAG_LEN) != 0
                t1 = _now_ns()
            else:
                t0 = _now_ns()
                for i in range(count):
                    _put_iv(nonce, <uint64_t>i)
                    if k128:
                        IMB_AES128_GCM_ENC(_mgr, kd, &gctx, dst, src, size, nonce,
                                           aad, AAD_LEN, tag, TAG_LEN)
                    else:
                        IMB_AES256_GCM_ENC(_mgr, kd, &gctx, dst, src, size, nonce,
                                           aad, AAD_LEN, tag, TAG_LEN)
                t1 = _now_ns()
    finally:
        memset(kd, 0, sizeof(gcm_key_data))
        free(kd)
        free(src)
        free(dst)
    if bad:
        raise RuntimeError(f"intel-ipsec-mb rejected {bad} tags")
    return t1 - t0


cdef int _evp_seal(EVP_CIPHER_CTX *ctx, const uint8_t *nonce, const uint8_t *aad,
                   const uint8_t *src, uint8_t *dst, int n,
                   uint8_t *tag) noexcept nogil:
    cdef int outl = 0
    if EVP_CipherInit_ex(ctx, NULL, NULL, NULL, nonce, 1) != 1:
        return -1
    if EVP_CipherUpdate(ctx, NULL, &outl, aad, AAD_LEN) != 1:
        return -1
    if EVP_CipherUpdate(ctx, dst, &outl, src, n) != 1:
        return -1
    if EVP_CipherFinal_ex(ctx, dst + n, &outl) != 1:
        return -1
    if EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, TAG_LEN, tag) != 1:
        return -1
    return 0


cdef int _evp_open(EVP_CIPHER_CTX *ctx, const uint8_t *nonce, const uint8_t *aad,
                   const uint8_t *src, uint8_t *dst, int n,
                   uint8_t *tag) noexcept nogil:
    cdef int outl = 0
    if EVP_CipherInit_ex(ctx, NULL, NULL, NULL, nonce, 0) != 1:
        return -1
    if EVP_CipherUpdate(ctx, NULL, &outl, aad, AAD_LEN) != 1:
        return -1
    if EVP_CipherUpdate(ctx, dst, &outl, src, n) != 1:
        return -1
    if EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_TAG, TAG_LEN, tag) != 1:
        return -1
    if EVP_CipherFinal_ex(ctx, dst + n, &outl) != 1:
        return -1
    return 0


def openssl_evp_loop(bytes key, Py_ssize_t size, int64_t count, bint decrypt) -> int:
    """Seal or open ``count`` packets of ``size`` bytes; return elapsed ns."""
    cdef EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new()
    cdef uint8_t *src
    cdef uint8_t *dst
    cdef uint8_t nonce[12]
    cdef uint8_t aad[AAD_LEN]
    cdef uint8_t tag[TAG_LEN]
    cdef int n = <int>size
    cdef int64_t i, t0 = 0, t1 = 0, bad = 0
    _check_args(key, size, count)
    if ctx == NULL:
        raise MemoryError("Cannot allocate an EVP context")
    src = _buffer(size)
    dst = _buffer(size)
    memset(nonce, 0x42, 12)
    memset(aad, 0x17, AAD_LEN)
    try:
        alg = EVP_aes_128_gcm() if len(key) == 16 else EVP_aes_256_gcm()
        if EVP_CipherInit_ex(ctx, alg, NULL, key, NULL, 1) != 1:
            raise RuntimeError("EVP_CipherInit_ex failed")
        with nogil:
            if decrypt:
                # seal one packet in place; every iteration opens that packet
                bad += _evp_seal(ctx, nonce, aad, src, src, n, tag) != 0
                t0 = _now_ns()
                for i in range(count):
                    bad += _evp_open(ctx, nonce, aad, src, dst, n, tag) != 0
                t1 = _now_ns()
            else:
                t0 = _now_ns()
                for i in range(count):
                    _put_iv(nonce, <uint64_t>i)
                    bad += _evp_seal(ctx, nonce, aad, src, dst, n, tag) != 0
                t1 = _now_ns()
    finally:
        EVP_CIPHER_CTX_free(ctx)
        free(src)
        free(dst)
    if bad:
        raise RuntimeError(f"OpenSSL EVP failed {bad} packets")
    return t1 - t0


# ---------------------------------------------------------------- UDP load


cdef enum:
    UDP_BATCH_MAX = 256


cdef inline void _sleep_ns(int64_t ns) noexcept nogil:
    cdef timespec ts
    ts.tv_sec = ns // 1000000000
    ts.tv_nsec = ns % 1000000000
    nanosleep(&ts, NULL)


def udp_send_loop(int fd, Py_ssize_t size, double rate_pps, double seconds,
                  int64_t max_count, int batch=64) -> tuple:
    """Send ``size``-byte datagrams on a connected UDP socket; return the tally.

    Sends ``batch`` datagrams per ``sendmmsg`` at ``rate_pps`` (0: as fast as
    the socket takes them) until ``seconds`` pass or ``max_count`` went out,
    whichever comes first.  Each datagram carries its 64-bit index up front.
    Return ``(sent, refused, elapsed_ns)``; refused counts datagrams the
    local stack turned away (ENOBUFS), which are not retried.
    """
    cdef mmsghdr msgs[UDP_BATCH_MAX]
    cdef iovec iov[UDP_BATCH_MAX]
    cdef uint8_t *buf
    cdef int64_t t0, now, sent = 0, refused = 0, due, limit_ns
    cdef int i, k, r
    cdef uint64_t seq
    assert 8 <= size <= 65507, f"Bad datagram size {size}"
    assert 1 <= batch <= UDP_BATCH_MAX, f"Bad batch {batch}"
    assert seconds > 0 and max_count >= 1, f"Bad bounds {seconds}, {max_count}"
    assert rate_pps >= 0, f"Bad rate {rate_pps}"
    buf = _buffer(<size_t>size * batch)
    memset(msgs, 0, sizeof(msgs))
    for i in range(batch):
        iov[i].iov_base = buf + <size_t>i * size
        iov[i].iov_len = size
        msgs[i].msg_hdr.msg_iov = &iov[i]
        msgs[i].msg_hdr.msg_iovlen = 1
    limit_ns = <int64_t>(seconds * 1e9)
    try:
        with nogil:
            t0 = _now_ns()
            now = t0
            while sent + refused < max_count and now - t0 < limit_ns:
                k = batch
                if max_count - sent - refused < k:
                    k = <int>(max_count - sent - refused)
                if rate_pps > 0:
                    # pace: what the rate allows by now, else sleep for a batch
                    due = <int64_t>((now - t0) * rate_pps / 1e9) - sent - refused
                    if due < k:
                        _sleep_ns(<int64_t>((k - due) * 1e9 / rate_pps))
                        now = _now_ns()
                        continue
                for i in range(k):
                    seq = <uint64_t>(sent + refused + i)
                    memcpy(buf + <size_t>i * size, &seq, 8)
                r = sendmmsg(fd, msgs, k, 0)
                if r < 0:
                    if errno == ENOBUFS or errno == EAGAIN:
                        refused += k
                    elif errno != EINTR:
                        break
                else:
                    sent += r
                now = _now_ns()
    finally:
        free(buf)
    return sent, refused, now - t0


def udp_recv_loop(int fd, Py_ssize_t size, double seconds, double idle,
                  int batch=64) -> tuple:
    """Count datagrams arriving on a bound UDP socket; return the tally.

    Receives ``batch`` at a time with ``recvmmsg`` until ``seconds`` pass, or
    ``idle`` seconds go by without a datagram once the first has arrived.
    Return ``(datagrams, bytes, first_to_last_ns, out_of_order)``, the last
    counting datagrams whose index (see ``udp_send_loop``) is below one seen.
    """
    cdef mmsghdr msgs[UDP_BATCH_MAX]
    cdef iovec iov[UDP_BATCH_MAX]
    cdef pollfd pfd
    cdef uint8_t *buf
    cdef int64_t t0, first = 0, last = 0, got = 0, nbytes = 0, late = 0
    cdef int64_t limit_ns, idle_ns, now
    cdef uint64_t seq, top = 0
    cdef int i, r, slot = <int>size + 64
    assert 8 <= size <= 65507, f"Bad datagram size {size}"
    assert 1 <= batch <= UDP_BATCH_MAX, f"Bad batch {batch}"
    assert seconds > 0 and idle > 0, f"Bad bounds {seconds}, {idle}"
    buf = _buffer(<size_t>slot * batch)
    memset(msgs, 0, sizeof(msgs))
    for i in range(batch):
        iov[i].iov_base = buf + <size_t>i * slot
        iov[i].iov_len = slot
        msgs[i].msg_hdr.msg_iov = &iov[i]
        msgs[i].msg_hdr.msg_iovlen = 1
    pfd.fd = fd
    pfd.events = POLLIN
    limit_ns = <int64_t>(seconds * 1e9)
    idle_ns = <int64_t>(idle * 1e9)
    try:
        with nogil:
            t0 = _now_ns()
            while True:
                now = _now_ns()
                if now - t0 >= limit_ns or (got and now - last >= idle_ns):
                    break
                r = recvmmsg(fd, msgs, batch, MSG_DONTWAIT, NULL)
                if r <= 0:
                    if r < 0 and errno != EAGAIN and errno != EINTR:
                        break
                    poll(&pfd, 1, 20)
                    continue
                last = _now_ns()
                if not got:
                    first = last
                for i in range(r):
                    nbytes += msgs[i].msg_len
                    if msgs[i].msg_len >= 8:
                        memcpy(&seq, buf + <size_t>i * slot, 8)
                        if seq < top:
                            late += 1
                        else:
                            top = seq
                got += r
    finally:
        free(buf)
    return got, nbytes, last - first, late
