"""Self-test cases for IKEv2 features beyond the basic tunnel (issue 6).

Theory of operation: each case here is a function of a running
:class:`control.selftest.HeadendLab`, like the cases in `control.selftest`,
and is registered in its ``CASES`` through `IKE_CASES`. Profile cases write
more pools and profiles into the headend's configuration (``extra_config``)
and prove which profile the headend chose by two things a client can see: its
PSK or certificate map only fits that profile, and its inside address comes
from that profile's pool. Every pool lies inside the lab's routed
198.18.128.0/24. Each client then carries checked traffic.

Rekey cases drive strongSwan with `swanctl --rekey` (deterministic, no
waiting for lifetimes), wait until the client holds only the new SA, and
then require traffic on it and that the headend holds exactly that SA; the
no-loss case keeps a 50/s ping running across the rekeys.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from typing import TYPE_CHECKING, Any

from cryptography import x509

from control.lab.pki import cert_pem, issue, key_pem

if TYPE_CHECKING:
    from control.lab import StrongSwanClient
    from control.selftest import HeadendLab

__all__ = ["IKE_CASES"]

BASE_POOL = "198.18.128.10-198.18.128.59"
TRANSFER = 4 * 1024 * 1024


def _pool(name: str, first: int, last: int) -> str:
    return f'[pools.{name}]\nrange = "198.18.128.{first}-198.18.128.{last}"\n'


def _in_range(address: str | None, first: int, last: int) -> bool:
    if address is None:
        return False
    low = ipaddress.IPv4Address(f"198.18.128.{first}")
    high = ipaddress.IPv4Address(f"198.18.128.{last}")
    return low <= ipaddress.IPv4Address(address) <= high


def _bring_up(
    lab: HeadendLab,
    client: StrongSwanClient,
    label: str,
    pool: tuple[int, int],
    detail: dict[str, Any],
) -> list[str]:
    """Initiate, check the inside address's pool, carry checked traffic."""
    from control.selftest import check_traffic

    if not client.initiate():
        detail[label] = {"client_log": str(client.log_path)}
        return [f"{label}: tunnel did not come up"]
    vip = client.virtual_ip()
    failures = []
    if not _in_range(vip, *pool):
        failures.append(f"{label}: inside address {vip} not from pool {pool}")
    traffic, more = check_traffic(lab, client, TRANSFER)
    detail[label] = {"inside_address": vip, **traffic}
    return failures + [f"{label}: {f}" for f in more]


# -- profile-match-identity --------------------------------------------------------

KEY_ID = "a1b2c3d4e5f60718"
IDENTITY_PROFILES = (
    # name, pattern, strongSwan identity, PSK, pool
    ("android", f"keyid:{KEY_ID}", f"@#{KEY_ID}", "android-keyid-psk-0123456789",
     (60, 109)),
    ("ops", "dn:O=espgate lab,OU=ops", "C=CH, O=espgate lab, OU=ops, CN=carol",
     "ops-dn-psk-0123456789abcdef", (110, 159)),
    ("branch", "198.18.3.0/24", "198.18.3.2", "branch-address-psk-0123456789",
     (160, 209)),
)  # fmt: skip


def _identity_config(lab: HeadendLab) -> str:
    assert lab.topo is not None
    out = []
    for name, pattern, _, psk, (first, last) in IDENTITY_PROFILES:
        out.append(_pool(name, first, last))
        out.append(
            f'[[profiles]]\nname = "{name}"\nmatch_identity = ["{pattern}"]\n'
            f'local_identity = "fqdn:{lab.server_id}"\npsk = "{psk}"\n'
            f'pool = "{name}"\nlocal_ts = ["{lab.topo.inside_net}"]\n'
        )
    return "\n".join(out)


def _case_match_identity(lab: HeadendLab) -> tuple[dict[str, Any], list[str]]:
    detail: dict[str, Any] = {}
    failures: list[str] = []
    # each client's identity type fits exactly one profile, whose PSK it has
    for n, (name, _, identity, psk, pool) in enumerate(IDENTITY_PROFILES, start=1):
        client = lab.client(f"c{n}", client=n, local_id=identity, psk=psk.encode())
        failures += _bring_up(lab, client, name, pool, detail)
    sessions = lab.show()["sessions"]
    detail["headend_identities"] = sorted(s["identity"] for s in sessions)
    if len(sessions) != len(IDENTITY_PROFILES):
        failures.append(f"expected {len(IDENTITY_PROFILES)} sessions: {sessions}")
    return detail, failures


# -- profile-match-certmap ---------------------------------------------------------

SERVER_CA_POOL = (60, 109)
CLIENT_CA_POOL = (110, 159)


def _certmap_config(lab: HeadendLab) -> str:
    assert lab.topo is not None and lab.pki is not None
    pki = lab.pki
    common = (
        f'local_identity = "fqdn:{lab.server_id}"\nlocal_auth = "rsa-sig"\n'
        f'remote_auth = ["rsa-sig"]\ncertificate = "{pki.server_cert_path}"\n'
        f'private_key = "{pki.server_key_path}"\nca = ["{pki.ca_path}"]\n'
        f'local_ts = ["{lab.topo.inside_net}"]\n'
    )
    return "\n".join(
        [
            _pool("serverca", *SERVER_CA_POOL),
            _pool("clientca", *CLIENT_CA_POOL),
            # listed first: a headend that ignored the map would pick it
            '[[profiles]]\nname = "server-ca-users"\nmatch_identity = ["*"]\n'
            'match_certificate = [{ field = "issuer.cn", contains = "server CA" }]\n'
            f'pool = "serverca"\n{common}',
            '[[profiles]]\nname = "client-ca-users"\n'
            'match_identity = ["*@espgate.example"]\n'
            'match_certificate = [{ field = "issuer.cn", equals = '
            '"espgate lab client CA" },\n'
            '    { field = "subject", contains = "O=espgate lab" }]\n'
            f'pool = "clientca"\n{common}',
        ]
    )


def _cert_files(leaf: Any, issuer: Any, root: Any) -> dict[str, bytes]:
    return {
        "x509/client.pem": cert_pem(leaf.cert),
        "private/client.key": key_pem(leaf.key),
        "x509ca/ca.pem": cert_pem(root.cert),
        "x509/intermediate.pem": cert_pem(issuer.cert),
    }


def _case_match_certmap(lab: HeadendLab) -> tuple[dict[str, Any], list[str]]:
    pki = lab.pki
    assert pki is not None and pki.intermediate and pki.client_intermediate
    # a second client whose certificate comes from the *server* CA
    other_id = "client2@espgate.example"
    other = issue(other_id, "rsa", pki.intermediate, sans=[x509.RFC822Name(other_id)])
    conf = {"local": {"auth": "pubkey", "certs": "client.pem"},
            "remote": {"auth": "pubkey"}}  # fmt: skip
    plan = [
        ("client-ca", "client1@espgate.example",
         _cert_files(pki.client, pki.client_intermediate, pki.root), CLIENT_CA_POOL),
        ("server-ca", other_id, _cert_files(other, pki.intermediate, pki.root),
         SERVER_CA_POOL),
    ]  # fmt: skip
    detail: dict[str, Any] = {}
    failures: list[str] = []
    for n, (label, identity, files, pool) in enumerate(plan, start=1):
        client = lab.client(
            f"c{n}", client=n, local_id=identity, files=files, extra_conf=conf
        )
        failures += _bring_up(lab, client, label, pool, detail)
    return detail, failures


# -- rekeying ----------------------------------------------------------------------


def _wait(predicate: Any, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def _ike_spis(client: StrongSwanClient) -> tuple[str, str] | None:
    sas = client.list_sas()
    if not sas:
        return None
    ike = next(iter(sas.values()))
    return ike.get("initiator-spi"), ike.get("responder-spi")


def _child_spis(client: StrongSwanClient) -> list[str]:
    sas = client.list_sas()
    ike: dict[str, Any] = next(iter(sas.values()), {}) if sas else {}
    children = ike.get("child-sas") or {}
    return [c.get("spi-in") for c in children.values() if c.get("state") == "INSTALLED"]


def _rekey_child(client: StrongSwanClient, detail: dict[str, Any]) -> list[str]:
    """Rekey the CHILD SA from the client; wait until only the new one is left."""
    old = _child_spis(client)
    client.swanctl("--rekey", "--child", client.conn_name)
    done = _wait(lambda: (spis := _child_spis(client)) and len(spis) == 1
                 and spis != old)  # fmt: skip
    after = _child_spis(client)
    detail.setdefault("child_spis", []).append({"before": old, "after": after})
    return [] if done else [f"CHILD SA not rekeyed: {old} -> {_child_spis(client)}"]


def _headend_children(lab: HeadendLab) -> list[dict[str, Any]]:
    sessions = lab.show()["sessions"]
    return sessions[0]["children"] if len(sessions) == 1 else []


def _after_rekey_checks(
    lab: HeadendLab, client: StrongSwanClient, detail: dict[str, Any]
) -> list[str]:
    """Traffic over the new SA, and the headend holds exactly that SA."""
    from control.selftest import check_traffic

    traffic, failures = check_traffic(lab, client, TRANSFER)
    detail.update(traffic)
    children = _headend_children(lab)
    detail["headend_children"] = children
    client_spis = _child_spis(client)
    # the client's inbound SPI is the headend's outbound one
    if len(children) != 1 or [c["spi_out"] for c in children] != client_spis:
        failures.append(f"headend children {children} vs client {client_spis}")
    elif children[0]["packets_in"] == 0 or children[0]["packets_out"] == 0:
        failures.append("no traffic counted on the new CHILD SA")
    return failures


def _case_child_rekey(pfs: bool) -> Any:
    def case(lab: HeadendLab) -> tuple[dict[str, Any], list[str]]:
        esp = "aes128gcm16-ecp256" if pfs else "aes128gcm16"
        client = lab.client(esp=esp)
        if not client.initiate():
            return {"client_log": str(client.log_path)}, ["tunnel did not come up"]
        detail: dict[str, Any] = {}
        failures = _rekey_child(client, detail)
        failures += _rekey_child(client, detail)
        # strongSwan logs the request layout: KE only with PFS
        lines = [line.split("] ", 1)[-1] for line in
                 client.log_path.read_text(errors="replace").splitlines()
                 if "generating CREATE_CHILD_SA request" in line]  # fmt: skip
        detail["client_requests"] = lines
        with_ke = [line for line in lines if " KE " in line]
        if (
            len(lines) < 2
            or (len(with_ke) == len(lines)) != pfs
            or (not pfs and with_ke)
        ):
            failures.append(f"rekey requests do not match pfs={pfs}: {lines}")
        return detail, failures + _after_rekey_checks(lab, client, detail)

    return case


def _case_ike_rekey(lab: HeadendLab) -> tuple[dict[str, Any], list[str]]:
    client = lab.client()
    if not client.initiate():
        return {"client_log": str(client.log_path)}, ["tunnel did not come up"]
    detail: dict[str, Any] = {"ike_spis_before": _ike_spis(client)}
    session = lab.show()["sessions"][0]["session"]
    client.swanctl("--rekey", "--ike", client.conn_name)
    changed = _wait(
        lambda: (
            (spis := _ike_spis(client)) is not None
            and spis != detail["ike_spis_before"]
            and len(client.list_sas()) == 1
        )
    )
    detail["ike_spis_after"] = _ike_spis(client)
    failures = [] if changed else ["IKE SA not rekeyed"]
    # the new IKE SA must work: a CHILD rekey over it, then traffic
    failures += _rekey_child(client, detail)
    failures += _after_rekey_checks(lab, client, detail)
    sessions = lab.show()["sessions"]
    if [s["session"] for s in sessions] != [session]:
        failures.append(f"session id changed or duplicated: {sessions}")
    ike = lab.show("counters")["ike"]
    detail["ike_counters"] = ike
    if ike.get("ike_rekeyed") != 1:
        failures.append(f"headend counted {ike.get('ike_rekeyed')} IKE rekeys")
    return detail, failures


def _case_rekey_under_traffic(lab: HeadendLab) -> tuple[dict[str, Any], list[str]]:
    from control.lab import ping

    assert lab.topo is not None
    client = lab.client(esp="aes128gcm16-ecp256")
    if not client.initiate():
        return {"client_log": str(client.log_path)}, ["tunnel did not come up"]
    detail: dict[str, Any] = {}
    failures: list[str] = []
    # a 50/s ping across two CHILD rekeys and one IKE rekey: none may be lost
    result: dict[str, Any] = {}
    target = lab.topo.srv_ip
    pinger = threading.Thread(
        target=lambda: result.update(
            ping(client.link.ns, target, count=300, interval=0.02)
        )
    )
    pinger.start()
    try:
        time.sleep(0.5)
        failures += _rekey_child(client, detail)
        client.swanctl("--rekey", "--ike", client.conn_name)
        time.sleep(0.5)
        failures += _rekey_child(client, detail)
    finally:
        pinger.join()
    detail["ping_during_rekeys"] = result
    if result.get("sent", 0) < 250 or result.get("loss_pct") != 0:
        failures.append(f"ping across rekeys: {result}")
    return detail, failures + _after_rekey_checks(lab, client, detail)


# -- rekeys started by the headend ---------------------------------------------------

HEADEND_REKEY = 8


def _case_headend_child_rekey(lab: HeadendLab) -> tuple[dict[str, Any], list[str]]:
    client = lab.client(esp="aes128gcm16-ecp256")
    if not client.initiate():
        return {"client_log": str(client.log_path)}, ["tunnel did not come up"]
    old = _child_spis(client)
    detail: dict[str, Any] = {"child_spis_before": old}
    # the headend's lifetime runs out first: it rekeys, the client insists on
    # PFS (NO_PROPOSAL_CHOSEN), the headend retries with ECP-256
    done = _wait(
        lambda: (spis := _child_spis(client)) and len(spis) == 1 and spis != old,
        timeout=3 * HEADEND_REKEY,
    )
    detail["child_spis_after"] = _child_spis(client)
    ike = lab.show("counters")["ike"]
    detail["ike_counters"] = {k: v for k, v in ike.items() if "rekey" in k}
    failures = [] if done else ["headend did not rekey the CHILD SA"]
    if not ike.get("child_rekeyed_by_us"):
        failures.append("headend counted no CHILD rekey of its own")
    return detail, failures + _after_rekey_checks(lab, client, detail)


REKEY_BYTES = 1024 * 1024


def _case_child_lifetime_bytes(lab: HeadendLab) -> tuple[dict[str, Any], list[str]]:
    from control.selftest import check_traffic

    client = lab.client()
    if not client.initiate():
        return {"client_log": str(client.log_path)}, ["tunnel did not come up"]
    old = _child_spis(client)
    detail: dict[str, Any] = {"child_spis_before": old}
    # three times the byte limit through the CHILD SA: the headend rekeys it
    traffic, failures = check_traffic(lab, client, 3 * REKEY_BYTES, capture=False)
    detail["before"] = traffic
    done = _wait(
        lambda: (spis := _child_spis(client)) and len(spis) == 1 and spis != old,
        timeout=20,
    )
    detail["child_spis_after"] = _child_spis(client)
    if not done:
        failures.append("headend did not rekey the CHILD SA at its byte limit")
    counters = lab.show("counters")
    detail["child_bytes_rekeys"] = rekeys = counters["daemon"].get(
        "child_bytes_rekeys", 0
    )
    if not rekeys:
        failures.append("headend counted no rekey by bytes")
    # the client answered a CREATE_CHILD_SA request with REKEY_SA: ours
    lines = [line.split("] ", 1)[-1] for line in
             client.log_path.read_text(errors="replace").splitlines()
             if "parsed CREATE_CHILD_SA request" in line]  # fmt: skip
    detail["client_rekey_requests"] = lines
    if not any("REKEY_SA" in line for line in lines):
        failures.append("client log shows no rekey started by the headend")
    # traffic goes on over the new SA, below the limit so it stays the only one
    after, more = check_traffic(lab, client, REKEY_BYTES // 2, capture=False)
    detail["after"] = after
    failures += [f"after: {f}" for f in more]
    children = _headend_children(lab)
    detail["headend_children"] = children
    client_spis = _child_spis(client)
    # the client's inbound SPI is the headend's outbound one
    if len(children) != 1 or [c["spi_out"] for c in children] != client_spis:
        failures.append(f"headend children {children} vs client {client_spis}")
    elif children[0]["packets_in"] == 0 or children[0]["packets_out"] == 0:
        failures.append("no traffic counted on the new CHILD SA")
    return detail, failures


def _case_headend_ike_rekey(lab: HeadendLab) -> tuple[dict[str, Any], list[str]]:
    client = lab.client()
    if not client.initiate():
        return {"client_log": str(client.log_path)}, ["tunnel did not come up"]
    before = _ike_spis(client)
    detail: dict[str, Any] = {"ike_spis_before": before}
    session = lab.show()["sessions"][0]["session"]
    changed = _wait(
        lambda: (
            (spis := _ike_spis(client)) is not None
            and spis != before
            and len(client.list_sas()) == 1
        ),
        timeout=3 * HEADEND_REKEY,
    )
    detail["ike_spis_after"] = _ike_spis(client)
    failures = [] if changed else ["headend did not rekey the IKE SA"]
    # the new IKE SA has the headend as initiator: a client CHILD rekey over it
    failures += _rekey_child(client, detail)
    failures += _after_rekey_checks(lab, client, detail)
    sessions = lab.show()["sessions"]
    if [s["session"] for s in sessions] != [session]:
        failures.append(f"session id changed or duplicated: {sessions}")
    ike = lab.show("counters")["ike"]
    detail["ike_counters"] = {k: v for k, v in ike.items() if "rekey" in k}
    if not ike.get("ike_rekey_started") or not ike.get("ike_rekeyed"):
        failures.append("headend counted no IKE rekey of its own")
    return detail, failures



# -- sessions: several CHILD SAs, deletes, liveness, INITIAL_CONTACT -----------------

DPD_DELAY, DPD_TIMEOUT = 2, 6


def _first_session(lab: HeadendLab) -> dict[str, Any] | None:
    sessions = lab.show()["sessions"]
    return sessions[0] if len(sessions) == 1 else None


def _pool_in_use(lab: HeadendLab) -> int:
    return int(sum(p["in_use"] for p in lab.show("counters")["pools"].values()))


def _gone_checks(lab: HeadendLab, detail: dict[str, Any], what: str) -> list[str]:
    """The headend holds no session and no address any more."""
    gone = _wait(lambda: not lab.show()["sessions"], timeout=20)
    detail[f"pool_in_use_after_{what}"] = in_use = _pool_in_use(lab)
    failures = [] if gone else [f"headend kept the session after {what}"]
    if in_use:
        failures.append(f"{in_use} address(es) still allocated after {what}")
    return failures


def _traffic(lab: HeadendLab, client: StrongSwanClient, label: str,
             detail: dict[str, Any]) -> list[str]:  # fmt: skip
    from control.selftest import check_traffic

    traffic, failures = check_traffic(lab, client, TRANSFER)
    detail[label] = traffic
    return [f"{label}: {f}" for f in failures]


def _up(client: StrongSwanClient) -> tuple[dict[str, Any], list[str]] | None:
    if client.initiate():
        return None
    return {"client_log": str(client.log_path)}, ["tunnel did not come up"]


def _kill_charon(client: StrongSwanClient) -> int:
    """Kill a client's charon at once (SIGKILL by its recorded PID)."""
    assert client.proc is not None
    client.proc.popen.kill()
    client.proc.popen.wait(timeout=10)
    return client.proc.pid


def _two_children(lab: HeadendLab, second: str) -> dict[str, Any]:
    assert lab.topo is not None
    net = lab.topo.inside_net
    return {
        "children": {
            "espgate": {"remote_ts": f"{net}[icmp]"},
            second: {
                "remote_ts": f"{net}[tcp]",
                "esp_proposals": "aes128gcm16",
                "start_action": "none",
            },
        }
    }


def _case_multi_sa(lab: HeadendLab) -> tuple[dict[str, Any], list[str]]:
    # ICMP in one CHILD SA, TCP in another: the ping and the transfer of
    # check_traffic each need their own SA
    client = lab.client(extra_conf=_two_children(lab, "tcp"))
    if (down := _up(client)) is not None:
        return down
    res = client.swanctl("--initiate", "--child", "tcp", "--timeout", "15",
                         timeout=25, check=False)  # fmt: skip
    detail: dict[str, Any] = {}
    failures = [] if res.returncode == 0 else ["second CHILD SA did not come up"]
    failures += _traffic(lab, client, "traffic", detail)
    session = _first_session(lab)
    children = session["children"] if session else []
    detail["headend_children"] = children
    if len(children) != 2:
        failures.append(f"headend holds {len(children)} CHILD SAs, not 2")
    elif any(c["packets_in"] == 0 for c in children):
        failures.append("a CHILD SA carried no inbound traffic")
    elif any(c["packets_out"] == 0 for c in children):
        # the engine picks the outbound SA by the packet's protocol
        failures.append("a CHILD SA carried no outbound traffic")
    return detail, failures


def _case_flow_limit(lab: HeadendLab) -> tuple[dict[str, Any], list[str]]:
    conf = _two_children(lab, "tcp")
    conf["children"]["espgate"]["remote_ts"] = lab.topo.inside_net  # type: ignore[union-attr]
    client = lab.client(extra_conf=conf)
    if (down := _up(client)) is not None:
        return down
    res = client.swanctl("--initiate", "--child", "tcp", "--timeout", "10",
                         timeout=20, check=False)  # fmt: skip
    detail: dict[str, Any] = {"second_child_rc": res.returncode}
    failures = ["second CHILD SA came up beyond flow_limit = 1"] if (
        res.returncode == 0
    ) else []
    if "NO_ADDITIONAL_SAS" not in client.log_path.read_text(errors="replace"):
        failures.append("client did not receive NO_ADDITIONAL_SAS")
    failures += _traffic(lab, client, "traffic", detail)
    session = _first_session(lab)
    if session is None or len(session["children"]) != 1:
        failures.append(f"headend should hold one CHILD SA: {session}")
    return detail, failures


def _case_delete_by_client(lab: HeadendLab) -> tuple[dict[str, Any], list[str]]:
    client = lab.client()
    if (down := _up(client)) is not None:
        return down
    detail: dict[str, Any] = {}
    failures = _traffic(lab, client, "before", detail)
    if not client.terminate():
        failures.append("client's delete was not answered")
    failures += _gone_checks(lab, detail, "client delete")
    # the freed address and state allow a clean new session
    if (down := _up(client)) is not None:
        return detail, failures + down[1]
    return detail, failures + _traffic(lab, client, "after", detail)


def _case_delete_by_server(lab: HeadendLab) -> tuple[dict[str, Any], list[str]]:
    import subprocess
    import sys
    from pathlib import Path

    client = lab.client()
    if (down := _up(client)) is not None:
        return down
    detail: dict[str, Any] = {}
    failures = _traffic(lab, client, "before", detail)
    session = _first_session(lab)
    assert session is not None
    espgate = str(Path(sys.executable).with_name("espgate"))
    res = subprocess.run(
        [espgate, "clear", "session", session["session"], "--socket", lab.socket],
        capture_output=True, text=True, timeout=15, check=False,
    )  # fmt: skip
    detail["clear"] = {"rc": res.returncode, "stdout": res.stdout.strip()}
    if res.returncode != 0:
        failures.append(f"espgate clear session failed: {res.stderr.strip()}")
    failures += _gone_checks(lab, detail, "server delete")
    if not _wait(lambda: not client.list_sas(), timeout=10):
        failures.append("client kept its IKE SA after the headend's delete")
    log_text = client.log_path.read_text(errors="replace")
    if "received DELETE for IKE_SA" not in log_text:
        failures.append("client log shows no DELETE for its IKE SA")
    if (down := _up(client)) is not None:
        return detail, failures + down[1]
    return detail, failures + _traffic(lab, client, "after", detail)


def _case_liveness(lab: HeadendLab) -> tuple[dict[str, Any], list[str]]:
    # the client must not probe on its own: only the headend checks liveness
    client = lab.client(extra_conf={"dpd_delay": 0})
    if (down := _up(client)) is not None:
        return down
    detail: dict[str, Any] = {}
    failures = _traffic(lab, client, "traffic", detail)

    # idle, alive: checks go out and are answered, the session stays
    def counter(name: str) -> int:
        return int(lab.show("counters")["ike"].get(name, 0))

    if not _wait(lambda: counter("liveness_sent") >= 2, timeout=6 * DPD_DELAY):
        failures.append("headend sent no liveness checks to an idle client")
    if _first_session(lab) is None:
        failures.append("headend dropped a live client")

    # the client dies without a word: the headend must notice
    detail["killed_pid"] = _kill_charon(client)
    started = time.monotonic()
    failures += _gone_checks(lab, detail, "client death")
    detail["seconds_to_teardown"] = round(time.monotonic() - started, 1)
    dead = counter("liveness_dead_peer")
    detail["liveness_dead_peer"] = dead
    if dead != 1:
        failures.append(f"headend counted {dead} dead peers, not 1")
    return detail, failures


def _case_initial_contact(lab: HeadendLab) -> tuple[dict[str, Any], list[str]]:
    first = lab.client("c1")
    if (down := _up(first)) is not None:
        return down
    detail: dict[str, Any] = {}
    failures = _traffic(lab, first, "first", detail)
    old = _first_session(lab)
    assert old is not None
    detail["first_session"] = old["session"]
    # the client restarts without deleting anything, then connects again
    detail["killed_pid"] = _kill_charon(first)
    second = lab.client("c1-restarted")
    if (down := _up(second)) is not None:
        return detail, failures + down[1]
    lines = [line.split("] ", 1)[-1] for line in
             second.log_path.read_text(errors="replace").splitlines()
             if "generating IKE_AUTH request" in line]  # fmt: skip
    detail["client_auth_request"] = lines
    if not any("INIT_CONTACT" in line for line in lines):
        failures.append("client sent no INITIAL_CONTACT")
    failures += _traffic(lab, second, "second", detail)
    sessions = lab.show()["sessions"]
    detail["sessions"] = [s["session"] for s in sessions]
    if len(sessions) != 1 or sessions[0]["session"] == old["session"]:
        failures.append(f"old session not replaced: {detail['sessions']}")
    if (in_use := _pool_in_use(lab)) != 1:
        failures.append(f"{in_use} addresses in use, not 1: the old one leaked")
    return detail, failures


SESSION_CASES: dict[str, tuple[str, Any, dict[str, Any]]] = {
    "multi-sa": (
        "two CHILD SAs in one session (ICMP and TCP selectors), each carries traffic",
        _case_multi_sa,
        {},
    ),
    "flow-limit": (
        "flow_limit = 1: a second CHILD SA gets NO_ADDITIONAL_SAS, the first works",
        _case_flow_limit,
        {"profile_keys": {"flow_limit": 1}},
    ),
    "delete-by-client": (
        "the client deletes its IKE SA: session and address freed, reconnect works",
        _case_delete_by_client,
        {},
    ),
    "delete-by-server": (
        "espgate clear session: the client gets a Delete, reconnect works",
        _case_delete_by_server,
        {},
    ),
    "liveness-dead-peer": (
        "idle client answers liveness checks; killed, its session is torn down",
        _case_liveness,
        {"profile_keys": {"dpd_delay": DPD_DELAY, "dpd_timeout": DPD_TIMEOUT}},
    ),
    "initial-contact": (
        "a restarted client's INITIAL_CONTACT replaces its old session and address",
        _case_initial_contact,
        {},
    ),
}


IKE_CASES: dict[str, tuple[str, Any, dict[str, Any]]] = {
    "headend-child-rekey": (
        "the headend rekeys the CHILD SA at its lifetime (PFS on the client's "
        "demand): traffic on the new SA",
        _case_headend_child_rekey,
        {"profile_keys": {"child_rekey_time": HEADEND_REKEY, "ike_rekey_time": 0}},
    ),
    "child-lifetime-bytes": (
        "the headend rekeys the CHILD SA when it carried child_rekey_bytes: "
        "traffic goes on over the new SA",
        _case_child_lifetime_bytes,
        {"profile_keys": {"child_rekey_bytes": REKEY_BYTES, "ike_rekey_time": 0}},
    ),
    "headend-ike-rekey": (
        "the headend rekeys the IKE SA at its lifetime, then a CHILD rekey over "
        "it: traffic",
        _case_headend_ike_rekey,
        {"profile_keys": {"ike_rekey_time": HEADEND_REKEY, "child_rekey_time": 0}},
    ),
    "child-rekey": (
        "CHILD SA rekeyed twice by the client without PFS: traffic on the new SA",
        _case_child_rekey(False),
        {},
    ),
    "child-rekey-pfs": (
        "CHILD SA rekeyed twice with a new ECP-256 exchange: traffic on the new SA",
        _case_child_rekey(True),
        {},
    ),
    "rekey-under-traffic-no-loss": (
        "a 50/s ping loses nothing across CHILD (PFS) and IKE rekeys",
        _case_rekey_under_traffic,
        {},
    ),
    "ike-rekey": (
        "IKE SA rekeyed by the client, then a CHILD rekey over it: traffic",
        _case_ike_rekey,
        {},
    ),
    "profile-match-identity": (
        "KEY_ID, DER DN and address-prefix identities each select their profile",
        _case_match_identity,
        {"clients": 3, "pool_range": BASE_POOL, "extra_config": _identity_config},
    ),
    "profile-match-certmap": (
        "certificate maps on issuer and subject select the profile and pool",
        _case_match_certmap,
        {
            "clients": 2,
            "pool_range": BASE_POOL,
            "pki": {"kind": "rsa", "chain": True},
            "auth": ("rsa-sig", ["rsa-sig"]),
            "match": ("fqdn:nobody.invalid",),
            "extra_config": _certmap_config,
        },
    ),
}

# denial-of-service limits and proposal choice live in their own module
from control.selftest_limits import LIMIT_CASES  # noqa: E402

IKE_CASES.update(LIMIT_CASES)
IKE_CASES.update(SESSION_CASES)

# IKE fragmentation over a small MTU (RFC 7383)
from control.selftest_frag import FRAG_CASES  # noqa: E402

IKE_CASES.update(FRAG_CASES)
