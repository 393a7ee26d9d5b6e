"""Server-initiated liveness checks and dead peers (control.ike.liveness)."""

from __future__ import annotations

from control.ike.events import ChildSADown, IkeSADown
from control.ike.messages import ExchangeType, pull_message
from control.ike.responder import IkeResponder
from tests.ikeclient import IkeClient
from tests.test_ike_responder import (
    CLIENT_NATT,
    SERVER_NATT,
    connect,
    events,
    exchange,
    make_responder,
)


def _live(**kwargs: object) -> tuple[IkeResponder, IkeClient]:
    r = make_responder(dpd_delay=10.0, dpd_timeout=30.0, **kwargs)
    client = IkeClient()
    connect(r, client)
    events(r)
    return r, client


def _run_timers(r: IkeResponder, until: float) -> list[float]:
    fired = []
    while (deadline := r.get_timer()) is not None and deadline <= until:
        fired.append(deadline)
        r.handle_timer(deadline)
    return fired


def test_liveness_off_by_default_sends_nothing() -> None:
    r = make_responder()
    connect(r, IkeClient())
    timer = r.get_timer()
    assert timer is not None and timer > 1000
    r.handle_timer(600.0)
    assert r.datagrams_to_send() == []


def test_liveness_check_after_silence_is_answered() -> None:
    r, client = _live()
    assert r.get_timer() == 10.0
    r.handle_timer(10.0)
    (check,) = r.datagrams_to_send()
    assert check.remote == CLIENT_NATT
    assert pull_message(check.data).header.exchange == ExchangeType.INFORMATIONAL
    payloads, answer = client.answer_request(check.data)
    assert payloads == []
    exchange(r, answer, now=10.5, local=SERVER_NATT, remote=CLIENT_NATT)
    assert r.get_timer() == 20.5
    assert events(r) == [] and r.counters["liveness_sent"] == 1


def test_liveness_check_unanswered_tears_session_down() -> None:
    r, client = _live()
    fired = _run_timers(r, 100.0)
    # the check at 10, retransmissions at 12, 16 and 24, given up at 40
    assert fired == [10.0, 12.0, 16.0, 24.0, 40.0]
    assert r.counters["retransmitted_request"] == 3
    child_down, ike_down = events(r)
    assert isinstance(child_down, ChildSADown) and isinstance(ike_down, IkeSADown)
    assert ike_down.reason == "peer dead: liveness check not answered"
    assert r.sessions() == [] and r.get_timer() is None
    assert r.pool.released  # type: ignore[attr-defined]


def test_liveness_tampered_answer_does_not_count() -> None:
    r, client = _live()
    r.handle_timer(10.0)
    (check,) = r.datagrams_to_send()
    _, answer = client.answer_request(check.data)
    tampered = answer[:-1] + bytes([answer[-1] ^ 1])
    exchange(r, tampered, now=10.5, local=SERVER_NATT, remote=CLIENT_NATT)
    assert r.counters["drop_integrity"] == 1
    _run_timers(r, 100.0)
    assert [type(e) for e in events(r)] == [ChildSADown, IkeSADown]


def test_liveness_postponed_by_peer_request() -> None:
    r, client = _live()
    exchange(r, client.informational([]), now=8.0, local=SERVER_NATT,
             remote=CLIENT_NATT)  # fmt: skip
    assert r.get_timer() == 18.0


def test_liveness_postponed_by_inbound_esp() -> None:
    packets = {"n": 0}
    r, client = _live()
    r.config.inbound_packets = lambda spi: packets["n"]
    packets["n"] = 7
    r.handle_timer(10.0)
    assert r.datagrams_to_send() == []
    assert r.get_timer() == 20.0
    # no more ESP by then: the check goes out
    r.handle_timer(20.0)
    assert len(r.datagrams_to_send()) == 1
