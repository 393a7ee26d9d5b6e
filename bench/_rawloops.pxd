# C declarations for the raw reference loops (bench/_rawloops.pyx): the
# intel-ipsec-mb 1.3 direct AES-GCM API and the OpenSSL 3 EVP calls they need.
# Kept apart from fastpath's own .pxd files so the benchmark references never
# depend on engine internals.
from libc.stdint cimport uint8_t, uint64_t


cdef extern from "<intel-ipsec-mb.h>" nogil:
    ctypedef struct IMB_MGR:
        pass

    ctypedef enum IMB_ARCH:
        IMB_ARCH_NONE
        IMB_ARCH_NOAESNI
        IMB_ARCH_SSE
        IMB_ARCH_AVX
        IMB_ARCH_AVX2
        IMB_ARCH_AVX512

    # only the size matters here; the real layout is the header's
    cdef struct gcm_key_data:
        uint8_t expanded_keys[240]

    cdef struct gcm_context_data:
        uint8_t aad_hash[16]

    IMB_MGR *alloc_mb_mgr(uint64_t flags)
    void init_mb_mgr_auto(IMB_MGR *mgr, IMB_ARCH *arch)
    const char *imb_get_version_str()

    void IMB_AES128_GCM_PRE(IMB_MGR *mgr, const void *key, gcm_key_data *kd)
    void IMB_AES256_GCM_PRE(IMB_MGR *mgr, const void *key, gcm_key_data *kd)
    void IMB_AES128_GCM_ENC(IMB_MGR *mgr, const gcm_key_data *kd,
                            gcm_context_data *ctx, uint8_t *dst,
                            const uint8_t *src, uint64_t length,
                            const uint8_t *iv, const uint8_t *aad,
                            uint64_t aad_len, uint8_t *tag, uint64_t tag_len)
    void IMB_AES256_GCM_ENC(IMB_MGR *mgr, const gcm_key_data *kd,
                            gcm_context_data *ctx, uint8_t *dst,
                            const uint8_t *src, uint64_t length,
                            const uint8_t *iv, const uint8_t *aad,
                            uint64_t aad_len, uint8_t *tag, uint64_t tag_len)
    void IMB_AES128_GCM_DEC(IMB_MGR *mgr, const gcm_key_data *kd,
                            gcm_context_data *ctx, uint8_t *dst,
                            const uint8_t *src, uint64_t length,
                            const uint8_t *iv, const uint8_t *aad,
                            uint64_t aad_len, uint8_t *tag, uint64_t tag_len)
    void IMB_AES256_GCM_DEC(IMB_MGR *mgr, const gcm_key_data *kd,
                            gcm_context_data *ctx, uint8_t *dst,
                            const uint8_t *src, uint64_t length,
                            const uint8_t *iv, const uint8_t *aad,
                            uint64_t aad_len, uint8_t *tag, uint64_t tag_len)


cdef extern from "<openssl/evp.h>" nogil:
    ctypedef struct EVP_CIPHER_CTX:
        pass
    ctypedef struct EVP_CIPHER:
        pass
    ctypedef struct ENGINE:
        pass

    int EVP_CTRL_GCM_GET_TAG
    int EVP_CTRL_GCM_SET_TAG

    EVP_CIPHER_CTX *EVP_CIPHER_CTX_new()
    void EVP_CIPHER_CTX_free(EVP_CIPHER_CTX *ctx)
    const EVP_CIPHER *EVP_aes_128_gcm()
    const EVP_CIPHER *EVP_aes_256_gcm()
    int EVP_CipherInit_ex(EVP_CIPHER_CTX *ctx, const EVP_CIPHER *cipher,
                          ENGINE *impl, const unsigned char *key,
                          const unsigned char *iv, int enc)
    int EVP_CipherUpdate(EVP_CIPHER_CTX *ctx, unsigned char *out, int *outl,
                         const unsigned char *inp, int inl)
    int EVP_CipherFinal_ex(EVP_CIPHER_CTX *ctx, unsigned char *out, int *outl)
    int EVP_CIPHER_CTX_ctrl(EVP_CIPHER_CTX *ctx, int type, int arg, void *ptr)


cdef extern from "<openssl/crypto.h>" nogil:
    int OPENSSL_VERSION
    const char *OpenSSL_version(int t)
    int CRYPTO_memcmp(const void *a, const void *b, size_t n)


cdef extern from "<time.h>" nogil:
    ctypedef long time_t
    cdef struct timespec:
        time_t tv_sec
        long tv_nsec
    int CLOCK_MONOTONIC
    int clock_gettime(int clk, timespec *ts)
