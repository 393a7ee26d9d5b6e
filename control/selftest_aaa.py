"""Self-test cases for AAA: EAP through a real FreeRADIUS, with strongSwan clients.

Theory of operation: each case gets the usual `HeadendLab` (with a test PKI,
since the headend proves itself by certificate when the client uses EAP),
then `AaaSetup` starts FreeRADIUS in the hub namespace on its loopback with
a users file of our own, and restarts ``espgate serve`` with a config that
adds a ``[radius.lab]`` group (optionally led by a silent server, for
failover) and an EAP profile. The clients are strongSwan with EAP-MD5 or
EAP-MSCHAPv2 secrets. A case checks what the client saw (its log names the
EAP method and whether an MSK was made, its virtual IP), what the headend
lists, and that traffic flows (`check_traffic`).

The cases register themselves into `control.selftest.CASES`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from control.cli import request
from control.lab import StrongSwanClient
from control.lab.dhcp import Dnsmasq
from control.lab.procs import netns_argv
from control.lab.radius import FreeRadius, RadiusUser
from control.lab.strongswan import PLUGINS
from control.selftest import CASES, SERVER_ID, Case, HeadendLab, check_traffic

RADIUS_SECRET = "espgate-lab-radius-secret-42"
RADIUS_PORT = 18120
DEAD_PORT = 18121  # nothing listens here: the failover case's first server
PKI = {"kind": "rsa"}
LAB_AUTH = ("rsa-sig", ["pre-share"])

USERS = [
    RadiusUser("alice@espgate.example", "alice-eap-password"),
    RadiusUser("bob", "bob-eap-password"),
]

AAA_CONFIG = """\
[server]
listen = "{listen}"
control_socket = "{socket}"
log_level = "debug"
state_dir = "{state_dir}"

[engine]
crypto = "{crypto}"

[pools.lab]
range = "{pool_range}"

[radius.lab]
timeout = 1.0
retransmit = 1
nas_identifier = "espgate-lab"
user_password = "espgate"
{servers}
[[profiles]]
name = "aaa"
match_identity = ["*"]
local_identity = "fqdn:{server_id}"
{auth}
{pool_line}
dns = ["198.19.1.53"]
local_ts = {local_ts}
{extra_profile}
{extra_config}
"""

EAP_AUTH = """\
local_auth = "rsa-sig"
remote_auth = ["eap"]
certificate = "{cert}"
private_key = "{key}"
aaa_authentication = "lab"
eap_query_identity = {query}
eap_timeout = 20
"""

PSK_AUTH = """\
local_auth = "pre-share"
remote_auth = ["pre-share"]
aaa_psk = "lab"
"""

LOCAL_PSK_AUTH = """\
local_auth = "pre-share"
remote_auth = ["pre-share"]
psk = "{psk}"
"""

CERT_AUTH = """\
local_auth = "rsa-sig"
remote_auth = ["pubkey"]
certificate = "{cert}"
private_key = "{key}"
ca = ["{ca}"]
"""

SERVER_BLOCK = """\
[[radius.lab.servers]]
address = "127.0.0.1"
port = {port}
secret = "{secret}"
"""


class EapClient(StrongSwanClient):
    """A strongSwan client that authenticates by EAP and wants our certificate."""

    def __init__(self, *args: Any, eap_id: str, eap_secret: str, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.eap_id = eap_id
        self.eap_secret = eap_secret

    def _swanctl_conf(self) -> dict[str, Any]:
        conf = super()._swanctl_conf()
        # the EAP secret exists only in this file, never in a log
        conf["secrets"] = {"eap-lab": {"id": self.eap_id, "secret": self.eap_secret}}
        return conf


@dataclass
class AaaSetup:
    """FreeRADIUS plus an espgate restarted with a RADIUS-backed EAP profile."""

    lab: HeadendLab
    query_identity: bool = False
    failover: bool = False
    mode: str = "eap"  # eap, aaa-psk, psk (from the config), cert
    extra_profile: str = ""
    extra_config: str = ""
    local_ts: list[str] = field(default_factory=list)
    pool: str | None = "lab"
    users: list[RadiusUser] = field(default_factory=lambda: list(USERS))
    radius: FreeRadius | None = None

    def start(self) -> AaaSetup:
        """Start FreeRADIUS, then restart the headend with the AAA config."""
        lab = self.lab
        assert lab.topo is not None and lab.procs is not None and lab.pki is not None
        self.radius = FreeRadius(
            lab.workdir / "radius",
            lab.topo.hub,
            self.users,
            secret=RADIUS_SECRET,
            port=RADIUS_PORT,
        )
        self.radius.start(lab.procs)
        with contextlib.suppress(KeyError):
            # the lab's default headend, when it was started (AAA labs don't)
            lab.procs.stop(lab.procs.get("espgate"))
        ports = ([DEAD_PORT] if self.failover else []) + [RADIUS_PORT]
        servers = "".join(
            SERVER_BLOCK.format(port=port, secret=RADIUS_SECRET) for port in ports
        )
        config = lab.workdir / "espgate-aaa.toml"
        config.write_text(
            AAA_CONFIG.format(
                listen=lab.topo.hub_outer_ip,
                socket=lab.socket,
                state_dir=lab.workdir / "state",
                crypto=lab.crypto,
                pool_range=lab.pool_range,
                servers=servers,
                server_id=SERVER_ID,
                auth=self._auth(),
                local_ts=json.dumps(self.local_ts or [lab.topo.inside_net]),
                pool_line=f'pool = "{self.pool}"' if self.pool else "",
                extra_profile=self.extra_profile,
                extra_config=self.extra_config,
            )
        )
        config.chmod(0o600)
        espgate = str(Path(sys.executable).with_name("espgate"))
        argv = [espgate, "serve", "--config", str(config)]
        proc = lab.procs.start("espgate-aaa", argv, ns=lab.topo.hub)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if not proc.alive():
                raise RuntimeError(f"espgate exited:\n{proc.stderr_text()[-2000:]}")
            if os.path.exists(lab.socket):
                try:
                    request(lab.socket, "show-counters", timeout=2)
                    return self
                except OSError:
                    pass
            time.sleep(0.1)
        raise RuntimeError("espgate did not open its control socket within 15 s")

    def _auth(self) -> str:
        lab = self.lab
        assert lab.pki is not None
        if self.mode == "aaa-psk":
            return PSK_AUTH
        if self.mode == "psk":
            return LOCAL_PSK_AUTH.format(psk=lab.psk)
        files = {
            "cert": lab.pki.server_cert_path,
            "key": lab.pki.server_key_path,
            "ca": lab.pki.ca_path,
        }
        if self.mode == "cert":
            return CERT_AUTH.format(**files)
        query = "true" if self.query_identity else "false"
        return EAP_AUTH.format(query=query, **files)

    def client(
        self, method: str, ike_id: str, eap_id: str, secret: str, **kwargs: Any
    ) -> EapClient:
        """Start a strongSwan client using EAP `method` ("md5", "mschapv2")."""
        lab = self.lab
        assert lab.topo is not None and lab.procs is not None and lab.pki is not None
        local: dict[str, Any] = {"auth": f"eap-{method}", "id": ike_id}
        if eap_id != ike_id:
            local["eap_id"] = eap_id
        client = EapClient(
            lab.topo,
            lab.workdir / f"strongswan-{kwargs.pop('name', 'c1')}",
            eap_id=eap_id,
            eap_secret=secret,
            psk=b"unused-in-eap-cases",
            remote_id=SERVER_ID,
            local_id=ike_id,
            remote_ts=lab.topo.inside_net,
            files=lab.pki.client_files(),
            extra_conf={"local": local, "remote": {"auth": "pubkey"}},
            **kwargs,
        )
        client.start(lab.procs)
        lab.clients.append(client)
        return client


def dns_to_file(path: Path) -> dict[str, Any]:
    """Return charon settings that write received DNS servers to `path`.

    strongSwan's resolve plugin then records INTERNAL_IP4/6_DNS in a file of
    this case, never in the host's /etc/resolv.conf (no resolvconf binary).
    """
    return {
        "load": f"{PLUGINS} resolve",
        "plugins": {
            "resolve": {
                "file": str(path),
                "resolvconf": {"path": "/nonexistent/resolvconf"},
            }
        },
    }


def _client_lines(client: StrongSwanClient, *needles: str) -> list[str]:
    text = client.log_path.read_text(errors="replace")
    return [
        line.split("] ", 1)[-1]
        for line in text.splitlines()
        if any(n in line for n in needles)
    ]


def _eap_up(
    lab: HeadendLab,
    client: StrongSwanClient,
    method: str,
    msk: bool,
    identity: str,
    nbytes: int = 4 * 1024 * 1024,
) -> tuple[dict[str, Any], list[str]]:
    """Check an EAP client that should be up: its log, the session, traffic."""
    if not client.initiate():
        return {"client_log": str(client.log_path)}, ["tunnel did not come up"]
    failures: list[str] = []
    vip = client.virtual_ip()
    detail: dict[str, Any] = {"inside_address": vip}
    if not vip:
        failures.append("no inside address from config mode")
    lines = _client_lines(client, "EAP method", "authentication of")
    detail["client_auth_log"] = lines
    # strongSwan: "EAP method EAP_MD5 succeeded, no MSK established"
    wanted = f"EAP method EAP_{method.upper()} succeeded, " + (
        "MSK established" if msk else "no MSK established"
    )
    if not any(wanted in line for line in lines):
        failures.append(f"client log lacks {wanted!r}")
    if not any(SERVER_ID in line and "successful" in line for line in lines):
        failures.append("client did not verify our certificate authentication")
    sessions = lab.show()["sessions"]
    detail["sessions"] = sessions
    if len(sessions) != 1 or sessions[0]["identity"] != identity:
        failures.append(f"expected one session of {identity!r}: {sessions}")
    elif sessions[0]["inside"] != vip:
        failures.append(f"headend says inside {sessions[0]['inside']}, client {vip}")
    traffic, more = check_traffic(lab, client, nbytes)
    detail.update(traffic)
    return detail, failures + more


def _eap_refused(
    lab: HeadendLab, client: StrongSwanClient, needle: str
) -> tuple[dict[str, Any], list[str]]:
    """Check an EAP client that must not get in."""
    up = client.initiate(timeout=15)
    failures = ["tunnel came up"] if up else []
    if lab.show()["sessions"]:
        failures.append("headend kept a session")
    lines = _client_lines(client, needle)
    if not lines:
        failures.append(f"client log lacks {needle!r}")
    counters = lab.show("counters")
    detail = {"initiated": up, "client_log": lines, "ike": counters["ike"]}
    return detail, failures


def _case_eap_md5(lab: HeadendLab) -> tuple[dict[str, Any], list[str]]:
    aaa = AaaSetup(lab).start()
    who = "alice@espgate.example"
    client = aaa.client("md5", who, who, "alice-eap-password")
    return _eap_up(lab, client, "md5", msk=False, identity=who)


def _case_eap_mschapv2(lab: HeadendLab) -> tuple[dict[str, Any], list[str]]:
    aaa = AaaSetup(lab).start()
    who = "alice@espgate.example"
    client = aaa.client("mschapv2", who, who, "alice-eap-password")
    return _eap_up(lab, client, "mschapv2", msk=True, identity=who)


def _case_eap_query_identity(lab: HeadendLab) -> tuple[dict[str, Any], list[str]]:
    aaa = AaaSetup(lab, query_identity=True).start()
    # the IKE identity is not a RADIUS user; the queried EAP identity is
    client = aaa.client(
        "mschapv2", "laptop7@espgate.example", "bob", "bob-eap-password"
    )
    detail, failures = _eap_up(lab, client, "mschapv2", msk=True, identity="bob")
    if not _client_lines(client, "server requested EAP_IDENTITY"):
        failures.append("client was not asked for its EAP identity")
    return detail, failures


def _case_eap_ip_identity(lab: HeadendLab) -> tuple[dict[str, Any], list[str]]:
    assert lab.topo is not None
    aaa = AaaSetup(lab).start()
    ip = lab.topo.client_link(1).outer_ip
    client = aaa.client("md5", ip, ip, "alice-eap-password")
    return _eap_refused(lab, client, "AUTHENTICATION_FAILED")


def _case_eap_wrong_password(lab: HeadendLab) -> tuple[dict[str, Any], list[str]]:
    aaa = AaaSetup(lab).start()
    who = "alice@espgate.example"
    client = aaa.client("md5", who, who, "not-alices-password")
    detail, failures = _eap_refused(lab, client, "EAP_FAILURE")
    if not detail["ike"].get("auth_failed"):
        failures.append("headend did not count the failed authentication")
    return detail, failures


def _case_radius_failover(lab: HeadendLab) -> tuple[dict[str, Any], list[str]]:
    aaa = AaaSetup(lab, failover=True).start()
    who = "alice@espgate.example"
    client = aaa.client("mschapv2", who, who, "alice-eap-password")
    detail, failures = _eap_up(lab, client, "mschapv2", msk=True, identity=who)
    radius = lab.show("counters")["radius"]["lab"]
    detail["radius"] = radius
    if not radius.get("server_timeouts") or not radius.get("access_accept"):
        failures.append(f"no failover seen in the RADIUS counters: {radius}")
    return detail, failures


FRAMED_IP = "198.18.128.77"


def _case_radius_framed_ip(lab: HeadendLab) -> tuple[dict[str, Any], list[str]]:
    user = RadiusUser(
        "carol@espgate.example",
        "carol-eap-password",
        [("Framed-IP-Address", FRAMED_IP), ("Framed-IP-Netmask", "255.255.255.255")],
    )
    aaa = AaaSetup(lab, users=[user]).start()
    client = aaa.client("md5", user.name, user.name, user.password)
    detail, failures = _eap_up(lab, client, "md5", msk=False, identity=user.name)
    if detail.get("inside_address") != FRAMED_IP:
        failures.append(f"client got {detail.get('inside_address')}, not {FRAMED_IP}")
    pools = lab.show("counters")["pools"]
    detail["pools"] = pools
    if pools["lab"]["in_use"] != 0:
        failures.append(f"a pool address was taken besides Framed-IP: {pools}")
    return detail, failures


def _case_radius_avpairs(lab: HeadendLab) -> tuple[dict[str, Any], list[str]]:
    assert lab.topo is not None
    srv = f"{lab.topo.srv_ip}/32"
    user = RadiusUser(
        "dave@espgate.example",
        "dave-eap-password",
        [
            ("Cisco-AVPair", "ipsec:dns-servers=198.19.1.99 198.19.1.98"),
            ("Cisco-AVPair", f"ipsec:route-set=prefix {srv}"),
            ("Cisco-AVPair", "ipsec:frobnicate=1"),
            ("Cisco-AVPair", "ipsec:ipsec-flow-limit=99999"),
        ],
    )
    aaa = AaaSetup(lab, users=[user]).start()
    resolv = lab.workdir / "client-resolv.conf"
    client = aaa.client(
        "mschapv2", user.name, user.name, user.password, charon_conf=dns_to_file(resolv)
    )
    detail, failures = _eap_up(lab, client, "mschapv2", msk=True, identity=user.name)
    summary = client.sa_summary() or {}
    detail["client_remote_ts"] = summary.get("remote_ts")
    # route-set prefix: the only subnet the client routes into the tunnel
    if summary.get("remote_ts") not in ([srv], srv):
        failures.append(f"client remote_ts {summary.get('remote_ts')}, not {srv}")
    text = resolv.read_text() if resolv.exists() else ""
    detail["client_resolv_conf"] = text
    if "nameserver 198.19.1.99" not in text or "nameserver 198.19.1.98" not in text:
        failures.append(f"client did not install both DNS servers: {text!r}")
    radius = lab.show("counters")["radius"]["lab"]
    detail["radius"] = radius
    if radius.get("avpair_unknown") != 1 or radius.get("avpair_malformed") != 1:
        failures.append(f"unknown/malformed avpairs not counted once each: {radius}")
    return detail, failures


AAA_PSK = "aaa-fetched-psk-0123456789"


def _case_aaa_psk(lab: HeadendLab) -> tuple[dict[str, Any], list[str]]:
    who = "erin@espgate.example"
    user = RadiusUser(
        who,
        "espgate",  # the User-Password of PSK requests (user_password default)
        [
            ("Tunnel-Password", AAA_PSK),
            ("Cisco-AVPair", "ipsec:dns-servers=198.19.1.77"),
        ],
    )
    aaa = AaaSetup(lab, users=[user], mode="aaa-psk").start()
    resolv = lab.workdir / "client-resolv.conf"
    client = lab.client(
        local_id=who, psk=AAA_PSK.encode(), charon_conf=dns_to_file(resolv)
    )
    if not client.initiate():
        return {"client_log": str(client.log_path)}, ["tunnel did not come up"]
    vip = client.virtual_ip()
    detail: dict[str, Any] = {"inside_address": vip}
    failures = [] if vip else ["no inside address"]
    lines = _client_lines(client, "authentication of")
    detail["client_auth_log"] = lines
    if not any(SERVER_ID in x and "pre-shared key" in x for x in lines):
        failures.append("client did not verify our PSK authentication")
    text = resolv.read_text() if resolv.exists() else ""
    detail["client_resolv_conf"] = text
    if "nameserver 198.19.1.77" not in text:
        failures.append(f"cached authorization DNS not installed: {text!r}")
    traffic, more = check_traffic(lab, client, 4 * 1024 * 1024)
    detail.update(traffic)
    assert aaa.radius is not None
    if "Login OK: [erin@espgate.example]" not in aaa.radius.log_text():
        failures.append("FreeRADIUS did not log the PSK lookup")
    return detail, failures + more


def _client_view(
    lab: HeadendLab, client: StrongSwanClient, resolv: Path
) -> tuple[dict[str, Any], list[str]]:
    """Bring a client up; report its address, DNS servers, routes and traffic."""
    if not client.initiate():
        return {"client_log": str(client.log_path)}, ["tunnel did not come up"]
    summary = client.sa_summary() or {}
    text = resolv.read_text() if resolv.exists() else ""
    detail: dict[str, Any] = {
        "inside_address": summary.get("virtual_ip"),
        "client_remote_ts": summary.get("remote_ts"),
        # sorted: the resolve plugin writes the servers in reverse order
        "client_dns": sorted(
            line.split()[1]
            for line in text.splitlines()
            if line.startswith("nameserver")
        ),
    }
    traffic, failures = check_traffic(lab, client, 4 * 1024 * 1024)
    detail.update(traffic)
    detail["sessions"] = lab.show()["sessions"]
    return detail, failures


def _expect(detail: dict[str, Any], key: str, wanted: Any) -> list[str]:
    got = detail.get(key)
    if isinstance(got, str) and isinstance(wanted, list):
        got = [got]
    return [] if got == wanted else [f"client {key} is {got!r}, wanted {wanted!r}"]


def _case_local_policy(lab: HeadendLab) -> tuple[dict[str, Any], list[str]]:
    assert lab.topo is not None
    srv = f"{lab.topo.srv_ip}/32"
    policy = f"""\
[pools.staff]
range = "198.18.128.200-198.18.128.209"

[policies.staff]
addr_pool = "staff"
dns_servers = ["198.19.1.91", "198.19.1.92"]
wins_servers = ["198.19.1.93"]
route_set_prefix = ["{srv}"]
netmask = "255.255.255.255"
banner = "lab staff only"
default_domain = "lab.espgate.example"
split_dns = ["lab.espgate.example", "corp.espgate.example"]
backup_gateways = ["vpn2.espgate.example"]
include_local_lan = true
pfs = false
ipsec_flow_limit = 100
route_accept = "any tag 10 distance 20"
session_lifetime = 3600
smartcard_removal_disconnect = true
configuration_url = "https://cfg.espgate.example/anyconnect.xml"
configuration_version = 3
interface_mtu = 1380
"""
    aaa = AaaSetup(
        lab,
        mode="psk",
        extra_profile='authorization_group = "local:staff"',
        extra_config=policy,
    ).start()
    assert aaa.radius is not None
    resolv = lab.workdir / "client-resolv.conf"
    client = lab.client(charon_conf=dns_to_file(resolv))
    detail, failures = _client_view(lab, client, resolv)
    vip = detail.get("inside_address") or ""
    if not vip.startswith("198.18.128.20"):
        failures.append(f"address {vip!r} is not from the policy's pool")
    failures += _expect(detail, "client_dns", ["198.19.1.91", "198.19.1.92"])
    failures += _expect(detail, "client_remote_ts", [srv])
    # interface_mtu: the session's TUN in the hub, as the kernel sees it
    tuns = [s.get("tun") for s in detail.get("sessions", []) if s.get("tun")]
    detail["tun_mtus"] = {}
    for tun in tuns:
        shown = subprocess.run(
            ["ip", "-n", lab.topo.hub, "-j", "link", "show", "dev", tun],
            capture_output=True, text=True, timeout=10,
        )  # fmt: skip
        links = json.loads(shown.stdout or "[]") if shown.returncode == 0 else []
        detail["tun_mtus"][tun] = links[0].get("mtu") if links else None
    if not tuns or set(detail["tun_mtus"].values()) != {1380}:
        failures.append(f"session tun mtu {detail['tun_mtus']}, wanted 1380")
    if [s.get("mtu") for s in detail.get("sessions", [])] != [1380] * len(tuns):
        failures.append("show sessions does not report mtu 1380")
    return detail, failures


def _case_group_override(lab: HeadendLab) -> tuple[dict[str, Any], list[str]]:
    users = [
        RadiusUser(
            "frank@espgate.example",
            "frank-eap-password",
            [("Cisco-AVPair", "ipsec:dns-servers=198.19.1.81")],
        ),
        RadiusUser(
            "engineering",
            "espgate",
            [("Cisco-AVPair", "ipsec:dns-servers=198.19.1.82")],
        ),
    ]
    extra = (
        'authorization_group = "radius:lab"\n'
        'authorization_group_name = "engineering"\n'
        "authorization_group_override = true"
    )
    aaa = AaaSetup(lab, users=users, extra_profile=extra).start()
    resolv = lab.workdir / "client-resolv.conf"
    who = users[0]
    client = aaa.client(
        "md5", who.name, who.name, who.password, charon_conf=dns_to_file(resolv)
    )
    detail, failures = _client_view(lab, client, resolv)
    # the group is configured to override the user's (cached) DNS server
    failures += _expect(detail, "client_dns", ["198.19.1.82"])
    assert aaa.radius is not None
    if "Login OK: [engineering]" not in aaa.radius.log_text():
        failures.append("no group authorization request reached FreeRADIUS")
    return detail, failures


def _case_cached_authorization(lab: HeadendLab) -> tuple[dict[str, Any], list[str]]:
    who = RadiusUser(
        "gina@espgate.example",
        "gina-eap-password",
        [
            ("Framed-IP-Address", "198.18.128.71"),
            ("Cisco-AVPair", "ipsec:dns-servers=198.19.1.71"),
        ],
    )
    # explicit user authorization is configured, but the Access-Accept of EAP
    # carried a Framed-IP-Address, so it must not run (it would be refused:
    # gina's password is not the authorization password)
    aaa = AaaSetup(
        lab, users=[who], extra_profile='authorization_user = "radius:lab"'
    ).start()
    resolv = lab.workdir / "client-resolv.conf"
    client = aaa.client(
        "md5", who.name, who.name, who.password, charon_conf=dns_to_file(resolv)
    )
    detail, failures = _client_view(lab, client, resolv)
    failures += _expect(detail, "inside_address", "198.18.128.71")
    failures += _expect(detail, "client_dns", ["198.19.1.71"])
    assert aaa.radius is not None
    log_text = aaa.radius.log_text()
    requests = log_text.count("Login OK: [gina@espgate.example]")
    detail["radius_logins"] = requests
    if requests != 1 or "Login incorrect" in log_text:
        failures.append("explicit user authorization ran despite a cached address")
    return detail, failures


def _case_name_mangler_dn(lab: HeadendLab) -> tuple[dict[str, Any], list[str]]:
    assert lab.topo is not None and lab.pki is not None
    srv = f"{lab.topo.srv_ip}/32"
    # the client certificate's subject is C=CH, O=espgate lab, CN=<identity>
    policy = f"""\
[policies."espgate lab"]
dns_servers = ["198.19.1.61"]
route_set_prefix = ["{srv}"]
"""
    extra = 'authorization_user = "local"\nname_mangler = "dn:organization"'
    AaaSetup(lab, mode="cert", extra_profile=extra, extra_config=policy).start()
    resolv = lab.workdir / "client-resolv.conf"
    client = lab.client(
        files=lab.pki.client_files(),
        extra_conf={
            "local": {"auth": "pubkey", "certs": "client.pem"},
            "remote": {"auth": "pubkey"},
        },
        charon_conf=dns_to_file(resolv),
    )
    detail, failures = _client_view(lab, client, resolv)
    failures += _expect(detail, "client_dns", ["198.19.1.61"])
    failures += _expect(detail, "client_remote_ts", [srv])
    return detail, failures


def _case_pool_exhausted(lab: HeadendLab) -> tuple[dict[str, Any], list[str]]:
    AaaSetup(lab, mode="psk").start()
    first, second = (
        lab.client(f"c{n}", client=n, local_id=f"client{n}@espgate.example")
        for n in (1, 2)
    )
    failures: list[str] = []
    if not first.initiate():
        return {"client_log": str(first.log_path)}, ["first client did not come up"]
    vip = first.virtual_ip()
    detail: dict[str, Any] = {"first_address": vip}
    if second.initiate(timeout=10):
        failures.append("second client came up from a one-address pool")
    refused = _client_lines(second, "INTERNAL_ADDRESS_FAILURE")
    detail["second_client_log"] = refused
    if not refused:
        failures.append("second client did not receive INTERNAL_ADDRESS_FAILURE")
    pools = lab.show("counters")["pools"]["lab"]
    detail["pool"] = pools
    if pools != {"size": 1, "in_use": 1}:
        failures.append(f"pool should be 1 of 1 in use: {pools}")

    # the first client leaves: its lease is released and the second gets it
    first.terminate()
    deadline = time.monotonic() + 10
    while lab.show()["sessions"] and time.monotonic() < deadline:
        time.sleep(0.2)
    second.terminate()
    if not second.initiate():
        return detail, failures + ["second client did not come up after release"]
    detail["second_address"] = second.virtual_ip()
    if detail["second_address"] != vip:
        failures.append(f"released {vip} not reused: {detail['second_address']}")
    traffic, more = check_traffic(lab, second, 4 * 1024 * 1024)
    detail.update(traffic)
    return detail, failures + more


SRV6 = "2001:db8:19::2"
HUB6 = "2001:db8:19::1"
INSIDE6 = "2001:db8:19::/64"
POOL6 = "2001:db8:18:1::/126"  # /128 per client: four clients


def _ipv6_inside(lab: HeadendLab) -> None:
    """Give the hub's inside link and the server IPv6, route the pool back.

    The lab's namespaces start with IPv6 disabled; it is enabled on the two
    inside interfaces and for devices made later (the session TUNs, charon's
    TUN), never on the outer links, whose capture must stay IKE/ESP only.
    """
    topo = lab.topo
    assert topo is not None
    enable = [
        (topo.hub, "default"),
        (topo.hub, topo.hub_inside_if),
        (topo.srv, topo.srv_if),
        (topo.client_link(1).ns, "default"),
    ]
    cmds = [
        netns_argv(ns, ["sysctl", "-qw", f"net.ipv6.conf.{dev}.disable_ipv6=0"])
        for ns, dev in enable
    ]
    cmds += [
        ["ip", "-n", topo.hub, "addr", "add", f"{HUB6}/64", "dev",
         topo.hub_inside_if, "nodad"],
        ["ip", "-n", topo.srv, "addr", "add", f"{SRV6}/64", "dev", topo.srv_if,
         "nodad"],
        ["ip", "-n", topo.srv, "-6", "route", "add", POOL6, "via", HUB6],
        ["ip", "netns", "exec", topo.hub, "sysctl", "-qw",
         "net.ipv6.conf.all.forwarding=1"],
    ]  # fmt: skip
    for argv in cmds:
        subprocess.run(argv, check=True, capture_output=True, timeout=10)


def _ping6(ns: str, target: str, count: int = 40) -> dict[str, Any]:
    argv = ["ping", "-6", "-n", "-q", "-c", str(count), "-i", "0.05", "-s", "1200"]
    res = subprocess.run(
        netns_argv(ns, [*argv, "-w", "15", target]),
        capture_output=True,
        text=True,
        timeout=30,
    )
    match = re.search(r"(\d+) packets transmitted, (\d+) received", res.stdout)
    sent, got = (int(match.group(1)), int(match.group(2))) if match else (0, 0)
    rtt = re.search(r"= [\d.]+/([\d.]+)/([\d.]+)/", res.stdout)
    return {
        "sent": sent,
        "received": got,
        # recorded, not checked: ~1 s here meant the lab's IPv6 waited on DAD
        "rtt_avg_ms": float(rtt.group(1)) if rtt else None,
        "rtt_max_ms": float(rtt.group(2)) if rtt else None,
        "output": res.stdout[-300:],
    }


def _case_ipv6(dual: bool) -> Any:
    def case(lab: HeadendLab) -> tuple[dict[str, Any], list[str]]:
        assert lab.topo is not None
        inside4 = lab.topo.inside_net
        extra = f"""\
[pools.v6]
range = "{POOL6}"
client_prefix = 128
"""
        AaaSetup(
            lab,
            mode="psk",
            extra_profile='ipv6_pool = "v6"',
            local_ts=[inside4, INSIDE6],
            extra_config=extra,
        ).start()
        _ipv6_inside(lab)
        remote_ts = f"{inside4},{INSIDE6}" if dual else INSIDE6
        client = lab.client(
            remote_ts=remote_ts,
            extra_conf={"vips": "0.0.0.0,::" if dual else "::"},
        )
        if not client.initiate():
            return {"client_log": str(client.log_path)}, ["tunnel did not come up"]
        sas = client.list_sas()
        ike = next(iter(sas.values()))
        vips = list(ike.get("local-vips") or [])
        detail: dict[str, Any] = {"client_vips": vips}
        failures: list[str] = []
        six = [v for v in vips if ":" in v]
        four = [v for v in vips if "." in v]
        if not six or not six[0].startswith("2001:db8:18:1::"):
            failures.append(f"client has no IPv6 address from the pool: {vips}")
        if dual != bool(four):
            failures.append(f"IPv4 address {'missing' if dual else 'given'}: {vips}")
        child: dict[str, Any] = next(iter((ike.get("child-sas") or {}).values()), {})
        detail["client_remote_ts"] = child.get("remote-ts")
        detail["client_local_ts"] = child.get("local-ts")
        if INSIDE6 not in (child.get("remote-ts") or []):
            failures.append(f"client does not route {INSIDE6}: {child}")
        detail["ping6"] = _ping6(client.link.ns, SRV6)
        if (
            detail["ping6"]["received"] != detail["ping6"]["sent"]
            or not (detail["ping6"]["sent"])
        ):
            failures.append(f"IPv6 ping through the tunnel lost: {detail['ping6']}")
        if dual:
            traffic, more = check_traffic(lab, client, 4 * 1024 * 1024)
            detail.update(traffic)
            failures += more
        sessions = lab.show()["sessions"]
        detail["sessions"] = sessions
        if not sessions or sessions[0].get("inside6") is None:
            failures.append(f"headend lists no IPv6 inside address: {sessions}")
        return detail, failures

    return case


GIADDR = "198.18.130.1"
DHCP_DNS = "198.19.1.54"


def _case_dhcp_lease(lab: HeadendLab) -> tuple[dict[str, Any], list[str]]:
    topo = lab.topo
    assert topo is not None and lab.procs is not None
    # giaddr on the hub, and the server's way back to it and to the clients
    for argv in (
        ["ip", "-n", topo.hub, "addr", "add", f"{GIADDR}/32", "dev", "lo"],
        ["ip", "-n", topo.srv, "route", "add", "198.18.130.0/24", "via",
         topo.hub_inside_ip],
    ):  # fmt: skip
        subprocess.run(argv, check=True, capture_output=True, timeout=10)
    server = Dnsmasq(
        lab.workdir / "dnsmasq",
        topo.srv,
        topo.srv_if,
        "198.18.130.10",
        "198.18.130.50",
        dns=DHCP_DNS,
    )
    server.start(lab.procs)
    extra = f'dhcp_server = "{topo.srv_ip}"\ndhcp_giaddr = "{GIADDR}"\ndhcp_timeout = 6'
    AaaSetup(lab, mode="psk", pool=None, extra_profile=extra).start()
    resolv = lab.workdir / "client-resolv.conf"
    client = lab.client(charon_conf=dns_to_file(resolv))
    detail, failures = _client_view(lab, client, resolv)
    vip = detail.get("inside_address") or ""
    detail["server_leases"] = server.leases()
    if not vip.startswith("198.18.130."):
        failures.append(f"address {vip!r} is not from the DHCP range")
    if vip not in detail["server_leases"]:
        failures.append(f"dnsmasq has no lease for {vip}: {detail['server_leases']}")
    failures += _expect(detail, "client_dns", [DHCP_DNS])
    if "DHCPACK" not in server.log_text():
        failures.append("dnsmasq did not log a DHCPACK")

    # the session ends: the headend releases the lease
    client.terminate()
    deadline = time.monotonic() + 10
    while vip in server.leases() and time.monotonic() < deadline:
        time.sleep(0.2)
    detail["server_leases_after"] = server.leases()
    if vip and vip in detail["server_leases_after"]:
        failures.append("lease not released after the session ended")
    if "DHCPRELEASE" not in server.log_text():
        failures.append("dnsmasq did not log a DHCPRELEASE")
    return detail, failures


# what strongSwan 5.9.8 logs for the Unity attributes of a CFG_REPLY; the three
# Cisco private numbers have no name there and appear as "(28684)"
UNITY_NAMES = {
    "UNITY_BANNER",
    "UNITY_DEF_DOMAIN",
    "UNITY_SPLITDNS_NAME",
    "UNITY_SPLIT_INCLUDE",
    "UNITY_BACKUP_SERVERS",
    "UNITY_PFS",
}


def _cisco_attributes(names: list[str]) -> list[str]:
    return [n for n in names if n.startswith("UNITY_") or n.startswith("(28")]


def _case_unity_attributes(lab: HeadendLab) -> tuple[dict[str, Any], list[str]]:
    """A FlexVPN-VID client gets the Unity/FlexVPN attributes; one without does not.

    strongSwan 5.9.8 sends FLEXVPN-SUPPORTED in IKEv2 with
    charon.cisco_flexvpn; charon.cisco_unity only adds the Unity VID to IKEv1,
    so the second client (unity plugin, cisco_unity = yes) is the one without
    a Cisco VID. Its unity plugin narrows CHILD SAs to split includes in IKEv1
    only: in IKEv2 it takes UNITY_SPLIT_INCLUDE (no "handling failed" line) and
    the narrowing to the route set is ours (TSr).
    """
    assert lab.topo is not None
    srv = f"{lab.topo.srv_ip}/32"
    policy = f"""\
[policies.unity]
route_set_prefix = ["{srv}"]
banner = "lab unity banner"
default_domain = "lab.espgate.example"
split_dns = ["lab.espgate.example", "corp.espgate.example"]
backup_gateways = ["vpn2.espgate.example", "vpn3.espgate.example"]
pfs = true
configuration_url = "https://cfg.espgate.example/flexvpn.xml"
configuration_version = 7
"""
    AaaSetup(
        lab,
        mode="psk",
        extra_profile='authorization_group = "local:unity"',
        extra_config=policy,
    ).start()
    unity = f"{PLUGINS} unity"
    flex = lab.client(
        "flexvpn",
        client=1,
        local_id="client1@espgate.example",
        charon_conf={"load": unity, "cisco_flexvpn": True, "cisco_unity": True},
    )
    plain = lab.client(
        "plain",
        client=2,
        local_id="client2@espgate.example",
        charon_conf={"load": unity, "cisco_unity": True},
    )
    detail: dict[str, Any] = {}
    failures: list[str] = []
    for name, client in (("flexvpn", flex), ("plain", plain)):
        if not client.initiate():
            return {"client_log": str(client.log_path)}, [f"{name} did not come up"]
        summary = client.sa_summary() or {}
        received = client.received_attributes()
        detail[name] = {
            "inside_address": summary.get("virtual_ip"),
            "remote_ts": summary.get("remote_ts"),
            "received_attributes": received,
            "unhandled": _client_lines(client, "attribute failed"),
        }
        if "INTERNAL_IP4_ADDRESS" not in received:
            failures.append(f"{name}: no INTERNAL_IP4_ADDRESS received")
        failures += [f"{name}: {f}" for f in _expect(detail[name], "remote_ts", [srv])]
        traffic, more = check_traffic(lab, client, 1024 * 1024)
        detail[name].update(traffic)
        failures += [f"{name}: {f}" for f in more]

    # the FlexVPN client got every Unity attribute and the private ones
    got = set(detail["flexvpn"]["received_attributes"])
    missing = sorted(UNITY_NAMES - got)
    if missing:
        failures.append(f"flexvpn client lacks {missing}")
    if not {"(28684)", "(28685)"} <= got:
        failures.append("flexvpn client lacks configuration URL/version (28684/5)")
    if any("UNITY_SPLIT_INCLUDE" in x for x in detail["flexvpn"]["unhandled"]):
        failures.append("the unity plugin did not take UNITY_SPLIT_INCLUDE")
    for name, client in (("flexvpn", flex), ("plain", plain)):
        detail[name]["vendor_ids_sent"] = client.vendor_ids_sent()
    if "Cisco FlexVPN Supported" not in detail["flexvpn"]["vendor_ids_sent"]:
        failures.append("flexvpn client did not send FLEXVPN-SUPPORTED")
    if detail["plain"]["vendor_ids_sent"]:
        failures.append(f"plain client sent {detail['plain']['vendor_ids_sent']}")

    # and the client without a Cisco vendor ID got none of them
    leaked = _cisco_attributes(detail["plain"]["received_attributes"])
    if leaked:
        failures.append(f"client without a Cisco VID received {leaked}")
    return detail, failures


def _case_config_set(lab: HeadendLab) -> tuple[dict[str, Any], list[str]]:
    """What strongSwan 5.9.8 does with our CFG_SET, and that we warn about it.

    Its ike_config task takes CFG_REPLY only: it logs "ignoring CFG_SET config
    payload", installs no virtual IP, finds our TSi (the pushed address) apart
    from its own address and deletes the CHILD SA, keeping the IKE SA. The
    case fails if that ever changes (the README would then be wrong).
    """
    AaaSetup(lab, mode="psk", extra_profile='config_mode = "set"').start()
    client = lab.client()
    up = client.initiate(timeout=15)
    counters = lab.show("counters")["ike"]
    detail: dict[str, Any] = {
        "initiated": up,
        "ignored": client.ignored_cp_types(),
        "received_attributes": client.received_attributes(),
        "client_log": _client_lines(
            client, "config payload", "traffic selectors found", "CHILD_SA"
        ),
        "cfg_set_to_requester": counters.get("cfg_set_to_requester", 0),
    }
    failures = ["strongSwan came up on a CFG_SET"] if up else []
    if detail["ignored"] != ["CFG_SET"]:
        failures.append(f"strongSwan did not log ignoring CFG_SET: {detail['ignored']}")
    if detail["received_attributes"]:
        failures.append("strongSwan processed attributes of a CFG_SET")
    if not detail["cfg_set_to_requester"]:
        failures.append("headend did not count its CFG_SET to a requesting client")
    return detail, failures


def _lab() -> dict[str, Any]:
    # every AAA case starts its own headend: no idle default one before it
    return {"pki": dict(PKI), "auth": LAB_AUTH, "start_daemon": False}


CASES.update(
    {
        "eap-md5": Case(
            "EAP-MD5 relayed to FreeRADIUS, AUTH by SK_p (no MSK): traffic",
            _case_eap_md5,
            _lab(),
        ),
        "eap-mschapv2": Case(
            "EAP-MSCHAPv2 relayed to FreeRADIUS, MSK from MS-MPPE keys: traffic",
            _case_eap_mschapv2,
            _lab(),
        ),
        "eap-query-identity": Case(
            "EAP-Identity asked by the headend; the EAP identity is authorized",
            _case_eap_query_identity,
            _lab(),
        ),
        "eap-ip-identity-rejected": Case(
            "an IP address IKE identity cannot be the EAP identity",
            _case_eap_ip_identity,
            _lab(),
        ),
        "eap-wrong-password": Case(
            "FreeRADIUS rejects a wrong EAP-MD5 password: EAP-Failure, no session",
            _case_eap_wrong_password,
            _lab(),
        ),
        "radius-framed-ip": Case(
            "Framed-IP-Address from the Access-Accept is the client's address",
            _case_radius_framed_ip,
            _lab(),
        ),
        "radius-avpairs-to-client": Case(
            "cisco-avpair DNS servers and route-set prefix reach the client",
            _case_radius_avpairs,
            _lab(),
        ),
        "aaa-psk": Case(
            "PSK from RADIUS Tunnel-Password, DNS from the same Access-Accept",
            _case_aaa_psk,
            _lab(),
        ),
        "group-override": Case(
            "RADIUS group authorization configured to override the user's",
            _case_group_override,
            _lab(),
        ),
        "cached-authorization": Case(
            "a cached Framed-IP-Address skips explicit user authorization",
            _case_cached_authorization,
            _lab(),
        ),
        "name-mangler-cert-dn": Case(
            "certificate DN organization names the local user policy",
            _case_name_mangler_dn,
            _lab(),
        ),
        "local-policy-attributes": Case(
            "a local group policy: its pool, DNS servers and route set",
            _case_local_policy,
            # the profile's pool stops below the policy's "staff" pool
            {**_lab(), "pool_range": "198.18.128.10-198.18.128.199"},
        ),
        "unity-attributes": Case(
            "Unity/FlexVPN attributes to a FLEXVPN-SUPPORTED client only: traffic",
            _case_unity_attributes,
            {**_lab(), "clients": 2},
        ),
        "config-set-strongswan": Case(
            "config_mode set: strongSwan ignores our CFG_SET, the headend warns",
            _case_config_set,
            _lab(),
        ),
        "pool-exhausted": Case(
            "one-address pool, two clients: INTERNAL_ADDRESS_FAILURE, then reuse",
            _case_pool_exhausted,
            {**_lab(), "clients": 2, "pool_range": "198.18.128.10-198.18.128.10"},
        ),
        "ipv6-pool": Case(
            "IPv6 pool (a /126 of /128s): INTERNAL_IP6_ADDRESS, IPv6 ping",
            _case_ipv6(dual=False),
            _lab(),
        ),
        "dual-stack": Case(
            "IPv4 and IPv6 addresses at once: IPv4 traffic and IPv6 ping",
            _case_ipv6(dual=True),
            _lab(),
        ),
        "dhcp-lease": Case(
            "no pool: the address from dnsmasq through our relay (giaddr), released",
            _case_dhcp_lease,
            _lab(),
        ),
        "radius-failover": Case(
            "first RADIUS server silent: retransmit, fail over, EAP-MSCHAPv2 ok",
            _case_radius_failover,
            _lab(),
        ),
    }
)
