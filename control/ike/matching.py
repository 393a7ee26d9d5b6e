"""Matching remote identities and certificates to profiles.

Theory of operation: a profile admits a peer when one of its identity
patterns matches the peer's IDi and, if the profile has a certificate map,
every rule of the map holds for the peer's end-entity certificate (the first
CERT payload, before its chain is verified; the chosen profile's trust store
verifies it afterwards). `select_profile` returns the first profile that
admits the peer, in configuration order.

Identity patterns (strings, as the configuration writes them):

    *                        anyone
    *.example.net            FQDN or email whose text ends in ".example.net"
    *@example.net            email in that domain
    198.18.0.0/15            IPv4 or IPv6 address identity inside the prefix
    ipv4:198.18.0.1          (also ipv6:) one address; a prefix works too
    dn:O=espgate lab,OU=ops  DER DN containing each of these attributes
                             (case-insensitive; a value "*x" is a suffix match)
    keyid:0a1b...            KEY_ID, exact
    fqdn:, email:, or bare   exact FQDN / RFC 822 (case-insensitive)

Certificate rules: `CertRule(field, op, value)` where field is "subject" or
"issuer" (the RFC 4514 string of the name) or "subject.cn", "issuer.o" ...
(any value of that attribute), and op is "equals" or "contains", both
case-insensitive.

DER DNs are read with a small parser of their own (RDN sequence of
attribute type and string value), because the peer's IDi need not be a name
`cryptography` will build; anything unreadable matches no DN pattern.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from cryptography import x509

from control.ike.messages import IDType

__all__ = [
    "ATTRIBUTE_OIDS",
    "CertRule",
    "IdentityPattern",
    "dn_to_string",
    "parse_dn",
    "select_profile",
]

# short names of the usual DN attributes (RFC 4514 3, RFC 4519)
ATTRIBUTE_OIDS: dict[str, str] = {
    "CN": "2.5.4.3",
    "SN": "2.5.4.4",
    "SERIALNUMBER": "2.5.4.5",
    "C": "2.5.4.6",
    "L": "2.5.4.7",
    "ST": "2.5.4.8",
    "STREET": "2.5.4.9",
    "O": "2.5.4.10",
    "OU": "2.5.4.11",
    "T": "2.5.4.12",
    "GN": "2.5.4.42",
    "DC": "0.9.2342.19200300.100.1.25",
    "UID": "0.9.2342.19200300.100.1.1",
    "E": "1.2.840.113549.1.9.1",
}
_NAME_OF = {oid: name for name, oid in ATTRIBUTE_OIDS.items()}
# DER string types a DN value may have (RFC 5280 4.1.2.4 DirectoryString)
_STRING_TAGS = {0x0C: "utf-8", 0x13: "ascii", 0x16: "ascii", 0x14: "latin-1",
                0x1E: "utf-16-be", 0x1C: "utf-32-be"}  # fmt: skip
MAX_DN_ATTRIBUTES = 64


# -- DER distinguished names ----------------------------------------------------


def _tlv(data: bytes, pos: int) -> tuple[int, bytes, int]:
    """Read one DER tag-length-value at `pos`; return tag, value, next offset."""
    if pos + 2 > len(data):
        raise ValueError("truncated DER")
    tag, size = data[pos], data[pos + 1]
    pos += 2
    if size & 0x80:
        count = size & 0x7F
        if count == 0 or count > 3 or pos + count > len(data):
            raise ValueError(f"bad DER length form {size:#x}")
        size = int.from_bytes(data[pos : pos + count], "big")
        pos += count
    if pos + size > len(data):
        raise ValueError(f"DER value of {size} bytes overruns")
    return tag, data[pos : pos + size], pos + size


def _oid(body: bytes) -> str:
    if not body:
        raise ValueError("empty OID")
    arcs = [body[0] // 40, body[0] % 40] if body[0] < 80 else [2, body[0] - 80]
    value = 0
    for byte in body[1:]:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            arcs.append(value)
            value = 0
    return ".".join(str(a) for a in arcs)


@functools.lru_cache(maxsize=256)
def parse_dn(data: bytes) -> tuple[tuple[str, str], ...]:
    """Return a DER Name's (attribute, value) pairs in wire order; ValueError if bad.

    Attributes come as short names ("CN", "O") where known, else dotted OIDs.
    """
    tag, body, end = _tlv(data, 0)
    # RFC 5280 4.1.2.4: Name ::= SEQUENCE OF SET OF AttributeTypeAndValue
    if tag != 0x30 or end != len(data):
        raise ValueError("a DN is one SEQUENCE")
    out: list[tuple[str, str]] = []
    pos = 0
    while pos < len(body):
        tag, rdn, pos = _tlv(body, pos)
        if tag != 0x31:
            raise ValueError(f"RDN tag {tag:#x} is not a SET")
        inner = 0
        while inner < len(rdn):
            tag, atv, inner = _tlv(rdn, inner)
            if tag != 0x30:
                raise ValueError("attribute is not a SEQUENCE")
            otag, oid, vpos = _tlv(atv, 0)
            vtag, value, vend = _tlv(atv, vpos)
            if otag != 0x06 or vend != len(atv):
                raise ValueError("bad AttributeTypeAndValue")
            codec = _STRING_TAGS.get(vtag)
            text = value.decode(codec, "replace") if codec else value.hex()
            dotted = _oid(oid)
            out.append((_NAME_OF.get(dotted, dotted), text))
            if len(out) > MAX_DN_ATTRIBUTES:
                raise ValueError("too many DN attributes")
    return tuple(out)


def _escape(value: str) -> str:
    return re.sub(r'([,+"\\<>;=])', r"\\\1", value)


def dn_to_string(data: bytes) -> str:
    """Render a DER DN as RFC 4514 text (last RDN first); hex if unreadable."""
    try:
        pairs = parse_dn(data)
    except ValueError:
        return f"dn#{data.hex()}"
    return ",".join(f"{k}={_escape(v)}" for k, v in reversed(pairs))


def _split_dn_pattern(text: str) -> list[tuple[str, str]]:
    """Split "O=a,OU=b\\,c" into [("O", "a"), ("OU", "b,c")]; ValueError if bad."""
    parts = [p.replace("\\,", ",") for p in re.split(r"(?<!\\),", text)]
    out: list[tuple[str, str]] = []
    for part in parts:
        key, sep, value = part.partition("=")
        key = key.strip().upper()
        key = _NAME_OF.get(key, key)
        if not sep or not key:
            raise ValueError(f"DN pattern part {part!r} is not KEY=VALUE")
        if key not in ATTRIBUTE_OIDS and not re.fullmatch(r"\d+(\.\d+)+", key):
            raise ValueError(f"unknown DN attribute {key!r}")
        out.append((key, value.strip()))
    return out


# -- identity patterns ------------------------------------------------------------


def _value_matches(wanted: str, value: str) -> bool:
    if wanted.startswith("*"):
        return value.lower().endswith(wanted[1:].lower())
    return value.lower() == wanted.lower()


@dataclass(frozen=True)
class IdentityPattern:
    """One parsed identity pattern of a profile (see the module docstring)."""

    kind: str  # any, suffix, network, dn, exact
    text: str = ""
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    dn: tuple[tuple[str, str], ...] = ()
    id_type: int = 0
    data: bytes = b""

    @staticmethod
    @functools.lru_cache(maxsize=256)
    def parse(text: str) -> IdentityPattern:
        """Read a pattern; raise ValueError naming what is wrong with it."""
        if text == "*":
            return IdentityPattern("any")
        if text.startswith("*"):
            if len(text) < 2:
                raise ValueError(f"empty domain in {text!r}")
            return IdentityPattern("suffix", text=text[1:].lower())
        kind, sep, rest = text.partition(":")
        if sep and kind == "dn":
            return IdentityPattern("dn", dn=tuple(_split_dn_pattern(rest)))
        if sep and kind == "keyid":
            return IdentityPattern("exact", id_type=IDType.ID_KEY_ID,
                                   data=bytes.fromhex(rest))  # fmt: skip
        if sep and kind == "fqdn":
            return IdentityPattern("exact", id_type=IDType.ID_FQDN, data=rest.encode())
        if sep and kind == "email":
            return IdentityPattern("exact", id_type=IDType.ID_RFC822_ADDR,
                                   data=rest.encode())  # fmt: skip
        typed = sep and kind in ("ipv4", "ipv6")
        if typed or "/" in text:
            net = ipaddress.ip_network(rest if typed else text, strict=False)
            if typed and kind != f"ipv{net.version}":
                raise ValueError(f"{rest!r} is not an {kind} address")
            return IdentityPattern("network", network=net)
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            pass
        else:
            return IdentityPattern("network", network=ipaddress.ip_network(address))
        id_type = IDType.ID_RFC822_ADDR if "@" in text else IDType.ID_FQDN
        return IdentityPattern("exact", id_type=id_type, data=text.encode())

    def matches(self, id_type: int, data: bytes) -> bool:
        """Tell whether the identity (type code and data) fits this pattern."""
        if self.kind == "any":
            return True
        if self.kind == "suffix":
            if id_type not in (IDType.ID_FQDN, IDType.ID_RFC822_ADDR):
                return False
            return data.decode("utf-8", "replace").lower().endswith(self.text)
        if self.kind == "network":
            assert self.network is not None
            size = 4 if self.network.version == 4 else 16
            wanted = IDType.ID_IPV4_ADDR if size == 4 else IDType.ID_IPV6_ADDR
            if id_type != wanted or len(data) != size:
                return False
            return ipaddress.ip_address(data) in self.network
        if self.kind == "dn":
            if id_type != IDType.ID_DER_ASN1_DN:
                return False
            try:
                pairs = parse_dn(data)
            except ValueError:
                return False
            return all(
                any(k == key and _value_matches(v, value) for k, value in pairs)
                for key, v in self.dn
            )
        if id_type != self.id_type:
            return False
        if id_type in (IDType.ID_FQDN, IDType.ID_RFC822_ADDR):
            return data.lower() == self.data.lower()
        return data == self.data


# -- certificate maps ---------------------------------------------------------------

CERT_FIELDS = ("subject", "issuer")
CERT_OPS = ("equals", "contains")


@dataclass(frozen=True)
class CertRule:
    """One certificate map rule: `field` `op` `value` (see the module docstring)."""

    field: str
    op: str
    value: str

    def __post_init__(self) -> None:
        name, _, attr = self.field.partition(".")
        assert name in CERT_FIELDS, f"Bad certificate field {self.field!r}"
        assert not attr or attr.upper() in ATTRIBUTE_OIDS, (
            f"Bad certificate attribute {attr!r}"
        )
        assert self.op in CERT_OPS, f"Bad certificate map operator {self.op!r}"

    def matches(self, cert: x509.Certificate) -> bool:
        """Tell whether the certificate satisfies this rule."""
        name, _, attr = self.field.partition(".")
        dn = cert.subject if name == "subject" else cert.issuer
        if attr:
            oid = x509.ObjectIdentifier(ATTRIBUTE_OIDS[attr.upper()])
            values = [str(a.value) for a in dn.get_attributes_for_oid(oid)]
        else:
            values = [dn.rfc4514_string()]
        wanted = self.value.lower()
        if self.op == "equals":
            return any(v.lower() == wanted for v in values)
        return any(wanted in v.lower() for v in values)


class Matchable(Protocol):
    name: str
    remote_ids: list[str]
    cert_map: list[CertRule]


P = TypeVar("P", bound=Matchable)

def admits(
    profile: Matchable, id_type: int, data: bytes, leaf: x509.Certificate | None
) -> bool:
    """Tell whether a profile admits this identity and end-entity certificate."""
    if not any(
        IdentityPattern.parse(p).matches(id_type, data) for p in profile.remote_ids
    ):
        return False
    if not profile.cert_map:
        return True
    return leaf is not None and all(rule.matches(leaf) for rule in profile.cert_map)


def select_profile(
    profiles: Sequence[P], id_type: int, data: bytes, leaf: x509.Certificate | None
) -> P | None:
    """Return the first profile that admits the peer, or None."""
    return next((p for p in profiles if admits(p, id_type, data, leaf)), None)
