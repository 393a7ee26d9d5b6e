"""Self-test cases for IKE fragmentation over a small MTU and lifetimes (issue 6).

Theory of operation: like `control.selftest_limits`, each case is a function
of a running :class:`control.selftest.HeadendLab`, registered through
`FRAG_CASES` (merged into ``IKE_CASES``). The lab uses RSA certificates under
intermediate CAs, so both IKE_AUTH messages carry two certificates (over 2 KB
each way), and the client's outer link gets an MTU of 1280: an unfragmented
IKE_AUTH could only cross as IP fragments. A capture on the hub's side of
that link during the handshake must show IKE only and no IP fragment; the
client's own log must say that it split its request into fragments and
reassembled ours; the headend's counters must agree. The Windows variant
makes strongSwan fragment at 576 bytes, as the Windows client does, and
requires our response to come back in fragments as small.

ESP needs room under the small MTU too: the client's libipsec TUN (ipsec0)
is set to 1200 bytes, so TCP's MSS keeps ESP-in-UDP below 1280.

The session-lifetime case gives the profile the shortest lifetime the
config takes (120 s), checks traffic, then waits for the headend to delete
the session: the client must log our DELETE and hold no SA afterwards.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from control.lab import Capture

if TYPE_CHECKING:
    from control.selftest import HeadendLab

__all__ = ["FRAG_CASES"]

LINK_MTU = 1280
TUNNEL_MTU = 1200
WINDOWS_FRAGMENT = 576
TRANSFER = 4 * 1024 * 1024
SPLIT = re.compile(r"splitting IKE message .*?into (\d+) fragments")
RECEIVED = re.compile(r"received fragment #(\d+) of (\d+)")
REASSEMBLED = "reassembled fragmented IKE message"


def _set_link_mtu(lab: HeadendLab, mtu: int) -> None:
    assert lab.topo is not None
    link = lab.topo.client_link(1)
    lab.topo.run(link.ns, ["ip", "link", "set", "dev", link.outer_if, "mtu", str(mtu)])
    lab.topo.run(lab.topo.hub, ["ip", "link", "set", "dev", link.hub_if, "mtu",
                                str(mtu)])  # fmt: skip


def _case_fragmentation(
    client_fragment: int | None,
) -> Callable[[HeadendLab], tuple[dict[str, Any], list[str]]]:
    def case(lab: HeadendLab) -> tuple[dict[str, Any], list[str]]:
        from control.selftest import _cert_client, check_traffic

        assert lab.topo is not None
        topo = lab.topo
        _set_link_mtu(lab, LINK_MTU)
        charon = {"fragment_size": client_fragment} if client_fragment else None
        client = _cert_client(lab, charon_conf=charon)
        link = client.link

        # the handshake, captured on the hub's side of the small-MTU link
        cap = Capture(topo.hub, link.hub_if, lab.workdir / "handshake.pcap")
        with cap:
            up = client.initiate()
        detail: dict[str, Any] = {"handshake_capture": cap.summary()}
        if not up:
            detail["client_log"] = str(client.log_path)
            return detail, ["tunnel did not come up"]
        failures: list[str] = []
        by = detail["handshake_capture"]["by_proto"]
        if by.get("other", 0):
            failures.append(f"IP fragments or other packets in the handshake: {by}")

        # the client split its IKE_AUTH and reassembled ours (its log says so)
        log = client.log_path.read_text(errors="replace")
        splits = [int(n) for n in SPLIT.findall(log)]
        received = [(int(a), int(b)) for a, b in RECEIVED.findall(log)]
        detail["client_split_into"] = splits
        detail["client_received_fragments"] = received
        detail["client_reassembled"] = REASSEMBLED in log
        if not splits:
            failures.append("the client did not fragment its IKE_AUTH request")
        if not detail["client_reassembled"]:
            failures.append("the client did not reassemble a fragmented response")
        totals = {total for _, total in received}
        if client_fragment and (not totals or max(totals) < 5):
            # ~2.3 KB of response in 576-byte datagrams is at least 5 fragments
            failures.append(f"our response was not in small fragments: {totals}")
        counters = dict(lab.show("counters")["ike"])
        detail["ike_counters"] = {
            k: counters.get(k, 0)
            for k in ("fragment_rx", "reassembled", "fragmented", "fragment_tx")
        }
        if not counters.get("reassembled") or not counters.get("fragmented"):
            failures.append(f"headend counters disagree: {detail['ike_counters']}")

        # ESP must fit the small MTU as well: shrink the client's tunnel MTU
        topo.run(link.ns, ["ip", "link", "set", "dev", "ipsec0", "mtu",
                           str(TUNNEL_MTU)])  # fmt: skip
        traffic, more = check_traffic(lab, client, TRANSFER)
        detail.update(traffic)
        return detail, failures + more

    return case


SESSION_LIFETIME = 120


def _case_session_lifetime(lab: HeadendLab) -> tuple[dict[str, Any], list[str]]:
    from control.selftest import check_traffic

    client = lab.client()
    if not client.initiate():
        return {"client_log": str(client.log_path)}, ["tunnel did not come up"]
    up_at = time.monotonic()
    detail, failures = check_traffic(lab, client, TRANSFER)

    # the headend deletes the session once its lifetime is over
    deadline = up_at + SESSION_LIFETIME + 30
    deleted = False
    while time.monotonic() < deadline and not deleted:
        time.sleep(1.0)
        log = client.log_path.read_text(errors="replace")
        deleted = "received DELETE for IKE_SA" in log
    detail["seconds_to_delete"] = round(time.monotonic() - up_at, 1)
    if not deleted:
        failures.append("the client saw no DELETE of its IKE SA")
    elif detail["seconds_to_delete"] < SESSION_LIFETIME - 5:
        failures.append(f"deleted early, after {detail['seconds_to_delete']} s")
    time.sleep(1.0)
    detail["client_sas_after"] = client.list_sas()
    detail["headend_sessions_after"] = lab.show()["sessions"]
    counters = dict(lab.show("counters")["ike"])
    detail["session_expired"] = counters.get("session_expired", 0)
    if detail["client_sas_after"] or detail["headend_sessions_after"]:
        failures.append("an SA outlived the session lifetime")
    if detail["session_expired"] != 1:
        failures.append(f"headend counted {detail['session_expired']} expiries")
    return detail, failures


FRAG_CASES: dict[str, tuple[str, Any, dict[str, Any]]] = {
    "fragmentation-small-mtu": (
        "RSA chains both ways over a 1280-byte MTU: IKE_AUTH fragmented both "
        "ways (RFC 7383), no IP fragments: traffic",
        _case_fragmentation(None),
        {"pki": {"kind": "rsa", "chain": True}, "auth": ("rsa-sig", ["rsa-sig"])},
    ),
    "fragmentation-windows-size": (
        "the client fragments at 576 bytes like Windows; our response comes "
        "back in fragments as small: traffic",
        _case_fragmentation(WINDOWS_FRAGMENT),
        {"pki": {"kind": "rsa", "chain": True}, "auth": ("rsa-sig", ["rsa-sig"])},
    ),
}
FRAG_CASES["session-lifetime"] = (
    f"a profile's session_lifetime of {SESSION_LIFETIME} s: traffic, then the "
    "headend deletes the session on time",
    _case_session_lifetime,
    {"profile_keys": {"session_lifetime": SESSION_LIFETIME}},
)
