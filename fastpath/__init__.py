"""espgate's userspace ESP dataplane (AES-GCM ESP over ESP-in-UDP and TUN).

The compiled core lives in :mod:`fastpath._engine`; this package re-exports its
public names next to the pure-Python pieces (:class:`SAParams`, :func:`open_tun`).
"""

from fastpath._engine import (
    BATCH_HEADROOM,
    BATCH_TAILROOM,
    Engine,
    ReplayWindow,
    SAHandle,
    crypto_backends,
    decrypt_batch,
    encrypt_batch,
    esp_decrypt,
    esp_encrypt,
    esp_open_payload,
    esp_seal_payload,
    gcm_open,
    gcm_seal,
    tun_coalesce,
    tun_segment,
)
from fastpath.sa import SAParams
from fastpath.tun import open_tun, tun_vnet_hdr

__all__ = [
    "BATCH_HEADROOM",
    "BATCH_TAILROOM",
    "Engine",
    "ReplayWindow",
    "SAHandle",
    "SAParams",
    "crypto_backends",
    "decrypt_batch",
    "encrypt_batch",
    "esp_decrypt",
    "esp_encrypt",
    "esp_open_payload",
    "esp_seal_payload",
    "gcm_open",
    "gcm_seal",
    "open_tun",
    "tun_coalesce",
    "tun_segment",
    "tun_vnet_hdr",
]
