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
    [[profiles]]        identities matched, local identity, PSK, pool,
                        DNS, local traffic selectors, ESP proposals

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

DEFAULT_NAME = "default.toml"
ESP_PROPOSALS = ("aes128gcm16", "aes256gcm16")
CRYPTO_BACKENDS = ("ipsec-mb", "openssl")
LOG_LEVELS = ("debug", "info", "warning", "error")
AUTH_METHODS = ("psk",)
IDENTITY_TYPES = ("fqdn", "email", "ipv4", "ipv6")
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


@dataclass(frozen=True)
class EngineConfig:
    crypto: str = "ipsec-mb"
    batch: int = 64
    tun_mtu: int = 1400
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


def replace_server(config: Config, **changes: Any) -> Config:
    """Return ``config`` with some ``[server]`` fields changed."""
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
            raise self.error(path, f"expected {kind.__name__}, got {value!r}")
        return value

    def choice(self, data: dict[str, Any], path: PathKey, options: tuple[str, ...],
               default: Any) -> str:
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
        try:
            ipaddress.ip_address(listen)
        except ValueError:
            raise self.error((*p, "listen"), f"not an IP address: {listen!r}") from None
        ike_port = self.port(data, (*p, "ike_port"), d.ike_port)
        natt_port = self.port(data, (*p, "natt_port"), d.natt_port)
        if ike_port == natt_port:
            raise self.error((*p, "natt_port"), "must differ from ike_port")
        return ServerConfig(
            listen=listen,
            ike_port=ike_port,
            natt_port=natt_port,
            control_socket=self.get(
                data, (*p, "control_socket"), str, d.control_socket
            ),
            log_level=self.choice(data, (*p, "log_level"), LOG_LEVELS, d.log_level),
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
        mode = self.choice(data, (*p, "mode"), ENGINE_MODES, d.mode)
        return EngineConfig(crypto=crypto, batch=batch, tun_mtu=mtu, mode=mode)

    def pool(self, name: str, data: dict[str, Any]) -> PoolConfig:
        p: PathKey = ("pools", name)
        self.table(data, p, {"range"})
        text = self.get(data, (*p, "range"), str, _REQUIRED)
        try:
            if "/" in text:
                net = ipaddress.IPv4Network(text, strict=False)
                hosts = list(net.hosts()) if net.num_addresses > 2 else list(net)
                first, last = hosts[0], hosts[-1]
            else:
                lo, _, hi = text.partition("-")
                first = ipaddress.IPv4Address(lo.strip())
                last = ipaddress.IPv4Address(hi.strip() or lo.strip())
        except (ValueError, IndexError):
            raise self.error(
                (*p, "range"), f"expected 'first-last' or a prefix, got {text!r}"
            ) from None
        if last < first:
            raise self.error((*p, "range"), f"{last} comes before {first}")
        return PoolConfig(name, first, last)

    def profile(
        self, index: int, data: dict[str, Any], pools: dict[str, PoolConfig]
    ) -> ProfileConfig:
        p: PathKey = ("profiles", index)
        self.table(data, p, {f.name for f in dataclasses.fields(ProfileConfig)})
        name = self.get(data, (*p, "name"), str, _REQUIRED)
        local_identity = self.get(data, (*p, "local_identity"), str, _REQUIRED)
        kind, sep, _ = local_identity.partition(":")
        if sep and kind not in IDENTITY_TYPES:
            raise self.error(
                (*p, "local_identity"),
                f"identity type {kind!r} is not one of {', '.join(IDENTITY_TYPES)}",
            )
        auth = self.choice(data, (*p, "auth"), AUTH_METHODS, "psk")
        psk = self.get(data, (*p, "psk"), str, _REQUIRED if auth == "psk" else "")
        if auth == "psk" and len(psk) < 16:
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
        for item in local_ts:
            try:
                ipaddress.IPv4Network(item)
            except ValueError:
                raise self.error(
                    (*p, "local_ts"), f"not an IPv4 prefix: {item!r}"
                ) from None
        esp = self.strings(data, (*p, "esp"), list(ESP_PROPOSALS))
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
            engine=engine,
        )


_REQUIRED = object()
