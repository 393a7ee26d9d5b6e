"""Name manglers: usernames from DN fields, EAP identities, emails and FQDNs."""

from __future__ import annotations

import pytest

from control.aaa.mangle import parse_mangler

DN = "CN=alice,OU=eng,O=espgate lab,L=Bern,ST=BE,C=CH,DC=corp"


@pytest.mark.parametrize(
    "text,wanted",
    [
        ("dn:common-name", "alice"),
        ("dn:country", "CH"),
        ("dn:domain", "corp"),
        ("dn:locality", "Bern"),
        ("dn:organization", "espgate lab"),
        ("dn:organization-unit", "eng"),
        ("dn:state", "BE"),
    ],
)
def test_apply_dn_field_of_certificate(text: str, wanted: str) -> None:
    assert parse_mangler(text).apply("ignored", None, DN) == wanted


@pytest.mark.parametrize(
    "text,eap,wanted",
    [
        ("eap:all", "CORP\\bob", "CORP\\bob"),
        ("eap:prefix:\\", "CORP\\bob", "CORP"),
        ("eap:suffix:\\", "CORP\\bob", "bob"),
        ("eap:prefix:@", "bob@corp.example", "bob"),
        ("eap:suffix:@", "bob@corp.example", "corp.example"),
        ("eap:prefix:.", "bob.smith", "bob"),
        ("eap:dn:common-name", "CN=bob,O=corp", "bob"),
        ("eap:suffix:@", "bob", None),
    ],
)
def test_apply_eap_identity_parts(text: str, eap: str, wanted: str | None) -> None:
    assert parse_mangler(text).apply("ike-id", eap, None) == wanted


@pytest.mark.parametrize(
    "text,ike,wanted",
    [
        ("email:all", "carol@corp.example", "carol@corp.example"),
        ("email:username", "carol@corp.example", "carol"),
        ("email:domain", "carol@corp.example", "corp.example"),
        ("email:username", "host.corp.example", None),
        ("fqdn:all", "host.corp.example", "host.corp.example"),
        ("fqdn:hostname", "host.corp.example", "host"),
        ("fqdn:domain", "host.corp.example", "corp.example"),
    ],
)
def test_apply_ike_identity_parts(text: str, ike: str, wanted: str | None) -> None:
    assert parse_mangler(text).apply(ike, None, None) == wanted


def test_apply_dn_without_certificate_gives_none() -> None:
    assert parse_mangler("dn:common-name").apply("x", None, None) is None


@pytest.mark.parametrize(
    "text", ["dn:serial", "eap:prefix:#", "email:local", "ldap:all", "eap:dn:x"]
)
def test_parse_bad_mangler_rejected(text: str) -> None:
    with pytest.raises(ValueError):
        parse_mangler(text)
