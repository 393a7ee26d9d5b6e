"""A rekey's new outbound SA waits until the old pair goes (make before break).

The client installs its new inbound SA only when our CREATE_CHILD_SA answer
reaches it; sending on the new SA before then loses packets.
"""

from __future__ import annotations

from typing import Any

from control.daemon import Headend, Session
from fastpath import SAParams

OLD = (0xC000_0001, 0x0A00_0001)
NEW = (0xC000_0002, 0x0A00_0002)
LOCAL, REMOTE = ["198.19.1.0/24"], ["198.18.128.10/32"]


def _params(spi: int, inbound: bool) -> SAParams:
    return SAParams(spi=spi, inbound=inbound, key=bytes(16), salt=bytes(4),
                    session=1, peer=("198.18.1.2", 4500))  # fmt: skip


class FakeEngine:
    def __init__(self) -> None:
        self.installed: list[tuple[int, bool]] = []
        self.removed: list[tuple[int, bool]] = []

    def install_sa(self, params: SAParams, **_: Any) -> None:
        self.installed.append((params.spi, params.inbound))

    def remove_sa(self, spi: int, inbound: bool) -> None:
        self.removed.append((spi, inbound))


class FakeLoop:
    def __init__(self) -> None:
        self.later: list[tuple[float, Any, tuple[Any, ...]]] = []

    def call_later(self, delay: float, func: Any, *args: Any) -> None:
        self.later.append((delay, func, args))


def _daemon() -> tuple[Headend, FakeEngine, FakeLoop, Session]:
    daemon = object.__new__(Headend)
    engine, loop = FakeEngine(), FakeLoop()
    daemon.engine = engine  # type: ignore[assignment]
    daemon._loop = loop  # type: ignore[assignment]
    session = Session("s1", 1, "client", ("198.18.1.2", 4500))
    session.children.append(OLD)
    session.child_state[OLD[0]] = {"local_ts": LOCAL, "remote_ts": REMOTE}
    daemon.sessions = {"s1": session}
    return daemon, engine, loop, session


class Event:
    local_ts, remote_ts = LOCAL, REMOTE


def test_rekeyed_finds_pair_with_same_selectors() -> None:
    _, _, _, session = _daemon()
    from control.daemon import _rekeyed

    assert _rekeyed(session, Event()) == OLD[0]
    other = Event()
    other.remote_ts = ["198.18.128.10/32[6/0-65535]"]  # type: ignore[misc]
    assert _rekeyed(session, other) is None


def test_new_outbound_installed_only_when_old_pair_goes() -> None:
    daemon, engine, loop, session = _daemon()
    session.deferred_out[OLD[0]] = _params(NEW[1], False)
    session.children.append(NEW)
    assert (NEW[1], False) not in engine.installed
    daemon._child_down("s1", *OLD)
    # the successor's outbound SA goes in before the old one comes out
    assert engine.installed == [(NEW[1], False)]
    assert engine.removed == [(OLD[0], True), (OLD[1], False)]
    assert session.deferred_out == {}


def test_held_outbound_released_by_timer_without_delete() -> None:
    daemon, engine, loop, session = _daemon()
    session.deferred_out[OLD[0]] = _params(NEW[1], False)
    daemon._release_out("s1", OLD[0])
    daemon._release_out("s1", OLD[0])  # the timer after the delete: no-op
    assert engine.installed == [(NEW[1], False)]


def test_new_pair_deleted_while_held_removes_no_outbound() -> None:
    daemon, engine, loop, session = _daemon()
    session.deferred_out[OLD[0]] = _params(NEW[1], False)
    session.children.append(NEW)
    session.child_state[NEW[0]] = {"local_ts": LOCAL, "remote_ts": REMOTE}
    daemon._child_down("s1", *NEW)
    assert engine.removed == [(NEW[0], True)]
    assert engine.installed == []
