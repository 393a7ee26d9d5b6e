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
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import NameOID

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
        raise ValueError(f"{source} part {part!r} is not one of {PARTS[source]}")
    if source == "eap" and part == "dn" and arg not in DN_FIELDS:
        raise ValueError(f"DN field {arg!r} is not one of {', '.join(DN_FIELDS)}")
    if source == "eap" and part in ("prefix", "suffix") and arg not in DELIMITERS:
        raise ValueError(f"delimiter {arg!r} is not one of . @ \\")
    return Mangler(source, part, arg)
