"""Netlink XFRM encoding (fastpath.xfrm) and the host side of fastpath.kernel.

Byte layouts are checked against the C structures of <linux/xfrm.h> as laid out
on x86_64 (offsets hand-derived from the header).  The host kernel here has
XFRM but neither ESP nor GCM: policies round-trip through it, SAs do not (the
guest tests in test_guest.py cover those), and the probe must say why.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
from pathlib import Path

import pytest

from fastpath import SAParams
from fastpath import xfrm as X
from fastpath.kernel import (
    REQID_BASE,
    REQID_SPAN,
    KernelEngine,
    is_ours,
    probe_kernel,
    reqid_for,
)
from fastpath.xfrm import ReplayState

# struct xfrm_algo_aead for rfc4106(gcm(aes)), key 000102..0f, salt a0a1a2a3:
# alg_name[64] NUL padded, alg_key_len 160 bits, alg_icv_len 128 bits, key||salt
# (hand-assembled from <linux/xfrm.h>, little-endian x86_64)
AEAD_VECTOR = (
    "726663343130362867636d286165732929000000000000000000000000000000"
    "0000000000000000000000000000000000000000000000000000000000000000"
    "a000000080000000000102030405060708090a0b0c0d0e0fa0a1a2a3"
)
# struct xfrm_replay_state_esn, window 64 (bmp_len 2): oseq 0x1_00000001,
# seq 0x20, bitmap {3, 0x80000000} (hand-assembled from <linux/xfrm.h>)
ESN_VECTOR = "0200000001000000200000000100000000000000400000000300000000000080"

NEED_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
NEED_IP = pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2")


def _sa(**kw: object) -> SAParams:
    base: dict[str, object] = {
        "spi": 0x01020304,
        "inbound": False,
        "key": bytes(range(16)),
        "salt": bytes.fromhex("a0a1a2a3"),
        "session": 5,
        "peer": ("198.18.0.2", 4500),
        "local": ("198.18.0.1", 4500),
    }
    base.update(kw)
    return SAParams(**base)  # type: ignore[arg-type]


# -- structures ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "size"),
    [
        (X.xfrm_usersa_info, 224),
        (X.xfrm_usersa_id, 24),
        (X.xfrm_userpolicy_info, 168),
        (X.xfrm_userpolicy_id, 64),
        (X.xfrm_aevent_id, 48),
    ],
)
def test_encode_struct_size_matches_kernel(cls: type, size: int) -> None:
    msg = cls()
    msg.encode()
    assert len(msg.data) == 16 + size


def test_encode_attr_struct_sizes_match_kernel() -> None:
    for cls, size in ((X._XfrmAttrs.user_tmpl, 64), (X._XfrmAttrs.encap_tmpl, 24)):
        attr = cls()
        attr.encode()
        assert len(attr.data) == 4 + size, cls.__name__


def test_push_aead_matches_vector() -> None:
    raw = X.push_aead(bytes(range(16)), bytes.fromhex("a0a1a2a3"))
    assert raw.hex() == AEAD_VECTOR


def test_pull_aead_roundtrip() -> None:
    name, material, icv = X.pull_aead(bytes.fromhex(AEAD_VECTOR))
    assert (name, material.hex(), icv) == (
        "rfc4106(gcm(aes))",
        "000102030405060708090a0b0c0d0e0fa0a1a2a3",
        128,
    )


def test_pull_aead_truncated_raises() -> None:
    with pytest.raises(ValueError, match="Truncated"):
        X.pull_aead(bytes.fromhex(AEAD_VECTOR)[:-1])


def test_push_replay_esn_matches_vector() -> None:
    state = ReplayState(oseq=0x1_00000001, seq=0x20, replay_window=64)
    state.bitmap = [3, 0x80000000]
    assert X.push_replay_esn(state).hex() == ESN_VECTOR


def test_pull_replay_esn_roundtrip() -> None:
    state = X.pull_replay_esn(bytes.fromhex(ESN_VECTOR))
    assert state == ReplayState(0x1_00000001, 0x20, 64, [3, 0x80000000])


def test_pull_replay_esn_truncated_raises() -> None:
    with pytest.raises(ValueError, match="Truncated"):
        X.pull_replay_esn(bytes.fromhex(ESN_VECTOR)[:-4])


def test_encode_newsa_field_offsets() -> None:
    msg = X.xfrm_usersa_info()
    msg.update(X.selector("0.0.0.0/0", "0.0.0.0/0"))
    msg["id_daddr"] = X.pack_address("198.18.0.2")
    msg["id_spi"] = 0x01020304
    msg["id_proto"] = X.IPPROTO_ESP
    msg["saddr"] = X.pack_address("198.18.0.1")
    msg["reqid"] = 0xE5600005
    msg["family"] = socket.AF_INET
    msg["mode"] = X.XFRM_MODE_TUNNEL
    msg["flags"] = X.XFRM_STATE_ESN
    msg["attrs"] = [("XFRMA_ALG_AEAD", bytes.fromhex(AEAD_VECTOR))]
    raw = X.encode(msg, X.XFRM_MSG_NEWSA, X.NLM_F_REQUEST | X.NLM_F_ACK, 9)
    body = raw[16:]

    # nlmsghdr: length, type 0x10, flags, sequence
    assert struct.unpack_from("=IHHI", raw) == (16 + 224 + 4 + 92, 0x10, 5, 9)
    # xfrm_id at 56: daddr, then the SPI in network order, then the protocol
    assert body[56:60] == bytes([198, 18, 0, 2])
    assert body[72:77] == bytes.fromhex("0102030432")
    assert body[80:84] == bytes([198, 18, 0, 1])
    # seq 204, reqid 208, family 212, mode 214, replay_window 215, flags 216
    assert struct.unpack_from("=IIHBBB", body, 204) == (0, 0xE5600005, 2, 1, 0, 128)
    # the AEAD attribute follows at 224: nla_len, nla_type 18
    assert struct.unpack_from("=HH", body, 224) == (4 + 92, 18)


def test_encode_policy_template_offsets() -> None:
    msg = X.xfrm_userpolicy_info()
    msg.update(X.selector("198.19.1.0/24", "198.19.2.1/32"))
    msg["dir"] = X.XFRM_POLICY_FWD
    msg["priority"] = 0x3000
    tmpl = {
        "daddr": X.pack_address("198.18.0.1"),
        "proto": X.IPPROTO_ESP,
        "family": socket.AF_INET,
        "saddr": X.pack_address("198.18.0.2"),
        "reqid": 0xE5600001,
        "mode": 1,
    }
    msg["attrs"] = [("XFRMA_TMPL", tmpl)]
    body = X.encode(msg, X.XFRM_MSG_NEWPOLICY, 1)[16:]

    # selector: daddr 0, saddr 16, family 40, prefixlen_d 42, prefixlen_s 43
    assert body[0:4] == bytes([198, 19, 2, 1]) and body[16:20] == bytes([198, 19, 1, 0])
    assert struct.unpack_from("=HBB", body, 40) == (2, 32, 24)
    assert struct.unpack_from("=IIB", body, 152) == (0x3000, 0, 2)
    # xfrm_user_tmpl after the 4-octet attribute header: family 24, saddr 28,
    # reqid 44, mode 48
    tm = body[168 + 4 :]
    assert struct.unpack_from("=HH", body, 168) == (68, X.XFRMA_TMPL)
    assert tm[20] == X.IPPROTO_ESP and struct.unpack_from("=H", tm, 24) == (2,)
    assert tm[28:32] == bytes([198, 18, 0, 2])
    assert struct.unpack_from("=IB", tm, 44) == (0xE5600001, 1)


def test_decode_reply_ipv6_addresses() -> None:
    msg = X.xfrm_usersa_info()
    msg["id_daddr"] = X.pack_address("2001:db8::2")
    msg["saddr"] = X.pack_address("2001:db8::1")
    msg["family"] = socket.AF_INET6
    raw = X.encode(msg, X.XFRM_MSG_NEWSA, 0)
    back = X.xfrm_usersa_info(raw)
    back.decode()
    assert X.unpack_address(back["id_daddr"], back["family"]) == "2001:db8::2"
    assert X.unpack_address(back["saddr"], back["family"]) == "2001:db8::1"


def test_decode_error_text_from_capped_ack() -> None:
    text = b"Requested AEAD algorithm not found\x00"
    tlv = struct.pack("=HH", 4 + len(text), X.NLMSGERR_ATTR_MSG) + text
    tlv += b"\x00" * (-len(tlv) % 4)
    echoed = struct.pack("=IHHII", 40, X.XFRM_MSG_NEWSA, 5, 1, 0)
    body = struct.pack("=i", -38) + echoed + tlv
    head = struct.pack("=IHHII", 16 + len(body), X.NLMSG_ERROR, X.NLM_F_CAPPED, 1, 0)
    assert X._error_text(head + body) == "Requested AEAD algorithm not found"


def test_decode_truncated_netlink_raises() -> None:
    raw = struct.pack("=IHHII", 64, X.NLMSG_DONE, 0, 1, 0)
    with pytest.raises(ValueError, match="Bad netlink message length"):
        list(X.decode(raw))


# -- sequence and ownership rules -----------------------------------------------------


def test_replay_seen_closed_window() -> None:
    state = ReplayState.closed_below(5000, 1024)
    assert state.seen(5000) and state.seen(3977) and state.seen(1)
    assert not state.seen(5001)


def test_replay_seen_open_bits() -> None:
    state = ReplayState(seq=40, replay_window=64, bitmap=[0, 0])
    state.bitmap[(39 - 1) // 32] |= 1 << ((39 - 1) % 32)
    assert state.seen(39) and not state.seen(38) and not state.seen(41)
    assert state.seen(40 - 64)  # below the window counts as seen


def test_reqid_marks_ours_only() -> None:
    assert reqid_for(0) == REQID_BASE and is_ours(reqid_for(REQID_SPAN - 1))
    assert not is_ours(7) and not is_ours(REQID_BASE + REQID_SPAN)
    with pytest.raises(AssertionError):
        reqid_for(REQID_SPAN)


# -- against the host kernel ----------------------------------------------------------


def _netns_names() -> set[str]:
    path = Path("/run/netns")
    return set(os.listdir(path)) if path.is_dir() else set()


@NEED_ROOT
def test_probe_kernel_host_reports_unavailable() -> None:
    before = _netns_names()
    ok, reason = probe_kernel()
    if ok:
        pytest.skip(f"this kernel has ESP and GCM: {reason}")
    assert "not available" in reason or "refused" in reason, reason
    # the scratch namespace is anonymous: nothing named may appear for it
    # (other runs on a shared machine may add their own names meanwhile)
    assert not {n for n in _netns_names() - before if "probe" in n}


@pytest.fixture
def scratch_netns() -> object:
    name = f"egt-xfrmt-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)


def _ip(ns: str, *argv: str) -> str:
    return subprocess.run(
        ["ip", "-n", ns, *argv], check=True, capture_output=True, text=True
    ).stdout


@NEED_ROOT
@NEED_IP
def test_install_policies_roundtrip_through_kernel(scratch_netns: str) -> None:
    eng = KernelEngine(netns=scratch_netns)
    try:
        eng.install_policies(
            3, local="198.18.0.1", peer="198.18.0.2",
            local_ts=("198.19.1.0/24",), remote_ts=("198.19.2.1/32",),
        )  # fmt: skip
        text = _ip(scratch_netns, "xfrm", "policy", "list", "dir", "out")
        assert "src 198.19.1.0/24 dst 198.19.2.1/32" in text, text
        assert "tmpl src 198.18.0.1 dst 198.18.0.2" in text, text
        assert f"reqid {reqid_for(3)}" in text and "mode tunnel" in text, text
        fwd = _ip(scratch_netns, "xfrm", "policy", "list", "dir", "fwd")
        assert "src 198.19.2.1/32 dst 198.19.1.0/24" in fwd, fwd
        assert eng.remove_policies(3, ("out",)) == 1
        assert _ip(scratch_netns, "xfrm", "policy", "list", "dir", "out") == ""
    finally:
        eng.close()


@NEED_ROOT
@NEED_IP
def test_cleanup_spares_foreign_policy(scratch_netns: str) -> None:
    _ip(scratch_netns, "xfrm", "policy", "add", "src", "198.19.9.0/24", "dst",
        "198.19.8.0/24", "dir", "out", "tmpl", "src", "198.18.9.1", "dst",
        "198.18.9.2", "proto", "esp", "reqid", "7", "mode", "tunnel")  # fmt: skip
    before = _ip(scratch_netns, "xfrm", "policy")
    eng = KernelEngine(netns=scratch_netns)
    try:
        eng.install_policies(1, local="198.18.0.1", peer="198.18.0.2")
        eng.install_policies(
            2, local="2001:db8::1", peer="2001:db8::2",
            local_ts=("::/0",), remote_ts=("2001:db8:1::/64",),
        )  # fmt: skip
        assert len(eng.dump_policies()) == 7
        assert eng.cleanup() == (0, 6)
        assert _ip(scratch_netns, "xfrm", "policy") == before
    finally:
        eng.close()


@NEED_ROOT
def test_install_sa_host_refused_with_reason(scratch_netns: str) -> None:
    ok, _ = probe_kernel()
    if ok:
        pytest.skip("this kernel has ESP and GCM")
    eng = KernelEngine(netns=scratch_netns)
    try:
        with pytest.raises(X.XfrmError) as info:
            eng.install_sa(_sa())
        assert "algorithm" in str(info.value) or "type" in str(info.value)
        assert eng.dump_states() == []
    finally:
        eng.close()


# -- port blocks, selectors with ports, MIGRATE ------------------------------------


def test_port_blocks_union_equals_range_exhaustive() -> None:
    # every range inside 0..63, with the kernel's match rule (p ^ port) & mask
    for lo in range(64):
        for hi in range(lo, 64):
            blocks = X.port_blocks(lo, hi)
            matched = {
                p for p in range(128) if any((p ^ b) & m == 0 for b, m in blocks)
            }
            assert matched == set(range(lo, hi + 1)), (lo, hi, blocks)
            # aligned power-of-two blocks, disjoint: their sizes add up
            sizes = [(~m & 0xFFFF) + 1 for _, m in blocks]
            assert sum(sizes) == hi - lo + 1
            assert all(
                b & (size - 1) == 0 for (b, _), size in zip(blocks, sizes, strict=True)
            )
            # minimal: no two neighbours are buddies that one block could cover
            for (b1, _), s1, s2 in zip(blocks, sizes, sizes[1:], strict=False):
                assert not (s1 == s2 and b1 % (2 * s1) == 0), (lo, hi, blocks)


def test_port_blocks_minimal_for_known_ranges() -> None:
    assert X.port_blocks(0, 65535) == [(0, 0)]
    assert X.port_blocks(5201, 5201) == [(5201, 0xFFFF)]
    assert X.port_blocks(1024, 65535) == [
        (1024, 0xFC00), (2048, 0xF800), (4096, 0xF000), (8192, 0xE000),
        (16384, 0xC000), (32768, 0x8000),
    ]  # fmt: skip
    # the worst case of a 16-bit range: 2 * 16 - 2 blocks
    assert len(X.port_blocks(1, 65534)) == 30


def test_port_blocks_inverted_range_asserts() -> None:
    with pytest.raises(AssertionError):
        X.port_blocks(10, 9)


def test_parse_ts_renders_of_trafficsel() -> None:
    nets, proto, ports = X.parse_ts("198.19.1.0/24[6/5201-5201]")
    assert [str(n) for n in nets] == ["198.19.1.0/24"]
    assert (proto, ports) == (6, (5201, 5201))
    nets, proto, ports = X.parse_ts("10.0.0.1-10.0.0.6")
    assert [str(n) for n in nets] == [
        "10.0.0.1/32", "10.0.0.2/31", "10.0.0.4/31", "10.0.0.6/32"
    ]  # fmt: skip
    assert (proto, ports) == (0, (0, 65535))


def test_parse_ts_opaque_or_junk_raises() -> None:
    with pytest.raises(ValueError):
        X.parse_ts("10.0.0.0/8[17/65535-0]")  # OPAQUE ports
    with pytest.raises(ValueError):
        X.parse_ts("10.0.0.0/8[tcp]")


def test_policy_selectors_ports_and_protocol() -> None:
    sels = X.policy_selectors("198.19.1.0/24[6/5201-5201]", "198.19.2.1/32")
    assert len(sels) == 1
    sel = sels[0]
    assert (sel["sel_proto"], sel["sel_sport"], sel["sel_sport_mask"]) == (
        6, 5201, 0xFFFF
    )  # fmt: skip
    assert (sel["sel_dport"], sel["sel_dport_mask"]) == (0, 0)
    # the reverse direction swaps the ports
    (back,) = X.policy_selectors("198.19.2.1/32", "198.19.1.0/24[6/5201-5201]")
    assert (back["sel_dport"], back["sel_dport_mask"], back["sel_sport"]) == (
        5201, 0xFFFF, 0
    )  # fmt: skip


def test_policy_selectors_conflicting_protocols_empty() -> None:
    assert X.policy_selectors("10.0.0.0/8[6/0-65535]", "0.0.0.0/0[17/53-53]") == []
    assert X.policy_selectors("10.0.0.0/8", "::/0") == []


def test_encode_selector_ports_offsets() -> None:
    msg = X.xfrm_userpolicy_id()
    msg.update(X.selector("10.0.0.0/8", "0.0.0.0/0", proto=17, sport=(1000, 0xFFF8),
                          dport=(53, 0xFFFF)))  # fmt: skip
    msg["dir"] = X.XFRM_POLICY_OUT
    body = X.encode(msg, X.XFRM_MSG_DELPOLICY, 0)[16:]
    # struct xfrm_selector: dport, dport_mask, sport, sport_mask at 32 (network
    # order), proto at 44
    assert struct.unpack_from(">4H", body, 32) == (53, 0xFFFF, 1000, 0xFFF8)
    assert body[44] == 17


def test_kernel_selectors_cap_raises() -> None:
    from fastpath.kernel import MAX_SELECTORS, kernel_selectors

    outs, ins = kernel_selectors(("198.19.1.0/24[6/1024-65535]",), ("0.0.0.0/0",))
    assert len(outs) == len(ins) == 6
    # 30 local port blocks x 30 remote port blocks
    with pytest.raises(ValueError, match=str(MAX_SELECTORS)):
        kernel_selectors(("198.19.1.0/24[6/1-65534]",), ("0.0.0.0/0[6/1-65534]",))


# struct xfrm_user_migrate: old_daddr 198.18.0.2, old_saddr 198.18.0.1,
# new_daddr 198.18.7.9, new_saddr 198.18.0.1, proto 50, mode 1, reserved 0,
# reqid 0xe5600005, old_family 2, new_family 2 (hand-assembled from
# <linux/xfrm.h>, little-endian x86_64)
MIGRATE_VECTOR = (
    "c6120002" + "00" * 12 + "c6120001" + "00" * 12
    + "c6120709" + "00" * 12 + "c6120001" + "00" * 12
    + "32010000" + "050060e5" + "0200" + "0200"
)  # fmt: skip


def test_push_migrate_matches_vector() -> None:
    move = X.Migration("198.18.0.1", "198.18.0.2", "198.18.0.1", "198.18.7.9",
                       reqid_for(5))  # fmt: skip
    raw = X.push_migrate([move])
    assert raw.hex() == MIGRATE_VECTOR
    assert len(raw) == 76


def test_pull_migrate_roundtrip_ipv6() -> None:
    moves = [
        X.Migration("2001:db8::1", "2001:db8::2", "2001:db8::1", "2001:db8::9", 7),
        X.Migration("2001:db8::2", "2001:db8::1", "2001:db8::9", "2001:db8::1", 7),
    ]
    assert X.pull_migrate(X.push_migrate(moves)) == moves


def test_pull_migrate_truncated_raises() -> None:
    with pytest.raises(ValueError):
        X.pull_migrate(bytes.fromhex(MIGRATE_VECTOR)[:-1])


def test_encode_migrate_message_roundtrip() -> None:
    msg = X.xfrm_userpolicy_id()
    msg.update(X.selector("198.19.1.0/24", "198.19.2.1/32"))
    msg["dir"] = X.XFRM_POLICY_OUT
    move = X.Migration("198.18.0.1", "198.18.0.2", "198.18.0.1", "198.18.7.9", 5)
    msg["attrs"] = [
        ("XFRMA_MIGRATE", X.push_migrate([move])),
        ("XFRMA_ENCAP", {"type": 2, "sport": 4500, "dport": 31000, "oa": b""}),
    ]
    raw = X.encode(msg, X.XFRM_MSG_MIGRATE, X.NLM_F_ACK)
    ((kind, _, body),) = list(X.decode(raw))
    assert kind == X.XFRM_MSG_MIGRATE
    back = X.MSG_CLASSES[kind](body)
    back.decode()
    assert X.pull_migrate(back.get_attr("XFRMA_MIGRATE")) == [move]
    encap = back.get_attr("XFRMA_ENCAP")
    assert (encap["sport"], encap["dport"]) == (4500, 31000)
    # the encap template's ports travel in network order
    assert struct.pack(">H", 31000) in raw[-24:]


@NEED_ROOT
@NEED_IP
def test_migrate_policies_moves_templates_in_kernel(scratch_netns: str) -> None:
    eng = KernelEngine(netns=scratch_netns)
    try:
        eng.install_policies(
            4, local="198.18.0.1", peer="198.18.0.2",
            local_ts=("198.19.1.0/24[6/5201-5201]",), remote_ts=("198.19.2.1/32",),
        )  # fmt: skip
        try:
            moved = eng.migrate_policies(4, "198.18.0.1", "198.18.0.2",
                                         ("198.18.7.9", 31000), 4500)  # fmt: skip
        except X.XfrmError as exc:
            if exc.errno == 92:  # ENOPROTOOPT: no CONFIG_XFRM_MIGRATE here
                pytest.skip(f"kernel without XFRM_MIGRATE: {exc}")
            raise
        assert moved == 3
        out = _ip(scratch_netns, "xfrm", "policy", "list", "dir", "out")
        assert "proto tcp sport 5201" in out, out
        assert "tmpl src 198.18.0.1 dst 198.18.7.9" in out, out
        fwd = _ip(scratch_netns, "xfrm", "policy", "list", "dir", "fwd")
        assert "proto tcp dport 5201" in fwd, fwd
        assert "tmpl src 198.18.7.9 dst 198.18.0.1" in fwd, fwd
        assert "198.18.0.2" not in _ip(scratch_netns, "xfrm", "policy")
        assert eng.remove_policies(4) == 3
    finally:
        eng.close()
