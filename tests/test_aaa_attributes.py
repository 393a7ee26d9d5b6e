"""RADIUS reply attributes and cisco-avpairs mapped to an Authorization."""

from __future__ import annotations

import collections
import ipaddress
import logging

import pytest

from control.aaa.attributes import parse_authorization


def test_parse_standard_attributes_and_avpairs() -> None:
    auth = parse_authorization(
        {
            "Framed-IP-Address": ["198.18.128.77"],
            "Framed-IP-Netmask": ["255.255.255.0"],
            "Cisco-AVPair": [
                "ipsec:dns-servers=198.19.1.99 198.19.1.98",
                "ipsec:route-set=prefix 198.19.1.0/24",
                "ipsec:route-set=prefix 2001:db8::/64",
                "ipsec:split-dns=corp.example",
                "ipsec:split-dns=lab.example",
                "ipsec:addr-pool=staff",
                "ipsec:ipsec-flow-limit=50000",
                "ipsec:include-local-lan=1",
                "ip:interface-config=ip mtu 1300",
            ],
        }
    )
    assert auth.framed_ip_address == ipaddress.IPv4Address("198.18.128.77")
    assert [str(a) for a in auth.dns_servers] == ["198.19.1.99", "198.19.1.98"]
    assert auth.split_dns == ["corp.example", "lab.example"]
    assert auth.ipsec_flow_limit == 50000 and auth.include_local_lan is True
    assert auth.interface_config == ["ip mtu 1300"]
    policy = auth.policy()
    assert policy.address == ipaddress.IPv4Address("198.18.128.77")
    assert policy.netmask == ipaddress.IPv4Address("255.255.255.0")
    assert policy.local_ts == ["198.19.1.0/24", "2001:db8::/64"]
    assert policy.pool == "staff"
    assert auth.unknown == 0 and auth.malformed == 0


@pytest.mark.parametrize(
    "pair",
    [
        "ipsec:ipsec-flow-limit=50001",
        "ipsec:dns-servers=198.19.1.999",
        "ipsec:pfs=maybe",
        "ipsec:route-set=prefix not-a-net",
        "ipsec:route-set=bogus 1",
        "ipsec:banner",
    ],
)
def test_parse_malformed_avpair_is_counted_and_dropped(pair: str) -> None:
    stats: collections.Counter[str] = collections.Counter()
    auth = parse_authorization({"Cisco-AVPair": [pair]}, stats)
    assert auth.malformed == 1 and stats["avpair_malformed"] == 1
    assert auth.is_empty()


def test_parse_unknown_avpair_is_counted_and_ignored() -> None:
    auth = parse_authorization(
        {"Cisco-AVPair": ["ipsec:frobnicate=1", "shell:priv-lvl=15"]}
    )
    assert auth.unknown == 2 and auth.malformed == 0 and auth.is_empty()


def test_parse_split_dns_beyond_ten_is_malformed() -> None:
    pairs = [f"ipsec:split-dns=d{i}.example" for i in range(11)]
    auth = parse_authorization({"Cisco-AVPair": pairs})
    assert len(auth.split_dns) == 10 and auth.malformed == 1


def test_parse_malformed_password_pair_logs_no_value(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "espgate.aaa")
    # a lone surrogate cannot be encoded: the pair is malformed
    auth = parse_authorization(
        {"Cisco-AVPair": ["ipsec:ikev2-password-local=\udcffpw"]}
    )
    assert auth.malformed == 1 and auth.ikev2_password_local is None
    assert (
        "ikev2-password-local" in caplog.text
        and "pw" not in caplog.text.split("ikev2-password-local")[1]
    )


def test_parse_password_pair_kept_out_of_repr() -> None:
    auth = parse_authorization({"Cisco-AVPair": ["ipsec:ikev2-password-remote=s3cret"]})
    assert auth.ikev2_password_remote == b"s3cret" and "s3cret" not in repr(auth)
