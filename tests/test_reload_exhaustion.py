"""Sequence-number exhaustion in the daemon: SeqExhausting rekeys the CHILD SA.

The daemon answers a :class:`control.seqstore.SeqExhausting` from the
reserver by making the CHILD SA's rekey due now; when no rekey can start it
deletes the CHILD SA (RFC 7296 1.4.1).  The engine, responder and loop are
fakes recording what the daemon asks of them.
"""

from __future__ import annotations

from typing import Any

from control.config import load
from control.daemon import Headend, Session
from control.seqstore import SeqExhausting, SeqReserver


class FakeLoop:
    def __init__(self) -> None:
        self.later: list[float] = []

    def call_later(self, delay: float, func: Any) -> None:
        self.later.append(delay)


class FakeResponder:
    def __init__(self, can_rekey: bool = True) -> None:
        self.deletes: list[tuple[str, int]] = []
        self.rekeys: list[tuple[str, int]] = []
        self.can_rekey = can_rekey

    def rekey_child_soon(self, session_id: str, spi_in: int, now: float) -> bool:
        if self.can_rekey:
            self.rekeys.append((session_id, spi_in))
        return self.can_rekey

    def delete_child_sa(self, session_id: str, spi_in: int, now: float) -> bool:
        self.deletes.append((session_id, spi_in))
        return True

    def next_event(self) -> None:
        return None

    def datagrams_to_send(self) -> list[Any]:
        return []

    def get_timer(self) -> None:
        return None


class FakeEngine:
    def __init__(self, reserver: Any) -> None:
        self.reserver = reserver


class ListStore:
    def __init__(self) -> None:
        self.ends: dict[int, int] = {}

    def reserve(self, spi: int, end: int) -> int:
        self.ends[spi] = max(end, self.ends.get(spi, 0))
        return self.ends[spi]

    def reserved(self, spi: int) -> int | None:
        return self.ends.get(spi)


def _headend(reserver: Any, can_rekey: bool = True) -> tuple[Headend, FakeResponder]:
    head = Headend(load())
    head._loop = FakeLoop()  # type: ignore[assignment]
    responder = FakeResponder(can_rekey)
    head.responder = responder
    head.engine = FakeEngine(reserver)
    session = Session("s1", 1, "alice@example.net", ("198.18.0.2", 4500))
    session.children = [(0x1111, 0x2222), (0x3333, 0x4444)]
    head.sessions["s1"] = session
    return head, responder


def test_poll_seq_events_exhausting_rekeys_child() -> None:
    reserver = SeqReserver(ListStore(), lambda spi, limit: None)  # type: ignore[arg-type]
    # RFC 4303 3.3.3: without ESN the counter must not cycle past 2^32 - 1
    reserver._events.append(SeqExhausting(0x4444, 0xF0000000, 1 << 32))
    head, responder = _headend(reserver)
    head._poll_seq_events()
    assert responder.rekeys == [("s1", 0x3333)] and responder.deletes == []
    assert head.counters["seq_exhaustion_rekeys"] == 1


def test_poll_seq_events_exhausting_no_rekey_deletes_child() -> None:
    reserver = SeqReserver(ListStore(), lambda spi, limit: None)  # type: ignore[arg-type]
    reserver._events.append(SeqExhausting(0x4444, 0xF0000000, 1 << 32))
    head, responder = _headend(reserver, can_rekey=False)
    head._poll_seq_events()
    assert responder.deletes == [("s1", 0x3333)]
    assert head.counters["seq_exhaustion_deletes"] == 1


def test_poll_seq_events_none_deletes_nothing() -> None:
    reserver = SeqReserver(ListStore(), lambda spi, limit: None)  # type: ignore[arg-type]
    head, responder = _headend(reserver)
    head._poll_seq_events()
    assert responder.deletes == []
    assert head._loop.later == [1.0]  # type: ignore[union-attr]


def test_reserver_tick_past_threshold_queues_one_event() -> None:
    reserver = SeqReserver(ListStore(), lambda spi, limit: None, rekey_at=0.5)  # type: ignore[arg-type]
    reserver.open_sa(0x4444)
    reserver.tick(0x4444, 1 << 31)
    reserver.tick(0x4444, (1 << 31) + 10)
    head, responder = _headend(reserver)
    head._poll_seq_events()
    assert responder.rekeys == [("s1", 0x3333)]
