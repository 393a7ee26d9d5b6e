"""The daemon's CHILD SA byte lifetime: poll counters, ask for one rekey each."""

from __future__ import annotations

from typing import Any

from control.daemon import Headend, Session

SPI_IN, SPI_OUT = 0x1111_0001, 0x2222_0001


class FakeEngine:
    def __init__(self) -> None:
        self.bytes = {(SPI_IN, True): 0, (SPI_OUT, False): 0}

    def sa_counters(self, spi: int, inbound: bool) -> dict[str, Any]:
        if (spi, inbound) not in self.bytes:
            raise KeyError(spi)
        return {"packets": 1, "bytes": self.bytes[(spi, inbound)]}


class FakeResponder:
    def __init__(self, accept: bool = True) -> None:
        self.accept = accept
        self.asked: list[tuple[str, int, float]] = []

    def rekey_child_soon(self, session_id: str, spi_in: int, now: float) -> bool:
        self.asked.append((session_id, spi_in, now))
        return self.accept


def _daemon(limit: int, responder: FakeResponder) -> tuple[Headend, FakeEngine]:
    # only what _poll_child_bytes touches; no sockets, no engine process
    daemon = object.__new__(Headend)
    engine = FakeEngine()
    daemon.engine = engine  # type: ignore[assignment]
    daemon.responder = responder  # type: ignore[assignment]
    daemon.counters = {"handler_errors": 0}
    session = Session("s1", 0, "client", ("198.18.0.2", 4500), rekey_bytes=limit)
    session.children.append((SPI_IN, SPI_OUT))
    daemon.sessions = {"s1": session}
    return daemon, engine


def test_poll_child_bytes_below_limit_asks_nothing() -> None:
    responder = FakeResponder()
    daemon, engine = _daemon(1_000_000, responder)
    engine.bytes[(SPI_IN, True)] = 999_999
    daemon._poll_child_bytes(5.0)
    assert responder.asked == []


def test_poll_child_bytes_outbound_at_limit_rekeys_once() -> None:
    responder = FakeResponder()
    daemon, engine = _daemon(1_000_000, responder)
    engine.bytes[(SPI_OUT, False)] = 1_000_000
    daemon._poll_child_bytes(5.0)
    daemon._poll_child_bytes(6.0)
    assert responder.asked == [("s1", SPI_IN, 5.0)]
    assert daemon.counters["child_bytes_rekeys"] == 1


def test_poll_child_bytes_refused_rekey_retried_next_poll() -> None:
    responder = FakeResponder(accept=False)
    daemon, engine = _daemon(65_536, responder)
    engine.bytes[(SPI_IN, True)] = 70_000
    daemon._poll_child_bytes(5.0)
    responder.accept = True
    daemon._poll_child_bytes(6.0)
    assert [a[2] for a in responder.asked] == [5.0, 6.0]
    assert daemon.counters["child_bytes_rekeys"] == 1


def test_poll_child_bytes_off_when_limit_zero() -> None:
    responder = FakeResponder()
    daemon, engine = _daemon(0, responder)
    engine.bytes[(SPI_IN, True)] = 1 << 40
    daemon._poll_child_bytes(5.0)
    assert responder.asked == []
