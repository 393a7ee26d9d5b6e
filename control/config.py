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
                        PSK, pool, DNS, local traffic selectors, ESP
                        proposals, local/remote auth methods, certificate,
                        key, CAs, CRLs

Certificate, key, CA and CRL files are loaded while checking, so a bad file
is reported at its field; relative paths are taken from the config file's
directory.

Secrets (``psk``) are kept out of ``repr`` so a logged config shows none.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from control.ike import certs
from control.ike.matching import ATTRIBUTE_OIDS, CERT_FIELDS, CERT_OPS, IdentityPattern
from control.ike.profiles import Identity

DEFAULT_NAME = "default.toml"
ESP_PROPOSALS = ("aes128gcm16", "aes256gcm16")
CRYPTO_BACKENDS = ("ipsec-mb", "openssl")
# inline: the engine in the daemon; process: control/dataplane.py, durable seqs
DATAPLANES = ("inline", "process")
LOG_LEVELS = ("debug", "info", "warning", "error")
AUTH_METHODS = ("psk",)
LOCAL_AUTH = ("pre-share", "rsa-sig", "ecdsa-sig")
REMOTE_AUTH = ("pre-share", "rsa-sig", "ecdsa-sig", "pubkey")
IDENTITY_TYPES = ("fqdn", "email", "ipv4", "ipv6", "dn", "keyid")
ENGINE_MODES = ("userspace", "kernel", "auto")

PathKey = tuple[str | int, ...]


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
    state_dir: str = "/var/lib/espgate"


@dataclass(frozen=True)
class EngineConfig:
    crypto: str = "ipsec-mb"
    batch: int = 64
    tun_mtu: int = 1400
    dataplane: str = "inline"
    mode: str = "userspace"


@dataclass(frozen=True)
class PoolConfig:
    name: str
    first: ipaddress.IPv4Address
    last: ipaddress.IPv4Address

    @property
    def size(self) -> int:
        return int(self.last) - int(self.first) + 1


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
    engine: str | None = None  # None: [engine] mode


@dataclass(frozen=True)
class Config:
    source: str
    server: ServerConfig
    engine: EngineConfig
    pools: dict[str, PoolConfig]
    profiles: tuple[ProfileConfig, ...]


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
    kind, sep, value = text.partition(":")
    if not sep:
        kind, value = "", text
    if not value.strip():
        return "empty identity"
    try:
        if kind == "ipv4":
            ipaddress.IPv4Address(value)
        elif kind == "ipv6":
            ipaddress.IPv6Address(value)
    except ValueError as exc:
        return str(exc)
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
    if any(part in SECRET_FIELDS for part in path) or isinstance(value, dict | list):
        return {dict: "a table", list: "a list"}.get(type(value), type(value).__name__)
    return repr(value)


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

    def get(self, data: dict[str, Any], path: PathKey, kind: type, default: Any) -> Any:
        key = path[-1]
        assert isinstance(key, str), "field paths end in a key"
        if key not in data:
            if default is _REQUIRED:
                raise self.error(path, "missing")
            return default
        value = data[key]
        if kind is int and isinstance(value, bool) or not isinstance(value, kind):
            shown = _show(path, value)
            raise self.error(path, f"expected {kind.__name__}, got {shown}")
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

    def strings(self, data: dict[str, Any], path: PathKey, default: Any) -> list[str]:
        value = self.get(data, path, list, default)
        for item in value:
            if not isinstance(item, str):
                raise self.error(path, f"expected a list of strings, got {item!r}")
        return list(value)

    def config(self, data: dict[str, Any]) -> Config:
        self.table(data, (), {"server", "engine", "pools", "profiles"})
        server = self.server(self.get(data, ("server",), dict, {}))
        engine = self.engine(self.get(data, ("engine",), dict, {}))
        pools_data = self.get(data, ("pools",), dict, {})
        pools = {
            name: self.pool(name, self.get(pools_data, ("pools", name), dict, None))
            for name in pools_data
        }
        seen: list[PoolConfig] = []
        for pool in pools.values():
            for other in seen:
                if pool.first <= other.last and other.first <= pool.last:
                    raise self.error(
                        ("pools", pool.name, "range"), f"overlaps pool {other.name!r}"
                    )
            seen.append(pool)
        profiles_data = self.get(data, ("profiles",), list, _REQUIRED)
        if not profiles_data:
            raise self.error(("profiles",), "at least one profile is needed")
        profiles = []
        for index, item in enumerate(profiles_data):
            if not isinstance(item, dict):
                raise self.error(("profiles", index), "expected a table")
            profiles.append(self.profile(index, item, pools))
        names = [p.name for p in profiles]
        for index, name in enumerate(names):
            if names.index(name) != index:
                raise self.error(("profiles", index, "name"), f"duplicate {name!r}")
        return Config(self.source, server, engine, pools, tuple(profiles))

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
            state_dir=self.get(data, (*p, "state_dir"), str, d.state_dir),
        )

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
        return EngineConfig(
            crypto=crypto, batch=batch, tun_mtu=mtu, dataplane=dataplane, mode=mode
        )

    def pool(self, name: str, data: dict[str, Any]) -> PoolConfig:
        p: PathKey = ("pools", name)
        self.table(data, p, {"range"})
        text = self.get(data, (*p, "range"), str, _REQUIRED)
        try:
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
            raise self.error((*p, "range"), f"{last} comes before {first}")
        if int(last) - int(first) + 1 > MAX_POOL_SIZE:
            raise self.error((*p, "range"), f"more than {MAX_POOL_SIZE} addresses")
        for bad in _UNUSABLE:
            if first <= bad.broadcast_address and last >= bad.network_address:
                raise self.error(
                    (*p, "range"), f"overlaps {bad}, which clients cannot use"
                )
        return PoolConfig(name, first, last)

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
        auth = self.choice(data, (*p, "auth"), AUTH_METHODS, "psk")
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
        uses_psk = local_auth == "pre-share" or "pre-share" in remote_auth
        psk = self.get(data, (*p, "psk"), str, _REQUIRED if uses_psk else "")
        if uses_psk and len(psk) < 16:
            # RFC 7296 2.15: a PSK should be as strong as the negotiated keys.
            raise self.error((*p, "psk"), "shorter than 16 characters")
        pool = self.get(data, (*p, "pool"), str, None)
        if pool is not None and pool not in pools:
            raise self.error((*p, "pool"), f"unknown pool {pool!r}")
        dns = self.strings(data, (*p, "dns"), [])
        for item in dns:
            try:
                ipaddress.IPv4Address(item)
            except ValueError:
                problem = f"not an IPv4 address: {item!r}"
                raise self.error((*p, "dns"), problem) from None
        local_ts = self.strings(data, (*p, "local_ts"), ["0.0.0.0/0"])
        if not local_ts:
            raise self.error((*p, "local_ts"), "empty: no traffic could be allowed")
        for item in local_ts:
            try:
                ipaddress.IPv4Network(item)
            except ValueError:
                raise self.error(
                    (*p, "local_ts"), f"not an IPv4 prefix: {item!r}"
                ) from None
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
            try:
                IdentityPattern.parse(item)
            except ValueError as exc:
                raise self.error((*p, "match_identity"), f"{item!r}: {exc}") from None
        certmap = self.cert_map(data, p)
        if certmap and remote_auth == ["pre-share"]:
            raise self.error(
                (*p, "match_certificate"), "needs a certificate remote_auth method"
            )
        certificate, private_key = self.credential(data, p, local_auth, local_identity)
        ca = [self.path(x) for x in self.strings(data, (*p, "ca"), [])]
        crl = [self.path(x) for x in self.strings(data, (*p, "crl"), [])]
        if any(m != "pre-share" for m in remote_auth) and not ca:
            raise self.error((*p, "ca"), "certificate auth of peers needs a CA file")
        for key, paths, loader in (
            ("ca", ca, certs.load_certificates),
            ("crl", crl, certs.load_crls),
        ):
            for path in paths:
                try:
                    loader(path)
                except (OSError, ValueError) as exc:
                    raise self.error((*p, key), f"{path}: {exc}") from None
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
            engine=engine,
        )

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
        if Path(text).is_absolute() or self.source.startswith("<"):
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
            raise self.error((*p, "certificate"), f"{cert_path}: {exc}") from None
        try:
            key = certs.load_private_key(key_path)
        except (OSError, ValueError, TypeError) as exc:
            raise self.error((*p, "private_key"), f"{key_path}: {exc}") from None
        if key.public_key().public_numbers() != chain[0].public_key().public_numbers():
            raise self.error((*p, "private_key"), "does not match the certificate")
        kind = "rsa-sig" if isinstance(key, rsa.RSAPrivateKey) else "ecdsa-sig"
        if kind != local_auth:
            raise self.error((*p, "local_auth"), f"{local_auth} with a {kind} key")
        if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name not in (
            "secp256r1",
            "secp384r1",
            "secp521r1",
        ):
            raise self.error((*p, "private_key"), f"curve {key.curve.name} unsupported")
        ident = Identity.from_string(local_identity)
        if not certs.identity_in_cert(ident.type, ident.data, chain[0]):
            raise self.error(
                (*p, "local_identity"), f"{local_identity} is not in {cert_path}"
            )
        return cert_path, key_path


_REQUIRED = object()
MAX_POOL_SIZE = 1 << 20
_UNUSABLE = [
    ipaddress.IPv4Network(n)
    for n in ("0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4",
              "240.0.0.0/4")
]
SECRET_FIELDS = {"psk", "password", "secret", "private_key_password"}
