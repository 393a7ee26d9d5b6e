"""The Engine end to end: loopback checks, then two engines in two namespaces.

The namespace tests build ``egt-fp<pid>a`` and ``egt-fp<pid>b`` joined by a veth
pair (outer 198.18.0.1 / 198.18.0.2), run this file as a helper process in each
(``python tests/test_engine.py helper CONFIG``), which opens a TUN (inner
198.19.1.1 / 198.19.2.1), an Engine on UDP 4500 and manual SAs, and then obeys
JSON commands on stdin.  Engine A uses intel-ipsec-mb and B OpenSSL, so every
packet that crosses also checks the two backends against each other.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import select
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from fastpath import Engine, SAParams, crypto_backends, esp_encrypt
from fastpath.sa import ANY_TS

PID = os.getpid()
NS_A = f"egt-fp{PID}a"
NS_B = f"egt-fp{PID}b"
VETH_A = f"egfa{PID}"[:15]
VETH_B = f"egfb{PID}"[:15]
OUTER_A, OUTER_B = "198.18.0.1", "198.18.0.2"
# IPv6 documentation prefix (RFC 3849) for the IPv6 outer and inner addresses
OUTER6_A, OUTER6_B = "2001:db8:18::1", "2001:db8:18::2"
INNER6_A, INNER6_B = "2001:db8:19:1::1", "2001:db8:19:2::1"
NET6_A, NET6_B = "2001:db8:19:1::/64", "2001:db8:19:2::/64"
INNER_A, INNER_B = "198.19.1.1", "198.19.2.1"
NET_A, NET_B = "198.19.1.0/24", "198.19.2.0/24"
SPI_AB, SPI_BA = 0x0A0B0001, 0x0B0A0001
KEY_AB, SALT_AB = bytes(range(16)), b"\x01\x02\x03\x04"
KEY_BA, SALT_BA = bytes(range(32, 64)), b"\x05\x06\x07\x08"
WAIT = 15.0
UDP_SEGMENT = 103


def _wait_for(pred: Callable[[], bool], timeout: float = WAIT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


# ---------------------------------------------------------------- loopback


@pytest.fixture
def loop_engine() -> Iterator[tuple[Engine, socket.socket, queue.Queue]]:
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.setblocking(False)
    engine = Engine(udp.fileno(), batch=8)
    got: queue.Queue = queue.Queue()
    engine.start(lambda data, addr: got.put((data, addr)))
    try:
        yield engine, udp, got
    finally:
        engine.stop()
        udp.close()


def _sa(spi: int, inbound: bool, session: int = 1, **kw: Any) -> SAParams:
    return SAParams(
        spi=spi,
        inbound=inbound,
        key=bytes(16),
        salt=bytes(4),
        session=session,
        peer=("127.0.0.1", 4500),
        **kw,
    )


def test_engine_bad_fd_rejected() -> None:
    with pytest.raises(OSError):
        Engine(1_000_000)


def test_engine_bad_batch_rejected() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        with pytest.raises(ValueError):
            Engine(udp.fileno(), batch=0)
        with pytest.raises(ValueError):
            Engine(udp.fileno(), crypto="rot13")


def test_engine_bad_workers_rejected() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        with pytest.raises(ValueError):
            Engine(udp.fileno(), workers=0)
        with pytest.raises(ValueError):
            Engine(udp.fileno(), workers=65)


@pytest.mark.parametrize("reuseport", [False, True])
def test_engine_workers_siblings_only_with_reuseport(reuseport: bool) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        if reuseport:
            udp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        udp.bind(("127.0.0.1", 0))
        features = Engine(udp.fileno(), workers=3).features()
        assert features["workers"] == 3
        assert features["reuseport"] is reuseport


def test_ike_datagrams_reach_callback_from_every_worker_socket() -> None:
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    udp.bind(("127.0.0.1", 0))
    udp.setblocking(False)
    engine = Engine(udp.fileno(), workers=4)
    got: queue.Queue = queue.Queue()
    engine.start(lambda data, addr: got.put(data))
    # distinct source ports hash to different sockets of the group
    senders = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(16)]
    try:
        for i, s in enumerate(senders):
            s.sendto(b"\0\0\0\0" + bytes([i]), udp.getsockname())
        seen = sorted(got.get(timeout=WAIT)[0] for _ in senders)
        assert seen == list(range(16))
        assert engine.counters()["rx_ike"] == 16
    finally:
        engine.stop()
        for s in senders:
            s.close()
        udp.close()


def test_install_sa_without_session_rejected() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        engine = Engine(udp.fileno())
        with pytest.raises(ValueError):
            engine.install_sa(_sa(0x1000, True))


def test_install_sa_duplicate_rejected_and_remove() -> None:
    r, w = os.pipe()
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            engine = Engine(udp.fileno(), crypto="openssl")
            engine.add_session(7, r)
            engine.install_sa(_sa(0x1000, True, session=7, next_seq=5))
            engine.install_sa(_sa(0x1000, False, session=7, next_seq=5))
            with pytest.raises(ValueError):
                engine.install_sa(_sa(0x1000, True, session=7))
            assert engine.sa_counters(0x1000, False)["next_seq"] == 5
            assert engine.sa_counters(0x1000, True)["drops"] == {
                "replay": 0,
                "auth": 0,
                "malformed": 0,
                "policy": 0,
            }
            engine.remove_sa(0x1000, True)
            with pytest.raises(KeyError):
                engine.sa_counters(0x1000, True)
            engine.remove_session(7)
            with pytest.raises(KeyError):
                engine.sa_counters(0x1000, False)
            with pytest.raises(KeyError):
                engine.remove_session(7)
    finally:
        os.close(r)
        os.close(w)


def test_ike_datagram_stripped_on_loopback(loop_engine: Any) -> None:
    engine, udp, got = loop_engine
    port = udp.getsockname()[1]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
        peer.bind(("127.0.0.1", 0))
        peer.sendto(b"\0\0\0\0ike-sa-init", ("127.0.0.1", port))
        data, addr = got.get(timeout=WAIT)
        assert data == b"ike-sa-init"
        assert addr == peer.getsockname()
        engine.send_ike(b"reply", addr)
        peer.settimeout(WAIT)
        assert peer.recvfrom(100) == (b"\0\0\0\0reply", ("127.0.0.1", port))
    assert engine.counters()["rx_ike"] == 1
    assert engine.counters()["ike_tx"] == 1


def test_set_peer_unknown_session_rejected(loop_engine: Any) -> None:
    engine, _, _ = loop_engine
    r, w = os.pipe()
    try:
        engine.add_session(3, r)
        engine.install_sa(_sa(0x3000, False, session=3))
        engine.set_peer(3, ("127.0.0.2", 4501))
        with pytest.raises(KeyError):
            engine.set_peer(4, ("127.0.0.2", 4501))
        with pytest.raises(ValueError):
            engine.set_peer(3, ("::1", 4501))
        engine.remove_session(3)
    finally:
        os.close(r)
        os.close(w)


def test_ike_datagram_over_ipv6_socket() -> None:
    try:
        udp = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        udp.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")
    udp.setblocking(False)
    engine = Engine(udp.fileno(), crypto="openssl")
    got: queue.Queue = queue.Queue()
    engine.start(lambda data, addr: got.put((data, addr)))
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as peer:
            peer.bind(("::1", 0))
            peer.sendto(b"\0\0\0\0v6", udp.getsockname()[:2])
            data, addr = got.get(timeout=WAIT)
            assert (data, addr) == (b"v6", ("::1", peer.getsockname()[1]))
            engine.send_ike(b"ok", addr)
            peer.settimeout(WAIT)
            assert peer.recv(100) == b"\0\0\0\0ok"
    finally:
        engine.stop()
        udp.close()


def test_keepalive_and_unknown_spi_counted_on_loopback(loop_engine: Any) -> None:
    engine, udp, got = loop_engine
    port = udp.getsockname()[1]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
        peer.sendto(b"\xff", ("127.0.0.1", port))
        peer.sendto(b"\xde\xad\xbe\xef" + bytes(60), ("127.0.0.1", port))
        peer.sendto(b"\x12\x34", ("127.0.0.1", port))
    assert _wait_for(lambda: engine.counters()["udp_rx"] == 3)
    c = engine.counters()
    assert (c["keepalives"], c["no_sa"], c["malformed"], c["rx_ike"]) == (1, 1, 1, 0)
    assert got.empty()


def test_ike_callback_exception_counted(loop_engine: Any) -> None:
    engine, udp, got = loop_engine
    engine.stop()
    calls: list[bytes] = []

    def boom(data: bytes, addr: tuple[str, int]) -> None:
        calls.append(data)
        raise RuntimeError("control plane bug")

    engine.start(boom)
    port = udp.getsockname()[1]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
        peer.sendto(b"\0\0\0\0one", ("127.0.0.1", port))
        assert _wait_for(lambda: engine.counters()["ike_callback_errors"] == 1)
        peer.sendto(b"\0\0\0\0two", ("127.0.0.1", port))
        assert _wait_for(lambda: engine.counters()["ike_callback_errors"] == 2)
    assert calls == [b"one", b"two"]


# ---------------------------------------------------------------- namespaces


class Helper:
    """One helper process in a namespace, driven by JSON lines."""

    def __init__(self, ns: str, cfg: dict) -> None:
        self.ns = ns
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, __file__, "helper"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )
        self.pid = self.proc.pid
        self.ready = self.call(config=cfg)

    def call(self, **cmd: Any) -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], 60)
        assert ready, f"helper {self.pid} did not answer {cmd}"
        line = self.proc.stdout.readline()
        assert line, f"helper {self.pid} exited"
        reply = json.loads(line)
        assert "error" not in reply, reply["error"]
        return reply["result"]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.call(cmd="stop")
            except (AssertionError, OSError, ValueError):
                pass
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _sa_cfg(
    spi: int,
    inbound: bool,
    key: bytes,
    salt: bytes,
    peer: str,
    ts: str | list[str],
    local_ts: list[str] | None = None,
) -> dict:
    cfg = {
        "spi": spi,
        "inbound": inbound,
        "key": key.hex(),
        "salt": salt.hex(),
        "peer": [peer, 4500],
        "remote_ts": [ts] if isinstance(ts, str) else ts,
    }
    if local_ts is not None:
        cfg["local_ts"] = local_ts
    return cfg


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def _can_namespace() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    if shutil.which("ip") is None or not os.path.exists("/dev/net/tun"):
        return "needs iproute2 and /dev/net/tun"
    if "ipsec-mb" not in crypto_backends():
        return "needs intel-ipsec-mb"
    return None


def _tunnel(
    names: tuple[str, str, str, str], options: dict
) -> Iterator[tuple[Helper, Helper]]:
    reason = _can_namespace()
    if reason:
        pytest.skip(reason)
    ns_a, ns_b, veth_a, veth_b = names
    helpers: list[Helper] = []
    try:
        _run("ip", "netns", "add", ns_a)
        _run("ip", "netns", "add", ns_b)
        _run("ip", "link", "add", veth_a, "type", "veth", "peer", "name", veth_b)
        _run("ip", "link", "set", veth_a, "netns", ns_a)
        _run("ip", "link", "set", veth_b, "netns", ns_b)
        outer6 = options.get("outer6", False)
        for ns, dev, addr, addr6 in (
            (ns_a, veth_a, OUTER_A, OUTER6_A),
            (ns_b, veth_b, OUTER_B, OUTER6_B),
        ):
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            _run("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            if outer6:
                _run("ip", "-n", ns, "addr", "add", f"{addr6}/64", "dev", dev, "nodad")
            _run("ip", "-n", ns, "link", "set", dev, "up")
        peer_a, peer_b = (OUTER6_A, OUTER6_B) if outer6 else (OUTER_A, OUTER_B)
        ts_a = [NET_A, NET6_A] if options.get("inner6") else [NET_A]
        ts_b = [NET_B, NET6_B] if options.get("inner6") else [NET_B]
        cfg_a = {
            "crypto": "ipsec-mb",
            "inner": INNER_A,
            "remote_net": NET_B,
            "remote_net6": NET6_B,
            "veth": veth_a,
            "sas": [
                _sa_cfg(SPI_AB, False, KEY_AB, SALT_AB, peer_b, ts_b),
                _sa_cfg(SPI_BA, True, KEY_BA, SALT_BA, peer_b, ts_b),
            ],
            **options,
        }
        cfg_b = {
            "crypto": "openssl",
            "inner": INNER_B,
            "remote_net": NET_A,
            "remote_net6": NET6_A,
            "veth": veth_b,
            "sas": [
                _sa_cfg(SPI_BA, False, KEY_BA, SALT_BA, peer_a, ts_a),
                _sa_cfg(SPI_AB, True, KEY_AB, SALT_AB, peer_a, ts_a),
            ],
            **options,
        }
        if options.get("inner6"):
            cfg_a["inner6"], cfg_b["inner6"] = INNER6_A, INNER6_B
        helpers.append(Helper(ns_a, cfg_a))
        helpers.append(Helper(ns_b, cfg_b))
        yield helpers[0], helpers[1]
    finally:
        for h in helpers:
            h.close()
        for ns in (ns_a, ns_b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.fixture(scope="module")
def tunnel() -> Iterator[tuple[Helper, Helper]]:
    yield from _tunnel((NS_A, NS_B, VETH_A, VETH_B), {})


@pytest.fixture(scope="module")
def esn_tunnel() -> Iterator[tuple[Helper, Helper]]:
    # ESN SAs whose 64-bit counter starts 16 packets below the 32-bit boundary
    names = (f"egt-fp{PID}e", f"egt-fp{PID}f", f"egfe{PID}"[:15], f"egff{PID}"[:15])
    extra = {"esn": True, "next_seq": 0xFFFFFFF0}
    yield from _tunnel(names, {"sa_extra": extra})


@pytest.fixture(scope="module")
def plain_tunnel() -> Iterator[tuple[Helper, Helper]]:
    # every offload off: plain TUN, one datagram per sendmmsg slot, no coalescing
    names = (f"egt-fp{PID}c", f"egt-fp{PID}d", f"egfc{PID}"[:15], f"egfd{PID}"[:15])
    off = {"gso": False, "gro": False, "coalesce": False}
    yield from _tunnel(names, {"offload": False, "engine": off})


@pytest.fixture(scope="module")
def reuseport_tunnel() -> Iterator[tuple[Helper, Helper]]:
    # two workers, each with its own SO_REUSEPORT socket on 4500
    names = (f"egt-fp{PID}g", f"egt-fp{PID}h", f"egfg{PID}"[:15], f"egfh{PID}"[:15])
    yield from _tunnel(names, {"reuseport": True, "engine": {"workers": 2}})


@pytest.fixture(scope="module")
def raw_tunnel() -> Iterator[tuple[Helper, Helper]]:
    # SAs without UDP encapsulation: raw ESP, IP protocol 50
    names = (f"egt-fp{PID}i", f"egt-fp{PID}j", f"egfi{PID}"[:15], f"egfj{PID}"[:15])
    yield from _tunnel(names, {"sa_extra": {"encap": False}})


@pytest.fixture(scope="module")
def inner6_tunnel() -> Iterator[tuple[Helper, Helper]]:
    # IPv6 and IPv4 inside, ESP in UDP over IPv4
    names = (f"egt-fp{PID}k", f"egt-fp{PID}l", f"egfk{PID}"[:15], f"egfl{PID}"[:15])
    yield from _tunnel(names, {"inner6": True})


@pytest.fixture(scope="module")
def outer6_tunnel() -> Iterator[tuple[Helper, Helper]]:
    # IPv6 and IPv4 inside, ESP in UDP over IPv6 (AF_INET6 sockets)
    names = (f"egt-fp{PID}m", f"egt-fp{PID}n", f"egfm{PID}"[:15], f"egfn{PID}"[:15])
    yield from _tunnel(names, {"inner6": True, "outer6": True})


@pytest.fixture(scope="module")
def raw6_tunnel() -> Iterator[tuple[Helper, Helper]]:
    # raw ESP over IPv6
    names = (f"egt-fp{PID}o", f"egt-fp{PID}p", f"egfo{PID}"[:15], f"egfp{PID}"[:15])
    opts = {"inner6": True, "outer6": True, "sa_extra": {"encap": False}}
    yield from _tunnel(names, opts)


def _ping_in(ns: str, dest: str, count: int) -> None:
    done = subprocess.run(
        ["ip", "netns", "exec", ns, "ping", "-c", str(count), "-i", "0.2"]
        + ["-W", "5", dest],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def _ping(count: int) -> None:
    done = subprocess.run(
        ["ip", "netns", "exec", NS_A, "ping", "-c", str(count), "-i", "0.2"]
        + ["-W", "5", INNER_B],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def _in_drops(h: Helper, spi: int, reason: str) -> int:
    return int(h.call(cmd="sa_counters", spi=spi, inbound=True)["drops"][reason])


def test_ping_crosses_tunnel(tunnel: tuple[Helper, Helper]) -> None:
    a, b = tunnel
    _ping(3)
    assert a.call(cmd="sa_counters", spi=SPI_AB, inbound=False)["packets"] >= 3
    assert b.call(cmd="sa_counters", spi=SPI_AB, inbound=True)["packets"] >= 3
    assert a.call(cmd="sa_counters", spi=SPI_BA, inbound=True)["packets"] >= 3


def test_udp_round_trip_byte_exact(tunnel: tuple[Helper, Helper]) -> None:
    a, b = tunnel
    port = b.call(cmd="udp_echo", host=INNER_B)
    payload = bytes(range(256)) * 4
    echoed = a.call(cmd="udp_rt", host=INNER_B, port=port, payload=payload.hex())
    assert bytes.fromhex(echoed) == payload


def test_tcp_round_trip_byte_exact(tunnel: tuple[Helper, Helper]) -> None:
    a, b = tunnel
    port = b.call(cmd="tcp_echo", host=INNER_B)
    size = 300_000
    sent, received = a.call(cmd="tcp_rt", host=INNER_B, port=port, size=size)
    assert sent == received
    assert a.call(cmd="counters")["udp_tx"] > size // 1400


def test_tcp_super_packets_segmented_and_coalesced(
    tunnel: tuple[Helper, Helper],
) -> None:
    a, b = tunnel
    port = b.call(cmd="tcp_echo", host=INNER_B)
    size = 4_000_000
    before_a, before_b = a.call(cmd="counters"), b.call(cmd="counters")
    sent, received = a.call(cmd="tcp_rt", host=INNER_B, port=port, size=size)
    assert sent == received
    ca, cb = a.call(cmd="counters"), b.call(cmd="counters")
    features = a.call(cmd="features")
    assert {k: features[k] for k in ("udp_gso", "udp_gro", "tun_coalesce")} == {
        "udp_gso": True,
        "udp_gro": True,
        "tun_coalesce": True,
    }
    # TSO super-packets from the TUN were cut and sent as UDP GSO runs ...
    assert ca["tun_gso_rx"] > before_a["tun_gso_rx"]
    assert ca["tun_segments"] - before_a["tun_segments"] > size // 1400
    assert ca["udp_gso_tx"] > before_a["udp_gso_tx"]
    # ... arrived as GRO datagrams and went into B's TUN as TCP super-packets
    assert cb["udp_gro_rx"] > before_b["udp_gro_rx"]
    assert cb["tun_gro_tx"] > before_b["tun_gro_tx"]
    assert cb["tun_malformed"] == 0 and ca["tun_malformed"] == 0


def test_udp_super_packet_segmented(tunnel: tuple[Helper, Helper]) -> None:
    a, b = tunnel
    port = b.call(cmd="udp_sink", host=INNER_B)
    before = a.call(cmd="counters")["tun_gso_rx"]
    payload = bytes((i * 13) & 0xFF for i in range(8000))
    # one send with UDP_SEGMENT: the TUN hands the engine a UDP_L4 super-packet
    a.call(cmd="udp_gso_send", host=INNER_B, port=port, payload=payload.hex(), seg=1000)
    got = b.call(cmd="udp_sink_get", count=8)
    assert [bytes.fromhex(g) for g in got] == [
        payload[i : i + 1000] for i in range(0, 8000, 1000)
    ]
    assert a.call(cmd="counters")["tun_gso_rx"] > before


def test_tcp_round_trip_without_offloads(plain_tunnel: tuple[Helper, Helper]) -> None:
    a, b = plain_tunnel
    port = b.call(cmd="tcp_echo", host=INNER_B)
    sent, received = a.call(cmd="tcp_rt", host=INNER_B, port=port, size=1_000_000)
    assert sent == received
    for h in (a, b):
        c = h.call(cmd="counters")
        assert c["tun_gso_rx"] == c["udp_gso_tx"] == c["udp_gro_rx"] == 0
        assert c["tun_gro_tx"] == 0
        assert c["udp_tx"] > 1_000_000 // 1400
        features = h.call(cmd="features")
        assert not any(features[k] for k in ("udp_gso", "udp_gro", "tun_coalesce"))


def test_esn_counter_crosses_32_bits(esn_tunnel: tuple[Helper, Helper]) -> None:
    a, b = esn_tunnel
    port = b.call(cmd="tcp_echo", host=INNER_B)
    sent, received = a.call(cmd="tcp_rt", host=INNER_B, port=port, size=300_000)
    assert sent == received
    # RFC 4303 appendix A: the receiver follows the high half it never sees
    assert a.call(cmd="sa_counters", spi=SPI_AB, inbound=False)["next_seq"] > 1 << 32
    assert b.call(cmd="sa_counters", spi=SPI_AB, inbound=True)["highest_seq"] > 1 << 32
    assert _in_drops(b, SPI_AB, "auth") == _in_drops(b, SPI_AB, "replay") == 0


def test_replayed_datagram_counted_replay(tunnel: tuple[Helper, Helper]) -> None:
    a, b = tunnel
    _ping(1)
    captured = bytes.fromhex(b.call(cmd="captured"))
    assert int.from_bytes(captured[:4], "big") == SPI_AB
    before = _in_drops(b, SPI_AB, "replay")
    b.call(cmd="inject", payload=captured.hex())
    assert _wait_for(lambda: _in_drops(b, SPI_AB, "replay") == before + 1)


def test_corrupted_datagram_counted_auth(tunnel: tuple[Helper, Helper]) -> None:
    a, b = tunnel
    _ping(1)
    bad = bytearray.fromhex(b.call(cmd="captured"))
    # a sequence number never sent passes the replay check; the ICV then fails
    bad[4:8] = (0x7FFF0000).to_bytes(4, "big")
    bad[20] ^= 0x01
    before = _in_drops(b, SPI_AB, "auth")
    highest = b.call(cmd="sa_counters", spi=SPI_AB, inbound=True)["highest_seq"]
    b.call(cmd="inject", payload=bytes(bad).hex())
    assert _wait_for(lambda: _in_drops(b, SPI_AB, "auth") == before + 1)
    # RFC 4303 section 3.4.3: the window did not move for the forged number
    assert b.call(cmd="sa_counters", spi=SPI_AB, inbound=True)["highest_seq"] == highest


def test_foreign_inner_source_counted_policy(tunnel: tuple[Helper, Helper]) -> None:
    a, b = tunnel
    sa = SAParams(
        spi=SPI_AB,
        inbound=False,
        key=KEY_AB,
        salt=SALT_AB,
        session=1,
        peer=(OUTER_B, 4500),
    )
    # 198.19.99.1 -> 198.19.2.1, outside B's remote_ts 198.19.1.0/24
    inner = bytes.fromhex("4500001c0000000040110000c6136301c6130201") + bytes(8)
    before = _in_drops(b, SPI_AB, "policy")
    highest = b.call(cmd="sa_counters", spi=SPI_AB, inbound=True)["highest_seq"]
    # stay inside the window so A's own later packets still fit
    packet = esp_encrypt(sa, highest + 100, inner)
    b.call(cmd="inject", payload=packet.hex())
    assert _wait_for(lambda: _in_drops(b, SPI_AB, "policy") == before + 1)


def test_unknown_spi_counted_no_sa(tunnel: tuple[Helper, Helper]) -> None:
    a, b = tunnel
    before = b.call(cmd="counters")["no_sa"]
    b.call(cmd="inject", payload=(b"\xde\xad\xbe\xef" + bytes(60)).hex())
    assert _wait_for(lambda: b.call(cmd="counters")["no_sa"] == before + 1)


def test_ike_datagram_reaches_callback_stripped(tunnel: tuple[Helper, Helper]) -> None:
    a, b = tunnel
    got = b.call(cmd="ike", payload=(b"\0\0\0\0" + b"IKE_SA_INIT").hex())
    assert bytes.fromhex(got["data"]) == b"IKE_SA_INIT"
    assert got["addr"][0] == "127.0.0.1"
    assert bytes.fromhex(got["reply"]) == b"\0\0\0\0ack"


def test_keepalive_counted(tunnel: tuple[Helper, Helper]) -> None:
    a, b = tunnel
    before = b.call(cmd="counters")["keepalives"]
    b.call(cmd="inject", payload="ff")
    assert _wait_for(lambda: b.call(cmd="counters")["keepalives"] == before + 1)


def test_rekey_make_before_break(tunnel: tuple[Helper, Helper]) -> None:
    a, b = tunnel
    new_spi = SPI_AB + 1
    key, salt = bytes(range(100, 132)), b"\x09\x09\x09\x09"
    # responder installs the new inbound SA first, then the sender switches
    b.call(cmd="install", sa=_sa_cfg(new_spi, True, key, salt, OUTER_A, NET_A))
    a.call(cmd="install", sa=_sa_cfg(new_spi, False, key, salt, OUTER_B, NET_B))
    a.call(cmd="remove", spi=SPI_AB, inbound=False)
    _ping(2)
    assert b.call(cmd="sa_counters", spi=new_spi, inbound=True)["packets"] >= 2
    # the old inbound SA stays until the control plane removes it
    b.call(cmd="remove", spi=SPI_AB, inbound=True)


def test_tcp_round_trip_reuseport_workers(
    reuseport_tunnel: tuple[Helper, Helper],
) -> None:
    a, b = reuseport_tunnel
    assert a.call(cmd="features")["reuseport"] is True
    port = b.call(cmd="tcp_echo", host=INNER_B)
    sent, received = a.call(cmd="tcp_rt", host=INNER_B, port=port, size=2_000_000)
    assert sent == received
    assert b.call(cmd="sa_counters", spi=SPI_AB, inbound=True)["packets"] > 100


def test_raw_esp_ping_and_tcp_cross(raw_tunnel: tuple[Helper, Helper]) -> None:
    a, b = raw_tunnel
    _ping_in(raw_tunnel[0].ns, INNER_B, 3)
    port = b.call(cmd="tcp_echo", host=INNER_B)
    sent, received = a.call(cmd="tcp_rt", host=INNER_B, port=port, size=500_000)
    assert sent == received
    ca, cb = a.call(cmd="counters"), b.call(cmd="counters")
    assert ca["raw_tx"] > 3 and cb["raw_rx"] > 3
    # nothing went through UDP 4500
    assert ca["udp_tx"] == cb["udp_rx"] == 0


def test_udp_esp_for_raw_sa_counted_wrong_encap(
    raw_tunnel: tuple[Helper, Helper],
) -> None:
    a, b = raw_tunnel
    sa = SAParams(
        spi=SPI_AB,
        inbound=False,
        key=KEY_AB,
        salt=SALT_AB,
        session=1,
        peer=(OUTER_B, 4500),
        remote_ts=(NET_B,),
    )
    inner = bytes.fromhex("4500001c0000000040110000c6130101c6130201") + bytes(8)
    before = b.call(cmd="counters")["wrong_encap"]
    b.call(cmd="inject", payload=esp_encrypt(sa, 0x10000, inner).hex())
    assert _wait_for(lambda: b.call(cmd="counters")["wrong_encap"] == before + 1)


def test_raw_esp_over_ipv6_round_trips(raw6_tunnel: tuple[Helper, Helper]) -> None:
    a, b = raw6_tunnel
    for host in (INNER_B, INNER6_B):
        port = b.call(cmd="udp_echo", host=host)
        payload = bytes(range(256)) * 3
        echoed = a.call(cmd="udp_rt", host=host, port=port, payload=payload.hex())
        assert bytes.fromhex(echoed) == payload
    assert a.call(cmd="counters")["raw_tx"] >= 2
    assert b.call(cmd="counters")["raw_rx"] >= 2


def test_ipv6_inner_udp_and_tcp_over_ipv4(
    inner6_tunnel: tuple[Helper, Helper],
) -> None:
    a, b = inner6_tunnel
    _ping_in(a.ns, INNER6_B, 2)
    port = b.call(cmd="udp_echo", host=INNER6_B)
    payload = bytes(range(256)) * 4
    echoed = a.call(cmd="udp_rt", host=INNER6_B, port=port, payload=payload.hex())
    assert bytes.fromhex(echoed) == payload
    port = b.call(cmd="tcp_echo", host=INNER6_B)
    sent, received = a.call(cmd="tcp_rt", host=INNER6_B, port=port, size=1_000_000)
    assert sent == received
    assert b.call(cmd="sa_counters", spi=SPI_AB, inbound=True)["drops"]["policy"] == 0


def test_ipv6_outer_carries_both_inner_families(
    outer6_tunnel: tuple[Helper, Helper],
) -> None:
    a, b = outer6_tunnel
    for host in (INNER_B, INNER6_B):
        port = b.call(cmd="tcp_echo", host=host)
        sent, received = a.call(cmd="tcp_rt", host=host, port=port, size=1_000_000)
        assert sent == received
    assert a.call(cmd="counters")["udp_tx"] > 1_000_000 // 1400


# ---------------------------------------------------------------- helper side


SPI_ICMP, SPI_TCP = 0x0A0B0101, 0x0A0B0102
KEY_ICMP, SALT_ICMP = bytes(range(64, 80)), b"\x0a\x0b\x0c\x0d"
KEY_TCP, SALT_TCP = bytes(range(80, 112)), b"\x0e\x0f\x10\x11"


@pytest.fixture(scope="module")
def multisa_tunnel() -> Iterator[tuple[Helper, Helper]]:
    """A sends ICMP on one SA and TCP on another, chosen by selector; B checks both."""
    names = (f"egt-fp{PID}ma", f"egt-fp{PID}mb", f"egfma{PID}"[:15], f"egfmb{PID}"[:15])
    for a, b in _tunnel(names, {}):
        for spi, key, salt, proto in (
            (SPI_ICMP, KEY_ICMP, SALT_ICMP, 1),
            (SPI_TCP, KEY_TCP, SALT_TCP, 6),
        ):
            sel = f"{NET_B}[{proto}/0-65535]"
            inbound = _sa_cfg(spi, True, key, salt, OUTER_A, NET_A, [sel])
            b.call(cmd="install", sa=inbound)
            a.call(cmd="install", sa=_sa_cfg(spi, False, key, salt, OUTER_B, sel))
        # the catch-all SA goes: what neither selector takes has no SA now
        a.call(cmd="remove", spi=SPI_AB, inbound=False)
        yield a, b


def _in_packets(h: Helper, spi: int) -> int:
    return int(h.call(cmd="sa_counters", spi=spi, inbound=True)["packets"])


def test_multisa_ping_rides_icmp_sa(multisa_tunnel: tuple[Helper, Helper]) -> None:
    a, b = multisa_tunnel
    tcp_before = _in_packets(b, SPI_TCP)
    _ping_in(a.ns, INNER_B, 3)
    assert _in_packets(b, SPI_ICMP) >= 3
    assert _in_packets(b, SPI_TCP) == tcp_before
    assert _in_drops(b, SPI_ICMP, "policy") == 0


def test_multisa_tcp_round_trip_byte_exact_on_tcp_sa(
    multisa_tunnel: tuple[Helper, Helper],
) -> None:
    a, b = multisa_tunnel
    icmp_before = _in_packets(b, SPI_ICMP)
    port = b.call(cmd="tcp_echo", host=INNER_B)
    sent, received = a.call(cmd="tcp_rt", host=INNER_B, port=port, size=1_000_000)
    assert sent == received
    assert _in_packets(b, SPI_TCP) > 100
    assert _in_packets(b, SPI_ICMP) == icmp_before
    assert _in_drops(b, SPI_TCP, "policy") == 0


def test_multisa_udp_without_selector_counted_no_policy(
    multisa_tunnel: tuple[Helper, Helper],
) -> None:
    a, b = multisa_tunnel
    before = a.call(cmd="counters")["no_policy"]
    sent = a.call(cmd="counters")["udp_tx"]
    a.call(cmd="udp_send", host=INNER_B, port=9, payload="00" * 32)
    assert _wait_for(lambda: a.call(cmd="counters")["no_policy"] == before + 1)
    assert a.call(cmd="counters")["udp_tx"] == sent


def _esp_for(spi: int, key: bytes, salt: bytes, seq: int, inner: bytes) -> bytes:
    sa = SAParams(spi=spi, inbound=False, key=key, salt=salt, session=1,
                  peer=(OUTER_B, 4500))  # fmt: skip
    return esp_encrypt(sa, seq, inner)


def test_multisa_inbound_protocol_checked(
    multisa_tunnel: tuple[Helper, Helper],
) -> None:
    a, b = multisa_tunnel
    # 198.19.1.1 -> 198.19.2.1 UDP 9 -> 9: a protocol neither SA selects
    udp = bytes.fromhex("4500001c0000000040110000c6130101c6130201") + bytes.fromhex(
        "0009000900080000"
    )
    # the same addresses as ICMP echo (type 8): what the ICMP SA selects
    icmp = bytes.fromhex("4500001c0000000040010000c6130101c6130201") + bytes.fromhex(
        "0800f7ff00000000"
    )
    highest = int(b.call(cmd="sa_counters", spi=SPI_ICMP, inbound=True)["highest_seq"])
    before = _in_drops(b, SPI_ICMP, "policy")
    packets = _in_packets(b, SPI_ICMP)
    b.call(cmd="inject", payload=_esp_for(SPI_ICMP, KEY_ICMP, SALT_ICMP,
                                          highest + 50, udp).hex())  # fmt: skip
    assert _wait_for(lambda: _in_drops(b, SPI_ICMP, "policy") == before + 1)
    # the twin that fits the selectors is delivered
    b.call(cmd="inject", payload=_esp_for(SPI_ICMP, KEY_ICMP, SALT_ICMP,
                                          highest + 51, icmp).hex())  # fmt: skip
    assert _wait_for(lambda: _in_packets(b, SPI_ICMP) == packets + 1)
    assert _in_drops(b, SPI_ICMP, "policy") == before + 1


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _serve_echo_udp(host: str) -> int:
    s = socket.socket(_family(host), socket.SOCK_DGRAM)
    s.bind((host, 0))

    def loop() -> None:
        while True:
            data, addr = s.recvfrom(65535)
            s.sendto(data, addr)

    threading.Thread(target=loop, daemon=True).start()
    return int(s.getsockname()[1])


def _serve_sink_udp(host: str, sink: queue.Queue) -> int:
    s = socket.socket(_family(host), socket.SOCK_DGRAM)
    s.bind((host, 0))

    def loop() -> None:
        while True:
            sink.put(s.recv(65535))

    threading.Thread(target=loop, daemon=True).start()
    return int(s.getsockname()[1])


def _serve_echo_tcp(host: str) -> int:
    srv = socket.socket(_family(host), socket.SOCK_STREAM)
    srv.bind((host, 0))
    srv.listen(4)

    def loop() -> None:
        while True:
            conn, _ = srv.accept()
            with conn:
                while chunk := conn.recv(65536):
                    conn.sendall(chunk)

    threading.Thread(target=loop, daemon=True).start()
    return int(srv.getsockname()[1])


def _tcp_round_trip(host: str, port: int, size: int) -> list[str]:
    data = bytes((i * 131 + 7) & 0xFF for i in range(size))
    out = bytearray()
    with socket.create_connection((host, port), timeout=30) as c:
        sender = threading.Thread(target=c.sendall, args=(data,))
        sender.start()
        while len(out) < size:
            chunk = c.recv(65536)
            if not chunk:
                break
            out += chunk
        sender.join()
    return [hashlib.sha256(data).hexdigest(), hashlib.sha256(out).hexdigest()]


class _Sniffer:
    """Keep the newest ESP-in-UDP datagram arriving on the veth (AF_PACKET)."""

    def __init__(self, dev: str) -> None:
        self.sock = socket.socket(
            socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0800)
        )
        self.sock.bind((dev, 0x0800))
        self.last: bytes | None = None
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        while True:
            pkt, addr = self.sock.recvfrom(65535)
            if addr[2] == socket.PACKET_OUTGOING or pkt[9] != 17:
                continue
            ihl = (pkt[0] & 0x0F) * 4
            dport = struct.unpack("!H", pkt[ihl + 2 : ihl + 4])[0]
            esp = pkt[ihl + 8 :]
            if dport == 4500 and len(esp) > 8 and esp[:4] != b"\0\0\0\0":
                self.last = esp


def _helper() -> None:
    from fastpath import open_tun

    out = sys.stdout
    ike: queue.Queue = queue.Queue()
    engine: Engine | None = None
    sniffer: _Sniffer | None = None
    keep: list[Any] = []
    sink: queue.Queue = queue.Queue()

    def sa_params(d: dict) -> SAParams:
        return SAParams(
            spi=d["spi"],
            inbound=d["inbound"],
            key=bytes.fromhex(d["key"]),
            salt=bytes.fromhex(d["salt"]),
            session=1,
            peer=(d["peer"][0], d["peer"][1]),
            remote_ts=tuple(d["remote_ts"]),
            local_ts=tuple(d.get("local_ts", ANY_TS)),
            esn=d.get("esn", False),
            next_seq=d.get("next_seq", 1),
            encap=d.get("encap", True),
        )

    def configure(cfg: dict) -> str:
        nonlocal engine, sniffer
        outer6 = cfg.get("outer6", False)
        udp = socket.socket(
            socket.AF_INET6 if outer6 else socket.AF_INET, socket.SOCK_DGRAM
        )
        if cfg.get("reuseport"):
            udp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        udp.bind(("::" if outer6 else "0.0.0.0", 4500))
        udp.setblocking(False)
        fd, ifname = open_tun("egtfp%d", 1400, offload=cfg.get("offload", True))
        keep.extend([udp, fd])
        if cfg.get("inner6"):
            subprocess.run(
                ["ip", "-6", "addr", "add", f"{cfg['inner6']}/128", "dev", ifname]
                + ["nodad"],
                check=True,
            )
            subprocess.run(
                ["ip", "-6", "route", "add", cfg["remote_net6"], "dev", ifname]
                + ["src", cfg["inner6"]],
                check=True,
            )
        subprocess.run(
            ["ip", "addr", "add", f"{cfg['inner']}/32", "dev", ifname], check=True
        )
        subprocess.run(
            [
                "ip",
                "route",
                "add",
                cfg["remote_net"],
                "dev",
                ifname,
                "src",
                cfg["inner"],
            ],
            check=True,
        )
        sniffer = _Sniffer(cfg["veth"])
        engine = Engine(
            udp.fileno(), batch=32, crypto=cfg["crypto"], **cfg.get("engine", {})
        )
        engine.add_session(1, fd)
        for d in cfg["sas"]:
            engine.install_sa(sa_params({**d, **cfg.get("sa_extra", {})}))
        engine.start(lambda data, addr: ike.put((data, addr)))
        return ifname

    def inject(payload: str) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(bytes.fromhex(payload), ("127.0.0.1", 4500))

    def ike_exchange(payload: str) -> dict:
        assert engine is not None
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            s.settimeout(WAIT)
            s.sendto(bytes.fromhex(payload), ("127.0.0.1", 4500))
            data, addr = ike.get(timeout=WAIT)
            engine.send_ike(b"ack", addr)
            reply = s.recv(100)
        return {"data": data.hex(), "addr": list(addr), "reply": reply.hex()}

    def captured() -> str:
        assert sniffer is not None
        assert _wait_for(lambda: sniffer.last is not None), "nothing captured"
        assert sniffer.last is not None
        return sniffer.last.hex()

    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            op = cmd.get("cmd")
            result: Any = None
            if "config" in cmd:
                result = configure(cmd["config"])
            elif op == "stop":
                if engine is not None:
                    engine.stop()
                out.write(json.dumps({"result": None}) + "\n")
                out.flush()
                return
            elif op == "counters":
                assert engine is not None
                result = engine.counters()
            elif op == "sa_counters":
                assert engine is not None
                result = engine.sa_counters(cmd["spi"], cmd["inbound"])
            elif op == "install":
                assert engine is not None
                engine.install_sa(sa_params(cmd["sa"]))
            elif op == "remove":
                assert engine is not None
                engine.remove_sa(cmd["spi"], cmd["inbound"])
            elif op == "udp_echo":
                result = _serve_echo_udp(cmd["host"])
            elif op == "tcp_echo":
                result = _serve_echo_tcp(cmd["host"])
            elif op == "features":
                assert engine is not None
                result = engine.features()
            elif op == "udp_sink":
                result = _serve_sink_udp(cmd["host"], sink)
            elif op == "udp_sink_get":
                result = [sink.get(timeout=WAIT).hex() for _ in range(cmd["count"])]
            elif op == "udp_gso_send":
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    s.setsockopt(socket.IPPROTO_UDP, UDP_SEGMENT, cmd["seg"])
                    s.sendto(bytes.fromhex(cmd["payload"]), (cmd["host"], cmd["port"]))
            elif op == "udp_rt":
                with socket.socket(_family(cmd["host"]), socket.SOCK_DGRAM) as s:
                    s.settimeout(WAIT)
                    s.sendto(bytes.fromhex(cmd["payload"]), (cmd["host"], cmd["port"]))
                    result = s.recv(65535).hex()
            elif op == "udp_send":
                with socket.socket(_family(cmd["host"]), socket.SOCK_DGRAM) as s:
                    s.sendto(bytes.fromhex(cmd["payload"]), (cmd["host"], cmd["port"]))
            elif op == "tcp_rt":
                result = _tcp_round_trip(cmd["host"], cmd["port"], cmd["size"])
            elif op == "captured":
                result = captured()
            elif op == "inject":
                inject(cmd["payload"])
            elif op == "ike":
                result = ike_exchange(cmd["payload"])
            else:
                raise ValueError(f"unknown command {op!r}")
            out.write(json.dumps({"result": result}) + "\n")
        except Exception as exc:  # report, keep serving
            out.write(json.dumps({"error": repr(exc)}) + "\n")
        out.flush()


if __name__ == "__main__" and sys.argv[1:] == ["helper"]:
    _helper()
