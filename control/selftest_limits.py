"""Self-test cases for denial-of-service limits and proposal choice (issue 6).

Theory of operation: like `control.selftest_ike`, each case is a function of
a running :class:`control.selftest.HeadendLab` and is registered through
`LIMIT_CASES` (merged into ``IKE_CASES``). The cookie case runs a bounded
flood of spoofed IKE_SA_INIT requests (`control.lab.flood`, a few thousand
packets over a few seconds, forged sources in the client's own /24 pinned to
an unused MAC at the hub) from the client namespace; while it runs, a real
strongSwan client must get through the COOKIE round trip (RFC 7296 2.6),
come up and carry checked traffic, and the headend's counters must show that
the half-open SAs stayed at the configured threshold. The
invalid-ke-retry case makes strongSwan open with a key exchange in a group
the headend does not take, so it must retry with the group named in
INVALID_KE_PAYLOAD. The windows-proposals case offers only the Windows
client's default IKE proposal to a profile that enables it.
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from control.selftest import HeadendLab

__all__ = ["LIMIT_CASES"]

TRANSFER = 4 * 1024 * 1024
COOKIE_THRESHOLD = 10
FLOOD_PACKETS = 2000
FLOOD_SECONDS = 8.0
# forged sources: 198.18.1.192/26 inside the first client's /24, nobody's
FORGED_NET = "198.18.1.192/26"
FORGED_FIRST = 193
FORGED_HOSTS = 62


def _counters(lab: HeadendLab) -> dict[str, int]:
    return dict(lab.show("counters")["ike"])


def _case_cookie_flood(lab: HeadendLab) -> tuple[dict[str, Any], list[str]]:
    from control.selftest import check_traffic

    assert lab.topo is not None and lab.procs is not None
    topo = lab.topo
    link = topo.client_link(1)
    argv = [
        sys.executable,
        "-m",
        "control.lab.flood",
        "--target",
        topo.hub_outer_ip,
        "--source-net",
        FORGED_NET,
        "--count",
        str(FLOOD_PACKETS),
        "--seconds",
        str(FLOOD_SECONDS),
    ]
    # the hub answers forged sources with cookies: pin them to a MAC nobody
    # holds, so no ARP storm for them muddies the capture
    lines = [
        f"neigh replace {FORGED_NET.rsplit('.', 1)[0]}.{n} lladdr "
        f"02:00:00:00:00:01 dev {link.hub_if} nud permanent"
        for n in range(FORGED_FIRST, FORGED_FIRST + FORGED_HOSTS)
    ]
    topo.run(topo.hub, ["ip", "-batch", "-"], input="\n".join(lines) + "\n")
    flood = lab.procs.start("flood", argv, ns=link.ns)
    detail: dict[str, Any] = {}
    failures: list[str] = []

    # wait until the flood has pushed the headend into demanding cookies
    deadline = time.monotonic() + FLOOD_SECONDS
    while time.monotonic() < deadline and not _counters(lab).get("cookie_sent"):
        time.sleep(0.1)
    before = _counters(lab).get("cookie_sent", 0)
    detail["cookies_before_client"] = before
    if not before:
        failures.append("the flood did not make the headend send cookies")

    # a legitimate client connects during the flood
    client = lab.client()
    up = client.initiate()
    detail["flood_running_after_connect"] = flood.alive()
    if not flood.alive():
        failures.append("the flood ended before the client was up: no proof")
    lab.procs.wait(flood, timeout=FLOOD_SECONDS + 10)
    detail["flood"] = flood.stdout_text().strip()
    after = _counters(lab)
    detail["ike_counters"] = {
        k: after.get(k, 0)
        for k in ("cookie_sent", "ike_sa_init", "ike_sa_up", "drop_init_source_limit")
    }
    if not up:
        detail["client_log"] = str(client.log_path)
        return detail, [*failures, "client did not come up during the flood"]

    # the client itself went through a COOKIE round trip (its own log says so)
    log = client.log_path.read_text(errors="replace")
    detail["client_got_cookie"] = "received COOKIE notify" in log
    if not detail["client_got_cookie"]:
        failures.append("the client was not asked for a cookie")
    # half-open SAs stayed at the threshold: the flood's plus the client's
    if after.get("ike_sa_init", 0) > COOKIE_THRESHOLD + 1:
        failures.append(
            f"{after.get('ike_sa_init')} half-open SAs made, "
            f"threshold {COOKIE_THRESHOLD}"
        )
    traffic, more = check_traffic(lab, client, TRANSFER)
    detail.update(traffic)
    return detail, failures + more


def _case_invalid_ke_retry(lab: HeadendLab) -> tuple[dict[str, Any], list[str]]:
    from control.selftest import check_traffic

    # strongSwan sends its KE in the first group it lists: MODP-3072, which
    # the headend does not take; it must retry with ECP-256
    client = lab.client(ike="aes128gcm16-prfsha256-modp3072-ecp256")
    if not client.initiate():
        return {"client_log": str(client.log_path)}, ["tunnel did not come up"]
    detail: dict[str, Any] = {}
    failures: list[str] = []
    counters = _counters(lab)
    detail["invalid_ke_sent"] = counters.get("init_refused_INVALID_KE_PAYLOAD", 0)
    if not detail["invalid_ke_sent"]:
        failures.append("headend sent no INVALID_KE_PAYLOAD")
    ike: dict[str, Any] = next(iter(client.list_sas().values()), {})
    detail["client_dh_group"] = ike.get("dh-group")
    if ike.get("dh-group") != "ECP_256":
        failures.append(f"client IKE SA is not on ECP-256: {ike.get('dh-group')}")
    traffic, more = check_traffic(lab, client, TRANSFER)
    detail.update(traffic)
    return detail, failures + more


def _case_windows_proposals(lab: HeadendLab) -> tuple[dict[str, Any], list[str]]:
    from control.selftest import check_traffic

    # the Windows built-in client's default IKE offer: AES-CBC-256, SHA1, group 2
    client = lab.client(ike="aes256-sha1-modp1024")
    if not client.initiate():
        return {"client_log": str(client.log_path)}, ["tunnel did not come up"]
    ike: dict[str, Any] = next(iter(client.list_sas().values()), {})
    detail: dict[str, Any] = {
        k: ike.get(k) for k in ("encr-alg", "encr-keysize", "integ-alg", "dh-group")
    }
    failures = []
    if ike.get("dh-group") != "MODP_1024" or ike.get("encr-alg") != "AES_CBC":
        failures.append(f"client IKE SA is not the Windows proposal: {detail}")
    traffic, more = check_traffic(lab, client, TRANSFER)
    detail.update(traffic)
    return detail, failures + more


LIMIT_CASES: dict[str, tuple[str, Any, dict[str, Any]]] = {
    "cookie-under-flood": (
        "a spoofed IKE_SA_INIT flood makes the headend demand cookies; a real "
        "client still connects: traffic",
        _case_cookie_flood,
        {
            "server_keys": {
                "cookie_threshold": COOKIE_THRESHOLD,
                "half_open_per_source": 5,
            }
        },
    ),
    "windows-proposals": (
        "a profile with windows_proposals takes AES-CBC-256/SHA1/MODP-1024: "
        "traffic",
        _case_windows_proposals,
        {"profile_keys": {"windows_proposals": True}},
    ),
    "invalid-ke-retry": (
        "KE in a group the headend does not take: INVALID_KE_PAYLOAD, retry "
        "with ECP-256: traffic",
        _case_invalid_ke_retry,
        {},
    ),
}
