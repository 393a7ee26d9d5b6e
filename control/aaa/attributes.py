"""RADIUS authorization attributes, mapped to one per-session policy.

Theory of operation: an Access-Accept (of EAP, or of a PSK or authorization
request) carries standard attributes (Framed-IP-Address, Framed-IP-Netmask,
Tunnel-Type, Tunnel-Medium-Type, Tunnel-Password) and Cisco `cisco-avpair`
strings of the form ``ipsec:NAME=VALUE`` or ``ip:interface-config=...``.
`parse_authorization` reads them into an `Authorization` whose fields carry
the same names as the local policy keys, so both sources merge field by
field. Each `ipsec:` pair has a parser in `AVPAIRS`: pairs we do not know are
counted and ignored, malformed ones are dropped with a warning naming the
pair (never its secret value). `Authorization.policy()` turns the result into
the core's `SessionPolicy` (what config mode and the CHILD SA use).

Per-session interface settings come as ``ip:interface-config`` lines (the
local policy key `interface_mtu` becomes the same line). We act on one,
``ip mtu N``: the MTU of the session's TUN, which `session_mtu` checks
against the session's address families when the TUN is opened. Any other
line is kept, counted as ignored and logged once per distinct text.

Routes (FlexVPN "route set" and "route accept"): the subnets pushed to the
client (INTERNAL_IP4/6_SUBNET, and what TSr is narrowed to) are the
route-set prefixes, then the permitted prefixes of the route-set access list,
then, for route-set interface, the headend's own inside address as a /32 (and
/128). Access lists and that address live in the daemon's config, so the
daemon registers them once with `configure_routes`; `policy()` resolves the
names through that registry, and a RADIUS ``route-set=access-list NAME`` that
names no registered list is a malformed pair. ``route-accept`` lets the
client announce its own networks in config mode; `policy()` passes the tag,
the distance (the kernel route's metric) and the networks an announcement may
not overlap (the address pools) on to the core.
"""

from __future__ import annotations

import collections
import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from control.ike.profiles import SessionPolicy

log = logging.getLogger("espgate.aaa")

IPv4 = ipaddress.IPv4Address
SECRET_FIELDS = ("ikev2_password_local", "ikev2_password_remote", "tunnel_password")
# session TUN MTU: RFC 791 (every IPv4 host takes 576-octet datagrams), RFC
# 8200 5 (IPv6 links carry at least 1280); 9000 fits the engine's buffers
MTU_MIN_IPV4 = 576
MTU_MIN_IPV6 = 1280
MTU_MAX = 9000
# seconds a session may live, as a profile's session_lifetime allows
SESSION_TIMEOUT = (120, 25_920_000)
# route-accept: tag and distance bounds, and the distance when none is given
# (the administrative distance of Cisco's IKEv2 routes)
ROUTE_TAG = (1, 497777)
ROUTE_DISTANCE = (1, 255)
ROUTE_DISTANCE_DEFAULT = 2
# distinct ignored interface-config lines logged so far (bounded)
_IGNORED_LOGGED: set[str] = set()
_IGNORED_LOG_MAX = 64


@dataclass
class Authorization:
    """What one AAA answer says about a session; None or empty means unset."""

    framed_ip_address: IPv4 | None = None
    framed_ip_netmask: IPv4 | None = None
    tunnel_type: int | None = None
    tunnel_medium_type: int | None = None
    tunnel_password: bytes | None = field(default=None, repr=False)
    addr_pool: str | None = None
    ipv6_addr_pool: str | None = None
    group_dhcp_server: IPv4 | None = None
    dhcp_giaddr: IPv4 | None = None
    dhcp_timeout: int | None = None
    dns_servers: list[IPv4] = field(default_factory=list)
    wins_servers: list[IPv4] = field(default_factory=list)
    ipv6_dns_servers_addr: list[ipaddress.IPv6Address] = field(default_factory=list)
    addrv6: ipaddress.IPv6Address | None = None
    prefix_len: int | None = None
    route_set_prefix: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = field(
        default_factory=list
    )
    route_set_interface: str | None = None
    route_set_access_list: str | None = None
    route_accept: str | None = None
    ipsec_flow_limit: int | None = None
    banner: str | None = None
    default_domain: str | None = None
    split_dns: list[str] = field(default_factory=list)
    ipsec_backup_gateway: list[str] = field(default_factory=list)
    pfs: bool | None = None
    include_local_lan: bool | None = None
    smartcard_removal_disconnect: bool | None = None
    configuration_url: str | None = None
    configuration_version: int | None = None
    interface_config: list[str] = field(default_factory=list)
    session_lifetime: int | None = None
    ikev2_password_local: bytes | None = field(default=None, repr=False)
    ikev2_password_remote: bytes | None = field(default=None, repr=False)
    unknown: int = 0
    malformed: int = 0
    ignored: int = 0

    def is_empty(self) -> bool:
        """Tell whether no attribute at all was set."""
        blank = Authorization()
        return all(
            getattr(self, f.name) == getattr(blank, f.name)
            for f in fields(self)
            if f.name not in COUNTERS
        )

    def policy(self) -> SessionPolicy:
        """Return the part the IKE core acts on (config mode, selectors)."""
        prefixes = self.routed()
        accept = (
            None
            if self.route_accept is None
            else route_accept_values(self.route_accept)
        )
        return SessionPolicy(
            address=self.framed_ip_address,
            netmask=self.framed_ip_netmask,
            dns=[str(a) for a in self.dns_servers + self.ipv6_dns_servers_addr],
            wins=[str(a) for a in self.wins_servers],
            local_ts=prefixes,
            pool=self.addr_pool,
            mtu=self.mtu(),
            pool6=self.ipv6_addr_pool,
            banner=self.banner,
            default_domain=self.default_domain,
            split_dns=list(self.split_dns),
            backup_gateways=list(self.ipsec_backup_gateway),
            pfs=self.pfs,
            include_local_lan=self.include_local_lan,
            smartcard_removal_disconnect=self.smartcard_removal_disconnect,
            configuration_url=self.configuration_url,
            configuration_version=self.configuration_version,
            session_lifetime=self.session_lifetime,
            dhcp_server=self.group_dhcp_server,
            dhcp_giaddr=self.dhcp_giaddr,
            dhcp_timeout=self.dhcp_timeout,
            flow_limit=self.ipsec_flow_limit,
            address6=self.address6(),
            route_accept=accept,
            route_accept_exclude=list(ROUTES.exclude) if accept else [],
        )

    def routed(self) -> list[str]:
        """Return the subnets route set pushes: prefixes, access list, interface."""
        nets: list[str] = [str(p) for p in self.route_set_prefix]
        if self.route_set_access_list is not None:
            acl = ROUTES.access_lists.get(self.route_set_access_list)
            if acl is None:
                log.warning("route-set access-list %.40r is not configured",
                            self.route_set_access_list)  # fmt: skip
            else:
                nets += [str(n) for n in acl]
        if self.route_set_interface is not None:
            nets += [str(ipaddress.ip_network(a)) for a in ROUTES.inside]
            if not ROUTES.inside:
                log.warning("route-set interface without [server] inside_address")
        return list(dict.fromkeys(nets))

    def address6(self) -> ipaddress.IPv6Interface | None:
        """Return addrv6 with prefix-len (128 when none is given), if any."""
        if self.addrv6 is None:
            return None
        return ipaddress.IPv6Interface(f"{self.addrv6}/{self.prefix_len or 128}")

    def mtu(self) -> int | None:
        """Return the MTU an "ip mtu N" interface-config line sets, if any."""
        for line in self.interface_config:
            mtu = _mtu_line(line)
            if mtu is not None:
                return mtu
        return None


COUNTERS = ("unknown", "malformed", "ignored")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass
class RouteRegistry:
    """What route set and route accept need from the daemon's config."""

    # access list name -> its permitted prefixes, in order
    access_lists: dict[str, list[Network]] = field(default_factory=dict)
    # the headend's inside addresses (route-set interface)
    inside: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = field(
        default_factory=list
    )
    # networks a client's announced route may not overlap (address pools)
    exclude: list[str] = field(default_factory=list)


ROUTES = RouteRegistry()


def configure_routes(
    access_lists: dict[str, list[Network]],
    inside: list[ipaddress.IPv4Address | ipaddress.IPv6Address],
    exclude: list[str],
) -> None:
    """Register the config's access lists, inside addresses and pool networks."""
    ROUTES.access_lists = dict(access_lists)
    ROUTES.inside = list(inside)
    ROUTES.exclude = list(exclude)


def route_accept_values(value: str) -> tuple[int | None, int]:
    """Return (tag or None, distance) of a route-accept value; ValueError if bad.

    The one grammar of RADIUS ``ipsec:route-accept`` and of a local policy's
    ``route_accept``: ``any [tag N] [distance N]``, keywords in any case and
    in either order, each at most once; ``any`` is required.
    """
    expected = f"expected 'any [tag N] [distance N]', got {value!r}"
    words = value.lower().split()
    if words[:1] != ["any"] or len(words) % 2 == 0:
        raise ValueError(expected)
    limits = {"tag": ROUTE_TAG, "distance": ROUTE_DISTANCE}
    given: dict[str, int] = {}
    for key, number in zip(words[1::2], words[2::2], strict=True):
        if key not in limits or not number.isdigit():
            raise ValueError(expected)
        if key in given:
            # a second one would silently win or lose
            raise ValueError(f"{key!r} given more than once in {value!r}")
        given[key] = _int_in(*limits[key])(number)
    return given.get("tag"), given.get("distance", ROUTE_DISTANCE_DEFAULT)


def _mtu_line(line: str) -> int | None:
    # "ip mtu N", the one interface-config line we act on
    words = line.split()
    if words[:2] == ["ip", "mtu"] and len(words) == 3 and words[2].isdigit():
        return int(words[2])
    return None


def session_mtu(requested: int | None, default: int, ipv6: bool) -> int:
    """Return the MTU for a session's TUN: `requested` if in bounds, else `default`.

    The lower bound is IPv6's when the session has an IPv6 inside address.
    """
    if requested is None:
        return default
    low = MTU_MIN_IPV6 if ipv6 else MTU_MIN_IPV4
    if not low <= requested <= MTU_MAX:
        log.warning("interface mtu %d out of range %d..%d, using %d",
                    requested, low, MTU_MAX, default)  # fmt: skip
        return default
    return requested


def _ipv4(value: str) -> IPv4:
    return IPv4(value.strip())


def _ipv4_list(value: str) -> list[IPv4]:
    return [IPv4(v) for v in value.replace(",", " ").split()]


def _ipv6_list(value: str) -> list[ipaddress.IPv6Address]:
    return [ipaddress.IPv6Address(v) for v in value.replace(",", " ").split()]


def _bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "enable"):
        return True
    if lowered in ("0", "false", "no", "disable"):
        return False
    raise ValueError(f"not a boolean: {value!r}")


def _int_in(low: int, high: int) -> Callable[[str], int]:
    def parse(value: str) -> int:
        number = int(value)
        if not low <= number <= high:
            raise ValueError(f"{number} out of range {low}..{high}")
        return number

    return parse


def _route_accept(value: str) -> str:
    # checked, and kept in one spelling: lowercase, single spaces
    route_accept_values(value)
    return " ".join(value.lower().split())


def _name(value: str) -> str:
    if not value or len(value) > 255 or any(c in value for c in "\0\n"):
        raise ValueError("empty or overlong")
    return value


# ipsec:NAME -> (field, parser, appends to a list field)
AVPAIRS: dict[str, tuple[str, Callable[[str], Any], bool]] = {
    "addr-pool": ("addr_pool", _name, False),
    "ipv6-addr-pool": ("ipv6_addr_pool", _name, False),
    "group-dhcp-server": ("group_dhcp_server", _ipv4, False),
    "dhcp-giaddr": ("dhcp_giaddr", _ipv4, False),
    "dhcp-timeout": ("dhcp_timeout", _int_in(1, 120), False),
    "dns-servers": ("dns_servers", _ipv4_list, False),
    "wins-servers": ("wins_servers", _ipv4_list, False),
    "ipv6-dns-servers-addr": ("ipv6_dns_servers_addr", _ipv6_list, False),
    "addrv6": ("addrv6", ipaddress.IPv6Address, False),
    "prefix-len": ("prefix_len", _int_in(1, 128), False),
    "route-accept": ("route_accept", _route_accept, False),
    "ipsec-flow-limit": ("ipsec_flow_limit", _int_in(0, 50000), False),
    "banner": ("banner", _name, False),
    "default-domain": ("default_domain", _name, False),
    "split-dns": ("split_dns", _name, True),
    "ipsec-backup-gateway": ("ipsec_backup_gateway", _name, True),
    "pfs": ("pfs", _bool, False),
    "include-local-lan": ("include_local_lan", _bool, False),
    "smartcard-removal-disconnect": ("smartcard_removal_disconnect", _bool, False),
    "configuration-url": ("configuration_url", _name, False),
    "configuration-version": ("configuration_version", _int_in(0, 2**31 - 1), False),
    "ikev2-password-local": ("ikev2_password_local", str.encode, False),
    "ikev2-password-remote": ("ikev2_password_remote", str.encode, False),
}
LIST_LIMITS = {"split_dns": 10, "ipsec_backup_gateway": 10}


def _route_set(auth: Authorization, value: str) -> None:
    # route-set=interface | prefix <net> | access-list <name>
    kind, _, rest = value.strip().partition(" ")
    if kind == "prefix":
        auth.route_set_prefix.append(ipaddress.ip_network(rest.strip()))
    elif kind == "interface":
        auth.route_set_interface = "interface"
    elif kind == "access-list":
        auth.route_set_access_list = _name(rest.strip())
    else:
        raise ValueError(f"unknown route-set kind {kind!r}")


def parse_authorization(
    attributes: dict[str, list[Any]],
    stats: collections.Counter[str] | None = None,
) -> Authorization:
    """Map RADIUS reply attributes by name to an `Authorization`."""
    auth = Authorization()
    for value in attributes.get("Framed-IP-Address", [])[:1]:
        auth.framed_ip_address = _ipv4(str(value))
    for value in attributes.get("Framed-IP-Netmask", [])[:1]:
        auth.framed_ip_netmask = _ipv4(str(value))
    for value in attributes.get("Tunnel-Type", [])[:1]:
        auth.tunnel_type = int(value[1] if isinstance(value, tuple) else value)
    for value in attributes.get("Tunnel-Medium-Type", [])[:1]:
        auth.tunnel_medium_type = int(value[1] if isinstance(value, tuple) else value)
    for value in attributes.get("Tunnel-Password", [])[:1]:
        auth.tunnel_password = value if isinstance(value, bytes) else None
    for value in attributes.get("Session-Timeout", [])[:1]:
        _session_timeout(auth, value)
    for pair in attributes.get("Cisco-AVPair", []):
        _avpair(auth, str(pair))
    if stats is not None:
        stats["avpair_unknown"] += auth.unknown
        stats["avpair_malformed"] += auth.malformed
        stats["interface_config_ignored"] += auth.ignored
    return auth


def apply_pair(auth: Authorization, name: str, value: str) -> None:
    """Set the field of one ipsec: pair NAME=VALUE; raise ValueError if bad."""
    if name == "route-set":
        _route_set(auth, value)
        return
    if name not in AVPAIRS:
        raise ValueError(f"unknown attribute {name!r}")
    attr, parse, append = AVPAIRS[name]
    parsed = parse(value)
    if append:
        items = getattr(auth, attr)
        if len(items) >= LIST_LIMITS.get(attr, 10):
            raise ValueError(f"more than {LIST_LIMITS.get(attr, 10)} values")
        items.append(parsed)
    else:
        setattr(auth, attr, parsed)


def merge(high: Authorization, low: Authorization) -> Authorization:
    """Return `high` with each unset field taken from `low` (per attribute)."""
    out = Authorization()
    blank = Authorization()
    for f in fields(Authorization):
        if f.name in COUNTERS:
            continue
        value = getattr(high, f.name)
        if value == getattr(blank, f.name):
            value = getattr(low, f.name)
        setattr(out, f.name, value)
    return out


def _avpair(auth: Authorization, pair: str) -> None:
    """Apply one cisco-avpair; count unknown ones, warn on malformed ones."""
    key, sep, value = pair.partition("=")
    if not sep:
        auth.malformed += 1
        log.warning("malformed cisco-avpair without '=': %.40s", key)
        return
    if key == "ip:interface-config":
        _interface_config(auth, value.strip())
        return
    family, _, name = key.partition(":")
    if family != "ipsec" or (name != "route-set" and name not in AVPAIRS):
        auth.unknown += 1
        return
    try:
        apply_pair(auth, name, value)
        acl = auth.route_set_access_list
        if name == "route-set" and acl is not None and acl not in ROUTES.access_lists:
            auth.route_set_access_list = None
            raise ValueError(f"unknown access-list {acl!r}")
    except ValueError as exc:
        auth.malformed += 1
        # the value of a password pair is a secret: name the pair only
        shown = "" if "password" in name else f": {exc}"
        log.warning("malformed cisco-avpair %s ignored%s", key, shown)


def _interface_config(auth: Authorization, line: str) -> None:
    """Keep one ip:interface-config line; check an MTU, count the others."""
    mtu = _mtu_line(line)
    if mtu is not None:
        # the IPv6 bound needs the session: session_mtu checks it at the TUN
        if not MTU_MIN_IPV4 <= mtu <= MTU_MAX:
            auth.malformed += 1
            log.warning("malformed ip:interface-config ignored: mtu %d out of "
                        "range %d..%d", mtu, MTU_MIN_IPV4, MTU_MAX)  # fmt: skip
            return
        auth.interface_config.append(line)
        return
    auth.interface_config.append(line)
    auth.ignored += 1
    if line not in _IGNORED_LOGGED and len(_IGNORED_LOGGED) < _IGNORED_LOG_MAX:
        _IGNORED_LOGGED.add(line)
        log.info("ip:interface-config %.60r not applied: only 'ip mtu N' is", line)


def _session_timeout(auth: Authorization, value: Any) -> None:
    # RFC 2865 5.27: the most seconds of service before the session ends
    low, high = SESSION_TIMEOUT
    try:
        seconds = int(value)
    except (TypeError, ValueError):
        seconds = -1
    if not low <= seconds <= high:
        auth.malformed += 1
        log.warning("Session-Timeout %.20s ignored: out of range %d..%d",
                    value, low, high)  # fmt: skip
        return
    auth.session_lifetime = seconds
