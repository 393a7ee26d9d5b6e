"""COOKIE challenges and half-open limits (control.ike.cookies, RFC 7296 2.6)."""

from __future__ import annotations

from control.ike.cookies import COOKIE_LENGTH, GuardConfig
from control.ike.messages import NotifyPayload, NotifyType, pull_message
from control.ike.responder import IkeResponder
from tests.ikeclient import IkeClient
from tests.test_ike_responder import CLIENT, connect, exchange, make_responder


def guarded(
    threshold: int, per_source: int = 10, lifetime: float = 120.0
) -> IkeResponder:
    r = make_responder()
    r.config.guard = GuardConfig(threshold, per_source, lifetime)
    r.guard.config = r.config.guard
    return r


def cookie_of(data: bytes) -> bytes | None:
    message = pull_message(data)
    assert message.header.spi_r == bytes(8)
    (notify,) = message.payloads
    assert isinstance(notify, NotifyPayload)
    return notify.data if notify.notify_type == NotifyType.COOKIE else None


def fill_half_open(r: IkeResponder, count: int, now: float = 0.0) -> None:
    """Leave `count` half-open SAs from distinct sources."""
    for n in range(count):
        client = IkeClient()
        address = (f"198.18.7.{n + 1}", 500)
        exchange(r, client.init_request(), now=now, remote=address)


def test_init_answered_without_cookie_below_threshold() -> None:
    r = guarded(threshold=3)
    fill_half_open(r, 2)
    assert r.counters["cookie_sent"] == 0
    connect(r, IkeClient())
    assert r.counters["cookie_sent"] == 0


def test_init_challenged_at_threshold_then_accepted_with_cookie() -> None:
    r = guarded(threshold=2)
    fill_half_open(r, 2)
    client = IkeClient()
    # HDR(A,0), SAi1, KEi, Ni --> <-- HDR(A,0), N(COOKIE)
    (reply,) = exchange(r, client.init_request())
    cookie = cookie_of(reply.data)
    assert cookie is not None and len(cookie) == COOKIE_LENGTH
    assert len(r.sessions()) == 2
    # HDR(A,0), N(COOKIE), SAi1, KEi, Ni --> <-- HDR(A,B), SAr1, KEr, Nr
    client.cookie = cookie
    result = connect(r, client)
    assert result.child is not None
    assert r.counters["cookie_sent"] == 1


def test_init_with_tampered_cookie_challenged_again() -> None:
    r = guarded(threshold=0)
    client = IkeClient()
    (reply,) = exchange(r, client.init_request())
    cookie = cookie_of(reply.data)
    assert cookie is not None
    client.cookie = cookie[:-1] + bytes([cookie[-1] ^ 1])
    (reply,) = exchange(r, client.init_request())
    assert cookie_of(reply.data) == cookie
    assert r.sessions() == []


def test_cookie_from_other_address_rejected() -> None:
    r = guarded(threshold=0)
    client = IkeClient()
    (reply,) = exchange(r, client.init_request())
    client.cookie = cookie_of(reply.data)
    # a spoofer that saw the cookie cannot use it from elsewhere
    (reply,) = exchange(r, client.init_request(), remote=("198.18.9.9", 500))
    assert cookie_of(reply.data) is not None
    assert r.sessions() == []


def test_cookie_survives_one_secret_change_not_two() -> None:
    r = guarded(threshold=0, lifetime=10.0)
    client = IkeClient()
    (reply,) = exchange(r, client.init_request(), now=0.0)
    client.cookie = cookie_of(reply.data)
    # one secret change later the previous secret still verifies
    stale = IkeClient()
    (reply,) = exchange(r, stale.init_request(), now=0.0)
    stale.cookie = cookie_of(reply.data)
    (reply,) = exchange(r, client.init_request(), now=11.0)
    assert pull_message(reply.data).header.spi_r != bytes(8)
    # after a second change it does not
    (reply,) = exchange(r, stale.init_request(), now=22.0)
    assert cookie_of(reply.data) is not None


def test_half_open_limit_per_source_drops_silently() -> None:
    r = guarded(threshold=100, per_source=2)
    for _ in range(2):
        assert exchange(r, IkeClient().init_request())
    assert exchange(r, IkeClient().init_request()) == []
    assert r.counters["drop_init_source_limit"] == 1
    # another source is not affected
    assert exchange(r, IkeClient().init_request(), remote=("198.18.9.9", 500))


def test_half_open_limit_per_source_frees_after_auth() -> None:
    r = guarded(threshold=100, per_source=1)
    connect(r, IkeClient())
    assert exchange(r, IkeClient().init_request(), remote=CLIENT)


def test_flood_keeps_half_open_bounded() -> None:
    r = guarded(threshold=20)
    # spoofed sources never return their cookie
    for n in range(500):
        spoofed = (f"198.18.{8 + n // 250}.{n % 250 + 1}", 500)
        exchange(r, IkeClient(dh_group=19).init_request(), remote=spoofed)
    assert len(r.sessions()) == 20
    assert r.counters["cookie_sent"] == 480
    client = IkeClient()
    (reply,) = exchange(r, client.init_request())
    client.cookie = cookie_of(reply.data)
    assert connect(r, client).child is not None
