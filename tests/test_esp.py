"""ESP (RFC 4303 + RFC 4106 AES-GCM-16) sealing and opening, same C as the engine."""

import struct

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fastpath import (
    BATCH_HEADROOM,
    BATCH_TAILROOM,
    SAHandle,
    SAParams,
    crypto_backends,
    decrypt_batch,
    encrypt_batch,
    esp_decrypt,
    esp_encrypt,
    esp_open_payload,
    esp_seal_payload,
)

H = bytes.fromhex
BACKENDS = crypto_backends()

# draft-mcgrew-gcm-test-01 section 4, test cases numbered in order of appearance.
# Each: (case, key, salt, spi, seq (full, 8 octets with ESN), esn, plaintext
# (payload || padding || pad length || next header), packet).  The draft's
# trailers all carry next header 1.
DRAFT = [
    (
        "case1-aes128-esn",
        "4c80cdefbb5d10da906ac73c3613a634",
        "2e443b68",
        0x00004321,
        0x8765432100000000,
        True,
        "45000048699a000080114db7c0a80102c0a801010a9bf15638d3010000010000"
        "00000000045f736970045f756470037369700963796265726369747902646b00"
        "0021000101020201",
        "00004321000000004956ed7e3b244cfe"
        "fecf537e729d5b07dc30df528dd22b768d1b98736696a6fd348509fa13ceac34"
        "cfa2436f14a3f3cf65925bf1f4a13c5d15b21e1884f5ff6247aeabb786b93bce"
        "61bc17d768fd9732459018148f6cbe722fd04796562dfdb4",
    ),
    (
        "case2-aes128",
        "feffe9928665731c6d6a8f9467308308",
        "cafebabe",
        0x0000A5F8,
        0x0000000A,
        False,
        "4500003e698f000080114dccc0a80102c0a801010a980035002a2343b2d00100"
        "0001000000000000037369700963796265726369747902646b00000100010001",
        "0000a5f80000000afacedbaddecaf888"
        "deb22cd9b07c72c16e3a65beeb8df304a5a5897d33ae530f1ba76d5d114d2a5c"
        "3de81827c10e9a4f51330d0eec416642cfbb85a5b47e48a4ec3b9ba95d918bd1"
        "83b70d3aa8bc6ee4c309e9d85a41ad4a",
    ),
    (
        "case3-aes256",
        "abbccddef00112233445566778899aababbccddef00112233445566778899aab",
        "11223344",
        0x4A2CBFE3,
        0x00000002,
        False,
        "4500003069a6400080062690c0a801029389155e0a9e008b2dc57ee000000000"
        "7002400020bf0000020405b40101040201020201",
        "4a2cbfe3000000020102030405060708"
        "ff425c9b724599df7a3bcd510194e00d6a78107f1b0b1cbf06efae9d65a5d763"
        "748a637985771d347f0545659f14e99def842d8eb335f4eecfdbf831824b4c49"
        "15956c96",
    ),
    (
        "case5-aes128-esn",
        "3de09874b388e6491988d0c3607eae1f",
        "57690e43",
        0x42F67E3F,
        0x1010101010101010,
        True,
        "4500003c99c300008001cb7c40679318010101010800085c0200430061626364"
        "65666768696a6b6c6d6e6f707172737475767761626364656667686901020201",
        "42f67e3f101010104e280000a2fca1a3"
        "fba2caa4853cf9f0f22cb10d86dd83b0fec75691cf1a04b00d1138ec9c357917"
        "65acbd8701ad79845bf9fe3fba487bc91755e6662b4c8d0d1f5e22739530320a"
        "e0d731cc978ecafaeae88f00e80d6e48",
    ),
    (
        "case9-aes256-esn",
        "abbccddef00112233445566778899aababbccddef00112233445566778899aab",
        "73616c74",
        0x17405E67,
        0x156F3126DD0DB99B,
        True,
        "45080028732c00004006e9f90a0106120a01038f06b88023dd6bafbecb712602"
        "50101f646d540001",
        "17405e67dd0db99b616e640169766563"
        "f2d69ecdbd5a0d5b8d5ef38bad4da58d1f278fde98ef67549d524a3018d9a57f"
        "f4d3a31ce673119e451626c2415771e3b7eebca614c89b35",
    ),
]
DRAFT_IDS = [c[0] for c in DRAFT]


def _sa(key: bytes, salt: bytes, spi: int, esn: bool, inbound: bool) -> SAParams:
    return SAParams(
        spi=spi,
        inbound=inbound,
        key=key,
        salt=salt,
        session=1,
        peer=("198.18.0.2", 4500),
        esn=esn,
    )


def _draft(case: tuple) -> tuple[SAParams, int, bytes, bytes]:
    _, key, salt, spi, seq, esn, plaintext, packet = case
    sa = _sa(H(key), H(salt), spi, esn, inbound=True)
    pt = H(plaintext)
    payload = pt[: len(pt) - 2 - pt[-2]]
    return sa, seq, payload, H(packet)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", DRAFT, ids=DRAFT_IDS)
def test_seal_draft_known_answer(case: tuple, backend: str) -> None:
    sa, seq, payload, packet = _draft(case)
    out = esp_seal_payload(sa, seq, payload, 1, iv=packet[8:16], backend=backend)
    assert out == packet


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", DRAFT, ids=DRAFT_IDS)
def test_open_draft_known_answer(case: tuple, backend: str) -> None:
    sa, seq, payload, packet = _draft(case)
    got = esp_open_payload(sa, packet, seq_hi=seq >> 32, backend=backend)
    assert got == (seq, payload, 1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", DRAFT, ids=DRAFT_IDS)
def test_open_draft_tampered_rejected(case: tuple, backend: str) -> None:
    sa, seq, _, packet = _draft(case)
    # header: SPI and sequence number; then IV, ciphertext and ICV
    for pos in (0, 3, 4, 7, 8, 15, 16, len(packet) - 17, len(packet) - 1):
        bad = bytearray(packet)
        bad[pos] ^= 0x10
        with pytest.raises(ValueError):
            esp_open_payload(sa, bytes(bad), seq_hi=seq >> 32, backend=backend)


@pytest.mark.parametrize("case", [c for c in DRAFT if c[5]], ids=lambda c: c[0])
def test_open_draft_esn_wrong_high_half_rejected(case: tuple) -> None:
    sa, seq, _, packet = _draft(case)
    with pytest.raises(ValueError):
        esp_open_payload(sa, packet, seq_hi=(seq >> 32) ^ 1)


def test_decrypt_draft_next_header_one_rejected() -> None:
    sa, seq, _, packet = _draft(DRAFT[1])
    with pytest.raises(ValueError, match="next header"):
        esp_decrypt(sa, packet)


# A small IPv4/UDP packet from 198.18.1.1 to 198.18.2.1 and an IPv6/UDP one
# from 2001::1 to 2001::2, each carrying 11 bytes.
INNER4 = (
    bytes.fromhex("4500002700004000401100c6c6120101c6120201")
    + bytes.fromhex("3039303900130000")
    + b"hello-esp-4"
)
INNER6 = (
    bytes.fromhex("6000000000131140")
    + bytes.fromhex("20010000000000000000000000000001")
    + bytes.fromhex("20010000000000000000000000000002")
    + bytes.fromhex("3039303900130000")
    + b"hello-esp-6"
)


def _aesgcm_open(sa: SAParams, packet: bytes, seq: int) -> bytes:
    spi, lo = struct.unpack("!II", packet[:8])
    aad = struct.pack("!III", spi, seq >> 32, lo) if sa.esn else packet[:8]
    return AESGCM(sa.key).decrypt(sa.salt + packet[8:16], packet[16:], aad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("keylen", [16, 32])
@pytest.mark.parametrize("inner", [INNER4, INNER6], ids=["ipv4", "ipv6"])
def test_encrypt_round_trip_matches_cryptography(
    backend: str, keylen: int, inner: bytes
) -> None:
    out_sa = _sa(bytes(range(keylen)), b"salt", 0x1234, False, inbound=False)
    in_sa = _sa(bytes(range(keylen)), b"salt", 0x1234, False, inbound=True)
    packet = esp_encrypt(out_sa, 7, inner, backend=backend)
    spi, seq_lo = struct.unpack("!II", packet[:8])
    assert (spi, seq_lo) == (0x1234, 7)
    assert packet[8:16] == (7).to_bytes(8, "big")
    assert (len(packet) - 16 - 16) % 4 == 0
    pt = _aesgcm_open(in_sa, packet, 7)
    assert pt[-1] == (4 if inner is INNER4 else 41)
    assert pt[: len(inner)] == inner
    assert pt[len(inner) : -2] == bytes(range(1, pt[-2] + 1))
    assert esp_decrypt(in_sa, packet, backend=backend) == (7, inner)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decrypt_tampered_round_trip_rejected(backend: str) -> None:
    sa = _sa(bytes(16), b"salt", 0x1234, False, inbound=True)
    packet = esp_encrypt(sa, 9, INNER4, backend=backend)
    assert esp_decrypt(sa, packet, backend=backend) == (9, INNER4)
    for pos in range(len(packet)):
        bad = bytearray(packet)
        bad[pos] ^= 0x01
        with pytest.raises(ValueError):
            esp_decrypt(sa, bytes(bad), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_encrypt_esn_high_half_in_aad(backend: str) -> None:
    sa = _sa(bytes(32), b"salt", 0x4242, True, inbound=True)
    seq = (3 << 32) | 5
    packet = esp_encrypt(sa, seq, INNER4, backend=backend)
    assert packet[4:8] == (5).to_bytes(4, "big")
    assert packet[8:16] == seq.to_bytes(8, "big")
    assert _aesgcm_open(sa, packet, seq)[: len(INNER4)] == INNER4
    assert esp_decrypt(sa, packet, seq_hi=3, backend=backend) == (seq, INNER4)
    with pytest.raises(ValueError):
        esp_decrypt(sa, packet, seq_hi=2, backend=backend)


@pytest.mark.parametrize("size", range(20, 28))
def test_encrypt_pads_to_four_octets(size: int) -> None:
    sa = _sa(bytes(16), b"salt", 0x1234, False, inbound=False)
    inner = INNER4[:2] + size.to_bytes(2, "big") + INNER4[4:20] + bytes(size - 20)
    packet = esp_encrypt(sa, 1, inner)
    assert (len(packet) - 32) % 4 == 0
    assert len(packet) - 32 - size - 2 in (0, 1, 2, 3)


def test_encrypt_sequence_beyond_32_bits_without_esn_rejected() -> None:
    sa = _sa(bytes(16), b"salt", 0x1234, False, inbound=False)
    with pytest.raises(ValueError):
        esp_encrypt(sa, 1 << 32, INNER4)
    with pytest.raises(ValueError):
        esp_encrypt(sa, 0, INNER4)


def test_encrypt_non_ip_rejected() -> None:
    sa = _sa(bytes(16), b"salt", 0x1234, False, inbound=False)
    with pytest.raises(ValueError):
        esp_encrypt(sa, 1, b"\x00" * 20)


def test_decrypt_short_packet_rejected() -> None:
    sa = _sa(bytes(16), b"salt", 0x1234, False, inbound=True)
    with pytest.raises(ValueError):
        esp_decrypt(sa, bytes(33))


def test_decrypt_wrong_spi_rejected() -> None:
    sa = _sa(bytes(16), b"salt", 0x1234, False, inbound=True)
    other = _sa(bytes(16), b"salt", 0x1235, False, inbound=True)
    with pytest.raises(ValueError):
        esp_decrypt(other, esp_encrypt(sa, 1, INNER4))


@pytest.mark.parametrize(
    "field,value",
    [
        ("spi", 0),
        ("spi", 255),
        ("key", bytes(24)),
        ("salt", bytes(3)),
        ("replay_window", 100),
        ("replay_window", 8192),
        ("next_seq", 0),
        ("peer", ("not-an-ip", 4500)),
        ("remote_ts", ("10.0.0.0/33",)),
        ("engine", "hardware"),
    ],
)
def test_saparams_bad_value_rejected(field: str, value: object) -> None:
    kwargs: dict = dict(
        spi=0x1234,
        inbound=True,
        key=bytes(16),
        salt=bytes(4),
        session=1,
        peer=("198.18.0.2", 4500),
    )
    kwargs[field] = value
    with pytest.raises((ValueError, AssertionError)):
        SAParams(**kwargs)


def test_saparams_repr_hides_key() -> None:
    sa = _sa(b"\xaa" * 16, b"\xbb" * 4, 0x1234, False, inbound=True)
    assert "aa" not in repr(sa) and "bb" not in repr(sa)


@pytest.mark.parametrize("backend", BACKENDS)
def test_encrypt_batch_matches_single_packets(backend: str) -> None:
    sa = _sa(bytes(range(16)), b"salt", 0x5151, False, inbound=False)
    inners = [INNER4, INNER6, INNER4 + bytes(3), INNER6[:40] + bytes(1)]
    width = BATCH_HEADROOM + 64 + BATCH_TAILROOM
    buf = np.zeros((len(inners), width), dtype=np.uint8)
    lengths = np.zeros(len(inners), dtype=np.int32)
    for i, inner in enumerate(inners):
        buf[i, BATCH_HEADROOM : BATCH_HEADROOM + len(inner)] = list(inner)
        lengths[i] = len(inner)
    handle = SAHandle(sa, backend=backend)
    assert encrypt_batch(handle, buf, lengths) == len(inners)
    assert handle.next_seq == 1 + len(inners)
    for i, inner in enumerate(inners):
        expected = esp_encrypt(sa, 1 + i, inner, backend=backend)
        assert bytes(buf[i, : lengths[i]]) == expected

    # open the batch again; one tampered row fails alone
    buf[2, 20] ^= 1
    assert decrypt_batch(SAHandle(sa, backend=backend), buf, lengths) == 3
    assert lengths[2] == -1
    for i in (0, 1, 3):
        got = bytes(buf[i, BATCH_HEADROOM : BATCH_HEADROOM + lengths[i]])
        assert got == inners[i]


def test_encrypt_batch_row_too_narrow_rejected() -> None:
    sa = _sa(bytes(16), b"salt", 0x5151, False, inbound=False)
    buf = np.zeros((1, BATCH_HEADROOM + 20), dtype=np.uint8)
    lengths = np.array([20], dtype=np.int32)
    with pytest.raises(ValueError):
        encrypt_batch(SAHandle(sa), buf, lengths)
