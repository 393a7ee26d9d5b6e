"""Durable reservation of outbound ESP sequence numbers, and the state file.

Theory of operation
-------------------
An outbound SA may send a sequence number only below its *reserved end*, a
number kept in SQLite.  The engine holds ``seq_limit = end - 1`` per SA and
drops (and counts as ``seq_blocked``) whatever would go above it::

    1 ........ sent ........ next_seq ... headroom ... limit | end (on disk)

Invariant: every number the engine has sent or may still send is below the
stored end.  A raise is two ordered steps: commit the new end (WAL with
``synchronous=FULL``, so the commit returns after the write-ahead log is
fsync'ed), then raise the engine's limit.  A crash between them wastes numbers
and never reuses one; a power cut loses only writes whose commit had not
returned, and no limit was raised on those.  On resume the SA therefore starts
*at* the stored end, strictly above anything that may have left the box, and
the (key, nonce) pairs of AES-GCM (RFC 4106 section 3: the IV is the sequence
number) never repeat.

Block size follows the SA's rate: the number of packets sent in ``horizon``
seconds, measured between ticks, bounded by ``min_block`` and ``max_block``.
A tick raises the end to ``next_seq + 2 * block`` as soon as less than one
block is left, so at steady rate the engine never meets the limit if ticks
come faster than ``horizon``; the waste per restart is at most two blocks.
An SA found at its limit (it was blocked, so its measured rate is only a
lower bound) gets eight times its block at once; ``open_sa(block=...)`` lets a
rekey start the new SA with the old one's block.

Exhaustion: without ESN the last number is 2^32 - 1, with ESN a configured
soft limit; the end is never raised past it.  Once ``next_seq`` passes
``rekey_at`` of that space a :class:`SeqExhausting` event is queued once,
which the daemon turns into a CHILD rekey (or delete).  Nothing wraps.

The same file keeps opaque session records (``put_record``) for a whole-daemon
restart.  It is created 0600 in a 0700 directory and ``secure_delete`` is on,
so deleted key material is overwritten, not left in free pages.
:func:`check_state_dir` is what ``serve`` and ``check-config`` say about a
state directory that cannot hold these files.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DEFAULT_STATE_DIR",
    "StateDirError",
    "check_state_dir",
    "SEQ_MAX_32",
    "SeqExhausting",
    "SeqReserver",
    "SeqStore",
    "SnapshotStore",
    "UntrustedState",
]

log = logging.getLogger("espgate.seqstore")

DEFAULT_STATE_DIR = "/var/lib/espgate"
STATE_FILE = "state.sqlite"
SEQ_MAX_32 = 0xFFFFFFFF
SEQ_MAX_64 = 0xFFFFFFFFFFFFFFFF

_SCHEMA = """
CREATE TABLE IF NOT EXISTS seq_reserved (
    spi INTEGER PRIMARY KEY,
    reserved_end INTEGER NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS records (
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    body BLOB NOT NULL,
    PRIMARY KEY (kind, name)
);
"""


class StateDirError(ValueError):
    """The state directory cannot be used (the message names it)."""


def check_state_dir(path: str | os.PathLike[str], *, create: bool = False) -> Path:
    """Check that ``path`` is, or can become, a writable directory; return it.

    With ``create`` a missing directory is made (mode 0700); without it the
    missing part is made and removed again, so a check changes nothing.
    """
    state = Path(path)
    if state.exists() and not state.is_dir():
        raise StateDirError(f"state directory {state} is not a directory")
    if state.is_dir():
        if not os.access(state, os.W_OK | os.X_OK):
            raise StateDirError(f"state directory {state} is not writable")
        return state
    missing = []
    nearest = state
    while not nearest.exists() and not nearest.is_symlink():
        missing.append(nearest)
        nearest = nearest.parent
    try:
        for directory in reversed(missing):
            directory.mkdir(mode=0o700)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        message = f"cannot create state directory {state}: {reason}"
        raise StateDirError(message) from None
    finally:
        if not create:
            for directory in missing:
                with contextlib.suppress(OSError):
                    directory.rmdir()
    return state


class UntrustedState(Exception):
    """Stored state is missing or inconsistent: rekey or delete, never guess."""


class SeqStore:
    """Keep per-SA reserved ends and session records in one SQLite file (WAL)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # create the file 0600 before SQLite opens it (and its -wal, -shm)
        old = os.umask(0o177)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            os.close(fd)
            self._db = sqlite3.connect(
                str(self.path), isolation_level=None, check_same_thread=False
            )
            db = self._db
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA secure_delete=ON")
            db.executescript(_SCHEMA)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        self._lock = threading.Lock()
        self.commits = 0

    @classmethod
    def in_dir(cls, state_dir: str | os.PathLike[str]) -> SeqStore:
        """Open the state file under the daemon's state directory."""
        return cls(Path(state_dir) / STATE_FILE)

    def close(self) -> None:
        """Close the database; pending nothing (every write is committed)."""
        with self._lock:
            self._db.close()

    # -- reserved ends ----------------------------------------------------

    def reserve(self, spi: int, end: int) -> int:
        """Durably raise spi's reserved end to at least end; return the stored end.

        The end never goes down: a late or repeated call cannot undo a raise.
        """
        with self._lock:
            self._db.execute(
                "INSERT INTO seq_reserved (spi, reserved_end, updated) "
                "VALUES (?, ?, ?) ON CONFLICT(spi) DO UPDATE SET "
                "reserved_end = max(reserved_end, excluded.reserved_end), "
                "updated = excluded.updated",
                (spi, _to_sql(end), time.time()),
            )
            self.commits += 1
            row = self._db.execute(
                "SELECT reserved_end FROM seq_reserved WHERE spi = ?", (spi,)
            ).fetchone()
        return _from_sql(row[0])

    def reserved(self, spi: int) -> int | None:
        """Return spi's stored end, None if nothing was ever reserved."""
        with self._lock:
            row = self._db.execute(
                "SELECT reserved_end FROM seq_reserved WHERE spi = ?", (spi,)
            ).fetchone()
        return None if row is None else _from_sql(row[0])

    def marks(self) -> dict[int, int]:
        """Return every SPI's stored end."""
        with self._lock:
            rows = self._db.execute("SELECT spi, reserved_end FROM seq_reserved")
            return {spi: _from_sql(end) for spi, end in rows.fetchall()}

    def forget(self, spi: int) -> None:
        """Drop spi's mark (the SA is gone; its key is never used again)."""
        with self._lock:
            self._db.execute("DELETE FROM seq_reserved WHERE spi = ?", (spi,))

    # -- session records --------------------------------------------------

    def put_record(self, kind: str, name: str, version: int, body: bytes) -> None:
        """Store (durably) one opaque record, replacing any of the same name."""
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO records VALUES (?, ?, ?, ?)",
                (kind, name, version, body),
            )

    def records(self, kind: str) -> dict[str, tuple[int, bytes]]:
        """Return every record of kind as name -> (version, body)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT name, version, body FROM records WHERE kind = ?", (kind,)
            ).fetchall()
        return {name: (version, bytes(body)) for name, version, body in rows}

    def delete_record(self, kind: str, name: str) -> None:
        """Delete one record; secure_delete overwrites its bytes in the file."""
        with self._lock:
            self._db.execute(
                "DELETE FROM records WHERE kind = ? AND name = ?", (kind, name)
            )


def _to_sql(value: int) -> int:
    # SQLite integers are signed 64-bit; ESN ends may use the top bit
    assert 0 <= value <= SEQ_MAX_64 + 1, f"Bad sequence mark {value}"
    return min(value, SEQ_MAX_64) - (1 << 63)


def _from_sql(value: int) -> int:
    return int(value) + (1 << 63)


class SnapshotStore:
    """A SeqStore stand-in whose durable state advances only at fsync points.

    ``reserve`` writes into a volatile view, then "fsyncs": only then does the
    durable snapshot take the value and the call return.  ``cut`` simulates a
    power cut: everything not fsync'ed is lost and a fresh SeqStore at
    ``path`` holds exactly the durable snapshot.  ``before_sync`` lets a test
    cut between the write and its fsync.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.volatile: dict[int, int] = {}
        self.durable: dict[int, int] = {}
        self.before_sync: Callable[[int, int], None] | None = None
        self.commits = 0
        self._lock = threading.Lock()

    def reserve(self, spi: int, end: int) -> int:
        """Write, then fsync; return the end that is now durable."""
        with self._lock:
            value = max(end, self.volatile.get(spi, 0))
            self.volatile[spi] = value
        if self.before_sync is not None:
            self.before_sync(spi, value)
        with self._lock:
            self.durable[spi] = max(value, self.durable.get(spi, 0))
            self.commits += 1
            return self.durable[spi]

    def reserved(self, spi: int) -> int | None:
        """Return spi's end as a reader after a cut would see it."""
        with self._lock:
            return self.durable.get(spi)

    def marks(self) -> dict[int, int]:
        """Return every durable end."""
        with self._lock:
            return dict(self.durable)

    def forget(self, spi: int) -> None:
        """Drop spi's mark (durable at once, like a committed delete)."""
        with self._lock:
            self.volatile.pop(spi, None)
            self.durable.pop(spi, None)

    def cut(self) -> SeqStore:
        """Lose every unsynced write; return a real store holding the rest."""
        with self._lock:
            durable = dict(self.durable)
            self.volatile = dict(durable)
        for suffix in ("", "-wal", "-shm"):
            Path(f"{self.path}{suffix}").unlink(missing_ok=True)
        store = SeqStore(self.path)
        for spi, end in durable.items():
            store.reserve(spi, end)
        return store


@dataclass
class SeqExhausting:
    """An outbound SA is near the end of its sequence space: rekey it now."""

    spi: int
    next_seq: int
    hard_end: int


@dataclass
class _Mark:
    spi: int
    esn: bool
    end: int
    hard_end: int
    block: int
    last_seq: int
    last_time: float
    rate: float = 0.0
    warned: bool = False
    resumed_from: int | None = None


class SeqReserver:
    """Reserve outbound sequence blocks in a store before the engine uses them.

    ``set_limit(spi, limit)`` raises the engine's limit (``Engine.set_seq_limit``);
    it is only ever called after the store returned from ``reserve``.  Call
    ``tick`` (or ``tick_all``) often, with the engine's ``next_seq``; every
    method is thread-safe.
    """

    def __init__(
        self,
        store: SeqStore | SnapshotStore,
        set_limit: Callable[[int, int], None],
        *,
        horizon: float = 1.0,
        min_block: int = 1 << 16,
        max_block: int = 1 << 22,
        esn_soft_limit: int = 1 << 62,
        rekey_at: float = 0.9,
        clock: Callable[[], float] = time.monotonic,
    ):
        assert 0 < min_block <= max_block, f"Bad block bounds {min_block}/{max_block}"
        assert 0.0 < rekey_at < 1.0, f"Bad rekey_at {rekey_at}"
        self.store = store
        self.set_limit = set_limit
        self.horizon = horizon
        self.min_block = min_block
        self.max_block = max_block
        self.esn_soft_limit = esn_soft_limit
        self.rekey_at = rekey_at
        self.clock = clock
        self._marks: dict[int, _Mark] = {}
        self._events: list[SeqExhausting] = []
        self._lock = threading.RLock()
        self.counters: dict[str, int] = {
            "sa_opened": 0,
            "sa_resumed": 0,
            "blocks_reserved": 0,
            "numbers_skipped_on_resume": 0,
            "exhaustion_events": 0,
        }

    def _hard_end(self, esn: bool) -> int:
        # RFC 4303 section 3.3.3: the counter never cycles; without ESN the
        # last number is 2^32 - 1, with ESN we stop at the soft limit
        return (self.esn_soft_limit if esn else SEQ_MAX_32) + 1

    def open_sa(
        self,
        spi: int,
        *,
        esn: bool = False,
        resume: bool = False,
        block: int | None = None,
    ) -> int:
        """Reserve a first block for an outbound SA; return the next_seq to use.

        A new SA starts at 1.  ``resume`` continues at the stored end (strictly
        above anything sent) and raises :class:`UntrustedState` when there is
        none.  ``block`` starts with a larger block (a rekeyed SA's rate).
        Install the SA with ``seq_limit=reserver.limit(spi)``.
        """
        with self._lock:
            stored = self.store.reserved(spi)
            if resume:
                if stored is None:
                    raise UntrustedState(f"No reserved mark for SPI 0x{spi:08x}")
                start = stored
            else:
                start = 1 if stored is None else stored
            hard_end = self._hard_end(esn)
            if start >= hard_end:
                raise UntrustedState(f"SPI 0x{spi:08x} sequence space used up")
            now = self.clock()
            first = max(self.min_block, min(self.max_block, block or 0))
            mark = _Mark(spi, esn, start, hard_end, first, start, now)
            self._marks[spi] = mark
            self._raise(mark, start)
            if resume:
                mark.resumed_from = start
                self.counters["sa_resumed"] += 1
            else:
                self.counters["sa_opened"] += 1
            return start

    def resume_report(self, spi: int, sent_before: int | None) -> None:
        """Log the resume of spi at info and count how far ahead it jumped.

        ``sent_before`` is the last next_seq known before the restart (the
        proxy's last reading, or a whole-daemon restart's stored one); without
        it the line names the stored mark the SA resumed from.
        """
        with self._lock:
            mark = self._marks[spi]
            start, end = mark.resumed_from or 1, mark.end
        if sent_before is None:
            log.info(
                "sa %08x resumed at seq %d from the stored mark %d (last sent "
                "number unknown), reserved to %d",
                spi,
                start,
                start,
                end,
            )
            return
        ahead = max(start - sent_before, 0)
        self.counters["numbers_skipped_on_resume"] += ahead
        log.info(
            "sa %08x resumed at seq %d (%d ahead of the last known %d), reserved to %d",
            spi,
            start,
            ahead,
            sent_before,
            end,
        )

    def limit(self, spi: int) -> int:
        """Return the highest number spi may send now (the engine's seq_limit)."""
        with self._lock:
            return self._marks[spi].end - 1

    def reserved_end(self, spi: int) -> int | None:
        """Return the reserved mark of spi, None when it is not open here."""
        with self._lock:
            mark = self._marks.get(spi)
            return None if mark is None else mark.end

    def close_sa(self, spi: int) -> None:
        """Forget an SA that was deleted (its key is gone with it)."""
        with self._lock:
            self._marks.pop(spi, None)
            self.store.forget(spi)

    def detach_sa(self, spi: int) -> None:
        """Stop tracking spi but keep its mark (the dataplane goes away)."""
        with self._lock:
            self._marks.pop(spi, None)

    def tick(self, spi: int, next_seq: int) -> None:
        """Update spi's rate from the engine's next_seq and reserve if needed."""
        # the engine's limit is raised outside the lock: the proxy's restart
        # holds its own lock while it reopens SAs here (no lock-order cycle)
        limit = None
        with self._lock:
            mark = self._marks.get(spi)
            if mark is None:
                return
            now = self.clock()
            elapsed = now - mark.last_time
            if elapsed > 0:
                rate = max(next_seq - mark.last_seq, 0) / elapsed
                # follow a rise at once, a fall slowly
                mark.rate = rate if rate > mark.rate else 0.75 * mark.rate + 0.25 * rate
                mark.last_seq, mark.last_time = next_seq, now
            block = int(mark.rate * self.horizon)
            if next_seq >= mark.end:
                # at the wall the measured rate is only a lower bound: grow fast
                block = max(block, mark.block * 8)
            mark.block = max(self.min_block, min(self.max_block, block))
            if mark.end - next_seq < mark.block and mark.end < mark.hard_end:
                limit = self._raise(mark, next_seq)
            threshold = int(mark.hard_end * self.rekey_at)
            if next_seq >= threshold and not mark.warned:
                mark.warned = True
                self.counters["exhaustion_events"] += 1
                self._events.append(SeqExhausting(spi, next_seq, mark.hard_end))
                log.info("sa %08x at seq %d: rekey before exhaustion", spi, next_seq)
        if limit is not None:
            try:
                self.set_limit(spi, limit)
            except KeyError:
                # removed from the engine meanwhile; close_sa follows
                pass

    def tick_all(self, next_seq_of: Callable[[int], int | None]) -> None:
        """Tick every open SA; next_seq_of returns None for an SA gone meanwhile."""
        with self._lock:
            spis = list(self._marks)
        for spi in spis:
            value = next_seq_of(spi)
            if value is not None:
                self.tick(spi, value)

    def events(self) -> list[SeqExhausting]:
        """Return and clear the queued exhaustion events."""
        with self._lock:
            out, self._events = self._events, []
        return out

    def _raise(self, mark: _Mark, next_seq: int) -> int:
        # durable first, engine second (by the caller, with the returned
        # limit): a crash in between only wastes numbers
        want = min(next_seq + 2 * mark.block, mark.hard_end)
        stored = self.store.reserve(mark.spi, want)
        mark.end = max(mark.end, stored)
        self.counters["blocks_reserved"] += 1
        return mark.end - 1
