"""Session lifetime: the headend deletes a session when its lifetime ends.

The responder runs against the independent test initiator with a fake clock:
  (lifetime over)  <--  HDR, SK {D(IKE)}      HDR, SK {}  -->
"""

from __future__ import annotations

from control.ike.messages import DeletePayload, ProtocolId
from control.ike.responder import ChildSADown, IkeSADown
from tests.ikeclient import IkeClient
from tests.test_ike_responder import (
    CLIENT_NATT,
    SERVER_NATT,
    connect,
    events,
    exchange,
    make_responder,
)

NO_REKEYS = {"ike_rekey_time": None, "child_rekey_time": None}


def test_session_lifetime_deletes_the_ike_sa_at_expiry() -> None:
    r = make_responder(session_lifetime=300.0, **NO_REKEYS)
    client = IkeClient()
    connect(r, client)
    events(r)
    assert r.get_timer() == 300.0
    r.handle_timer(299.9)
    assert r.datagrams_to_send() == []

    # HDR, SK {D(IKE)} --> <-- HDR, SK {}
    r.handle_timer(300.0)
    (request,) = r.datagrams_to_send()
    payloads, answer = client.answer_request(request.data)
    assert payloads == [DeletePayload(ProtocolId.IKE, 0, [])]
    exchange(r, answer, now=300.5, local=SERVER_NATT, remote=CLIENT_NATT)
    assert [type(e) for e in events(r)] == [ChildSADown, IkeSADown]
    assert r.counters["session_expired"] == 1 and r.sessions() == []


def test_session_without_lifetime_has_no_deadline() -> None:
    r = make_responder(**NO_REKEYS)
    connect(r, IkeClient())
    assert r.get_timer() is None


def test_session_lifetime_survives_an_ike_rekey() -> None:
    r = make_responder(session_lifetime=300.0, **NO_REKEYS)
    client = IkeClient()
    connect(r, client)
    (reply,) = exchange(
        r, client.rekey_ike(), now=100.0, local=SERVER_NATT, remote=CLIENT_NATT
    )
    client.handle_ike_rekey_response(reply.data)
    assert r.counters["ike_rekeyed"] == 1
    # the rekeyed SA keeps the session's end, not a fresh 300 s
    assert r.get_timer() == 300.0
