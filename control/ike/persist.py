"""IKE SA state to and from the state file, for a whole-daemon restart.

Theory of operation: the daemon stores one record per session (kind
``"session"``, named by the session id) in :class:`control.seqstore.SeqStore`
before it sends the datagrams of a step, so a stored message ID is never
behind a response that left the box.  A record is JSON: the IKE SA (SPIs,
addresses, algorithms, nonces, the seven SK_* keys, both message-ID windows
and the cached last response), the authorization result (identity, profile
name, inside address) and, per CHILD SA, what the engine needs (SPIs, keys,
salts, ESN, traffic selectors).  Keys are protected at rest by the file's
0600 mode and overwritten on delete (``secure_delete``).

On start the daemon calls `import_ike` for each record.  Only state that can
be trusted comes back: an ESTABLISHED IKE SA with no request of ours in
flight, whose profile still exists, from a record of this version.  Anything
else raises :class:`control.seqstore.UntrustedState`; the daemon then deletes
the session (an INFORMATIONAL delete when the keys are usable) and never
guesses.  Rebuilt SAs get fresh SK ciphers from the stored keys.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any

from control.ike.crypto import IkeKeys, new_sk_cipher
from control.ike.messages import TrafficSelector
from control.ike.profiles import IkeAlgorithms
from control.ike.sa import ChildSA, IkeSA, IkeState
from control.seqstore import UntrustedState

__all__ = [
    "RECORD_KIND",
    "RECORD_VERSION",
    "dumps",
    "export_ike",
    "import_ike",
    "loads",
]

RECORD_KIND = "session"
RECORD_VERSION = 2
_KEYS = ("sk_d", "sk_ai", "sk_ar", "sk_ei", "sk_er", "sk_pi", "sk_pr")


def export_ike(ike: IkeSA) -> dict[str, Any]:
    """Return an established IKE SA as a JSON-ready dict (keys included)."""
    assert ike.profile is not None, "Only authenticated SAs are exported"
    a = ike.algorithms
    return {
        "spi_i": ike.spi_i.hex(),
        "spi_r": ike.spi_r.hex(),
        "local": list(ike.local),
        "remote": list(ike.remote),
        "algorithms": [a.encr, a.key_length, a.integ, a.prf],
        "dh_group": ike.dh_group,
        "nonce_i": ike.nonce_i.hex(),
        "nonce_r": ike.nonce_r.hex(),
        "keys": {name: getattr(ike.keys, name).hex() for name in _KEYS},
        "nat": [ike.peer_behind_nat, ike.self_behind_nat],
        "state": ike.state.value,
        "in_flight": ike.pending is not None or bool(ike.queued),
        "rekeying": bool(ike.rekeying or ike.child_rekeys)
        or any(c.rekeying for c in ike.children.values()),
        "expected_request_id": ike.expected_request_id,
        # the cached response, one datagram or its RFC 7383 fragments
        "last_response": [d.hex() for d in ike.last_response or []],
        "last_request_digest": (ike.last_request_digest or b"").hex(),
        "next_our_request_id": ike.next_our_request_id,
        "profile": ike.profile.name,
        "identity": ike.identity,
        "inside_address": None
        if ike.inside_address is None
        else str(ike.inside_address),
        "children": [
            [
                c.spi_in,
                c.spi_out,
                c.key_length,
                c.local_ts,
                c.remote_ts,
                c.pfs_group,
                [[_ts(t) for t in side] for side in c.selectors],
            ]
            for c in ike.children.values()
            if not c.replaced
        ],
        "session": ike.session_id,
    }


def import_ike(data: dict[str, Any], responder: Any, now: float) -> IkeSA:
    """Rebuild an IKE SA from `export_ike` output; UntrustedState if unsafe."""
    if data.get("state") != IkeState.ESTABLISHED.value:
        raise UntrustedState(f"IKE SA in state {data.get('state')!r}")
    if data.get("in_flight") or data.get("rekeying"):
        # a request of ours may or may not have reached the peer
        raise UntrustedState("IKE SA had a request in flight")
    profile = next(
        (p for p in responder.config.profiles if p.name == data["profile"]), None
    )
    if profile is None:
        raise UntrustedState(f"Profile {data['profile']!r} no longer configured")
    try:
        a = IkeAlgorithms(*data["algorithms"])
        keys = IkeKeys(**{name: bytes.fromhex(data["keys"][name]) for name in _KEYS})
        rng = responder.rng
        ike = IkeSA(
            spi_i=bytes.fromhex(data["spi_i"]),
            spi_r=bytes.fromhex(data["spi_r"]),
            local=(data["local"][0], int(data["local"][1])),
            remote=(data["remote"][0], int(data["remote"][1])),
            created=now,
            algorithms=a,
            dh_group=int(data["dh_group"]),
            prf=responder.prf_for(a.prf),
            nonce_i=bytes.fromhex(data["nonce_i"]),
            nonce_r=bytes.fromhex(data["nonce_r"]),
            # only IKE_AUTH signs these; an established SA never needs them
            init_request=b"",
            init_response=b"",
            keys=keys,
            cipher_in=new_sk_cipher(a.encr, a.integ, keys.sk_ei, keys.sk_ai, rng),
            cipher_out=new_sk_cipher(a.encr, a.integ, keys.sk_er, keys.sk_ar, rng),
            peer_behind_nat=bool(data["nat"][0]),
            self_behind_nat=bool(data["nat"][1]),
            state=IkeState.ESTABLISHED,
            established_at=now,
            expected_request_id=int(data["expected_request_id"]),
            last_response=[bytes.fromhex(d) for d in data["last_response"]] or None,
            last_request_digest=bytes.fromhex(data["last_request_digest"]) or None,
            next_our_request_id=int(data["next_our_request_id"]),
            profile=profile,
            identity=data["identity"],
            inside_address=(
                None
                if data["inside_address"] is None
                else ipaddress.IPv4Address(data["inside_address"])
            ),
            session=data["session"],
        )
        # lifetimes restart at the resume (the stored deadlines were on
        # another process's clock)
        ike.rekey_at = responder.rekey_deadline(profile.ike_rekey_time, now)
        for spi_in, spi_out, key_length, local_ts, remote_ts, group, sel in data[
            "children"
        ]:
            ike.children[int(spi_in)] = ChildSA(
                int(spi_in),
                int(spi_out),
                int(key_length),
                local_ts,
                remote_ts,
                pfs_group=int(group),
                rekey_at=responder.rekey_deadline(profile.child_rekey_time, now),
                selectors=(
                    [_pull_ts(t) for t in sel[0]],
                    [_pull_ts(t) for t in sel[1]],
                ),
            )
    except (KeyError, TypeError, ValueError, AssertionError) as exc:
        raise UntrustedState(f"Malformed session record: {exc}") from None
    return ike


def _ts(t: TrafficSelector) -> list[Any]:
    return [t.ts_type, t.ip_protocol, t.start_port, t.end_port,
            t.start_address.hex(), t.end_address.hex()]  # fmt: skip


def _pull_ts(v: list[Any]) -> TrafficSelector:
    return TrafficSelector(
        int(v[0]), int(v[1]), int(v[2]), int(v[3]), bytes.fromhex(v[4]),
        bytes.fromhex(v[5]),
    )  # fmt: skip


def dumps(record: dict[str, Any]) -> bytes:
    """Encode a session record."""
    return json.dumps(record, sort_keys=True).encode()


def loads(body: bytes) -> dict[str, Any]:
    """Decode a session record; UntrustedState when it is not one."""
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise UntrustedState(f"Unreadable session record: {exc}") from None
    if not isinstance(data, dict):
        raise UntrustedState("Session record is not an object")
    return data
