"""Authorization that reaches the IKE core: addrv6/prefix-len and ipsec-flow-limit.

A RADIUS answer (or a local policy) names the client's IPv6 address the way
Framed-IP-Address names its IPv4 one, and caps the IPsec SAs of one session:

  AaaResult(policy: address6, flow_limit)  -->  CP(CFG_REPLY: INTERNAL_IP6_ADDRESS)
                                              CREATE_CHILD_SA beyond the cap:
                                              N(NO_ADDITIONAL_SAS)
"""

from __future__ import annotations

import ipaddress

import pytest

from control.aaa.attributes import parse_authorization
from control.ike.eap import AaaRequest, AaaResult
from control.ike.messages import (
    CfgAttribute,
    CfgType,
    ConfigAttribute,
    CPPayload,
    NotifyType,
)
from control.ike.profiles import SessionPolicy
from control.ike.responder import (
    Identity,
    IkeResponder,
    Profile,
    ResponderConfig,
)
from tests.ikeclient import IkeClient, ServerRefused, network_ts

SERVER = ("198.18.0.1", 500)
CLIENT = ("198.18.0.2", 500)
PSK = b"correct horse battery staple"
V6 = ipaddress.IPv6Interface("2001:db8:18:7::5/64")


def test_addrv6_with_prefix_len_becomes_the_policy_address6() -> None:
    pairs = ["ipsec:addrv6=2001:db8:18:7::5", "ipsec:prefix-len=64",
             "ipsec:ipsec-flow-limit=3"]  # fmt: skip
    policy = parse_authorization({"Cisco-AVPair": pairs}).policy()
    assert policy.address6 == V6 and policy.flow_limit == 3


def test_addrv6_without_prefix_len_is_a_host_address() -> None:
    auth = parse_authorization({"Cisco-AVPair": ["ipsec:addrv6=2001:db8:18:7::5"]})
    assert auth.policy().address6 == ipaddress.IPv6Interface("2001:db8:18:7::5/128")
    assert parse_authorization({}).policy().address6 is None
    assert parse_authorization({}).policy().flow_limit is None


class _Lab:
    """A PSK responder that asks AAA for a policy and answers with `policy`."""

    def __init__(self, policy: SessionPolicy, pool6: list[str]) -> None:
        self.pool6 = pool6
        profile = Profile(
            name="ra",
            remote_ids=["*@example.net"],
            local_id=Identity.from_string("vpn.example.net"),
            psk=PSK,
            local_ts=["198.18.48.0/20", "2001:db8:19::/64"],
            authorize=True,
        )
        self.r = IkeResponder(
            ResponderConfig(
                profiles=[profile],
                allocate_address=lambda i, s: ipaddress.IPv4Address("198.18.100.10"),
                release_address=lambda a: None,
                allocate_address6=self._allocate6,
            )
        )
        self.client = IkeClient(
            psk=PSK, tsi=["0.0.0.0/0", "::/0"], tsr=["198.18.50.0/24"],
            request_config=False,
        )  # fmt: skip
        r, client = self.r, self.client
        r.datagram_received(client.init_request(), SERVER, CLIENT, 0.0)
        client.handle_init_response(r.datagrams_to_send()[0].data)
        cp = CPPayload(
            CfgType.CFG_REQUEST,
            [ConfigAttribute(CfgAttribute.INTERNAL_IP4_ADDRESS),
             ConfigAttribute(CfgAttribute.INTERNAL_IP6_ADDRESS)],
        )  # fmt: skip
        r.datagram_received(client.auth_request([cp]), SERVER, CLIENT, 1.0)
        request = r.next_event()
        assert isinstance(request, AaaRequest)
        r.aaa_result(request.session_id, AaaResult("accept", policy=policy), 1.0)
        _, self.payloads = client.open(r.datagrams_to_send()[0].data)

    def _allocate6(
        self, profile: str, pool: str | None, session: str
    ) -> ipaddress.IPv6Interface | None:
        return ipaddress.IPv6Interface(self.pool6.pop(0)) if self.pool6 else None

    def address6(self) -> ipaddress.IPv6Interface:
        (cp,) = [p for p in self.payloads if isinstance(p, CPPayload)]
        (attr,) = [a for a in cp.attributes
                   if a.type == CfgAttribute.INTERNAL_IP6_ADDRESS]  # fmt: skip
        return ipaddress.IPv6Interface(
            f"{ipaddress.IPv6Address(attr.value[:16])}/{attr.value[16]}"
        )

    def create_child(self, tsr: str) -> None:
        self.client.tsr = [network_ts(tsr)]
        self.r.datagram_received(self.client.create_child(), SERVER, CLIENT, 2.0)
        reply = self.r.datagrams_to_send()[0].data
        self.client.handle_create_child_response(reply)


def test_address6_from_authorization_comes_before_the_ipv6_pool() -> None:
    lab = _Lab(SessionPolicy(address6=V6), pool6=["2001:db8:18:1::2/128"])
    assert lab.address6() == V6
    assert lab.pool6 == ["2001:db8:18:1::2/128"]  # the pool was not asked


def test_without_address6_the_ipv6_pool_gives_the_address() -> None:
    lab = _Lab(SessionPolicy(), pool6=["2001:db8:18:1::2/128"])
    assert lab.address6() == ipaddress.IPv6Interface("2001:db8:18:1::2/128")


def test_policy_flow_limit_refuses_the_sa_beyond_it() -> None:
    lab = _Lab(SessionPolicy(flow_limit=2), pool6=[])
    lab.create_child("198.18.51.0/24")
    with pytest.raises(ServerRefused) as refused:
        lab.create_child("198.18.52.0/24")
    assert refused.value.notify == NotifyType.NO_ADDITIONAL_SAS
    assert lab.r.counters["child_refused_NO_ADDITIONAL_SAS"] == 1


def test_without_policy_flow_limit_the_profile_allows_more_sas() -> None:
    lab = _Lab(SessionPolicy(), pool6=[])
    lab.create_child("198.18.51.0/24")
    lab.create_child("198.18.52.0/24")
    assert len(lab.r.sessions()[0]["child_spis"]) == 3
