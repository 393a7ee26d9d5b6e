"""EAP through a real FreeRADIUS with a real strongSwan client (selftest cases).

A small subset of the AAA self-test cases, so the suite stays quick: EAP-
MSCHAPv2 (MSK from the MS-MPPE keys), EAP-MD5 with a wrong password, and
RADIUS failover past a silent first server, and the config-mode cases (a
local policy, dual stack, Cisco Unity/FlexVPN attributes by vendor ID).
`espgate selftest` runs them all.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces"),
]

ESPGATE = str(Path(sys.executable).with_name("espgate"))
LAB = os.environ.get("ESPGATE_LAB_PREFIX", f"egaa{os.getpid() % 100000}")
CASES = [
    "eap-mschapv2",
    "eap-wrong-password",
    "radius-failover",
    "config-set-strongswan",
    "local-policy-attributes",
    "dual-stack",
    "unity-attributes",
]


def namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("selftest") / "selftest.json"
    env = dict(os.environ, ESPGATE_LAB_PREFIX=LAB)
    before = namespaces()
    proc = subprocess.run(
        [ESPGATE, "selftest", "--cases", ",".join(CASES), "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    print(proc.stdout, proc.stderr[-4000:])
    results = {r["case"]: r for r in json.loads(out.read_text())}
    # what the run created and did not remove; anybody else's are not ours
    leaked = {ns for ns in namespaces() - before if ns.startswith(LAB + "-")}
    return {"results": results, "leaked": leaked}


@pytest.fixture(scope="module")
def verdicts(run: dict[str, Any]) -> dict[str, Any]:
    return dict(run["results"])


def test_eap_mschapv2_makes_msk_and_carries_traffic(verdicts: dict[str, Any]) -> None:
    r = verdicts["eap-mschapv2"]
    assert r["passed"], r["detail"]["failures"]
    d = r["detail"]
    assert any("MSK established" in line for line in d["client_auth_log"])
    assert d["transfer"]["match"] and d["ping"]["loss_pct"] == 0
    assert d["sessions"][0]["identity"] == "alice@espgate.example"


def test_eap_wrong_password_gets_eap_failure(verdicts: dict[str, Any]) -> None:
    r = verdicts["eap-wrong-password"]
    assert r["passed"], r["detail"]["failures"]
    assert r["detail"]["initiated"] is False


def test_radius_failover_reaches_second_server(verdicts: dict[str, Any]) -> None:
    r = verdicts["radius-failover"]
    assert r["passed"], r["detail"]["failures"]
    assert r["detail"]["radius"]["server_timeouts"] >= 1


def test_aaa_selftest_leaves_no_namespaces(run: dict[str, Any]) -> None:
    assert run["results"] and not run["leaked"]


@pytest.mark.parametrize("case", ["local-policy-attributes", "dual-stack"])
def test_config_mode_case_passes(verdicts: dict[str, Any], case: str) -> None:
    # the client's view (addresses, DNS, routes) and traffic are checked inside
    assert verdicts[case]["passed"], verdicts[case]["detail"]["failures"]


def test_unity_attributes_reach_flexvpn_client_only(verdicts: dict[str, Any]) -> None:
    r = verdicts["unity-attributes"]
    assert r["passed"], r["detail"]["failures"]
    flex, plain = r["detail"]["flexvpn"], r["detail"]["plain"]
    assert "UNITY_BANNER" in flex["received_attributes"]
    assert "UNITY_SPLIT_INCLUDE" in flex["received_attributes"]
    assert not any(a.startswith("UNITY_") for a in plain["received_attributes"])
    assert flex["transfer"]["match"] and plain["transfer"]["match"]


def test_config_set_ignored_by_strongswan(verdicts: dict[str, Any]) -> None:
    # strongSwan 5.9.8 takes CFG_REPLY only; the headend warns and counts
    r = verdicts["config-set-strongswan"]
    assert r["passed"], r["detail"]["failures"]
    assert r["detail"]["ignored"] == ["CFG_SET"]
