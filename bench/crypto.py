"""`espgate bench crypto`: AES-GCM per packet, the engine against its references.

Theory of operation: every point is one (backend, size, key size, operation).
Each backend is a runner that seals or opens ``count`` packets and returns the
elapsed nanoseconds:

* ``espgate`` / ``espgate-openssl``: the engine's public batch API
  (``SAHandle``, ``encrypt_batch``, ``decrypt_batch``) on rows of
  ``BATCH_HEADROOM + size + BATCH_TAILROOM`` bytes, ``batch`` rows a call, with
  the intel-ipsec-mb or the OpenSSL backend.  ``size`` is the inner packet, so
  the engine also writes the ESP header, padding and trailer.  Decryption works
  in place, so each call first copies a sealed template; that copy is timed on
  its own in the same sample and subtracted (``copy_ns`` in the point).
* ``ipsec-mb-raw`` and ``openssl-evp``: plain C loops (``bench._rawloops``),
  key expanded or context set once, no Python per packet: the ceilings.
* ``openssl-speed``: ``openssl speed -mr -evp aes-N-gcm -bytes SIZE``; its
  count and time give ns per packet.
* ``cryptography``: a Python loop over ``AESGCM.encrypt``/``decrypt``.

The first sample of a point calibrates its packet count to the target time;
repeats walk the whole grid again, so every backend sees the same machine
noise.  Each point keeps the median and the spread of its samples.  Sizes are
plaintext bytes per packet; GB/s is size over ns per packet.
"""

from __future__ import annotations

import argparse
import logging
import math
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench import _rawloops
from bench.common import (
    OutputError,
    Progress,
    check_outputs,
    default_output,
    float_range,
    fmt,
    int_range,
    interruptible,
    json_path,
    machine_info,
    summarize,
    usage_error,
    write_outputs,
)

log = logging.getLogger("espgate.bench")

PROG = "espgate bench crypto"

__all__ = [
    "BACKENDS",
    "CryptoConfig",
    "make_runner",
    "run_crypto",
    "main",
]

BACKENDS = (
    "espgate",
    "espgate-openssl",
    "ipsec-mb-raw",
    "openssl-evp",
    "openssl-speed",
    "cryptography",
)
SIZES = (64, 512, 1400, 8950)
# the dataplane's largest batch (MAX_BATCH in fastpath/_engine.pyx)
MAX_BATCH = 1024
KEY_BITS = (128, 256)
OPS = ("encrypt", "decrypt")
SPI = 0x0000B00C
SALT = bytes.fromhex("0a0b0c0d")
AAD = bytes.fromhex("0000b00c00000001")

# a runner seals or opens `count` packets and returns the elapsed nanoseconds
Runner = Callable[[int], int]


@dataclass
class CryptoConfig:
    """What one `bench crypto` run measures."""

    sizes: tuple[int, ...] = SIZES
    key_bits: tuple[int, ...] = KEY_BITS
    ops: tuple[str, ...] = OPS
    backends: tuple[str, ...] = BACKENDS
    repeat: int = 5
    seconds: float = 0.2
    batch: int = 64
    speed_sizes: tuple[int, ...] | None = None
    speed_key_bits: tuple[int, ...] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def speed_seconds(self) -> int:
        """Return the -seconds of each `openssl speed` sample (whole seconds)."""
        return max(1, round(self.seconds * 5))

    @classmethod
    def quick(cls, repeat: int = 1) -> CryptoConfig:
        """Return the small grid the smoke tests run (every backend, fewer points)."""
        return cls(
            sizes=(64, 1400),
            key_bits=(128,),
            repeat=repeat,
            seconds=0.01,
            speed_sizes=(1400,),
        )


def _key(bits: int) -> bytes:
    # a fixed, non-secret benchmark key
    return bytes(range(bits // 8))


# ---------------------------------------------------------------- runners


class _EngineBatch:
    """The engine's batch API over preallocated rows (one SA, one backend)."""

    def __init__(self, backend: str, size: int, key_bits: int, op: str, batch: int):
        from fastpath import BATCH_HEADROOM, BATCH_TAILROOM, SAHandle, SAParams

        params = SAParams(
            spi=SPI,
            inbound=op == "decrypt",
            key=_key(key_bits),
            salt=SALT,
            session=1,
            peer=("198.18.0.2", 4500),
        )
        self.backend = backend
        self.handle_factory = lambda: SAHandle(params, backend=backend)
        self.handle = self.handle_factory()
        self.size = size
        self.op = op
        width = BATCH_HEADROOM + size + BATCH_TAILROOM
        width += -width % 64
        self.pkts = np.zeros((batch, width), dtype=np.uint8)
        self.pkts[:, BATCH_HEADROOM : BATCH_HEADROOM + size] = 0x5A
        # an IPv4 version nibble, so the ESP next header is 4
        self.pkts[:, BATCH_HEADROOM] = 0x45
        self.lengths = np.full(batch, size, dtype=np.int32)
        self.copy_ns = 0
        if op == "decrypt":
            # seal one batch with an outbound twin of the SA: the template
            out = SAParams(**{**params.__dict__, "inbound": False})
            sealer = SAHandle(out, backend=backend)
            assert self._encrypt(sealer) == batch
            self.template = self.pkts.copy()
            self.esp_lengths = self.lengths.copy()

    def _encrypt(self, handle: Any) -> int:
        from fastpath import encrypt_batch

        self.lengths[:] = self.size
        return int(encrypt_batch(handle, self.pkts, self.lengths))

    def __call__(self, count: int) -> int:
        from fastpath import decrypt_batch, encrypt_batch

        calls = max(1, math.ceil(count / len(self.lengths)))
        pkts, lengths, handle = self.pkts, self.lengths, self.handle
        if self.op == "encrypt":
            if handle.next_seq > 0xF0000000:
                self.handle = handle = self.handle_factory()
            size = self.size
            t0 = time.perf_counter_ns()
            for _ in range(calls):
                lengths[:] = size
                encrypt_batch(handle, pkts, lengths)
            return time.perf_counter_ns() - t0
        template, esp_lengths = self.template, self.esp_lengths
        t0 = time.perf_counter_ns()
        for _ in range(calls):
            np.copyto(pkts, template)
            np.copyto(lengths, esp_lengths)
            ok = decrypt_batch(handle, pkts, lengths)
        elapsed = time.perf_counter_ns() - t0
        assert ok == len(lengths), f"{self.backend}: only {ok} rows verified"

        # the same copies alone, subtracted so only the decryption remains
        t0 = time.perf_counter_ns()
        for _ in range(calls):
            np.copyto(pkts, template)
            np.copyto(lengths, esp_lengths)
        self.copy_ns = time.perf_counter_ns() - t0
        return max(1, elapsed - self.copy_ns)


def _raw_runner(backend: str, size: int, key_bits: int, op: str) -> Runner:
    loop = (
        _rawloops.ipsec_mb_loop
        if backend == "ipsec-mb-raw"
        else (_rawloops.openssl_evp_loop)
    )
    key = _key(key_bits)
    decrypt = op == "decrypt"
    return lambda count: int(loop(key, size, count, decrypt))


def _cryptography_runner(size: int, key_bits: int, op: str) -> Runner:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    aead = AESGCM(_key(key_bits))
    data = bytes([0x5A]) * size
    nonces = [SALT + i.to_bytes(8, "big") for i in range(256)]
    sealed = aead.encrypt(nonces[0], data, AAD)

    def run(count: int) -> int:
        if op == "encrypt":
            enc = aead.encrypt
            t0 = time.perf_counter_ns()
            for i in range(count):
                enc(nonces[i & 255], data, AAD)
            return time.perf_counter_ns() - t0
        dec, nonce = aead.decrypt, nonces[0]
        t0 = time.perf_counter_ns()
        for _ in range(count):
            dec(nonce, sealed, AAD)
        return time.perf_counter_ns() - t0

    return run


def make_runner(
    backend: str, size: int, key_bits: int, op: str, batch: int = 64
) -> Runner:
    """Return a runner for one point (not for openssl-speed, see `openssl_speed`)."""
    assert backend in BACKENDS and backend != "openssl-speed", f"Bad backend {backend}"
    assert op in OPS, f"Bad op {op}"
    if backend in ("espgate", "espgate-openssl"):
        engine_backend = "ipsec-mb" if backend == "espgate" else "openssl"
        return _EngineBatch(engine_backend, size, key_bits, op, batch)
    if backend in ("ipsec-mb-raw", "openssl-evp"):
        return _raw_runner(backend, size, key_bits, op)
    return _cryptography_runner(size, key_bits, op)


_SPEED_RESULT = re.compile(r"^\+R:(\d+):[^:]+:([\d.]+)$", re.MULTILINE)


def openssl_speed(size: int, key_bits: int, op: str, seconds: int = 1) -> float:
    """Run `openssl speed -evp` for one size; return its ns per packet."""
    argv = ["openssl", "speed", "-mr", "-seconds", str(seconds), "-bytes", str(size)]
    if op == "decrypt":
        argv.append("-decrypt")
    argv += ["-evp", f"aes-{key_bits}-gcm"]
    res = subprocess.run(
        argv, capture_output=True, text=True, timeout=60 + 10 * seconds
    )
    # the -mr result lines go to stderr in OpenSSL 3.0, the rates to stdout
    m = _SPEED_RESULT.search(res.stdout + res.stderr)
    if res.returncode != 0 or m is None:
        raise RuntimeError(
            f"openssl speed failed ({res.returncode}): "
            f"{(res.stderr or res.stdout).strip()[-300:]}"
        )
    count, secs = int(m.group(1)), float(m.group(2))
    assert count > 0, "openssl speed counted no packets"
    return secs * 1e9 / count


# ---------------------------------------------------------------- the run


def versions() -> dict[str, str]:
    """Return the versions of every library the figures depend on."""
    import cryptography
    from cryptography.hazmat.backends.openssl.backend import backend as ossl

    cli = subprocess.run(["openssl", "version"], capture_output=True, text=True)
    return {
        "intel-ipsec-mb": _rawloops.ipsec_mb_version(),
        "intel-ipsec-mb-arch": _rawloops.ipsec_mb_arch(),
        "openssl-libcrypto": _rawloops.openssl_version(),
        "openssl-cli": cli.stdout.strip(),
        "cryptography": cryptography.__version__,
        "cryptography-openssl": ossl.openssl_version_text(),
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def _grid(cfg: CryptoConfig) -> list[tuple[str, int, int, str]]:
    points = []
    for bits in cfg.key_bits:
        for op in cfg.ops:
            for size in cfg.sizes:
                for backend in cfg.backends:
                    if backend == "openssl-speed" and not (
                        size in (cfg.speed_sizes or cfg.sizes)
                        and bits in (cfg.speed_key_bits or cfg.key_bits)
                    ):
                        continue
                    points.append((backend, size, bits, op))
    return points


def run_crypto(cfg: CryptoConfig, progress: bool = True) -> list[dict[str, Any]]:
    """Measure every point of the grid `cfg.repeat` times; return the points."""
    grid = _grid(cfg)
    runners: dict[tuple[str, int, int, str], Runner] = {}
    counts: dict[tuple[str, int, int, str], int] = {}
    samples: dict[tuple[str, int, int, str], list[float]] = {p: [] for p in grid}
    copies: dict[tuple[str, int, int, str], list[float]] = {p: [] for p in grid}
    bar = Progress(len(grid) * cfg.repeat, "bench crypto") if progress else None
    speed_seconds = cfg.speed_seconds
    for _ in range(cfg.repeat):
        for point in grid:
            backend, size, bits, op = point
            if bar:
                bar.show(f"{backend} {op} aes-{bits} {size} B")
            if backend == "openssl-speed":
                samples[point].append(openssl_speed(size, bits, op, speed_seconds))
            else:
                if point not in runners:
                    runners[point] = runner = make_runner(
                        backend, size, bits, op, cfg.batch
                    )
                    # calibrate: a short run, then scale to the target time
                    probe = max(cfg.batch, 256)
                    ns = max(1, runner(probe)) / probe
                    counts[point] = max(cfg.batch, int(cfg.seconds * 1e9 / ns))
                runner = runners[point]
                count = counts[point]
                if isinstance(runner, _EngineBatch):
                    count = math.ceil(count / cfg.batch) * cfg.batch
                samples[point].append(runner(count) / count)
                if isinstance(runner, _EngineBatch) and op == "decrypt":
                    copies[point].append(runner.copy_ns / count)
            if bar:
                bar.step(f"{backend} {op} aes-{bits} {size} B")
    if bar:
        bar.close()

    # median and spread per point
    out: list[dict[str, Any]] = []
    for point in grid:
        backend, size, bits, op = point
        s = summarize(samples[point])
        entry: dict[str, Any] = {
            "backend": backend,
            "size": size,
            "key_bits": bits,
            "op": op,
            "ns_per_packet": round(s["median"], 2),
            "gbytes_per_s": round(size / s["median"], 4),
            "packets_per_s": round(1e9 / s["median"]),
            "ns_min": round(s["min"], 2),
            "ns_max": round(s["max"], 2),
            "spread_pct": round(s["spread_pct"], 1),
            "repeats": len(samples[point]),
        }
        if copies[point]:
            entry["copy_ns"] = round(summarize(copies[point])["median"], 2)
        if backend in ("espgate", "espgate-openssl"):
            entry["batch"] = cfg.batch
        out.append(entry)
    return out


# ---------------------------------------------------------------- reports


def _lookup(points: list[dict[str, Any]]) -> dict[tuple[str, int, int, str], float]:
    return {
        (p["backend"], p["size"], p["key_bits"], p["op"]): p["ns_per_packet"]
        for p in points
    }


def ratio(
    points: list[dict[str, Any]], backend: str, ref: str, size: int, bits: int, op: str
) -> float | None:
    """Return backend's throughput over ref's for one cell, or None if missing."""
    ns = _lookup(points)
    a, b = ns.get((backend, size, bits, op)), ns.get((ref, size, bits, op))
    if not a or not b:
        return None
    return b / a


def markdown(doc: dict[str, Any]) -> str:
    """Render the run as Markdown: one table per key size and operation."""
    points = doc["points"]
    ns = _lookup(points)
    sizes = sorted({p["size"] for p in points})
    lines = [
        "# espgate bench crypto",
        "",
        f"`{doc['command']}` on {doc['machine']['cpu_model']}, "
        f"{doc['machine']['cores']} cores, kernel {doc['machine']['kernel']}, "
        f"{doc['started']}.",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in doc["versions"].items()) + ".",
        "",
        "Cells: median ns per packet (GB/s), one core; spread is (max - min) / "
        f"median over {doc['config']['repeat']} repeats of "
        f"{doc['config']['seconds_per_sample']:g} s.",
    ]
    for bits in sorted({p["key_bits"] for p in points}):
        for op in OPS:
            if not any(p["key_bits"] == bits and p["op"] == op for p in points):
                continue
            lines += ["", f"## AES-{bits}-GCM {op}", ""]
            lines.append("| backend | " + " | ".join(f"{s} B" for s in sizes) + " |")
            lines.append("| --- |" + " --- |" * len(sizes))
            for backend in BACKENDS:
                cells = []
                for size in sizes:
                    p = next(
                        (
                            q
                            for q in points
                            if (q["backend"], q["size"], q["key_bits"], q["op"])
                            == (backend, size, bits, op)
                        ),
                        None,
                    )
                    cells.append(
                        "-"
                        if p is None
                        else f"{fmt(p['ns_per_packet'])} ({fmt(p['gbytes_per_s'], 2)})"
                        f" ±{fmt(p['spread_pct'], 0)}%"
                    )
                if any(c != "-" for c in cells):
                    lines.append(f"| {backend} | " + " | ".join(cells) + " |")
            for ref in ("ipsec-mb-raw", "openssl-evp"):
                cells = []
                for size in sizes:
                    a, b = (
                        ns.get(("espgate", size, bits, op)),
                        ns.get((ref, size, bits, op)),
                    )
                    cells.append(f"{b / a:.2f}x" if a and b else "-")
                lines.append(f"| **espgate / {ref}** | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Ratios are throughput ratios (reference ns / espgate ns): above 1 means "
        "espgate is faster.",
        "",
    ]
    return "\n".join(lines)


def plot(doc: dict[str, Any], path: Path) -> None:
    """Plot GB/s against packet size, one panel per key size and operation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = doc["points"]
    panels = [
        (bits, op)
        for bits in sorted({p["key_bits"] for p in points})
        for op in OPS
        if any(p["key_bits"] == bits and p["op"] == op for p in points)
    ]
    cols = 2 if len(panels) > 1 else 1
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4 * rows), squeeze=False)
    for ax, (bits, op) in zip(axes.flat, panels, strict=False):
        for backend in BACKENDS:
            pts = sorted(
                (p["size"], p["gbytes_per_s"])
                for p in points
                if (p["backend"], p["key_bits"], p["op"]) == (backend, bits, op)
            )
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=backend)
        ax.set_xscale("log")
        ax.set_title(f"AES-{bits}-GCM {op}")
        ax.set_xlabel("packet size (bytes)")
        ax.set_ylabel("GB/s (one core)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(f"espgate bench crypto, {doc['machine']['cpu_model']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- entry points


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `bench crypto`'s options to a parser."""
    parser.add_argument(
        "--json",
        type=json_path,
        help="results file, in an existing directory (.md and .png are written "
        "next to it; default bench/results/crypto.json, with --quick a new "
        "scratch directory)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a small grid with every backend (smoke test; repeat 1, 0.01 s "
        "samples unless given)",
    )
    parser.add_argument(
        "--repeat", type=int_range(1), help="samples per point (default 5, quick 1)"
    )
    parser.add_argument(
        "--seconds",
        type=float_range(0.0, inclusive=False),
        help="target time per sample (default 0.2, quick 0.01)",
    )
    parser.add_argument(
        "--batch",
        type=int_range(1, MAX_BATCH),
        default=64,
        help=f"rows per engine batch call, 1 to {MAX_BATCH} (default 64)",
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bar on stderr"
    )


def command(args: argparse.Namespace, argv: list[str]) -> int:
    """Run `bench crypto` with parsed arguments; write the output files."""
    # refuse a bad output path before measuring (a quick run's scratch is new)
    try:
        if args.json or not args.quick:
            planned = args.json or default_output("crypto", quick=False)
            check_outputs(planned, "crypto", quick=args.quick)
    except OutputError as exc:
        return usage_error(PROG, exc)
    if args.quick:
        cfg = CryptoConfig.quick(repeat=args.repeat or 1)
    else:
        cfg = CryptoConfig(repeat=args.repeat or 5)
    if args.seconds is not None:
        cfg.seconds = args.seconds
    # add_arguments' types checked the numbers
    cfg.batch = args.batch
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    points = run_crypto(cfg, progress=not args.no_progress)
    doc = {
        "benchmark": "crypto",
        "command": "espgate bench crypto " + " ".join(argv),
        "started": started,
        "machine": machine_info(),
        "versions": versions(),
        "config": {
            "sizes": list(cfg.sizes),
            "key_bits": list(cfg.key_bits),
            "ops": list(cfg.ops),
            "repeat": cfg.repeat,
            "seconds_per_sample": cfg.seconds,
            "openssl_speed_seconds": cfg.speed_seconds,
            "batch": cfg.batch,
            "aad_bytes": len(AAD),
            "tag_bytes": 16,
        },
        "points": points,
    }
    # the scratch directory of a quick run is made only now, results in hand
    path = args.json or default_output("crypto", args.quick)
    try:
        paths = write_outputs(
            path, doc, markdown(doc), lambda p: plot(doc, p), quick=args.quick
        )
    except OutputError as exc:
        return usage_error(PROG, exc)
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def profile(backend: str, size: int, key_bits: int, op: str, seconds: float) -> None:
    """Run one backend's plain loop for about `seconds` (for a profiler)."""
    runner = make_runner(backend, size, key_bits, op)
    total_ns = total = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        total_ns += runner(100_000)
        total += 100_000
    print(f"{backend} {op} aes-{key_bits} {size} B: {total_ns / total:.1f} ns/packet")


def main(argv: list[str] | None = None) -> int:
    """Run `python -m bench.crypto`: the benchmark, or one loop with --profile."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m bench.crypto")
    add_arguments(parser)
    parser.add_argument(
        "--profile",
        action="store_true",
        help="run one plain loop (for perf/py-spy) instead",
    )
    parser.add_argument(
        "--backend",
        default="espgate",
        choices=[b for b in BACKENDS if b != "openssl-speed"],
    )
    parser.add_argument("--size", type=int_range(1, 65535), default=1400)
    parser.add_argument("--key-bits", type=int, default=128, choices=KEY_BITS)
    parser.add_argument("--op", default="encrypt", choices=OPS)
    parser.add_argument(
        "--duration",
        type=float_range(0.0, inclusive=False),
        default=10.0,
        help="--profile: seconds to loop",
    )
    args = parser.parse_args(argv)
    if args.profile:

        def loop() -> int:
            profile(args.backend, args.size, args.key_bits, args.op, args.duration)
            return 0

        return interruptible("python -m bench.crypto", loop, final=True)
    return interruptible(
        "python -m bench.crypto", lambda: command(args, argv), final=True
    )


if __name__ == "__main__":
    sys.exit(main())
