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
"""

from libc.stdint cimport int64_t, uint8_t, uint64_t
from libc.stdlib cimport free
from libc.string cimport memcpy, memset

from bench._rawloops cimport (
    CLOCK_MONOTONIC,
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
    OPENSSL_VERSION,
    OpenSSL_version,
    alloc_mb_mgr,
    clock_gettime,
    gcm_context_data,
    gcm_key_data,
    imb_get_version_str,
    init_mb_mgr_auto,
    timespec,
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
