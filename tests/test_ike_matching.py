"""Identity patterns, DER DNs and certificate maps (control.ike.matching)."""

from __future__ import annotations

import ipaddress

import pytest

from control.ike.matching import (
    CertRule,
    IdentityPattern,
    dn_to_string,
    parse_dn,
    select_profile,
)
from control.ike.messages import IDType
from control.ike.profiles import Identity, Profile
from control.lab.pki import LabPki

# x509.Name.from_rfc4514_string("CN=alice,OU=sales,O=espgate lab,C=CH")
# .public_bytes(), cryptography 45
ALICE_DN = bytes.fromhex(
    "3043310b300906035504061302434831143012060355040a0c0b65737067617465206c6162"
    "310e300c060355040b0c0573616c6573310e300c06035504030c05616c696365"
)
ALICE = Identity(IDType.ID_DER_ASN1_DN, ALICE_DN)


def matches(pattern: str, identity: str | Identity) -> bool:
    ident = Identity.from_string(identity) if isinstance(identity, str) else identity
    return IdentityPattern.parse(pattern).matches(ident.type, ident.data)


def test_parse_dn_reads_attributes_in_wire_order() -> None:
    assert parse_dn(ALICE_DN) == (
        ("C", "CH"),
        ("O", "espgate lab"),
        ("OU", "sales"),
        ("CN", "alice"),
    )
    assert dn_to_string(ALICE_DN) == "CN=alice,OU=sales,O=espgate lab,C=CH"
    assert str(ALICE) == "CN=alice,OU=sales,O=espgate lab,C=CH"


@pytest.mark.parametrize("cut", [1, 5, 20, len(ALICE_DN) - 1])
def test_parse_dn_truncated_raises_value_error(cut: int) -> None:
    with pytest.raises(ValueError):
        parse_dn(ALICE_DN[:cut])


def test_parse_dn_bad_outer_tag_raises_value_error() -> None:
    with pytest.raises(ValueError):
        parse_dn(b"\x31" + ALICE_DN[1:])
    assert dn_to_string(b"\x01\x02").startswith("dn#")


@pytest.mark.parametrize(
    ("pattern", "identity", "expected"),
    [
        ("*", "anyone@anywhere.example", True),
        ("*@espgate.example", "bob@espgate.example", True),
        ("*@espgate.example", "bob@other.example", False),
        ("*.espgate.example", "host.espgate.example", True),
        ("*.espgate.example", "espgate.example", False),
        ("*.espgate.example", "198.18.0.1", False),
        ("bob@espgate.example", "BOB@espgate.example", True),
        ("fqdn:host.example", "email:host.example", False),
        ("198.18.0.0/15", "198.19.4.4", True),
        ("198.18.0.0/15", "198.20.0.1", False),
        ("ipv4:198.18.7.7", "198.18.7.7", True),
        ("ipv6:2001:db8::/32", "2001:db8::5", True),
        ("2001:db8::/32", "198.18.0.1", False),
        ("keyid:0a0b0c", "keyid:0a0b0c", True),
        ("keyid:0a0b0c", "keyid:0a0b0d", False),
        ("keyid:0a0b0c", "fqdn:\x0a\x0b\x0c", False),
    ],
)
def test_identity_pattern_matches_by_kind(
    pattern: str, identity: str, expected: bool
) -> None:
    assert matches(pattern, identity) is expected


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("dn:O=espgate lab", True),
        ("dn:o=ESPGATE LAB,ou=sales", True),
        ("dn:OU=sales,CN=*ice", True),
        ("dn:OU=ops", False),
        ("dn:O=espgate lab,OU=ops", False),
        ("dn:2.5.4.3=alice", True),
    ],
)
def test_dn_pattern_needs_every_attribute(pattern: str, expected: bool) -> None:
    assert matches(pattern, ALICE) is expected


def test_dn_pattern_never_matches_unreadable_dn() -> None:
    broken = Identity(IDType.ID_DER_ASN1_DN, ALICE_DN[:-3])
    assert not matches("dn:O=espgate lab", broken)
    assert not matches("dn:O=espgate lab", "email:O=espgate lab")


@pytest.mark.parametrize(
    "pattern", ["dn:XX=1", "dn:novalue", "keyid:zz", "ipv4:2001:db8::1", "1.2/99"]
)
def test_identity_pattern_parse_rejects_bad_patterns(pattern: str) -> None:
    with pytest.raises(ValueError):
        IdentityPattern.parse(pattern)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> LabPki:
    return LabPki.create(tmp_path_factory.mktemp("pki"), "p256", chain=True)


def test_cert_rule_whole_name_and_attribute(pki: LabPki) -> None:
    cert = pki.client.cert
    assert CertRule("subject.cn", "equals", "CLIENT1@espgate.example").matches(cert)
    assert CertRule("subject", "contains", "o=espgate lab").matches(cert)
    assert CertRule("issuer.cn", "contains", "client CA").matches(cert)
    assert not CertRule("issuer.cn", "contains", "server CA").matches(cert)
    assert not CertRule("subject.ou", "equals", "sales").matches(cert)
    assert not CertRule("subject.cn", "equals", "client1").matches(cert)


def test_cert_rule_bad_field_is_api_misuse() -> None:
    with pytest.raises(AssertionError):
        CertRule("serial", "equals", "1")
    with pytest.raises(AssertionError):
        CertRule("subject", "startswith", "x")


def _profile(name: str, ids: list[str], rules: list[CertRule]) -> Profile:
    return Profile(name, ids, Identity.from_string("vpn.example"), b"k" * 16,
                   cert_map=rules)  # fmt: skip


def test_select_profile_uses_certificate_map(pki: LabPki) -> None:
    server_ca = _profile("srv", ["*"], [CertRule("issuer.cn", "contains", "server")])
    client_ca = _profile("cli", ["*"], [CertRule("issuer.cn", "contains", "client")])
    fallback = _profile("fallback", ["198.18.0.0/15"], [])
    profiles = [server_ca, client_ca, fallback]
    ident = Identity.from_string("client1@espgate.example")
    leaf = pki.client.cert
    assert select_profile(profiles, ident.type, ident.data, leaf) is client_ca
    assert select_profile(profiles, ident.type, ident.data, pki.server.cert) is (
        server_ca
    )
    # no certificate: a map cannot hold
    assert select_profile(profiles, ident.type, ident.data, None) is None
    address = Identity(IDType.ID_IPV4_ADDR, ipaddress.IPv4Address("198.19.0.9").packed)
    assert select_profile(profiles, address.type, address.data, None) is fallback


def test_profile_admits_dn_and_certificate_map(pki: LabPki) -> None:
    profile = _profile("dn", ["dn:O=espgate lab"], [])
    assert profile.admits(ALICE)
    assert not profile.admits(Identity.from_string("alice@espgate.example"))
    mapped = _profile("m", ["*"], [CertRule("subject.o", "equals", "espgate lab")])
    assert mapped.admits(ALICE, pki.client.cert)
    assert not mapped.admits(ALICE, None)
