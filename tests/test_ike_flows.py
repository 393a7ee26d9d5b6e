"""CHILD SAs beyond the first: flow limit and any-to-any pairs (control.ike.flows)."""

from __future__ import annotations

import pytest

from control.ike.messages import NotifyType
from tests.ikeclient import IkeClient, ServerRefused, network_ts
from tests.test_ike_responder import (
    CLIENT_NATT,
    SERVER_NATT,
    connect,
    events,
    exchange,
    make_responder,
)


def _create(r: object, client: IkeClient, tsr: str) -> object:
    client.tsr = [network_ts(tsr)]
    (reply,) = exchange(
        r,  # type: ignore[arg-type]
        client.create_child(),
        local=SERVER_NATT,
        remote=CLIENT_NATT,
    )
    return client.handle_create_child_response(reply.data)


def test_create_child_without_flow_limit_adds_every_pair() -> None:
    r = make_responder(local_ts=["198.18.48.0/20"])
    client = IkeClient(tsr=["198.18.50.0/24"])
    connect(r, client)
    for n in range(51, 56):
        _create(r, client, f"198.18.{n}.0/24")
    assert len(r.sessions()[0]["child_spis"]) == 6


def test_create_child_beyond_flow_limit_gets_no_additional_sas() -> None:
    r = make_responder(flow_limit=2)
    client = IkeClient(tsr=["198.18.50.0/24"])
    connect(r, client)
    _create(r, client, "198.18.60.0/24")
    with pytest.raises(ServerRefused) as refused:
        _create(r, client, "198.18.60.0/25")
    assert refused.value.notify == NotifyType.NO_ADDITIONAL_SAS
    assert len(r.sessions()[0]["child_spis"]) == 2
    assert r.counters["child_refused_NO_ADDITIONAL_SAS"] == 1


def test_rekey_at_flow_limit_is_allowed() -> None:
    r = make_responder(flow_limit=1)
    client = IkeClient(tsr=["198.18.50.0/24"])
    connect(r, client)
    events(r)
    (reply,) = exchange(
        r, client.create_child(rekey=True), local=SERVER_NATT, remote=CLIENT_NATT
    )
    assert client.handle_create_child_response(reply.data) is not None
    assert len(r.sessions()[0]["child_spis"]) == 2


def test_second_child_beside_any_to_any_gets_no_additional_sas() -> None:
    r = make_responder(local_ts=["0.0.0.0/0"])
    client = IkeClient()
    connect(r, client)
    with pytest.raises(ServerRefused) as refused:
        _create(r, client, "198.18.60.0/24")
    assert refused.value.notify == NotifyType.NO_ADDITIONAL_SAS


def test_any_to_any_child_beside_another_gets_no_additional_sas() -> None:
    r = make_responder(local_ts=["0.0.0.0/0"])
    client = IkeClient(tsr=["198.18.50.0/24"])
    connect(r, client)
    with pytest.raises(ServerRefused) as refused:
        _create(r, client, "0.0.0.0/0")
    assert refused.value.notify == NotifyType.NO_ADDITIONAL_SAS
    assert len(r.sessions()[0]["child_spis"]) == 1
