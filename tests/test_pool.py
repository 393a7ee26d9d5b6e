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
