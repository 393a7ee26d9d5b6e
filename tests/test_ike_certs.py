"""Certificates, chains, CRLs and AUTH signatures (control.ike.certs)."""

from __future__ import annotations

import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from control.ike.certs import (
    CertError,
    Credential,
    HashAlgorithm,
    TrustStore,
    certreq_data,
    identity_in_cert,
    parse_signature_hashes,
    sign_auth,
    signature_hash_data,
    spki_sha1,
    verify_auth,
)
from control.ike.messages import AuthMethod, IDType
from control.ike.profiles import Identity
from control.lab.pki import LabPki, issue

OCTETS = b"RealMessage1 | NonceRData | MACedIDForI"
NOW = datetime.datetime.now(datetime.UTC)

# RFC 7427 appendix A.1.2: sha256WithRSAEncryption AlgorithmIdentifier
RSA_SHA256_ALG_ID = bytes.fromhex("300d06092a864886f70d01010b0500")
# RFC 7427 appendix A.3.2: ecdsa-with-sha384 AlgorithmIdentifier
ECDSA_SHA384_ALG_ID = bytes.fromhex("300a06082a8648ce3d040303")


@pytest.fixture(scope="module")
def rsa_pki(tmp_path_factory: pytest.TempPathFactory) -> LabPki:
    return LabPki.create(tmp_path_factory.mktemp("rsa"), "rsa", chain=True)


@pytest.fixture(scope="module")
def p384_pki(tmp_path_factory: pytest.TempPathFactory) -> LabPki:
    return LabPki.create(tmp_path_factory.mktemp("p384"), "p384")


def test_sign_auth_rfc7427_rsa_verifies(rsa_pki: LabPki) -> None:
    method, data = sign_auth(rsa_pki.client.key, OCTETS, [2, 3, 4])
    assert method == AuthMethod.DIGITAL_SIGNATURE
    assert data[1 : 1 + data[0]] == RSA_SHA256_ALG_ID
    assert verify_auth(rsa_pki.client.cert, method, data, OCTETS) == "rsa"


def test_verify_auth_rfc7427_rsa_tampered_rejected(rsa_pki: LabPki) -> None:
    method, data = sign_auth(rsa_pki.client.key, OCTETS, [2])
    with pytest.raises(CertError):
        verify_auth(rsa_pki.client.cert, method, data, OCTETS + b"x")
    tampered = data[:-1] + bytes([data[-1] ^ 1])
    with pytest.raises(CertError):
        verify_auth(rsa_pki.client.cert, method, tampered, OCTETS)


def test_sign_auth_ecdsa_p384_uses_sha384(p384_pki: LabPki) -> None:
    method, data = sign_auth(p384_pki.server.key, OCTETS, [2, 3, 4])
    assert data[1 : 1 + data[0]] == ECDSA_SHA384_ALG_ID
    assert verify_auth(p384_pki.server.cert, method, data, OCTETS) == "ecdsa"


def test_verify_auth_ecdsa_tampered_rejected(p384_pki: LabPki) -> None:
    method, data = sign_auth(p384_pki.server.key, OCTETS, [3])
    with pytest.raises(CertError):
        verify_auth(p384_pki.server.cert, method, data, b"other octets")


def test_sign_auth_without_peer_hashes_uses_older_methods(
    rsa_pki: LabPki, p384_pki: LabPki
) -> None:
    method, data = sign_auth(rsa_pki.server.key, OCTETS, [])
    assert method == AuthMethod.RSA_SIGNATURE
    verify_auth(rsa_pki.server.cert, method, data, OCTETS)
    method, data = sign_auth(p384_pki.server.key, OCTETS, [])
    assert method == 10 and len(data) == 96
    verify_auth(p384_pki.server.cert, method, data, OCTETS)
    with pytest.raises(CertError):
        verify_auth(p384_pki.server.cert, method, data[:-1] + b"\0", OCTETS)


def test_verify_auth_key_type_mismatch_rejected(
    rsa_pki: LabPki, p384_pki: LabPki
) -> None:
    method, data = sign_auth(p384_pki.client.key, OCTETS, [2])
    with pytest.raises(CertError):
        verify_auth(rsa_pki.client.cert, method, data, OCTETS)


def test_trust_verify_chain_builds_path(rsa_pki: LabPki) -> None:
    store = TrustStore([rsa_pki.root.cert])
    assert rsa_pki.client_intermediate is not None
    path = store.verify(rsa_pki.client.cert, [rsa_pki.client_intermediate.cert], NOW)
    assert [c.subject for c in path] == [
        rsa_pki.client.cert.subject,
        rsa_pki.client_intermediate.cert.subject,
        rsa_pki.root.cert.subject,
    ]


def test_trust_verify_missing_intermediate_rejected(rsa_pki: LabPki) -> None:
    store = TrustStore([rsa_pki.root.cert])
    with pytest.raises(CertError, match="no trusted issuer"):
        store.verify(rsa_pki.client.cert, [], NOW)


def test_trust_verify_foreign_root_rejected(rsa_pki: LabPki, p384_pki: LabPki) -> None:
    store = TrustStore([p384_pki.root.cert])
    with pytest.raises(CertError):
        store.verify(rsa_pki.server.cert, [], NOW)


def test_trust_verify_expired_rejected(p384_pki: LabPki) -> None:
    store = TrustStore([p384_pki.root.cert])
    later = NOW + datetime.timedelta(days=30)
    with pytest.raises(CertError, match="not valid"):
        store.verify(p384_pki.client.cert, [], later)


def test_trust_verify_revoked_rejected(p384_pki: LabPki) -> None:
    root = p384_pki.root
    revoked = (
        x509.RevokedCertificateBuilder()
        .serial_number(p384_pki.client.cert.serial_number)
        .revocation_date(NOW)
        .build()
    )
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(root.cert.subject)
        .last_update(NOW)
        .next_update(NOW + datetime.timedelta(days=1))
        .add_revoked_certificate(revoked)
        .sign(root.key, hashes.SHA256())
    )
    store = TrustStore([root.cert], [crl])
    with pytest.raises(CertError, match="revoked"):
        store.verify(p384_pki.client.cert, [], NOW)
    store.verify(p384_pki.server.cert, [], NOW)


def test_identity_in_cert_san_dn_and_keyid(p384_pki: LabPki) -> None:
    cert = p384_pki.client.cert
    assert identity_in_cert(IDType.ID_RFC822_ADDR, b"client1@espgate.example", cert)
    assert not identity_in_cert(IDType.ID_RFC822_ADDR, b"other@espgate.example", cert)
    assert identity_in_cert(IDType.ID_DER_ASN1_DN, cert.subject.public_bytes(), cert)
    ski = x509.SubjectKeyIdentifier.from_public_key(cert.public_key()).digest
    assert identity_in_cert(IDType.ID_KEY_ID, ski, cert)
    assert not identity_in_cert(IDType.ID_KEY_ID, bytes(20), cert)
    dn = Identity.from_string("dn:CN=client1@espgate.example,O=espgate lab,C=CH")
    assert dn.type == IDType.ID_DER_ASN1_DN


def test_credential_certs_for_cuts_at_requested_ca(rsa_pki: LabPki) -> None:
    assert rsa_pki.intermediate is not None
    cred = Credential(
        rsa_pki.server.key, [rsa_pki.server.cert, rsa_pki.intermediate.cert]
    )
    assert len(cred.certs_for([spki_sha1(rsa_pki.root.cert)])) == 2
    assert len(cred.certs_for([spki_sha1(rsa_pki.intermediate.cert)])) == 1


def test_credential_rejects_key_of_another_certificate(rsa_pki: LabPki) -> None:
    Credential(rsa_pki.server.key, [rsa_pki.server.cert])
    with pytest.raises(ValueError, match="does not match"):
        Credential(rsa_pki.server.key, [rsa_pki.root.cert])
    with pytest.raises(ValueError, match="needs its certificate"):
        Credential(rsa_pki.server.key, [])


def test_signature_hash_and_certreq_data_round_trip(rsa_pki: LabPki) -> None:
    data = signature_hash_data()
    assert data == bytes.fromhex("000200030004")
    assert parse_signature_hashes(data) == [2, 3, 4]
    assert HashAlgorithm.SHA2_256 == 2
    assert certreq_data([rsa_pki.root.cert]) == spki_sha1(rsa_pki.root.cert)
    assert len(spki_sha1(rsa_pki.root.cert)) == 20


def test_issue_self_signed_is_its_own_issuer() -> None:
    ca = issue("x", "p256", None, ca=True)
    assert ca.cert.issuer == ca.cert.subject
