"""Network namespaces wired as one or more clients, headend and inside server.

Theory of operation::

    {prefix}-cli                 {prefix}-hub                   {prefix}-srv
    198.18.1.2/24 --veth-- 198.18.1.1/24   198.19.1.1/24 --veth-- 198.19.1.2/24
     {prefix}o1             {prefix}o0       {prefix}i0            {prefix}i1
                           ip_forward=1                  route 198.18.128.0/24
    {prefix}-cliN                 |                       via 198.19.1.1
    198.18.N.2/24 --veth-- 198.18.N.1/24
     {prefix}cN             {prefix}hN
     route 198.18.1.1/32 via 198.18.N.1

The "outer" link carries IKE and ESP between the client and the headend; the
"inside" link leads to the protected network. With `clients=N` the clients
2..N each get their own namespace and /24 link to the hub, and a host route
to the hub's first outer address, where the headend listens: two charons
cannot share a namespace (ports 500/4500 and kernel-libipsec's ipsec0). The
first client keeps the attributes `cli`, `cli_outer_if`, `cli_outer_ip`, ...;
`client_links` describes all of them. Each veth pair is created with
both ends placed straight into their namespaces, so no interface name ever
exists in the host namespace. IPv6 is switched off and both links get
permanent neighbour entries, so a capture on the outer link sees only the
IPv4 packets the peers send (no ND, MLD or ARP chatter). Where a case turns
IPv6 on, duplicate address detection and router solicitation are off, so the
addresses are usable at once (no neighbour solicitation waits out DAD).
Namespace names are unique per run: ``{prefix}-{tag}-hub`` and so on, where
the tag is the owner's PID and a short random part, so two runs with the
same prefix (``ESPGATE_LAB_PREFIX``) never share a namespace. Interface names
keep the bare prefix: they only ever exist inside the run's own namespaces.
Before a namespace is added, a marker ``/run/espgate-lab/<name>`` records
the owner's PID and start time; leaving the context deletes the namespaces
(which also deletes their veths) and their markers, whatever happened inside
the block. A namespace counts as stale, ours to delete, only if its marker
names an owner that is gone (no such PID, or one started later) and no
process runs in it; anything else with a name we want is refused with a
TopologyError, and nothing we cannot prove ours is ever deleted. With
`reuse_stale=True` entering also deletes the stale namespaces of earlier
runs with the same prefix; without it any existing name is refused.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from control.lab.procs import netns_argv

log = logging.getLogger("espgate.lab")

__all__ = [
    "MARKER_DIR",
    "ClientLink",
    "CommandError",
    "Topology",
    "TopologyError",
    "list_netns",
    "owner_alive",
]

# one file per lab namespace: who made it (PID and start time, JSON)
MARKER_DIR = Path("/run/espgate-lab")

MAX_CLIENTS = 9
# set in every namespace before any veth exists, so each one inherits them
IPV6_SYSCTLS = tuple(
    f"net.ipv6.conf.{scope}.{key}={value}"
    for scope in ("all", "default")
    for key, value in (
        ("disable_ipv6", 1),
        ("accept_dad", 0),
        ("dad_transmits", 0),
        ("router_solicitations", 0),
    )
)


class TopologyError(RuntimeError):
    """The lab namespaces could not be set up as asked."""


class CommandError(subprocess.CalledProcessError):
    """A lab command exited non-zero; the message carries its stderr."""

    def __str__(self) -> str:
        detail = (self.stderr or "").strip()
        return f"{super().__str__()}: {detail}" if detail else super().__str__()


def list_netns() -> list[str]:
    """Return the names of the named network namespaces on this host."""
    out = subprocess.run(
        ["ip", "netns", "list"], check=True, capture_output=True, text=True
    ).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _netns_pids(ns: str) -> list[int]:
    out = subprocess.run(
        ["ip", "netns", "pids", ns], capture_output=True, text=True
    ).stdout
    return [int(tok) for tok in out.split()]


def _start_time(pid: int) -> int | None:
    # field 22 of /proc/PID/stat (after the parenthesised command name)
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def owner_alive(marker: dict[str, object]) -> bool:
    """Return whether the process a namespace marker names still runs.

    A PID that now belongs to a process started at another time (reused)
    counts as gone.
    """
    pid, start = marker.get("owner"), marker.get("start")
    if not isinstance(pid, int) or pid <= 0:
        return False
    now = _start_time(pid)
    return now is not None and now == start


def _read_marker(ns: str, marker_dir: Path) -> dict[str, object] | None:
    try:
        doc = json.loads((marker_dir / ns).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _write_marker(ns: str, marker_dir: Path) -> None:
    marker_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    pid = os.getpid()
    doc = {"owner": pid, "start": _start_time(pid), "ns": ns}
    path = marker_dir / ns
    tmp = path.with_name(f".{ns}.tmp")
    tmp.write_text(json.dumps(doc) + "\n")
    os.replace(tmp, path)


@dataclass(frozen=True)
class ClientLink:
    """One client namespace and its outer link to the hub."""

    index: int
    ns: str
    outer_if: str
    outer_ip: str
    hub_if: str
    hub_ip: str


class Topology:
    """Create the cli(s)/hub/srv namespaces on enter and delete them on exit."""

    pool = "198.18.128.0/24"
    inside_net = "198.19.1.0/24"
    outer_net = "198.18.1.0/24"
    hub_outer_ip = "198.18.1.1"
    cli_outer_ip = "198.18.1.2"
    hub_inside_ip = "198.19.1.1"
    srv_ip = "198.19.1.2"

    def __init__(
        self,
        prefix: str = "eg",
        workdir: Path | None = None,
        *,
        reuse_stale: bool = False,
        clients: int = 1,
        tag: str | None = None,
        marker_dir: Path = MARKER_DIR,
    ) -> None:
        # interface names are {prefix}o0 etc.; Linux allows 15 characters
        assert 1 <= len(prefix) <= 12, f"Prefix too long for interface names: {prefix}"
        assert 1 <= clients <= MAX_CLIENTS, f"Clients out of range 1..9: {clients}"
        self.prefix = prefix
        # unique per run: the owner's PID and a random part (two per process)
        self.tag = tag or f"{os.getpid()}-{secrets.token_hex(2)}"
        assert "/" not in self.tag and "-" not in self.tag[:1], f"Bad tag {self.tag}"
        self.marker_dir = Path(marker_dir)
        self.workdir = Path(workdir) if workdir is not None else None
        self.reuse_stale = reuse_stale
        base = f"{prefix}-{self.tag}"
        self.hub = f"{base}-hub"
        self.cli = f"{base}-cli"
        self.srv = f"{base}-srv"
        self.hub_outer_if = f"{prefix}o0"
        self.cli_outer_if = f"{prefix}o1"
        self.hub_inside_if = f"{prefix}i0"
        self.srv_if = f"{prefix}i1"
        self.client_links = [
            ClientLink(
                1,
                self.cli,
                self.cli_outer_if,
                self.cli_outer_ip,
                self.hub_outer_if,
                self.hub_outer_ip,
            )
        ]
        for n in range(2, clients + 1):
            self.client_links.append(
                ClientLink(
                    n,
                    f"{base}-cli{n}",
                    f"{prefix}c{n}",
                    f"198.18.{n}.2",
                    f"{prefix}h{n}",
                    f"198.18.{n}.1",
                )
            )
        self._created: list[str] = []

    @property
    def namespaces(self) -> tuple[str, ...]:
        """Return the namespace names (hub, cli, srv, then cli2 ...)."""
        extra = tuple(link.ns for link in self.client_links[1:])
        return (self.hub, self.cli, self.srv, *extra)

    def client_link(self, index: int) -> ClientLink:
        """Return the link of client `index` (1 is the first client)."""
        assert 1 <= index <= len(self.client_links), f"No client {index}"
        return self.client_links[index - 1]

    def __enter__(self) -> Topology:
        try:
            self._clear_stale()
            self._build()
        except BaseException:
            self.close()
            raise
        log.info("lab topology %s up", self.prefix)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def run(
        self,
        ns: str | None,
        argv: Sequence[str],
        check: bool = True,
        timeout: float = 30.0,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` inside namespace `ns` (host when None) and capture text."""
        return _run(netns_argv(ns, argv), check=check, timeout=timeout, input=input)

    def close(self) -> None:
        """Delete every namespace this topology created, and its marker."""
        for ns in reversed(self._created):
            pids = _netns_pids(ns)
            if pids:
                log.warning("namespace %s still has processes %s", ns, pids)
            res = _run(["ip", "netns", "del", ns], check=False)
            if res.returncode != 0:
                log.error("could not delete namespace %s: %s", ns, res.stderr.strip())
            elif ns not in list_netns():
                (self.marker_dir / ns).unlink(missing_ok=True)
        self._created.clear()

    def stale_reason(self, ns: str) -> str | None:
        """Return why existing namespace `ns` is not ours to delete, or None.

        None means its marker proves an earlier lab run made it, that run's
        process is gone and nothing runs in it any more.
        """
        marker = _read_marker(ns, self.marker_dir)
        if marker is None or marker.get("ns") != ns:
            return f"no marker {self.marker_dir / ns} says an espgate lab made it"
        if owner_alive(marker):
            return f"its owner, PID {marker['owner']}, still runs"
        pids = _netns_pids(ns)
        if pids:
            return f"processes {pids} still run in it; stop them first"
        return None

    def _delete_stale(self, ns: str) -> None:
        log.info("deleting stale namespace %s of an ended lab run", ns)
        _run(["ip", "netns", "del", ns])
        (self.marker_dir / ns).unlink(missing_ok=True)

    def _clear_stale(self) -> None:
        existing = set(list_netns())
        # leftovers of earlier runs with this prefix: delete what is provably
        # ours and abandoned, leave (and mention) everything else
        if self.reuse_stale:
            for ns in sorted(existing - set(self.namespaces)):
                if not ns.startswith(f"{self.prefix}-"):
                    continue
                if (self.marker_dir / ns).exists() and self.stale_reason(ns) is None:
                    self._delete_stale(ns)
                    existing.discard(ns)
        for ns in self.namespaces:
            if ns not in existing:
                continue
            why = self.stale_reason(ns) if self.reuse_stale else "reuse_stale is off"
            if why is not None:
                raise TopologyError(
                    f"Namespace {ns} already exists and is not a stale lab "
                    f"namespace of ours ({why}); not touching it"
                )
            self._delete_stale(ns)

    def _build(self) -> None:
        # namespaces, loopback, no IPv6 (keeps ND and MLD off the captures);
        # a case that turns IPv6 on gets addresses usable at once: no duplicate
        # address detection, which leaves link-locals tentative for a second or
        # two so neighbour solicitations wait and the first pings queue behind
        # them, and no router solicitations (no router here)
        for ns in self.namespaces:
            # the marker first: a crash right after the add still leaves proof
            _write_marker(ns, self.marker_dir)
            res = _run(["ip", "netns", "add", ns], check=False)
            if res.returncode != 0:
                # someone else's namespace appeared meanwhile: not ours to delete
                (self.marker_dir / ns).unlink(missing_ok=True)
                raise CommandError(res.returncode, res.args, res.stdout, res.stderr)
            self._created.append(ns)
            self.run(ns, ["ip", "link", "set", "lo", "up"])
            self.run(ns, ["sysctl", "-q", "-w", *IPV6_SYSCTLS])

        # the veth links, each end created directly inside its namespace
        links = [
            (self.hub, link.hub_if, link.hub_ip, link.ns, link.outer_if, link.outer_ip)
            for link in self.client_links
        ]
        links.append(
            (self.hub, self.hub_inside_if, self.hub_inside_ip,
             self.srv, self.srv_if, self.srv_ip)
        )  # fmt: skip
        for ns_a, if_a, ip_a, ns_b, if_b, ip_b in links:
            _run(
                [
                    "ip", "link", "add", if_a, "netns", ns_a, "type", "veth",
                    "peer", "name", if_b, "netns", ns_b,
                ]
            )  # fmt: skip
            for ns, ifname, ip in ((ns_a, if_a, ip_a), (ns_b, if_b, ip_b)):
                self.run(ns, ["ip", "addr", "add", f"{ip}/24", "dev", ifname])
                self.run(ns, ["ip", "link", "set", ifname, "up"])
            self._pin_neighbours(ns_a, if_a, ip_a, ns_b, if_b, ip_b)

        # forwarding in the hub, and the way back to the pool from the server
        self.run(self.hub, ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])
        self.run(self.srv, ["ip", "route", "add", self.pool, "via", self.hub_inside_ip])
        for link in self.client_links[1:]:
            self.run(
                link.ns,
                ["ip", "route", "add", f"{self.hub_outer_ip}/32", "via", link.hub_ip],
            )
        if self.workdir is not None:
            self.workdir.mkdir(parents=True, exist_ok=True)
            (self.workdir / "topology.json").write_text(
                json.dumps(self.describe(), indent=2) + "\n"
            )

    def _pin_neighbours(
        self, ns_a: str, if_a: str, ip_a: str, ns_b: str, if_b: str, ip_b: str
    ) -> None:
        mac_a = self._mac(ns_a, if_a)
        mac_b = self._mac(ns_b, if_b)
        for ns, ifname, peer_ip, peer_mac in (
            (ns_a, if_a, ip_b, mac_b),
            (ns_b, if_b, ip_a, mac_a),
        ):
            self.run(
                ns,
                [
                    "ip", "neigh", "replace", peer_ip, "lladdr", peer_mac,
                    "dev", ifname, "nud", "permanent",
                ],
            )  # fmt: skip

    def _mac(self, ns: str, ifname: str) -> str:
        out = self.run(ns, ["ip", "-j", "link", "show", "dev", ifname]).stdout
        return str(json.loads(out)[0]["address"])

    def describe(self) -> dict[str, object]:
        """Return names and addresses of the topology as a flat dict."""
        return {
            "tag": self.tag,
            "clients": [dataclasses.asdict(link) for link in self.client_links],
            "hub": self.hub,
            "cli": self.cli,
            "srv": self.srv,
            "hub_outer_if": self.hub_outer_if,
            "cli_outer_if": self.cli_outer_if,
            "hub_inside_if": self.hub_inside_if,
            "srv_if": self.srv_if,
            "hub_outer_ip": self.hub_outer_ip,
            "cli_outer_ip": self.cli_outer_ip,
            "hub_inside_ip": self.hub_inside_ip,
            "srv_ip": self.srv_ip,
            "pool": self.pool,
            "inside_net": self.inside_net,
        }


def _run(
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float = 30.0,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(
        list(argv), capture_output=True, text=True, timeout=timeout, input=input
    )
    if check and res.returncode != 0:
        raise CommandError(res.returncode, list(argv), res.stdout, res.stderr)
    return res
