"""A TCP bulk sender and a hashing receiver, run as `python -m control.lab.transfer`.

Theory of operation: the sender streams `nbytes` of pseudo-random data drawn
from numpy's PCG64 generator seeded with `--seed`, so the stream is the same
on every run and cheap to make (well above 2 Gbit/s on one core). Every
`MARK_STRIDE` bytes of the stream, counted from its first byte, begin with
`MARKER`; the stride is short enough that any plaintext TCP segment holds a
whole marker inside the first 256 captured bytes, which is what lets a packet
capture prove that no plaintext crossed a link. The receiver accepts one
connection, hashes everything until EOF and closes; the sender half-closes
after the last byte and waits for that close, so its clock covers delivery.

Each side prints exactly one JSON line: {"role", "bytes", "sha256",
"seconds"} (and "error" when it failed). The receiver creates `--ready-file`
once it listens, so a harness knows when to start the sender.

    python -m control.lab.transfer recv --port 5201 --ready-file /tmp/r
    python -m control.lab.transfer send --addr 198.19.1.2 --port 5201 --nbytes 20M
"""

from __future__ import annotations

import argparse
import hashlib
import json
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

__all__ = [
    "CHUNK",
    "MARKER",
    "MARK_STRIDE",
    "generate",
    "main",
    "receive",
    "send",
]

MARKER = b"ESPGATE-PLAINTEXT-MARK"
MARK_STRIDE = 128
CHUNK = 1 << 20

assert CHUNK % MARK_STRIDE == 0


def generate(nbytes: int, seed: int) -> Iterator[memoryview]:
    """Yield the marked pseudo-random stream for `seed` in chunks of CHUNK."""
    rng = np.random.Generator(np.random.PCG64(seed))
    marker = np.frombuffer(MARKER, dtype=np.uint8)
    left = nbytes
    while left > 0:
        buf = bytearray(rng.bytes(CHUNK))
        rows = np.frombuffer(buf, dtype=np.uint8).reshape(-1, MARK_STRIDE)
        rows[:, : len(MARKER)] = marker
        view = memoryview(buf)
        yield view[: min(left, CHUNK)]
        left -= CHUNK


def send(
    addr: str, port: int, nbytes: int, seed: int = 1, timeout: float = 60.0
) -> dict[str, object]:
    """Connect to a receiver, stream the data, and wait for it to close."""
    digest = hashlib.sha256()
    sent = 0
    deadline = time.monotonic() + timeout
    sock = _connect(addr, port, deadline)
    start = time.monotonic()
    with sock:
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        for chunk in generate(nbytes, seed):
            digest.update(chunk)
            sock.sendall(chunk)
            sent += len(chunk)
        sock.shutdown(socket.SHUT_WR)

        # the receiver closes after hashing everything: that ends the clock
        while sock.recv(4096):
            pass
    return {
        "role": "send",
        "bytes": sent,
        "sha256": digest.hexdigest(),
        "seconds": time.monotonic() - start,
    }


def _connect(addr: str, port: int, deadline: float) -> socket.socket:
    while True:
        try:
            return socket.create_connection((addr, port), timeout=2.0)
        except OSError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.1)


def receive(
    port: int,
    bind: str = "0.0.0.0",
    timeout: float = 60.0,
    ready_file: Path | None = None,
) -> dict[str, object]:
    """Accept one connection, hash it until EOF, close it and report."""
    digest = hashlib.sha256()
    received = 0
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as lsock:
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind((bind, port))
        lsock.listen(1)
        lsock.settimeout(timeout)
        if ready_file is not None:
            ready_file.touch()
        conn, _peer = lsock.accept()
    start = time.monotonic()
    with conn:
        conn.settimeout(timeout)
        while True:
            n = conn.recv_into(buf)
            if n == 0:
                break
            digest.update(view[:n])
            received += n
    return {
        "role": "recv",
        "bytes": received,
        "sha256": digest.hexdigest(),
        "seconds": time.monotonic() - start,
    }


def _size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if text and text[-1].upper() in units:
        return int(float(text[:-1]) * units[text[-1].upper()])
    return int(text)


def main(argv: list[str] | None = None) -> int:
    """Run the sender or the receiver and print one JSON line."""
    parser = argparse.ArgumentParser(prog="python -m control.lab.transfer")
    sub = parser.add_subparsers(dest="role", required=True)
    p_send = sub.add_parser("send", help="stream marked pseudo-random data")
    p_send.add_argument("--addr", required=True)
    p_send.add_argument("--port", type=int, default=5201)
    p_send.add_argument("--nbytes", type=_size, required=True)
    p_send.add_argument("--seed", type=int, default=1)
    p_send.add_argument("--timeout", type=float, default=60.0)
    p_recv = sub.add_parser("recv", help="receive one stream and hash it")
    p_recv.add_argument("--bind", default="0.0.0.0")
    p_recv.add_argument("--port", type=int, default=5201)
    p_recv.add_argument("--timeout", type=float, default=60.0)
    p_recv.add_argument("--ready-file", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.role == "send":
            result = send(args.addr, args.port, args.nbytes, args.seed, args.timeout)
        else:
            result = receive(args.port, args.bind, args.timeout, args.ready_file)
    except OSError as exc:
        print(json.dumps({"role": args.role, "error": str(exc)}), flush=True)
        return 1
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
