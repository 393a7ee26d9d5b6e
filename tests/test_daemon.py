"""The daemon around the core: refusals at start, the control socket."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from control.daemon import StartupError, _claim_socket_path

ESPGATE = str(Path(sys.executable).with_name("espgate"))


def test_claim_socket_path_refuses_regular_file(tmp_path):
    victim = tmp_path / "important.txt"
    victim.write_text("keep me")
    with pytest.raises(StartupError, match="not a socket"):
        _claim_socket_path(victim)
    assert victim.read_text() == "keep me"


def test_claim_socket_path_refuses_live_socket(tmp_path):
    path = tmp_path / "ctl.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as live:
        live.bind(str(path))
        live.listen()
        with pytest.raises(StartupError, match="another daemon"):
            _claim_socket_path(path)
        assert path.exists()


def test_claim_socket_path_removes_stale_socket(tmp_path):
    path = tmp_path / "ctl.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as gone:
        gone.bind(str(path))
    _claim_socket_path(path)
    assert not path.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a namespace")
def test_serve_refuses_port_in_use_without_traceback(tmp_path):
    ns = f"egt-dmn{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    blocker = None
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        # hold UDP 500 on loopback inside the namespace
        blocker = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-c",
             "import socket,time; s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);"
             "s.bind(('127.0.0.1',500)); print('ready',flush=True); time.sleep(60)"],
            stdout=subprocess.PIPE, text=True)
        assert blocker.stdout is not None and blocker.stdout.readline() == "ready\n"
        sock = tmp_path / "ctl.sock"
        proc = subprocess.run(
            ["ip", "netns", "exec", ns, ESPGATE, "serve", "--listen", "127.0.0.1",
             "--control-socket", str(sock)],
            capture_output=True, text=True, timeout=60)
        assert proc.returncode == 1
        assert "cannot bind UDP 127.0.0.1:500" in proc.stderr
        assert "Traceback" not in proc.stderr
        assert not sock.exists()
    finally:
        if blocker is not None:
            blocker.terminate()
            blocker.wait(timeout=10)
        subprocess.run(["ip", "netns", "del", ns], check=False)
        time.sleep(0.1)


# -- replay windows between the engine and XFRM (live moves) --------------------


def test_window_of_kernel_state_matches_engine_layout():
    from control.daemon import Headend
    from fastpath.xfrm import ReplayState

    # kernel bitmap: seq s is bit (s - 1) mod 64; seen 10, 9, 7 of top 10
    bits = (1 << 9) | (1 << 8) | (1 << 6)
    state = ReplayState(0, 10, 64, [bits, 0])
    top, seen = Headend._window_of(state, 64)
    # engine layout: bit i is top - i, and 10 or more below top is too old
    assert top == 10
    assert [i for i in range(10) if seen >> i & 1] == [0, 1, 3]


def test_state_of_engine_window_round_trips():
    from control.daemon import Headend

    window = (1 << 32) + 40, 0b1011
    state = Headend._state_of(window, 64, 64)
    assert state.seen(window[0]) and state.seen(window[0] - 1)
    assert not state.seen(window[0] - 2) and state.seen(window[0] - 3)
    assert not state.seen(window[0] - 63)
    assert Headend._window_of(state, 64) == window


def test_state_of_marks_beyond_engine_size_seen():
    from control.daemon import Headend

    # a kernel window wider than the engine's: older numbers count as seen
    state = Headend._state_of((200, 0b1), 64, 128)
    assert state.seen(200) and not state.seen(199)
    assert state.seen(200 - 64) and state.seen(200 - 127)


# -- control socket answers ------------------------------------------------------


def _headend(tmp_path):
    from control import config as configmod
    from control.daemon import Headend

    config = configmod.replace_server(configmod.load(None),
                                      state_dir=str(tmp_path / "state"))
    return Headend(config)


def test_control_sa_move_unknown_spi_error_without_quotes(tmp_path):
    answer = _headend(tmp_path).control("sa-move", {"spi": "deadbeef", "to": "kernel"})
    assert answer == {"error": "no CHILD SA with SPI deadbeef"}


@pytest.mark.parametrize("asked", ["d6f7d064", "6d97c98e"])
def test_control_sa_move_same_engine_names_the_spi_asked(tmp_path, asked):
    # third new-user report, item 10: the outbound SPI was answered with the
    # inbound one
    from types import SimpleNamespace

    headend = _headend(tmp_path)
    session = SimpleNamespace(children=[(0x6D97C98E, 0xD6F7D064)], engine="userspace")
    headend.sessions["s1"] = session  # type: ignore[assignment]
    answer = headend.control("sa-move", {"spi": asked, "to": "userspace"})
    assert answer == {
        "moved": False,
        "engine": "userspace",
        "spi": asked,
        "spi_in": "6d97c98e",
        "spi_out": "d6f7d064",
    }


def test_control_client_json_array_is_a_clear_error(tmp_path):
    import asyncio
    import json

    class Writer:
        def __init__(self):
            self.data = b""

        def write(self, data):
            self.data += data

        async def drain(self):
            pass

        def close(self):
            pass

    async def ask(line):
        reader = asyncio.StreamReader()
        reader.feed_data(line)
        reader.feed_eof()
        writer = Writer()
        await _headend(tmp_path)._control_client(reader, writer)
        return json.loads(writer.data)

    answer = asyncio.run(ask(b"[1, 2]\n"))
    assert answer == {"error": "bad request: expected a JSON object, got a list"}


def test_state_lock_second_holder_refused(tmp_path):
    from control.daemon import StateLock

    first = StateLock(tmp_path / "state")
    try:
        held = rf"in use by another daemon \(pid {os.getpid()}\)"
        with pytest.raises(StartupError, match=held):
            StateLock(tmp_path / "state")
    finally:
        first.release()
    StateLock(tmp_path / "state").release()


def test_check_state_dir_probe_leaves_nothing(tmp_path):
    from control.seqstore import check_state_dir

    check_state_dir(tmp_path / "a" / "b")
    assert not (tmp_path / "a").exists()
