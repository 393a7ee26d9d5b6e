"""Daemon configuration: TOML in, checked dataclasses out.

The file is parsed with :mod:`tomllib`, then every field is checked by a small
typed reader that knows where it is in the file.  tomllib keeps no positions,
so :func:`_index_lines` scans the text once and maps each table and key path
to its line; a :class:`ConfigError` then reads ``file:line: field: problem``,
for example ``espgate.toml:21: profiles[0].pool: unknown pool 'office'``.

Layout::

    [server]            listen address, ports, control socket, log level
    [engine]            crypto backend, batch size, TUN MTU, ESP engine mode
    [pools.NAME]        range = "first-last" or a prefix
    [[profiles]]        identities matched, certificate map, local identity,
                        PSK, pool,
                        DNS, local traffic selectors, ESP proposals,
                        local/remote auth methods, certificate, key, CAs, CRLs,
                        EAP (query identity, round timeout, RADIUS group)
    [radius.NAME]       a RADIUS server group: timeout, retransmit,
                        NAS-Identifier, [[radius.NAME.servers]] in
                        failover order (address, port, secret)
    [policies.NAME]     a local authorization policy: the FlexVPN policy
                        fields, named as the cisco-avpair ipsec: attributes
                        (see POLICY_KEYS); ranges are checked here
    [access_lists.NAME] a standard access list: ordered "permit PREFIX" /
                        "deny PREFIX" entries (IPv4 source prefixes), for a
                        policy's route_set_access_list

Certificate, key, CA and CRL files are loaded while checking, so a bad file
is reported at its field; relative paths are taken from the config file's
directory.

Checks across tables run once every table is read: the headend's inside
addresses lie outside every pool, a policy's access list permits something
(an unused one that permits nothing is only logged as a warning), and a
RADIUS group used for authorization has its user_password written down.

Secrets (``psk``, ``secret``, ``user_password``) are kept out of ``repr`` so
a logged config shows none, and an error about one names only the type of
the wrong value. Errors are written in our words: a parser's exception text
is not passed on. :func:`describe` is the summary check-config prints.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from control.aaa.attributes import Authorization, apply_pair
from control.aaa.mangle import parse_mangler, usability_problem
from control.ike import certs
from control.ike.matching import ATTRIBUTE_OIDS, CERT_FIELDS, CERT_OPS, IdentityPattern
from control.ike.messages import (
    CISCO_PRIVATE_DEFAULTS,
    PRIVATE_ATTRIBUTES,
    CfgAttribute,
)
from control.ike.profiles import Identity

log = logging.getLogger("espgate.config")

DEFAULT_NAME = "default.toml"
ESP_PROPOSALS = ("aes128gcm16", "aes256gcm16")
CRYPTO_BACKENDS = ("ipsec-mb", "openssl")
# inline: the engine in the daemon; process: control/dataplane.py, durable seqs
DATAPLANES = ("inline", "process")
LOG_LEVELS = ("debug", "info", "warning", "error")
AUTH_METHODS = ("psk",)
LOCAL_AUTH = ("pre-share", "rsa-sig", "ecdsa-sig")
REMOTE_AUTH = ("pre-share", "rsa-sig", "ecdsa-sig", "pubkey", "eap")
IDENTITY_TYPES = ("fqdn", "email", "ipv4", "ipv6", "dn", "keyid")
# seconds; short values are for tests, the upper bound is 300 days
REKEY_TIME = (5, 25_920_000)
# octets through a CHILD SA (either direction) before the headend rekeys it:
# 64 KiB .. 1 PiB (0 = off); small values are for tests
CHILD_REKEY_BYTES = (65_536, 1 << 50)
# seconds a session may live: 2 minutes .. 300 days (0 = no limit)
SESSION_LIFETIME = (120, 25_920_000)
# upper bound of the half-open limits in [server]
HALF_OPEN_MAX = 1_000_000
# CHILD SAs per session (0 = no limit); liveness delays in seconds
FLOW_LIMIT = (0, 50_000)
DPD_DELAY = (1, 86_400)
# RFC 7383 fragment size, a whole IP datagram: the IPv4 minimum .. IP's maximum
FRAGMENT_SIZE = (576, 65535)
ENGINE_MODES = ("userspace", "kernel", "auto")

PathKey = tuple[str | int, ...]

# [policies.NAME] keys: (ipsec: attribute, TOML type, how many values; 0 = one)
POLICY_KEYS: dict[str, tuple[str, Any, int]] = {
    "addr_pool": ("addr-pool", str, 0),
    "ipv6_addr_pool": ("ipv6-addr-pool", str, 0),
    "dhcp_server": ("group-dhcp-server", str, 0),
    "dhcp_giaddr": ("dhcp-giaddr", str, 0),
    "dhcp_timeout": ("dhcp-timeout", int, 0),
    "dns_servers": ("dns-servers", list, 2),  # primary, secondary
    "ipv6_dns_servers": ("ipv6-dns-servers-addr", list, 2),
    "wins_servers": ("wins-servers", list, 2),
    "netmask": ("netmask", str, 0),
    "banner": ("banner", str, 0),
    "configuration_url": ("configuration-url", str, 0),
    "configuration_version": ("configuration-version", int, 0),
    "default_domain": ("default-domain", str, 0),
    "split_dns": ("split-dns", list, 10),
    "backup_gateways": ("ipsec-backup-gateway", list, 10),
    "include_local_lan": ("include-local-lan", bool, 0),
    "pfs": ("pfs", bool, 0),
    "ipsec_flow_limit": ("ipsec-flow-limit", int, 0),
    "route_set_interface": ("route-set", bool, 0),
    "route_set_access_list": ("route-set", str, 0),
    "route_set_prefix": ("route-set", list, 50),
    "route_accept": ("route-accept", str, 0),
    "session_lifetime": ("session-lifetime", int, 0),
    "smartcard_removal_disconnect": ("smartcard-removal-disconnect", bool, 0),
    "interface_mtu": ("interface-config", int, 0),
}
# what each file field should hold, for errors
FILE_KINDS = {
    "ca": "a PEM certificate file",
    "crl": "a PEM or DER CRL",
    "certificate": "a PEM certificate file",
    "private_key": "a PEM RSA or EC private key",
}
# policy keys that hold addresses, and their IP version
POLICY_ADDRESSES = {
    "dhcp_server": 4, "dhcp_giaddr": 4, "dns_servers": 4, "wins_servers": 4,
    "netmask": 4, "ipv6_dns_servers": 6,
}  # fmt: skip
AUTHZ_SOURCES = ("local", "radius")
# access lists: entries per list, and the permitted prefixes it may push
ACL_ENTRIES = 100
ACL_PREFIXES = 50
# RFC 7296 3.15: how config mode runs per profile
CONFIG_MODES = ("request", "set", "both")


class ConfigError(ValueError):
    """A configuration problem, located by file, line and field."""

    def __init__(self, source: str, line: int | None, fieldname: str, problem: str):
        self.source = source
        self.line = line
        self.fieldname = fieldname
        self.problem = problem
        where = f"{source}:{line}" if line else source
        super().__init__(f"{where}: {fieldname}: {problem}")


@dataclass(frozen=True)
class ServerConfig:
    listen: str = "0.0.0.0"
    ike_port: int = 500
    natt_port: int = 4500
    control_socket: str = "/run/espgate/control.sock"
    log_level: str = "info"
    # durable state: sequence-number reservations, leases (SQLite)
    state_dir: str = "/var/lib/espgate"
    # RFC 7296 2.6: half-open IKE SAs from which on cookies are demanded
    # (0: always), and how many one source address may hold (0: no limit)
    cookie_threshold: int = 50
    half_open_per_source: int = 10
    # RFC 7383: largest IP datagram of an IKE fragment we send; 0 = no
    # fragmentation (neither announced nor used)
    fragment_size: int = 1280
    # the headend's own address(es) on the inside network: what a policy's
    # route_set_interface pushes to the client as a /32 (/128)
    inside_address: str | None = None
    inside_address6: str | None = None


@dataclass(frozen=True)
class EngineConfig:
    crypto: str = "ipsec-mb"
    batch: int = 64
    tun_mtu: int = 1400
    dataplane: str = "process"
    mode: str = "userspace"
    # RFC 4303 3.4.3 anti-replay window of inbound SAs, packets
    replay_window: int = 1024


@dataclass(frozen=True)
class PoolConfig:
    """An IPv4 range, or an IPv6 prefix cut into client prefixes.

    For IPv6, first and last are the first addresses of the first and last
    client prefix of `client_prefix` bits; with /128 clients the first is
    one above the prefix's all-zero (subnet-router anycast) address.
    `network` is the prefix the pool was given as (None for an IPv4 range).
    """

    name: str
    first: ipaddress.IPv4Address | ipaddress.IPv6Address
    last: ipaddress.IPv4Address | ipaddress.IPv6Address
    client_prefix: int = 32
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None

    @property
    def size(self) -> int:
        step = 1 << (self.first.max_prefixlen - self.client_prefix)
        return (int(self.last) - int(self.first)) // step + 1


@dataclass(frozen=True)
class ProfileConfig:
    name: str
    match_identity: tuple[str, ...]
    local_identity: str
    auth: str
    psk: bytes = field(repr=False)
    pool: str | None
    dns: tuple[str, ...]
    local_ts: tuple[str, ...]
    esp: tuple[str, ...]
    local_auth: str = "pre-share"
    remote_auth: tuple[str, ...] = ("pre-share",)
    certificate: str | None = None
    private_key: str | None = None
    ca: tuple[str, ...] = ()
    crl: tuple[str, ...] = ()
    # (field, op, value) rules that must all hold for the peer's certificate
    match_certificate: tuple[tuple[str, str, str], ...] = ()
    # seconds until the headend rekeys an SA itself; 0 = never
    ike_rekey_time: int = 86400
    child_rekey_time: int = 28800
    # octets through a CHILD SA in one direction until the headend rekeys it;
    # 0 = never (RFC 4301 section 4.4.2.1, byte lifetime)
    child_rekey_bytes: int = 0
    # seconds until the headend deletes the session, across rekeys; 0 = never
    session_lifetime: int = 0
    # add the Windows client's IKE proposals (AES-CBC-256, SHA1/SHA2, DH 2/14)
    windows_proposals: bool = False
    # CHILD SAs per session; 0 = no limit
    flow_limit: int = 0
    # liveness check after this much silence (0 = off); teardown when
    # unanswered for dpd_timeout
    dpd_delay: int = 30
    dpd_timeout: int = 120
    eap_query_identity: bool = False
    eap_timeout: int = 30
    aaa_authentication: str | None = None
    aaa_psk: str | None = None
    # authorization: "local" or "radius:GROUP" for the user; "local:POLICY"
    # or "radius:GROUP" for the group (named by authorization_group_name)
    authorization_user: str | None = None
    authorization_username: str | None = None
    name_mangler: str | None = None
    authorization_group: str | None = None
    authorization_group_name: str | None = None
    authorization_group_override: bool = False
    authorization_cached: bool = True
    ipv6_pool: str | None = None
    # DHCP through our relay, used only when the profile has no pool
    dhcp_server: str | None = None
    dhcp_giaddr: str | None = None
    dhcp_timeout: int = 5
    # "request" (CFG_REQUEST/CFG_REPLY), "set" (CFG_SET/CFG_ACK) or "both"
    config_mode: str = "request"
    engine: str | None = None  # None: [engine] mode
    # numbers of the unverified Cisco private attributes (name, number),
    # overriding the defaults 28683..28685; 16384..32767 (RFC 7296 3.15.1)
    cisco_attributes: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class RadiusServerConfig:
    address: str
    port: int
    secret: bytes = field(repr=False)


@dataclass(frozen=True)
class RadiusGroupConfig:
    name: str
    servers: tuple[RadiusServerConfig, ...]
    timeout: float = 2.0
    retransmit: int = 2
    nas_identifier: str = "espgate"
    # User-Password of requests that fetch PSKs or authorization
    user_password: str = field(default="espgate", repr=False)


@dataclass(frozen=True)
class Config:
    source: str
    server: ServerConfig
    engine: EngineConfig
    pools: dict[str, PoolConfig]
    profiles: tuple[ProfileConfig, ...]
    radius: dict[str, RadiusGroupConfig] = field(default_factory=dict)
    policies: dict[str, Authorization] = field(default_factory=dict)
    # access list name -> its permitted prefixes, in entry order
    access_lists: dict[str, tuple[ipaddress.IPv4Network, ...]] = field(
        default_factory=dict
    )


def default_text() -> str:
    """Return the text of the embedded default configuration."""
    return (resources.files("control") / "defaults" / DEFAULT_NAME).read_text()


def load(path: str | Path | None = None) -> Config:
    """Load and check a configuration file, or the embedded default."""
    if path is None:
        return parse(default_text(), f"<embedded {DEFAULT_NAME}>")
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(str(path), None, "file", exc.strerror or str(exc)) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(str(path), None, "file", f"not UTF-8 text: {exc.reason} "
                          f"at byte {exc.start}") from None
    return parse(text, str(path))


def parse(text: str, source: str) -> Config:
    """Parse configuration text; ``source`` names it in errors."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        match = re.search(r"at line (\d+)", str(exc))
        line = int(match.group(1)) if match else None
        raise ConfigError(source, line, "syntax", str(exc)) from None
    reader = _Reader(source, _index_lines(text))
    return reader.config(data)


def identity_problem(text: str) -> str | None:
    """Say what is wrong with a ``type:value`` identity, or None."""
    _, sep, value = text.partition(":")
    if not value.strip() and (sep or not text.strip()):
        return "empty identity"
    try:
        Identity.from_string(text)
    except ValueError as exc:
        # from_string names the value and what it should have been
        return str(exc)
    return None


def _pattern_problem(text: str) -> str | None:
    # typed exact values first, so the message names the type, not a parser
    kind, sep, value = text.partition(":")
    if sep and kind in ("keyid", "ipv4", "ipv6") and "/" not in value:
        if not value:
            return "empty identity"
        try:
            Identity.from_string(text)
        except ValueError as exc:
            return str(exc)
    try:
        IdentityPattern.parse(text)
    except ValueError as exc:
        if sep and kind in ("ipv4", "ipv6") or "/" in text:
            return f"not an IP{kind[2:] if sep else ''} address or prefix"
        # matching's own messages name the DN part or domain at fault
        return str(exc)
    return None


def _file_problem(path: str, exc: Exception, kind: str) -> str:
    # the OS's reason, or what the file should have held; never the parser's
    # words, which can quote the file (a key)
    if isinstance(exc, OSError):
        return f"{path}: {(exc.strerror or 'cannot read').lower()}"
    if isinstance(exc, TypeError):
        return f"{path}: an encrypted key; only unencrypted keys are supported"
    return f"{path}: not {kind}"


def _policy_value_problem(key: str, values: list[Any]) -> str | None:
    # what the attribute parsers would say in Python's words, said in ours
    version = POLICY_ADDRESSES.get(key)
    for value in values if version or key == "route_set_prefix" else ():
        try:
            if key == "route_set_prefix":
                ipaddress.ip_network(value)
            elif ipaddress.ip_address(value).version != version:
                return f"not an IPv{version} address: {value!r}"
        except ValueError:
            if key != "route_set_prefix":
                return f"not an IP address: {value!r}"
            try:
                net = ipaddress.ip_network(value, strict=False)
            except ValueError:
                return f"not an IP prefix: {value!r}"
            return f"{value!r} has host bits set; the prefix is {net}"
    if key == "netmask":
        # RFC 7296 3.15.1: INTERNAL_IP4_NETMASK, a contiguous mask
        inverse = ~int(ipaddress.IPv4Address(values[0])) & 0xFFFFFFFF
        if inverse == 0xFFFFFFFF:
            return "0.0.0.0 is not a netmask a client can use"
        if inverse & (inverse + 1):
            return f"not a contiguous netmask: {values[0]!r}"
    return None


def listen_problem(listen: str) -> str | None:
    """Say what is wrong with a listen address, or None."""
    try:
        address = ipaddress.ip_address(listen)
    except ValueError:
        return f"not an IP address: {listen!r}"
    if address.version != 4:
        return f"only IPv4 listen addresses are supported, not {listen!r}"
    return None


def socket_problem(path: str) -> str | None:
    """Say what is wrong with a control socket path, or None."""
    if not path.startswith("/"):
        return f"not an absolute path: {path!r}"
    if len(path.encode()) > 107:
        return "longer than the 107 bytes a Unix socket path may have"
    return None


def describe(config: Config) -> str:
    """Return the check-config summary: server, pools, AAA, then each profile.

    Secrets never appear: RADIUS servers are shown by address and port only.
    """
    lines = [f"{config.source}: ok"]
    server = config.server
    state = server.state_dir or "none (leases in memory)"
    lines.append(f"  server: listen {server.listen} ports {server.ike_port}/"
                 f"{server.natt_port}, control socket {server.control_socket}, "
                 f"state directory {state}")  # fmt: skip
    inside = [x for x in (server.inside_address, server.inside_address6) if x]
    lines.append(f"  inside address: {', '.join(inside) or 'none'}")
    engine = config.engine
    lines.append(f"  engine: {engine.mode}, crypto {engine.crypto}, dataplane "
                 f"{engine.dataplane}")  # fmt: skip
    for pool in config.pools.values():
        if pool.first.version == 4:
            size = f"{pool.size} addresses"
        else:
            size = f"{pool.size} /{pool.client_prefix} prefixes"
        lines.append(f"  pool {pool.name}: {pool.first} - {pool.last} ({size})")
    for group in config.radius.values():
        servers = ", ".join(f"{s.address}:{s.port}" for s in group.servers)
        lines.append(f"  radius {group.name}: servers {servers}; timeout "
                     f"{group.timeout:g} s, retransmit {group.retransmit}, "
                     f"nas-identifier {group.nas_identifier}")  # fmt: skip
    for name, permitted in config.access_lists.items():
        nets = ", ".join(str(net) for net in permitted) or "nothing"
        lines.append(f"  access list {name}: permits {nets}")
    for name, policy in config.policies.items():
        lines.append(f"  policy {name}: {'; '.join(_policy_summary(policy))}")
    for prof in config.profiles:
        summary = "; ".join(_profile_summary(config, prof))
        lines.append(f"  profile {prof.name}: {summary}")
    return "\n".join(lines)


def _policy_summary(policy: Authorization) -> list[str]:
    # pools, then the routes the policy pushes and accepts
    pools = [x for x in (policy.addr_pool, policy.ipv6_addr_pool) if x]
    out = [f"pool {', '.join(pools) or 'none'}"]
    routes = [str(net) for net in policy.route_set_prefix]
    if policy.route_set_access_list:
        routes.append(f"access list {policy.route_set_access_list}")
    if policy.route_set_interface:
        routes.append("interface")
    if routes:
        out.append(f"route set {', '.join(routes)}")
    if policy.route_accept:
        out.append(f"route accept {policy.route_accept}")
    return out


def _profile_summary(config: Config, prof: ProfileConfig) -> list[str]:
    # auth as configured: our method, then the peer's, with their sources
    remote = "/".join(prof.remote_auth)
    if prof.aaa_psk:
        remote += f" (PSK from radius:{prof.aaa_psk})"
    if "eap" in prof.remote_auth:
        remote += f" (EAP via radius:{prof.aaa_authentication})"
    # where addresses come from: pools, else DHCP, else authorization
    if prof.pool or prof.ipv6_pool:
        addresses = "pool " + ", ".join(x for x in (prof.pool, prof.ipv6_pool) if x)
    elif prof.dhcp_server:
        addresses = f"dhcp {prof.dhcp_server} via {prof.dhcp_giaddr}"
    elif prof.authorization_user or prof.authorization_group:
        addresses = "from authorization"
    else:
        addresses = "none"
    # Cisco private attribute numbers, only where they differ from the defaults
    numbers = ", ".join(f"{name} {number}" for name, number in prof.cisco_attributes)
    cisco = [f"cisco attributes {numbers}"] if numbers else []
    authz = [
        f"{key} {value}"
        for key, value in (
            ("user", prof.authorization_user),
            ("group", prof.authorization_group),
            ("name", prof.name_mangler),
        )
        if value
    ]
    return [
        f"match {', '.join(prof.match_identity)}",
        f"auth local {prof.local_auth}, remote {remote}",
        f"addresses {addresses}",
        f"authorization {' '.join(authz) if authz else 'none'}",
        f"esp {', '.join(prof.esp)}",
        f"config mode {prof.config_mode}",
        *cisco,
        f"engine {prof.engine or config.engine.mode}",
    ]


def replace_server(config: Config, **changes: Any) -> Config:
    """Return ``config`` with some ``[server]`` fields changed (and checked)."""
    for key, check in (("listen", listen_problem), ("control_socket", socket_problem)):
        if key in changes and (problem := check(changes[key])):
            raise ConfigError("command line", None, f"--{key.replace('_', '-')}",
                              problem)
    server = dataclasses.replace(config.server, **changes)
    return dataclasses.replace(config, server=server)


def _index_lines(text: str) -> dict[PathKey, int]:
    """Map table and key paths to 1-based line numbers."""
    lines: dict[PathKey, int] = {}
    table: PathKey = ()
    counts: dict[PathKey, int] = {}
    header = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
    keyline = re.compile(r"^\s*([A-Za-z0-9_\-\"\.]+)\s*=")
    for number, raw in enumerate(text.splitlines(), start=1):
        if m := header.match(raw):
            parts: PathKey = tuple(p.strip().strip('"') for p in m.group(2).split("."))
            if m.group(1) == "[[":
                index = counts.get(parts, 0)
                counts[parts] = index + 1
                parts = (*parts, index)
            table = parts
            lines.setdefault(table, number)
        elif m := keyline.match(raw):
            key = tuple(p.strip('"') for p in m.group(1).split("."))
            lines.setdefault((*table, *key), number)
    return lines


def _show(path: PathKey, value: Any) -> str:
    """Describe a wrong value for an error without echoing secrets or tables."""
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "a list"
    if _is_secret(path):
        return type(value).__name__
    return repr(value)


def _is_secret(path: PathKey) -> bool:
    # psk, secret, user_password, any *_password or *_secret: never echoed
    return any(
        isinstance(part, str) and (part in SECRET_FIELDS or part.endswith(SECRET_ENDS))
        for part in path
    )


def _dotted(path: PathKey) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


class _Reader:
    """Typed field readers that raise located :class:`ConfigError`s."""

    def __init__(self, source: str, lines: dict[PathKey, int]):
        self.source = source
        self.lines = lines
        # radius groups whose user_password is in the file, not the default
        self.passwords: set[str] = set()

    def error(self, path: PathKey, problem: str) -> ConfigError:
        line = None
        for end in range(len(path), 0, -1):
            if path[:end] in self.lines:
                line = self.lines[path[:end]]
                break
        return ConfigError(self.source, line, _dotted(path), problem)

    def table(self, data: dict[str, Any], path: PathKey, known: set[str]) -> None:
        for key in data:
            if key not in known:
                raise self.error((*path, key), "unknown field")

    def get(self, data: dict[str, Any], path: PathKey, kind: Any, default: Any) -> Any:
        key = path[-1]
        assert isinstance(key, str), "field paths end in a key"
        if key not in data:
            if default is _REQUIRED:
                raise self.error(path, "missing")
            return default
        value = data[key]
        if kind is int and isinstance(value, bool) or not isinstance(value, kind):
            name = getattr(kind, "__name__", "number")
            raise self.error(path, f"expected {name}, got {_show(path, value)}")
        return value

    def choice(
        self,
        data: dict[str, Any],
        path: PathKey,
        options: tuple[str, ...],
        default: Any,
    ) -> str:
        value = self.get(data, path, str, default)
        if value not in options:
            raise self.error(path, f"{value!r} is not one of {', '.join(options)}")
        return str(value)

    def port(self, data: dict[str, Any], path: PathKey, default: int) -> int:
        value = int(self.get(data, path, int, default))
        if not 1 <= value <= 65535:
            raise self.error(path, f"port {value} out of range 1..65535")
        return value

    def count(self, data: dict[str, Any], path: PathKey, default: int) -> int:
        value = int(self.get(data, path, int, default))
        if not 0 <= value <= HALF_OPEN_MAX:
            raise self.error(path, f"{value} is not 0..{HALF_OPEN_MAX}")
        return value

    def fragment_size(self, data: dict[str, Any], path: PathKey) -> int:
        value = int(self.get(data, path, int, ServerConfig.fragment_size))
        low, high = FRAGMENT_SIZE
        if value != 0 and not low <= value <= high:
            raise self.error(path, f"{value} is not 0 or {low}..{high}")
        return value

    def strings(self, data: dict[str, Any], path: PathKey, default: Any) -> list[str]:
        value = self.get(data, path, list, default)
        for item in value:
            if not isinstance(item, str):
                raise self.error(path, f"expected a list of strings, got {item!r}")
        return list(value)

    def config(self, data: dict[str, Any]) -> Config:
        known = {
            "server", "engine", "pools", "profiles", "radius", "policies",
            "access_lists",
        }  # fmt: skip
        self.table(data, (), known)
        acl_data = self.get(data, ("access_lists",), dict, {})
        access_lists = {
            name: self.access_list(
                name, self.get(acl_data, ("access_lists", name), dict, None)
            )
            for name in acl_data
        }
        policies_data = self.get(data, ("policies",), dict, {})
        policies = {
            name: self.policy(
                name, self.get(policies_data, ("policies", name), dict, None)
            )
            for name in policies_data
        }
        server = self.server(self.get(data, ("server",), dict, {}))
        for name, policy in policies.items():
            self.check_routes(name, policy, access_lists, server)
        radius_data = self.get(data, ("radius",), dict, {})
        radius = {
            name: self.radius(name, self.get(radius_data, ("radius", name), dict, None))
            for name in radius_data
        }
        engine = self.engine(self.get(data, ("engine",), dict, {}))
        pools_data = self.get(data, ("pools",), dict, {})
        pools = {
            name: self.pool(name, self.get(pools_data, ("pools", name), dict, None))
            for name in pools_data
        }
        seen: list[PoolConfig] = []
        for pool in pools.values():
            for other in seen:
                if pool.first.version != other.first.version:
                    continue
                lo, hi = int(pool.first), int(pool.last)
                if lo <= int(other.last) and int(other.first) <= hi:
                    raise self.error(
                        ("pools", pool.name, "range"), f"overlaps pool {other.name!r}"
                    )
            seen.append(pool)
        self.check_inside(server, pools)
        for name, policy in policies.items():
            self.check_policy_pools(name, policy, pools)
        self.warn_empty_access_lists(access_lists, policies)
        profiles_data = self.get(data, ("profiles",), list, _REQUIRED)
        if not profiles_data:
            raise self.error(("profiles",), "at least one profile is needed")
        profiles = []
        for index, item in enumerate(profiles_data):
            if not isinstance(item, dict):
                raise self.error(("profiles", index), "expected a table")
            profiles.append(self.profile(index, item, pools))
            for key in ("aaa_authentication", "aaa_psk"):
                group = getattr(profiles[-1], key)
                if group is not None and group not in radius:
                    path = ("profiles", index, key)
                    raise self.error(path, f"unknown radius group {group!r}")
            self.check_authorization(index, profiles[-1], radius, policies)
        names = [p.name for p in profiles]
        for index, name in enumerate(names):
            if names.index(name) != index:
                raise self.error(("profiles", index, "name"), f"duplicate {name!r}")
        return Config(
            self.source, server, engine, pools, tuple(profiles), radius, policies,
            access_lists,
        )  # fmt: skip

    def access_list(
        self, name: str, data: dict[str, Any]
    ) -> tuple[ipaddress.IPv4Network, ...]:
        """Read one standard access list; return its permitted prefixes.

        Entries are matched in order, first match wins, as in a standard ACL:
        the part of a permit entry that an earlier entry covers is not pushed.
        """
        p: PathKey = ("access_lists", name)
        self.table(data, p, {"entries"})
        entries = self.strings(data, (*p, "entries"), _REQUIRED)
        if not 1 <= len(entries) <= ACL_ENTRIES:
            raise self.error((*p, "entries"), f"expected 1..{ACL_ENTRIES} entries")
        earlier: list[ipaddress.IPv4Network] = []
        permitted: list[ipaddress.IPv4Network] = []
        for index, text in enumerate(entries):
            try:
                action, net = acl_entry(text)
            except ValueError as exc:
                raise self.error((*p, "entries", index), str(exc)) from None
            if action == "permit":
                permitted += _uncovered(net, earlier)
            earlier.append(net)
        if len(permitted) > ACL_PREFIXES:
            raise self.error(
                (*p, "entries"), f"permits {len(permitted)} prefixes, at most "
                f"{ACL_PREFIXES}"
            )  # fmt: skip
        return tuple(permitted)

    def check_routes(
        self,
        name: str,
        policy: Authorization,
        access_lists: dict[str, tuple[ipaddress.IPv4Network, ...]],
        server: ServerConfig,
    ) -> None:
        """Check a policy's route set names an access list and has an address."""
        p: PathKey = ("policies", name)
        acl = policy.route_set_access_list
        if acl is not None and acl not in access_lists:
            raise self.error((*p, "route_set_access_list"), f"unknown access list "
                             f"{acl!r}")  # fmt: skip
        if acl is not None and not access_lists[acl]:
            where = self.at(("access_lists", acl))
            problem = f"access list {acl!r} {where}permits nothing"
            raise self.error((*p, "route_set_access_list"), problem)
        if policy.route_set_interface is not None and not (
            server.inside_address or server.inside_address6
        ):
            raise self.error((*p, "route_set_interface"), "needs [server] "
                             "inside_address or inside_address6")  # fmt: skip

    def warn_empty_access_lists(
        self,
        access_lists: dict[str, tuple[ipaddress.IPv4Network, ...]],
        policies: dict[str, Authorization],
    ) -> None:
        """Warn of access lists no policy uses that permit nothing."""
        used = {policy.route_set_access_list for policy in policies.values()}
        for name, permitted in access_lists.items():
            # a used one is an error at the policy (check_routes)
            if not permitted and name not in used:
                where = self.error(("access_lists", name, "entries"), "")
                log.warning("%s:%s: access list %s permits nothing; a RADIUS "
                            "route-set naming it would push no routes",
                            self.source, where.line, name)  # fmt: skip

    def check_inside(self, server: ServerConfig, pools: dict[str, PoolConfig]) -> None:
        """Check the headend's own inside addresses lie outside every pool."""
        for key in ("inside_address", "inside_address6"):
            text = getattr(server, key)
            if text is None:
                continue
            address = ipaddress.ip_address(text)
            for pool in pools.values():
                step = 1 << (pool.first.max_prefixlen - pool.client_prefix)
                if pool.first.version == address.version and (
                    int(pool.first) <= int(address) < int(pool.last) + step
                ):
                    # a client would be leased the headend's own address
                    span = f"{pool.first} - {pool.last}"
                    problem = f"{text} is inside pool {pool.name!r} ({span})"
                    raise self.error(("server", key), problem)
                net = pool.network
                if net is None or net.version != address.version:
                    continue
                # RFC 919 7 / RFC 922 7: a prefix's all-ones address is its
                # broadcast; RFC 4291 2.6.1: an IPv6 prefix's all-zero address
                # is its subnet-router anycast address
                edges: dict[Any, str] = {}
                if net.version == 6:
                    edges = {net.network_address: "subnet-router anycast"}
                elif net.prefixlen < 31:
                    edges = {
                        net.network_address: "network",
                        net.broadcast_address: "broadcast",
                    }
                if address in edges:
                    problem = (f"{text} is the {edges[address]} address of pool "
                               f"{pool.name!r} ({net})")  # fmt: skip
                    raise self.error(("server", key), problem)

    def at(self, path: PathKey) -> str:
        """Return "(line N) " for a table or key of the file, or nothing."""
        line = self.lines.get(path)
        return f"(line {line}) " if line else ""

    def check_policy_pools(
        self, name: str, policy: Authorization, pools: dict[str, PoolConfig]
    ) -> None:
        """Check a policy's addr_pool names an IPv4 pool, ipv6_addr_pool an IPv6 one."""
        for key, pool, version in (
            ("addr_pool", policy.addr_pool, 4),
            ("ipv6_addr_pool", policy.ipv6_addr_pool, 6),
        ):
            path: PathKey = ("policies", name, key)
            if pool is None:
                continue
            if pool not in pools:
                raise self.error(path, f"unknown pool {pool!r}")
            if pools[pool].first.version != version:
                raise self.error(path, f"{pool!r} is not an IPv{version} pool")

    def policy(self, name: str, data: dict[str, Any]) -> Authorization:
        """Read one local authorization policy; values checked as RADIUS's are."""
        p: PathKey = ("policies", name)
        self.table(data, p, set(POLICY_KEYS))
        auth = Authorization()
        for key in data:
            attr, kind, many = POLICY_KEYS[key]
            path = (*p, key)
            value = self.get(data, path, kind, None)
            values = [str(v) for v in value] if kind is list else [value]
            if many and len(values) > many:
                raise self.error(path, f"at most {many} values")
            if problem := _policy_value_problem(key, values):
                raise self.error(path, problem)
            try:
                if key == "netmask":
                    auth.framed_ip_netmask = ipaddress.IPv4Address(value)
                elif key == "session_lifetime":
                    if not 120 <= value <= 86400:
                        raise ValueError(f"{value} out of range 120..86400")
                    auth.session_lifetime = value
                elif key == "interface_mtu":
                    if not 576 <= value <= 9000:
                        raise ValueError(f"{value} out of range 576..9000")
                    auth.interface_config.append(f"ip mtu {value}")
                elif key == "route_set_interface":
                    if value:
                        apply_pair(auth, attr, "interface")
                elif key == "route_set_access_list":
                    apply_pair(auth, attr, f"access-list {value}")
                elif key == "route_set_prefix":
                    for item in values:
                        apply_pair(auth, attr, f"prefix {item}")
                elif kind is list and key in ("split_dns", "backup_gateways"):
                    for item in values:
                        apply_pair(auth, attr, item)
                elif kind is list:
                    apply_pair(auth, attr, " ".join(values))
                elif kind is bool:
                    apply_pair(auth, attr, "1" if value else "0")
                else:
                    apply_pair(auth, attr, str(value))
            except ValueError as exc:
                raise self.error(path, str(exc)) from None
        return auth

    def check_authorization(
        self,
        index: int,
        profile: ProfileConfig,
        radius: dict[str, RadiusGroupConfig],
        policies: dict[str, Authorization],
    ) -> None:
        """Check the authorization keys of a profile against groups and policies."""
        p: PathKey = ("profiles", index)
        for key in ("authorization_user", "authorization_group"):
            value = getattr(profile, key)
            if value is None:
                continue
            source, _, name = value.partition(":")
            if source not in AUTHZ_SOURCES:
                raise self.error(
                    (*p, key), f"expected local or radius:GROUP, got {value!r}"
                )
            if source == "radius" and name not in radius:
                raise self.error((*p, key), f"unknown radius group {name!r}")
            if (
                key == "authorization_group"
                and source == "local"
                and name not in policies
            ):
                raise self.error((*p, key), f"unknown policy {name!r}")
            if (
                key == "authorization_group"
                and source == "radius"
                and not (profile.authorization_group_name)
            ):
                raise self.error((*p, "authorization_group_name"), "missing")
            # the lookup's Access-Request carries the group's user_password
            # as User-Password: a default nobody wrote down is refused
            if source == "radius" and name not in self.passwords:
                where = self.at(("radius", name))
                problem = (f"[radius.{name}] {where}has no user_password (sent "
                           "as User-Password)")  # fmt: skip
                raise self.error((*p, key), problem)
        if profile.name_mangler is not None:
            self.check_mangler(index, profile)
        # certificate auth: a username from the profile or a name mangler
        certs_used = any(m not in ("pre-share", "eap") for m in profile.remote_auth)
        if (
            profile.authorization_user is not None
            and certs_used
            and not (profile.authorization_username or profile.name_mangler)
        ):
            raise self.error(
                (*p, "authorization_user"),
                "certificate auth needs authorization_username or name_mangler",
            )

    def check_mangler(self, index: int, profile: ProfileConfig) -> None:
        """Check a name mangler parses and gets its source from this profile."""
        path: PathKey = ("profiles", index, "name_mangler")
        assert profile.name_mangler is not None
        try:
            mangler = parse_mangler(profile.name_mangler)
        except ValueError as exc:
            raise self.error(path, str(exc)) from None
        # the mangled name is the username of user authorization only
        if profile.authorization_user is None:
            raise self.error(path, "unused without authorization_user")
        if profile.authorization_username:
            raise self.error(path, "unused: authorization_username is set")
        problem = usability_problem(
            mangler, profile.remote_auth, profile.match_identity
        )
        if problem:
            raise self.error(path, problem)

    def radius(self, name: str, data: dict[str, Any]) -> RadiusGroupConfig:
        p: PathKey = ("radius", name)
        known = {"servers", "timeout", "retransmit", "nas_identifier", "user_password"}
        self.table(data, p, known)
        d = RadiusGroupConfig(name, ())
        timeout = self.get(data, (*p, "timeout"), (int, float), d.timeout)
        if not 0.1 <= timeout <= 60:
            raise self.error((*p, "timeout"), f"{timeout} out of range 0.1..60")
        retransmit = self.get(data, (*p, "retransmit"), int, d.retransmit)
        if not 0 <= retransmit <= 10:
            raise self.error((*p, "retransmit"), f"{retransmit} out of range 0..10")
        nas = self.get(data, (*p, "nas_identifier"), str, d.nas_identifier)
        password = self.get(data, (*p, "user_password"), str, d.user_password)
        if not password:
            raise self.error((*p, "user_password"), "empty")
        if "user_password" in data:
            self.passwords.add(name)
        servers_data = self.get(data, (*p, "servers"), list, _REQUIRED)
        if not servers_data:
            raise self.error((*p, "servers"), "at least one server is needed")
        servers = []
        for index, item in enumerate(servers_data):
            sp: PathKey = (*p, "servers", index)
            if not isinstance(item, dict):
                raise self.error(sp, "expected a table")
            self.table(item, sp, {"address", "port", "secret"})
            address = self.get(item, (*sp, "address"), str, _REQUIRED)
            try:
                ipaddress.ip_address(address)
            except ValueError:
                problem = f"not an IP address: {address!r}"
                raise self.error((*sp, "address"), problem) from None
            port = self.port(item, (*sp, "port"), 1812)
            secret = self.get(item, (*sp, "secret"), str, _REQUIRED)
            # RFC 2865 3: the secret should be at least 16 octets
            if len(secret) < 16:
                raise self.error((*sp, "secret"), "shorter than 16 characters")
            servers.append(RadiusServerConfig(address, port, secret.encode()))
        return RadiusGroupConfig(
            name, tuple(servers), float(timeout), retransmit, nas, password
        )

    def server(self, data: dict[str, Any]) -> ServerConfig:
        p: PathKey = ("server",)
        self.table(data, p, {f.name for f in dataclasses.fields(ServerConfig)})
        d = ServerConfig()
        listen = self.get(data, (*p, "listen"), str, d.listen)
        if problem := listen_problem(listen):
            raise self.error((*p, "listen"), problem)
        control_socket = self.get(data, (*p, "control_socket"), str, d.control_socket)
        if problem := socket_problem(control_socket):
            raise self.error((*p, "control_socket"), problem)
        ike_port = self.port(data, (*p, "ike_port"), d.ike_port)
        natt_port = self.port(data, (*p, "natt_port"), d.natt_port)
        if ike_port == natt_port:
            raise self.error((*p, "natt_port"), "must differ from ike_port")
        return ServerConfig(
            listen=listen,
            ike_port=ike_port,
            natt_port=natt_port,
            control_socket=control_socket,
            log_level=self.choice(data, (*p, "log_level"), LOG_LEVELS, d.log_level),
            state_dir=self.path(self.get(data, (*p, "state_dir"), str, d.state_dir)),
            cookie_threshold=self.count(
                data, (*p, "cookie_threshold"), d.cookie_threshold
            ),
            half_open_per_source=self.count(
                data, (*p, "half_open_per_source"), d.half_open_per_source
            ),
            fragment_size=self.fragment_size(data, (*p, "fragment_size")),
            inside_address=self.inside(data, (*p, "inside_address"), 4),
            inside_address6=self.inside(data, (*p, "inside_address6"), 6),
        )

    def inside(self, data: dict[str, Any], path: PathKey, version: int) -> str | None:
        value = self.get(data, path, str, None)
        if value is None:
            return None
        try:
            address = ipaddress.ip_address(value)
        except ValueError:
            raise self.error(path, f"not an IP address: {value!r}") from None
        if address.version != version:
            raise self.error(path, f"not an IPv{version} address: {value!r}")
        # RFC 1122 3.2.1.3 and RFC 4291 2.5.2, 2.5.3, 2.5.6, 2.7: none of these
        # names one host's interface on the inside network
        kinds = (
            ("the unspecified", address.is_unspecified),
            ("a loopback", address.is_loopback),
            ("a multicast", address.is_multicast),
            ("the limited broadcast", address == LIMITED_BROADCAST),
            ("a link-local", address.is_link_local),
        )
        for kind, matches in kinds:
            if matches:
                raise self.error(path, f"{value} is {kind} address")
        return str(address)

    def engine(self, data: dict[str, Any]) -> EngineConfig:
        p: PathKey = ("engine",)
        self.table(data, p, {f.name for f in dataclasses.fields(EngineConfig)})
        d = EngineConfig()
        batch = self.get(data, (*p, "batch"), int, d.batch)
        if not 1 <= batch <= 1024:
            raise self.error((*p, "batch"), f"{batch} out of range 1..1024")
        mtu = self.get(data, (*p, "tun_mtu"), int, d.tun_mtu)
        if not 576 <= mtu <= 9000:
            raise self.error((*p, "tun_mtu"), f"{mtu} out of range 576..9000")
        crypto = self.choice(data, (*p, "crypto"), CRYPTO_BACKENDS, d.crypto)
        dataplane = self.choice(data, (*p, "dataplane"), DATAPLANES, d.dataplane)
        mode = self.choice(data, (*p, "mode"), ENGINE_MODES, d.mode)
        window = self.get(data, (*p, "replay_window"), int, d.replay_window)
        if not 64 <= window <= 4096 or window & (window - 1):
            raise self.error(
                (*p, "replay_window"), f"{window} is not a power of two in 64..4096"
            )
        return EngineConfig(
            crypto=crypto, batch=batch, tun_mtu=mtu, dataplane=dataplane, mode=mode,
            replay_window=window,
        )  # fmt: skip

    def pool(self, name: str, data: dict[str, Any]) -> PoolConfig:
        p: PathKey = ("pools", name)
        self.table(data, p, {"range", "client_prefix"})
        text = self.get(data, (*p, "range"), str, _REQUIRED)
        if ":" in text:
            return self.pool6(name, data, text)
        if "client_prefix" in data:
            raise self.error((*p, "client_prefix"), "only for IPv6 pools")
        try:
            net: ipaddress.IPv4Network | None = None
            if "/" in text:
                net = ipaddress.IPv4Network(text)
                # a /31 or /32 is all usable; otherwise skip network and broadcast
                edge = 1 if net.prefixlen < 31 else 0
                first = net.network_address + edge
                last = net.broadcast_address - edge
            else:
                lo, _, hi = text.partition("-")
                first = ipaddress.IPv4Address(lo.strip())
                last = ipaddress.IPv4Address(hi.strip() or lo.strip())
        except ValueError:
            raise self.error(
                (*p, "range"), f"expected 'first-last' or a prefix, got {text!r}"
            ) from None
        if last < first:
            problem = f"the last address {last} is below the first {first}"
            raise self.error((*p, "range"), problem)
        if int(last) - int(first) + 1 > MAX_POOL_SIZE:
            raise self.error((*p, "range"), f"more than {MAX_POOL_SIZE} addresses")
        for bad in _UNUSABLE:
            if first <= bad.broadcast_address and last >= bad.network_address:
                raise self.error(
                    (*p, "range"), f"overlaps {bad}, which clients cannot use"
                )
        return PoolConfig(name, first, last, network=net)

    def pool6(self, name: str, data: dict[str, Any], text: str) -> PoolConfig:
        """Read an IPv6 pool: a prefix and the prefix length each client gets."""
        p: PathKey = ("pools", name)
        try:
            net = ipaddress.IPv6Network(text, strict=False)
        except ValueError:
            problem = f"expected an IPv6 prefix, got {text!r}"
            raise self.error((*p, "range"), problem) from None
        client = self.get(data, (*p, "client_prefix"), int, 128)
        if not max(net.prefixlen, 64) <= client <= 128:
            low = max(net.prefixlen, 64)
            problem = f"{client} out of range {low}..128 for {net}"
            raise self.error((*p, "client_prefix"), problem)
        step = 1 << (128 - client)
        last = ipaddress.IPv6Address(int(net.broadcast_address) - step + 1)
        first = net.network_address
        # RFC 4291 2.6.1: the prefix's all-zero address is the subnet-router
        # anycast address, never a client's /128 (a shorter client prefix
        # is the client's own, anycast address and all)
        if client == 128:
            first += 1
        if first > last:
            problem = f"{net} leaves no address beside its subnet-router anycast"
            raise self.error((*p, "range"), problem)
        return PoolConfig(name, first, last, client, net)

    def profile(
        self, index: int, data: dict[str, Any], pools: dict[str, PoolConfig]
    ) -> ProfileConfig:
        p: PathKey = ("profiles", index)
        self.table(data, p, {f.name for f in dataclasses.fields(ProfileConfig)})
        name = self.get(data, (*p, "name"), str, _REQUIRED)
        if not name or not name.isprintable():
            raise self.error((*p, "name"), "must be non-empty printable text")
        local_identity = self.get(data, (*p, "local_identity"), str, _REQUIRED)
        if problem := identity_problem(local_identity):
            raise self.error((*p, "local_identity"), problem)
        kind, sep, _ = local_identity.partition(":")
        if sep and kind not in IDENTITY_TYPES:
            raise self.error(
                (*p, "local_identity"),
                f"identity type {kind!r} is not one of {', '.join(IDENTITY_TYPES)}",
            )
        # auth predates local_auth/remote_auth and stays for old files only
        auth = self.get(data, (*p, "auth"), str, "psk")
        if auth not in AUTH_METHODS:
            raise self.error(
                (*p, "auth"),
                f"{auth!r}: this old key only takes 'psk'; set local_auth and "
                "remote_auth instead",
            )
        local_auth = self.choice(data, (*p, "local_auth"), LOCAL_AUTH, "pre-share")
        remote_auth = self.strings(data, (*p, "remote_auth"), ["pre-share"])
        if not remote_auth:
            raise self.error((*p, "remote_auth"), "empty")
        for item in remote_auth:
            if item not in REMOTE_AUTH:
                raise self.error(
                    (*p, "remote_auth"),
                    f"{item!r} is not one of {', '.join(REMOTE_AUTH)}",
                )
        aaa_psk = self.get(data, (*p, "aaa_psk"), str, None)
        # with aaa_psk the keys come from RADIUS, one per identity
        uses_psk = aaa_psk is None and (
            local_auth == "pre-share" or "pre-share" in remote_auth
        )
        psk = self.get(data, (*p, "psk"), str, _REQUIRED if uses_psk else "")
        if "psk" in data and not psk:
            raise self.error((*p, "psk"), "empty")
        if uses_psk and len(psk) < 16:
            # RFC 7296 2.15: a PSK should be as strong as the negotiated keys.
            raise self.error((*p, "psk"), "shorter than 16 characters")
        pool = self.get(data, (*p, "pool"), str, None)
        if pool is not None and pool not in pools:
            raise self.error((*p, "pool"), f"unknown pool {pool!r}")
        dns = self.strings(data, (*p, "dns"), [])
        for item in dns:
            try:
                ipaddress.ip_address(item)
            except ValueError:
                problem = f"not an IP address: {item!r}"
                raise self.error((*p, "dns"), problem) from None
        local_ts = self.strings(data, (*p, "local_ts"), ["0.0.0.0/0"])
        if not local_ts:
            raise self.error((*p, "local_ts"), "empty: no traffic could be allowed")
        for item in local_ts:
            try:
                ipaddress.ip_network(item)
            except ValueError:
                raise self.error(
                    (*p, "local_ts"), f"not an IP prefix: {item!r}"
                ) from None
        dhcp: dict[str, Any] = {}
        for key in ("dhcp_server", "dhcp_giaddr"):
            value = self.get(data, (*p, key), str, None)
            if value is not None:
                try:
                    ipaddress.IPv4Address(value)
                except ValueError:
                    problem = f"not an IPv4 address: {value!r}"
                    raise self.error((*p, key), problem) from None
            dhcp[key] = value
        if (dhcp["dhcp_server"] is None) != (dhcp["dhcp_giaddr"] is None):
            raise self.error(
                (*p, "dhcp_giaddr"), "dhcp_server and dhcp_giaddr go together"
            )
        dhcp["dhcp_timeout"] = self.get(data, (*p, "dhcp_timeout"), int, 5)
        if not 1 <= dhcp["dhcp_timeout"] <= 120:
            problem = f"{dhcp['dhcp_timeout']} out of range 1..120"
            raise self.error((*p, "dhcp_timeout"), problem)
        pool6 = self.get(data, (*p, "ipv6_pool"), str, None)
        if pool6 is not None and pool6 not in pools:
            raise self.error((*p, "ipv6_pool"), f"unknown pool {pool6!r}")
        if pool6 is not None and pools[pool6].first.version != 6:
            raise self.error((*p, "ipv6_pool"), f"{pool6!r} is not an IPv6 pool")
        if pool is not None and pools[pool].first.version != 4:
            raise self.error((*p, "pool"), f"{pool!r} is not an IPv4 pool")
        esp = self.strings(data, (*p, "esp"), list(ESP_PROPOSALS))
        if not esp:
            raise self.error((*p, "esp"), "empty: no CHILD SA could be negotiated")
        for item in esp:
            if item not in ESP_PROPOSALS:
                raise self.error(
                    (*p, "esp"),
                    f"{item!r} is not one of {', '.join(ESP_PROPOSALS)}",
                )
        engine = None
        if "engine" in data:
            engine = self.choice(data, (*p, "engine"), ENGINE_MODES, None)
        match = self.strings(data, (*p, "match_identity"), ["*"])
        if not match:
            raise self.error((*p, "match_identity"), "empty")
        for item in match:
            if problem := _pattern_problem(item):
                raise self.error((*p, "match_identity"), f"{item!r}: {problem}")
        rekey: dict[str, Any] = {}
        for key, default in (("ike_rekey_time", 86400), ("child_rekey_time", 28800)):
            value = int(self.get(data, (*p, key), int, default))
            if value != 0 and not REKEY_TIME[0] <= value <= REKEY_TIME[1]:
                low, high = REKEY_TIME
                raise self.error((*p, key), f"{value} is not 0 or {low}..{high}")
            rekey[key] = value
        child_bytes = int(self.get(data, (*p, "child_rekey_bytes"), int, 0))
        low, high = CHILD_REKEY_BYTES
        if child_bytes != 0 and not low <= child_bytes <= high:
            raise self.error(
                (*p, "child_rekey_bytes"), f"{child_bytes} is not 0 or {low}..{high}"
            )
        rekey["child_rekey_bytes"] = child_bytes
        liveness = self.liveness(data, p)
        lifetime = int(self.get(data, (*p, "session_lifetime"), int, 0))
        low, high = SESSION_LIFETIME
        if lifetime != 0 and not low <= lifetime <= high:
            raise self.error(
                (*p, "session_lifetime"), f"{lifetime} is not 0 or {low}..{high}"
            )
        certmap = self.cert_map(data, p)
        if certmap and remote_auth == ["pre-share"]:
            raise self.error(
                (*p, "match_certificate"), "needs a certificate remote_auth method"
            )
        certificate, private_key = self.credential(data, p, local_auth, local_identity)
        ca = [self.path(x) for x in self.strings(data, (*p, "ca"), [])]
        crl = [self.path(x) for x in self.strings(data, (*p, "crl"), [])]
        eap = "eap" in remote_auth
        eap_query = self.get(data, (*p, "eap_query_identity"), bool, False)
        eap_timeout = self.get(data, (*p, "eap_timeout"), int, 30)
        if not 5 <= eap_timeout <= 300:
            raise self.error((*p, "eap_timeout"), f"{eap_timeout} out of range 5..300")
        aaa = self.get(data, (*p, "aaa_authentication"), str, None)
        if eap and aaa is None:
            raise self.error((*p, "aaa_authentication"), "missing (remote_auth eap)")
        # RFC 7296 2.16: we prove ourselves by certificate when the peer uses EAP
        if eap and local_auth == "pre-share":
            raise self.error((*p, "local_auth"), "eap needs rsa-sig or ecdsa-sig")
        if any(m not in ("pre-share", "eap") for m in remote_auth) and not ca:
            raise self.error((*p, "ca"), "certificate auth of peers needs a CA file")
        for key, paths, loader in (
            ("ca", ca, certs.load_certificates),
            ("crl", crl, certs.load_crls),
        ):
            for path in paths:
                try:
                    loader(path)
                except (OSError, ValueError) as exc:
                    problem = _file_problem(path, exc, FILE_KINDS[key])
                    raise self.error((*p, key), problem) from None
        return ProfileConfig(
            name=name,
            match_identity=tuple(match),
            local_identity=local_identity,
            auth=auth,
            psk=psk.encode(),
            pool=pool,
            dns=tuple(dns),
            local_ts=tuple(local_ts),
            esp=tuple(esp),
            local_auth=local_auth,
            remote_auth=tuple(remote_auth),
            certificate=certificate,
            private_key=private_key,
            ca=tuple(ca),
            crl=tuple(crl),
            match_certificate=certmap,
            windows_proposals=self.get(data, (*p, "windows_proposals"), bool, False),
            session_lifetime=lifetime,
            **rekey,
            **liveness,
            eap_query_identity=eap_query,
            eap_timeout=eap_timeout,
            aaa_authentication=aaa,
            aaa_psk=aaa_psk,
            authorization_user=self.get(data, (*p, "authorization_user"), str, None),
            authorization_username=self.get(
                data, (*p, "authorization_username"), str, None
            ),
            name_mangler=self.get(data, (*p, "name_mangler"), str, None),
            authorization_group=self.get(data, (*p, "authorization_group"), str, None),
            authorization_group_name=self.get(
                data, (*p, "authorization_group_name"), str, None
            ),
            authorization_group_override=self.get(
                data, (*p, "authorization_group_override"), bool, False
            ),
            authorization_cached=self.get(
                data, (*p, "authorization_cached"), bool, True
            ),
            ipv6_pool=pool6,
            config_mode=self.choice(data, (*p, "config_mode"), CONFIG_MODES, "request"),
            **dhcp,
            engine=engine,
            cisco_attributes=self.cisco_attributes(data, p),
        )

    def cisco_attributes(
        self, data: dict[str, Any], p: PathKey
    ) -> tuple[tuple[str, int], ...]:
        """Read a profile's [cisco_attributes] table: private attribute numbers."""
        path = (*p, "cisco_attributes")
        table = self.get(data, path, dict, {})
        self.table(table, path, set(CISCO_PRIVATE_DEFAULTS))
        out = []
        for name in CISCO_PRIVATE_DEFAULTS:
            if name not in table:
                continue
            number = int(self.get(table, (*path, name), int, None))
            # RFC 7296 3.15.1: 16384..32767 are reserved for private use
            low, high = PRIVATE_ATTRIBUTES
            if not low <= number <= high:
                raise self.error((*path, name), f"{number} is not {low}..{high}")
            out.append((name, number))
        # the three stay apart from each other and from every other attribute
        effective = {**CISCO_PRIVATE_DEFAULTS, **dict(out)}
        taken = set(CfgAttribute) - set(CISCO_PRIVATE_DEFAULTS.values())
        for name, number in out:
            others = [v for k, v in effective.items() if k != name]
            if number in others or number in taken:
                raise self.error((*path, name), f"{number} is already in use")
        return tuple(out)

    def liveness(self, data: dict[str, Any], p: PathKey) -> dict[str, Any]:
        """Read flow_limit, dpd_delay and dpd_timeout of one profile."""
        flow_limit = int(self.get(data, (*p, "flow_limit"), int, 0))
        if not FLOW_LIMIT[0] <= flow_limit <= FLOW_LIMIT[1]:
            low, high = FLOW_LIMIT
            raise self.error((*p, "flow_limit"), f"{flow_limit} is not {low}..{high}")
        out = {"flow_limit": flow_limit}
        for key, default, zero_ok in (
            ("dpd_delay", 30, True),
            ("dpd_timeout", 120, False),
        ):
            value = int(self.get(data, (*p, key), int, default))
            if not (zero_ok and value == 0) and not (
                DPD_DELAY[0] <= value <= DPD_DELAY[1]
            ):
                low, high = DPD_DELAY
                allowed = f"0 or {low}..{high}" if zero_ok else f"{low}..{high}"
                raise self.error((*p, key), f"{value} is not {allowed}")
            out[key] = value
        return out

    def cert_map(
        self, data: dict[str, Any], p: PathKey
    ) -> tuple[tuple[str, str, str], ...]:
        """Read match_certificate: tables of field and one of equals/contains."""
        path = (*p, "match_certificate")
        rules = self.get(data, path, list, [])
        out = []
        for rule in rules:
            if not isinstance(rule, dict):
                raise self.error(path, f"expected tables, got {rule!r}")
            unknown = set(rule) - {"field", "equals", "contains"}
            ops = [op for op in CERT_OPS if op in rule]
            name = rule.get("field")
            if unknown or len(ops) != 1 or not isinstance(name, str):
                raise self.error(
                    path, f"expected {{field = ..., equals|contains = ...}}, got {rule}"
                )
            value = rule[ops[0]]
            base, _, attr = name.partition(".")
            if base not in CERT_FIELDS or attr and attr.upper() not in ATTRIBUTE_OIDS:
                raise self.error(path, f"unknown certificate field {name!r}")
            if not isinstance(value, str) or not value:
                raise self.error(path, f"{ops[0]} needs a non-empty string")
            out.append((name, ops[0], value))
        return tuple(out)

    def path(self, text: str) -> str:
        """Resolve a file name against the config file's directory."""
        if not text or Path(text).is_absolute() or self.source.startswith("<"):
            return text
        return str(Path(self.source).parent / text)

    def credential(
        self, data: dict[str, Any], p: PathKey, local_auth: str, local_identity: str
    ) -> tuple[str | None, str | None]:
        """Check certificate and private_key against local_auth and identity."""
        cert_name = self.get(data, (*p, "certificate"), str, None)
        key_name = self.get(data, (*p, "private_key"), str, None)
        if local_auth == "pre-share":
            return (self.path(cert_name) if cert_name else None,
                    self.path(key_name) if key_name else None)  # fmt: skip
        for key, value in (("certificate", cert_name), ("private_key", key_name)):
            if value is None:
                raise self.error((*p, key), f"missing (local_auth is {local_auth})")
        assert cert_name is not None and key_name is not None
        cert_path, key_path = self.path(cert_name), self.path(key_name)
        try:
            chain = certs.load_certificates(cert_path)
        except (OSError, ValueError) as exc:
            problem = _file_problem(cert_path, exc, FILE_KINDS["certificate"])
            raise self.error((*p, "certificate"), problem) from None
        try:
            private = certs.load_private_key(key_path)
        except (OSError, ValueError, TypeError) as exc:
            problem = _file_problem(key_path, exc, FILE_KINDS["private_key"])
            raise self.error((*p, "private_key"), problem) from None
        if private.public_key() != chain[0].public_key():
            raise self.error((*p, "private_key"), "does not match the certificate")
        kind = "rsa-sig" if isinstance(private, rsa.RSAPrivateKey) else "ecdsa-sig"
        if kind != local_auth:
            raise self.error((*p, "local_auth"), f"{local_auth} with a {kind} key")
        if isinstance(private, ec.EllipticCurvePrivateKey) and (
            private.curve.name not in ("secp256r1", "secp384r1", "secp521r1")
        ):
            curve = private.curve.name
            raise self.error((*p, "private_key"), f"curve {curve} unsupported")
        ident = Identity.from_string(local_identity)
        if not certs.identity_in_cert(ident.type, ident.data, chain[0]):
            raise self.error(
                (*p, "local_identity"), f"{local_identity} is not in {cert_path}"
            )
        return cert_path, key_path


_REQUIRED = object()
MAX_POOL_SIZE = 1 << 20
LIMITED_BROADCAST = ipaddress.IPv4Address("255.255.255.255")
_UNUSABLE = [
    ipaddress.IPv4Network(n)
    for n in (
        "0.0.0.0/8",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "224.0.0.0/4",
        "240.0.0.0/4",
    )
]
SECRET_FIELDS = {"psk", "password", "secret", "private_key_password"}
SECRET_ENDS = ("_password", "_secret", "_psk")


def acl_entry(text: str) -> tuple[str, ipaddress.IPv4Network]:
    """Parse "permit|deny PREFIX", "... host A", "... any" or "... A WILDCARD"."""
    words = text.split()
    if not words or words[0] not in ("permit", "deny"):
        raise ValueError(f"expected 'permit' or 'deny', got {text!r}")
    rest = words[1:]
    if rest == ["any"]:
        return words[0], ipaddress.IPv4Network("0.0.0.0/0")
    if len(rest) == 2 and rest[0] == "host":
        return words[0], ipaddress.IPv4Network(f"{_ipv4(rest[1], text)}/32")
    if len(rest) == 2:
        # a Cisco wildcard mask: the inverse of a contiguous netmask
        wildcard = int(_ipv4(rest[1], text))
        mask = ipaddress.IPv4Address(wildcard ^ 0xFFFFFFFF)
        try:
            return words[0], ipaddress.IPv4Network(f"{rest[0]}/{mask}")
        except ValueError:
            raise ValueError(f"bad address or wildcard in {text!r}") from None
    if len(rest) != 1 or ":" in rest[0]:
        # a standard access list matches IPv4 source prefixes only
        raise ValueError(f"expected one IPv4 prefix in {text!r}")
    try:
        return words[0], ipaddress.IPv4Network(rest[0])
    except ValueError:
        pass
    try:
        net = ipaddress.IPv4Network(rest[0], strict=False)
    except ValueError:
        raise ValueError(f"not an IPv4 prefix: {rest[0]!r}") from None
    raise ValueError(f"{rest[0]!r} has host bits set; the prefix is {net}")


def _ipv4(word: str, text: str) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(word)
    except ValueError:
        raise ValueError(f"not an IPv4 address: {word!r} in {text!r}") from None


def _uncovered(
    net: ipaddress.IPv4Network, earlier: list[ipaddress.IPv4Network]
) -> list[ipaddress.IPv4Network]:
    # the parts of net that no earlier entry matches (first match wins)
    parts = [net]
    for other in earlier:
        rest: list[ipaddress.IPv4Network] = []
        for part in parts:
            if part.subnet_of(other):
                continue
            if other.subnet_of(part):
                rest += part.address_exclude(other)
            else:
                rest.append(part)
        parts = rest
    return sorted(parts)
