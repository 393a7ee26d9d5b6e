"""Engine-wide counters carry their totals across a dataplane restart.

The third new-user report, item 9: after a ``kill -9`` of the dataplane,
``engine.udp_rx`` and ``rx_esp`` started again from zero while the per-SA
counters carried.  A proxy on a loopback UDP socket receives junk datagrams
(each counted in ``udp_rx``); the child is then reloaded or killed, and the
proxy's totals must still include them although nobody asked for the
counters before the restart.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

DATAGRAMS = 20


def _until(what: Callable[[], bool], limit: float = 20.0) -> bool:
    # a wait with a generous limit, not a timing assertion
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if what():
            return True
        time.sleep(0.01)
    return False


@pytest.fixture
def proxy() -> Iterator[tuple[Any, socket.socket]]:
    from control.dataplane import DataplaneProxy

    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.setblocking(False)
    dataplane = DataplaneProxy(udp.fileno(), crypto="openssl", batch=16)
    dataplane.start(lambda data, addr: None)
    yield dataplane, udp
    dataplane.stop()
    udp.close()


def _send_junk(udp: socket.socket, proxy: Any) -> int:
    # udp_rx as the running child counts it, read past the proxy's totals
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as out:
        for _ in range(DATAGRAMS):
            out.sendto(b"\x01\x02\x03\x04junk", udp.getsockname())
    assert _until(lambda: int(proxy._call("counters")["udp_rx"]) >= DATAGRAMS)
    return int(proxy._call("counters")["udp_rx"])


def test_reload_engine_counters_carry_totals(proxy) -> None:
    dataplane, udp = proxy
    seen = _send_junk(udp, dataplane)
    dataplane.reload()
    assert dataplane.counters()["udp_rx"] >= seen
    assert dataplane.counters()["dataplane_restarts"] == 1


def test_reload_engine_counters_carry_totals_after_kill9(proxy) -> None:
    dataplane, udp = proxy
    seen = _send_junk(udp, dataplane)
    # the ticker has polled the totals at least once since the datagrams
    assert _until(lambda: dataplane._engine_last.get("udp_rx", 0) >= seen)
    pid = dataplane.dataplane_pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    assert dataplane.wait_restarted(1, 20.0)
    assert dataplane.counters()["udp_rx"] >= seen
