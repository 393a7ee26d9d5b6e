"""``selftest.run``: verdict lines, remote (guest) cases and interruption.

The unit tests replace the case table with stub cases that run "remotely"
(no lab), so they need neither root nor namespaces.  One root test interrupts
a real ``espgate selftest`` with SIGINT while its lab is up and checks that it
left nothing behind: no namespace it made, no process, no temporary directory.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from control import selftest
from control.selftest import Case, Verdict

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

ESPGATE = str(Path(sys.executable).with_name("espgate"))


def _remote(verdict: Verdict | BaseException) -> Case:
    def remote() -> Verdict:
        if isinstance(verdict, BaseException):
            raise verdict
        return dict(verdict[0]), list(verdict[1])

    def no_lab(lab: Any) -> Verdict:
        raise AssertionError("a remote case must not get a host lab")

    return Case("stub", no_lab, {}, remote)


def _signal_self(signum: int) -> Case:
    def remote() -> Verdict:
        os.kill(os.getpid(), signum)
        raise AssertionError("the signal did not interrupt the case")

    return Case("stub", lambda lab: ({}, []), {}, remote)


@pytest.fixture
def stub_cases(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Callable[[dict[str, Case]], Path]:
    """Install stub cases; return the run's temporary directory (with a secret)."""
    base = tmp_path / "espgate-st-stub"

    def mkdtemp(prefix: str = "") -> str:
        base.mkdir()
        (base / "espgate.toml").write_text('psk = "stub-secret"\n')
        return str(base)

    def install(cases: dict[str, Case]) -> Path:
        monkeypatch.setattr(selftest, "CASES", cases)
        monkeypatch.setattr(selftest.tempfile, "mkdtemp", mkdtemp)
        return base

    return install


def test_run_all_pass_writes_json_removes_tmp(stub_cases, tmp_path, capsys) -> None:
    base = stub_cases({"a": _remote(({}, [])), "b": _remote(({}, []))})
    out = tmp_path / "st.json"
    results = selftest.run(None, out)
    assert [r["case"] for r in results] == ["a", "b"]
    assert json.loads(out.read_text()) == results
    assert not base.exists()
    assert "interrupted" not in capsys.readouterr().out


def test_run_remote_case_says_its_own_seconds(stub_cases, tmp_path, capsys) -> None:
    stub_cases({"g": _remote(({"seconds": 42.5}, [])), "h": _remote(({}, []))})
    results = selftest.run(None, tmp_path / "st.json")
    lines = capsys.readouterr().out.splitlines()
    assert "PASS g (42.5 s in the guest)" in lines
    # a remote verdict without its own time (no verdict came back) says the host's
    assert any(ln.startswith("PASS h (") and "guest" not in ln for ln in lines)
    assert results[0]["detail"]["seconds"] == 42.5


@pytest.mark.parametrize("how", ["KeyboardInterrupt", "SIGINT", "SIGTERM"])
def test_run_interrupted_writes_what_ran_and_cleans_up(
    stub_cases, tmp_path, capsys, how: str
) -> None:
    stopper = (
        _remote(KeyboardInterrupt())
        if how == "KeyboardInterrupt"
        else _signal_self(getattr(signal, how))
    )
    base = stub_cases({"a": _remote(({}, [])), "b": stopper, "c": _remote(({}, []))})
    out = tmp_path / "st.json"
    saved = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        selftest.run(None, out)
    # the handlers are back as they were
    assert signal.getsignal(signal.SIGTERM) == saved
    results = json.loads(out.read_text())
    assert [r["case"] for r in results] == ["a", "interrupted"]
    assert results[0]["passed"] is True
    entry = results[1]
    assert entry["passed"] is False
    assert entry["detail"]["during"] == "b"
    assert entry["detail"]["not_run"] == ["b", "c"]
    assert not base.exists()
    assert capsys.readouterr().out.splitlines()[-1].startswith("interrupted during b")


class _FakeLab:
    def __init__(self, workdir: Path, **kwargs: Any) -> None:
        self.workdir = workdir

    def __enter__(self) -> _FakeLab:
        self.workdir.mkdir(parents=True)
        (self.workdir / "espgate.log").write_text("what went wrong\n")
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def test_run_failing_host_case_keeps_its_logs(
    stub_cases, tmp_path, monkeypatch
) -> None:
    # the twin: a plain failure keeps the directory for its logs, no entry added
    monkeypatch.setattr(selftest, "HeadendLab", _FakeLab)
    base = stub_cases({"a": Case("stub", lambda lab: ({}, ["broken"]), {})})
    (result,) = selftest.run(None, tmp_path / "st.json")
    assert result["case"] == "a" and not result["passed"]
    assert result["detail"]["logs"] == str(base / "a")
    assert (base / "a" / "espgate.log").exists()


def test_run_failing_remote_case_leaves_no_tmp(stub_cases, tmp_path) -> None:
    # a guest case's logs are not here: nothing to keep the directory for
    base = stub_cases({"g": _remote(({}, ["broken"]))})
    (result,) = selftest.run(None, tmp_path / "st.json")
    assert not result["passed"] and "logs" not in result["detail"]
    assert not base.exists()


# -- a real run, interrupted ----------------------------------------------------------


def _netns() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if text.encode() in cmdline:
            pids.append(int(entry.name))
    return pids


@needs_root
@pytest.mark.interop
def test_selftest_sigint_with_lab_up_leaves_nothing(tmp_path: Path) -> None:
    prefix = f"egtfi{os.getpid() % 100000}"
    # short: the control socket's path must fit a sockaddr_un
    tmp = Path(tempfile.mkdtemp(prefix="egtfi-"))
    try:
        _interrupt_selftest(prefix, tmp, tmp_path / "st.json")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _interrupt_selftest(prefix: str, tmp: Path, out: Path) -> None:
    env = dict(os.environ, ESPGATE_LAB_PREFIX=prefix, TMPDIR=str(tmp))
    before = _netns()
    proc = subprocess.Popen(
        [ESPGATE, "selftest", "--cases", "psk-gcm128,psk-gcm256", "--json", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        # as from a terminal: SIGINT not ignored, whatever started pytest
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        # wait for the headend of the first case, then press Ctrl-C
        deadline = time.monotonic() + 60
        while not list(tmp.glob("espgate-st-*/psk-gcm128/espgate.sock")):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the lab never came up"
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, stderr[-2000:]
    assert "interrupted during psk-gcm128" in stdout
    assert "Traceback" not in stderr
    results = json.loads(out.read_text())
    assert results[-1]["case"] == "interrupted"
    assert results[-1]["detail"]["not_run"] == ["psk-gcm128", "psk-gcm256"]
    assert not list(tmp.iterdir()), "temporary directory with the PSK left behind"
    assert not {ns for ns in _netns() - before if ns.startswith(prefix)}
    assert not _processes_mentioning(str(tmp))


# -- what a verdict and kept logs may hold --------------------------------------

# an `ip xfrm state` line as iproute2 prints it (key made up for this test)
XFRM_AEAD = "\taead rfc4106(gcm(aes)) 0xfc317e42000102030405060708090a0b0c0d0e0f 128"


def test_run_json_redacts_xfrm_key_owner_only(stub_cases, tmp_path) -> None:
    stub_cases({"k": _remote(({"xfrm": f"src 198.18.0.1\n{XFRM_AEAD}\n"}, []))})
    out = tmp_path / "st.json"
    selftest.run(None, out)
    text = out.read_text()
    assert "fc317e42" not in text
    assert "aead rfc4106(gcm(aes)) <160-bit key> 128" in text
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


def test_redact_keeps_hex_that_is_no_key() -> None:
    # the twin: SPIs and marks in hex are not key material
    line = "proto esp spi 0xc0de0001 reqid 7 mode tunnel\n\tmark 0x10/0xff"
    assert selftest.redact({"x": [line]}) == {"x": [line]}
    assert selftest.redact("enc cbc(aes) 0x00ff") == "enc cbc(aes) <16-bit key>"


def test_run_remote_case_guest_logs_kept_private(stub_cases, tmp_path) -> None:
    stub_cases({})
    logs = {"espgate.stderr.log": f"up\n{XFRM_AEAD}\n", "charon.log": "IKE_SA up\n"}
    selftest.CASES["g"] = _remote(({"guest_logs": logs}, []))
    keep = tmp_path / "keep"
    out = tmp_path / "st.json"
    selftest.run(None, out, keep_logs=str(keep))
    assert "guest_logs" not in out.read_text()
    assert stat.S_IMODE(keep.stat().st_mode) == 0o700
    kept = keep / "g" / "espgate.stderr.log"
    assert "fc317e42" not in kept.read_text() and "<160-bit key>" in kept.read_text()
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    assert (keep / "g" / "charon.log").read_text() == "IKE_SA up\n"


def _lab_files(case_dir: Path) -> None:
    # what a real case leaves: rendered by the lab's own writers
    from control.lab import LabPki, StrongSwanClient, Topology
    from control.lab.radius import FreeRadius
    from control.selftest_aaa import RADIUS_SECRET, USERS

    case_dir.mkdir(parents=True, exist_ok=True)
    radius = FreeRadius(case_dir / "radius", "egt-fxf-hub", USERS, secret=RADIUS_SECRET)
    radius.write_config()
    client = StrongSwanClient(
        Topology("egt-fxf"), case_dir / "cli", psk=selftest.PSK.encode()
    )
    client.write_config()
    LabPki.create(case_dir / "pki", kind="rsa")
    (case_dir / "espgate.toml").write_text(
        f'[[profiles]]\npsk = "{selftest.PSK}"\neap_secret = "{RADIUS_SECRET}"\n'
    )
    log = case_dir / "espgate.stderr.log"
    log.write_text(f"debug: odd line quoting {selftest.PSK} and {USERS[0].password}\n")
    os.chmod(log, 0o644)
    (case_dir / "outer.pcap").write_bytes(b"\xd4\xc3\xb2\xa1" + bytes(range(256)))


def test_run_keep_logs_private_and_free_of_lab_secrets(stub_cases, tmp_path) -> None:
    keep = tmp_path / "keep"
    stub_cases({})

    def remote() -> Verdict:
        _lab_files(keep / "aaa")
        return {}, []

    selftest.CASES["aaa"] = Case("stub", lambda lab: ({}, []), {}, remote)
    (verdict,) = selftest.run(None, tmp_path / "st.json", keep_logs=str(keep))
    assert verdict["passed"], verdict
    files = [p for p in keep.rglob("*") if p.is_file()]
    assert len(files) >= 5
    for path in keep.rglob("*"):
        want = 0o700 if path.is_dir() else 0o600
        assert stat.S_IMODE(path.stat().st_mode) == want, path
    secrets = selftest.lab_secrets()
    assert len(secrets) >= 4
    for path in files:
        data = path.read_bytes()
        for secret in secrets:
            for spelling in (secret.encode(), secret.encode().hex().encode()):
                assert spelling not in data, (path, secret)
        assert b"PRIVATE KEY" not in data, path
    # configs stay readable with the values masked; keys and users files go
    assert 'psk = "<redacted>"' in (keep / "aaa" / "espgate.toml").read_text()
    assert not list(keep.rglob("*.key")) and not list(keep.rglob("users"))
    assert "private key" in (keep / "REDACTED.txt").read_text()
    assert (keep / "aaa" / "outer.pcap").read_bytes()[:4] == b"\xd4\xc3\xb2\xa1"


def test_redact_text_masks_assignments_keeps_other_lines() -> None:
    from control.lab.keep import redact_text

    text = 'secret = s3cr3t\n"x" Cleartext-Password := "pw"\nport = 1812\n'
    assert redact_text(text) == (
        'secret = "<redacted>"\n"x" Cleartext-Password := "<redacted>"\n'
        "port = 1812\n"
    )
    # the twin: nothing secret, nothing changed
    plain = "listen = 198.18.1.1\nsecrets {\n}\n"
    assert redact_text(plain, ["unused-secret"]) == plain
