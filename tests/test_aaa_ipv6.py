"""Config mode for IPv6 (RFC 7296 3.15.3): an address and prefix from an IPv6 pool.

HDR, SK {IDi, AUTH, CP(CFG_REQUEST: INTERNAL_IP6_ADDRESS), SAi2, TSi, TSr}  -->
<--  HDR, SK {IDr, AUTH, CP(CFG_REPLY: INTERNAL_IP6_ADDRESS), SAr2, TSi, TSr}
"""

from __future__ import annotations

import ipaddress

from control.ike.messages import (
    CfgAttribute,
    CfgType,
    ConfigAttribute,
    CPPayload,
    NotifyPayload,
    NotifyType,
    TSiPayload,
)
from control.ike.responder import (
    ChildSAUp,
    Identity,
    IkeResponder,
    IkeSAUp,
    Profile,
    ResponderConfig,
)

try:
    from tests.ikeclient import IkeClient
except ImportError:  # pytest's rootdir-relative import without tests/__init__.py
    from ikeclient import IkeClient  # type: ignore[no-redef]

SERVER = ("198.18.0.1", 500)
CLIENT = ("198.18.0.2", 500)
PSK = b"correct horse battery staple"


def make_responder(free6: list[str], free4: list[str]) -> IkeResponder:
    profile = Profile(
        name="v6",
        remote_ids=["*@example.net"],
        local_id=Identity.from_string("vpn.example.net"),
        psk=PSK,
        local_ts=["198.18.50.0/24", "2001:db8:19::/64"],
    )
    released: list[object] = []

    def allocate6(profile: str, pool: str | None, session: str):  # type: ignore[no-untyped-def]
        return ipaddress.IPv6Interface(free6.pop(0)) if free6 else None

    config = ResponderConfig(
        profiles=[profile],
        allocate_address=lambda i, s: (
            ipaddress.IPv4Address(free4.pop(0)) if free4 else None
        ),
        release_address=released.append,
        allocate_address6=allocate6,
    )
    r = IkeResponder(config)
    r.released = released  # type: ignore[attr-defined]
    return r


def connect(r: IkeResponder, attrs: list[int], tsi: list[str]) -> list[object]:
    client = IkeClient(
        psk=PSK, tsi=tsi, tsr=["0.0.0.0/0", "::/0"], request_config=False
    )
    r.datagram_received(client.init_request(), SERVER, CLIENT, 0.0)
    client.handle_init_response(r.datagrams_to_send()[0].data)
    cp = CPPayload(CfgType.CFG_REQUEST, [ConfigAttribute(a) for a in attrs])
    r.datagram_received(client.auth_request([cp]), SERVER, CLIENT, 0.0)
    _, payloads = client.open(r.datagrams_to_send()[0].data)
    return payloads  # type: ignore[return-value]


def test_config_ipv6_only_gets_address_prefix_and_narrowed_tsi() -> None:
    r = make_responder(["2001:db8:18:1::2/128"], ["198.18.100.10"])
    payloads = connect(r, [CfgAttribute.INTERNAL_IP6_ADDRESS], ["::/0"])
    (cp,) = [p for p in payloads if isinstance(p, CPPayload)]
    values = {a.type: a.value for a in cp.attributes}
    assert CfgAttribute.INTERNAL_IP4_ADDRESS not in values
    value = values[CfgAttribute.INTERNAL_IP6_ADDRESS]
    assert ipaddress.IPv6Address(value[:16]) == ipaddress.IPv6Address(
        "2001:db8:18:1::2"
    )
    assert value[16] == 128
    (tsi,) = [p for p in payloads if isinstance(p, TSiPayload)]
    (sel,) = tsi.selectors
    assert ipaddress.IPv6Address(sel.start_address) == ipaddress.IPv6Address(
        "2001:db8:18:1::2"
    )
    events = []
    while (e := r.next_event()) is not None:
        events.append(e)
    up = next(e for e in events if isinstance(e, ChildSAUp))
    assert str(up.inside_address6) == "2001:db8:18:1::2/128"
    assert up.inside_address is None and any(isinstance(e, IkeSAUp) for e in events)


def test_config_dual_stack_gets_both_and_two_tsi() -> None:
    r = make_responder(["2001:db8:18:1::1/128"], ["198.18.100.10"])
    attrs = [CfgAttribute.INTERNAL_IP4_ADDRESS, CfgAttribute.INTERNAL_IP6_ADDRESS]
    payloads = connect(r, attrs, ["0.0.0.0/0", "::/0"])
    (cp,) = [p for p in payloads if isinstance(p, CPPayload)]
    kinds = [a.type for a in cp.attributes]
    assert kinds.count(CfgAttribute.INTERNAL_IP4_ADDRESS) == 1
    assert kinds.count(CfgAttribute.INTERNAL_IP6_ADDRESS) == 1
    (tsi,) = [p for p in payloads if isinstance(p, TSiPayload)]
    assert len(tsi.selectors) == 2


def test_config_ipv6_pool_empty_gets_internal_address_failure() -> None:
    r = make_responder([], ["198.18.100.10"])
    payloads = connect(r, [CfgAttribute.INTERNAL_IP6_ADDRESS], ["::/0"])
    notifies = [p.notify_type for p in payloads if isinstance(p, NotifyPayload)]
    assert NotifyType.INTERNAL_ADDRESS_FAILURE in notifies
    assert not any(isinstance(p, CPPayload) for p in payloads)
