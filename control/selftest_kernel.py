"""Self-test cases for the ESP engine switch: host fallback and the kernel path.

Theory of operation: ``auto-fallback`` runs on the host, whose kernel has XFRM
but no ESP: a profile with ``engine = "auto"`` must get the userspace engine,
the daemon must say why in one info line, and traffic must flow.  The four
guest cases need a kernel with ESP and GCM, so on the host they boot Debian's
kernel under qemu (:func:`control.guest.run_in_guest`) and run ``espgate
selftest`` for themselves inside it, where ``ESPGATE_IN_GUEST`` is set and the
case bodies run for real.  :func:`prefetch` notes the guest cases asked for;
the first of them to run boots the guest once for all, so ``espgate
selftest`` costs one boot however many guest cases run (a case nobody noted
boots its own).  On the host a guest case builds no lab: its verdict and its
duration come from inside the guest, and the boot's wall time is printed
once, on the line before the first guest verdict.

Each case restarts the lab's headend with an engine configuration of its own
(the shared :class:`control.selftest.HeadendLab` starts it with the defaults),
and the strongSwan client uses its ``kernel-netlink`` backend in the guest so
both ends run ESP in a kernel::

    host: selftest --cases kernel-mode,...  -> prefetch notes the names
    host: first guest case -> one qemu boot for all of them
      guest: run_inner([kernel-mode, ...])  -> JSON on stdout
    host: each guest case returns its verdict from the guest's JSON
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from control import selftest
from control.cli import request
from control.lab import ping, tcp_transfer
from control.lab.capture import Capture, classify, read_pcap
from control.lab.strongswan import PLUGINS
from control.lab.transfer import MARKER
from control.selftest import CASES, Case, HeadendLab, check_traffic

log = logging.getLogger("espgate.selftest")

IN_GUEST = os.environ.get("ESPGATE_IN_GUEST") == "1"
GUEST_CASES = (
    "kernel-mode",
    "kernel-rekey",
    "xfrm-cleanup",
    "sa-move-under-traffic",
    "kernel-nat-rebind",
)
GUEST_TIMEOUT = 900.0
RESULT_MARKER = "SELFTEST-RESULTS "
# bytes of each guest log brought back to the host
GUEST_LOG_MAX = 256 * 1024
ROOT = Path(__file__).resolve().parents[1]
# the client runs ESP in its kernel: kernel-netlink alone, no kernel-libipsec
NETLINK_PLUGINS = " ".join(p for p in PLUGINS.split() if p != "kernel-libipsec")
FOREIGN_REQID = 7

Verdict = tuple[dict[str, Any], list[str]]
_guest_results: dict[str, dict[str, Any]] = {}
# guest cases this run asked for (prefetch), and those already booted for
_wanted: list[str] = []
_booted: set[str] = set()


# -- lab helpers ------------------------------------------------------------------


def restart_headend(
    lab: HeadendLab,
    *,
    mode: str = "userspace",
    profile_engine: str | None = None,
    dataplane: str | None = None,
) -> Any:
    """Restart the lab's daemon with ``[engine] mode`` and a profile engine.

    ``dataplane`` ("inline" or "process") overrides the configured default.
    """
    assert lab.procs is not None and lab.topo is not None
    current = getattr(lab, "daemon_name", "espgate")
    try:
        proc = lab.procs.get(current)
        lab.procs.stop(proc)
    except KeyError:
        pass
    Path(lab.socket).unlink(missing_ok=True)
    config = lab.workdir / "espgate.toml"
    text = re.sub(r'(?m)^(mode|engine|dataplane) = "\w+"\n', "", config.read_text())
    text = text.replace("[engine]\n", _engine_lines(mode, dataplane), 1)
    if profile_engine is not None:
        text = text.replace(
            'name = "lab"\n', f'name = "lab"\nengine = "{profile_engine}"\n'
        )
    config.write_text(text)
    count = getattr(lab, "daemon_count", 0) + 1
    name = f"espgate-{count}"
    lab.daemon_count, lab.daemon_name = count, name  # type: ignore[attr-defined]
    return start_headend(lab, name, config)


def _engine_lines(mode: str, dataplane: str | None) -> str:
    # the [engine] header with its mode, and a dataplane only when asked for
    extra = "" if dataplane is None else f'dataplane = "{dataplane}"\n'
    return f'[engine]\nmode = "{mode}"\n{extra}'


def start_headend(lab: HeadendLab, name: str, config: Path) -> Any:
    """Start ``espgate serve`` in the hub and wait for its control socket."""
    assert lab.procs is not None and lab.topo is not None
    espgate = str(Path(sys.executable).with_name("espgate"))
    proc = lab.procs.start(name, [espgate, "serve", "--config", str(config)],
                           ns=lab.topo.hub)  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(
                f"espgate exited at start:\n{proc.stderr_text()[-2000:]}"
            )
        if os.path.exists(lab.socket):
            try:
                request(lab.socket, "show-counters", timeout=5)
                return proc
            except OSError:
                pass
        time.sleep(0.2)
    raise RuntimeError("espgate did not open its control socket within 60 s")


def kernel_client(lab: HeadendLab, **kwargs: Any) -> Any:
    """Start a strongSwan client that runs ESP in its kernel (kernel-netlink)."""
    conf = {"load": NETLINK_PLUGINS, "replay_window": 32}
    return lab.client(charon_conf=conf, **kwargs)


def xfrm_listing(lab: HeadendLab, ns: str | None = None) -> tuple[str, str]:
    """Return ``ip xfrm state`` and ``ip xfrm policy`` of the hub (or ns)."""
    assert lab.topo is not None
    ns = ns or lab.topo.hub
    state = lab.topo.run(ns, ["ip", "xfrm", "state"]).stdout
    policy = lab.topo.run(ns, ["ip", "xfrm", "policy"]).stdout
    return state, policy


def our_xfrm(lab: HeadendLab) -> tuple[int, int]:
    """Count the hub's SAs and policy templates carrying a reqid of ours."""
    from fastpath.kernel import is_ours

    state, policy = xfrm_listing(lab)
    states = sum(1 for r in re.findall(r"reqid (\d+)", state) if is_ours(int(r)))
    policies = sum(1 for r in re.findall(r"reqid (\d+)", policy) if is_ours(int(r)))
    return states, policies


def client_replay_drops(lab: HeadendLab) -> dict[str, int]:
    """Sum the client kernel's replay counters over its SAs (ip -s xfrm state)."""
    assert lab.topo is not None
    text = lab.topo.run(lab.topo.cli, ["ip", "-s", "xfrm", "state"]).stdout
    out = {"replay_window": 0, "replay": 0, "failed": 0}
    for m in re.finditer(r"replay-window (\d+) replay (\d+) failed (\d+)", text):
        out["replay_window"] += int(m.group(1))
        out["replay"] += int(m.group(2))
        out["failed"] += int(m.group(3))
    return out


def esp_sequence_repeats(path: Path) -> tuple[int, int, list[str]]:
    """Return (ESP packets, repeated (SPI, seq) pairs, examples) in a capture."""
    seen: Counter[tuple[str, int, int]] = Counter()
    for rec in read_pcap(path):
        data = rec.data
        off = 14 if rec.linktype == 1 else 0
        if len(data) < off + 20 or data[off] >> 4 != 4:
            continue
        ihl = (data[off] & 0x0F) * 4
        src = ".".join(str(b) for b in data[off + 12 : off + 16])
        if data[off + 9] != 17:
            continue
        udp = off + ihl
        if len(data) < udp + 16:
            continue
        sport, dport = struct.unpack_from("!HH", data, udp)
        if 4500 not in (sport, dport):
            continue
        # RFC 3948 section 2.2: a zero first word is IKE, anything else an SPI
        spi, seq = struct.unpack_from("!II", data, udp + 8)
        if spi == 0 or len(data) < udp + 16:
            continue
        seen[(src, spi, seq)] += 1
    repeats = [k for k, n in seen.items() if n > 1]
    examples = [f"{s} {spi:08x}/{seq}" for s, spi, seq in repeats[:10]]
    return sum(seen.values()), len(repeats), examples


def wire_check(path: Path, decap_src: str, client_outer: str) -> dict[str, Any]:
    """Classify a capture of the hub's outer interface with the kernel in the path.

    The kernel's packet tap shows an inbound ESP packet twice on the receiving
    device: as ESP-in-UDP, and again after XFRM decapsulation as the inner
    packet (source: the client's inside address).  Those copies are counted
    apart; everything else must be IKE or ESP-in-UDP and free of the marker.
    """
    out: dict[str, Any] = {"decapsulated": 0, "from_client_esp": 0, "leaks": 0,
                           "by_proto": Counter(), "examples": []}  # fmt: skip
    for rec in read_pcap(path):
        off = 14 if rec.linktype == 1 else 0
        pkt = rec.data[off:]
        src = ".".join(str(b) for b in pkt[12:16]) if len(pkt) >= 20 else ""
        if src == decap_src:
            out["decapsulated"] += 1
            continue
        kind, desc = classify(rec)
        out["by_proto"][kind] += 1
        if kind == "udp4500" and src == client_outer:
            out["from_client_esp"] += 1
        if kind not in ("udp4500", "udp500") or MARKER in rec.data:
            out["leaks"] += 1
            if len(out["examples"]) < 5:
                out["examples"].append(desc)
    out["by_proto"] = dict(out["by_proto"])
    return out


def _daemon_log(lab: HeadendLab) -> str:
    assert lab.procs is not None
    return str(lab.procs.get(getattr(lab, "daemon_name", "espgate")).stderr_text())


def _up(lab: HeadendLab, client: Any) -> tuple[dict[str, Any], list[str]]:
    if not client.initiate(timeout=60):
        return {"client_log": client.log_tail()}, ["tunnel did not come up"]
    vip = client.virtual_ip()
    return {"inside_address": vip}, [] if vip else ["no inside address"]


def _engines_of(lab: HeadendLab) -> list[str]:
    return [c["engine"] for s in lab.show()["sessions"] for c in s["children"]]


# -- host case ----------------------------------------------------------------------


def case_auto_fallback(lab: HeadendLab) -> Verdict:
    """auto on a kernel without ESP: userspace, the reason logged, traffic flows."""
    restart_headend(lab, profile_engine="auto")
    engines = lab.show("engines")
    detail: dict[str, Any] = {"engines": engines}
    failures: list[str] = []
    lines = [ln for ln in _daemon_log(lab).splitlines() if "engine auto" in ln]
    detail["log_lines"] = lines
    if len(lines) != 1 or "userspace" not in lines[0] or "(" not in lines[0]:
        failures.append(
            f"expected one 'engine auto ... userspace (reason)' line: {lines}"
        )
    if engines.get("kernel_available") is not False:
        # a host whose kernel has ESP does not fall back; say so, do not pass
        failures.append(f"kernel usable here, no fallback to test: {engines}")
    if engines.get("profiles", {}).get("lab") != "userspace":
        failures.append(f"profile lab not on userspace: {engines}")
    client = lab.client()
    up, more = _up(lab, client)
    detail.update(up)
    if more:
        return detail, failures + more
    traffic, more = check_traffic(lab, client, 4 * 1024 * 1024, capture=False)
    detail.update(traffic)
    failures += more
    detail["sa_engines"] = _engines_of(lab)
    if detail["sa_engines"] != ["userspace"]:
        failures.append(f"sa engines {detail['sa_engines']}, expected userspace")
    return detail, failures


# -- guest cases (bodies run inside the guest) --------------------------------------


def _kernel_mode(lab: HeadendLab) -> Verdict:
    # auto (the lab's mode) must pick the kernel here; the client: kernel-netlink
    detail: dict[str, Any] = {"engines": lab.show("engines")}
    failures: list[str] = []
    if detail["engines"].get("profiles", {}).get("lab") != "kernel":
        failures.append(f"auto did not choose the kernel: {detail['engines']}")
    client = kernel_client(lab)
    up, more = _up(lab, client)
    detail.update(up)
    if more:
        return detail, failures + more
    assert lab.topo is not None
    cap_path = lab.workdir / "outer.pcap"
    with Capture(lab.topo.hub, lab.topo.hub_outer_if, cap_path):
        traffic, more = check_traffic(lab, client, 2 * 1024 * 1024, capture=False)
    detail.update(traffic)
    failures += more
    wire = wire_check(cap_path, str(up["inside_address"]), lab.topo.cli_outer_ip)
    detail["capture"] = wire
    if wire["leaks"]:
        failures.append(f"non IKE/ESP-in-UDP on the outer interface: {wire}")
    if wire["from_client_esp"] < max(100, wire["decapsulated"]):
        failures.append(f"fewer ESP-in-UDP packets than decapsulated ones: {wire}")
    sessions = lab.show()["sessions"]
    detail["sessions"] = sessions
    child = sessions[0]["children"][0] if sessions and sessions[0]["children"] else {}
    if child.get("engine") != "kernel":
        failures.append(f"sa not in the kernel engine: {child}")
    if not child.get("packets_in") or not child.get("packets_out"):
        failures.append(f"kernel counters not read back: {child}")
    detail["xfrm_ours_up"] = our_xfrm(lab)
    if detail["xfrm_ours_up"] != (2, 3):
        failures.append(
            f"expected 2 SAs and 3 policies of ours: {detail['xfrm_ours_up']}"
        )

    # the client hangs up: SAs and policies must go with the session
    client.terminate()
    deadline = time.monotonic() + 20
    while lab.show()["sessions"] and time.monotonic() < deadline:
        time.sleep(0.3)
    detail["xfrm_ours_down"] = our_xfrm(lab)
    if detail["xfrm_ours_down"] != (0, 0):
        failures.append(f"kernel state left after delete: {detail['xfrm_ours_down']}")
    return detail, failures


def _kernel_rekey(lab: HeadendLab) -> Verdict:
    client = kernel_client(
        lab,
        extra_conf={"children": {"espgate": {"rekey_time": "8s", "rand_time": "0s",
                                             "life_time": "60s"}}},
    )  # fmt: skip
    detail, failures = _up(lab, client)
    if failures:
        return detail, failures
    first = lab.show()["sessions"][0]["children"][0]["spi_in"]
    detail["spi_before"] = first

    # a steady ping across the rekey, then traffic on the new SA
    assert lab.topo is not None
    detail["ping"] = ping(lab.topo.cli, lab.topo.srv_ip, count=40, interval=0.3)
    children = lab.show()["sessions"][0]["children"]
    detail["children_after"] = children
    if len(children) != 1 or children[0]["spi_in"] == first:
        failures.append(f"no completed CHILD rekey: {children}")
    if any(c["engine"] != "kernel" for c in children):
        failures.append("rekeyed SA left the kernel engine")
    if detail["ping"]["loss_pct"] != 0:
        failures.append(f"ping loss across the rekey: {detail['ping']['loss_pct']}%")
    traffic, more = check_traffic(lab, client, 1024 * 1024, capture=False)
    detail.update(traffic)
    failures += more
    detail["xfrm_ours"] = our_xfrm(lab)
    if detail["xfrm_ours"] != (2, 3):
        failures.append(f"old SAs not removed after rekey: {detail['xfrm_ours']}")
    detail["client_replay"] = client_replay_drops(lab)
    return detail, failures


def _add_foreign(lab: HeadendLab) -> None:
    # another key manager's SA and policy, which we must never touch
    assert lab.topo is not None
    ns = lab.topo.hub
    key = "0x" + "11" * 20
    lab.topo.run(ns, ["ip", "xfrm", "state", "add", "src", "198.18.200.1", "dst",
                      "198.18.200.2", "proto", "esp", "spi", "0x00001234", "reqid",
                      str(FOREIGN_REQID), "mode", "tunnel", "aead",
                      "rfc4106(gcm(aes))", key, "128"])  # fmt: skip
    lab.topo.run(ns, ["ip", "xfrm", "policy", "add", "src", "198.18.201.0/24",
                      "dst", "198.18.202.0/24", "dir", "out", "tmpl", "src",
                      "198.18.200.1", "dst", "198.18.200.2", "proto", "esp",
                      "reqid", str(FOREIGN_REQID), "mode", "tunnel"])  # fmt: skip


def _xfrm_cleanup(lab: HeadendLab) -> Verdict:
    assert lab.procs is not None
    _add_foreign(lab)
    before = xfrm_listing(lab)
    detail: dict[str, Any] = {"foreign_before": "reqid 7" in before[0]}
    failures: list[str] = []

    # graceful: SIGTERM with a live kernel session
    restart_headend(lab, mode="kernel")
    client = kernel_client(lab)
    up, more = _up(lab, client)
    detail.update(up)
    if more:
        return detail, more
    detail["ours_up"] = our_xfrm(lab)
    if detail["ours_up"] == (0, 0):
        failures.append("no kernel state of ours while up")
    lab.procs.stop(lab.procs.get(lab.daemon_name))  # type: ignore[attr-defined]
    after_stop = xfrm_listing(lab)
    detail["identical_after_stop"] = after_stop == before
    if after_stop != before:
        failures.append("xfrm state/policy differ after a clean stop")

    # crash: SIGKILL leaves ours behind, the next start removes exactly those
    client.terminate(timeout=3)
    config = lab.workdir / "espgate.toml"
    proc = start_headend(lab, "espgate-crash", config)
    lab.daemon_name = "espgate-crash"  # type: ignore[attr-defined]
    up, more = _up(lab, client)
    if more:
        return detail, failures + [f"second session: {m}" for m in more]
    detail["ours_before_kill"] = our_xfrm(lab)
    os.kill(proc.pid, signal.SIGKILL)
    proc.popen.wait(timeout=10)
    detail["ours_after_kill"] = our_xfrm(lab)
    start_headend(lab, "espgate-recover", config)
    lab.daemon_name = "espgate-recover"  # type: ignore[attr-defined]
    after_recover = xfrm_listing(lab)
    detail["identical_after_recovery"] = after_recover == before
    if after_recover != before:
        failures.append("xfrm state/policy differ after crash recovery")
    if detail["ours_after_kill"] == (0, 0):
        failures.append("the kill left nothing to recover: the check proves nothing")
    if "reqid 7" not in after_recover[0]:
        failures.append("foreign SA touched")
    return detail, failures


def _move(lab: HeadendLab, spi: str, to: str) -> dict[str, Any]:
    return request(lab.socket, "sa-move", timeout=30, spi=spi, to=to)


def _wait_packets(lab: HeadendLab, more: int, timeout: float = 60.0) -> None:
    # until the CHILD SA's engine counted `more` inbound packets from now
    def count() -> int:
        return int(lab.show()["sessions"][0]["children"][0]["packets_in"])

    start = count()
    deadline = time.monotonic() + timeout
    while count() < start + more and time.monotonic() < deadline:
        time.sleep(0.2)


def _pings_lost_near(out: str, windows: list[float], interval: float) -> list[int]:
    # ping -D -O: "[ts] no answer yet for icmp_seq=N" comes one interval after N
    # was sent; a lost ping sent within a second of a move counts against it
    spans = list(zip(windows[::2], windows[1::2], strict=False))
    answered = {int(n) for n in re.findall(r"bytes from .*icmp_seq=(\d+)", out)}
    near = []
    for m in re.finditer(r"\[([\d.]+)\] no answer yet for icmp_seq=(\d+)", out):
        sent_at = float(m.group(1)) - interval
        if int(m.group(2)) in answered:
            continue
        if any(a - 1.0 <= sent_at <= b + 1.0 for a, b in spans):
            near.append(int(m.group(2)))
    return near


def _sa_move_under_traffic(lab: HeadendLab) -> Verdict:
    assert lab.topo is not None and lab.procs is not None
    topo = lab.topo
    client = kernel_client(lab)
    detail, failures = _up(lab, client)
    if failures:
        return detail, failures
    spi = lab.show()["sessions"][0]["children"][0]["spi_in"]
    cap_path = lab.workdir / "move.pcap"
    moves: list[dict[str, Any]] = []
    windows: list[float] = []
    transfer: dict[str, Any] = {}

    def stream() -> None:
        try:
            transfer.update(tcp_transfer(topo, src_ns=topo.cli, dst_ns=topo.srv,
                                         dst_addr=topo.srv_ip, nbytes=16 << 20,
                                         timeout=300))  # fmt: skip
        except Exception as exc:  # reported as a failure below
            transfer["error"] = repr(exc)

    # a steady ping and a TCP stream while the SA goes there and back
    # the stream first: its receiver must start within the lab's 10 s, which an
    # emulated guest only manages when nothing else is starting
    worker = threading.Thread(target=stream, name="move-stream")
    worker.start()
    _wait_packets(lab, 100, timeout=120)
    with Capture(topo.hub, topo.hub_outer_if, cap_path):
        pinger = subprocess.Popen(
            ["ip", "netns", "exec", topo.cli, "ping", "-n", "-D", "-O", "-i",
             "0.1", "-c", "120", topo.srv_ip],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        try:
            # move while the stream and the ping flow, in each engine
            _wait_packets(lab, 100)
            windows.append(time.time())
            moves.append(_move(lab, spi, "kernel"))
            windows.append(time.time())
            _wait_packets(lab, 300)
            moves.append({"engines": _engines_of(lab)})
            windows.append(time.time())
            moves.append(_move(lab, spi, "userspace"))
            windows.append(time.time())
            moves.append({"engines": _engines_of(lab)})
            ping_out, _ = pinger.communicate(timeout=60)
        finally:
            if pinger.poll() is None:
                pinger.kill()
                pinger.wait()
    worker.join(timeout=320)
    detail["moves"] = moves
    detail["transfer"] = transfer
    m = re.search(r"(\d+) packets transmitted, (\d+) received", ping_out)
    sent, got = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
    near = _pings_lost_near(ping_out, windows, interval=0.1)
    detail["ping"] = {"sent": sent, "received": got, "lost_near_a_move": near}
    for move, to in ((moves[0], "kernel"), (moves[2], "userspace")):
        if not move.get("moved") or move.get("engine") != to:
            failures.append(f"move to {to} failed: {move}")
    # with the process dataplane the move back in is reserved in the seq store
    # above its first number before it sends (reload-safety across the move)
    reserved = moves[2].get("seq_reserved")
    detail["dataplane"] = "inline" if reserved is None else "process"
    if reserved is not None and reserved <= moves[2].get("dest_next_seq", 0):
        failures.append(f"move back in not reserved above its start: {moves[2]}")
    if moves[1].get("engines") != ["kernel"] or moves[3].get("engines") != [
        "userspace"
    ]:
        failures.append(f"show does not follow the moves: {moves[1]}, {moves[3]}")
    if not transfer.get("match"):
        failures.append(f"TCP stream across the moves broken: {transfer}")
    # the TCP stream saturates the emulated CPU, so a ping may drop in a queue
    # at any time; next to a move, only what sat in the source engine's TUN
    # queue may go (one ping per move), never anything to a replay window
    if sent == 0 or len(near) > 2 or got < sent * 0.95:
        failures.append(f"ping lost {sent - got} of {sent}, {near} next to a move")
    detail["client_replay"] = client_replay_drops(lab)
    if detail["client_replay"]["replay"] or detail["client_replay"]["replay_window"]:
        failures.append(f"replay drops at the client: {detail['client_replay']}")
    total, repeats, examples = esp_sequence_repeats(cap_path)
    detail["capture"] = {
        "esp_packets": total,
        "repeated": repeats,
        "examples": examples,
    }
    if total < 100:
        failures.append(f"too few ESP packets captured: {total}")
    if repeats:
        failures.append(f"{repeats} repeated (SPI, seq) in the capture: {examples}")
    return detail, failures


# -- inside the guest: labs configured up front ------------------------------------


class KernelLab(HeadendLab):
    """A HeadendLab whose daemon starts with an engine mode (and more patience).

    Under emulation the daemon needs longer than the host's 15 s to start, and
    starting it once with the right configuration saves a restart per case.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        mode: str = "userspace",
        dataplane: str | None = None,
        **kwargs: Any,
    ):
        super().__init__(workdir, **kwargs)
        self.mode = mode
        self.dataplane = dataplane
        self.daemon_name = "espgate"
        self.daemon_count = 0

    def _start_headend(self) -> None:
        self._argv()  # writes espgate.toml
        config = self.workdir / "espgate.toml"
        text = config.read_text()
        config.write_text(
            text.replace("[engine]\n", _engine_lines(self.mode, self.dataplane), 1)
        )
        start_headend(self, self.daemon_name, config)


GUEST_LABS = {
    "kernel-mode": "auto",
    "kernel-rekey": "kernel",
    "xfrm-cleanup": "userspace",
    "sa-move-under-traffic": "userspace",
    "kernel-nat-rebind": "kernel",
}
# cases that need a dataplane other than the configured default (process)
GUEST_DATAPLANE: dict[str, str] = {}


# the client's own netfilter stands in for a NAT in front of it: its IKE and
# ESP-in-UDP leave port 4500 rewritten to NAT_PORTS[i] (and, last, from a second
# address), so the headend sees the mapping change as behind a real NAT
NAT_TABLE = "egtnat"
NAT_PORTS = (14500, 24500)
NAT_SECOND_IP = "198.18.1.3"


def _nat_map(lab: HeadendLab, source: str, port: int) -> None:
    """Map the client's port 4500 to source:port and drop the old mapping."""
    assert lab.topo is not None
    topo = lab.topo
    nft = ["nft"]
    rule = (f"add rule ip {NAT_TABLE} post ip daddr {topo.hub_outer_ip} udp sport "
            f"4500 snat to {source}:{port}")  # fmt: skip
    topo.run(topo.cli, [*nft, f"add table ip {NAT_TABLE}"])
    topo.run(topo.cli, [*nft, f"add chain ip {NAT_TABLE} post {{ type nat hook "
                              "postrouting priority 100 ; }"])  # fmt: skip
    topo.run(topo.cli, [*nft, f"flush chain ip {NAT_TABLE} post"])
    topo.run(topo.cli, [*nft, rule])
    # a NAT that forgets: the next packet out gets the new mapping
    topo.run(topo.cli, ["conntrack", "-F"], check=False)


def _child0(lab: HeadendLab) -> dict[str, Any]:
    sessions = lab.show()["sessions"]
    if not sessions or not sessions[0]["children"]:
        return {}
    return dict(sessions[0]["children"][0])


def _remote_of(lab: HeadendLab) -> str:
    sessions = lab.show()["sessions"]
    return str(sessions[0].get("outside")) if sessions else ""


def _esp_to(path: Path, port: int, dst: str) -> int:
    # ESP-in-UDP the hub sent to dst:port (non-zero first word: an SPI)
    count = 0
    for rec in read_pcap(path):
        off = 14 if rec.linktype == 1 else 0
        pkt = rec.data[off:]
        if len(pkt) < 36 or pkt[9] != 17:
            continue
        ihl = (pkt[0] & 0x0F) * 4
        daddr = ".".join(str(b) for b in pkt[16:20])
        dport = struct.unpack_from("!H", pkt, ihl + 2)[0]
        spi = struct.unpack_from("!I", pkt, ihl + 8)[0]
        count += daddr == dst and dport == port and spi != 0
    return count


def _kernel_nat_rebind(lab: HeadendLab) -> Verdict:
    assert lab.topo is not None
    topo = lab.topo
    detail: dict[str, Any] = {}
    failures: list[str] = []
    _nat_map(lab, topo.cli_outer_ip, NAT_PORTS[0])
    client = kernel_client(lab, extra_conf={"dpd_delay": "2s"})
    up, more = _up(lab, client)
    detail.update(up)
    if more:
        return detail, failures + more
    ping_ok = ping(topo.cli, topo.srv_ip, count=5, interval=0.2)
    before = _child0(lab)
    detail["before"] = {"child": before, "remote": _remote_of(lab), "ping": ping_ok}
    if before.get("engine") != "kernel":
        return detail, failures + [f"sa not in the kernel engine: {before}"]

    # the NAT picks a new port, then a new address: each time the client's next
    # DPD or packet comes from the new mapping, and ESP must follow it
    mac = topo.run(topo.cli, ["cat", f"/sys/class/net/{topo.cli_outer_if}/address"])
    topo.run(topo.cli, ["ip", "addr", "add", f"{NAT_SECOND_IP}/24", "dev",
                        topo.cli_outer_if])  # fmt: skip
    topo.run(topo.hub, ["ip", "neigh", "replace", NAT_SECOND_IP, "lladdr",
                        mac.stdout.strip(), "dev", topo.hub_outer_if,
                        "nud", "permanent"])  # fmt: skip
    steps = (("port", topo.cli_outer_ip, NAT_PORTS[1]),
             ("address", NAT_SECOND_IP, NAT_PORTS[1]))  # fmt: skip
    last = before
    for what, source, port in steps:
        cap_path = lab.workdir / f"rebind-{what}.pcap"
        with Capture(topo.hub, topo.hub_outer_if, cap_path):
            _nat_map(lab, source, port)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if _remote_of(lab).find(str(port)) >= 0 and source in _remote_of(lab):
                    break
                ping(topo.cli, topo.srv_ip, count=1, interval=0.2)
                time.sleep(1)
            result = ping(topo.cli, topo.srv_ip, count=10, interval=0.2)
        child = _child0(lab)
        step: dict[str, Any] = {
            "remote": _remote_of(lab),
            "ping": result,
            "child": child,
            "esp_to_new_mapping": _esp_to(cap_path, port, source),
        }
        detail[what] = step
        if source not in step["remote"] or str(port) not in step["remote"]:
            failures.append(f"{what}: headend did not see {source}:{port}: {step}")
        if not result.get("received"):
            failures.append(f"{what}: no traffic after the rebinding: {result}")
        same = (child.get("spi_in"), child.get("spi_out")) == (
            before.get("spi_in"), before.get("spi_out"))  # fmt: skip
        if not same:
            failures.append(f"{what}: spis changed (a rekey, not a rebind): {child}")
        for key in ("packets_in", "packets_out"):
            if int(child.get(key) or 0) <= int(last.get(key) or 0):
                failures.append(f"{what}: {key} did not rise: {last} -> {child}")
        if step["esp_to_new_mapping"] < 5:
            failures.append(f"{what}: no ESP to {source}:{port} in the capture")
        last = child
    detail["daemon_follow_lines"] = [
        ln for ln in _daemon_log(lab).splitlines() if "follow" in ln
    ]
    detail["xfrm"] = xfrm_listing(lab)[0][-1500:]
    client.terminate()
    return detail, failures


def _guest_logs(workdir: Path) -> dict[str, str]:
    # every *.log of a case (each one's last GUEST_LOG_MAX bytes, keys redacted),
    # named by its path below the case's directory with "/" as "__"
    logs: dict[str, str] = {}
    for path in sorted(workdir.rglob("*.log")):
        with contextlib.suppress(OSError):
            data = path.read_bytes()[-GUEST_LOG_MAX:]
            name = "__".join(path.relative_to(workdir).parts)
            logs[name] = selftest.redact(data.decode("utf-8", "replace"))
    return logs


def run_inner(names: list[str]) -> list[dict[str, Any]]:
    """Run guest case bodies here (in the guest); print and return the verdicts."""
    import shutil
    import tempfile
    import traceback

    base = Path(tempfile.mkdtemp(prefix="egk-st-"))
    results = []
    for name in names:
        started = time.monotonic()
        try:
            dataplane = GUEST_DATAPLANE.get(name)
            with KernelLab(base / name, mode=GUEST_LABS[name],
                           dataplane=dataplane) as lab:  # fmt: skip
                detail, failures = _BODIES[name](lab)
        except Exception as exc:
            detail, failures = {"traceback": traceback.format_exc()}, [repr(exc)]
        detail["failures"] = failures
        detail["seconds"] = round(time.monotonic() - started, 1)
        # the daemon's and charon's logs go back to the host's --keep-logs
        detail["guest_logs"] = _guest_logs(base / name)
        results.append({"case": name, "passed": not failures, "detail": detail})
        print(f"{'PASS' if not failures else 'FAIL'} {name}", file=sys.stderr)
    shutil.rmtree(base, ignore_errors=True)
    print(RESULT_MARKER + json.dumps(results, default=str), flush=True)
    return results


# -- guest dispatch -----------------------------------------------------------------


def prefetch(names: list[str] | None) -> None:
    """Note the guest cases in names (all when None) for one shared boot.

    Nothing boots here: the first guest case to run boots the guest for every
    noted case, inside ``selftest.run``, where a Ctrl-C is handled.
    """
    if IN_GUEST:
        return
    _wanted[:] = [n for n in (names or list(CASES)) if n in GUEST_CASES]


def run_guest(names: list[str]) -> dict[str, dict[str, Any]]:
    """Run guest cases in one qemu boot; return {case: result} (failed ones too)."""
    from control.guest import GuestError, run_in_guest

    code = (
        "import logging, sys; from control.selftest_kernel import run_inner; "
        "logging.basicConfig(level=logging.INFO); "
        f"sys.exit(0 if all(r['passed'] for r in run_inner({names!r})) else 1)"
    )
    started = time.monotonic()
    try:
        rc, out, err = run_in_guest(
            [sys.executable, "-c", code], GUEST_TIMEOUT, cwd=str(ROOT)
        )
    except (GuestError, TimeoutError) as exc:
        return {n: _failed(n, f"guest run failed: {exc}") for n in names}
    boot = round(time.monotonic() - started, 1)
    results: dict[str, dict[str, Any]] = {}
    for line in out.splitlines():
        if line.startswith(RESULT_MARKER):
            try:
                for item in json.loads(line[len(RESULT_MARKER) :]):
                    item["detail"]["guest_run_seconds"] = boot
                    results[item["case"]] = item
            except ValueError:
                pass
    for n in names:
        if n not in results:
            tail = (out[-1500:] + err[-1500:]).strip()
            results[n] = _failed(n, f"no verdict from the guest (rc {rc}): {tail}")
    return results


def _failed(name: str, why: str) -> dict[str, Any]:
    return {"case": name, "passed": False, "detail": {"failures": [why]}}


def _guest_case(name: str, body: Any) -> Any:
    # in the guest (espgate selftest run there by hand): the body, for real
    def case(lab: HeadendLab) -> Verdict:
        if not isinstance(lab, KernelLab):
            dataplane = GUEST_DATAPLANE.get(name)
            restart_headend(lab, mode=GUEST_LABS[name], dataplane=dataplane)
        return body(lab)

    return case


def _guest_remote(name: str) -> Any:
    # on the host: the verdict from the guest, booted once for the noted cases
    def remote() -> Verdict:
        if name not in _guest_results:
            batch = [name] + [n for n in _wanted if n != name and n not in _booted]
            _booted.update(batch)
            started = time.monotonic()
            _guest_results.update(run_guest(batch))
            print(
                f"guest: one qemu boot for {len(batch)} case(s) "
                f"({', '.join(batch)}): {time.monotonic() - started:.1f} s "
                "with boot and set-up; each case below says its own time in it",
                flush=True,
            )
        result = _guest_results.pop(name)
        detail = dict(result["detail"])
        failures = list(detail.pop("failures", []))
        return detail, failures

    return remote


def _guest_spec(summary: str, name: str, body: Any) -> Case:
    remote = None if IN_GUEST else _guest_remote(name)
    return Case(summary, _guest_case(name, body), {}, remote)


_BODIES = {
    "kernel-mode": _kernel_mode,
    "kernel-rekey": _kernel_rekey,
    "xfrm-cleanup": _xfrm_cleanup,
    "sa-move-under-traffic": _sa_move_under_traffic,
    "kernel-nat-rebind": _kernel_nat_rebind,
}
CASES["auto-fallback"] = Case(
    "engine auto on a kernel without ESP: userspace, reason logged, traffic",
    case_auto_fallback,
    {},
)
CASES["kernel-mode"] = _guest_spec(
    "guest: auto picks the kernel; strongSwan kernel-netlink: ping, transfer",
    "kernel-mode",
    _kernel_mode,
)
CASES["kernel-rekey"] = _guest_spec(
    "guest: CHILD rekey make-before-break in the kernel under ping",
    "kernel-rekey",
    _kernel_rekey,
)
CASES["xfrm-cleanup"] = _guest_spec(
    "guest: ip xfrm state/policy identical after stop and crash recovery",
    "xfrm-cleanup",
    _xfrm_cleanup,
)
CASES["sa-move-under-traffic"] = _guest_spec(
    "guest: sa move userspace -> kernel -> userspace under ping and TCP",
    "sa-move-under-traffic",
    _sa_move_under_traffic,
)
CASES["kernel-nat-rebind"] = _guest_spec(
    "guest: kernel SAs follow the client's new NAT port, then its new address",
    "kernel-nat-rebind",
    _kernel_nat_rebind,
)
__all__ = ["GUEST_CASES", "prefetch", "restart_headend", "run_guest", "selftest"]
