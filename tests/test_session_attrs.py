"""Per-session interface settings: the interface MTU from authorization to the TUN."""

from __future__ import annotations

import collections
import ipaddress
import logging
from pathlib import Path
from typing import Any

import pytest

import control.daemon as daemon_mod
from control.aaa.attributes import (
    MTU_MAX,
    MTU_MIN_IPV4,
    MTU_MIN_IPV6,
    parse_authorization,
    session_mtu,
)
from control.config import parse
from control.daemon import Headend
from control.ike.events import ChildSAUp
from control.ike.profiles import SessionPolicy
from control.ike.sa import IkeState

CONFIG = """\
[server]
listen = "127.0.0.1"
state_dir = "{state}"

[engine]
tun_mtu = 1400

[policies.staff]
interface_mtu = {mtu}

[[profiles]]
name = "p"
local_identity = "fqdn:vpn.example"
psk = "a-long-enough-psk-0123"
authorization_group = "local:staff"
"""


def test_parse_interface_config_mtu_reaches_policy() -> None:
    auth = parse_authorization({"Cisco-AVPair": ["ip:interface-config=ip mtu 1380"]})
    assert auth.policy().mtu == 1380 and auth.malformed == 0 and auth.ignored == 0


@pytest.mark.parametrize("mtu", [100, MTU_MIN_IPV4 - 1, MTU_MAX + 1])
def test_parse_interface_config_mtu_out_of_range_rejected(mtu: int) -> None:
    stats: collections.Counter[str] = collections.Counter()
    pair = f"ip:interface-config=ip mtu {mtu}"
    auth = parse_authorization({"Cisco-AVPair": [pair]}, stats)
    assert auth.policy().mtu is None and stats["avpair_malformed"] == 1


def test_parse_interface_config_other_lines_counted_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stats: collections.Counter[str] = collections.Counter()
    pairs = {"Cisco-AVPair": ["ip:interface-config=ip tcp adjust-mss 1301",
                              "ip:interface-config=ip mtu 1390"]}  # fmt: skip
    with caplog.at_level(logging.INFO, logger="espgate.aaa"):
        for _ in range(3):
            auth = parse_authorization(pairs, stats)
    assert auth.policy().mtu == 1390
    assert stats["interface_config_ignored"] == 3
    logged = [r for r in caplog.records if "adjust-mss 1301" in r.getMessage()]
    assert len(logged) == 1


def test_local_policy_interface_mtu_reaches_policy(tmp_path: Path) -> None:
    config = parse(CONFIG.format(state=tmp_path, mtu=1380), "t.toml")
    assert config.policies["staff"].policy().mtu == 1380


@pytest.mark.parametrize(
    ("requested", "ipv6", "wanted"),
    [
        (None, False, 1400),
        (1380, False, 1380),
        (MTU_MIN_IPV4, False, MTU_MIN_IPV4),
        (MTU_MIN_IPV4, True, 1400),  # RFC 8200 5: too small for IPv6
        (MTU_MIN_IPV6, True, MTU_MIN_IPV6),
        (MTU_MAX, True, MTU_MAX),
        (MTU_MAX + 1, False, 1400),
    ],
)
def test_session_mtu_bounds(requested: int | None, ipv6: bool, wanted: int) -> None:
    assert session_mtu(requested, 1400, ipv6) == wanted


# -- the daemon: the policy's MTU on the session's TUN ----------------------


class FakeSA:
    def __init__(self, mtu: int | None) -> None:
        self.policy = SessionPolicy(mtu=mtu)
        self.state = IkeState.ESTABLISHED
        self.superseded = False
        self.session_id, self.identity = "s1", "alice@example.net"
        self.remote = ("198.18.0.2", 4500)
        self.profile = None


class FakeResponder:
    def __init__(self, mtu: int | None) -> None:
        self.sa = FakeSA(mtu)

    def session_sa(self, session_id: str) -> FakeSA | None:
        return self.sa

    def established(self) -> list[Any]:
        return [self.sa]


class FakeEngine:
    def __init__(self) -> None:
        self.sessions: dict[int, int] = {}
        # (params, replay, resume) of every install
        self.installed: list[tuple[Any, Any, bool]] = []

    def add_session(self, index: int, fd: int) -> None:
        self.sessions[index] = fd

    def install_sa(self, sa: Any, replay: Any = None, *, resume: bool = False) -> None:
        self.installed.append((sa, replay, resume))

    def inbound_top(self, spi: int) -> int:
        return 41


class FakeStore:
    def __init__(self) -> None:
        self.records: dict[str, bytes] = {}

    def put_record(self, kind: str, name: str, version: int, body: bytes) -> None:
        self.records[name] = body

    def delete_record(self, kind: str, name: str) -> None:
        self.records.pop(name, None)


@pytest.fixture
def tuns(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Record open_tun calls instead of making devices."""
    opened: list[tuple[str, int]] = []

    def open_tun(name: str, mtu: int = 1400) -> tuple[int, str]:
        opened.append((name, mtu))
        return -1, name

    import fastpath

    monkeypatch.setattr(fastpath, "open_tun", open_tun)
    monkeypatch.setattr(
        daemon_mod, "add_route", lambda dev, prefix, metric=None: ROUTES.append(
            (dev, prefix, metric)
        )
    )
    ROUTES.clear()
    return opened


# (device, prefix, metric) of every route the daemon added, through the fake
ROUTES: list[tuple[str, str, int | None]] = []


def headend(tmp_path: Path, policy_mtu: int | None) -> Headend:
    config = parse(CONFIG.format(state=tmp_path, mtu=1380), "t.toml")
    h = Headend(config)
    h.responder = FakeResponder(policy_mtu)
    h.engine = FakeEngine()
    return h


def child_up(
    six: str | None = None, mtu: int | None = None, spi: int = 0x1001
) -> ChildSAUp:
    return ChildSAUp(
        session_id="s1",
        identity="alice@example.net",
        remote=("198.18.0.2", 4500),
        inside_address=ipaddress.IPv4Address("198.18.128.200"),
        spi_in=spi,
        spi_out=spi + 0x1000,
        key_in=bytes(16),
        salt_in=bytes(4),
        key_out=bytes(16),
        salt_out=bytes(4),
        esn=False,
        local_ts=[f"198.19.{spi % 256}.0/24"],
        remote_ts=["198.18.128.200/32"],
        udp_encap=True,
        inside_address6=ipaddress.IPv6Interface(six) if six else None,
        mtu=mtu,
    )


def test_child_up_opens_tun_with_policy_mtu(tmp_path: Path, tuns: list[Any]) -> None:
    h = headend(tmp_path, 1380)
    h._apply(child_up())
    assert tuns == [("egs1", 1380)]
    assert h.sessions["s1"].mtu == 1380


def test_child_up_without_policy_mtu_uses_engine_default(
    tmp_path: Path, tuns: list[Any]
) -> None:
    h = headend(tmp_path, None)
    h._apply(child_up())
    assert tuns == [("egs1", 1400)] and h.sessions["s1"].mtu == 1400


def test_child_up_event_mtu_beats_policy(tmp_path: Path, tuns: list[Any]) -> None:
    h = headend(tmp_path, 1380)
    h._apply(child_up(mtu=1300))
    assert tuns == [("egs1", 1300)]


def test_child_up_ipv6_session_below_1280_uses_default(
    tmp_path: Path, tuns: list[Any]
) -> None:
    h = headend(tmp_path, 1200)
    h._apply(child_up(six="2001:db8:1::/128"))
    assert tuns == [("egs1", 1400)]


def test_child_up_second_child_keeps_tun(tmp_path: Path, tuns: list[Any]) -> None:
    h = headend(tmp_path, 1380)
    h._apply(child_up())
    h.responder.sa.policy = SessionPolicy(mtu=1500)
    h._apply(child_up(spi=0x1002))
    assert tuns == [("egs1", 1380)] and len(h.sessions["s1"].children) == 2


def test_persisted_session_resumes_with_its_mtu(
    tmp_path: Path, tuns: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    import control.ike.persist as persist

    h = headend(tmp_path, 1380)
    h._apply(child_up())
    h._store = FakeStore()
    monkeypatch.setattr(persist, "export_ike", lambda ike: {})
    h._persist()
    (body,) = h._store.records.values()
    record = persist.loads(body)
    assert record["daemon"]["mtu"] == 1380

    # a new daemon whose policy no longer says so: the stored MTU wins
    again = headend(tmp_path, None)
    again._rebuild(again.responder.sa, record["daemon"])
    assert tuns[-1] == ("egs1", 1380) and again.sessions["s1"].mtu == 1380


def test_persisted_session_resumes_with_its_accepted_routes(
    tmp_path: Path, tuns: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    import control.ike.persist as persist

    h = headend(tmp_path, None)
    h._apply(child_up())
    session = h.sessions["s1"]
    session.accepted_routes = ["10.77.0.0/16"]
    session.route_tag, session.route_metric = 7, 20
    h._store = FakeStore()
    monkeypatch.setattr(persist, "export_ike", lambda ike: {})
    h._persist()
    (body,) = h._store.records.values()
    record = persist.loads(body)

    ROUTES.clear()
    again = headend(tmp_path, None)
    again._rebuild(again.responder.sa, record["daemon"])
    assert ("egs1", "10.77.0.0/16", 20) in ROUTES
    resumed = again.sessions["s1"]
    assert resumed.accepted_routes == ["10.77.0.0/16"]
    assert (resumed.route_tag, resumed.route_metric) == (7, 20)


def test_resumed_inbound_sa_counts_everything_to_the_stored_mark_as_seen(
    tmp_path: Path, tuns: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    import control.ike.persist as persist

    h = headend(tmp_path, None)
    h._apply(child_up())
    h._store = FakeStore()
    monkeypatch.setattr(persist, "export_ike", lambda ike: {})
    h._persist()
    (body,) = h._store.records.values()
    again = headend(tmp_path, None)
    again._rebuild(again.responder.sa, persist.loads(body)["daemon"])
    (inbound,) = [i for i in again.engine.installed if i[0].inbound]
    params, replay, _ = inbound
    # RFC 4303 3.4.3: no number up to the mark (41) may be accepted again
    window = again.config.engine.replay_window
    assert params.next_seq == 42 and replay == (41, (1 << window) - 1)


def test_parse_session_timeout_sets_session_lifetime() -> None:
    auth = parse_authorization({"Session-Timeout": [3600]})
    assert auth.policy().session_lifetime == 3600 and auth.malformed == 0


@pytest.mark.parametrize("value", [0, 119, 25_920_001, "soon"])
def test_parse_session_timeout_out_of_range_ignored(value: Any) -> None:
    # 0 would end the session the moment it is up
    auth = parse_authorization({"Session-Timeout": [value]})
    assert auth.policy().session_lifetime is None and auth.malformed == 1
