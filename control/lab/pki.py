"""A throw-away test PKI made at run time with `cryptography`.

Theory of operation: `LabPki.create(workdir, kind, chain)` makes a root CA,
optionally two intermediate CAs below it, then a server certificate (SAN
dNSName of the headend's identity, EKU serverAuth and ikeIntermediate, as
Windows and macOS want) and a client certificate (SAN rfc822Name of the
client's identity), all with keys of one `kind`: "rsa" (2048 bit), "p256" or
"p384". With `chain` the server's leaf is signed by one intermediate and
the client's by another, so each side must send its own intermediate: the
client holds only the root as trust anchor and its own intermediate. Every file
is PEM: certificates as `*.pem`, keys as unencrypted PKCS#8 `*.key` with mode
0600. `revoke` writes a CRL of the leaves' issuer naming given serials. The
keys exist only in the work directory of one self-test case.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

__all__ = ["Issued", "LabPki", "new_key"]

# RFC 4945 / Windows: id-kp-ipsecIKE intermediate usage (1.3.6.1.5.5.8.2.2)
IKE_INTERMEDIATE = ObjectIdentifier("1.3.6.1.5.5.8.2.2")

Key = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def new_key(kind: str) -> Key:
    """Return a fresh private key: "rsa", "p256" or "p384"."""
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    curves: dict[str, ec.EllipticCurve] = {
        "p256": ec.SECP256R1(),
        "p384": ec.SECP384R1(),
    }
    assert kind in curves, f"Unknown key kind: {kind}"
    return ec.generate_private_key(curves[kind])


@dataclass
class Issued:
    """A certificate and its private key."""

    cert: x509.Certificate
    key: Key = field(repr=False)


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "CH"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "espgate lab"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def issue(
    cn: str,
    kind: str,
    issuer: Issued | None,
    *,
    ca: bool = False,
    sans: list[x509.GeneralName] | None = None,
    server: bool = False,
) -> Issued:
    """Make a certificate for `cn`, self-signed when `issuer` is None."""
    key = new_key(kind)
    now = datetime.datetime.now(datetime.UTC)
    subject = _name(cn)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
        )
    )
    if sans:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(sans), critical=False
        )
    if server:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, IKE_INTERMEDIATE]),
            critical=False,
        )
    signer = issuer.key if issuer else key
    cert = builder.sign(signer, hashes.SHA256())
    return Issued(cert, key)


def _write(path: Path, data: bytes, private: bool = False) -> Path:
    fd = os.open(
        path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644
    )
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    return path


def cert_pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def key_pem(key: Key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@dataclass
class LabPki:
    """Root, optional intermediate, a server and a client leaf, on disk."""

    dir: Path
    root: Issued
    intermediate: Issued | None
    server: Issued
    client: Issued
    client_intermediate: Issued | None = None

    @classmethod
    def create(
        cls,
        workdir: Path,
        kind: str,
        *,
        chain: bool = False,
        server_id: str = "vpn.espgate.example",
        client_id: str = "client1@espgate.example",
        client_kind: str | None = None,
    ) -> LabPki:
        """Make the PKI and write its files under `workdir`/pki."""
        pki_dir = workdir / "pki"
        pki_dir.mkdir(parents=True, exist_ok=True)
        root = issue("espgate lab root CA", kind, None, ca=True)
        inter = cinter = None
        if chain:
            inter = issue("espgate lab server CA", kind, root, ca=True)
            cinter = issue("espgate lab client CA", kind, root, ca=True)
        server = issue(
            server_id, kind, inter or root, sans=[x509.DNSName(server_id)], server=True
        )
        client = issue(
            client_id,
            client_kind or kind,
            cinter or root,
            sans=[x509.RFC822Name(client_id)],
        )
        pki = cls(pki_dir, root, inter, server, client, cinter)
        _write(pki.ca_path, cert_pem(root.cert))
        chain_certs = [inter.cert] if inter else []
        _write(pki.server_cert_path, cert_pem(server.cert, *chain_certs))
        _write(pki.server_key_path, key_pem(server.key), private=True)
        _write(pki_dir / "client.pem", cert_pem(client.cert))
        _write(pki_dir / "client.key", key_pem(client.key), private=True)
        return pki

    @property
    def ca_path(self) -> Path:
        return self.dir / "ca.pem"

    @property
    def server_cert_path(self) -> Path:
        return self.dir / "server.pem"

    @property
    def server_key_path(self) -> Path:
        return self.dir / "server.key"

    def client_files(self) -> dict[str, bytes]:
        """Return the files a strongSwan client needs, by swanctl sub-path."""
        files = {
            "x509/client.pem": cert_pem(self.client.cert),
            "private/client.key": key_pem(self.client.key),
            "x509ca/ca.pem": cert_pem(self.root.cert),
        }
        if self.client_intermediate is not None:
            # as a plain certificate, not an anchor; strongSwan sends it along
            files["x509/intermediate.pem"] = cert_pem(self.client_intermediate.cert)
        return files
