"""How many CHILD SAs (flows) one session may hold.

Theory of operation: a client may ask for more CHILD SAs after IKE_AUTH with
CREATE_CHILD_SA (RFC 7296 1.3.1), one per traffic selector pair. Before the
responder negotiates such a new SA (a rekey is not a new flow), it asks
`check_new_child`, which refuses with NO_ADDITIONAL_SAS when:

- the session's limit is reached (authorization's `ipsec_flow_limit`, else the
  profile's `flow_limit`; 0 = no limit), counting the SAs
  not yet replaced by a rekey; or
- an any-to-any pair is involved: a CHILD SA already covers all traffic, or
  the new one would. For a remote-access client TSi is always its inside
  address, so "any-to-any" means a local side of 0.0.0.0/0, any protocol and
  port; a second SA could only carry the same traffic.
"""

from __future__ import annotations

from control.ike import trafficsel
from control.ike.messages import NotifyType, ProtocolError, TrafficSelector
from control.ike.sa import IkeSA

MAX_FLOW_LIMIT = 50000
ANY = "0.0.0.0/0"


def active_children(ike: IkeSA) -> int:
    """Count the CHILD SAs of `ike` that a rekey has not replaced."""
    return sum(1 for c in ike.children.values() if not c.replaced)


def check_new_child(ike: IkeSA, tsr: list[TrafficSelector]) -> None:
    """Raise NO_ADDITIONAL_SAS when `ike` may not get another CHILD SA."""
    assert ike.profile is not None, "only authenticated SAs create CHILD SAs"
    active = [c for c in ike.children.values() if not c.replaced]
    # a per-session limit from authorization (ipsec-flow-limit) beats the profile's
    policy_limit = ike.policy.flow_limit if ike.policy is not None else None
    limit = ike.profile.flow_limit if policy_limit is None else policy_limit

    # RFC 7296 1.3: a responder unwilling to add SAs says NO_ADDITIONAL_SAS
    if limit and len(active) >= limit:
        raise ProtocolError(NotifyType.NO_ADDITIONAL_SAS, f"flow limit {limit} reached")
    if any(ANY in c.local_ts for c in active):
        raise ProtocolError(NotifyType.NO_ADDITIONAL_SAS, "an SA covers all traffic")
    if active:
        narrowed = trafficsel.narrow_tsr(tsr, ike.profile.local_ts)
        if ANY in [trafficsel.ts_to_string(t) for t in narrowed]:
            raise ProtocolError(
                NotifyType.NO_ADDITIONAL_SAS, "any-to-any pair besides other SAs"
            )
