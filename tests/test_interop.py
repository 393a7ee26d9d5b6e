"""A real strongSwan client against espgate, through the self-test's cases.

Each case builds its own namespaces, runs ``espgate serve`` and strongSwan's
charon (kernel-libipsec), and checks traffic: ping, a SHA-256-checked TCP
transfer, and a capture of the hub's outer interface that must carry only
IKE and ESP-in-UDP, never the transfer's plaintext.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces"),
]

ESPGATE = str(Path(sys.executable).with_name("espgate"))
# the selftest's namespace prefix; set it to run beside another selftest
# unique to this test run, so a concurrent self-test elsewhere never collides
LAB = os.environ.get("ESPGATE_LAB_PREFIX", f"egst{os.getpid() % 100000}")
PREFIX = LAB + "-"


def namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


@pytest.fixture(scope="module")
def verdicts(tmp_path_factory):
    out = tmp_path_factory.mktemp("selftest") / "selftest.json"
    cases = ",".join(
        ["psk-gcm128", "psk-gcm256", "psk-gcm128-openssl", "ikev2-wrong-psk-rejected",
         "psk-two-clients", "rsa-cert", "ecdsa-cert", "rsa-cert-chain",
         "asymmetric-cert-psk", "unknown-identity-rejected", "profile-match-identity",
         "profile-match-certmap", "child-rekey-pfs", "ike-rekey",
         "rekey-under-traffic-no-loss", "headend-child-rekey", "delete-by-server",
         "initial-contact", "fragmentation-small-mtu", "multi-sa",
         "child-lifetime-bytes", "flow-limit", "liveness-dead-peer",
         "delete-by-client", "cookie-under-flood", "invalid-ke-retry",
         "windows-proposals", "child-rekey"]
    )
    env = dict(os.environ, ESPGATE_LAB_PREFIX=LAB)
    before = namespaces()
    proc = subprocess.run([ESPGATE, "selftest", "--cases", cases, "--json", str(out)],
                          capture_output=True, text=True, timeout=900, env=env)
    print(proc.stdout, proc.stderr[-4000:])
    results = {r["case"]: r for r in json.loads(out.read_text())}
    # what the run created and did not remove; anybody else's are not ours
    return results, {ns for ns in namespaces() - before if ns.startswith(PREFIX)}


@pytest.mark.parametrize(("case", "bits"), [("psk-gcm128", 128), ("psk-gcm256", 256),
                                            ("psk-gcm128-openssl", 128)])
def test_tunnel_carries_checked_traffic(verdicts, case, bits):
    results, _ = verdicts
    r = results[case]
    assert r["passed"], r["detail"]["failures"]
    d = r["detail"]
    assert d["ping"]["loss_pct"] == 0 and d["ping"]["received"] == d["ping"]["sent"]
    assert d["transfer"]["match"] and d["transfer"]["bytes"] == 32 * 1024 * 1024
    assert d["transfer"]["sha256_sent"] == d["transfer"]["sha256_received"]
    assert not d["capture"]["plaintext_marker_seen"]
    assert d["capture"]["by_proto"]["udp4500"] > 1000
    assert d["inside_address"].startswith("198.18.128.")
    assert d["session"]["inside"] == d["inside_address"]
    assert str(d["client_sa"]["encr_keysize"]) == str(bits)


def test_wrong_psk_rejected(verdicts):
    results, _ = verdicts
    r = results["ikev2-wrong-psk-rejected"]
    assert r["passed"], r["detail"]["failures"]
    assert r["detail"]["initiated"] is False


@pytest.mark.parametrize("case", ["delete-by-server", "initial-contact"])
def test_session_case_passes(verdicts, case):
    results, _ = verdicts
    r = results[case]
    assert r["passed"], r["detail"]["failures"]
    # the session's traffic before and after the delete or restart
    before, after = ("before", "after") if case == "delete-by-server" else (
        "first", "second")
    for label in (before, after):
        assert r["detail"][label]["transfer"]["match"]


def test_multi_sa_each_child_carries_both_directions(verdicts):
    results, _ = verdicts
    r = results["multi-sa"]
    assert r["passed"], r["detail"]["failures"]
    assert r["detail"]["traffic"]["transfer"]["match"]
    children = r["detail"]["headend_children"]
    assert len(children) == 2
    assert all(c["packets_in"] > 0 and c["packets_out"] > 0 for c in children)


def test_child_lifetime_bytes_rekeys_and_traffic_goes_on(verdicts):
    results, _ = verdicts
    r = results["child-lifetime-bytes"]
    assert r["passed"], r["detail"]["failures"]
    assert r["detail"]["child_bytes_rekeys"] >= 1
    assert r["detail"]["after"]["transfer"]["match"]


def test_selftest_leaves_no_namespaces(verdicts):
    results, leaked = verdicts
    assert results and not leaked


@pytest.mark.parametrize(
    "case", ["rsa-cert", "ecdsa-cert", "rsa-cert-chain", "asymmetric-cert-psk"]
)
def test_certificate_auth_carries_checked_traffic(verdicts, case):
    results, _ = verdicts
    r = results[case]
    assert r["passed"], r["detail"]["failures"]
    d = r["detail"]
    assert d["transfer"]["match"] and d["ping"]["loss_pct"] == 0
    assert any("vpn.espgate.example" in line for line in d["client_auth_log"])


def test_two_clients_each_carry_traffic(verdicts):
    results, _ = verdicts
    r = results["psk-two-clients"]
    assert r["passed"], r["detail"]["failures"]
    addrs = r["detail"]["inside_addresses"]
    assert len(set(addrs)) == 2
    for n in (1, 2):
        assert r["detail"][f"client{n}"]["transfer"]["match"]


def test_unknown_identity_rejected(verdicts):
    results, _ = verdicts
    r = results["unknown-identity-rejected"]
    assert r["passed"], r["detail"]["failures"]
    assert r["detail"]["initiated"] is False


@pytest.mark.parametrize(
    ("case", "labels"),
    [("profile-match-identity", ["android", "ops", "branch"]),
     ("profile-match-certmap", ["client-ca", "server-ca"])],
)
def test_profile_selection_carries_checked_traffic(verdicts, case, labels):
    results, _ = verdicts
    r = results[case]
    assert r["passed"], r["detail"]["failures"]
    for label in labels:
        d = r["detail"][label]
        assert d["transfer"]["match"] and d["ping"]["loss_pct"] == 0
        assert d["inside_address"].startswith("198.18.128.")


@pytest.mark.parametrize("case", ["child-rekey-pfs", "ike-rekey"])
def test_rekey_leaves_one_working_child_sa(verdicts, case):
    results, _ = verdicts
    r = results[case]
    assert r["passed"], r["detail"]["failures"]
    d = r["detail"]
    assert d["transfer"]["match"] and d["ping"]["loss_pct"] == 0
    assert len(d["headend_children"]) == 1
    for step in d["child_spis"]:
        assert step["before"] != step["after"]


def test_rekey_under_traffic_loses_nothing(verdicts):
    results, _ = verdicts
    r = results["rekey-under-traffic-no-loss"]
    assert r["passed"], r["detail"]["failures"]
    ping = r["detail"]["ping_during_rekeys"]
    assert ping["received"] == ping["sent"] >= 250


def test_headend_rekeys_child_sa_with_pfs_retry(verdicts):
    results, _ = verdicts
    r = results["headend-child-rekey"]
    assert r["passed"], r["detail"]["failures"]
    d = r["detail"]
    assert d["child_spis_before"] != d["child_spis_after"]
    assert d["ike_counters"]["child_rekey_refused_NO_PROPOSAL_CHOSEN"] == 1
    assert d["transfer"]["match"] and len(d["headend_children"]) == 1


def test_fragmentation_both_ways_over_small_mtu(verdicts):
    results, _ = verdicts
    r = results["fragmentation-small-mtu"]
    assert r["passed"], r["detail"]["failures"]
    d = r["detail"]
    assert d["client_split_into"] and d["client_reassembled"]
    assert d["ike_counters"]["reassembled"] >= 1 and d["ike_counters"]["fragmented"]
    assert d["handshake_capture"]["by_proto"].get("other", 0) == 0
    assert d["transfer"]["match"]


@pytest.mark.parametrize(
    "case",
    ["flow-limit", "cookie-under-flood", "invalid-ke-retry", "windows-proposals",
     "child-rekey"],
)
def test_ike_case_carries_checked_traffic(verdicts, case):
    results, _ = verdicts
    r = results[case]
    assert r["passed"], r["detail"]["failures"]
    assert r["detail"]["traffic" if case == "flow-limit" else "transfer"]


def test_cookie_flood_client_connects_after_cookie(verdicts):
    results, _ = verdicts
    d = results["cookie-under-flood"]["detail"]
    assert d["client_got_cookie"] and d["transfer"]["match"]
    assert d["ike_counters"]["cookie_sent"] > 0


def test_dead_peer_torn_down_and_address_freed(verdicts):
    results, _ = verdicts
    r = results["liveness-dead-peer"]
    assert r["passed"], r["detail"]["failures"]
    assert r["detail"]["liveness_dead_peer"]


def test_delete_by_client_frees_session(verdicts):
    results, _ = verdicts
    r = results["delete-by-client"]
    assert r["passed"], r["detail"]["failures"]
    for label in ("before", "after"):
        assert r["detail"][label]["transfer"]["match"]
