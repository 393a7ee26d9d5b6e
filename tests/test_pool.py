"""Local IPv4 pool: allocation order, exhaustion, release."""

from __future__ import annotations

import ipaddress

from control.config import PoolConfig
from control.pool import AddressPool


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
    from control.pool import LeaseStore

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
    got = [pool.allocate(f"s{i}") for i in range(5)]
    # a /126 handing out /128s serves 4 clients
    assert got[:4] == [ipaddress.IPv6Address(f"2001:db8:1::{i}") for i in range(4)]
    assert got[4] is None and pool.size == 4


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
