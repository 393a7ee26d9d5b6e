"""Tests for control.ike.crypto: PRF, key exchange, key derivation, SK payloads."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from control.ike.crypto import (
    MODP_2048_P,
    CbcHmacCipher,
    GcmCipher,
    IntegrityError,
    Prf,
    derive_child_keys,
    derive_ike_keys,
    nat_detection_hash,
    new_key_exchange,
    new_sk_cipher,
    open_message,
    psk_auth,
    seal_message,
)
from control.ike.messages import (
    DecodeError,
    EncrId,
    ExchangeType,
    Header,
    HeaderFlag,
    IntegId,
    NoncePayload,
    NotifyPayload,
    PrfId,
    ProtocolError,
    pull_message,
)

# RFC 4231 section 4.2-4.7: HMAC-SHA-256 test cases 1, 2, 3, 4, 6
RFC4231_SHA256 = [
    (
        "0b" * 20,
        b"Hi There".hex(),
        "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7",
    ),
    (
        b"Jefe".hex(),
        b"what do ya want for nothing?".hex(),
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843",
    ),
    (
        "aa" * 20,
        "dd" * 50,
        "773ea91e36800e46854db8ebd09181a72959098b3ef8c122d9635514ced565fe",
    ),
    (
        "0102030405060708090a0b0c0d0e0f10111213141516171819",
        "cd" * 50,
        "82558a389a443c0ea4cc819899f2083a85f0faa3e578f8077a2e3ff46729665b",
    ),
    (
        "aa" * 131,
        b"Test Using Larger Than Block-Size Key - Hash Key First".hex(),
        "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54",
    ),
]

# RFC 4231 section 4.2: test case 1 for HMAC-SHA-384 and HMAC-SHA-512
RFC4231_CASE1_SHA384 = (
    "afd03944d84895626b0825f4ab46907f15f9dadbe4101ec6"
    "82aa034c7cebc59cfaea9ea9076ede7f4af152e8b2fa9cb6"
)
RFC4231_CASE1_SHA512 = (
    "87aa7cdea5ef619d4ff0b4241a1d6cb02379f4e2ce4ec2787ad0b30545e17cde"
    "daa833b7d6b8a702038b274eaea3f4e4be9d914eeb61f1702e696c203a126854"
)

# RFC 7748 section 6.1: X25519 Alice/Bob key agreement
X25519_ALICE_PRIVATE = (
    "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a"
)
X25519_ALICE_PUBLIC = "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
X25519_BOB_PUBLIC = "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f"
X25519_SHARED = "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742"

# McGrew & Viega, "The Galois/Counter Mode of Operation (GCM)", test case 4
# (AES-128, 96-bit IV, 20 bytes of AAD); split as RFC 5282 salt | IV
GCM_TC4_KEY = "feffe9928665731c6d6a8f9467308308"
GCM_TC4_SALT = "cafebabe"
GCM_TC4_IV = "facedbaddecaf888"
GCM_TC4_AAD = "feedfacedeadbeeffeedfacedeadbeefabaddad2"
GCM_TC4_PLAINTEXT = (
    "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72"
    "1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39"
)
GCM_TC4_CIPHERTEXT = (
    "42831ec2217774244b7221b784d0d49ce3aa212f2c02a4e035c17e2329aca12e"
    "21d514b25466931c7d8f6a5aac84aa051ba30b396a0aac973d58e091"
)
GCM_TC4_TAG = "5bc94fbc3221a5db94fae95ae7121a47"


def counting_rng(start: int = 1) -> Callable[[int], bytes]:
    state = [start]

    def rng(n: int) -> bytes:
        out = bytes((state[0] + i) % 256 for i in range(n))
        state[0] += 1
        return out

    return rng


@pytest.mark.parametrize("key,data,mac", RFC4231_SHA256)
def test_prf_sha256_matches_rfc4231(key: str, data: str, mac: str) -> None:
    prf = Prf(PrfId.PRF_HMAC_SHA2_256)
    assert prf(bytes.fromhex(key), bytes.fromhex(data)).hex() == mac


def test_prf_sha384_and_sha512_match_rfc4231() -> None:
    key, data = bytes.fromhex("0b" * 20), b"Hi There"
    assert Prf(PrfId.PRF_HMAC_SHA2_384)(key, data).hex() == RFC4231_CASE1_SHA384
    assert Prf(PrfId.PRF_HMAC_SHA2_512)(key, data).hex() == RFC4231_CASE1_SHA512


def test_prf_plus_follows_rfc7296_definition() -> None:
    # RFC 7296 2.13: T1 = prf(K, S | 0x01), T2 = prf(K, T1 | S | 0x02), ...
    prf = Prf(PrfId.PRF_HMAC_SHA2_256)
    key, seed = bytes.fromhex(RFC4231_SHA256[1][0]), b"seed"
    t1 = hmac.new(key, seed + b"\x01", hashlib.sha256).digest()
    t2 = hmac.new(key, t1 + seed + b"\x02", hashlib.sha256).digest()
    t3 = hmac.new(key, t2 + seed + b"\x03", hashlib.sha256).digest()
    assert prf.plus(key, seed, 80) == (t1 + t2 + t3)[:80]
    assert prf.plus(key, seed, 16) == t1[:16]


def test_prf_plus_refuses_more_than_255_blocks() -> None:
    prf = Prf(PrfId.PRF_HMAC_SHA2_256)
    with pytest.raises(AssertionError):
        prf.plus(b"k", b"s", 255 * 32 + 1)


def test_modp_2048_prime_matches_rfc3526_formula() -> None:
    # RFC 3526 3: p = 2^2048 - 2^1984 - 1 + 2^64 * ([2^1918 pi] + 124476)
    bits = 1918 + 64
    one = 1 << bits

    def atan_inv(x: int) -> int:
        total = term = one // x
        k, sign = 1, -1
        while term:
            term //= x * x
            total += sign * (term // (2 * k + 1))
            sign, k = -sign, k + 1
        return total

    pi_scaled = (16 * atan_inv(5) - 4 * atan_inv(239)) >> 64
    expected = 2**2048 - 2**1984 - 1 + 2**64 * (pi_scaled + 124476)
    assert expected == MODP_2048_P


@pytest.mark.parametrize("group,size", [(19, 64), (20, 96), (31, 32), (14, 256)])
def test_key_exchange_round_trip_agrees(group: int, size: int) -> None:
    a = new_key_exchange(group, counting_rng(1))
    b = new_key_exchange(group, counting_rng(99))
    assert len(a.public) == size and a.public != b.public
    secret = a.exchange(b.public)
    assert secret == b.exchange(a.public)
    assert len(secret) == {19: 32, 20: 48, 31: 32, 14: 256}[group]


def test_x25519_matches_rfc7748() -> None:
    alice = new_key_exchange(31, lambda n: bytes.fromhex(X25519_ALICE_PRIVATE))
    assert alice.public.hex() == X25519_ALICE_PUBLIC
    assert alice.exchange(bytes.fromhex(X25519_BOB_PUBLIC)).hex() == X25519_SHARED


@pytest.mark.parametrize(
    "group,bad",
    [
        (19, bytes(64)),  # not on the curve
        (19, b"\x01" * 63),  # wrong length
        (20, bytes(96)),
        (31, bytes(32)),  # low order: all-zero shared secret
        (31, bytes(31)),
        (14, (1).to_bytes(256, "big")),  # RFC 6989: y must be > 1
        (14, (MODP_2048_P - 1).to_bytes(256, "big")),  # and < p - 1
        (14, MODP_2048_P.to_bytes(256, "big")),
        (14, bytes(255)),
    ],
)
def test_key_exchange_rejects_invalid_public_value(group: int, bad: bytes) -> None:
    kex = new_key_exchange(group, counting_rng())
    with pytest.raises(ProtocolError):
        kex.exchange(bad)


def test_ike_keys_have_rfc7296_sizes_and_order() -> None:
    prf = Prf(PrfId.PRF_HMAC_SHA2_384)
    ni, nr, spi_i, spi_r, gir = b"i" * 32, b"r" * 32, b"I" * 8, b"R" * 8, b"g" * 32
    keys = derive_ike_keys(
        prf,
        EncrId.ENCR_AES_CBC,
        128,
        IntegId.AUTH_HMAC_SHA2_256_128,
        gir,
        ni,
        nr,
        spi_i,
        spi_r,
    )
    skeyseed = hmac.new(ni + nr, gir, hashlib.sha384).digest()
    stream = prf.plus(skeyseed, ni + nr + spi_i + spi_r, 48 * 3 + 32 * 2 + 16 * 2)
    assert keys.sk_d == stream[:48]
    assert keys.sk_ai == stream[48:80] and keys.sk_ar == stream[80:112]
    assert keys.sk_ei == stream[112:128] and keys.sk_er == stream[128:144]
    assert keys.sk_pi == stream[144:192] and keys.sk_pr == stream[192:240]
    gcm = derive_ike_keys(
        prf, EncrId.ENCR_AES_GCM_16, 256, IntegId.NONE, gir, ni, nr, spi_i, spi_r
    )
    assert gcm.sk_ai == b"" and len(gcm.sk_ei) == 36 and gcm.sk_d == keys.sk_d
    assert gcm.sk_d.hex() not in repr(gcm) and repr(gcm.sk_d) not in repr(gcm)


def test_child_keys_split_initiator_first() -> None:
    prf = Prf(PrfId.PRF_HMAC_SHA2_256)
    keys = derive_child_keys(prf, b"d" * 32, b"i" * 32, b"r" * 32, 128)
    keymat = prf.plus(b"d" * 32, b"i" * 32 + b"r" * 32, 40)
    assert keys.key_i == keymat[:16] and keys.salt_i == keymat[16:20]
    assert keys.key_r == keymat[20:36] and keys.salt_r == keymat[36:40]


def test_psk_auth_follows_rfc7296_2_15() -> None:
    prf = Prf(PrfId.PRF_HMAC_SHA2_256)
    psk, msg, nonce, sk_p, idb = b"secret", b"message", b"nonce", b"skp", b"\x02\0\0\0x"

    def h(k: bytes, d: bytes) -> bytes:
        return hmac.new(k, d, hashlib.sha256).digest()

    inner = h(psk, b"Key Pad for IKEv2")
    expected = h(inner, msg + nonce + h(sk_p, idb))
    assert psk_auth(prf, psk, msg, nonce, sk_p, idb) == expected


def test_nat_detection_hash_is_sha1_of_spis_address_port() -> None:
    digest = nat_detection_hash(b"A" * 8, bytes(8), bytes([198, 18, 0, 1]), 500)
    expected = hashlib.sha1(b"A" * 8 + bytes(8) + bytes([198, 18, 0, 1, 1, 244]))
    assert digest == expected.digest()


def test_gcm_open_matches_gcm_spec_test_case_4() -> None:
    cipher = GcmCipher(bytes.fromhex(GCM_TC4_KEY + GCM_TC4_SALT))
    aad = bytes.fromhex(GCM_TC4_AAD)
    body = bytes.fromhex(GCM_TC4_IV + GCM_TC4_CIPHERTEXT + GCM_TC4_TAG)
    # the plaintext's last octet (0x39) is read as the pad length
    assert cipher.open(aad + body, len(aad)) == bytes.fromhex(GCM_TC4_PLAINTEXT)[:2]


def test_gcm_open_rejects_tampered_test_case_4() -> None:
    cipher = GcmCipher(bytes.fromhex(GCM_TC4_KEY + GCM_TC4_SALT))
    aad = bytearray.fromhex(GCM_TC4_AAD)
    body = bytes.fromhex(GCM_TC4_IV + GCM_TC4_CIPHERTEXT + GCM_TC4_TAG)
    aad[0] ^= 1
    with pytest.raises(IntegrityError):
        cipher.open(bytes(aad) + body, len(aad))


def _header() -> Header:
    return Header(b"I" * 8, b"R" * 8, 0, 0x20, ExchangeType.INFORMATIONAL, 0, 7)


PAYLOADS = [NoncePayload(b"n" * 32), NotifyPayload(0, 16384)]


def _ciphers(kind: str) -> tuple[object, object]:
    if kind == "gcm128":
        material = bytes(range(20))
        return GcmCipher(material), GcmCipher(material)
    if kind == "gcm256":
        material = bytes(range(36))
        return GcmCipher(material), GcmCipher(material)
    key, integ = bytes(range(32)), bytes(range(32, 64))
    rng = counting_rng()
    return CbcHmacCipher(key, integ, rng), CbcHmacCipher(key, integ, rng)


@pytest.mark.parametrize("kind", ["gcm128", "gcm256", "cbc"])
def test_sk_payload_round_trip(kind: str) -> None:
    sender, receiver = _ciphers(kind)
    data = seal_message(_header(), PAYLOADS, sender)  # type: ignore[arg-type]
    message = pull_message(data)
    assert message.header.length == len(data)
    assert open_message(data, message, receiver) == PAYLOADS  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["gcm128", "gcm256", "cbc"])
@pytest.mark.parametrize("where", [0, 27, 29, 40, -17, -1])
def test_sk_payload_tampered_is_rejected(kind: str, where: int) -> None:
    sender, receiver = _ciphers(kind)
    data = bytearray(seal_message(_header(), PAYLOADS, sender))  # type: ignore[arg-type]
    message = pull_message(bytes(data))
    data[where] ^= 0x01
    with pytest.raises(IntegrityError):
        open_message(bytes(data), message, receiver)  # type: ignore[arg-type]


def test_sk_gcm_layout_follows_rfc5282() -> None:
    material = bytes(range(36))
    cipher = new_sk_cipher(
        EncrId.ENCR_AES_GCM_16, IntegId.NONE, material, b"", counting_rng()
    )
    data = seal_message(_header(), PAYLOADS, cipher)
    # HDR (28) | SK generic header (4) | IV (8) | ciphertext | ICV (16)
    assert data[16] == 46 and int.from_bytes(data[30:32], "big") == len(data) - 28
    iv, sealed = data[32:40], data[40:]
    plain = AESGCM(material[:32]).decrypt(material[32:] + iv, sealed, data[:32])
    assert plain[-1] == 0 and plain[0] == 41  # no padding; first inner is Notify
    assert len(sealed) == len(plain) + 16
    # IVs never repeat under one key
    again = seal_message(_header(), PAYLOADS, cipher)
    assert again[32:40] != iv


def test_sk_cbc_layout_has_block_padding_and_truncated_hmac() -> None:
    key, integ = bytes(range(16)), bytes(range(32))
    cipher = new_sk_cipher(
        EncrId.ENCR_AES_CBC, IntegId.AUTH_HMAC_SHA2_256_128, key, integ, counting_rng()
    )
    data = seal_message(_header(), PAYLOADS, cipher)
    assert (len(data) - 28 - 4 - 16 - 16) % 16 == 0
    icv = hmac.new(integ, data[:-16], hashlib.sha256).digest()[:16]
    assert data[-16:] == icv


def test_sk_bad_padding_is_decode_error() -> None:
    cipher = GcmCipher(bytes(20))
    prefix = b"p" * 32
    sealed = cipher.seal(prefix, b"\x00" * 3 + b"\x09")  # pad length 9 > 3
    with pytest.raises(DecodeError):
        GcmCipher(bytes(20)).open(prefix + sealed, 32)


def test_header_flags_are_rfc_values() -> None:
    assert HeaderFlag.INITIATOR == 0x08 and HeaderFlag.RESPONSE == 0x20
