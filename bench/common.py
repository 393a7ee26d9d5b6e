"""What both benchmarks share: machine facts, repeats, progress and output files.

Theory of operation: a benchmark measures each point ``repeat`` times and keeps
the median with its min, max and spread (max - min over the median, in
percent).  It reports progress on stderr with a one-line bar, then
``write_outputs`` writes the JSON document (machine, versions, command, points),
a Markdown file next to it (same stem, ``.md``) and a PNG plot (``.png``).
Figures are never hard-coded anywhere else: the README shows what a run wrote.

Every numeric option goes through :func:`int_range` or :func:`float_range`, so a
bad value is an argparse error (usage, one line, exit 2), never an assertion;
``--json`` goes through :func:`json_path`, which refuses an empty name, a
directory or a directory that does not exist (none is created).  Without
``--json`` a full run writes the committed ``bench/results/`` of this package
(what the README shows) and a ``--quick`` smoke run a new scratch directory,
see :func:`default_output`.

Before measuring anything, a command calls :func:`check_outputs` on the three
paths (.json, .md, .png): none may be a directory, their directory must exist,
a ``--quick`` run may not write anywhere that resolves into the committed
results, and no run replaces a .json holding another benchmark's document.
A refusal is an :class:`OutputError`, reported as a usage error (exit 2) with
nothing written; :func:`write_outputs` checks again just before writing.
The three files are rendered to temporary names first and renamed with SIGINT
and SIGTERM held back, so an interrupted run leaves the previous set or the
new one, never a mix; :func:`interruptible` turns Ctrl-C into one line and
exit status 130, also when it comes after the files were written (``final``).
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
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "INTERRUPTED_STATUS",
    "RESULTS_DIR",
    "USAGE_STATUS",
    "OutputError",
    "Progress",
    "check_outputs",
    "default_output",
    "float_range",
    "int_range",
    "interruptible",
    "json_path",
    "machine_info",
    "output_set",
    "summarize",
    "usage_error",
    "write_outputs",
]

# what a shell reports for a command ended by SIGINT (128 + 2)
INTERRUPTED_STATUS = 130
# what argparse exits with for a usage error
USAGE_STATUS = 2

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
    if not text:
        raise argparse.ArgumentTypeError("'' is empty, not a .json file name")
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a directory, not a .json file")
    if text.endswith("/"):
        # Path() drops the slash: say why the name cannot be a file
        raise argparse.ArgumentTypeError(
            f"{text!r} ends in '/', not a .json file name"
        )
    if path.suffix != ".json":
        # the Markdown and the plot take the same stem, .md and .png
        raise argparse.ArgumentTypeError(f"{text!r} does not end in .json")
    if not path.parent.is_dir():
        parent = str(path.parent)
        raise argparse.ArgumentTypeError(f"no directory {parent!r} for {text!r}")
    return path


class OutputError(ValueError):
    """An output path a run must not write: a usage error, nothing written."""


def output_set(json_file: Path) -> list[Path]:
    """Return the three files a run writes: the .json, the .md and the .png."""
    json_file = Path(json_file)
    return [json_file, json_file.with_suffix(".md"), json_file.with_suffix(".png")]


def _inside(path: Path, directory: Path) -> bool:
    real = Path(os.path.realpath(path))
    return real.is_relative_to(Path(os.path.realpath(directory)))


def _benchmark_of(path: Path) -> str | None:
    """Return the "benchmark" field of an existing non-empty .json, "" if none."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise OutputError(f"cannot read {str(path)!r}: {exc}") from None
    if not text.strip():
        return None
    try:
        doc = json.loads(text)
    except ValueError:
        return ""
    if not isinstance(doc, dict) or not isinstance(doc.get("benchmark"), str):
        return ""
    return str(doc["benchmark"])


def check_outputs(
    json_file: Path, benchmark: str | None, *, quick: bool = False
) -> None:
    """Refuse (OutputError) output paths a run must not write.

    Each of the three files must be a regular file or missing, in a directory
    that exists; a quick run never writes into the committed results (after
    resolving symlinks and ``..``), and the .json may only be replaced by a
    document of the same ``benchmark``.
    """
    for path in output_set(json_file):
        name = str(path)
        if not path.parent.is_dir():
            raise OutputError(f"no directory {str(path.parent)!r} for {name!r}")
        if path.is_dir():
            raise OutputError(f"{name!r} is a directory, not a file")
        if path.exists() and not path.is_file():
            raise OutputError(f"{name!r} exists and is not a regular file")
        if quick and _inside(path, RESULTS_DIR):
            raise OutputError(
                f"--quick does not write {name!r}: it is in the committed "
                f"results {str(RESULTS_DIR)!r} (full runs only)"
            )
    if benchmark is None:
        return
    held = _benchmark_of(Path(json_file))
    if held is None or held == benchmark:
        return
    what = f"the {held!r} benchmark's results" if held else "no benchmark results"
    raise OutputError(
        f"{str(json_file)!r} holds {what}; not replacing it with {benchmark!r}"
    )


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


# the files the last write_outputs put in place (what interruptible reports)
_written: list[Path] = []


def write_outputs(
    json_path: Path,
    doc: dict[str, Any],
    markdown: str,
    plot: Callable[[Path], None],
    *,
    quick: bool = False,
) -> list[Path]:
    """Write the JSON document, the Markdown next to it and the PNG plot.

    All three or none: the paths are checked first (:func:`check_outputs`,
    OutputError), then each is written to a temporary file in the same
    directory and the three are renamed into place together at the end.
    The directory must exist; none is created.
    """
    finals = output_set(json_path)
    check_outputs(finals[0], doc.get("benchmark"), quick=quick)
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
            for temp in temps:
                temp.chmod(0o644)
            for temp, final in zip(temps, finals, strict=True):
                os.replace(temp, final)
            _written[:] = finals
    finally:
        for temp in temps:
            temp.unlink(missing_ok=True)
    return finals


def usage_error(prog: str, exc: OutputError) -> int:
    """Print an output refusal as argparse would; return USAGE_STATUS."""
    sys.stderr.write(f"{prog}: error: {exc}\n")
    sys.stderr.flush()
    return USAGE_STATUS


def _interrupted(prog: str) -> int:
    # the progress bar may still own the line on a terminal
    end = "\n" if sys.stderr.isatty() else ""
    if _written:
        said = f"interrupted; already wrote {', '.join(str(p) for p in _written)}"
    else:
        said = "interrupted, no results written"
    sys.stderr.write(f"{end}{prog}: {said}\n")
    sys.stderr.flush()
    return INTERRUPTED_STATUS


def interruptible(prog: str, run: Callable[[], int], *, final: bool = False) -> int:
    """Return run()'s status; a Ctrl-C becomes one line and INTERRUPTED_STATUS.

    With ``final`` (the command's last step before the process exits), a
    Ctrl-C after run() returned also ends the process with that status
    instead of a signal death: SIGINT then raises SystemExit.
    """
    _written.clear()
    try:
        status = run()
    except KeyboardInterrupt:
        return _interrupted(prog)
    if final and threading.current_thread() is threading.main_thread():

        def late(signum: int, frame: object) -> None:
            raise SystemExit(_interrupted(prog))

        signal.signal(signal.SIGINT, late)
    return status


def fmt(value: float | None, digits: int = 1) -> str:
    """Format a figure for a table cell; None becomes a dash."""
    if value is None:
        return "-"
    return f"{value:.{digits}f}"
