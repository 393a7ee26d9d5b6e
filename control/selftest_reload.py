"""Self-test cases for reload-safe sequence numbers (issue 4).

Theory of operation: each case takes a running :class:`HeadendLab`, swaps
its headend for one with ``engine.dataplane = "process"`` and a state
directory of the lab's own (`_Headend`), brings a real strongSwan client up
and keeps traffic running (a 20/s ping and back-to-back hashed TCP
transfers) while it restarts parts of the headend:

    reload-dataplane    `espgate reload dataplane`, N times
    reload-crash-loop   kill -9 of the dataplane child or of the whole daemon
                        at random moments, each followed by a restart
    power-cut-store     the daemon runs its store as the fsync model
                        (SnapshotStore, ESPGATE_POWER_CUT_MODEL=1); a cut
                        kills the dataplane and drops every unsynced write,
                        mostly between a reservation's write and its fsync;
                        the control plane stays and resumes the SAs

A capture on the hub's outer interface (whole packets, filtered) is the
proof: `esp_pairs` reads every ESP-in-UDP packet the headend sent, and no
(SPI, sequence number) pair, hence no AES-GCM nonce under one key, may
appear twice.  Jumps in a SPI's sequence are counted as gaps (the numbers
skipped on a resume).  After each restart the case waits until a ping gets
through again ("traffic resumed").  The client's log must hold no replay
(sequence number verification) failure.

A whole-daemon restart resumes the session from the state file (IKE SA,
CHILD SAs, lease; `control.ike.persist`) without a handshake; a restart that
needs the client to re-connect (terminate, initiate) counts as a failure.
After such restarts a CHILD rekey by the client proves that the resumed IKE
SA's keys and message IDs are right.  The cycle count comes from
``ESPGATE_SELFTEST_CYCLES`` (the crash loop's default is 50, the others' 10).
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import struct
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from control.cli import request
from control.lab import ProcessSet, ping, tcp_transfer
from control.lab.capture import _LINKTYPE_ETHERNET, read_pcap
from control.lab.procs import wait_for

if TYPE_CHECKING:
    from control.lab import StrongSwanClient
    from control.lab.procs import ManagedProcess
    from control.selftest import HeadendLab

__all__ = ["RELOAD_CASES", "esp_pairs", "pair_report"]

TRANSFER = 8 * 1024 * 1024
# strongSwan's libipsec logs this for a packet its replay window refused
CLIENT_REPLAY = re.compile(r"sequence number verification failed|replay", re.I)


def _cycles(default: int) -> int:
    value = os.environ.get("ESPGATE_SELFTEST_CYCLES", "")
    return int(value) if value.isdigit() and int(value) > 0 else default


# -- capture analysis ------------------------------------------------------------


def esp_pairs(path: Path, src: str) -> list[tuple[int, int]]:
    """Return (SPI, seq) of every ESP-in-UDP packet from src, in capture order.

    A UDP GSO super-datagram (the engine sends batches with UDP_SEGMENT, and
    a capture on the sending side sees them whole) is cut at its segment
    size, found as the offset of the SPI followed by the next number.  IKE
    on 4500 (non-ESP marker) and NAT-T keepalives are skipped.
    """
    want = bytes(int(x) for x in src.split("."))
    out = []
    for rec in read_pcap(path):
        data = rec.data
        if rec.linktype != _LINKTYPE_ETHERNET or len(data) < 14 + 20 + 8 + 8:
            continue
        (ethertype,) = struct.unpack_from("!H", data, 12)
        ip = data[14:]
        if ethertype != 0x0800 or ip[12:16] != want:
            continue
        ihl = (ip[0] & 0x0F) * 4
        if ip[9] == 50 and len(ip) >= ihl + 8:
            # raw ESP (RFC 4303 section 2), a client not behind NAT
            out.append(struct.unpack_from("!II", ip, ihl))
            continue
        if ip[9] != 17:
            continue
        sport, dport = struct.unpack_from("!HH", ip, ihl)
        # RFC 3948 section 2.2: ESP-in-UDP starts with a non-zero SPI
        esp = ip[ihl + 8 :]
        if 4500 not in (sport, dport) or len(esp) < 8 or esp[:4] == b"\0" * 4:
            continue
        out.extend(_segments(esp))
    return out


def _segments(esp: bytes) -> list[tuple[int, int]]:
    spi, seq = struct.unpack_from("!II", esp)
    size = esp.find(struct.pack("!II", spi, (seq + 1) & 0xFFFFFFFF), 8)
    if size < 0:
        return [(spi, seq)]
    pairs = []
    for off in range(0, len(esp) - 7, size):
        got_spi, got_seq = struct.unpack_from("!II", esp, off)
        if got_spi != spi:
            break
        pairs.append((spi, got_seq))
    return pairs


def pair_report(pairs: list[tuple[int, int]]) -> dict[str, Any]:
    """Count repeated (SPI, seq) pairs and gaps per SPI in a capture's pairs."""
    counts = Counter(pairs)
    repeated = {f"{spi:08x}:{seq}": n for (spi, seq), n in counts.items() if n > 1}
    by_spi: dict[int, list[int]] = defaultdict(list)
    for spi, seq in pairs:
        by_spi[spi].append(seq)
    spis = {}
    gaps = skipped = 0
    for spi, seqs in by_spi.items():
        ordered = sorted(set(seqs))
        jumps = [b - a for a, b in zip(ordered, ordered[1:], strict=False) if b - a > 1]
        gaps += len(jumps)
        skipped += sum(jumps) - len(jumps)
        spis[f"{spi:08x}"] = {
            "packets": len(seqs),
            "first": ordered[0],
            "last": ordered[-1],
            "gaps": len(jumps),
            "largest_gap": max(jumps, default=0),
        }
    return {
        "packets_checked": len(pairs),
        "repeated_pairs": len(repeated),
        "repeated_examples": dict(list(repeated.items())[:10]),
        "gaps": gaps,
        "numbers_skipped": skipped,
        "spis": spis,
    }


class _EspCapture:
    """tcpdump of the ESP one address sends (UDP 4500 or raw), whole packets."""

    def __init__(self, ns: str, iface: str, src: str, path: Path):
        self.path = path
        self.argv = ["tcpdump", "-i", iface, "-U", "--immediate-mode", "-n",
                     "-B", "16384", "-s", "0", "-Z", "root", "-w", str(path),
                     "src", "host", src, "and", "(", "udp", "port", "4500", "or",
                     "ip", "proto", "50", ")"]  # fmt: skip
        self.ns = ns
        self.procs = ProcessSet(path.parent / "capture")

    def __enter__(self) -> _EspCapture:
        proc = self.procs.start("tcpdump-esp", self.argv, ns=self.ns)
        wait_for(
            lambda: "listening on" in proc.stderr_text() or not proc.alive(),
            5.0,
            what="tcpdump",
        )
        if not proc.alive():
            raise RuntimeError(f"tcpdump failed: {proc.stderr_text().strip()}")
        return self

    def __exit__(self, *exc: Any) -> None:
        time.sleep(0.5)
        self.procs.stop_all()

    def dropped(self) -> int | None:
        """Return what tcpdump says the kernel dropped (None if it said nothing)."""
        text = self.procs.procs[0].stderr_text() if self.procs.procs else ""
        found = re.search(r"(\d+) packets? dropped by kernel", text)
        return int(found.group(1)) if found else None


# -- the headend under test ------------------------------------------------------


class _Headend:
    """The lab's daemon restarted with the process dataplane and a state dir."""

    def __init__(self, lab: HeadendLab, env: dict[str, str] | None = None):
        assert lab.procs is not None and lab.topo is not None
        self.lab = lab
        self.env = env
        self.state_dir = lab.workdir / "state"
        self.generation = 0
        self.proc: ManagedProcess | None = None
        first = lab.procs.get("espgate")
        lab.procs.stop(first)
        config = lab.workdir / "espgate.toml"
        text = config.read_text()
        text = text.replace(
            "[server]\n", f'[server]\nstate_dir = "{self.state_dir}"\n', 1
        )
        text = text.replace("[engine]\n", '[engine]\ndataplane = "process"\n', 1)
        self.config = lab.workdir / "espgate-process.toml"
        self.config.write_text(text)
        self.config.chmod(0o600)
        self.start()

    def start(self, timeout: float = 15.0) -> None:
        """Start a new daemon generation and wait for its control socket."""
        lab = self.lab
        assert lab.procs is not None and lab.topo is not None
        self.generation += 1
        espgate = str(Path(sys.executable).with_name("espgate"))
        argv = [espgate, "serve", "--config", str(self.config)]
        proc = lab.procs.start(
            f"espgate-{self.generation}", argv, ns=lab.topo.hub, env=self.env
        )
        self.proc = proc
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not proc.alive():
                raise RuntimeError(
                    f"espgate exited at start: {proc.stderr_text()[-800:]}"
                )
            try:
                request(lab.socket, "show-counters", timeout=2)
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("espgate did not open its control socket")

    def daemon_pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def dataplane_pid(self) -> int | None:
        """Return the dataplane child's pid (read from /proc, never by name)."""
        # a respawn forks from the supervisor thread: look at every task
        pids: list[int] = []
        for task in Path(f"/proc/{self.daemon_pid()}/task").glob("*"):
            with contextlib.suppress(OSError, ValueError):
                pids += [int(p) for p in (task / "children").read_text().split()]
        for pid in pids:
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"control.dataplane" in cmd:
                return pid
        return None

    def restarts(self) -> int:
        engine = request(self.lab.socket, "show-counters")["engine"]
        return int(engine.get("dataplane_restarts", 0))

    def kill_dataplane(self, timeout: float = 10.0) -> bool:
        """Kill -9 the dataplane child; wait until the supervisor restarted it."""
        pid = self.dataplane_pid()
        if pid is None:
            return False
        before = self.restarts()
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.restarts() > before:
                    return True
            except OSError:
                pass
            time.sleep(0.05)
        return False

    def power_cut(self, timeout: float = 15.0) -> str | None:
        """Cut the dataplane and its model store; wait for the restart."""
        before = self.restarts()
        answer = request(self.lab.socket, "debug-power-cut", timeout=timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.restarts() > before:
                return str(answer.get("cut"))
            time.sleep(0.05)
        return None

    def kill_daemon(self) -> None:
        """Kill -9 the whole daemon, wait for its dataplane to go, restart it."""
        assert self.proc is not None
        child = self.dataplane_pid()
        self.proc.popen.kill()
        self.proc.popen.wait()
        # the child ends on EOF from its control socket; it holds port 4500
        deadline = time.monotonic() + 10
        while child is not None and Path(f"/proc/{child}").exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"dataplane pid {child} outlived its daemon")
            time.sleep(0.02)
        self.start()


# -- traffic ---------------------------------------------------------------------


class _Traffic:
    """A steady ping and back-to-back hashed TCP transfers in threads."""

    def __init__(self, lab: HeadendLab, client: StrongSwanClient):
        self.lab = lab
        self.client = client
        self.stop = threading.Event()
        self.transfers: list[dict[str, Any]] = []
        self.ping: dict[str, Any] = {}
        self.threads = [
            threading.Thread(target=self._pinger, daemon=True),
            threading.Thread(target=self._streamer, daemon=True),
        ]

    def __enter__(self) -> _Traffic:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=200)

    def _pinger(self) -> None:
        assert self.lab.topo is not None
        totals = {"sent": 0, "received": 0}
        while not self.stop.is_set():
            got = ping(
                self.client.link.ns, self.lab.topo.srv_ip, count=40, interval=0.05
            )
            totals["sent"] += got["sent"]
            totals["received"] += got["received"]
        self.ping = totals

    def _streamer(self) -> None:
        assert self.lab.topo is not None
        topo = self.lab.topo
        n = 0
        while not self.stop.is_set():
            n += 1
            try:
                got = tcp_transfer(
                    topo,
                    src_ns=self.client.link.ns,
                    dst_ns=topo.srv,
                    dst_addr=topo.srv_ip,
                    nbytes=TRANSFER,
                    port=5300 + n % 50,
                    timeout=60,
                    logdir=self.lab.workdir / "transfers",
                )
                self.transfers.append(
                    {"match": got["match"], "mbps": round(got["mbps"])}
                )
            except Exception as exc:
                self.transfers.append({"match": False, "error": str(exc)[:200]})


def _resumed(lab: HeadendLab, client: StrongSwanClient, timeout: float = 20.0) -> bool:
    """Wait until a ping through the tunnel gets an answer."""
    assert lab.topo is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = ping(client.link.ns, lab.topo.srv_ip, count=1, interval=0.2, timeout=1)
        if got["received"]:
            return True
    return False


def _reconnect(client: StrongSwanClient) -> bool:
    """Drop the client's IKE SA at once and initiate a new one."""
    client.swanctl("--terminate", "--ike", client.conn_name, "--force", check=False)
    return client.initiate()


def _client_replay_lines(client: StrongSwanClient) -> list[str]:
    text = client.log_path.read_text(errors="replace")
    return [line for line in text.splitlines() if CLIENT_REPLAY.search(line)]


# -- the cases -------------------------------------------------------------------


def _run_loop(
    lab: HeadendLab, kinds: list[str], cycles: int, env: dict[str, str] | None = None
) -> tuple[dict[str, Any], list[str]]:
    """Run cycles of restarts of the given kinds under traffic and a capture."""
    assert lab.topo is not None
    head = _Headend(lab, env)
    client = lab.client()
    if not client.initiate():
        return {"client_log": str(client.log_path)}, ["tunnel did not come up"]
    link = client.link
    cap_path = lab.workdir / "outer-reload.pcap"
    failures: list[str] = []
    done: Counter[str] = Counter()
    not_resumed: list[int] = []
    reconnects = resumed_sessions = 0
    rng = random.Random(os.environ.get("ESPGATE_SELFTEST_SEED"))
    started = time.monotonic()
    capture = _EspCapture(lab.topo.hub, link.hub_if, lab.topo.hub_outer_ip, cap_path)
    with capture, _Traffic(lab, client) as traffic:
        time.sleep(1.0)
        for cycle in range(cycles):
            # every kind once, then a random mix
            kind = kinds[cycle] if cycle < len(kinds) else rng.choice(kinds)
            # a random moment: somewhere in a stream of packets
            time.sleep(rng.uniform(0.1, 1.2))
            if kind == "reload":
                request(lab.socket, "reload-dataplane", timeout=15)
            elif kind == "power-cut":
                moment = head.power_cut()
                done[f"power-cut-{moment}"] += 1
                if moment is None:
                    failures.append(f"cycle {cycle}: no restart after the cut")
            elif kind == "kill-dataplane":
                if not head.kill_dataplane():
                    failures.append(f"cycle {cycle}: dataplane not restarted")
            else:
                head.kill_daemon()
                # sessions resume from the state file; if not, the client
                # re-connects (and the cycle counts as not resumed)
                if _resumed(lab, client, timeout=8.0):
                    resumed_sessions += 1
                else:
                    reconnects += 1
                    if not _reconnect(client):
                        failures.append(f"cycle {cycle}: client did not reconnect")
                        break
            done[kind] += 1
            if not _resumed(lab, client):
                not_resumed.append(cycle)
        time.sleep(1.0)
    rekey: dict[str, Any] = {}
    if done["kill-daemon"] and not reconnects:
        from control.selftest_ike import _rekey_child

        failures += _rekey_child(client, rekey)
        if not _resumed(lab, client):
            failures.append("no traffic after the CHILD rekey on the resumed IKE SA")
    sas = request(lab.socket, "show-ipsec-sa").get("sas", [])
    pairs = esp_pairs(cap_path, lab.topo.hub_outer_ip)
    report = pair_report(pairs)
    replay = _client_replay_lines(client)
    detail: dict[str, Any] = {
        "cycles_run": sum(n for k, n in done.items() if k in kinds),
        "cycles_by_kind": dict(done),
        "packets_checked": report["packets_checked"],
        "repeated_pairs": report["repeated_pairs"],
        "gaps": report["gaps"],
        "numbers_skipped": report["numbers_skipped"],
        "capture_kernel_drops": capture.dropped(),
        "traffic_resumed_every_cycle": not not_resumed,
        "not_resumed_cycles": not_resumed,
        "daemon_restarts_resumed": resumed_sessions,
        "client_reconnects": reconnects,
        "child_rekey_after_resume": rekey.get("child_spis"),
        "client_replay_failures": len(replay),
        "client_replay_examples": replay[:5],
        "ping": traffic.ping,
        "transfers": len(traffic.transfers),
        "transfers_matched": sum(1 for t in traffic.transfers if t["match"]),
        "transfer_failures": [t for t in traffic.transfers if not t["match"]][:5],
        "spis": report["spis"],
        "headend_sas": sas,
        "loop_seconds": round(time.monotonic() - started, 1),
    }
    for sa in sas:
        # every number the engine may send is below the durable mark
        if sa["direction"] == "out" and not sa["next_seq"] <= sa["seq_reserved"]:
            failures.append(f"SA {sa['spi']} next seq above its reserved mark")
    if report["repeated_pairs"]:
        failures.append(f"{report['repeated_pairs']} (SPI, seq) pairs sent twice")
    if report["packets_checked"] < 100:
        failures.append(f"only {report['packets_checked']} ESP packets captured")
    if reconnects:
        failures.append(f"{reconnects} daemon restart(s) needed a new handshake")
    if not_resumed:
        failures.append(f"traffic did not resume after cycles {not_resumed}")
    if replay:
        failures.append(f"client logged {len(replay)} replay failures")
    if not traffic.ping.get("received"):
        failures.append("the steady ping got nothing through")
    if not detail["transfers_matched"]:
        failures.append("no TCP transfer completed with a matching hash")
    # the last transfer ran after the last restart: it must be whole
    elif traffic.transfers and not traffic.transfers[-1]["match"]:
        failures.append(f"last transfer failed: {traffic.transfers[-1]}")
    if not failures and not os.environ.get("ESPGATE_KEEP_CAPTURE"):
        shutil.rmtree(lab.workdir / "transfers", ignore_errors=True)
        cap_path.unlink(missing_ok=True)
    return detail, failures


def _case_reload_dataplane(lab: HeadendLab) -> tuple[dict[str, Any], list[str]]:
    return _run_loop(lab, ["reload"], _cycles(10))


def _case_power_cut(lab: HeadendLab) -> tuple[dict[str, Any], list[str]]:
    env = {"ESPGATE_POWER_CUT_MODEL": "1"}
    return _run_loop(lab, ["power-cut"], _cycles(10), env)


def _case_crash_loop(lab: HeadendLab) -> tuple[dict[str, Any], list[str]]:
    kinds = ["kill-dataplane", "kill-daemon", "kill-dataplane"]
    return _run_loop(lab, kinds, _cycles(50))


RELOAD_CASES: dict[str, tuple[str, Any, dict[str, Any]]] = {
    "reload-dataplane": (
        "espgate reload dataplane N times under traffic: no (SPI, seq) sent twice",
        _case_reload_dataplane,
        {},
    ),
    "reload-crash-loop": (
        "kill -9 of the dataplane and of the daemon at random moments under "
        "traffic: no (SPI, seq) sent twice, traffic resumes",
        _case_crash_loop,
        {},
    ),
    "power-cut-store": (
        "power cuts of the dataplane and its store model (unsynced writes lost, "
        "often mid-reservation) under traffic: no (SPI, seq) sent twice",
        _case_power_cut,
        {},
    ),
}
