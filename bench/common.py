"""What both benchmarks share: machine facts, repeats, progress and output files.

Theory of operation: a benchmark measures each point ``repeat`` times and keeps
the median with its min, max and spread (max - min over the median, in
percent).  It reports progress on stderr with a one-line bar, then
``write_outputs`` writes the JSON document (machine, versions, command, points),
a Markdown file next to it (same stem, ``.md``) and a PNG plot (``.png``).
Figures are never hard-coded anywhere else: the README shows what a run wrote.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "Progress",
    "machine_info",
    "summarize",
    "write_outputs",
]

CPU_FLAGS = ("aes", "avx2", "avx512f", "vaes", "vpclmulqdq")


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


def write_outputs(
    json_path: Path,
    doc: dict[str, Any],
    markdown: str,
    plot: Callable[[Path], None],
) -> list[Path]:
    """Write the JSON document, the Markdown next to it and the PNG plot."""
    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(doc, indent=2) + "\n")
    md_path = json_path.with_suffix(".md")
    md_path.write_text(markdown)
    png_path = json_path.with_suffix(".png")
    plot(png_path)
    return [json_path, md_path, png_path]


def fmt(value: float | None, digits: int = 1) -> str:
    """Format a figure for a table cell; None becomes a dash."""
    if value is None:
        return "-"
    return f"{value:.{digits}f}"
