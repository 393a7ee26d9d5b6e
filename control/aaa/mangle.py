"""Name manglers: derive the username used for authorization from an identity.

Theory of operation: a mangler is written as text in a profile,
``SOURCE:PART`` (or ``SOURCE:PART:ARG``), and `parse_mangler` checks it once
at config time. `Mangler.apply` then takes what the session proved (the IKE
identity, the EAP identity, the certificate subject DN) and returns the
username, or None when the source is missing or the part is absent:

    dn:FIELD                 a field of the certificate subject DN
    eap:all                  the EAP identity as is
    eap:dn:FIELD             a field of an EAP identity written as a DN
    eap:prefix:D / suffix:D  before / after the first delimiter D (. @ \\)
    email:all|domain|username    of an RFC 822 IKE identity (user@domain)
    fqdn:all|domain|hostname     of an FQDN IKE identity (host.domain)

DN fields: common-name, country, domain, locality, organization,
organization-unit, state.

A mangler can only work when the session proves what it reads:
`usability_problem` says, at config time, when a profile never gives the
mangler its source (a certificate DN without certificate authentication of
peers, an EAP identity without EAP, an email or FQDN part when no
match_identity pattern admits that identity type: ``*`` admits both,
``*@domain`` email identities only, ``*.domain`` FQDNs, and emails whose
domain ends so).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import NameOID

from control.ike.matching import IdentityPattern
from control.ike.messages import IDType

DN_FIELDS = {
    "common-name": NameOID.COMMON_NAME,
    "country": NameOID.COUNTRY_NAME,
    "domain": NameOID.DOMAIN_COMPONENT,
    "locality": NameOID.LOCALITY_NAME,
    "organization": NameOID.ORGANIZATION_NAME,
    "organization-unit": NameOID.ORGANIZATIONAL_UNIT_NAME,
    "state": NameOID.STATE_OR_PROVINCE_NAME,
}
DELIMITERS = (".", "@", "\\")
# remote_auth methods by which the peer presents a certificate
SIGNATURE_AUTH = ("rsa-sig", "ecdsa-sig", "pubkey")
# IKE identity type each identity source reads
SOURCE_ID_TYPES = {"email": IDType.ID_RFC822_ADDR, "fqdn": IDType.ID_FQDN}
PARTS = {
    "eap": ("all", "dn", "prefix", "suffix"),
    "email": ("all", "domain", "username"),
    "fqdn": ("all", "domain", "hostname"),
}


@dataclass(frozen=True)
class Mangler:
    source: str  # dn, eap, email, fqdn
    part: str
    arg: str = ""

    def apply(
        self, ike_identity: str, eap_identity: str | None, cert_dn: str | None
    ) -> str | None:
        """Return the username this mangler derives, or None."""
        if self.source == "dn":
            return _dn_field(cert_dn, self.part)
        if self.source == "eap":
            if not eap_identity:
                return None
            if self.part == "all":
                return eap_identity
            if self.part == "dn":
                return _dn_field(eap_identity, self.arg)
            head, sep, tail = eap_identity.partition(self.arg)
            if not sep:
                return None
            return head if self.part == "prefix" else tail
        sep = "@" if self.source == "email" else "."
        if self.source == "email" and "@" not in ike_identity:
            return None
        if self.part == "all":
            return ike_identity
        head, found, tail = ike_identity.partition(sep)
        if not found:
            return None
        return head if self.part in ("username", "hostname") else tail


def _dn_field(dn: str | None, name: str) -> str | None:
    if not dn:
        return None
    try:
        parsed = x509.Name.from_rfc4514_string(dn)
    except ValueError:
        return None
    values = parsed.get_attributes_for_oid(DN_FIELDS[name])
    return str(values[0].value) if values else None


def parse_mangler(text: str) -> Mangler:
    """Parse "SOURCE:PART[:ARG]"; raise ValueError naming what is wrong."""
    source, _, rest = text.partition(":")
    part, _, arg = rest.partition(":")
    if source == "dn":
        if part not in DN_FIELDS:
            raise ValueError(f"DN field {part!r} is not one of {', '.join(DN_FIELDS)}")
        return Mangler("dn", part)
    if source not in PARTS:
        raise ValueError(f"source {source!r} is not one of dn, eap, email, fqdn")
    if part not in PARTS[source]:
        choices = ", ".join(PARTS[source])
        raise ValueError(f"{source} part {part!r} is not one of {choices}")
    if source == "eap" and part == "dn" and arg not in DN_FIELDS:
        raise ValueError(f"DN field {arg!r} is not one of {', '.join(DN_FIELDS)}")
    if source == "eap" and part in ("prefix", "suffix") and arg not in DELIMITERS:
        raise ValueError(f"delimiter {arg!r} is not one of . @ \\")
    return Mangler(source, part, arg)


def usability_problem(
    mangler: Mangler, remote_auth: Sequence[str], patterns: Sequence[str]
) -> str | None:
    """Say why a profile never gives ``mangler`` its source, or None.

    ``remote_auth`` and ``patterns`` (match_identity) are the profile's, the
    patterns already checked.
    """
    if mangler.source == "dn":
        if not any(method in SIGNATURE_AUTH for method in remote_auth):
            return ("dn: needs certificate authentication of peers (remote_auth "
                    f"{', '.join(SIGNATURE_AUTH)})")  # fmt: skip
        return None
    if mangler.source == "eap":
        if "eap" not in remote_auth:
            return "eap: needs EAP authentication of peers (remote_auth eap)"
        return None
    wanted = SOURCE_ID_TYPES[mangler.source]
    for text in patterns:
        if wanted in admitted_types(IdentityPattern.parse(text)):
            return None
    return (f"{mangler.source}: no match_identity pattern admits "
            f"{mangler.source} identities")  # fmt: skip


def admitted_types(pattern: IdentityPattern) -> tuple[int, ...]:
    """Return which of the email and FQDN identity types ``pattern`` can match.

    A suffix with an ``@`` (``*@example.net``) ends email identities only, as
    an FQDN holds no ``@``; one without (``*.example.net``) ends FQDNs and the
    domain of email identities alike.
    """
    both = (IDType.ID_RFC822_ADDR, IDType.ID_FQDN)
    if pattern.kind == "any":
        return both
    if pattern.kind == "suffix":
        return (IDType.ID_RFC822_ADDR,) if "@" in pattern.text else both
    if pattern.kind == "exact" and pattern.id_type in both:
        return (pattern.id_type,)
    return ()
