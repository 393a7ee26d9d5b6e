"""``espgate demo`` / ``make run``: the main job on the embedded default.

Builds a lab (client, hub and server namespaces joined by veth pairs), runs
``espgate serve`` in the hub and a real strongSwan client in the client
namespace, then shows the tunnel working:

1. the client connects and gets an inside address by config mode;
2. it pings the server behind the headend;
3. a short checked transfer runs under a capture of the hub's outer
   interface, which must show only IKE and ESP-in-UDP and no plaintext;
4. a large TCP transfer (128 MiB by default) measures throughput and checks
   SHA-256 on both ends.

It prints a summary and writes the results as JSON.  The lab is removed on
success, failure and Ctrl-C alike.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from control.lab import tcp_transfer
from control.lab.procs import interrupt_once
from control.selftest import HeadendLab, check_traffic

log = logging.getLogger("espgate.demo")


def run_demo(
    json_path: Path,
    *,
    nbytes: int = 128 * 1024 * 1024,
    esp: str = "aes128gcm16",
    keep_logs: str | None = None,
) -> dict[str, Any]:
    """Run the demo and return (and write) its results."""
    workdir = (
        Path(keep_logs) if keep_logs else Path(tempfile.mkdtemp(prefix="espgate-"))
    )
    result: dict[str, Any] = {
        "ike_established": False,
        "client_inside_address": None,
        "esp_cipher": f"AES-GCM-16-{esp[3:6]}",
        "engine": "userspace",
        "ping_loss_pct": None,
        "transfer_bytes": 0,
        "transfer_sha256_match": False,
        "throughput_mbps": None,
        "logs": str(workdir),
    }
    started = time.monotonic()
    try:
        with interrupt_once(), HeadendLab(workdir, prefix=f"egd{os.getpid() % 100000}",
                        embedded=True) as lab:
            assert lab.topo is not None
            topo = lab.topo
            client = lab.client(esp=esp)
            result["ike_established"] = client.initiate()
            if not result["ike_established"]:
                raise RuntimeError(f"tunnel did not come up; see {client.log_path}")
            result["client_inside_address"] = client.virtual_ip()
            print(
                f"tunnel up: client {topo.cli_outer_ip} -> headend "
                f"{topo.hub_outer_ip}, inside address "
                f"{result['client_inside_address']}",
                flush=True,
            )

            traffic, failures = check_traffic(lab, client, 16 * 1024 * 1024)
            result["ping_loss_pct"] = traffic["ping"]["loss_pct"]
            result["ping_rtt_avg_ms"] = traffic["ping"].get("rtt_avg_ms")
            result["capture"] = {
                "by_proto": traffic["capture"]["by_proto"],
                "plaintext_marker_seen": traffic["capture"]["plaintext_marker_seen"],
            }
            result["capture_checks_failed"] = failures
            print(
                f"ping {topo.srv_ip}: {traffic['ping']['received']}/"
                f"{traffic['ping']['sent']} replies; capture on "
                f"{topo.hub_outer_if}: {traffic['capture']['by_proto']}, "
                f"plaintext seen: {traffic['capture']['plaintext_marker_seen']}",
                flush=True,
            )

            xfer = tcp_transfer(
                topo,
                src_ns=topo.cli,
                dst_ns=topo.srv,
                dst_addr=topo.srv_ip,
                nbytes=nbytes,
                timeout=300,
            )
            result["transfer_bytes"] = xfer["bytes"]
            result["transfer_sha256_match"] = bool(xfer["match"]) and not failures
            result["throughput_mbps"] = round(xfer["mbps"], 1)
            result["headend_sessions"] = lab.show()["sessions"]
            print(
                f"transfer: {xfer['bytes']} bytes in {xfer['seconds']:.2f} s, "
                f"{xfer['mbps']:.0f} Mbit/s, SHA-256 "
                f"{'matches' if xfer['match'] else 'DIFFERS'}",
                flush=True,
            )
    except KeyboardInterrupt:
        result["error"] = "interrupted"
        print("interrupted; lab removed", flush=True)
    except Exception as exc:
        result["error"] = str(exc)
        log.error("demo failed: %s (logs in %s)", exc, workdir)
    result["seconds"] = round(time.monotonic() - started, 1)
    ok = (result["ike_established"] and result["transfer_sha256_match"]
          and result["ping_loss_pct"] == 0)
    if ok and not keep_logs:
        shutil.rmtree(workdir, ignore_errors=True)
        result["logs"] = None
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    ok = (
        result["ike_established"]
        and result["transfer_sha256_match"]
        and result["ping_loss_pct"] == 0
    )
    print(f"{'OK' if ok else 'FAILED'}: results in {json_path}"
          + ("" if ok else f", logs in {workdir}"), flush=True)
    return result
