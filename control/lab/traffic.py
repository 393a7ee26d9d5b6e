"""Traffic through the lab: ping and a hashed TCP bulk transfer.

Theory of operation: `ping` runs iputils ping in a namespace and parses its
summary lines. `tcp_transfer` starts `python -m control.lab.transfer recv` in
the destination namespace under its own `ProcessSet`, waits for the ready
file, runs the sender in the source namespace in the foreground, then waits
for the receiver to exit and compares the two SHA-256 digests each side
printed. The receiver is stopped by its recorded PID whatever happens.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from control.lab.procs import ProcessSet, netns_argv, wait_for
from control.lab.topology import Topology

log = logging.getLogger("espgate.lab")
# how long a receiver may take to start listening: a Python start-up, slow on a
# loaded machine and far slower in the emulated guest (9p root, TCG)
RECEIVER_START = 90.0 if os.environ.get("ESPGATE_IN_GUEST") == "1" else 20.0

__all__ = ["TransferError", "ping", "tcp_transfer"]

_REPO_ROOT = Path(__file__).resolve().parents[2]
_PING_COUNTS = re.compile(r"(\d+) packets transmitted, (\d+) (?:packets )?received")
_PING_RTT = re.compile(r"= [\d.]+/([\d.]+)/[\d.]+/[\d.]+ ms")


class TransferError(RuntimeError):
    """The sender or the receiver of a transfer failed."""


def ping(
    ns: str,
    target: str,
    count: int = 5,
    interval: float = 0.2,
    timeout: float | None = None,
    source: str | None = None,
) -> dict[str, Any]:
    """Ping `target` from namespace `ns`; return sent, received, loss and RTT.

    When ping cannot send at all (no route), sent is 0, loss 100 % and "error"
    holds ping's message.
    """
    deadline = timeout if timeout is not None else count * interval + 5.0
    argv = ["ping", "-n", "-q", "-c", str(count), "-i", f"{interval:g}"]
    argv += ["-w", str(max(1, int(deadline + 0.999)))]
    if source is not None:
        argv += ["-I", source]
    res = subprocess.run(
        netns_argv(ns, [*argv, target]),
        capture_output=True,
        text=True,
        timeout=deadline + 10,
    )
    counts = _PING_COUNTS.search(res.stdout)
    if counts is None:
        return {
            "sent": 0,
            "received": 0,
            "loss_pct": 100.0,
            "rtt_avg_ms": None,
            "error": (res.stderr or res.stdout).strip()[-300:],
        }
    sent, received = int(counts.group(1)), int(counts.group(2))
    rtt = _PING_RTT.search(res.stdout)
    return {
        "sent": sent,
        "received": received,
        "loss_pct": 100.0 * (sent - received) / sent if sent else 100.0,
        "rtt_avg_ms": float(rtt.group(1)) if rtt else None,
    }


def tcp_transfer(
    topo: Topology,
    *,
    src_ns: str,
    dst_ns: str,
    dst_addr: str,
    nbytes: int,
    port: int = 5201,
    timeout: float = 60.0,
    seed: int = 1,
    logdir: Path | None = None,
) -> dict[str, Any]:
    """Stream `nbytes` from `src_ns` to `dst_addr` in `dst_ns` and compare hashes.

    Return bytes (received), bytes_sent, sha256_sent, sha256_received, match,
    seconds (sender's connect to the receiver's close) and mbps (10^6 bit/s).
    """
    if logdir is None:
        base = topo.workdir if topo.workdir is not None else Path(tempfile.gettempdir())
        logdir = Path(tempfile.mkdtemp(prefix="transfer-", dir=base))
    logdir.mkdir(parents=True, exist_ok=True)
    ready = logdir / f"recv-{port}.ready"
    ready.unlink(missing_ok=True)
    env = {"PYTHONPATH": _pythonpath()}
    module = [sys.executable, "-m", "control.lab.transfer"]
    with ProcessSet(logdir) as procs:
        # receiver first; the ready file appears once it listens
        recv = procs.start(
            f"recv-{port}",
            [*module, "recv", "--port", str(port), "--timeout", f"{timeout:g}",
             "--ready-file", str(ready)],
            ns=dst_ns,
            env=env,
        )  # fmt: skip
        wait_for(
            lambda: ready.exists() or not recv.alive(),
            timeout=RECEIVER_START,
            what="the transfer receiver",
        )
        if not ready.exists():
            raise TransferError(f"Receiver failed: {recv.stderr_text()[-500:]}")

        # sender in the foreground
        start = time.monotonic()
        res = subprocess.run(
            netns_argv(
                src_ns,
                [*module, "send", "--addr", dst_addr, "--port", str(port),
                 "--nbytes", str(nbytes), "--seed", str(seed),
                 "--timeout", f"{timeout:g}"],
            ),
            capture_output=True,
            text=True,
            timeout=timeout + 10,
            env={**os.environ, **env},
        )  # fmt: skip
        sent = _one_json(res.stdout, res.stderr, "sender")
        procs.wait(recv, timeout=max(1.0, timeout - (time.monotonic() - start)))
        got = _one_json(recv.stdout_text(), recv.stderr_text(), "receiver")
    seconds = float(sent["seconds"])
    result = {
        "bytes": int(got["bytes"]),
        "bytes_sent": int(sent["bytes"]),
        "sha256_sent": str(sent["sha256"]),
        "sha256_received": str(got["sha256"]),
        "match": sent["sha256"] == got["sha256"] and sent["bytes"] == got["bytes"],
        "seconds": seconds,
        "mbps": int(got["bytes"]) * 8 / seconds / 1e6 if seconds > 0 else 0.0,
    }
    log.info(
        "transfer %s -> %s: %d bytes, match %s, %.0f Mbit/s",
        src_ns, dst_addr, result["bytes"], result["match"], result["mbps"],
    )  # fmt: skip
    return result


def _one_json(stdout: str, stderr: str, who: str) -> dict[str, Any]:
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise TransferError(f"The {who} printed no result: {stderr.strip()[-500:]}")
    data: dict[str, Any] = json.loads(lines[-1])
    if "error" in data:
        raise TransferError(f"The {who} failed: {data['error']}")
    return data


def _pythonpath() -> str:
    parts = [str(_REPO_ROOT), os.environ.get("PYTHONPATH", "")]
    return os.pathsep.join(p for p in parts if p)
