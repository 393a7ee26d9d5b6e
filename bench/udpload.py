"""The packet benchmark's UDP load generator and sink, one process each.

Theory of operation: ``python -m bench.udpload sink`` binds a UDP socket (4 MB
receive buffer), writes ``ready`` on stdout and counts datagrams with the C
``recvmmsg`` loop of :mod:`bench._rawloops` until its time is up or it has
seen nothing for ``--idle`` seconds after the first datagram; then it prints
one JSON line.  ``python -m bench.udpload send`` connects a UDP socket to the
sink and runs the C ``sendmmsg`` loop at the offered rate for a bounded time
and count, then prints one JSON line.  Both loops run without the GIL and
without Python per packet, so 64-byte figures show what the path under test
sustains rather than what the sender can produce.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
from typing import Any

__all__ = ["send", "sink", "main"]

BUFFER = 4 << 20


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def send(
    dst: tuple[str, int],
    size: int,
    rate_pps: float,
    seconds: float,
    *,
    src: str | None = None,
    max_count: int = 1 << 40,
    batch: int = 64,
) -> dict[str, Any]:
    """Send ``size``-byte UDP payloads to dst at rate_pps (0: unlimited)."""
    from bench._rawloops import udp_send_loop

    with socket.socket(_family(dst[0]), socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BUFFER)
        if src:
            s.bind((src, 0))
        s.connect(dst)
        sent, refused, ns = udp_send_loop(
            s.fileno(), size, rate_pps, seconds, max_count, batch
        )
    return {"sent": sent, "refused": refused, "seconds": ns / 1e9}


def sink(
    bind: tuple[str, int],
    size: int,
    seconds: float,
    idle: float,
    *,
    ready: Any = None,
    batch: int = 64,
) -> dict[str, Any]:
    """Count the datagrams arriving at bind; return count, bytes and span."""
    from bench._rawloops import udp_recv_loop

    with socket.socket(_family(bind[0]), socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUFFER)
        s.bind(bind)
        s.setblocking(False)
        if ready is not None:
            ready.write("ready\n")
            ready.flush()
        got, nbytes, ns, late = udp_recv_loop(s.fileno(), size, seconds, idle, batch)
    return {"received": got, "bytes": nbytes, "seconds": ns / 1e9, "reordered": late}


def main(argv: list[str] | None = None) -> int:
    """Run `python -m bench.udpload send|sink ...`; print one JSON line."""
    parser = argparse.ArgumentParser(prog="python -m bench.udpload")
    sub = parser.add_subparsers(dest="op", required=True)
    tx = sub.add_parser("send", help="paced sendmmsg load")
    tx.add_argument("--dst", required=True)
    tx.add_argument("--port", type=int, required=True)
    tx.add_argument("--src")
    tx.add_argument("--size", type=int, required=True, help="UDP payload bytes")
    tx.add_argument("--rate", type=float, default=0.0, help="datagrams/s, 0 = max")
    tx.add_argument("--seconds", type=float, required=True)
    tx.add_argument("--count", type=int, default=1 << 40)
    rx = sub.add_parser("sink", help="recvmmsg counter")
    rx.add_argument("--bind", required=True)
    rx.add_argument("--port", type=int, required=True)
    rx.add_argument("--size", type=int, required=True)
    rx.add_argument("--seconds", type=float, required=True)
    rx.add_argument("--idle", type=float, default=0.5)
    args = parser.parse_args(argv)
    if args.op == "send":
        out = send(
            (args.dst, args.port),
            args.size,
            args.rate,
            args.seconds,
            src=args.src,
            max_count=args.count,
        )
    else:
        out = sink(
            (args.bind, args.port),
            args.size,
            args.seconds,
            args.idle,
            ready=sys.stdout,
        )
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
