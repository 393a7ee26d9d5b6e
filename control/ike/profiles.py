"""Identities, profiles and responder configuration for the IKEv2 core.

Theory of operation: a `Profile` describes one class of remote peer: which
remote identities it admits (patterns), the identity and PSK we answer with,
the algorithms we accept and the subnets we route to its clients. At
IKE_SA_INIT time no identity is known, so the offer we accept is the union of
all profiles' IKE algorithms; at IKE_AUTH the peer's IDi (and, for profiles
with a certificate map, its end-entity certificate) selects the profile, which
then must also accept the IKE algorithms already chosen. Patterns and maps are
read by `control.ike.matching`.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography import x509

from control.ike import matching
from control.ike.certs import Credential, TrustStore
from control.ike.matching import CertRule
from control.ike.messages import DhGroup, EncrId, IDType, IntegId, PrfId

ID_PREFIXES = ("fqdn", "email", "ipv4", "ipv6", "dn", "keyid")
LOCAL_AUTH = ("pre-share", "rsa-sig", "ecdsa-sig")
REMOTE_AUTH = ("pre-share", "rsa-sig", "ecdsa-sig", "pubkey")


@dataclass(frozen=True)
class Identity:
    """An IKEv2 identity: ID type and identification data (RFC 7296 3.5)."""

    type: int  # an IDType, or an unknown type code from the peer
    data: bytes

    @classmethod
    def from_string(cls, text: str) -> Identity:
        """Parse "fqdn:", "email:", "ipv4:", "ipv6:", "dn:", "keyid:" text, or guess.

        "dn:" takes an RFC 4514 string ("CN=a,O=b"), "keyid:" hex.
        """
        kind, sep, rest = text.partition(":")
        if sep and kind == "dn":
            return cls(
                IDType.ID_DER_ASN1_DN,
                x509.Name.from_rfc4514_string(rest).public_bytes(),
            )
        if sep and kind == "keyid":
            return cls(IDType.ID_KEY_ID, bytes.fromhex(rest))
        if sep and kind in ("fqdn", "email", "ipv4", "ipv6"):
            if kind == "fqdn":
                return cls(IDType.ID_FQDN, rest.encode())
            if kind == "email":
                return cls(IDType.ID_RFC822_ADDR, rest.encode())
            if kind == "ipv4":
                return cls(IDType.ID_IPV4_ADDR, ipaddress.IPv4Address(rest).packed)
            return cls(IDType.ID_IPV6_ADDR, ipaddress.IPv6Address(rest).packed)
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            pass
        else:
            if address.version == 4:
                return cls(IDType.ID_IPV4_ADDR, address.packed)
            return cls(IDType.ID_IPV6_ADDR, address.packed)
        if "@" in text:
            return cls(IDType.ID_RFC822_ADDR, text.encode())
        return cls(IDType.ID_FQDN, text.encode())

    def __str__(self) -> str:
        if self.type in (IDType.ID_FQDN, IDType.ID_RFC822_ADDR):
            return self.data.decode("utf-8", "backslashreplace")
        if self.type == IDType.ID_IPV4_ADDR and len(self.data) == 4:
            return str(ipaddress.IPv4Address(self.data))
        if self.type == IDType.ID_IPV6_ADDR and len(self.data) == 16:
            return str(ipaddress.IPv6Address(self.data))
        if self.type == IDType.ID_DER_ASN1_DN:
            return matching.dn_to_string(self.data)
        if self.type == IDType.ID_KEY_ID:
            return f"keyid:{self.data.hex()}"
        return f"{int(self.type)}:{self.data.hex()}"

    def matches(self, pattern: str) -> bool:
        """Tell whether this identity matches a profile's remote id pattern."""
        return matching.IdentityPattern.parse(pattern).matches(self.type, self.data)


@dataclass(frozen=True)
class IkeAlgorithms:
    """One acceptable IKE SA algorithm set (the DH group is chosen apart)."""

    encr: int
    key_length: int
    integ: int
    prf: int


@dataclass(frozen=True)
class EspAlgorithms:
    """One acceptable ESP algorithm set; only AES-GCM-16 for now."""

    encr: int
    key_length: int


def default_ike_proposals() -> list[IkeAlgorithms]:
    """Return AES-GCM-16 then AES-CBC+HMAC-SHA2-256-128, each with 3 PRFs."""
    ciphers = [
        (EncrId.ENCR_AES_GCM_16, 256, IntegId.NONE),
        (EncrId.ENCR_AES_GCM_16, 128, IntegId.NONE),
        (EncrId.ENCR_AES_CBC, 256, IntegId.AUTH_HMAC_SHA2_256_128),
        (EncrId.ENCR_AES_CBC, 128, IntegId.AUTH_HMAC_SHA2_256_128),
    ]
    prfs = [PrfId.PRF_HMAC_SHA2_256, PrfId.PRF_HMAC_SHA2_384, PrfId.PRF_HMAC_SHA2_512]
    return [IkeAlgorithms(e, k, i, p) for e, k, i in ciphers for p in prfs]


def default_esp_proposals() -> list[EspAlgorithms]:
    return [
        EspAlgorithms(EncrId.ENCR_AES_GCM_16, 256),
        EspAlgorithms(EncrId.ENCR_AES_GCM_16, 128),
    ]


def default_dh_groups() -> list[int]:
    return [DhGroup.ECP_256, DhGroup.CURVE25519, DhGroup.ECP_384, DhGroup.MODP_2048]


@dataclass
class Profile:
    """A class of remote peers: who they are, how they authenticate, what they get.

    remote_ids: patterns as `control.ike.matching.IdentityPattern` reads them:
    "*", "*.example.net", "*@example.net", an address prefix, "dn:O=x,OU=y",
    "keyid:hex", or one exact identity.
    """

    name: str
    remote_ids: list[str]
    local_id: Identity
    psk: bytes = field(repr=False)
    ike_proposals: list[IkeAlgorithms] = field(default_factory=default_ike_proposals)
    esp_proposals: list[EspAlgorithms] = field(default_factory=default_esp_proposals)
    local_ts: list[str] = field(default_factory=lambda: ["0.0.0.0/0"])
    dns: list[str] = field(default_factory=list)
    # preference order; also the groups accepted for PFS in CREATE_CHILD_SA
    dh_groups: list[int] = field(default_factory=default_dh_groups)
    # how we prove who we are, and the methods we accept from the peer
    local_auth: str = "pre-share"
    remote_auth: list[str] = field(default_factory=lambda: ["pre-share"])
    credential: Credential | None = None
    trust: TrustStore | None = None
    # every rule must hold for the peer's end-entity certificate
    cert_map: list[CertRule] = field(default_factory=list)

    def __post_init__(self) -> None:
        assert self.local_auth in LOCAL_AUTH, f"Bad local auth {self.local_auth!r}"
        assert self.local_auth == "pre-share" or self.credential is not None, (
            f"Profile {self.name}: {self.local_auth} needs a credential"
        )
        for method in self.remote_auth:
            assert method in REMOTE_AUTH, f"Bad remote auth {method!r}"
            assert method == "pre-share" or self.trust is not None, (
                f"Profile {self.name}: {method} needs a trust store"
            )

    def accepts_signature(self, kind: str) -> bool:
        """Tell whether a peer signature by an "rsa" or "ecdsa" key is admitted."""
        return "pubkey" in self.remote_auth or f"{kind}-sig" in self.remote_auth

    def admits(self, identity: Identity, leaf: x509.Certificate | None = None) -> bool:
        """Tell whether the identity (and certificate, for a map) fits this profile."""
        return matching.admits(self, identity.type, identity.data, leaf)


AllocateAddress = Callable[[str, str], ipaddress.IPv4Address | None]
# (profile name, identity, session id): the pool follows the chosen profile
AllocateForProfile = Callable[[str, str, str], ipaddress.IPv4Address | None]
ReleaseAddress = Callable[[ipaddress.IPv4Address], None]


@dataclass
class ResponderConfig:
    """Everything the responder needs from the daemon around it."""

    profiles: list[Profile]
    allocate_address: AllocateAddress
    release_address: ReleaseAddress
    # wall clock (POSIX seconds) for certificate validity; injected for tests
    wall_clock: Callable[[], float] = time.time
    half_open_timeout: float = 30.0
    retransmit_timeout: float = 2.0
    retransmit_tries: int = 5
    # preferred over allocate_address when set (certificate maps need it)
    allocate_for_profile: AllocateForProfile | None = None
