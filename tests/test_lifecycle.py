"""Daemon lifecycle with a real `espgate serve` in a namespace of our own.

A signal to the whole process group (how systemd stops a service) must stop
the daemon as a plain SIGTERM does: the client gets an INFORMATIONAL with a
Delete and the dataplane is not restarted.  A second daemon on the same state
directory refuses to start; a CHILD SA the daemon cannot build (its TUN name
held by someone else) ends in a Delete, never in a half-built tunnel.

The client is tests/ikeclient.py over UDP from inside the namespace, behind a
faked NAT so that IKE moves to port 4500 and the Delete goes out through the
dataplane process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ESPGATE = str(Path(sys.executable).with_name("espgate"))
DEFAULT = ROOT / "control" / "defaults" / "default.toml"
PSK = "espgate-demo-psk-change-me"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespace)")

# one IKE SA with a CHILD SA, then wait for the responder's Delete and answer it
CLIENT = """
import socket, sys
from ikeclient import IkeClient
from control.ike.messages import DeletePayload
c = IkeClient(psk=PSK.encode(), remote_id=None, fake_nat=True,
              server=("127.0.0.1", 500), address=("127.0.0.1", 0))
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", 0))
s.settimeout(30)
s.sendto(c.init_request(), ("127.0.0.1", 500))
c.handle_init_response(s.recv(65535))
s.sendto(bytes(4) + c.auth_request(), ("127.0.0.1", 4500))
data = s.recv(65535)
assert data[:4] == bytes(4)
r = c.handle_auth_response(data[4:])
print("up", r, flush=True)
while True:
    data = s.recv(65535)
    if data[:4] != bytes(4):
        continue
    payloads, reply = c.answer_request(data[4:])
    if any(isinstance(p, DeletePayload) for p in payloads):
        s.sendto(bytes(4) + reply, ("127.0.0.1", 4500))
        print("delete", flush=True)
        break
"""


@pytest.fixture
def netns():
    ns = f"egt-fa{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


class Daemon:
    """One `espgate serve` in the namespace, leading its own process group."""

    def __init__(self, ns: str, tmp: Path, name: str, listen: str = "127.0.0.1"):
        self.socket = tmp / f"{name}.sock"
        self.log = tmp / f"{name}.log"
        config = tmp / f"{name}.toml"
        config.write_text(
            DEFAULT.read_text().replace(
                'control_socket = "/run/espgate/control.sock"',
                f'control_socket = "{self.socket}"\nstate_dir = "{tmp / "state"}"',
            )
        )
        config.chmod(0o600)
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", ns, ESPGATE, "serve", "--config",
                 str(config), "--listen", listen],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip

    def wait_listening(self) -> None:
        deadline = time.monotonic() + 30
        while "listening on" not in self.text() and time.monotonic() < deadline:
            assert self.proc.poll() is None, self.text()
            time.sleep(0.1)
        assert "listening on" in self.text(), self.text()

    def text(self) -> str:
        return self.log.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def _client(ns: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}
    return subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-c",
         f"PSK = {PSK!r}\n" + CLIENT],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip


def _show_sessions(ns: str, daemon: Daemon) -> list[dict]:
    out = subprocess.run(
        ["ip", "netns", "exec", ns, ESPGATE, "show", "sessions", "--json",
         "--socket", str(daemon.socket)],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    return list(json.loads(out.stdout)["sessions"])


def test_serve_group_sigterm_sends_delete_without_dataplane_restart(netns, tmp_path):
    daemon = Daemon(netns, tmp_path, "a")
    client = None
    try:
        daemon.wait_listening()
        client = _client(netns)
        assert client.stdout is not None
        line = client.stdout.readline()
        assert line.startswith("up"), (line, client.stderr and client.stderr.read())
        # SIGTERM to the whole group: the daemon and its dataplane child
        os.killpg(daemon.proc.pid, signal.SIGTERM)
        out, err = client.communicate(timeout=60)
        assert "delete" in out, err
        assert daemon.proc.wait(timeout=30) == 0
        log = daemon.text()
        assert "down: deleted locally" in log or "down: daemon stopping" in log
        assert "restarting" not in log and "restarted (crash)" not in log
    finally:
        if client is not None and client.poll() is None:
            client.kill()
            client.wait()
        daemon.stop()


def test_serve_second_daemon_on_same_state_dir_refused(netns, tmp_path):
    first = Daemon(netns, tmp_path, "a")
    second = None
    try:
        first.wait_listening()
        second = Daemon(netns, tmp_path, "b", listen="127.0.0.2")
        assert second.proc.wait(timeout=60) == 1
        lines = second.text().splitlines()
        assert len(lines) == 1, lines
        assert "is in use by another daemon" in lines[0]
        assert f"(pid {first.proc.pid})" in lines[0]
        assert first.proc.poll() is None
    finally:
        if second is not None:
            second.stop()
        first.stop()


TUN_HOLDER = """
import fcntl, os, struct, sys, time
fd = os.open("/dev/net/tun", os.O_RDWR)
# TUNSETIFF, IFF_TUN | IFF_NO_PI: the name the daemon's first session wants
fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH", b"egs1", 0x0001 | 0x1000))
print("ready", flush=True)
sys.stdin.read()
"""


def test_serve_child_setup_failure_deletes_session(netns, tmp_path):
    holder = subprocess.Popen(
        ["ip", "netns", "exec", netns, sys.executable, "-c", TUN_HOLDER],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    daemon = None
    client = None
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "ready\n"
        daemon = Daemon(netns, tmp_path, "a")
        daemon.wait_listening()
        client = _client(netns)
        out, err = client.communicate(timeout=60)
        # the CHILD SA was negotiated, then the daemon could not build it
        assert out.startswith("up") and "delete" in out, err
        assert "not set up" in daemon.text()
        assert _show_sessions(netns, daemon) == []
    finally:
        if client is not None and client.poll() is None:
            client.kill()
            client.wait()
        if daemon is not None:
            daemon.stop()
        holder.communicate("")


def test_dataplane_counters_carry_across_restart():
    from control.dataplane import _add, _totals

    before = {"packets": 5, "bytes": 700, "next_seq": 6, "seq_blocked": 1,
              "drops": {"replay": 2, "auth": 0}}  # fmt: skip
    fresh = {"packets": 1, "bytes": 100, "next_seq": 131073, "seq_blocked": 0,
             "drops": {"replay": 0, "auth": 1}}  # fmt: skip
    total = _add(dict(fresh), _totals(before))
    assert (total["packets"], total["bytes"], total["seq_blocked"]) == (6, 800, 1)
    assert total["drops"] == {"replay": 2, "auth": 1}
    # sequence state is the new child's, never summed
    assert total["next_seq"] == 131073
