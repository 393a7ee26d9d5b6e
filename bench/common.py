"""What both benchmarks share: machine facts, repeats, progress and output files.

Theory of operation: a benchmark measures each point ``repeat`` times and keeps
the median with its min, max and spread (max - min over the median, in
percent).  It reports progress on stderr with a one-line bar, then
``write_outputs`` writes the JSON document (machine, versions, command, points),
a Markdown file next to it (same stem, ``.md``) and a PNG plot (``.png``).
Figures are never hard-coded anywhere else: the README shows what a run wrote.

Every numeric option goes through :func:`int_range` or :func:`float_range`, so a
bad value is an argparse error (usage, one line, exit 2), never an assertion;
``--json`` goes through :func:`json_path`, which refuses a directory or a
directory that does not exist (none is created).  Without ``--json`` a full
run writes the committed ``bench/results/`` of this package (what the README
shows) and a ``--quick`` smoke run a new scratch directory, see
:func:`default_output`.
The three files are rendered to temporary names first and renamed with SIGINT
and SIGTERM held back, so an interrupted run leaves the previous set or the
new one, never a mix; :func:`interruptible` turns Ctrl-C into one line and
exit status 130.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "INTERRUPTED_STATUS",
    "RESULTS_DIR",
    "Progress",
    "default_output",
    "float_range",
    "int_range",
    "interruptible",
    "json_path",
    "machine_info",
    "summarize",
    "write_outputs",
]

# what a shell reports for a command ended by SIGINT (128 + 2)
INTERRUPTED_STATUS = 130

CPU_FLAGS = ("aes", "avx2", "avx512f", "vaes", "vpclmulqdq")
# the committed results (the README's figures): where full runs write by default
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine_info() -> dict[str, Any]:
    """Return the CPU model, the flags that matter for AES-GCM, kernel and cores."""
    model = "unknown"
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model == "unknown":
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return {
        "cpu_model": model,
        "cpu_flags": {flag: flag in flags for flag in CPU_FLAGS},
        "kernel": platform.release(),
        "cores": os.cpu_count(),
    }


def summarize(samples: Sequence[float]) -> dict[str, float]:
    """Return median, min, max and spread (percent of the median) of samples."""
    assert samples, "No samples"
    med = statistics.median(samples)
    lo, hi = min(samples), max(samples)
    return {
        "median": med,
        "min": lo,
        "max": hi,
        "spread_pct": 100.0 * (hi - lo) / med if med else 0.0,
    }


class Progress:
    """A one-line progress bar on stderr: ``[#####-----] 12/96 label``."""

    def __init__(self, total: int, title: str, width: int = 30) -> None:
        self.total = max(1, total)
        self.title = title
        self.width = width
        self.done = 0
        self.start = time.monotonic()
        self.tty = sys.stderr.isatty()
        self._last_line = 0.0

    def step(self, label: str) -> None:
        """Count one finished unit of work and redraw the bar."""
        self.done += 1
        self.show(label)

    def show(self, label: str) -> None:
        """Redraw the bar with ``label`` (what runs now) without counting."""
        filled = self.width * self.done // self.total
        bar = "#" * filled + "-" * (self.width - filled)
        elapsed = time.monotonic() - self.start
        text = f"{self.title} [{bar}] {self.done}/{self.total} {elapsed:5.0f}s {label}"
        if self.tty:
            sys.stderr.write("\r\x1b[K" + text[:160])
        elif self.done == self.total or time.monotonic() - self._last_line > 5:
            # not a terminal (CI logs): a line every few seconds at most
            sys.stderr.write(text + "\n")
            self._last_line = time.monotonic()
        sys.stderr.flush()

    def close(self) -> None:
        """End the bar's line."""
        if self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()


def int_range(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """Return an argparse type: an integer from lo to hi (no upper bound if None)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < lo or (hi is not None and value > hi):
            want = f"from {lo} to {hi}" if hi is not None else f">= {lo}"
            raise argparse.ArgumentTypeError(f"must be {want}, got {value}")
        return value

    return parse


def float_range(lo: float, *, inclusive: bool = True) -> Callable[[str], float]:
    """Return an argparse type: a finite number >= lo (> lo if not inclusive)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
        if not (value >= lo if inclusive else value > lo):
            want = f">= {lo:g}" if inclusive else f"> {lo:g}"
            raise argparse.ArgumentTypeError(f"must be {want}, got {text}")
        return value

    return parse


def json_path(text: str) -> Path:
    """Argparse type: a ``.json`` file name in a directory that exists."""
    path = Path(text)
    if text.endswith("/") or path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a directory, not a .json file")
    if path.suffix != ".json":
        # the Markdown and the plot take the same stem, .md and .png
        raise argparse.ArgumentTypeError(f"{text!r} does not end in .json")
    if not path.parent.is_dir():
        parent = str(path.parent)
        raise argparse.ArgumentTypeError(f"no directory {parent!r} for {text!r}")
    return path


def default_output(stem: str, quick: bool) -> Path:
    """Return where a run without ``--json`` writes ``stem``.json.

    A full run replaces the committed results in :data:`RESULTS_DIR`; a quick
    one gets a new scratch directory (made here, so call it when writing),
    never the committed files.
    """
    if quick:
        scratch = tempfile.mkdtemp(prefix=f"espgate-bench-{stem}-")
        return Path(scratch) / f"{stem}.json"
    return RESULTS_DIR / f"{stem}.json"


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    held = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        # a Ctrl-C that came meanwhile is delivered here, after the renames
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def write_outputs(
    json_path: Path,
    doc: dict[str, Any],
    markdown: str,
    plot: Callable[[Path], None],
) -> list[Path]:
    """Write the JSON document, the Markdown next to it and the PNG plot.

    All three or none: each is written to a temporary file in the same
    directory and the three are renamed into place together at the end.
    The directory must exist; none is created.
    """
    json_path = Path(json_path)
    finals = [json_path, json_path.with_suffix(".md"), json_path.with_suffix(".png")]
    temps: list[Path] = []
    try:
        for final in finals:
            fd, name = tempfile.mkstemp(
                prefix=f".{final.stem}-", suffix=final.suffix, dir=final.parent
            )
            os.close(fd)
            temps.append(Path(name))
        temps[0].write_text(json.dumps(doc, indent=2) + "\n")
        temps[1].write_text(markdown)
        plot(temps[2])
        with _signals_held():
            for temp, final in zip(temps, finals, strict=True):
                temp.chmod(0o644)
                os.replace(temp, final)
    finally:
        for temp in temps:
            temp.unlink(missing_ok=True)
    return finals


def interruptible(prog: str, run: Callable[[], int]) -> int:
    """Return run()'s status; a Ctrl-C becomes one line and INTERRUPTED_STATUS."""
    try:
        return run()
    except KeyboardInterrupt:
        # the progress bar may still own the line on a terminal
        end = "\n" if sys.stderr.isatty() else ""
        sys.stderr.write(f"{end}{prog}: interrupted, no results written\n")
        sys.stderr.flush()
        return INTERRUPTED_STATUS


def fmt(value: float | None, digits: int = 1) -> str:
    """Format a figure for a table cell; None becomes a dash."""
    if value is None:
        return "-"
    return f"{value:.{digits}f}"
