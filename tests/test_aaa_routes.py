"""Route set (access list, interface) and route accept (issue 7, FlexVPN routes).

HDR, SK {IDi, AUTH, CP(CFG_REQUEST: INTERNAL_IP4_SUBNET 10.77.0.0/16), SAi2,
         TSi 0.0.0.0/0, TSr}  -->
<--  HDR, SK {IDr, AUTH, CP(CFG_REPLY), SAr2, TSi (inside, 10.77.0.0/16), TSr}
"""

from __future__ import annotations

import collections
import ipaddress
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from control import daemon as daemon_module
from control.aaa.attributes import (
    ROUTES,
    Authorization,
    configure_routes,
    parse_authorization,
)
from control.config import ConfigError, parse
from control.ike.eap import AaaRequest, AaaResult
from control.ike.messages import (
    CfgAttribute,
    CfgType,
    ConfigAttribute,
    CPPayload,
    TSiPayload,
)
from control.ike.profiles import Identity, Profile, SessionPolicy
from control.ike.responder import IkeResponder, ResponderConfig
from control.ike.tasks import accept_routes, config_attributes, pull_subnet
from control.ike.trafficsel import ts_to_string

try:
    from tests.ikeclient import IkeClient
except ImportError:  # pytest's rootdir-relative import without tests/__init__.py
    from ikeclient import IkeClient  # type: ignore[no-redef]

SERVER = ("198.18.0.1", 500)
CLIENT = ("198.18.0.2", 500)
PSK = b"correct horse battery staple"
ADDRESS = ipaddress.IPv4Address("198.18.100.10")
ADDRESS6 = ipaddress.IPv6Interface("2001:db8:100::10/128")

BASE = """\
[server]
inside_address = "198.18.60.1"
{server}
[pools.p]
range = "198.18.100.10-198.18.100.20"

[access_lists.branch]
entries = [
    "deny 10.20.30.0/24",
    "permit 10.20.0.0/16",
    "permit host 10.99.0.1",
    "permit 172.16.0.0 0.0.255.255",
    "deny 192.168.0.0/16",
    "permit 192.168.5.0/24",
]
{acl}
[policies.staff]
{policy}
[[profiles]]
name = "ra"
local_identity = "fqdn:vpn.example.net"
psk = "correct horse battery staple"
pool = "p"
"""


@pytest.fixture(autouse=True)
def clean_registry() -> Iterator[None]:
    saved = (ROUTES.access_lists, ROUTES.inside, ROUTES.exclude)
    yield
    ROUTES.access_lists, ROUTES.inside, ROUTES.exclude = saved


def config_text(policy: str = "", acl: str = "", server: str = "") -> str:
    return BASE.format(policy=policy, acl=acl, server=server)


def test_parse_access_list_first_match_wins() -> None:
    config = parse(config_text(), "t.toml")
    # 10.20.30.0/24 denied first: the /16 is pushed without it
    nets = [str(n) for n in config.access_lists["branch"]]
    assert "10.20.0.0/16" not in nets and "10.20.30.0/24" not in nets
    assert "10.20.31.0/24" in nets and "10.20.0.0/20" in nets
    covered = {a for n in config.access_lists["branch"] for a in (n[0], n[-1])}
    assert ipaddress.IPv4Address("10.20.30.5") not in covered
    assert nets[-2:] == ["10.99.0.1/32", "172.16.0.0/16"]
    # 192.168.5.0/24 comes after the deny of 192.168.0.0/16: never matches
    assert not any(n.startswith("192.168.") for n in nets)


@pytest.mark.parametrize(
    "entry,problem",
    [
        ("allow 10.0.0.0/8", "expected 'permit' or 'deny'"),
        ("permit 2001:db8::/32", "one IPv4 prefix"),
        ("permit 10.0.0.1/8", "host bits set"),
        ("permit 10.0.0.0 0.255.0.255", "bad address or wildcard"),
        ("permit", "one IPv4 prefix"),
    ],
)
def test_parse_access_list_bad_entry_located(entry: str, problem: str) -> None:
    text = config_text(acl=f'[access_lists.bad]\nentries = ["permit any", "{entry}"]\n')
    with pytest.raises(ConfigError) as info:
        parse(text, "t.toml")
    assert info.value.fieldname == "access_lists.bad.entries[1]"
    assert problem in info.value.problem
    assert info.value.line == text.splitlines().index("[access_lists.bad]") + 2


def test_parse_policy_unknown_access_list_is_error() -> None:
    text = config_text(policy='route_set_access_list = "nowhere"')
    with pytest.raises(ConfigError) as info:
        parse(text, "t.toml")
    assert info.value.fieldname == "policies.staff.route_set_access_list"
    assert "unknown access list 'nowhere'" in str(info.value)
    assert info.value.line == text.splitlines().index(
        'route_set_access_list = "nowhere"'
    ) + 1


def test_parse_route_set_interface_without_inside_address_is_error() -> None:
    text = config_text(policy="route_set_interface = true").replace(
        'inside_address = "198.18.60.1"', ""
    )
    with pytest.raises(ConfigError, match="needs \\[server\\] inside_address"):
        parse(text, "t.toml")


@pytest.mark.parametrize("value", ['"2001:db8::1"', '"vpn"'])
def test_parse_inside_address_wrong_family_is_error(value: str) -> None:
    text = config_text().replace('"198.18.60.1"', value)
    with pytest.raises(ConfigError, match="server.inside_address"):
        parse(text, "t.toml")


@pytest.mark.parametrize(
    "value", ['"tag 0"', '"distance 256"', '"tag 497778"', '"metric 5"', '"tag"']
)
def test_parse_route_accept_out_of_range_is_error(value: str) -> None:
    with pytest.raises(ConfigError, match="policies.staff.route_accept"):
        parse(config_text(policy=f"route_accept = {value}"), "t.toml")


# third new-user report, item 8: one grammar for config and RADIUS, `any`
# required, keywords in any case
ROUTE_ACCEPT_GOOD = [
    ("any", (None, 2)),
    ("ANY TAG 5", (5, 2)),
    ("Any Distance 9 tag 3", (3, 9)),
    ("  any  tag 497777  distance 255 ", (497777, 255)),
]
ROUTE_ACCEPT_BAD = [
    "tag 10",
    "distance 5",
    "any tag",
    "any tag 5 any",
    "any tag -1",
    "any tag 0x10",
    "any metric 5",
    "any tag 5 TAG 6",
    "",
]


@pytest.mark.parametrize(("value", "expected"), ROUTE_ACCEPT_GOOD)
def test_parse_route_accept_grammar_accepted_in_config_and_radius(
    value: str, expected: tuple[int | None, int]
) -> None:
    config = register(config_text(policy=f'route_accept = "{value}"'))
    assert config.policies["staff"].policy().route_accept == expected
    stats: collections.Counter[str] = collections.Counter()
    pair = f"ipsec:route-accept={value}"
    auth = parse_authorization({"Cisco-AVPair": [pair]}, stats)
    assert stats["avpair_malformed"] == 0
    assert auth.policy().route_accept == expected


@pytest.mark.parametrize("value", ROUTE_ACCEPT_BAD)
def test_parse_route_accept_grammar_refused_in_config_and_radius(value: str) -> None:
    with pytest.raises(ConfigError, match="policies.staff.route_accept"):
        parse(config_text(policy=f'route_accept = "{value}"'), "t.toml")
    register()
    stats: collections.Counter[str] = collections.Counter()
    pair = f"ipsec:route-accept={value}"
    auth = parse_authorization({"Cisco-AVPair": [pair]}, stats)
    assert stats["avpair_malformed"] == 1
    assert auth.route_accept is None


def register(text: str = "") -> Any:
    config = parse(text or config_text(), "t.toml")
    configure_routes(
        {n: list(v) for n, v in config.access_lists.items()},
        [ipaddress.ip_address("198.18.60.1"), ipaddress.ip_address("2001:db8:60::1")],
        ["198.18.100.0/24"],
    )
    return config


def test_policy_route_set_resolves_access_list_and_interface() -> None:
    policy_text = (
        'route_set_prefix = ["198.18.50.0/24"]\n'
        'route_set_access_list = "branch"\n'
        "route_set_interface = true\n"
        'route_accept = "any tag 7 distance 20"\n'
    )
    config = register(config_text(policy=policy_text))
    policy = config.policies["staff"].policy()
    assert policy.local_ts[0] == "198.18.50.0/24"
    assert "10.99.0.1/32" in policy.local_ts
    assert policy.local_ts[-2:] == ["198.18.60.1/32", "2001:db8:60::1/128"]
    assert policy.route_accept == (7, 20)
    assert policy.route_accept_exclude == ["198.18.100.0/24"]


def test_policy_route_accept_default_distance_no_tag() -> None:
    register()
    auth = parse_authorization({"Cisco-AVPair": ["ipsec:route-accept=any"]})
    assert auth.policy().route_accept == (None, 2)
    assert Authorization().policy().route_accept is None


def test_radius_route_set_pairs_resolved() -> None:
    register()
    stats: collections.Counter[str] = collections.Counter()
    pairs = [
        "ipsec:route-set=access-list branch",
        "ipsec:route-set=interface",
        "ipsec:route-set=prefix 198.18.51.0/24",
        "ipsec:route-accept=any tag 100 distance 5",
    ]
    auth = parse_authorization({"Cisco-AVPair": pairs}, stats)
    assert stats["avpair_malformed"] == 0
    policy = auth.policy()
    assert policy.local_ts[0] == "198.18.51.0/24"
    assert "172.16.0.0/16" in policy.local_ts and "198.18.60.1/32" in policy.local_ts
    assert policy.route_accept == (100, 5)


@pytest.mark.parametrize(
    "pair",
    [
        "ipsec:route-set=access-list nowhere",
        "ipsec:route-set=gateway 1.2.3.4",
        "ipsec:route-accept=any tag 0",
        "ipsec:route-accept=any distance 300",
    ],
)
def test_radius_bad_route_pair_counted_malformed(
    pair: str, caplog: pytest.LogCaptureFixture
) -> None:
    register()
    stats: collections.Counter[str] = collections.Counter()
    auth = parse_authorization({"Cisco-AVPair": [pair]}, stats)
    assert stats["avpair_malformed"] == 1
    assert auth.route_set_access_list is None and auth.route_accept is None
    assert pair.split("=")[0] in caplog.text


def values(attrs: list[ConfigAttribute], kind: int) -> list[bytes]:
    return [a.value for a in attrs if a.type == kind]


def test_attributes_client_gets_access_list_and_interface_subnets() -> None:
    register()
    auth = parse_authorization({"Cisco-AVPair": [
        "ipsec:route-set=access-list branch", "ipsec:route-set=interface",
    ]})  # fmt: skip
    profile = Profile("ra", ["*"], Identity.from_string("vpn"), PSK)
    attrs = config_attributes(ADDRESS, ADDRESS6, auth.policy(), profile, set())
    four = values(attrs, CfgAttribute.INTERNAL_IP4_SUBNET)
    # RFC 7296 3.15.1: address and netmask; host 10.99.0.1, our 198.18.60.1
    assert bytes.fromhex("0a630001ffffffff") in four
    assert bytes.fromhex("c6123c01ffffffff") in four
    assert bytes.fromhex("ac100000ffff0000") in four
    six = values(attrs, CfgAttribute.INTERNAL_IP6_SUBNET)
    assert six == [ipaddress.IPv6Address("2001:db8:60::1").packed + bytes([128])]


def subnet(text: str) -> ConfigAttribute:
    net = ipaddress.ip_network(text)
    if net.version == 4:
        value = net.network_address.packed + net.netmask.packed
        return ConfigAttribute(CfgAttribute.INTERNAL_IP4_SUBNET, value)
    value = net.network_address.packed + bytes([net.prefixlen])
    return ConfigAttribute(CfgAttribute.INTERNAL_IP6_SUBNET, value)


def test_pull_subnet_ipv4_and_ipv6() -> None:
    assert str(pull_subnet(subnet("10.77.0.0/16"))) == "10.77.0.0/16"
    assert str(pull_subnet(subnet("2001:db8:77::/48"))) == "2001:db8:77::/48"
    with pytest.raises(ValueError, match="prefix length 129"):
        bad = ConfigAttribute(CfgAttribute.INTERNAL_IP6_SUBNET, bytes(16) + b"\x81")
        pull_subnet(bad)
    with pytest.raises(ValueError, match="5 octets"):
        pull_subnet(ConfigAttribute(CfgAttribute.INTERNAL_IP4_SUBNET, bytes(5)))


ACCEPTING = SessionPolicy(
    local_ts=["198.18.50.0/24"], route_accept=(7, 20),
    route_accept_exclude=["198.18.100.0/24"],
)  # fmt: skip


def test_accept_routes_refuses_default_overlap_and_excess() -> None:
    counters: dict[str, int] = {}
    announced = [
        ConfigAttribute(CfgAttribute.INTERNAL_IP4_SUBNET),  # a request, no value
        subnet("10.77.0.0/16"),
        subnet("2001:db8:77::/48"),
        subnet("0.0.0.0/0"),
        subnet("198.18.100.128/25"),  # in the pool
        subnet("198.18.50.0/25"),  # in the subnets routed to the client
        ConfigAttribute(CfgAttribute.INTERNAL_IP4_SUBNET, bytes(3)),
    ] + [subnet(f"10.{i}.0.0/16") for i in range(100, 160)]
    accepted, refused = accept_routes(announced, ACCEPTING, None, counters)
    assert accepted[:2] == ["10.77.0.0/16", "2001:db8:77::/48"]
    assert len(accepted) == 50
    assert refused[:4] == [
        "0.0.0.0/0 (default route)",
        "198.18.100.128/25 (overlaps pools or routed subnets)",
        "198.18.50.0/25 (overlaps pools or routed subnets)",
        "malformed (3 octets)",
    ]
    assert counters == {"routes_refused": 4 + 12, "routes_accepted": 50}


def test_accept_routes_without_route_accept_ignored() -> None:
    counters: dict[str, int] = {}
    policy = SessionPolicy(local_ts=["198.18.50.0/24"])
    assert accept_routes([subnet("10.77.0.0/16")], policy, None, counters) == ([], [])
    assert accept_routes([subnet("10.78.0.0/16")], None, None, counters) == ([], [])
    assert counters == {"routes_ignored": 2}


def test_accept_routes_full_tunnel_local_ts_does_not_refuse() -> None:
    # a profile routing 0.0.0.0/0 to the client overlaps everything: not a reason
    policy = SessionPolicy(route_accept=(None, 2))
    profile = Profile("ra", ["*"], Identity.from_string("vpn"), PSK)
    accepted, _ = accept_routes([subnet("10.77.0.0/16")], policy, profile, {})
    assert accepted == ["10.77.0.0/16"]


def connect(
    policy: SessionPolicy, announce: list[ConfigAttribute]
) -> tuple[IkeResponder, list[object]]:
    free = [ADDRESS]
    profile = Profile(
        "ra", ["*@example.net"], Identity.from_string("vpn.example.net"), PSK,
        local_ts=["198.18.50.0/24"], authorize=True,
    )  # fmt: skip
    r = IkeResponder(
        ResponderConfig(
            profiles=[profile],
            allocate_address=lambda i, s: free.pop(0) if free else None,
            release_address=lambda a: None,
        )
    )
    client = IkeClient(psk=PSK, tsi=["0.0.0.0/0"], tsr=["0.0.0.0/0"],
                       request_config=False)  # fmt: skip
    r.datagram_received(client.init_request(), SERVER, CLIENT, 0.0)
    client.handle_init_response(r.datagrams_to_send()[0].data)
    request = [ConfigAttribute(CfgAttribute.INTERNAL_IP4_ADDRESS), *announce]
    extra = [CPPayload(CfgType.CFG_REQUEST, request)]
    r.datagram_received(client.auth_request(extra), SERVER, CLIENT, 1.0)
    aaa = r.next_event()
    assert isinstance(aaa, AaaRequest)
    r.aaa_result(aaa.session_id, AaaResult("accept", policy=policy), 1.0)
    _, payloads = client.open(r.datagrams_to_send()[0].data)
    return r, payloads  # type: ignore[return-value]


def test_config_accepted_route_widens_tsi() -> None:
    r, payloads = connect(ACCEPTING, [subnet("10.77.0.0/16"), subnet("0.0.0.0/0")])
    (tsi,) = [p for p in payloads if isinstance(p, TSiPayload)]
    assert [ts_to_string(t) for t in tsi.selectors] == [
        f"{ADDRESS}/32", "10.77.0.0/16",
    ]  # fmt: skip
    (ike,) = r._sas.values()
    assert ike.policy.accepted_routes == ["10.77.0.0/16"]
    assert r.counters["routes_accepted"] == 1 and r.counters["routes_refused"] == 1


def test_config_announced_route_without_route_accept_not_in_tsi() -> None:
    r, payloads = connect(SessionPolicy(), [subnet("10.77.0.0/16")])
    (tsi,) = [p for p in payloads if isinstance(p, TSiPayload)]
    assert [ts_to_string(t) for t in tsi.selectors] == [f"{ADDRESS}/32"]
    assert r.counters["routes_ignored"] == 1


class FakeRoutes:
    """Record route calls in place of rtnetlink."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str, int | None]] = []

    def add(self, ifname: str, prefix: str, metric: int | None = None) -> None:
        self.calls.append(("add", ifname, prefix, metric))

    def delete(self, ifname: str, prefix: str, metric: int | None = None) -> None:
        self.calls.append(("del", ifname, prefix, metric))


def test_daemon_accepted_routes_installed_shown_and_removed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = FakeRoutes()
    monkeypatch.setattr(daemon_module, "add_route", fake.add)
    monkeypatch.setattr(daemon_module, "del_route", fake.delete)
    policy = SessionPolicy(route_accept=(7, 20), accepted_routes=["10.77.0.0/16"])

    class Responder:
        def session_sa(self, session_id: str) -> Any:
            return type("Sa", (), {"policy": policy})()

    headend = object.__new__(daemon_module.Headend)
    headend.responder = Responder()  # type: ignore[assignment]
    headend.counters = {}
    session = daemon_module.Session("s1", 1, "client", CLIENT, tun_name="egs1")
    event = type("Ev", (), {"session_id": "s1"})()
    headend._accepted_routes(session, event)
    headend._accepted_routes(session, event)  # a second CHILD SA: once only
    assert fake.calls == [("add", "egs1", "10.77.0.0/16", 20)]
    assert session.accepted_routes == ["10.77.0.0/16"]
    assert (session.route_tag, session.route_metric) == (7, 20)
    headend._remove_accepted_routes(session)
    assert fake.calls[-1] == ("del", "egs1", "10.77.0.0/16", 20)
    assert session.accepted_routes == []


NS_SCRIPT = """
import json, subprocess, sys
from control.routes import add_route, del_route
for args in (["add", "egtrt0", "type", "veth", "peer", "name", "egtrt1"],
             ["set", "egtrt0", "up"], ["set", "egtrt1", "up"]):
    subprocess.run(["ip", "link", *args], check=True)
add_route("egtrt0", "10.77.0.0/16", metric=20)
add_route("egtrt0", "2001:db8:77::/48", metric=20)
def show(family):
    out = subprocess.run(["ip", "-j", family, "route", "show", "dev", "egtrt0"],
                         check=True, capture_output=True, text=True).stdout
    return [(r["dst"], r.get("metric")) for r in json.loads(out)
            if r["dst"].startswith(("10.77", "2001:db8:77"))]
before = show("-4") + show("-6")
del_route("egtrt0", "10.77.0.0/16", metric=20)
del_route("egtrt0", "2001:db8:77::/48", metric=20)
print(json.dumps([before, show("-4") + show("-6")]))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a namespace")
def test_routes_real_kernel_metric_add_and_delete() -> None:
    ns = f"egt-rt{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        out = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, "-c", NS_SCRIPT],
            check=True, capture_output=True, text=True, cwd=root,
        ).stdout  # fmt: skip
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
    before, after = json.loads(out)
    assert sorted(map(tuple, before)) == [
        ("10.77.0.0/16", 20), ("2001:db8:77::/48", 20),
    ]  # fmt: skip
    assert after == []


E2E_CONFIG = """\
[server]
listen = "127.0.0.1"
control_socket = "{sock}"
state_dir = "{state}"
log_level = "debug"

[engine]
crypto = "openssl"
dataplane = "inline"

[pools.p]
range = "198.18.100.10-198.18.100.20"

[policies.staff]
route_accept = "any tag 7 distance 20"

[[profiles]]
name = "ra"
match_identity = ["*@example.net"]
local_identity = "fqdn:vpn.example.net"
psk = "correct horse battery staple"
pool = "p"
local_ts = ["198.18.50.0/24"]
authorization_group = "local:staff"
"""


def control(sock: str, ns: str, request: dict[str, Any]) -> Any:
    code = (
        "import json, socket, sys\n"
        "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
        "s.sendall(sys.argv[2].encode()); s.shutdown(socket.SHUT_WR)\n"
        "print(b''.join(iter(lambda: s.recv(65536), b'')).decode())\n"
    )
    out = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", code, sock,
         json.dumps(request)],
        check=True, capture_output=True, text=True, timeout=30,
    ).stdout  # fmt: skip
    return json.loads(out)


def routes_in(ns: str) -> list[tuple[str, str, int | None]]:
    out = subprocess.run(["ip", "-n", ns, "-j", "route", "show"], check=True,
                         capture_output=True, text=True).stdout  # fmt: skip
    return [(r["dst"], r.get("dev"), r.get("metric")) for r in json.loads(out)
            if r["dst"].startswith("10.77.")]  # fmt: skip


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a namespace")
def test_daemon_client_route_installed_and_removed_end_to_end(tmp_path: Any) -> None:
    ns = f"egt-rte{os.getpid()}"
    sock, state = str(tmp_path / "ctl.sock"), tmp_path / "state"
    state.mkdir()
    path = tmp_path / "espgate.toml"
    path.write_text(E2E_CONFIG.format(sock=sock, state=state))
    subprocess.run(["ip", "netns", "add", ns], check=True)
    daemon = client = None
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        espgate = os.path.join(os.path.dirname(sys.executable), "espgate")
        daemon = subprocess.Popen(
            ["ip", "netns", "exec", ns, espgate, "serve", "--config", str(path)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        # the client speaks UDP from inside the namespace, through a helper
        client = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-c", E2E_CLIENT, sock],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        )  # fmt: skip
        assert client.stdin is not None and client.stdout is not None
        line = client.stdout.readline()
        if not line:
            daemon.terminate()
            _, errors = daemon.communicate(timeout=20)
            pytest.fail(f"the test client got no CHILD SA; daemon: {errors[-2000:]}")
        session, tun = json.loads(line)
        assert routes_in(ns) == [("10.77.0.0/16", tun, 20)]
        shown = control(sock, ns, {"cmd": "show-sessions"})["sessions"]
        assert shown[0]["session"] == session
        assert shown[0]["accepted_routes"] == [
            {"prefix": "10.77.0.0/16", "metric": 20, "tag": 7}
        ]
        # the client deletes its IKE SA: the session and its routes go
        client.stdin.write("delete\n")
        client.stdin.flush()
        assert client.stdout.readline() == "deleted\n"
        assert client.wait(timeout=30) == 0
        assert control(sock, ns, {"cmd": "show-sessions"})["sessions"] == []
        assert routes_in(ns) == []
    finally:
        if client is not None and client.poll() is None:
            client.kill()
            client.wait(timeout=10)
        if daemon is not None:
            daemon.terminate()
            daemon.wait(timeout=20)
        subprocess.run(["ip", "netns", "del", ns], check=False)


E2E_CLIENT = """
import ipaddress, json, os, socket, sys, time
from ikeclient import IkeClient
from control.ike.messages import CfgAttribute, CfgType, ConfigAttribute, CPPayload
for _ in range(100):
    if os.path.exists(sys.argv[1]):
        break
    time.sleep(0.1)
server = ("127.0.0.1", 500)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", 0))
s.settimeout(10)
c = IkeClient(address=s.getsockname(), server=server, request_config=False,
              tsi=["0.0.0.0/0"], tsr=["0.0.0.0/0"])
# the control socket may come before port 500: retransmit like a client
s.settimeout(1)
init = c.init_request()
for _ in range(30):
    s.sendto(init, server)
    try:
        c.handle_init_response(s.recv(65536))
        break
    except TimeoutError:
        continue
s.settimeout(10)
net = ipaddress.ip_network("10.77.0.0/16")
cp = CPPayload(CfgType.CFG_REQUEST, [
    ConfigAttribute(CfgAttribute.INTERNAL_IP4_ADDRESS),
    ConfigAttribute(CfgAttribute.INTERNAL_IP4_SUBNET,
                    net.network_address.packed + net.netmask.packed)])
s.sendto(c.auth_request([cp]), server)
result = c.handle_auth_response(s.recv(65536))
assert result.child is not None, result
r = socket.socket(socket.AF_UNIX); r.connect(sys.argv[1])
r.sendall(b'{"cmd": "show-sessions"}'); r.shutdown(socket.SHUT_WR)
shown = json.loads(b"".join(iter(lambda: r.recv(65536), b"")))["sessions"][0]
print(json.dumps([shown["session"], shown["tun"]]), flush=True)
sys.stdin.readline()
s.sendto(c.delete_ike(), server)
s.recv(65536)
print("deleted", flush=True)
"""
