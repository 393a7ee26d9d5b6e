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
from control.ike.cookies import GuardConfig
from control.ike.fragments import DEFAULT_FRAGMENT_SIZE
from control.ike.matching import CertRule
from control.ike.messages import (
    CISCO_PRIVATE_DEFAULTS,
    DhGroup,
    EncrId,
    IDType,
    IntegId,
    PrfId,
)

ID_PREFIXES = ("fqdn", "email", "ipv4", "ipv6", "dn", "keyid")
LOCAL_AUTH = ("pre-share", "rsa-sig", "ecdsa-sig")
REMOTE_AUTH = ("pre-share", "rsa-sig", "ecdsa-sig", "pubkey", "eap")
CONFIG_MODES = ("request", "set", "both")


@dataclass(frozen=True)
class Identity:
    """An IKEv2 identity: ID type and identification data (RFC 7296 3.5)."""

    type: int  # an IDType, or an unknown type code from the peer
    data: bytes

    @classmethod
    def from_string(cls, text: str) -> Identity:
        """Parse "fqdn:", "email:", "ipv4:", "ipv6:", "dn:", "keyid:" text, or guess.

        "dn:" takes an RFC 4514 string ("CN=a,O=b"), "keyid:" hex. A value
        that does not fit its type raises ValueError naming the value and type.
        """
        kind, sep, rest = text.partition(":")
        if sep and kind == "dn":
            try:
                name = x509.Name.from_rfc4514_string(rest)
            except ValueError:
                name = x509.Name([])
            if rest and not name.rdns:
                raise ValueError(f"not an RFC 4514 DN like 'CN=a,O=b': {rest!r}")
            return cls(IDType.ID_DER_ASN1_DN, name.public_bytes())
        if sep and kind == "keyid":
            try:
                return cls(IDType.ID_KEY_ID, bytes.fromhex(rest))
            except ValueError:
                problem = f"expected hex digits in pairs, got {rest!r}"
                raise ValueError(problem) from None
        if sep and kind in ("fqdn", "email", "ipv4", "ipv6"):
            if kind == "fqdn":
                return cls(IDType.ID_FQDN, rest.encode())
            if kind == "email":
                return cls(IDType.ID_RFC822_ADDR, rest.encode())
            try:
                address = ipaddress.ip_address(rest)
            except ValueError:
                raise ValueError(f"not an IP address: {rest!r}") from None
            if kind != f"ipv{address.version}":
                raise ValueError(f"not an IPv{kind[3]} address: {rest!r}")
            if address.version == 4:
                return cls(IDType.ID_IPV4_ADDR, address.packed)
            return cls(IDType.ID_IPV6_ADDR, address.packed)
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


def windows_ike_proposals() -> list[IkeAlgorithms]:
    """Return the Windows built-in client's IKE sets: AES-CBC-256, SHA1 or SHA2-256.

    Off by default; a profile adds them (with DH groups 2 and 14) only when
    its `windows_proposals` is set, since SHA1 and MODP-1024 are weak.
    """
    return [
        IkeAlgorithms(EncrId.ENCR_AES_CBC, 256, integ, prf)
        for integ, prf in (
            (IntegId.AUTH_HMAC_SHA2_256_128, PrfId.PRF_HMAC_SHA2_256),
            (IntegId.AUTH_HMAC_SHA1_96, PrfId.PRF_HMAC_SHA1),
            (IntegId.AUTH_HMAC_SHA2_256_128, PrfId.PRF_HMAC_SHA1),
            (IntegId.AUTH_HMAC_SHA1_96, PrfId.PRF_HMAC_SHA2_256),
        )
    ]


WINDOWS_DH_GROUPS = [DhGroup.MODP_2048, DhGroup.MODP_1024]


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
    # seconds until we rekey an SA ourselves (less up to 10% jitter); None: never
    ike_rekey_time: float | None = 86400.0
    child_rekey_time: float | None = 28800.0
    # CHILD SAs per session, 0: no limit (control.ike.flows)
    flow_limit: int = 0
    # liveness check after this much silence, None: off; unanswered for
    # dpd_timeout seconds: the peer is gone (control.ike.liveness)
    dpd_delay: float | None = None
    dpd_timeout: float = 120.0
    # EAP (RFC 7296 2.16): ask for the EAP identity, seconds per client round
    eap_query_identity: bool = False
    eap_timeout: float = 30.0
    # PSKs from AAA (Tunnel-Password, ipsec:ikev2-password-local/-remote)
    aaa_psk: bool = False
    # ask AAA for the session's policy after authentication (AuthorizeTask)
    authorize: bool = False
    # no pool: IPv4 addresses come from DHCP through the daemon's relay
    dhcp: bool = False
    # seconds a session may live in all, across IKE rekeys; the headend
    # deletes it then; None: no limit
    session_lifetime: float | None = None
    # config mode (RFC 7296 3.15): "request" answers a CFG_REQUEST with a
    # CFG_REPLY; "set" pushes a CFG_SET in the IKE_AUTH response; "both"
    # answers a request and pushes without one
    config_mode: str = "request"
    # numbers of the unverified Cisco private attributes, overriding
    # messages.CISCO_PRIVATE_DEFAULTS by field name
    cisco_attributes: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        assert self.config_mode in CONFIG_MODES, f"Bad config mode {self.config_mode!r}"
        for name in self.cisco_attributes:
            assert name in CISCO_PRIVATE_DEFAULTS, f"Bad Cisco attribute {name!r}"
        assert self.local_auth in LOCAL_AUTH, f"Bad local auth {self.local_auth!r}"
        assert self.local_auth == "pre-share" or self.credential is not None, (
            f"Profile {self.name}: {self.local_auth} needs a credential"
        )
        for method in self.remote_auth:
            assert method in REMOTE_AUTH, f"Bad remote auth {method!r}"
            assert method in ("pre-share", "eap") or self.trust is not None, (
                f"Profile {self.name}: {method} needs a trust store"
            )

        # RFC 7296 2.16: with EAP the responder authenticates by signature
        assert "eap" not in self.remote_auth or self.local_auth != "pre-share", (
            f"Profile {self.name}: eap needs a certificate on our side"
        )

    def accepts_signature(self, kind: str) -> bool:
        """Tell whether a peer signature by an "rsa" or "ecdsa" key is admitted."""
        return "pubkey" in self.remote_auth or f"{kind}-sig" in self.remote_auth

    def admits(self, identity: Identity, leaf: x509.Certificate | None = None) -> bool:
        """Tell whether the identity (and certificate, for a map) fits this profile."""
        return matching.admits(self, identity.type, identity.data, leaf)

    def cisco_attribute(self, name: str) -> int:
        """Return the attribute number this profile sends a Cisco private field as."""
        return self.cisco_attributes.get(name, CISCO_PRIVATE_DEFAULTS[name])


@dataclass
class SessionPolicy:
    """Per-session settings from authorization (RADIUS), over the profile's.

    address: the client's address (Framed-IP-Address), taken before any pool;
    dns/wins: servers for config mode; local_ts: the subnets routed to the
    client (route-set prefixes, access list and interface); pool: a pool name
    chosen by authorization.
    """

    address: ipaddress.IPv4Address | None = None
    netmask: ipaddress.IPv4Address | None = None
    dns: list[str] = field(default_factory=list)
    wins: list[str] = field(default_factory=list)
    local_ts: list[str] = field(default_factory=list)
    pool: str | None = None
    mtu: int | None = None
    pool6: str | None = None
    # Cisco Unity attributes (to Unity and FlexVPN clients only)
    banner: str | None = None
    default_domain: str | None = None
    split_dns: list[str] = field(default_factory=list)
    backup_gateways: list[str] = field(default_factory=list)
    pfs: bool | None = None
    include_local_lan: bool | None = None
    smartcard_removal_disconnect: bool | None = None
    # FlexVPN only
    configuration_url: str | None = None
    configuration_version: int | None = None
    # seconds, overrides Profile.session_lifetime for this session
    session_lifetime: int | None = None
    # DHCP server (and giaddr, timeout) for this session's IPv4 address
    dhcp_server: ipaddress.IPv4Address | None = None
    dhcp_giaddr: ipaddress.IPv4Address | None = None
    dhcp_timeout: int | None = None
    # IPsec SAs this session may hold (0 = no limit); overrides Profile.flow_limit
    flow_limit: int | None = None
    # the client's IPv6 address and prefix (ipsec:addrv6 / prefix-len), before any
    # IPv6 pool, as Framed-IP-Address is for IPv4
    address6: ipaddress.IPv6Interface | None = None
    # route accept: (tag or None, distance); None: a client's announced
    # networks are ignored. Announcements may not overlap route_accept_exclude
    # (the address pools) nor local_ts; accepted_routes are the ones taken
    route_accept: tuple[int | None, int] | None = None
    route_accept_exclude: list[str] = field(default_factory=list)
    accepted_routes: list[str] = field(default_factory=list)


AllocateAddress = Callable[[str, str], ipaddress.IPv4Address | None]
# (profile name, identity, session id): for identities no pattern admits,
# such as the User-Name an EAP exchange ends with
AllocateInProfile = Callable[[str, str, str], ipaddress.IPv4Address | None]
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
    # RFC 7383: the largest IP datagram we send an IKE fragment in; 0: we
    # neither announce nor use fragmentation
    fragment_size: int = DEFAULT_FRAGMENT_SIZE
    retransmit_timeout: float = 2.0
    retransmit_tries: int = 5
    # cookie threshold and half-open limit per source (RFC 7296 2.6)
    guard: GuardConfig = field(default_factory=GuardConfig)
    # inbound ESP packets counted on a CHILD SA's inbound SPI (liveness)
    inbound_packets: Callable[[int], int] | None = None
    allocate_in_profile: AllocateInProfile | None = None
    # (pool name, session id): a pool chosen by authorization (addr-pool)
    allocate_from_pool: AllocateAddress | None = None
    # (profile name, IPv6 pool chosen by authorization or None, session id)
    allocate_address6: (
        Callable[[str, str | None, str], ipaddress.IPv6Interface | None] | None
    ) = None
