"""IKEv2 cryptography: key exchange, PRF, key derivation, SK payload protection.

Theory of operation: an IKE SA is keyed in three steps (RFC 7296 2.14).
A key exchange (`KeyExchange`, one per DH group) yields the shared secret
g^ir; `derive_ike_keys` turns nonces, SPIs and g^ir into SKEYSEED and the
seven keys SK_d, SK_ai, SK_ar, SK_ei, SK_er, SK_pi, SK_pr with prf+; an
`SkCipher` per direction then seals and opens Encrypted payloads. CHILD SA
key material is prf+(SK_d, Ni | Nr) cut into i->r keys then r->i keys
(RFC 7296 2.17).

SK payloads come in two shapes. AES-GCM-16 (RFC 5282): the key material is the
AES key followed by a 4-byte salt, the nonce is salt | 8-byte explicit IV, the
AAD is the IKE header through the SK generic header, the 16-byte tag is the
ICV, and no integrity key exists. AES-CBC with HMAC-SHA2-256-128: a random
16-byte IV, padding to the block size, and an ICV over the whole message up to
the ICV itself.

Everything here is pure computation; randomness comes from the `rng` callable
the caller passes, so tests can replay exchanges.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from control.ike.messages import (
    GENERIC_HEADER_LENGTH,
    HEADER_LENGTH,
    DecodeError,
    DhGroup,
    EncrId,
    EncryptedPayload,
    Header,
    IntegId,
    Message,
    NotifyType,
    Payload,
    PayloadType,
    PrfId,
    ProtocolError,
    pull_payloads,
    push_header,
    push_payloads,
)

Rng = Callable[[int], bytes]


class IntegrityError(Exception):
    """An SK payload whose ICV does not verify; callers drop silently."""


# -- PRF and prf+ (RFC 7296 2.13) ---------------------------------------------

PRF_HASHES = {
    PrfId.PRF_HMAC_SHA2_256: "sha256",
    PrfId.PRF_HMAC_SHA2_384: "sha384",
    PrfId.PRF_HMAC_SHA2_512: "sha512",
}


class Prf:
    """An HMAC-based IKEv2 pseudorandom function."""

    def __init__(self, prf_id: int) -> None:
        assert prf_id in PRF_HASHES, f"unsupported prf {prf_id}"
        self.prf_id = prf_id
        self.hash_name = PRF_HASHES[PrfId(prf_id)]
        self.size = hashlib.new(self.hash_name).digest_size

    @property
    def key_size(self) -> int:
        # RFC 7296 2.13: the preferred key size of an HMAC PRF is its output
        return self.size

    def __call__(self, key: bytes, data: bytes) -> bytes:
        return hmac.new(key, data, self.hash_name).digest()

    def plus(self, key: bytes, seed: bytes, length: int) -> bytes:
        """Expand `key` and `seed` to `length` octets (prf+, RFC 7296 2.13)."""
        # RFC 7296 2.13: the counter is one octet, so at most 255 blocks
        assert length <= 255 * self.size, f"prf+ cannot produce {length} octets"
        out = b""
        block = b""
        counter = 1
        while len(out) < length:
            block = self(key, block + seed + bytes([counter]))
            out += block
            counter += 1
        return out[:length]


# -- key exchange ---------------------------------------------------------------

# RFC 3526 section 3: the 2048-bit MODP group, generator 2.
MODP_2048_P = int(
    "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74"
    "020BBEA63B139B22514A08798E3404DDEF9519B3CD3A431B302B0A6DF25F1437"
    "4FE1356D6D51C245E485B576625E7EC6F44C42E9A637ED6B0BFF5CB6F406B7ED"
    "EE386BFB5A899FA5AE9F24117C4B1FE649286651ECE45B3DC2007CB8A163BF05"
    "98DA48361C55D39A69163FA8FD24CF5F83655D23DCA3AD961C62F356208552BB"
    "9ED529077096966D670C354E4ABC9804F1746C08CA18217C32905E462E36CE3B"
    "E39E772C180E86039B2783A2EC07A28FB5C55DF06F4C52C9DE2BCBF695581718"
    "3995497CEA956AE515D2261898FA051015728E5A8AACAA68FFFFFFFFFFFFFFFF",
    16,
)
MODP_2048_G = 2
# RFC 3526 section 8 suggests exponents of at least twice the strength (~112)
MODP_EXPONENT_BYTES = 48


class KeyExchange:
    """One side of a Diffie-Hellman exchange in an IKEv2 group."""

    group: int
    public: bytes

    def exchange(self, peer: bytes) -> bytes:
        raise NotImplementedError


class EcpExchange(KeyExchange):
    def __init__(self, group: int, curve: ec.EllipticCurve, rng: Rng) -> None:
        del rng  # OpenSSL draws the scalar itself
        self.group = group
        self._curve = curve
        self._size = (curve.key_size + 7) // 8
        self._key = ec.generate_private_key(curve)
        numbers = self._key.public_key().public_numbers()
        # RFC 5903 7: the KE data is x | y, each padded to the field size
        self.public = numbers.x.to_bytes(self._size, "big") + numbers.y.to_bytes(
            self._size, "big"
        )

    def exchange(self, peer: bytes) -> bytes:
        # RFC 5903 7 / RFC 6989 2.3: exact length, and the point must be on
        # the curve (from_encoded_point checks it)
        if len(peer) != 2 * self._size:
            raise ProtocolError(
                NotifyType.INVALID_SYNTAX, f"ecp public value of {len(peer)} bytes"
            )
        try:
            point = ec.EllipticCurvePublicKey.from_encoded_point(
                self._curve, b"\x04" + peer
            )
        except ValueError as exc:
            raise ProtocolError(
                NotifyType.INVALID_SYNTAX, "ecp public value not on the curve"
            ) from exc
        # RFC 5903 9: the shared secret is the x coordinate
        return self._key.exchange(ec.ECDH(), point)


class X25519Exchange(KeyExchange):
    def __init__(self, group: int, rng: Rng) -> None:
        self.group = group
        self._key = x25519.X25519PrivateKey.from_private_bytes(rng(32))
        self.public = self._key.public_key().public_bytes_raw()

    def exchange(self, peer: bytes) -> bytes:
        # RFC 8031 2: the public value is exactly 32 octets
        if len(peer) != 32:
            raise ProtocolError(
                NotifyType.INVALID_SYNTAX, f"x25519 public value of {len(peer)} bytes"
            )
        try:
            secret = self._key.exchange(x25519.X25519PublicKey.from_public_bytes(peer))
        except ValueError as exc:
            raise ProtocolError(NotifyType.INVALID_SYNTAX, "x25519 low order") from exc
        # RFC 8031 2.3: an all-zero result must be rejected
        if not any(secret):
            raise ProtocolError(NotifyType.INVALID_SYNTAX, "x25519 all-zero secret")
        return secret


class ModpExchange(KeyExchange):
    def __init__(self, group: int, rng: Rng) -> None:
        self.group = group
        self._size = (MODP_2048_P.bit_length() + 7) // 8
        self._x = int.from_bytes(rng(MODP_EXPONENT_BYTES), "big") | 1 << (
            8 * MODP_EXPONENT_BYTES - 1
        )
        y = pow(MODP_2048_G, self._x, MODP_2048_P)
        # RFC 7296 3.4: padded with zeros to the length of the prime
        self.public = y.to_bytes(self._size, "big")

    def exchange(self, peer: bytes) -> bytes:
        if len(peer) != self._size:
            raise ProtocolError(
                NotifyType.INVALID_SYNTAX, f"modp public value of {len(peer)} bytes"
            )
        y = int.from_bytes(peer, "big")
        # RFC 6989 2.1: 1 < y < p-1
        if not 1 < y < MODP_2048_P - 1:
            raise ProtocolError(NotifyType.INVALID_SYNTAX, "modp value out of range")
        # RFC 7296 2.14: g^ir padded with zeros to the length of the modulus
        return pow(y, self._x, MODP_2048_P).to_bytes(self._size, "big")


SUPPORTED_GROUPS = (
    DhGroup.ECP_256,
    DhGroup.ECP_384,
    DhGroup.CURVE25519,
    DhGroup.MODP_2048,
)


def new_key_exchange(group: int, rng: Rng) -> KeyExchange:
    """Create our half of a key exchange in `group`."""
    if group == DhGroup.ECP_256:
        return EcpExchange(group, ec.SECP256R1(), rng)
    if group == DhGroup.ECP_384:
        return EcpExchange(group, ec.SECP384R1(), rng)
    if group == DhGroup.CURVE25519:
        return X25519Exchange(group, rng)
    if group == DhGroup.MODP_2048:
        return ModpExchange(group, rng)
    raise AssertionError(f"unsupported dh group {group}")


# -- IKE SA keys (RFC 7296 2.14) ------------------------------------------------

ENCR_KEY_LENGTHS = (128, 256)
GCM_SALT_SIZE = 4
INTEG_KEY_SIZES = {IntegId.NONE: 0, IntegId.AUTH_HMAC_SHA2_256_128: 32}
INTEG_ICV_SIZES = {IntegId.AUTH_HMAC_SHA2_256_128: 16}


def is_aead(encr: int) -> bool:
    return encr == EncrId.ENCR_AES_GCM_16


def encr_key_material_size(encr: int, key_length: int) -> int:
    """Return how many prf+ octets an ENCR transform consumes."""
    # RFC 5282 7.1: AES-GCM key material is the key plus a 4-octet salt
    extra = GCM_SALT_SIZE if is_aead(encr) else 0
    return key_length // 8 + extra


@dataclass
class IkeKeys:
    sk_d: bytes = field(repr=False)
    sk_ai: bytes = field(repr=False)
    sk_ar: bytes = field(repr=False)
    sk_ei: bytes = field(repr=False)
    sk_er: bytes = field(repr=False)
    sk_pi: bytes = field(repr=False)
    sk_pr: bytes = field(repr=False)


def derive_ike_keys(
    prf: Prf,
    encr: int,
    key_length: int,
    integ: int,
    shared_secret: bytes,
    nonce_i: bytes,
    nonce_r: bytes,
    spi_i: bytes,
    spi_r: bytes,
) -> IkeKeys:
    """Compute SKEYSEED and the seven IKE SA keys (RFC 7296 2.14)."""
    skeyseed = prf(nonce_i + nonce_r, shared_secret)
    e = encr_key_material_size(encr, key_length)
    a = INTEG_KEY_SIZES[IntegId(integ)]
    p = prf.key_size
    seed = nonce_i + nonce_r + spi_i + spi_r
    stream = prf.plus(skeyseed, seed, 3 * p + 2 * a + 2 * e)
    sizes = [p, a, a, e, e, p, p]
    parts = []
    pos = 0
    for size in sizes:
        parts.append(stream[pos : pos + size])
        pos += size
    return IkeKeys(*parts)


@dataclass
class ChildKeys:
    """ESP AES-GCM-16 key material, i->r first (RFC 7296 2.17)."""

    key_i: bytes = field(repr=False)
    salt_i: bytes = field(repr=False)
    key_r: bytes = field(repr=False)
    salt_r: bytes = field(repr=False)


def derive_child_keys(
    prf: Prf,
    sk_d: bytes,
    nonce_i: bytes,
    nonce_r: bytes,
    key_length: int,
    shared_secret: bytes = b"",
) -> ChildKeys:
    """Compute KEYMAT for an ESP AES-GCM-16 CHILD SA, with PFS if a secret is given."""
    k = key_length // 8
    n = k + GCM_SALT_SIZE
    # RFC 7296 2.17: KEYMAT = prf+(SK_d, [g^ir (new) |] Ni | Nr)
    keymat = prf.plus(sk_d, shared_secret + nonce_i + nonce_r, 2 * n)
    return ChildKeys(keymat[:k], keymat[k:n], keymat[n : n + k], keymat[n + k :])


# -- AUTH for shared keys (RFC 7296 2.15) ----------------------------------------

KEY_PAD = b"Key Pad for IKEv2"


def signed_octets(
    prf: Prf, real_message: bytes, nonce: bytes, sk_p: bytes, id_body: bytes
) -> bytes:
    """Return RealMessage | Nonce | prf(SK_p, ID'), what AUTH covers (2.15)."""
    return real_message + nonce + prf(sk_p, id_body)


def psk_auth(
    prf: Prf, psk: bytes, real_message: bytes, nonce: bytes, sk_p: bytes, id_body: bytes
) -> bytes:
    """Compute AUTH = prf(prf(PSK, "Key Pad for IKEv2"), <signed octets>)."""
    signed = signed_octets(prf, real_message, nonce, sk_p, id_body)
    return prf(prf(psk, KEY_PAD), signed)


# -- NAT detection (RFC 7296 2.23) ----------------------------------------------


def nat_detection_hash(spi_i: bytes, spi_r: bytes, address: bytes, port: int) -> bytes:
    """Return SHA-1(SPIi | SPIr | IP | Port) for a NAT_DETECTION_* notify."""
    return hashlib.sha1(spi_i + spi_r + address + port.to_bytes(2, "big")).digest()


# -- SK payload protection --------------------------------------------------------


class SkCipher:
    """Seal and open Encrypted payloads in one direction."""

    iv_size: int
    icv_size: int
    block_size: int

    def padded(self, plaintext: bytes) -> bytes:
        """Append padding and the pad length octet (RFC 7296 3.14)."""
        pad = (-(len(plaintext) + 1)) % self.block_size
        return plaintext + bytes(pad) + bytes([pad])

    def sealed_size(self, padded_size: int) -> int:
        return self.iv_size + padded_size + self.icv_size

    def seal(self, prefix: bytes, padded: bytes) -> bytes:
        """Return IV | ciphertext | ICV; `prefix` is header through SK header."""
        raise NotImplementedError

    def open(self, message: bytes, body_offset: int) -> bytes:
        """Verify and decrypt; return the plaintext without padding."""
        raise NotImplementedError

    @staticmethod
    def unpad(padded: bytes) -> bytes:
        if not padded:
            raise DecodeError("empty encrypted payload")
        pad = padded[-1]
        if pad + 1 > len(padded):
            raise DecodeError(f"pad length {pad} exceeds {len(padded)} bytes")
        return padded[: -(pad + 1)]


class GcmCipher(SkCipher):
    """AES-GCM with a 16-octet ICV for SK payloads (RFC 5282)."""

    iv_size = 8
    icv_size = 16
    block_size = 1  # RFC 5282 3: no block alignment is needed

    def __init__(self, key_material: bytes) -> None:
        self._aead = AESGCM(key_material[:-GCM_SALT_SIZE])
        self._salt = key_material[-GCM_SALT_SIZE:]
        self._counter = 0

    def seal(self, prefix: bytes, padded: bytes) -> bytes:
        # RFC 5282 3.1: the IV must never repeat under one key; a counter does
        self._counter += 1
        iv = self._counter.to_bytes(8, "big")
        # RFC 5282 5.1: AAD is the IKE header through the SK generic header
        return iv + self._aead.encrypt(self._salt + iv, padded, prefix)

    def open(self, message: bytes, body_offset: int) -> bytes:
        body = message[body_offset:]
        if len(body) < self.iv_size + self.icv_size + 1:
            raise IntegrityError("gcm payload too short")
        iv = body[: self.iv_size]
        try:
            padded = self._aead.decrypt(
                self._salt + iv, body[self.iv_size :], message[:body_offset]
            )
        except InvalidTag as exc:
            raise IntegrityError("gcm tag mismatch") from exc
        return self.unpad(padded)


class CbcHmacCipher(SkCipher):
    """AES-CBC with HMAC-SHA2-256-128 over the whole message (RFC 7296 3.14)."""

    iv_size = 16
    icv_size = 16
    block_size = 16

    def __init__(self, encr_key: bytes, integ_key: bytes, rng: Rng) -> None:
        self._key = encr_key
        self._integ_key = integ_key
        self._rng = rng

    def _icv(self, data: bytes) -> bytes:
        return hmac.new(self._integ_key, data, "sha256").digest()[: self.icv_size]

    def seal(self, prefix: bytes, padded: bytes) -> bytes:
        # RFC 7296 3.14: the IV must be unpredictable
        iv = self._rng(self.iv_size)
        enc = Cipher(algorithms.AES(self._key), modes.CBC(iv)).encryptor()
        body = iv + enc.update(padded) + enc.finalize()
        return body + self._icv(prefix + body)

    def open(self, message: bytes, body_offset: int) -> bytes:
        body = message[body_offset:]
        ct_size = len(body) - self.iv_size - self.icv_size
        if ct_size <= 0 or ct_size % self.block_size:
            raise IntegrityError(f"cbc ciphertext of {ct_size} bytes")
        # RFC 7296 3.14: the ICV covers the message from the header on
        if not hmac.compare_digest(
            self._icv(message[: -self.icv_size]), message[-self.icv_size :]
        ):
            raise IntegrityError("icv mismatch")
        iv = body[: self.iv_size]
        dec = Cipher(algorithms.AES(self._key), modes.CBC(iv)).decryptor()
        padded = dec.update(body[self.iv_size : -self.icv_size]) + dec.finalize()
        return self.unpad(padded)


def new_sk_cipher(
    encr: int, integ: int, encr_key: bytes, integ_key: bytes, rng: Rng
) -> SkCipher:
    """Create the SK cipher for one direction of an IKE SA."""
    if is_aead(encr):
        assert integ == IntegId.NONE, "aead takes no integrity transform"
        return GcmCipher(encr_key)
    assert encr == EncrId.ENCR_AES_CBC, f"unsupported encr {encr}"
    assert integ == IntegId.AUTH_HMAC_SHA2_256_128, f"unsupported integ {integ}"
    return CbcHmacCipher(encr_key, integ_key, rng)


def seal_message(header: Header, payloads: list[Payload], cipher: SkCipher) -> bytes:
    """Serialize `payloads` inside an Encrypted payload after `header`."""
    first, plaintext = push_payloads(payloads)
    padded = cipher.padded(plaintext)
    sk_length = GENERIC_HEADER_LENGTH + cipher.sealed_size(len(padded))
    header.next_payload = PayloadType.SK
    header.length = HEADER_LENGTH + sk_length
    prefix = push_header(header) + bytes([first, 0]) + sk_length.to_bytes(2, "big")
    return prefix + cipher.seal(prefix, padded)


def open_message(data: bytes, message: Message, cipher: SkCipher) -> list[Payload]:
    """Verify and decrypt the Encrypted payload of `message` (raw bytes `data`).

    Raises IntegrityError when the ICV fails and DecodeError when the
    plaintext does not parse.
    """
    sk = message.payloads[-1] if message.payloads else None
    assert isinstance(sk, EncryptedPayload), "message has no encrypted payload"
    body_offset = len(data) - len(sk.data)
    plaintext = cipher.open(data, body_offset)
    return pull_payloads(plaintext, sk.first_payload)
