"""Certificates and signature authentication for IKEv2 (RFC 7296 2.15, RFC 7427).

Theory of operation: a profile that authenticates by signature holds a
`Credential` (private key and its chain, leaf first); a profile that admits
peers by certificate holds a `TrustStore` (trust anchors and optional CRLs).
At IKE_AUTH the peer's CERT payloads are a leaf and any intermediates;
`TrustStore.verify` builds a path from the leaf to an anchor by issuer name
and signature, checks validity times, CA constraints and revocation, and
returns the leaf. `identity_in_cert` binds the peer's IDi to that leaf, and
`verify_auth` checks the AUTH signature over the signed octets with the
leaf's public key. `sign_auth` makes our own AUTH payload data.

AUTH methods handled:

    1   RSA_SIGNATURE      RSASSA-PKCS1-v1_5 with SHA-1 (old clients)
    9   ECDSA_SHA256_P256  raw r | s (RFC 4754)
    10  ECDSA_SHA384_P384
    11  ECDSA_SHA512_P521
    14  DIGITAL_SIGNATURE  len | AlgorithmIdentifier | signature (RFC 7427),
                           PKCS1-v1_5 RSA or DER ECDSA with SHA-1/2

The hash for a digital signature is the best one both sides announced in
SIGNATURE_HASH_ALGORITHMS; without the peer's notify we fall back to the
older method of the key's type. Everything here is computation on bytes and
parsed objects; file loading (`load_*`) is for the configuration layer.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from cryptography.x509.oid import ExtensionOID

from control.ike.messages import AuthMethod, IDType

__all__ = [
    "CERT_X509_SIGNATURE",
    "CertError",
    "Credential",
    "HashAlgorithm",
    "PrivateKey",
    "TrustStore",
    "certreq_data",
    "identity_in_cert",
    "load_certificates",
    "load_crls",
    "load_private_key",
    "sign_auth",
    "signature_hash_data",
    "spki_sha1",
    "verify_auth",
]

# RFC 7296 3.6: Cert Encoding 4 is an X.509 certificate (signature)
CERT_X509_SIGNATURE = 4
MAX_CHAIN = 8

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


class CertError(Exception):
    """A certificate, chain or signature that does not check out."""


class HashAlgorithm(IntEnum):
    """RFC 7427 section 7: hash algorithm identifiers."""

    SHA1 = 1
    SHA2_256 = 2
    SHA2_384 = 3
    SHA2_512 = 4


_HASHES: dict[int, type[hashes.HashAlgorithm]] = {
    HashAlgorithm.SHA1: hashes.SHA1,
    HashAlgorithm.SHA2_256: hashes.SHA256,
    HashAlgorithm.SHA2_384: hashes.SHA384,
    HashAlgorithm.SHA2_512: hashes.SHA512,
}

# what we announce, best first; SHA-1 only verifies old peers' RFC 7427 data
OUR_HASHES = (HashAlgorithm.SHA2_256, HashAlgorithm.SHA2_384, HashAlgorithm.SHA2_512)

# RFC 7427 appendix A: DER AlgorithmIdentifiers (RSA with and without the
# NULL parameters some encoders leave out)
_RSA = "06092a864886f70d0101"
_ECDSA = "06082a8648ce3d0403"
_ALG_IDS: dict[bytes, tuple[str, int]] = {
    bytes.fromhex("300d" + _RSA + "050500"): ("rsa", HashAlgorithm.SHA1),
    bytes.fromhex("300d" + _RSA + "0b0500"): ("rsa", HashAlgorithm.SHA2_256),
    bytes.fromhex("300d" + _RSA + "0c0500"): ("rsa", HashAlgorithm.SHA2_384),
    bytes.fromhex("300d" + _RSA + "0d0500"): ("rsa", HashAlgorithm.SHA2_512),
    bytes.fromhex("300b" + _RSA + "05"): ("rsa", HashAlgorithm.SHA1),
    bytes.fromhex("300b" + _RSA + "0b"): ("rsa", HashAlgorithm.SHA2_256),
    bytes.fromhex("300b" + _RSA + "0c"): ("rsa", HashAlgorithm.SHA2_384),
    bytes.fromhex("300b" + _RSA + "0d"): ("rsa", HashAlgorithm.SHA2_512),
    bytes.fromhex("300906072a8648ce3d0401"): ("ecdsa", HashAlgorithm.SHA1),
    bytes.fromhex("300a" + _ECDSA + "02"): ("ecdsa", HashAlgorithm.SHA2_256),
    bytes.fromhex("300a" + _ECDSA + "03"): ("ecdsa", HashAlgorithm.SHA2_384),
    bytes.fromhex("300a" + _ECDSA + "04"): ("ecdsa", HashAlgorithm.SHA2_512),
}
_ALG_ID_OF = {value: key for key, value in reversed(_ALG_IDS.items())}

# RFC 4754 section 8: the older ECDSA methods fix curve and hash
_ECDSA_METHODS: dict[int, tuple[str, int]] = {
    9: ("secp256r1", HashAlgorithm.SHA2_256),
    10: ("secp384r1", HashAlgorithm.SHA2_384),
    11: ("secp521r1", HashAlgorithm.SHA2_512),
}
_ECDSA_METHOD_OF = {curve: method for method, (curve, _) in _ECDSA_METHODS.items()}
SIGNATURE_METHODS = frozenset({AuthMethod.RSA_SIGNATURE, AuthMethod.DIGITAL_SIGNATURE,
                               *_ECDSA_METHODS})  # fmt: skip


def spki_sha1(cert: x509.Certificate) -> bytes:
    """Return SHA-1 of the certificate's SubjectPublicKeyInfo (RFC 7296 3.7)."""
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha1(spki).digest()


def certreq_data(anchors: Sequence[x509.Certificate]) -> bytes:
    """Return a CERTREQ body: the concatenated SPKI hashes of the anchors."""
    return b"".join(spki_sha1(cert) for cert in anchors)


def signature_hash_data(algorithms: Sequence[int] = OUR_HASHES) -> bytes:
    """Return the SIGNATURE_HASH_ALGORITHMS notify data (RFC 7427 4)."""
    return b"".join(int(a).to_bytes(2, "big") for a in algorithms)


def parse_signature_hashes(data: bytes) -> list[int]:
    """Read a SIGNATURE_HASH_ALGORITHMS notify; an odd trailing byte is ignored."""
    return [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data) - 1, 2)]


# -- files --------------------------------------------------------------------------


def load_certificates(path: str | Path) -> list[x509.Certificate]:
    """Load every certificate of a PEM file, in file order; raise ValueError."""
    certs = x509.load_pem_x509_certificates(Path(path).read_bytes())
    if not certs:
        raise ValueError(f"no certificate in {path}")
    return certs


def load_private_key(path: str | Path) -> PrivateKey:
    """Load an unencrypted RSA or EC private key from a PEM file."""
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise ValueError(f"not an RSA or EC key: {type(key).__name__}")
    return key


def load_crls(path: str | Path) -> list[x509.CertificateRevocationList]:
    """Load a CRL from a PEM or DER file."""
    data = Path(path).read_bytes()
    if b"-----BEGIN" in data:
        return [x509.load_pem_x509_crl(data)]
    return [x509.load_der_x509_crl(data)]


# -- credentials and trust --------------------------------------------------------


@dataclass
class Credential:
    """Our private key and certificate chain (leaf first, no root needed)."""

    key: PrivateKey = field(repr=False)
    chain: list[x509.Certificate]

    def __post_init__(self) -> None:
        if not self.chain:
            raise ValueError("a credential needs its certificate")
        if self.chain[0].public_key() != self.key.public_key():
            raise ValueError("private key does not match the certificate")

    @property
    def kind(self) -> str:
        return "rsa" if isinstance(self.key, rsa.RSAPrivateKey) else "ecdsa"

    def certs_for(self, requested: Sequence[bytes]) -> list[x509.Certificate]:
        """Return the chain to send, cut below a CA the peer named by SPKI hash."""
        out: list[x509.Certificate] = []
        for cert in self.chain:
            if out and spki_sha1(cert) in requested:
                break
            out.append(cert)
        return out


def _public_key(cert: x509.Certificate) -> PublicKey:
    key = cert.public_key()
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        raise CertError(f"unsupported key type {type(key).__name__}")
    return key


def _check_issued(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    if cert.issuer != issuer.subject:
        return False
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        bc = cert.extensions.get_extension_for_oid(ExtensionOID.BASIC_CONSTRAINTS)
    except x509.ExtensionNotFound:
        return False
    return isinstance(bc.value, x509.BasicConstraints) and bc.value.ca


@dataclass
class TrustStore:
    """Trust anchors and CRLs; verifies a peer's chain (RFC 5280, simplified)."""

    anchors: list[x509.Certificate]
    crls: list[x509.CertificateRevocationList] = field(default_factory=list)

    def verify(
        self,
        leaf: x509.Certificate,
        intermediates: Sequence[x509.Certificate],
        now: datetime.datetime,
    ) -> list[x509.Certificate]:
        """Return the path leaf..anchor, or raise CertError naming the problem."""
        path = [leaf]
        pool = list(intermediates)
        while True:
            cert = path[-1]
            self._check_time(cert, now)
            anchor = next((a for a in self.anchors if _check_issued(cert, a)), None)
            if anchor is not None:
                self._check_time(anchor, now)
                path.append(anchor)
                break
            issuer = next(
                (c for c in pool if _is_ca(c) and _check_issued(cert, c)), None
            )
            if issuer is None:
                raise CertError(
                    f"no trusted issuer for {cert.subject.rfc4514_string()}"
                )
            pool.remove(issuer)
            path.append(issuer)
            if len(path) > MAX_CHAIN:
                raise CertError(f"chain longer than {MAX_CHAIN}")
        for cert, issuer in zip(path, path[1:], strict=False):
            self._check_revoked(cert, issuer, now)
        return path

    @staticmethod
    def _check_time(cert: x509.Certificate, now: datetime.datetime) -> None:
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise CertError(
                f"certificate {cert.subject.rfc4514_string()} not valid at {now}"
            )

    def _check_revoked(
        self, cert: x509.Certificate, issuer: x509.Certificate, now: datetime.datetime
    ) -> None:
        for crl in self.crls:
            if crl.issuer != issuer.subject:
                continue
            if not crl.is_signature_valid(_public_key(issuer)):
                raise CertError(f"bad signature on the CRL of {crl.issuer}")
            if crl.get_revoked_certificate_by_serial_number(cert.serial_number):
                raise CertError(
                    f"certificate {cert.subject.rfc4514_string()} "
                    f"serial {cert.serial_number:x} is revoked"
                )


def identity_in_cert(id_type: int, data: bytes, cert: x509.Certificate) -> bool:
    """Tell whether an IKE identity is the certificate's subject or one of its SANs."""
    if id_type == IDType.ID_DER_ASN1_DN:
        return data == cert.subject.public_bytes()
    if id_type == IDType.ID_KEY_ID:
        # Android sends the key identifier: the SKI, or SHA-1 of the key
        try:
            ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
            if data == ski.value.digest:
                return True
        except x509.ExtensionNotFound:
            pass
        return (
            data == x509.SubjectKeyIdentifier.from_public_key(_public_key(cert)).digest
        )
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    if id_type == IDType.ID_FQDN:
        text = data.decode("ascii", "replace").lower()
        return any(n.lower() == text for n in san.get_values_for_type(x509.DNSName))
    if id_type == IDType.ID_RFC822_ADDR:
        text = data.decode("ascii", "replace").lower()
        return any(n.lower() == text for n in san.get_values_for_type(x509.RFC822Name))
    if id_type in (IDType.ID_IPV4_ADDR, IDType.ID_IPV6_ADDR):
        return any(
            isinstance(a, (ipaddress.IPv4Address, ipaddress.IPv6Address))
            and a.packed == data
            for a in san.get_values_for_type(x509.IPAddress)
        )
    return False


# -- AUTH signatures ----------------------------------------------------------------


def _sign(key: PrivateKey, octets: bytes, hash_id: int) -> bytes:
    algorithm = _HASHES[hash_id]()
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(octets, padding.PKCS1v15(), algorithm)
    return key.sign(octets, ec.ECDSA(algorithm))


def sign_auth(
    key: PrivateKey, octets: bytes, peer_hashes: Sequence[int]
) -> tuple[int, bytes]:
    """Sign the signed octets; return the AUTH method and data.

    RFC 7427 3: with the peer's SIGNATURE_HASH_ALGORITHMS, a digital signature
    with the first of our hashes it supports; else the key type's older method.
    """
    common = [h for h in OUR_HASHES if h in peer_hashes]
    kind = "rsa" if isinstance(key, rsa.RSAPrivateKey) else "ecdsa"
    if common:
        hash_id = int(common[0])
        if isinstance(key, ec.EllipticCurvePrivateKey):
            # match the hash to the curve where the peer allows it
            wanted = {"secp384r1": 3, "secp521r1": 4}.get(key.curve.name, 2)
            hash_id = wanted if wanted in common else hash_id
        alg_id = _ALG_ID_OF[(kind, hash_id)]
        signature = _sign(key, octets, hash_id)
        return AuthMethod.DIGITAL_SIGNATURE, bytes([len(alg_id)]) + alg_id + signature
    if isinstance(key, rsa.RSAPrivateKey):
        return AuthMethod.RSA_SIGNATURE, _sign(key, octets, HashAlgorithm.SHA1)
    method = _ECDSA_METHOD_OF.get(key.curve.name)
    assert method is not None, f"No RFC 4754 method for curve {key.curve.name}"
    r, s = decode_dss_signature(_sign(key, octets, _ECDSA_METHODS[method][1]))
    size = (key.curve.key_size + 7) // 8
    return method, r.to_bytes(size, "big") + s.to_bytes(size, "big")


def verify_auth(cert: x509.Certificate, method: int, data: bytes, octets: bytes) -> str:
    """Check an AUTH signature by the certificate's key; return "rsa" or "ecdsa"."""
    key = _public_key(cert)
    kind = "rsa" if isinstance(key, rsa.RSAPublicKey) else "ecdsa"
    if method == AuthMethod.DIGITAL_SIGNATURE:
        # RFC 7427 3: one length octet, the AlgorithmIdentifier, the signature
        if not data:
            raise CertError("empty digital signature")
        size = data[0]
        alg = _ALG_IDS.get(data[1 : 1 + size])
        if alg is None:
            raise CertError(
                f"unsupported signature algorithm {data[1 : 1 + size].hex()}"
            )
        if alg[0] != kind:
            raise CertError(f"{alg[0]} signature from a {kind} key")
        hash_id, signature = alg[1], data[1 + size :]
    elif method == AuthMethod.RSA_SIGNATURE:
        # RFC 7296 3.8: RSASSA-PKCS1-v1_5; old peers hash with SHA-1
        if kind != "rsa":
            raise CertError("RSA signature method with an EC key")
        hash_id, signature = HashAlgorithm.SHA1, data
    elif method in _ECDSA_METHODS:
        # RFC 4754 7: r | s, each the size of the curve order
        curve, hash_id = _ECDSA_METHODS[method]
        if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != curve:
            raise CertError(f"auth method {method} does not fit the certificate key")
        half = len(data) // 2
        if not data or len(data) % 2:
            raise CertError(f"ECDSA signature of odd length {len(data)}")
        r = int.from_bytes(data[:half], "big")
        s = int.from_bytes(data[half:], "big")
        signature = encode_dss_signature(r, s)
    else:
        raise CertError(f"auth method {method} is not a signature")
    algorithm = _HASHES[hash_id]()
    try:
        if isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, octets, padding.PKCS1v15(), algorithm)
        else:
            key.verify(signature, octets, ec.ECDSA(algorithm))
    except (InvalidSignature, ValueError) as exc:
        raise CertError("signature does not verify") from exc
    return kind
