"""Export and import of IKE SA state (control.ike.persist) for a daemon restart.

An in-memory client (tests/ikeclient.py, its own crypto) connects to one
responder; the SA is exported, stored in a real SeqStore, read back and
adopted by a fresh responder, which must then answer the client's next
requests (liveness, a retransmission, a CHILD delete) as the first would.
Records that cannot be trusted raise UntrustedState.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from control.ike.persist import (
    RECORD_KIND,
    RECORD_VERSION,
    dumps,
    export_ike,
    import_ike,
    loads,
)
from control.seqstore import SeqStore, UntrustedState

sys.path.insert(0, str(Path(__file__).parent))
from ikeclient import IkeClient  # noqa: E402
from test_ike_responder import (  # noqa: E402
    CLIENT_NATT,
    SERVER_NATT,
    connect,
    events,
    exchange,
    make_responder,
)


def _established() -> tuple[object, IkeClient]:
    r = make_responder()
    client = IkeClient()
    connect(r, client)
    events(r)
    return r, client


def _natt(r: object, data: bytes) -> list:
    return exchange(r, data, local=SERVER_NATT, remote=CLIENT_NATT)  # type: ignore[arg-type]


def test_import_resumed_sa_answers_liveness(tmp_path: Path) -> None:
    r, client = _established()
    (ike,) = r.established()  # type: ignore[attr-defined]
    store = SeqStore(tmp_path / "state.sqlite")
    store.put_record(
        RECORD_KIND, ike.session_id, RECORD_VERSION, dumps(export_ike(ike))
    )
    store.close()

    # a new daemon: fresh responder, record read back from the file
    fresh = make_responder()
    store = SeqStore(tmp_path / "state.sqlite")
    ((version, body),) = store.records(RECORD_KIND).values()
    assert version == RECORD_VERSION
    resumed = import_ike(loads(body), fresh, now=100.0)
    fresh.adopt(resumed)
    (reply,) = _natt(fresh, client.informational([]))
    assert client.open_response(reply.data) == []
    assert [s["id"] for s in fresh.sessions()] == [ike.session_id]


def test_import_resumed_sa_replays_cached_response() -> None:
    r, client = _established()
    request = client.informational([])
    (first,) = _natt(r, request)
    (ike,) = r.established()  # type: ignore[attr-defined]
    fresh = make_responder()
    fresh.adopt(import_ike(loads(dumps(export_ike(ike))), fresh, now=5.0))
    # RFC 7296 2.1: a retransmitted request gets the same response
    (again,) = _natt(fresh, request)
    assert again.data == first.data


def test_import_resumed_sa_deletes_child_by_peer() -> None:
    r, client = _established()
    (ike,) = r.established()  # type: ignore[attr-defined]
    (spi_in,) = ike.children
    fresh = make_responder()
    fresh.adopt(import_ike(loads(dumps(export_ike(ike))), fresh, now=5.0))
    (reply,) = _natt(fresh, client.delete_child())
    client.open_response(reply.data)
    downs = [e for e in events(fresh) if type(e).__name__ == "ChildSADown"]
    assert [e.spi_in for e in downs] == [spi_in]


def test_import_tampered_key_fails_integrity() -> None:
    r, client = _established()
    (ike,) = r.established()  # type: ignore[attr-defined]
    data = export_ike(ike)
    key = bytearray(bytes.fromhex(data["keys"]["sk_ei"]))
    key[0] ^= 1
    data["keys"]["sk_ei"] = key.hex()
    fresh = make_responder()
    fresh.adopt(import_ike(data, fresh, now=5.0))
    assert _natt(fresh, client.informational([])) == []
    assert fresh.counters["drop_integrity"] == 1


def test_import_in_flight_request_untrusted() -> None:
    r, _ = _established()
    (ike,) = r.established()  # type: ignore[attr-defined]
    data = export_ike(ike)
    data["in_flight"] = True
    with pytest.raises(UntrustedState):
        import_ike(data, make_responder(), now=1.0)


def test_import_unknown_profile_untrusted() -> None:
    r, _ = _established()
    (ike,) = r.established()  # type: ignore[attr-defined]
    data = export_ike(ike)
    data["profile"] = "gone"
    with pytest.raises(UntrustedState):
        import_ike(data, make_responder(), now=1.0)


def test_import_malformed_record_untrusted() -> None:
    with pytest.raises(UntrustedState):
        loads(b"{not json")
    r, _ = _established()
    (ike,) = r.established()  # type: ignore[attr-defined]
    data = export_ike(ike)
    del data["keys"]["sk_d"]
    with pytest.raises(UntrustedState):
        import_ike(data, make_responder(), now=1.0)


def test_import_resumed_sa_starts_our_child_rekey() -> None:
    from control.ike.messages import ExchangeType, TSiPayload, TSrPayload

    r, client = _established()
    (ike,) = r.established()  # type: ignore[attr-defined]
    (spi_in,) = ike.children
    fresh = make_responder()
    fresh.adopt(import_ike(loads(dumps(export_ike(ike))), fresh, now=5.0))
    # sequence numbers running out: the rekey is due at once
    assert fresh.rekey_child_soon(ike.session_id, spi_in, 10.0)
    assert fresh.get_timer() == 10.0
    fresh.handle_timer(10.0)
    (request,) = fresh.datagrams_to_send()
    header, payloads = client.open(request.data)
    # RFC 7296 1.3.3: SA, Ni, TSi, TSr with the CHILD SA's own selectors
    assert header.exchange == ExchangeType.CREATE_CHILD_SA
    selectors = [p for p in payloads if isinstance(p, (TSiPayload, TSrPayload))]
    assert len(selectors) == 2 and all(p.selectors for p in selectors)
