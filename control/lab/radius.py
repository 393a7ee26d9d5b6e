"""A FreeRADIUS server for the lab, with a minimal configuration of our own.

Theory of operation: Debian's stock configuration wants TLS certificates for
its EAP module, so `FreeRadius` writes a small one into its work directory:
`radiusd.conf` with one client (the headend, by address), one virtual server
listening on `address:port`, the `eap` module with EAP-MD5 and EAP-MSCHAPv2
only, `pap` (for requests that fetch PSKs or authorization), `mschap`
(which the MSCHAPv2 method calls and which adds the MS-MPPE keys to the
Access-Accept) and `files` reading a users file made from
`RadiusUser` entries: a cleartext password and reply attributes. Every
client must sign its requests (`require_message_authenticator`).

It runs as `freeradius -f -l stdout -d DIR` inside a namespace, started and
stopped through the lab's `ProcessSet`, so a case never leaves it behind.
The users file and the secret exist only in one case's work directory.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from control.lab.procs import ManagedProcess, ProcessSet, netns_argv

__all__ = ["FreeRadius", "RadiusUser"]


@dataclass
class RadiusUser:
    """One users-file entry: name, password, reply attributes as (name, value)."""

    name: str
    password: str = field(repr=False)
    reply: list[tuple[str, str]] = field(default_factory=list)

    def entry(self) -> str:
        # users(5): check items on the first line, reply items indented after
        lines = [f'"{self.name}" Cleartext-Password := "{self.password}"']
        for index, (attr, value) in enumerate(self.reply):
            sep = "," if index < len(self.reply) - 1 else ""
            op = "+=" if attr == "Cisco-AVPair" else "="
            lines.append(f"\t{attr} {op} {_quote(value)}{sep}")
        return "\n".join(lines) + "\n"


def _quote(value: str) -> str:
    return value if value.replace(".", "").isdigit() else f'"{value}"'


RADIUSD_CONF = """\
prefix = /usr
exec_prefix = /usr
sysconfdir = /etc
localstatedir = /var
sbindir = /usr/sbin
logdir = {dir}
raddbdir = {dir}
radacctdir = {dir}
name = freeradius
confdir = {dir}
modconfdir = {dir}
certdir = {dir}
cadir = {dir}
run_dir = {dir}
db_dir = {dir}
libdir = /usr/lib/freeradius
pidfile = {dir}/radiusd.pid
max_request_time = 30
cleanup_delay = 2
max_requests = 1024
hostname_lookups = no

log {{
    destination = stdout
    auth = yes
    auth_badpass = no
    auth_goodpass = no
}}

security {{
    allow_core_dumps = no
    max_attributes = 200
    reject_delay = 0
    status_server = no
}}

thread pool {{
    start_servers = 2
    max_servers = 4
    min_spare_servers = 1
    max_spare_servers = 3
    max_requests_per_server = 0
}}

client headend {{
    ipaddr = {client}
    secret = {secret}
    require_message_authenticator = yes
    nas_type = other
}}

modules {{
    files {{
        filename = {dir}/users
    }}
    pap {{
    }}
    mschap {{
        use_mppe = yes
        require_encryption = yes
        require_strong = yes
    }}
    eap {{
        default_eap_type = {default_eap}
        timer_expire = 60
        ignore_unknown_eap_types = no
        max_sessions = 1024
        md5 {{
        }}
        mschapv2 {{
            send_error = no
        }}
    }}
}}

server lab {{
    listen {{
        type = auth
        ipaddr = {address}
        port = {port}
    }}
    authorize {{
        eap {{
            ok = return
        }}
        files
        pap
    }}
    authenticate {{
        Auth-Type PAP {{
            pap
        }}
        Auth-Type MS-CHAP {{
            mschap
        }}
        eap
    }}
    post-auth {{
        # FreeRADIUS 3.2.1 signs EAP answers only; the headend wants every
        # answer signed, and a Message-Authenticator in the reply makes it so
        update reply {{
            Message-Authenticator := 0x00
        }}
        Post-Auth-Type REJECT {{
            eap
            update reply {{
                Message-Authenticator := 0x00
            }}
        }}
    }}
}}
"""


class FreeRadius:
    """FreeRADIUS in a namespace, configured for EAP-MD5 and EAP-MSCHAPv2."""

    def __init__(
        self,
        workdir: Path,
        ns: str,
        users: list[RadiusUser],
        *,
        secret: str,
        address: str = "127.0.0.1",
        port: int = 18120,
        client: str = "127.0.0.0/8",
        default_eap: str = "md5",
    ) -> None:
        self.workdir = workdir
        self.ns = ns
        self.users = users
        self.secret = secret
        self.address = address
        self.port = port
        self.client = client
        self.default_eap = default_eap
        self.proc: ManagedProcess | None = None

    def write_config(self) -> None:
        """Write radiusd.conf, the users file and the dictionary include."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.workdir.chmod(0o700)
        conf = RADIUSD_CONF.format(
            dir=self.workdir,
            client=self.client,
            secret=self.secret,
            address=self.address,
            port=self.port,
            default_eap=self.default_eap,
        )
        # the shared secret and the cleartext passwords: owner only
        _write_private(self.workdir / "radiusd.conf", conf)
        _write_private(
            self.workdir / "users", "".join(u.entry() for u in self.users)
        )
        (self.workdir / "dictionary").write_text(
            "$INCLUDE /usr/share/freeradius/dictionary\n"
        )

    def start(self, procs: ProcessSet, timeout: float = 10.0) -> None:
        """Start the server and wait until its port is bound."""
        self.write_config()
        argv = ["freeradius", "-f", "-l", "stdout", "-d", str(self.workdir)]
        self.proc = procs.start(f"freeradius-{self.port}", argv, ns=self.ns)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.proc.alive():
                raise RuntimeError(
                    "freeradius exited at start:\n" + self.proc.stdout_text()[-3000:]
                )
            if "Ready to process requests" in self.proc.stdout_text():
                return
            time.sleep(0.05)
        raise RuntimeError(f"freeradius not ready within {timeout:.0f} s")

    def log_text(self) -> str:
        """Return what the server logged so far."""
        return self.proc.stdout_text() if self.proc is not None else ""

    def argv_in_ns(self, argv: list[str]) -> list[str]:
        return netns_argv(self.ns, argv)


def free_port() -> int:
    """Return a UDP port number that is free on the host right now (a hint)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
