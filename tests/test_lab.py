"""Tests of the lab harness: pure parts anywhere, namespaces and strongSwan as root."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from control.lab import (
    Capture,
    ProcessSet,
    StrongSwanClient,
    StrongSwanResponder,
    Topology,
    TopologyError,
    list_netns,
    ping,
    tcp_transfer,
)
from control.lab.capture import summarize_pcap
from control.lab.strongswan import parse_raw, render_settings
from control.lab.topology import owner_alive
from control.lab.transfer import MARK_STRIDE, MARKER, generate, receive, send

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

# `swanctl --list-sas --raw` of strongSwan 5.9.8 (Debian 12), recorded on this
# machine from the client side of the lab tunnel
RAW_LIST_SAS = (
    "list-sa event {espgate {uniqueid=1 version=2 state=ESTABLISHED "
    "local-host=198.18.1.2 local-port=4500 local-id=client1@espgate.example "
    "remote-host=198.18.1.1 remote-port=4500 remote-id=vpn.espgate.example "
    "initiator=yes initiator-spi=be6807ddc8888b25 responder-spi=b3655682be927a88 "
    "nat-remote=yes nat-any=yes encr-alg=AES_GCM_16 encr-keysize=128 "
    "prf-alg=PRF_HMAC_SHA2_256 dh-group=ECP_256 established=0 rekey-time=13882 "
    "local-vips=[198.18.128.1] child-sas {espgate-1 {name=espgate uniqueid=1 "
    "reqid=1 state=INSTALLED mode=TUNNEL protocol=ESP encap=yes spi-in=70e0ae64 "
    "spi-out=f054afba encr-alg=AES_GCM_16 encr-keysize=128 bytes-in=0 "
    "packets-in=0 bytes-out=0 packets-out=0 rekey-time=3337 life-time=3960 "
    "install-time=0 local-ts=[198.18.128.1/32] remote-ts=[198.19.1.0/24]}}}}\n"
    "list-sas reply {}\n"
)

PSK = b"lab-test-psk-\x00\xff-not-secret"


# --- swanctl output and config files


def test_parse_raw_list_sas_nested_sections() -> None:
    sas = parse_raw(RAW_LIST_SAS)
    ike = sas["espgate"]
    child = ike["child-sas"]["espgate-1"]
    assert ike["state"] == "ESTABLISHED"
    assert ike["local-vips"] == ["198.18.128.1"]
    assert child["spi-in"] == "70e0ae64"
    assert child["encr-keysize"] == "128"
    assert child["remote-ts"] == ["198.19.1.0/24"]


def test_parse_raw_empty_reply_no_sas() -> None:
    assert parse_raw("list-sas reply {}\n") == {}


def test_parse_raw_dn_identity_keeps_spaces() -> None:
    text = "list-sa event {c {state=ESTABLISHED remote-id=C=CH, O=Lab, CN=gw x=1}}"
    ike = parse_raw(text)["c"]
    assert ike["remote-id"] == "C=CH, O=Lab, CN=gw"
    assert ike["x"] == "1"


def test_render_settings_nested_and_quoted() -> None:
    text = render_settings({"a": {"b": True, "c": "x y", "d": ["p", "q"], "e": 3}})
    assert text.splitlines() == [
        "a {",
        "    b = yes",
        '    c = "x y"',
        "    d = p, q",
        "    e = 3",
        "}",
    ]


def test_write_config_psk_only_in_swanctl_conf(tmp_path: Path) -> None:
    topo = Topology("egt-labc")
    client = StrongSwanClient(topo, tmp_path / "c", psk=PSK, esp="aes256gcm16")
    client.write_config()
    swanctl = client.swanctl_conf_path.read_text()
    conf = client.conf_path.read_text()
    assert f"secret = 0x{PSK.hex()}" in swanctl
    assert client.swanctl_conf_path.stat().st_mode & 0o077 == 0
    assert PSK.hex() not in conf
    assert "esp_proposals = aes256gcm16" in swanctl
    assert "vips = 0.0.0.0" in swanctl
    assert "load_modular = no" in conf
    plugins = conf.split("load = ", 1)[1].split("\n", 1)[0].strip('"').split()
    assert plugins.index("kernel-libipsec") < plugins.index("kernel-netlink")
    assert "resolve" not in plugins


def test_write_config_responder_pool_and_extra_conf(tmp_path: Path) -> None:
    topo = Topology("egt-labc")
    extra = {"children": {"espgate": {"rekey_time": "30s"}}}
    resp = StrongSwanResponder(topo, tmp_path / "r", psk=PSK, extra_conf=extra)
    resp.write_config()
    swanctl = resp.swanctl_conf_path.read_text()
    assert "addrs = 198.18.128.0/24" in swanctl
    assert "rekey_time = 30s" in swanctl
    assert "local_ts = 198.19.1.0/24" in swanctl


# --- transfer data


def test_generate_stream_deterministic_and_marked() -> None:
    nbytes = 3 * (1 << 20) + 1000
    first = b"".join(bytes(c) for c in generate(nbytes, seed=7))
    again = b"".join(bytes(c) for c in generate(nbytes, seed=7))
    other = b"".join(bytes(c) for c in generate(nbytes, seed=8))
    assert len(first) == nbytes
    assert first == again
    assert first != other
    for off in range(0, nbytes - len(MARKER), MARK_STRIDE):
        assert first[off : off + len(MARKER)] == MARKER, off
    assert first.count(MARKER) == len(range(0, nbytes - len(MARKER) + 1, MARK_STRIDE))


def test_transfer_loopback_hashes_match(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ready = tmp_path / "ready"
    got: dict[str, object] = {}
    thread = threading.Thread(
        target=lambda: got.update(receive(port, "127.0.0.1", 30.0, ready))
    )
    thread.start()
    sent = send("127.0.0.1", port, 5_000_000, seed=3, timeout=30.0)
    thread.join()
    expected = hashlib.sha256(b"".join(generate(5_000_000, 3))).hexdigest()
    assert sent["sha256"] == expected
    assert got["sha256"] == expected
    assert got["bytes"] == 5_000_000


def test_transfer_module_missing_receiver_reports_error() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    res = subprocess.run(
        [sys.executable, "-m", "control.lab.transfer", "send", "--addr", "127.0.0.1",
         "--port", str(port), "--nbytes", "1K", "--timeout", "0.3"],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    assert res.returncode == 1
    assert '"error"' in res.stdout


# --- pcap reader


def _pcap(frames: list[bytes], endian: str = "<") -> bytes:
    out = struct.pack(endian + "IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 256, 1)
    for i, frame in enumerate(frames):
        out += struct.pack(endian + "IIII", 1000 + i, 0, len(frame), len(frame))
        out += frame
    return out


def _eth(ethertype: int, payload: bytes) -> bytes:
    return b"\x02" * 6 + b"\x04" * 6 + struct.pack("!H", ethertype) + payload


def _ipv4(proto: int, payload: bytes, frag: int = 0) -> bytes:
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 1, frag, 64, proto, 0,
        bytes([198, 18, 1, 2]), bytes([198, 18, 1, 1]),
    )  # fmt: skip
    return header + payload


def _udp(sport: int, dport: int, payload: bytes) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def _frames(tcp_payload: bytes) -> list[bytes]:
    return [
        _eth(0x0800, _ipv4(17, _udp(500, 500, b"\x00" * 40))),
        _eth(0x0800, _ipv4(17, _udp(4500, 4500, b"\x00" * 4 + b"\x11" * 60))),
        _eth(0x0800, _ipv4(17, _udp(4500, 4500, b"\xff"))),
        _eth(0x0800, _ipv4(50, b"\x00\x00\x10\x01" + b"\x22" * 40)),
        _eth(0x0806, b"\x00" * 28),
        _eth(0x0800, _ipv4(6, struct.pack("!HH", 40000, 5201) + tcp_payload)),
    ]


def test_summarize_pcap_classifies_and_finds_marker(tmp_path: Path) -> None:
    path = tmp_path / "t.pcap"
    path.write_bytes(_pcap(_frames(b"\x00" * 16 + b"xx" + MARKER + b"yy")))
    summary = summarize_pcap(path)
    assert summary["packets"] == 6
    assert summary["by_proto"] == {"udp4500": 2, "udp500": 1, "esp": 1, "other": 2}
    assert summary["plaintext_marker_seen"] is True
    assert summary["other_examples"] == [
        "ethertype 0x0806",
        "tcp 198.18.1.2:40000 > 198.18.1.1:5201",
    ]


def test_summarize_pcap_without_marker_not_seen(tmp_path: Path) -> None:
    path = tmp_path / "t.pcap"
    path.write_bytes(_pcap(_frames(b"\x00" * 16 + MARKER[:-1] + b"yy"), endian=">"))
    summary = summarize_pcap(path)
    assert summary["packets"] == 6
    assert summary["plaintext_marker_seen"] is False


def test_read_pcap_torn_last_record_skipped(tmp_path: Path) -> None:
    path = tmp_path / "t.pcap"
    path.write_bytes(_pcap(_frames(b""))[:-3])
    assert summarize_pcap(path)["packets"] == 5


def test_summarize_pcap_fragment_is_other(tmp_path: Path) -> None:
    path = tmp_path / "t.pcap"
    path.write_bytes(_pcap([_eth(0x0800, _ipv4(17, b"\x00" * 30, frag=185))]))
    assert summarize_pcap(path)["by_proto"]["other"] == 1


# --- namespaces and real strongSwan peers


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@needs_root
@pytest.mark.interop
def test_topology_up_down_leaves_nothing(tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    with Topology("egt-lab", tmp_path, marker_dir=marks) as topo:
        names = set(topo.namespaces)
        assert names <= set(list_netns())
        # each namespace carries the marker that proves it ours
        assert {p.name for p in marks.iterdir()} == names
        assert ping(topo.cli, topo.hub_outer_ip, count=3)["loss_pct"] == 0.0
        assert ping(topo.srv, topo.hub_inside_ip, count=3)["received"] == 3
        fwd = topo.run(topo.hub, ["sysctl", "-n", "net.ipv4.ip_forward"]).stdout
        assert fwd.strip() == "1"
        routes = topo.run(topo.srv, ["ip", "route"]).stdout
        assert "198.18.128.0/24 via 198.19.1.1" in routes
        links = topo.run(topo.hub, ["ip", "-o", "link"]).stdout
        assert "egt-labo0" in links and "egt-labi0" in links
    assert not names & set(list_netns())
    assert not list(marks.iterdir())
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert "egt-lab" not in links


@needs_root
@pytest.mark.interop
def test_topology_ipv6_enabled_later_addresses_not_tentative(tmp_path: Path) -> None:
    # a case that turns IPv6 on (dual-stack, ipv6-pool) must get addresses in
    # use at once: with duplicate address detection the link-local stays
    # tentative, neighbour solicitations wait and the first pings queue ~1 s
    with Topology("egt-lab6", tmp_path) as topo:
        dev = topo.srv_if
        topo.run(topo.srv, ["sysctl", "-qw", f"net.ipv6.conf.{dev}.disable_ipv6=0"])
        topo.run(topo.srv, ["ip", "addr", "add", "2001:db8:19::9/64", "dev", dev])
        addrs = topo.run(topo.srv, ["ip", "-6", "-o", "addr", "show", dev]).stdout
        conf = f"/proc/sys/net/ipv6/conf/{dev}/"
        dad = topo.run(topo.srv, ["cat", conf + "accept_dad"]).stdout
        rs = topo.run(topo.srv, ["cat", conf + "router_solicitations"]).stdout
    assert "fe80::" in addrs and "2001:db8:19::9" in addrs
    assert "tentative" not in addrs
    assert dad.strip() == "0" and rs.strip() == "0"


def test_topology_names_unique_per_run_with_same_prefix() -> None:
    # what two selftests with the same ESPGATE_LAB_PREFIX would build
    one, two = Topology("egt-fxf"), Topology("egt-fxf", clients=2)
    assert one.hub.startswith(f"egt-fxf-{os.getpid()}-") and one.hub.endswith("-hub")
    assert not set(one.namespaces) & set(two.namespaces)
    # interface names keep the bare prefix: they exist only inside the run's own
    assert one.hub_outer_if == two.hub_outer_if == "egt-fxfo0"


def test_owner_alive_own_process_reused_pid_and_ended_child() -> None:
    me = os.getpid()
    with open(f"/proc/{me}/stat") as fh:
        start = int(fh.read().rpartition(")")[2].split()[19])
    assert owner_alive({"owner": me, "start": start})
    # the same PID started at another time: a reused PID, the owner is gone
    assert not owner_alive({"owner": me, "start": start + 1})
    child = subprocess.Popen(["true"])
    child.wait()
    assert not owner_alive({"owner": child.pid, "start": None})
    assert not owner_alive({})


def _netns_add(ns: str) -> None:
    subprocess.run(["ip", "netns", "add", ns], check=True)


def _netns_del(*names: str) -> None:
    for ns in names:
        if ns in list_netns():
            subprocess.run(["ip", "netns", "del", ns], check=False)


def _mark(marks: Path, ns: str, owner: int, start: int | None) -> None:
    marks.mkdir(exist_ok=True)
    doc = {"owner": owner, "start": start, "ns": ns}
    (marks / ns).write_text(json.dumps(doc))


@needs_root
@pytest.mark.parametrize("reuse", [False, True])
def test_topology_same_name_without_marker_refused_never_deleted(
    reuse: bool, tmp_path: Path
) -> None:
    marks = tmp_path / "marks"
    topo = Topology("egt-fxf", tag="t1", marker_dir=marks, reuse_stale=reuse)
    _netns_add(topo.hub)
    try:
        refused = pytest.raises(TopologyError, match=f"Namespace {topo.hub} already")
        with refused, topo:
            pass
        assert topo.hub in list_netns()
        assert topo.cli not in list_netns() and topo.srv not in list_netns()
    finally:
        _netns_del(*topo.namespaces)


@needs_root
def test_topology_marker_of_running_owner_refused(tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    topo = Topology("egt-fxf", tag="t2", marker_dir=marks, reuse_stale=True)
    _netns_add(topo.hub)
    with open(f"/proc/{os.getpid()}/stat") as fh:
        start = int(fh.read().rpartition(")")[2].split()[19])
    _mark(marks, topo.hub, os.getpid(), start)
    try:
        with pytest.raises(TopologyError, match="still runs"), topo:
            pass
        assert topo.hub in list_netns()
    finally:
        _netns_del(*topo.namespaces)


@needs_root
def test_topology_stale_namespace_of_ended_owner_deleted(tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    topo = Topology("egt-fxf", tag="t3", marker_dir=marks, reuse_stale=True)
    # a leftover of this run's name and another of an earlier run, both marked
    # with an owner that is gone, and one with the prefix but no marker
    earlier, foreign = "egt-fxf-1-dead-hub", "egt-fxf-1-else-hub"
    for ns in (topo.hub, earlier, foreign):
        _netns_add(ns)
    _mark(marks, topo.hub, os.getpid(), -1)
    _mark(marks, earlier, os.getpid(), -1)
    try:
        with topo:
            assert ping(topo.cli, topo.hub_outer_ip, count=2)["received"] == 2
            assert earlier not in list_netns() and not (marks / earlier).exists()
            assert foreign in list_netns()
        assert topo.hub not in list_netns()
        assert foreign in list_netns()
    finally:
        _netns_del(*topo.namespaces, earlier, foreign)


@needs_root
@pytest.mark.interop
def test_tunnel_strongswan_pair_carries_traffic(tmp_path: Path) -> None:
    pids: list[int] = []
    with (
        Topology("egt-lab", tmp_path) as topo,
        ProcessSet(tmp_path / "logs") as procs,
    ):
        responder = StrongSwanResponder(topo, tmp_path / "resp", psk=PSK)
        responder.start(procs)
        client = StrongSwanClient(topo, tmp_path / "cli", psk=PSK)
        client.start(procs)
        with Capture(topo.hub, topo.hub_outer_if, tmp_path / "outer.pcap") as cap:
            assert cap.pid is not None
            pids.append(cap.pid)
            assert client.initiate(), client.log_tail()
            vip = client.virtual_ip()
            assert vip is not None and vip.startswith("198.18.128.")
            result = ping(topo.cli, topo.srv_ip, count=5)
            assert result["sent"] == 5 and result["loss_pct"] == 0.0
            xfer = tcp_transfer(
                topo, src_ns=topo.cli, dst_ns=topo.srv, dst_addr=topo.srv_ip,
                nbytes=20 << 20, timeout=120,
            )  # fmt: skip
            assert xfer["match"] and xfer["bytes"] == 20 << 20
            assert xfer["sha256_sent"] == xfer["sha256_received"]
            sa = client.sa_summary()
        assert sa is not None
        assert sa["state"] == "ESTABLISHED" and sa["child_state"] == "INSTALLED"
        assert sa["encr_alg"] == "AES_GCM_16" and sa["encr_keysize"] == 128
        assert sa["encap"] and sa["bytes_out"] > 20 << 20
        summary = cap.summary()
        assert summary["by_proto"]["udp500"] >= 2
        assert summary["by_proto"]["udp4500"] > 1000
        assert summary["by_proto"]["esp"] == 0
        assert summary["by_proto"]["other"] == 0, summary["other_examples"]
        assert summary["plaintext_marker_seen"] is False
        assert PSK.hex() not in client.log_path.read_text()
        assert client.terminate()
        assert client.list_sas() == {}
        pids += procs.pids()
    assert len(pids) == 3
    assert all(_gone(pid) for pid in pids)
    assert not {"egt-lab-hub", "egt-lab-cli", "egt-lab-srv"} & set(list_netns())


@needs_root
@pytest.mark.interop
def test_capture_plaintext_transfer_marker_seen(tmp_path: Path) -> None:
    # the positive control for the leak check above: no tunnel, so the
    # marker must show up on the same interface
    with Topology("egt-lab", tmp_path) as topo:
        with Capture(topo.hub, topo.hub_outer_if, tmp_path / "plain.pcap") as cap:
            xfer = tcp_transfer(
                topo, src_ns=topo.cli, dst_ns=topo.hub, dst_addr=topo.hub_outer_ip,
                nbytes=1 << 20,
            )  # fmt: skip
        assert xfer["match"]
        summary = cap.summary()
        assert summary["plaintext_marker_seen"] is True
        assert summary["by_proto"]["other"] > 0
        assert summary["by_proto"]["udp4500"] == 0
        assert cap.pid is not None and _gone(cap.pid)


@needs_root
@pytest.mark.interop
def test_initiate_wrong_psk_fails(tmp_path: Path) -> None:
    with (
        Topology("egt-lab", tmp_path) as topo,
        ProcessSet(tmp_path / "logs") as procs,
    ):
        StrongSwanResponder(topo, tmp_path / "resp", psk=PSK).start(procs)
        client = StrongSwanClient(topo, tmp_path / "cli", psk=PSK + b"x")
        client.start(procs)
        assert client.initiate(timeout=10) is False
        assert client.virtual_ip() is None


@needs_root
@pytest.mark.interop
def test_initiate_aes256_child_then_terminate(tmp_path: Path) -> None:
    with (
        Topology("egt-lab", tmp_path) as topo,
        ProcessSet(tmp_path / "logs") as procs,
    ):
        responder = StrongSwanResponder(topo, tmp_path / "resp", psk=PSK)
        responder.start(procs)
        client = StrongSwanClient(
            topo, tmp_path / "cli", psk=PSK, esp="aes256gcm16",
            ike="aes256gcm16-prfsha384-x25519",
        )  # fmt: skip
        client.start(procs)
        assert client.initiate(), client.log_tail()
        sa = client.sa_summary()
        assert sa is not None and sa["encr_keysize"] == 256
        peer = responder.sa_summary()
        assert peer is not None and peer["virtual_ip"] == sa["virtual_ip"]
        assert peer["spi_in"] == sa["spi_out"]
        assert ping(topo.srv, sa["virtual_ip"], count=3)["loss_pct"] == 0.0
        assert client.terminate()
        assert client.list_sas() == {}
        assert ping(topo.cli, topo.srv_ip, count=2, timeout=2)["received"] == 0
