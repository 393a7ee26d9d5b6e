"""A real DHCP server for the lab: dnsmasq in a namespace, DHCP only.

Theory of operation: `Dnsmasq` runs ``dnsmasq --keep-in-foreground`` with no
configuration file and DNS switched off (``--port=0``), serving one range
that is not on any of its links: the headend relays for its clients with
`giaddr` inside that range's subnet (RFC 2131 4.1), so dnsmasq picks the
range by giaddr and answers to giaddr:67. Leases go to a file in the case's
work directory, which a case reads to see what the server granted and
whether a lease was released. The process is started and stopped through
the lab's `ProcessSet`.
"""

from __future__ import annotations

import time
from pathlib import Path

from control.lab.procs import ManagedProcess, ProcessSet

__all__ = ["Dnsmasq"]


class Dnsmasq:
    """dnsmasq as a DHCP server for one relayed range."""

    def __init__(
        self,
        workdir: Path,
        ns: str,
        interface: str,
        first: str,
        last: str,
        netmask: str = "255.255.255.0",
        lease_time: str = "2m",
        dns: str | None = None,
    ) -> None:
        self.workdir = workdir
        self.ns = ns
        self.interface = interface
        self.first, self.last, self.netmask = first, last, netmask
        self.lease_time = lease_time
        self.dns = dns
        self.lease_file = workdir / "dnsmasq.leases"
        self.proc: ManagedProcess | None = None

    def argv(self) -> list[str]:
        argv = [
            "dnsmasq",
            "--keep-in-foreground",
            "--log-facility=-",
            "--log-dhcp",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--port=0",
            f"--pid-file={self.workdir / 'dnsmasq.pid'}",
            f"--dhcp-leasefile={self.lease_file}",
            f"--interface={self.interface}",
            "--bind-interfaces",
            "--dhcp-authoritative",
            f"--dhcp-range={self.first},{self.last},{self.netmask},{self.lease_time}",
        ]
        if self.dns:
            argv.append(f"--dhcp-option=option:dns-server,{self.dns}")
        return argv

    def start(self, procs: ProcessSet, timeout: float = 10.0) -> None:
        """Start dnsmasq and wait until it serves DHCP."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = procs.start("dnsmasq", self.argv(), ns=self.ns)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.proc.alive():
                raise RuntimeError(
                    f"dnsmasq exited:\n{self.proc.stderr_text()[-2000:]}"
                )
            if "DHCP, IP range" in self.proc.stderr_text():
                return
            time.sleep(0.05)
        raise RuntimeError(f"dnsmasq not ready within {timeout:.0f} s")

    def leases(self) -> list[str]:
        """Return the leased addresses in the lease file."""
        if not self.lease_file.exists():
            return []
        return [line.split()[2] for line in self.lease_file.read_text().splitlines()
                if len(line.split()) > 2]  # fmt: skip

    def log_text(self) -> str:
        return self.proc.stderr_text() if self.proc is not None else ""
