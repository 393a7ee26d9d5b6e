"""Real strongSwan 5.9.8 peers (charon + swanctl) inside the lab namespaces.

Theory of operation: each peer gets a private directory holding its own
`strongswan.conf` (load_modular = no and an explicit plugin list, so nothing
under /etc/strongswan.d is read), a `swanctl/swanctl.conf` with the connection
and the PSK (mode 0600: the key lives only in this file), a `run/` directory
bind-mounted over /run (charon's pid file path is fixed) and the vici socket.
charon starts as

    ip netns exec NS unshare -m sh -c 'mount --bind RUN /run && exec charon'

where every step execs, so the PID a `ProcessSet` records is charon's own.
Once the vici socket accepts connections, `swanctl --load-all` pushes the
connection, pool and secret over vici. swanctl runs in the host namespace; a
unix socket is reachable by path from any network namespace.

The machine's kernel has no ESP, so both peers use `kernel-libipsec`: ESP runs
inside charon on a TUN device `ipsec0`, and 5.9.8 then always encapsulates ESP
in UDP 4500. charon logs IKE, CFG, KNL and ENC (message summaries) to
`charon.log`; no level above 2 is used, so keys never reach it.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from control.lab.procs import ManagedProcess, ProcessSet
from control.lab.topology import Topology

log = logging.getLogger("espgate.lab")

__all__ = [
    "StrongSwanClient",
    "StrongSwanError",
    "StrongSwanResponder",
    "parse_raw",
    "render_settings",
]

CHARON = "/usr/lib/ipsec/charon"
SWANCTL = "swanctl"

# kernel-libipsec must come before kernel-netlink (INTEROP-NOTES.md); no
# "resolve": it would rewrite the host's /etc/resolv.conf
PLUGINS = (
    "random nonce drbg openssl aes sha1 sha2 md5 hmac gcm gmp curve25519 kdf pem "
    "pkcs1 pkcs8 x509 revocation constraints pubkey kernel-libipsec kernel-netlink "
    "socket-default vici updown counters eap-identity eap-md5 eap-mschapv2"
)

# sun_path is 108 bytes including the terminating NUL
_MAX_SOCKET_PATH = 107

Settings = Mapping[str, Any]


class StrongSwanError(RuntimeError):
    """A strongSwan peer could not be started or driven."""


def render_settings(settings: Settings, indent: int = 0) -> str:
    """Render a nested mapping in strongSwan's settings syntax (key = value)."""
    pad = "    " * indent
    lines: list[str] = []
    for key, value in settings.items():
        assert re.fullmatch(r"[\w.%*-]+", key), f"Bad settings key: {key!r}"
        if isinstance(value, Mapping):
            lines.append(f"{pad}{key} {{")
            lines.append(render_settings(value, indent + 1))
            lines.append(f"{pad}}}")
        else:
            lines.append(f"{pad}{key} = {_render_value(value)}")
    return "\n".join(line for line in lines if line)


def _render_value(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple):
        return ", ".join(_render_value(v) for v in value)
    text = str(value)
    assert not re.search(r"[\n\"{}]", text), f"Bad settings value: {text!r}"
    if re.search(r"[\s#,=]", text):
        return f'"{text}"'
    return text


def _merge(base: dict[str, Any], extra: Settings | None) -> dict[str, Any]:
    if extra:
        for key, value in extra.items():
            if isinstance(value, Mapping) and isinstance(base.get(key), dict):
                _merge(base[key], value)
            else:
                base[key] = value
    return base


# vici keys are lowercase words with dashes; anything else that contains "="
# continues the previous value (a DN such as "C=CH, O=x, CN=y")
_RAW_TOKEN = re.compile(r"\{|\}|\[[^\]]*\]|[^\s{}\[\]]+")
_RAW_KEY = re.compile(r"^([a-z0-9][a-z0-9_-]*)=(.*)$", re.DOTALL)


def parse_raw(text: str) -> dict[str, Any]:
    """Parse `swanctl --raw` output (one or more vici messages) into dicts.

    Sections become dicts, lists become lists of strings, everything else is
    a string. The outermost message label ("list-sa event") is dropped and the
    sections of all messages are merged.
    """
    result: dict[str, Any] = {}
    for line in text.splitlines():
        line = line.strip()
        brace = line.find("{")
        if brace < 0:
            continue
        tokens = _RAW_TOKEN.findall(line[brace:])
        stack: list[dict[str, Any]] = [result]
        last_key: str | None = None
        pending: str | None = None
        # the label's own "{" opens the message, which maps onto result
        for tok in tokens[1:]:
            if tok == "{":
                assert pending is not None, "Section without a name in raw output"
                child: dict[str, Any] = stack[-1].setdefault(pending, {})
                stack.append(child)
                pending = last_key = None
            elif tok == "}":
                if pending is not None:
                    _continue_value(stack[-1], last_key, pending)
                    pending = None
                if len(stack) == 1:
                    break
                stack.pop()
                last_key = None
            else:
                if pending is not None:
                    _continue_value(stack[-1], last_key, pending)
                    pending = None
                m = _RAW_KEY.match(tok)
                if m:
                    last_key = m.group(1)
                    stack[-1][last_key] = m.group(2)
                elif tok.startswith("[") and last_key is not None:
                    stack[-1][last_key] = tok[1:-1].split()
                else:
                    pending = tok
    return result


def _continue_value(section: dict[str, Any], key: str | None, token: str) -> None:
    if key is None or not isinstance(section.get(key), str):
        return
    section[key] = f"{section[key]} {token}"


class _Charon:
    """What the client and the responder share: files, process, swanctl."""

    conn_name = "espgate"
    role = "peer"

    def __init__(
        self,
        topo: Topology,
        workdir: Path,
        ns: str,
        *,
        psk: bytes,
        charon_conf: Settings | None,
        files: Mapping[str, bytes] | None = None,
    ) -> None:
        assert psk, "PSK must not be empty"
        self._files = dict(files or {})
        self.topo = topo
        self.ns = ns
        self.workdir = Path(workdir).resolve()
        assert not str(self.workdir).startswith("/run"), "workdir must not be in /run"
        self._psk = psk
        self._charon_conf = charon_conf
        self.run_dir = self.workdir / "run"
        self.swanctl_dir = self.workdir / "swanctl"
        self.conf_path = self.workdir / "strongswan.conf"
        self.swanctl_conf_path = self.swanctl_dir / "swanctl.conf"
        self.log_path = self.workdir / "charon.log"
        self.vici_path = self.workdir / "charon.vici"
        assert len(str(self.vici_path)) <= _MAX_SOCKET_PATH, (
            f"Vici socket path too long for AF_UNIX: {self.vici_path}"
        )
        self.uri = f"unix://{self.vici_path}"
        self.proc: ManagedProcess | None = None

    # --- files

    def write_config(self) -> None:
        """Write strongswan.conf and swanctl.conf under the work directory."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.run_dir.mkdir(exist_ok=True)
        self.swanctl_dir.mkdir(exist_ok=True)
        for sub in ("conf.d", "x509", "x509ca", "private", "rsa", "ecdsa", "pkcs8"):
            (self.swanctl_dir / sub).mkdir(exist_ok=True)
        self.conf_path.write_text(render_settings(self._strongswan_conf()) + "\n")

        # certificates and keys, by swanctl sub-path ("x509/a.pem", "private/a.key")
        for name, data in self._files.items():
            target = (self.swanctl_dir / name).resolve()
            assert target.parent.parent == self.swanctl_dir.resolve(), (
                f"File outside the swanctl directory: {name}"
            )
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)

        # the PSK exists only here, never on a command line or in a log
        fd = os.open(
            self.swanctl_conf_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600
        )
        with os.fdopen(fd, "w") as fh:
            fh.write(render_settings(self._swanctl_conf()) + "\n")
        os.chmod(self.swanctl_conf_path, 0o600)

    def _strongswan_conf(self) -> dict[str, Any]:
        charon: dict[str, Any] = {
            "load_modular": False,
            "load": PLUGINS,
            "install_routes": True,
            "retransmit_tries": 3,
            "retransmit_timeout": 2.0,
            "plugins": {"vici": {"socket": self.uri}},
            "filelog": {
                "lab": {
                    "path": str(self.log_path),
                    "time_format": "%H:%M:%S",
                    "append": False,
                    "flush_line": True,
                    "ike_name": True,
                    # levels above 2 would dump key material
                    "default": 1,
                    "ike": 2,
                    "cfg": 2,
                    "knl": 2,
                    "enc": 1,
                    "net": 1,
                    "chd": 1,
                    "lib": 1,
                },
            },
            "syslog": {"daemon": {"default": -1}},
        }
        return {
            "charon": _merge(charon, self._charon_conf),
            "swanctl": {
                "load": "pem pkcs1 pkcs8 x509 revocation constraints pubkey openssl"
            },
        }

    def _swanctl_conf(self) -> dict[str, Any]:
        raise NotImplementedError

    def _psk_value(self) -> str:
        return "0x" + self._psk.hex()

    # --- process

    def start(self, procs: ProcessSet, *, timeout: float = 10.0) -> None:
        """Start charon in the namespace, wait for vici and load the config."""
        assert self.proc is None, "charon already started"
        self.write_config()
        if self.log_path.exists():
            self.log_path.unlink()
        if self.vici_path.exists():
            self.vici_path.unlink()
        script = 'mount --bind "$1" /run && exec "$2"'
        self.proc = procs.start(
            f"charon-{self.role}-{self.ns}",
            ["unshare", "-m", "sh", "-c", script, "sh", str(self.run_dir), CHARON],
            ns=self.ns,
            env={"STRONGSWAN_CONF": str(self.conf_path)},
        )
        self._wait_vici(timeout)
        self.swanctl("--load-all", "--noprompt")
        log.info("charon %s up in %s (pid %d)", self.role, self.ns, self.proc.pid)

    def _wait_vici(self, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.proc.alive():
                raise StrongSwanError(
                    f"charon in {self.ns} exited with {self.proc.popen.returncode}: "
                    f"{self.proc.stderr_text()[-500:]}{self.log_tail()}"
                )
            if self.vici_path.exists():
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                    try:
                        sock.connect(str(self.vici_path))
                        return
                    except OSError:
                        pass
            time.sleep(0.05)
        raise StrongSwanError(
            f"charon in {self.ns} opened no vici socket in {timeout}s"
        )

    def swanctl(
        self, *args: str, timeout: float = 30.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run swanctl against this charon's vici socket."""
        env = dict(os.environ)
        env["STRONGSWAN_CONF"] = str(self.conf_path)
        env["SWANCTL_DIR"] = str(self.swanctl_dir)
        argv = [SWANCTL, *args, "--uri", self.uri]
        res = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, env=env
        )
        if check and res.returncode != 0:
            raise StrongSwanError(
                f"swanctl {args[0]} failed ({res.returncode}): "
                f"{(res.stderr or res.stdout).strip()[-500:]}"
            )
        return res

    def log_tail(self, nbytes: int = 2000) -> str:
        """Return the end of charon's log for error messages."""
        try:
            return "\n" + self.log_path.read_text(errors="replace")[-nbytes:]
        except FileNotFoundError:
            return ""

    # --- what charon logged

    def received_attributes(self) -> list[str]:
        """Return the config attribute names charon logged as received, in order.

        charon logs "processing UNITY_BANNER attribute" (ike level 2) for every
        attribute of a CFG_REPLY; a payload it does not take (CFG_SET) is logged
        as "ignoring CFG_SET config payload" instead, see `ignored_cp_types`.
        """
        return self._log_matches(r"processing (\S+) attribute")

    def ignored_cp_types(self) -> list[str]:
        """Return the CP payload types charon logged as ignored ("CFG_SET")."""
        return self._log_matches(r"ignoring (\S+) config payload")

    def vendor_ids_sent(self) -> list[str]:
        """Return the names of the vendor IDs charon logged as sent (ike level 2)."""
        return self._log_matches(r"sending (.+?) vendor ID")

    def _log_matches(self, pattern: str) -> list[str]:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return []
        return [m.group(1) for m in re.finditer(pattern, text)]

    # --- state

    def list_sas(self) -> dict[str, Any]:
        """Return the IKE SAs from `swanctl --list-sas --raw`, keyed by name.

        Each value holds vici's fields as strings ("state", "local-vips",
        "remote-vips", ...) and "child-sas" keyed by the child's unique name,
        whose values have "state", "spi-in", "spi-out", "encr-alg",
        "encr-keysize", "bytes-in", "packets-in", "bytes-out", "packets-out".
        """
        res = self.swanctl("--list-sas", "--raw")
        return parse_raw(res.stdout)

    def sa_summary(self) -> dict[str, Any] | None:
        """Return the first IKE SA and its first CHILD SA as one flat dict."""
        sas = self.list_sas()
        if not sas:
            return None
        ike = next(iter(sas.values()))
        children = ike.get("child-sas") or {}
        child: dict[str, Any] = next(iter(children.values()), {})

        def num(key: str) -> int | None:
            value = child.get(key)
            return int(value) if isinstance(value, str) and value.isdigit() else None

        vips = ike.get("local-vips") or ike.get("remote-vips") or []
        return {
            "state": ike.get("state"),
            "virtual_ip": vips[0] if vips else None,
            "remote_host": ike.get("remote-host"),
            "remote_port": ike.get("remote-port"),
            "child_state": child.get("state"),
            "encap": child.get("encap") == "yes",
            "spi_in": child.get("spi-in"),
            "spi_out": child.get("spi-out"),
            "encr_alg": child.get("encr-alg"),
            "encr_keysize": num("encr-keysize"),
            "bytes_in": num("bytes-in"),
            "packets_in": num("packets-in"),
            "bytes_out": num("bytes-out"),
            "packets_out": num("packets-out"),
            "local_ts": child.get("local-ts"),
            "remote_ts": child.get("remote-ts"),
        }


class StrongSwanClient(_Charon):
    """A strongSwan road-warrior client in one of the lab's client namespaces.

    `client` picks the namespace: 1 is `cli`, n the n-th of `Topology(clients=N)`.
    `files` are written under the swanctl directory (certificates, keys), and
    `extra_conf` merges into the connection (e.g. local auth = pubkey).
    """

    role = "client"

    def __init__(
        self,
        topo: Topology,
        workdir: Path,
        *,
        remote_id: str = "vpn.espgate.example",
        local_id: str = "client1@espgate.example",
        psk: bytes = b"espgate-lab-psk-not-secret",
        esp: str = "aes128gcm16",
        ike: str = "aes128gcm16-prfsha256-ecp256",
        remote_ts: str = "198.19.1.0/24",
        request_vip: bool = True,
        remote_addr: str | None = None,
        extra_conf: Settings | None = None,
        charon_conf: Settings | None = None,
        client: int = 1,
        files: Mapping[str, bytes] | None = None,
    ) -> None:
        self.link = topo.client_link(client)
        super().__init__(
            topo,
            workdir,
            self.link.ns,
            psk=psk,
            charon_conf=charon_conf,
            files=files,
        )
        self.remote_id = remote_id
        self.local_id = local_id
        self.esp = esp
        self.ike = ike
        self.remote_ts = remote_ts
        self.request_vip = request_vip
        self.remote_addr = remote_addr or topo.hub_outer_ip
        self.extra_conf = extra_conf

    def _swanctl_conf(self) -> dict[str, Any]:
        conn: dict[str, Any] = {
            "version": 2,
            "local_addrs": self.link.outer_ip,
            "remote_addrs": self.remote_addr,
            "proposals": self.ike,
            "encap": True,
            "local": {"auth": "psk", "id": self.local_id},
            "remote": {"auth": "psk", "id": self.remote_id},
            "children": {
                self.conn_name: {
                    "remote_ts": self.remote_ts,
                    "esp_proposals": self.esp,
                    "start_action": "none",
                },
            },
        }
        if self.request_vip:
            conn["vips"] = "0.0.0.0"
        return {
            "connections": {self.conn_name: _merge(conn, self.extra_conf)},
            "secrets": {
                "ike-lab": {
                    "id-1": self.local_id,
                    "id-2": self.remote_id,
                    "secret": self._psk_value(),
                },
            },
        }

    def initiate(self, timeout: float = 20.0) -> bool:
        """Bring the tunnel up; tell whether the CHILD SA got established."""
        res = self.swanctl(
            "--initiate",
            "--child",
            self.conn_name,
            "--timeout",
            str(max(1, int(timeout))),
            timeout=timeout + 10,
            check=False,
        )
        if res.returncode != 0:
            log.warning("initiate failed: %s", res.stderr.strip()[-300:])
            return False
        return True

    def terminate(self, timeout: float = 10.0) -> bool:
        """Delete the IKE SA (and its CHILD SAs); tell whether it went cleanly."""
        res = self.swanctl(
            "--terminate",
            "--ike",
            self.conn_name,
            "--timeout",
            str(max(1, int(timeout))),
            timeout=timeout + 10,
            check=False,
        )
        return res.returncode == 0

    def virtual_ip(self) -> str | None:
        """Return the virtual IP the headend handed out, if any."""
        summary = self.sa_summary()
        return summary["virtual_ip"] if summary else None


class StrongSwanResponder(_Charon):
    """A strongSwan PSK responder with an address pool in the hub namespace."""

    role = "responder"

    def __init__(
        self,
        topo: Topology,
        workdir: Path,
        *,
        local_id: str = "vpn.espgate.example",
        remote_id: str = "%any",
        psk: bytes = b"espgate-lab-psk-not-secret",
        esp: str = "aes128gcm16-aes256gcm16",
        ike: str = "aes128gcm16-aes256gcm16-prfsha256-prfsha384-ecp256-x25519",
        local_ts: str = "198.19.1.0/24",
        pool: str | None = None,
        extra_conf: Settings | None = None,
        charon_conf: Settings | None = None,
    ) -> None:
        super().__init__(topo, workdir, topo.hub, psk=psk, charon_conf=charon_conf)
        self.local_id = local_id
        self.remote_id = remote_id
        self.esp = esp
        self.ike = ike
        self.local_ts = local_ts
        self.pool = pool or topo.pool
        self.extra_conf = extra_conf

    def _swanctl_conf(self) -> dict[str, Any]:
        conn: dict[str, Any] = {
            "version": 2,
            "local_addrs": self.topo.hub_outer_ip,
            "proposals": self.ike,
            "pools": "lab-pool",
            "local": {"auth": "psk", "id": self.local_id},
            "remote": {"auth": "psk", "id": self.remote_id},
            "children": {
                self.conn_name: {
                    "local_ts": self.local_ts,
                    "esp_proposals": self.esp,
                },
            },
        }
        # a secret bound only to our own identity serves every client
        return {
            "connections": {self.conn_name: _merge(conn, self.extra_conf)},
            "pools": {"lab-pool": {"addrs": self.pool}},
            "secrets": {"ike-lab": {"id": self.local_id, "secret": self._psk_value()}},
        }
