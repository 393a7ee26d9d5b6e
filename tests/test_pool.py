"""Address pools: allocation order, exhaustion, release, leases, lookups."""

from __future__ import annotations

import ipaddress
import logging
import stat

import pytest

from control import pool as poolmod
from control.config import PoolConfig, parse
from control.pool import AddressPool, LeaseStore, find_pool

PROFILE = """
[[profiles]]
name = "p"
local_identity = "fqdn:vpn.example"
psk = "a-long-enough-psk-0123"
"""


def make(first: str, last: str) -> AddressPool:
    return AddressPool(PoolConfig("p", ipaddress.IPv4Address(first),
                                  ipaddress.IPv4Address(last)))


def test_allocate_until_exhausted_returns_none():
    pool = make("198.18.128.1", "198.18.128.3")
    got = [pool.allocate(f"s{i}") for i in range(3)]
    assert [str(a) for a in got] == ["198.18.128.1", "198.18.128.2", "198.18.128.3"]
    assert pool.allocate("s4") is None
    assert pool.in_use == 3


def test_release_makes_address_available_again():
    pool = make("198.18.128.1", "198.18.128.2")
    a = pool.allocate("s1")
    pool.allocate("s2")
    assert pool.release(a) is True
    assert pool.release(a) is False
    assert pool.allocate("s3") == a
    assert pool.holder(a) == "s3"


def test_allocate_does_not_reuse_just_released_address_first():
    pool = make("198.18.128.1", "198.18.128.4")
    a = pool.allocate("s1")
    pool.release(a)
    assert pool.allocate("s2") != a


def test_leases_survive_restart_for_the_same_identity(tmp_path):
    first, last = ipaddress.IPv4Address("198.18.128.1"), ipaddress.IPv4Address(
        "198.18.128.3"
    )
    config = PoolConfig("p", first, last)
    store = LeaseStore(tmp_path / "leases.sqlite")
    pool = AddressPool(config, store)
    pool.allocate("s1", "alice")
    bob = pool.allocate("s2", "bob")
    pool.release(pool.allocate("s3", "carol"))
    store.close()

    # a restart: bob's and alice's leases are held, carol's was released
    pool = AddressPool(config, LeaseStore(tmp_path / "leases.sqlite"))
    assert pool.in_use == 2
    assert str(pool.allocate("s9", "dave")) == "198.18.128.3"
    assert pool.allocate("s10", "bob") == bob
    # full: the lease held for alice, who did not come back, is reclaimed
    assert str(pool.allocate("s11", "erin")) == "198.18.128.1"
    assert pool.allocate("s12", "frank") is None


def test_ipv6_pool_hands_out_client_prefixes():
    from control.config import parse

    text = """\
[pools.v6]
range = "2001:db8:1::/126"

[[profiles]]
name = "p"
local_identity = "fqdn:vpn.example"
psk = "a-long-enough-psk-0123"
"""
    config = parse(text, "t.toml").pools["v6"]
    pool = AddressPool(config)
    got = [pool.allocate(f"s{i}") for i in range(4)]
    # a /126 handing out /128s serves 3 clients: ::0 is the subnet-router
    # anycast address (RFC 4291 2.6.1)
    assert got[:3] == [ipaddress.IPv6Address(f"2001:db8:1::{i}") for i in (1, 2, 3)]
    assert got[3] is None and pool.size == 3


def test_ipv6_pool_with_client_prefix_64():
    from control.config import parse

    text = """\
[pools.v6]
range = "2001:db8:1::/62"
client_prefix = 64

[[profiles]]
name = "p"
local_identity = "fqdn:vpn.example"
psk = "a-long-enough-psk-0123"
"""
    pool = AddressPool(parse(text, "t.toml").pools["v6"])
    assert pool.size == 4
    assert [str(pool.allocate(f"s{i}")) for i in range(2)] == [
        "2001:db8:1::",
        "2001:db8:1:1::",
    ]


def test_claim_resumed_address_then_refuse_other_session():
    pool = make("198.18.128.1", "198.18.128.4")
    addr = ipaddress.IPv4Address("198.18.128.3")
    assert pool.claim(addr, "s1") is True
    assert pool.holder(addr) == "s1"
    assert pool.claim(addr, "s2") is False
    assert pool.claim(ipaddress.IPv4Address("198.18.129.1"), "s1") is False
    assert all(pool.allocate(f"x{i}") != addr for i in range(3))


def test_ipv6_pool_of_128s_never_hands_out_the_zero_address():
    config = parse('[pools.v6]\nrange = "2001:db8:18:1::/127"\n' + PROFILE, "t")
    pool = AddressPool(config.pools["v6"])
    assert pool.size == 1
    assert pool.allocate("s1") == ipaddress.IPv6Address("2001:db8:18:1::1")
    assert pool.allocate("s2") is None
    # a lease of the zero address from an older run is not taken back
    assert pool.claim(ipaddress.IPv6Address("2001:db8:18:1::"), "s3") is False


def test_ipv6_pool_wraps_round_robin_past_the_zero_address():
    config = parse('[pools.v6]\nrange = "2001:db8:18:1::/126"\n' + PROFILE, "t")
    pool = AddressPool(config.pools["v6"])
    got = [pool.allocate(f"s{i}") for i in range(3)]
    pool.release(got[0])
    pool.release(got[2])
    again = [pool.allocate("s8"), pool.allocate("s9")]
    assert ipaddress.IPv6Address("2001:db8:18:1::") not in again
    assert sorted(again) == sorted([got[0], got[2]])


def _modes(directory):
    return {
        f.name: stat.S_IMODE(f.stat().st_mode)
        for f in directory.iterdir()
        if f.name.startswith("leases.sqlite")
    }


def test_lease_store_files_are_owner_only(tmp_path):
    store = LeaseStore(tmp_path / "state" / "leases.sqlite")
    store.put("p", "198.18.128.1", "s1", "alice")
    modes = _modes(tmp_path / "state")
    # WAL mode: the -wal and -shm files exist while the store is open
    assert set(modes) == {"leases.sqlite", "leases.sqlite-wal", "leases.sqlite-shm"}
    assert set(modes.values()) == {0o600}
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700
    store.close()


def test_lease_store_tightens_an_older_world_readable_file(tmp_path):
    path = tmp_path / "leases.sqlite"
    old = LeaseStore(path)
    old.put("p", "198.18.128.1", "s1", "alice")
    old.close()
    path.chmod(0o644)
    store = LeaseStore(path)
    assert set(_modes(tmp_path).values()) == {0o600}
    assert store.load("p") == [("198.18.128.1", "s1", "alice")]
    store.close()


@pytest.fixture
def no_misses(monkeypatch):
    monkeypatch.setattr(poolmod, "UNKNOWN_POOLS", poolmod.collections.Counter())
    return poolmod


def test_find_pool_returns_pool_of_matching_version(no_misses):
    pools = {"v4": make("198.18.128.1", "198.18.128.2")}
    assert find_pool(pools, "v4", 4) is pools["v4"]
    assert not no_misses.UNKNOWN_POOLS


def test_find_pool_unknown_name_warns_once_and_counts(no_misses, caplog):
    pools = {"v4": make("198.18.128.1", "198.18.128.2")}
    with caplog.at_level(logging.WARNING, logger="espgate.pool"):
        assert find_pool(pools, "nope", 4) is None
        assert find_pool(pools, "nope", 4) is None
        assert find_pool(pools, "v4", 6) is None
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2
    assert "'nope'" in warnings[0] and "not configured" in warnings[0]
    assert "'v4'" in warnings[1] and "not an IPv6 pool" in warnings[1]
    assert no_misses.UNKNOWN_POOLS == {"nope": 2, "v4": 1}


def test_find_pool_bounds_the_names_it_counts(no_misses):
    for i in range(no_misses.UNKNOWN_NAMES + 5):
        find_pool({}, f"n{i}", 4)
    assert len(no_misses.UNKNOWN_POOLS) == no_misses.UNKNOWN_NAMES + 1
    assert no_misses.UNKNOWN_POOLS[no_misses.OTHER_NAME] == 5


def test_allocate_returning_identity_gets_its_free_address_back(tmp_path):
    # the new-user report: one client reconnecting five times got .10 ... .14
    config = PoolConfig("p", ipaddress.IPv4Address("198.18.128.10"),
                        ipaddress.IPv4Address("198.18.128.250"))  # fmt: skip
    pool = AddressPool(config, LeaseStore(tmp_path / "leases.sqlite"))
    got = []
    for i in range(5):
        got.append(pool.allocate(f"s{i}", "alice@espgate.example"))
        pool.release(got[-1])
    assert [str(a) for a in got] == ["198.18.128.10"] * 5
    # and after a restart: the store kept the last holder of the free address
    assert pool.store is not None
    pool.store.close()
    pool = AddressPool(config, LeaseStore(tmp_path / "leases.sqlite"))
    assert pool.in_use == 0
    assert str(pool.allocate("s9", "alice@espgate.example")) == "198.18.128.10"


def test_allocate_returning_identity_address_taken_gets_another():
    # the twin: round-robin gave the free address to someone else meanwhile
    pool = make("198.18.128.1", "198.18.128.2")
    a = pool.allocate("s1", "alice")
    pool.release(a)
    b = pool.allocate("s2", "bob")
    assert b != a
    assert pool.allocate("s3", "carol") == a
    pool.release(b)
    # alice's address went to carol: she gets bob's, bob's memory ends
    assert pool.allocate("s4", "alice") == b
    pool.release(a)
    assert pool.allocate("s5", "bob") == a


TEN_TO_TWENTY = PoolConfig("p", ipaddress.IPv4Address("198.18.128.10"),
                           ipaddress.IPv4Address("198.18.128.20"))  # fmt: skip


def _reopen(pool: AddressPool, path) -> AddressPool:
    assert pool.store is not None
    pool.store.close()
    return AddressPool(TEN_TO_TWENTY, LeaseStore(path))


def _ip(last_octet: int) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(f"198.18.128.{last_octet}")


def test_allocate_after_sigterm_restart_new_identity_gets_never_used_address(
    tmp_path,
):
    # the third new-user report, item 3: pool .10-.20; within one run alice
    # and bob reconnect; SIGTERM ends every session (leases released) and
    # after the restart dave connects first
    path = tmp_path / "leases.sqlite"
    pool = AddressPool(TEN_TO_TWENTY, LeaseStore(path))
    alice = pool.allocate("s1", "alice")
    bob = pool.allocate("s2", "bob")
    pool.release(bob)
    assert pool.allocate("s3", "bob") == bob
    pool.release(alice)
    pool.release(bob)
    pool = _reopen(pool, path)
    assert pool.in_use == 0
    assert pool.allocate("s4", "dave") == _ip(12)
    assert pool.allocate("s5", "alice") == alice == _ip(10)
    assert pool.allocate("s6", "bob") == bob == _ip(11)


def test_allocate_after_kill9_restart_returning_identities_keep_addresses(tmp_path):
    # kill -9: nothing was released, the store still names the sessions
    path = tmp_path / "leases.sqlite"
    pool = AddressPool(TEN_TO_TWENTY, LeaseStore(path))
    alice = pool.allocate("s1", "alice")
    bob = pool.allocate("s2", "bob")
    pool = _reopen(pool, path)
    assert pool.in_use == 2
    assert pool.allocate("s3", "dave") == _ip(12)
    assert pool.allocate("s4", "bob") == bob
    assert pool.allocate("s5", "alice") == alice


def test_allocate_after_restart_prefers_forgotten_over_remembered(tmp_path):
    # an address released without an identity is forgotten: reused before
    # any address an identity remembers
    path = tmp_path / "leases.sqlite"
    pool = AddressPool(TEN_TO_TWENTY, LeaseStore(path))
    alice = pool.allocate("s1", "alice")
    anonymous = pool.allocate("s2")
    pool.release(alice)
    pool.release(anonymous)
    pool = _reopen(pool, path)
    assert pool.allocate("s3", "dave") == anonymous == _ip(11)
    assert pool.allocate("s4", "alice") == alice


def test_allocate_remembered_only_when_nothing_else_free_oldest_release_first(
    tmp_path,
):
    path = tmp_path / "leases.sqlite"
    pool = AddressPool(TEN_TO_TWENTY, LeaseStore(path))
    names = [f"id{i}" for i in range(11)]
    got = [pool.allocate(f"s{i}", name) for i, name in enumerate(names)]
    assert got == [_ip(i) for i in range(10, 21)]
    # released in the order .15, .12, .18: remembered by id5, id2, id8
    for i in (5, 2, 8):
        pool.release(got[i])
    pool = _reopen(pool, path)
    # the others' leases are held for them; the free ones are all remembered
    assert pool.allocate("n1", "newcomer1") == _ip(15)
    assert pool.allocate("n2", "id8") == _ip(18)
    assert pool.allocate("n3", "newcomer2") == _ip(12)
    # full but for held leases: the oldest (id0's .10) is reclaimed
    assert pool.allocate("n4", "newcomer3") == _ip(10)
