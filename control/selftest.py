"""``espgate selftest``: real peers in namespaces, one JSON verdict per case.

Every case gets a fresh :class:`HeadendLab`: three namespaces (client, hub,
server), ``espgate serve`` in the hub with a generated config, and one or more
real strongSwan clients in the client namespace.  A case returns a detail
dict and a list of failed checks; it passes when that list is empty.  The
lab is torn down after each case, whatever happened, so a failing case
cannot poison the next one.

Cases check traffic, not only that an SA came up: a ping through the tunnel,
a SHA-256-checked TCP transfer, and a capture on the hub's outer interface
that must show only IKE and ESP-in-UDP and never the transfer's plaintext.

A case with ``remote`` set (the kernel cases, run in a qemu guest) builds no
lab here and reports the time it took over there.  Ctrl-C ends the run
cleanly: the current lab comes down, the JSON lists what ran and an
``interrupted`` entry, and the temporary directory (configs with the PSK)
is removed.  A directory that is kept (``--keep-logs``, or a failed case's
logs) is sealed by :func:`control.lab.keep.seal_kept`: files 0600,
directories 0700, private keys and RADIUS users files removed, secrets in
configs and logs replaced by ``<redacted>``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from control.cli import request
from control.config import load as load_config
from control.lab import (
    Capture,
    LabPki,
    ProcessSet,
    StrongSwanClient,
    Topology,
    ping,
    tcp_transfer,
)
from control.lab.keep import seal_kept
from control.lab.procs import interrupt_once

log = logging.getLogger("espgate.selftest")

PSK = "espgate-selftest-psk-0123456789"
SERVER_ID = "vpn.espgate.example"
CLIENT_ID = "client1@espgate.example"

CONFIG_TEMPLATE = """\
[server]
listen = "{listen}"
control_socket = "{socket}"
log_level = "debug"
{server_extra}

[engine]
crypto = "{crypto}"

[pools.lab]
range = "{pool_range}"

[[profiles]]
name = "lab"
match_identity = {match}
local_identity = "fqdn:{server_id}"
auth = "psk"
psk = "{psk}"
pool = "lab"
dns = ["198.19.1.53"]
local_ts = ["{inside_net}"]
esp = ["aes128gcm16", "aes256gcm16"]
{profile_extra}
{extra_config}
"""


class HeadendLab:
    """A Topology with ``espgate serve`` running in its hub namespace."""

    def __init__(
        self,
        workdir: Path,
        prefix: str | None = None,
        *,
        crypto: str = "ipsec-mb",
        pool_range: str = "198.18.128.10-198.18.128.250",
        embedded: bool = False,
        clients: int = 1,
        pki: dict[str, Any] | None = None,
        auth: tuple[str, list[str]] = ("pre-share", ["pre-share"]),
        match: tuple[str, ...] = ("*@espgate.example",),
        extra_config: Callable[[HeadendLab], str] | None = None,
        profile_keys: dict[str, Any] | None = None,
        server_keys: dict[str, Any] | None = None,
        start_daemon: bool = True,
    ):
        """Set up a lab; ``embedded`` runs the daemon on its built-in default.

        ``clients`` is the number of client namespaces (one charon each).
        ``pki`` makes a test PKI (`LabPki.create` arguments) before the
        headend starts; ``auth`` is the profile's local and remote auth,
        ``match`` its identity patterns. ``extra_config`` returns TOML (more
        pools and profiles) appended to the generated configuration.
        ``start_daemon`` False leaves the headend to the case (it starts its own).
        """
        self.workdir = workdir
        # the Topology makes names unique per run ({prefix}-{pid}-{random}-hub),
        # so concurrent runs never share a namespace, with the variable too
        self.prefix = prefix or os.environ.get("ESPGATE_LAB_PREFIX", "egst")
        self.embedded = embedded
        self.psk = PSK
        self.server_id = SERVER_ID
        self.crypto = crypto
        self.pool_range = pool_range
        self.nclients = clients
        self.pki_args = pki
        self.pki: LabPki | None = None
        self.auth = auth
        self.match = match
        self.extra_config = extra_config
        # more keys of the lab profile, as TOML values (json.dumps of each)
        self.profile_keys = profile_keys or {}
        # more keys of [server], likewise
        self.server_keys = server_keys or {}
        self.start_daemon = start_daemon
        self.socket = str(workdir / "espgate.sock")
        self.topo: Topology | None = None
        self.procs: ProcessSet | None = None
        self.clients: list[StrongSwanClient] = []

    def __enter__(self) -> HeadendLab:
        _private_dir(self.workdir)
        self.topo = Topology(
            self.prefix, self.workdir, reuse_stale=True, clients=self.nclients
        )
        self.topo.__enter__()
        try:
            self.procs = ProcessSet(self.workdir)
            self.procs.__enter__()
            if self.pki_args is not None:
                self.pki = LabPki.create(self.workdir, **self.pki_args)
            if self.start_daemon:
                self._start_headend()
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            if self.procs is not None:
                self.procs.stop_all()
        finally:
            if self.topo is not None:
                self.topo.__exit__(*exc)

    def _argv(self) -> list[str]:
        assert self.topo is not None
        espgate = str(Path(sys.executable).with_name("espgate"))
        if self.embedded:
            # the built-in default as shipped; only the socket is moved
            default = load_config()
            profile = default.profiles[0]
            self.psk = profile.psk.decode()
            self.server_id = profile.local_identity.partition(":")[2]
            return [espgate, "serve", "--control-socket", self.socket,
                    "--state-dir", str(self.workdir / "state")]
        config = self.workdir / "espgate.toml"
        config.write_text(
            CONFIG_TEMPLATE.format(
                listen=self.topo.hub_outer_ip,
                socket=self.socket,
                server_extra="\n".join(
                    f"{k} = {json.dumps(v)}" for k, v in self.server_keys.items()
                ),
                crypto=self.crypto,
                pool_range=self.pool_range,
                server_id=SERVER_ID,
                psk=PSK,
                inside_net=self.topo.inside_net,
                profile_extra=self._profile_extra(),
                match=json.dumps(list(self.match)),
                extra_config=self.extra_config(self) if self.extra_config else "",
            )
        )
        config.chmod(0o600)
        return [espgate, "serve", "--config", str(config),
                "--state-dir", str(self.workdir / "state")]

    def _profile_extra(self) -> str:
        local, remote = self.auth
        lines = [f'local_auth = "{local}"', f"remote_auth = {json.dumps(remote)}"]
        lines += [f"{k} = {json.dumps(v)}" for k, v in self.profile_keys.items()]
        if self.pki is not None:
            lines += [
                f'certificate = "{self.pki.server_cert_path}"',
                f'private_key = "{self.pki.server_key_path}"',
                f'ca = ["{self.pki.ca_path}"]',
            ]
        return "\n".join(lines)

    def _start_headend(self) -> None:
        assert self.topo is not None and self.procs is not None
        proc = self.procs.start("espgate", self._argv(), ns=self.topo.hub)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if not proc.alive():
                tail = proc.stderr_text()[-2000:]
                raise RuntimeError(f"espgate exited at start:\n{tail}")
            if os.path.exists(self.socket):
                try:
                    request(self.socket, "show-counters", timeout=2)
                    return
                except OSError:
                    pass
            time.sleep(0.1)
        raise RuntimeError("espgate did not open its control socket within 15 s")

    def client(self, name: str = "c1", **kwargs: Any) -> StrongSwanClient:
        """Start a strongSwan client; ``client=N`` picks the N-th client namespace."""
        assert self.topo is not None and self.procs is not None
        kwargs.setdefault("psk", self.psk.encode())
        kwargs.setdefault("remote_id", self.server_id)
        kwargs.setdefault("local_id", CLIENT_ID)
        kwargs.setdefault("remote_ts", self.topo.inside_net)
        client = StrongSwanClient(
            self.topo, self.workdir / f"strongswan-{name}", **kwargs
        )
        client.start(self.procs)
        self.clients.append(client)
        return client

    def show(self, what: str = "sessions") -> dict[str, Any]:
        return request(self.socket, f"show-{what}")


def check_traffic(
    lab: HeadendLab, client: StrongSwanClient, nbytes: int, capture: bool = True
) -> tuple[dict[str, Any], list[str]]:
    """Ping and a checked transfer through the tunnel, optionally captured."""
    assert lab.topo is not None
    topo = lab.topo
    link = client.link
    failures: list[str] = []
    detail: dict[str, Any] = {}
    cap_path = lab.workdir / f"outer-{link.index}.pcap"
    cap = Capture(topo.hub, link.hub_if, cap_path) if capture else None
    if cap is not None:
        cap.__enter__()
    try:
        detail["ping"] = ping(link.ns, topo.srv_ip, count=5, interval=0.2)
        detail["transfer"] = tcp_transfer(
            topo,
            src_ns=link.ns,
            dst_ns=topo.srv,
            dst_addr=topo.srv_ip,
            nbytes=nbytes,
            timeout=120,
        )
    finally:
        if cap is not None:
            cap.__exit__(None, None, None)
    if detail["ping"]["loss_pct"] != 0:
        failures.append(f"ping loss {detail['ping']['loss_pct']}%")
    if not detail["transfer"]["match"]:
        failures.append("transfer SHA-256 mismatch")
    if cap is not None:
        summary = cap.summary()
        detail["capture"] = summary
        by = summary["by_proto"]
        if summary["plaintext_marker_seen"]:
            failures.append("plaintext marker seen on the outer interface")
        if by.get("other", 0) or by.get("esp", 0):
            failures.append(f"non IKE/ESP-in-UDP packets on the outer interface: {by}")
        if by.get("udp4500", 0) < 100:
            failures.append(f"too few ESP-in-UDP packets captured: {by}")
    return detail, failures


def _session_checks(
    lab: HeadendLab, vip: str | None
) -> tuple[dict[str, Any], list[str]]:
    failures = []
    sessions = lab.show()["sessions"]
    if len(sessions) != 1:
        failures.append(f"expected 1 session at the headend, saw {len(sessions)}")
        return {"sessions": sessions}, failures
    s = sessions[0]
    if s["inside"] != vip:
        failures.append(f"headend says inside {s['inside']}, client has {vip}")
    child = s["children"][0] if s["children"] else None
    if child is None or child["packets_in"] == 0 or child["packets_out"] == 0:
        failures.append(f"no packets counted on the CHILD SA: {child}")
    return {"session": s}, failures


def _case_psk(esp: str, key_bits: int) -> Callable[[HeadendLab], tuple[dict, list]]:
    def case(lab: HeadendLab) -> tuple[dict[str, Any], list[str]]:
        client = lab.client(esp=esp)
        detail: dict[str, Any] = {}
        if not client.initiate():
            return {"client_log": str(client.log_path)}, ["tunnel did not come up"]
        vip = client.virtual_ip()
        detail["inside_address"] = vip
        failures = [] if vip else ["no inside address from config mode"]
        sas = client.sa_summary() or {}
        detail["client_sa"] = sas
        if str(sas.get("encr_keysize")) != str(key_bits):
            failures.append(f"client SA is not AES-GCM-{key_bits}: {sas}")
        traffic, more = check_traffic(lab, client, 32 * 1024 * 1024)
        detail.update(traffic)
        failures += more
        sess, more = _session_checks(lab, vip)
        detail.update(sess)
        failures += more

        # the client hangs up: the headend must drop the session
        client.terminate()
        deadline = time.monotonic() + 10
        while lab.show()["sessions"] and time.monotonic() < deadline:
            time.sleep(0.2)
        if lab.show()["sessions"]:
            failures.append("session still listed after the client's delete")
        return detail, failures

    return case


def _cert_client(lab: HeadendLab, **kwargs: Any) -> StrongSwanClient:
    """Start a client that authenticates by certificate and wants ours."""
    assert lab.pki is not None
    local, remote = lab.auth
    conf: dict[str, Any] = {"remote": {"auth": "pubkey"}}
    if "pre-share" not in remote:
        conf["local"] = {"auth": "pubkey", "certs": "client.pem"}
    if local == "pre-share":
        conf["remote"] = {"auth": "psk"}
    return lab.client(files=lab.pki.client_files(), extra_conf=conf, **kwargs)


def _case_cert(keysize: int) -> Callable[[HeadendLab], tuple[dict, list]]:
    def case(lab: HeadendLab) -> tuple[dict[str, Any], list[str]]:
        client = _cert_client(lab)
        if not client.initiate():
            return {"client_log": str(client.log_path)}, ["tunnel did not come up"]
        detail: dict[str, Any] = {"inside_address": client.virtual_ip()}
        failures: list[str] = []
        log_text = client.log_path.read_text(errors="replace")
        # strongSwan names the method it verified our AUTH with
        auth_lines = [
            line.split("] ", 1)[-1]
            for line in log_text.splitlines()
            if "successful" in line and "authentication of" in line
        ]
        detail["client_auth_log"] = auth_lines
        detail["client_cert_log"] = [
            line.split("] ", 1)[-1]
            for line in log_text.splitlines()
            if re.search(r"(received|sending) (end entity|issuer) cert", line)
        ]
        if lab.pki is not None and lab.pki.intermediate is not None:
            got = [x for x in detail["client_cert_log"] if "received issuer" in x]
            sent = [x for x in detail["client_cert_log"] if "sending issuer" in x]
            if not got or not sent:
                failures.append("intermediate certificates not sent both ways")
        server_ok = [line for line in auth_lines if SERVER_ID in line]
        if not server_ok:
            failures.append("client did not log our authentication as successful")
        elif lab.auth[0] != "pre-share" and not re.search(r"SHA2|_DER", server_ok[0]):
            # RFC 7427 schemes read RSA_EMSA_PKCS1_SHA2_256, ECDSA_WITH_SHA384_DER
            failures.append(f"server auth not by RFC 7427 signature: {server_ok[0]}")
        elif lab.auth[0] == "pre-share" and "pre-shared key" not in server_ok[0]:
            failures.append(f"server auth not by PSK: {server_ok[0]}")
        if keysize and lab.pki is not None:
            key = lab.pki.server.key
            size = getattr(key, "key_size", 0) or key.curve.key_size  # type: ignore[union-attr]
            detail["server_key_bits"] = size
            if size != keysize:
                failures.append(f"server key is {size} bits, wanted {keysize}")
        traffic, more = check_traffic(lab, client, 8 * 1024 * 1024)
        detail.update(traffic)
        failures += more
        sess, more = _session_checks(lab, detail["inside_address"])
        detail.update(sess)
        return detail, failures + more

    return case


def _case_two_clients(lab: HeadendLab) -> tuple[dict[str, Any], list[str]]:
    # distinct identities: INITIAL_CONTACT would replace a same-identity session
    clients = [
        lab.client(f"c{n}", client=n, local_id=f"client{n}@espgate.example")
        for n in (1, 2)
    ]
    detail: dict[str, Any] = {}
    failures: list[str] = []
    for client in clients:
        if not client.initiate():
            return {"client_log": str(client.log_path)}, [
                f"tunnel of client {client.link.index} did not come up"
            ]
    vips = [c.virtual_ip() for c in clients]
    detail["inside_addresses"] = vips
    if None in vips or len(set(vips)) != 2:
        failures.append(f"expected two distinct inside addresses, got {vips}")
    for client in clients:
        traffic, more = check_traffic(lab, client, 8 * 1024 * 1024)
        detail[f"client{client.link.index}"] = traffic
        failures += [f"client {client.link.index}: {f}" for f in more]
    sessions = lab.show()["sessions"]
    if sorted(s["inside"] for s in sessions) != sorted(str(v) for v in vips):
        failures.append(f"headend sessions do not match the clients: {sessions}")
    return detail, failures


def _case_unknown_identity(lab: HeadendLab) -> tuple[dict[str, Any], list[str]]:
    client = lab.client(local_id="stranger@elsewhere.example")
    up = client.initiate(timeout=10)
    failures = ["tunnel came up for an identity no profile matches"] if up else []
    if lab.show()["sessions"]:
        failures.append("headend kept a session for an unknown identity")
    log_text = client.log_path.read_text(errors="replace")
    if "AUTHENTICATION_FAILED" not in log_text:
        failures.append("client did not receive AUTHENTICATION_FAILED")
    ike = lab.show("counters")["ike"]
    return {"initiated": up, "ike_counters": ike}, failures


def _case_wrong_psk(lab: HeadendLab) -> tuple[dict[str, Any], list[str]]:
    client = lab.client(psk=b"not-the-right-psk-at-all-1234")
    up = client.initiate(timeout=10)
    failures = ["tunnel came up with a wrong PSK"] if up else []
    sessions = lab.show()["sessions"]
    if sessions:
        failures.append(f"headend kept {len(sessions)} session(s)")
    counters = lab.show("counters")
    return {"initiated": up, "ike_counters": counters["ike"]}, failures


Verdict = tuple[dict[str, Any], list[str]]


@dataclass(frozen=True)
class Case:
    """One self-test case: what it checks, its body and its lab's arguments.

    ``remote`` is set for a case that runs somewhere else (the qemu guest):
    it is called instead of ``func`` and no host lab is built for it; the
    detail it returns carries the case's own ``seconds`` from over there.
    """

    summary: str
    func: Callable[[HeadendLab], Verdict]
    lab: dict[str, Any]
    remote: Callable[[], Verdict] | None = None


CASES: dict[str, Case] = {
    "psk-gcm128": Case(
        "PSK, ESP AES-GCM-128: ping, checked transfer, capture",
        _case_psk("aes128gcm16", 128),
        {},
    ),
    "psk-gcm256": Case(
        "PSK, ESP AES-GCM-256: ping, checked transfer, capture",
        _case_psk("aes256gcm16", 256),
        {},
    ),
    "psk-gcm128-openssl": Case(
        "as psk-gcm128 with the OpenSSL crypto backend",
        _case_psk("aes128gcm16", 128),
        {"crypto": "openssl"},
    ),
    "rsa-cert": Case(
        "RSA certificates both ways, RFC 7427 signatures: traffic",
        _case_cert(2048),
        {"pki": {"kind": "rsa"}, "auth": ("rsa-sig", ["rsa-sig"])},
    ),
    "ecdsa-cert": Case(
        "ECDSA P-384 certificates both ways: traffic",
        _case_cert(384),
        {"pki": {"kind": "p384"}, "auth": ("ecdsa-sig", ["ecdsa-sig"])},
    ),
    "ecdsa-p256-cert": Case(
        "ECDSA P-256 certificates both ways: traffic",
        _case_cert(256),
        {"pki": {"kind": "p256"}, "auth": ("ecdsa-sig", ["pubkey"])},
    ),
    "rsa-cert-chain": Case(
        "RSA leaves under an intermediate CA, chains sent both ways: traffic",
        _case_cert(2048),
        {"pki": {"kind": "rsa", "chain": True}, "auth": ("rsa-sig", ["pubkey"])},
    ),
    "asymmetric-cert-psk": Case(
        "server by RSA certificate, client by PSK: traffic",
        _case_cert(2048),
        {"pki": {"kind": "rsa"}, "auth": ("rsa-sig", ["pre-share"])},
    ),
    "psk-two-clients": Case(
        "two strongSwan clients in their own namespaces at once",
        _case_two_clients,
        {"clients": 2},
    ),
    "unknown-identity-rejected": Case(
        "an identity no profile matches gets AUTHENTICATION_FAILED",
        _case_unknown_identity,
        {},
    ),
    "ikev2-wrong-psk-rejected": Case(
        "a wrong PSK gets AUTHENTICATION_FAILED", _case_wrong_psk, {}
    ),
}

# issue 6 cases live in their own module
from control.selftest_ike import IKE_CASES  # noqa: E402

CASES.update({name: Case(*spec) for name, spec in IKE_CASES.items()})


# an `ip xfrm state` key line: algorithm kept, key replaced by its length
_XFRM_KEY = re.compile(
    r"\b(aead|enc|auth|auth-trunc|comp)(\s+\S+\s+)0x([0-9a-fA-F]+)"
)


def redact(value: Any) -> Any:
    """Return value (nested lists, dicts, strings) with xfrm key material masked.

    ``aead rfc4106(gcm(aes)) 0x<hex> 128`` becomes ``aead rfc4106(gcm(aes))
    <160-bit key> 128``: the algorithm and the key's length stay, its bytes go.
    """
    if isinstance(value, str):
        return _XFRM_KEY.sub(
            lambda m: f"{m.group(1)}{m.group(2)}<{len(m.group(3)) * 4}-bit key>", value
        )
    if isinstance(value, dict):
        return {k: redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    return value


def lab_secrets() -> list[str]:
    """Return the fixed secrets the lab cases use (PSK, RADIUS secret, passwords)."""
    from control import selftest_aaa

    return [
        PSK,
        selftest_aaa.RADIUS_SECRET,
        *(user.password for user in selftest_aaa.USERS),
    ]


def _private_dir(path: Path) -> None:
    # verdicts and logs name peers and carry configs: owner only
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)


def _run_case(name: str, workdir: Path) -> dict[str, Any]:
    case = CASES[name]
    started = time.monotonic()
    shutil.rmtree(workdir, ignore_errors=True)
    try:
        if case.remote is not None:
            detail, failures = case.remote()
            # the guest's daemon and charon logs come back with its verdict
            logs = detail.pop("guest_logs", None) or {}
            if logs:
                _private_dir(workdir)
                for file, text in logs.items():
                    _write_private(workdir / Path(file).name, redact(text))
        else:
            with HeadendLab(workdir, **case.lab) as lab:
                detail, failures = case.func(lab)
    except Exception as exc:
        detail, failures = {"traceback": traceback.format_exc()}, [repr(exc)]
    passed = not failures
    detail["failures"] = failures
    # a remote case timed itself where it ran; the boot is said once elsewhere
    where = " in the guest" if case.remote is not None and "seconds" in detail else ""
    if not where:
        detail["seconds"] = round(time.monotonic() - started, 1)
    if not passed and case.remote is None:
        detail["logs"] = str(workdir)
    print(
        f"{'PASS' if passed else 'FAIL'} {name} ({detail['seconds']} s{where})"
        + ("" if passed else f": {'; '.join(failures)}"),
        flush=True,
    )
    return {"case": name, "passed": passed, "detail": detail}


def run(
    names: list[str] | None, json_path: Path, keep_logs: str | None = None
) -> list[dict[str, Any]]:
    """Run the named cases (all by default) and write their verdicts.

    A Ctrl-C (or SIGTERM) stops the run: the case under way tears its lab
    down (later signals are ignored until that is done), the JSON gets what
    ran plus an ``interrupted`` entry, the temporary directory (configs with
    the PSK) is removed, and KeyboardInterrupt is raised again to the caller.
    """
    names = names or list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise SystemExit(f"espgate: unknown selftest case(s): {', '.join(unknown)}")
    results: list[dict[str, Any]] = []
    base = (
        Path(keep_logs) if keep_logs else Path(tempfile.mkdtemp(prefix="espgate-st-"))
    )
    _private_dir(base)
    interrupted: str | None = None
    with interrupt_once():
        try:
            for name in names:
                interrupted = name
                results.append(_run_case(name, base / name))
            interrupted = None
        except KeyboardInterrupt:
            done = [r["case"] for r in results]
            results.append(
                {
                    "case": "interrupted",
                    "passed": False,
                    "detail": {
                        "during": interrupted,
                        "not_run": [n for n in names if n not in done],
                        "failures": [f"interrupted during {interrupted}"],
                    },
                }
            )
        json_path.parent.mkdir(parents=True, exist_ok=True)
        # no key material in a verdict, and the file is the owner's alone
        text = json.dumps(redact(results), indent=2, default=str) + "\n"
        _write_private(json_path, text)
        if interrupted is not None:
            print(
                f"interrupted during {interrupted}: {len(results) - 1} case(s) "
                f"done, verdicts in {json_path}",
                flush=True,
            )
        # kept only for the logs a failed host case points to
        if not keep_logs and (
            interrupted is not None
            or not any("logs" in r["detail"] for r in results)
        ):
            shutil.rmtree(base, ignore_errors=True)
        else:
            # kept for a reader: owner-only, keys and passwords gone
            seal_kept(base, lab_secrets())
    if interrupted is not None:
        raise KeyboardInterrupt
    return results

# AAA cases (EAP through RADIUS) register themselves into CASES
import control.selftest_aaa  # noqa: E402,F401

# issue 4 cases live in their own module
from control.selftest_reload import RELOAD_CASES  # noqa: E402

CASES.update({name: Case(*spec) for name, spec in RELOAD_CASES.items()})

from control import selftest_kernel  # noqa: E402,F401  (registers the kernel cases)
