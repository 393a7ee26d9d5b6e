"""Authorization merge: cached, user and group sources by documented precedence."""

from __future__ import annotations

import asyncio
import ipaddress
from typing import Any

import pytest

from control.aaa.authorize import Authorizer
from control.config import parse
from control.ike.eap import AaaRequest

CONFIG = """\
[radius.lab]
user_password = "espgate"
[[radius.lab.servers]]
address = "127.0.0.1"
secret = "radius-test-secret-0123"

[policies.staff]
dns_servers = ["198.19.1.10"]
wins_servers = ["198.19.1.11"]
banner = "group banner"

[policies.alice]
dns_servers = ["198.19.1.20"]

[[profiles]]
name = "p"
local_identity = "fqdn:vpn.example"
psk = "a-long-enough-psk-0123"
{extra}
"""


class FakeRadius:
    """Stands in for a RadiusClient: fixed answers per looked-up name."""

    def __init__(self, answers: dict[str, dict[str, list[Any]]]) -> None:
        self.answers = answers
        self.asked: list[str] = []
        self.stats: Any = None

    async def lookup(self, name: str, calling: str) -> tuple[str, dict[str, Any]]:
        self.asked.append(name)
        if name not in self.answers:
            return "reject", {}
        return "accept", self.answers[name]


def authorize(
    extra: str, cached: dict[str, Any] | None = None, radius: FakeRadius | None = None
) -> tuple[Any, FakeRadius]:
    config = parse(CONFIG.format(extra=extra), "t.toml")
    fake = radius or FakeRadius({})
    authorizer = Authorizer(config, {"lab": fake})  # type: ignore[dict-item]
    info = {"ike_identity": "alice@example.net", "cached": cached or {}}
    request = AaaRequest("s", "authorize", "p", "alice", "198.18.0.2", b"", info)
    return asyncio.run(authorizer.authorize(request)), fake


CACHED = {"Cisco-AVPair": ["ipsec:dns-servers=198.19.1.30"]}


def test_authorize_user_beats_cached_beats_group() -> None:
    result, _ = authorize(
        'authorization_user = "local"\nauthorization_group = "local:staff"', CACHED
    )
    policy = result.policy
    assert result.outcome == "accept"
    assert policy.dns == ["198.19.1.20"]  # the user's policy
    assert policy.wins == ["198.19.1.11"]  # only the group has WINS


def test_authorize_cached_beats_group_without_user() -> None:
    result, _ = authorize('authorization_group = "local:staff"', CACHED)
    assert result.policy.dns == ["198.19.1.30"]


def test_authorize_group_override_beats_user_and_cached() -> None:
    result, _ = authorize(
        'authorization_user = "local"\nauthorization_group = "local:staff"\n'
        "authorization_group_override = true",
        CACHED,
    )
    assert result.policy.dns == ["198.19.1.10"]


def test_authorize_cached_framed_ip_skips_user_authorization() -> None:
    fake = FakeRadius({"alice": {"Framed-IP-Address": ["198.18.128.9"]}})
    cached = {"Framed-IP-Address": ["198.18.128.71"]}
    result, fake = authorize('authorization_user = "radius:lab"', cached, fake)
    assert fake.asked == []
    assert result.policy.address == ipaddress.IPv4Address("198.18.128.71")


def test_authorize_user_from_radius_with_mangled_name() -> None:
    fake = FakeRadius({"alice": {"Framed-IP-Address": ["198.18.128.9"]}})
    result, fake = authorize(
        'authorization_user = "radius:lab"\nname_mangler = "email:username"',
        {},
        fake,
    )
    assert fake.asked == ["alice"]
    assert result.policy.address == ipaddress.IPv4Address("198.18.128.9")


def test_authorize_group_reject_refuses_session() -> None:
    result, fake = authorize(
        'authorization_group = "radius:lab"\nauthorization_group_name = "eng"'
    )
    assert fake.asked == ["eng"] and result.outcome == "reject"


def test_authorize_cached_ignored_when_disabled() -> None:
    result, _ = authorize(
        'authorization_group = "local:staff"\nauthorization_cached = false', CACHED
    )
    assert result.policy.dns == ["198.19.1.10"]


@pytest.mark.parametrize(
    "extra,field",
    [
        ('authorization_group = "local:nope"', "authorization_group"),
        ('authorization_group = "radius:lab"', "authorization_group_name"),
        ('authorization_user = "ldap"', "authorization_user"),
        ('name_mangler = "dn:serial"', "name_mangler"),
    ],
)
def test_parse_authorization_errors_are_located(extra: str, field: str) -> None:
    from control.config import ConfigError

    with pytest.raises(ConfigError) as info:
        parse(CONFIG.format(extra=extra), "t.toml")
    assert info.value.fieldname == f"profiles[0].{field}"


@pytest.mark.parametrize(
    "line,problem",
    [
        ("ipsec_flow_limit = 50001", "out of range"),
        ('route_accept = "any tag 497778"', "out of range"),
        ('route_accept = "any distance 0"', "out of range"),
        ("session_lifetime = 60", "out of range"),
        ("interface_mtu = 100", "out of range"),
        (
            'ipv6_dns_servers = ["2001:db8::1", "2001:db8::2", "2001:db8::3"]',
            "at most 2",
        ),
        ("dhcp_timeout = 0", "out of range"),
        ("frobnicate = 1", "unknown field"),
    ],
)
def test_parse_policy_out_of_range_is_config_error(line: str, problem: str) -> None:
    from control.config import ConfigError

    text = CONFIG.format(extra="").replace('banner = "group banner"', line)
    with pytest.raises(ConfigError) as info:
        parse(text, "t.toml")
    assert info.value.fieldname.startswith("policies.staff")
    assert problem in info.value.problem and info.value.line is not None
