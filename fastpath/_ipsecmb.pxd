# intel-ipsec-mb 1.3 direct AES-GCM API (Debian libipsec-mb-dev).
# The IMB_* names are function-like macros over the manager's function table;
# declaring them as functions lets Cython emit the macro call unchanged.
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

    # only the size matters on the Cython side; the real layout is the header's
    cdef struct gcm_key_data:
        uint8_t expanded_keys[240]

    cdef struct gcm_context_data:
        uint8_t aad_hash[16]

    IMB_MGR *alloc_mb_mgr(uint64_t flags)
    void free_mb_mgr(IMB_MGR *mgr)
    void init_mb_mgr_auto(IMB_MGR *mgr, IMB_ARCH *arch)
    void init_mb_mgr_avx512(IMB_MGR *mgr)
    void init_mb_mgr_avx2(IMB_MGR *mgr)
    void init_mb_mgr_sse(IMB_MGR *mgr)
    int imb_get_errno(IMB_MGR *mgr)
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
