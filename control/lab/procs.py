"""Background processes of the lab, stopped by the PID recorded at start.

Theory of operation: a `ProcessSet` starts each process with `subprocess.Popen`,
optionally wrapped in `ip netns exec NS`, with stdout and stderr sent to
`<logdir>/<name>.stdout.log` and `<name>.stderr.log`. `ip netns exec` execs its
command, so the recorded PID is the process itself, not a wrapper. Every start
is remembered in order; `stop_all()` walks them in reverse, sends SIGTERM to
the recorded PID only, waits, and sends SIGKILL to whatever is still alive
after the grace period. Nothing is ever signalled by name or process group.

Each process gets its own session so a Ctrl-C in the terminal reaches the
harness (which then stops the set) rather than every child at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

log = logging.getLogger("espgate.lab")

__all__ = ["ManagedProcess", "ProcessSet", "netns_argv", "wait_for"]


def netns_argv(ns: str | None, argv: Sequence[str]) -> list[str]:
    """Return `argv` prefixed so that it runs inside namespace `ns`."""
    if ns is None:
        return list(argv)
    return ["ip", "netns", "exec", ns, *argv]


@dataclass
class ManagedProcess:
    """One process started by a `ProcessSet`."""

    name: str
    ns: str | None
    popen: subprocess.Popen[bytes]
    stdout_path: Path
    stderr_path: Path

    @property
    def pid(self) -> int:
        """Return the PID recorded at start."""
        return self.popen.pid

    def alive(self) -> bool:
        """Tell whether the process has not exited yet."""
        return self.popen.poll() is None

    def stdout_text(self) -> str:
        """Return what the process wrote to stdout so far."""
        return self.stdout_path.read_text(errors="replace")

    def stderr_text(self) -> str:
        """Return what the process wrote to stderr so far."""
        return self.stderr_path.read_text(errors="replace")


class ProcessSet:
    """Start processes, remember their PIDs and stop them in reverse order."""

    def __init__(self, logdir: Path, *, term_timeout: float = 5.0) -> None:
        self.logdir = Path(logdir)
        self.term_timeout = term_timeout
        self.procs: list[ManagedProcess] = []
        self.logdir.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> ProcessSet:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_all()

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        ns: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> ManagedProcess:
        """Start `argv` (inside `ns` when given) and record its PID."""
        assert all(p.name != name for p in self.procs), f"duplicate name {name}"
        full_env = dict(os.environ)
        if env:
            full_env.update(env)
        out_path = self.logdir / f"{name}.stdout.log"
        err_path = self.logdir / f"{name}.stderr.log"
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            popen = subprocess.Popen(
                netns_argv(ns, argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=full_env,
                cwd=cwd,
                start_new_session=True,
            )
        proc = ManagedProcess(name, ns, popen, out_path, err_path)
        self.procs.append(proc)
        log.debug("started %s pid %d in %s", name, popen.pid, ns or "host")
        return proc

    def get(self, name: str) -> ManagedProcess:
        """Return the process started under `name`."""
        for proc in self.procs:
            if proc.name == name:
                return proc
        raise KeyError(name)

    def pids(self) -> list[int]:
        """Return the recorded PIDs in start order."""
        return [p.pid for p in self.procs]

    def stop(self, proc: ManagedProcess) -> int | None:
        """Stop one process: SIGTERM, wait, SIGKILL; return its exit status."""
        if proc.popen.poll() is None:
            proc.popen.send_signal(signal.SIGTERM)
            try:
                proc.popen.wait(timeout=self.term_timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s pid %d ignored SIGTERM, killing", proc.name, proc.pid)
                proc.popen.kill()
                proc.popen.wait(timeout=self.term_timeout)
        log.debug(
            "%s pid %d exited with %s", proc.name, proc.pid, proc.popen.returncode
        )
        return proc.popen.returncode

    def wait(self, proc: ManagedProcess, timeout: float) -> int:
        """Wait up to `timeout` seconds for a process to exit on its own."""
        return proc.popen.wait(timeout=timeout)

    def stop_all(self) -> None:
        """Stop every recorded process, the most recent first."""
        errors: list[BaseException] = []
        for proc in reversed(self.procs):
            try:
                self.stop(proc)
            except (OSError, subprocess.SubprocessError) as exc:
                log.error("could not stop %s pid %d: %s", proc.name, proc.pid, exc)
                errors.append(exc)
        if errors:
            raise errors[0]


def wait_for(
    predicate: Callable[[], object],
    timeout: float,
    *,
    interval: float = 0.05,
    what: str = "condition",
) -> None:
    """Poll `predicate()` until it is true or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"Timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


@contextlib.contextmanager
def interrupt_once() -> Iterator[None]:
    """Turn the first SIGINT/SIGTERM into KeyboardInterrupt, ignore the rest.

    A second Ctrl-C must not cut the clean-up the first one started short,
    or namespaces and daemons would outlive the run.
    """

    def first(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt

    saved = {s: signal.signal(s, first) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
