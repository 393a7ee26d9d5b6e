"""Server-initiated liveness checks (dead peer detection, RFC 7296 2.4).

Theory of operation: every IKE SA that serves a session remembers when it
last heard from its peer. Hearing means an authenticated IKE message (request
or response), or inbound ESP counted by the dataplane on one of its CHILD SAs
(`ResponderConfig.inbound_packets`, asked only when a check falls due). When
the profile's `dpd_delay` passes in silence, the responder sends an empty
INFORMATIONAL request through its ordinary request queue, so the usual
retransmission with backoff applies. Any answer makes the peer alive again;
when `dpd_timeout` passes after the check went out without one, the IKE SA
and its CHILD SAs are torn down and the session's address freed.

    ALIVE --dpd_delay of silence--> CHECKING --answer--> ALIVE
                                       |
                                       +--dpd_timeout--> torn down

A check is not sent while one of our requests is in flight or queued: that
request's own retransmissions and give-up already probe the peer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from control.ike.sa import IkeSA, IkeState

if TYPE_CHECKING:
    from control.ike.responder import IkeResponder


@dataclass
class Liveness:
    """What the liveness check of one IKE SA knows."""

    last_heard: float
    # sum of inbound ESP packets over the CHILD SAs at the last look
    esp_packets: int = -1
    # when our liveness check went out; None: no check in flight
    check_sent: float | None = None


def _state(ike: IkeSA, now: float) -> Liveness:
    if ike.liveness is None:
        ike.liveness = Liveness(ike.established_at or now)
    state: Liveness = ike.liveness
    return state


def _delays(ike: IkeSA) -> tuple[float, float] | None:
    profile = ike.profile
    if profile is None or not profile.dpd_delay:
        return None
    if ike.state != IkeState.ESTABLISHED or ike.superseded:
        return None
    return profile.dpd_delay, profile.dpd_timeout


def heard(ike: IkeSA, now: float) -> None:
    """Note an authenticated message from the peer of `ike`."""
    state = _state(ike, now)
    state.last_heard = max(state.last_heard, now)


def deadline(ike: IkeSA) -> float | None:
    """Return when the liveness step of `ike` must run next, or None."""
    delays = _delays(ike)
    if delays is None:
        return None
    delay, timeout = delays
    state = _state(ike, ike.established_at or 0.0)
    if state.check_sent is not None:
        return state.check_sent + timeout
    return state.last_heard + delay


def on_timer(responder: IkeResponder, ike: IkeSA, now: float) -> None:
    """Send a due liveness check, or tear `ike` down when one went unanswered."""
    delays = _delays(ike)
    if delays is None:
        return
    delay, timeout = delays
    state = _state(ike, now)

    # a check in flight: the peer had `timeout` seconds to answer it
    if state.check_sent is not None:
        if now >= state.check_sent + timeout:
            responder.counters["liveness_dead_peer"] += 1
            responder.kill(ike, "peer dead: liveness check not answered")
        return
    if now < state.last_heard + delay:
        return

    # inbound ESP since the last look counts as hearing from the peer
    packets = _esp_packets(responder, ike)
    if packets is not None and packets != state.esp_packets:
        first_look = state.esp_packets < 0
        state.esp_packets = packets
        if not first_look or packets > 0:
            state.last_heard = now
            return
    # one of our requests in flight probes the peer already
    if ike.pending is not None or ike.queued:
        state.last_heard = now
        return

    # RFC 7296 2.4: an INFORMATIONAL request with no payloads checks liveness
    def answered(payloads: list[Any], when: float) -> None:
        state.check_sent = None
        state.last_heard = max(state.last_heard, when)

    state.check_sent = now
    responder.counters["liveness_sent"] += 1
    ike.log.debug("liveness check after %.0f s of silence", now - state.last_heard)
    responder.request(ike, [], answered, now)


def _esp_packets(responder: IkeResponder, ike: IkeSA) -> int | None:
    count = responder.config.inbound_packets
    if count is None or not ike.children:
        return None
    try:
        return sum(count(spi) for spi in ike.children)
    except Exception:
        ike.log.exception("inbound packet count failed")
        return None
