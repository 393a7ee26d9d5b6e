"""AES-GCM known answers for both backends, each with a tampered twin."""

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fastpath import crypto_backends, gcm_open, gcm_seal

H = bytes.fromhex

# McGrew & Viega, "The Galois/Counter Mode of Operation (GCM)", appendix B:
# (case, key, iv, plaintext, aad, ciphertext, tag)
_K3 = "feffe9928665731c6d6a8f9467308308"
_IV3 = "cafebabefacedbaddecaf888"
_P3 = (
    "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72"
    "1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b391aafd255"
)
_A4 = "feedfacedeadbeeffeedfacedeadbeefabaddad2"
_C3 = (
    "42831ec2217774244b7221b784d0d49ce3aa212f2c02a4e035c17e2329aca12e"
    "21d514b25466931c7d8f6a5aac84aa051ba30b396a0aac973d58e091473f5985"
)
_C15 = (
    "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa"
    "8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662898015ad"
)
VECTORS = [
    ("tc1", "00" * 16, "00" * 12, "", "", "", "58e2fccefa7e3061367f1d57a4e7455a"),
    (
        "tc2",
        "00" * 16,
        "00" * 12,
        "00" * 16,
        "",
        "0388dace60b6a392f328c2b971b2fe78",
        "ab6e47d42cec13bdf53a67b21257bddf",
    ),
    ("tc3", _K3, _IV3, _P3, "", _C3, "4d5c2af327cd64a62cf35abd2ba6fab4"),
    ("tc4", _K3, _IV3, _P3[:120], _A4, _C3[:120], "5bc94fbc3221a5db94fae95ae7121a47"),
    ("tc13", "00" * 32, "00" * 12, "", "", "", "530f8afbc74536b9a963b4f1c4cb738b"),
    (
        "tc14",
        "00" * 32,
        "00" * 12,
        "00" * 16,
        "",
        "cea7403d4d606b6e074ec5d3baf39d18",
        "d0d1c8a799996bf0265b98b5d48ab919",
    ),
    ("tc15", _K3 * 2, _IV3, _P3, "", _C15, "b094dac5d93471bdec1a502270e3cc6c"),
    (
        "tc16",
        _K3 * 2,
        _IV3,
        _P3[:120],
        _A4,
        _C15[:120],
        "76fc6ece0f4e1768cddf8853bb2d551b",
    ),
]

BACKENDS = crypto_backends()
IDS = [v[0] for v in VECTORS]


def test_crypto_backends_lists_both() -> None:
    assert BACKENDS == ["ipsec-mb", "openssl"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", VECTORS, ids=IDS)
def test_seal_known_answer(case: tuple[str, ...], backend: str) -> None:
    _, key, iv, pt, aad, ct, tag = case
    out = gcm_seal(H(key), H(iv), H(aad), H(pt), backend=backend)
    assert out == H(ct + tag)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", VECTORS, ids=IDS)
def test_open_known_answer(case: tuple[str, ...], backend: str) -> None:
    _, key, iv, pt, aad, ct, tag = case
    assert gcm_open(H(key), H(iv), H(aad), H(ct + tag), backend=backend) == H(pt)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", VECTORS, ids=IDS)
def test_open_tampered_rejected(case: tuple[str, ...], backend: str) -> None:
    _, key, iv, pt, aad, ct, tag = case
    data = H(ct + tag)
    positions = [len(data) - 1]  # a tag bit
    if ct:
        positions.append(0)  # a ciphertext bit
    for pos in positions:
        bad = bytearray(data)
        bad[pos] ^= 0x01
        with pytest.raises(ValueError):
            gcm_open(H(key), H(iv), H(aad), bytes(bad), backend=backend)
    if aad:
        bad_aad = bytearray(H(aad))
        bad_aad[0] ^= 0x80
        with pytest.raises(ValueError):
            gcm_open(H(key), H(iv), bytes(bad_aad), data, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, 255, 1400, 9000])
def test_seal_matches_cryptography(backend: str, size: int) -> None:
    key = bytes(range(32))
    nonce = bytes(range(12))
    aad = b"\x01\x02\x03\x04\x05\x06\x07\x08"
    pt = bytes((i * 7) & 0xFF for i in range(size))
    out = gcm_seal(key, nonce, aad, pt, backend=backend)
    assert out == AESGCM(key).encrypt(nonce, pt, aad)
    assert gcm_open(key, nonce, aad, out, backend=backend) == pt


def test_seal_bad_nonce_rejected() -> None:
    with pytest.raises(ValueError):
        gcm_seal(bytes(16), bytes(8), b"", b"x")


def test_open_short_data_rejected() -> None:
    with pytest.raises(ValueError):
        gcm_open(bytes(16), bytes(12), b"", bytes(15))


def test_seal_unknown_backend_rejected() -> None:
    with pytest.raises(ValueError):
        gcm_seal(bytes(16), bytes(12), b"", b"x", backend="nope")
