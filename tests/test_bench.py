"""Smoke tests of the benchmarks: schemas and sanity, never speed.

The crypto test runs `bench crypto --quick` (every backend, two sizes); the
packets test runs `bench packets --quick` for plain, espgate and kernel with
2-second iperf3 runs in namespaces of its own (root only).  The raw loops are
also checked directly: a loop that does no work must not pass for a fast one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from bench import _rawloops
from bench.cli import main
from bench.common import (
    INTERRUPTED_STATUS,
    RESULTS_DIR,
    OutputError,
    check_outputs,
    interruptible,
    json_path,
    write_outputs,
)
from bench.crypto import BACKENDS, make_runner, openssl_speed
from bench.packets import MODES, TRAFFIC, probe_kernel_esp, udp_payload

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
needs_iperf = pytest.mark.skipif(shutil.which("iperf3") is None, reason="needs iperf3")

CRYPTO_KEYS = {"backend", "size", "key_bits", "op", "ns_per_packet", "gbytes_per_s"}
PACKET_KEYS = {
    "mode",
    "traffic",
    "gbit_per_s",
    "pps",
    "loss_pct",
    "cpu_s_per_gb",
    "available",
    "reason",
    "emulated",
}


def _is_pos(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


def test_raw_loops_positive_time_each_backend() -> None:
    for loop in (_rawloops.ipsec_mb_loop, _rawloops.openssl_evp_loop):
        for decrypt in (False, True):
            assert loop(bytes(16), 64, 1000, decrypt) > 0
            assert loop(bytes(32), 1400, 100, decrypt) > 0


def test_raw_loops_bad_arguments_rejected() -> None:
    with pytest.raises(AssertionError):
        _rawloops.ipsec_mb_loop(bytes(15), 64, 10, False)
    with pytest.raises(AssertionError):
        _rawloops.openssl_evp_loop(bytes(16), 0, 10, False)
    with pytest.raises(AssertionError):
        _rawloops.openssl_evp_loop(bytes(16), 64, 0, True)


def test_versions_name_libraries() -> None:
    assert _rawloops.ipsec_mb_version().count(".") >= 1
    assert _rawloops.openssl_version().startswith("OpenSSL")


def test_engine_runner_decrypt_verifies_every_row() -> None:
    # the decrypt runner asserts that every row of its batch authenticated
    for backend in ("espgate", "espgate-openssl"):
        runner = make_runner(backend, 512, 256, "decrypt", batch=8)
        assert runner(16) > 0


def test_engine_runner_decrypt_tampered_row_fails() -> None:
    for backend in ("espgate", "espgate-openssl"):
        runner = make_runner(backend, 512, 128, "decrypt", batch=8)
        template = getattr(runner, "template")  # noqa: B009
        template[3, 40] ^= 0x01
        with pytest.raises(AssertionError, match="only 7 rows verified"):
            runner(16)


def test_openssl_speed_parses_positive() -> None:
    assert openssl_speed(64, 128, "encrypt") > 0


def test_bench_crypto_quick_schema(tmp_path: Path) -> None:
    out = tmp_path / "crypto.json"
    assert main(["crypto", "--quick", "--no-progress", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    points = doc["points"]
    assert {p["backend"] for p in points} == set(BACKENDS)
    for p in points:
        assert p.keys() >= CRYPTO_KEYS, p
        assert p["op"] in ("encrypt", "decrypt")
        assert p["key_bits"] in (128, 256)
        assert _is_pos(p["ns_per_packet"]) and _is_pos(p["gbytes_per_s"]), p
        assert p["ns_min"] <= p["ns_per_packet"] <= p["ns_max"]
    assert set(doc["machine"]["cpu_flags"]) == {
        "aes", "avx2", "avx512f", "vaes", "vpclmulqdq"
    }  # fmt: skip
    for lib in ("intel-ipsec-mb", "openssl-libcrypto", "cryptography", "numpy"):
        assert doc["versions"][lib]
    md = out.with_suffix(".md").read_text()
    assert "espgate / ipsec-mb-raw" in md and "espgate / openssl-evp" in md
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # --quick alone: one repeat of 0.01 s samples, and the document says so
    assert (doc["config"]["repeat"], doc["config"]["seconds_per_sample"]) == (1, 0.01)
    assert "median over 1 repeats of 0.01 s" in md


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["crypto", "--repeat", "-1"], "argument --repeat: must be >= 1, got -1"),
        (["crypto", "--repeat", "0"], "argument --repeat: must be >= 1, got 0"),
        (["crypto", "--batch", "0"], "argument --batch: must be from 1 to 1024"),
        (["crypto", "--batch", "5000"], "argument --batch: must be from 1 to 1024"),
        (["crypto", "--seconds", "-1"], "argument --seconds: must be > 0, got -1"),
        (["crypto", "--seconds", "0"], "argument --seconds: must be > 0, got 0"),
        (["crypto", "--seconds", "inf"], "argument --seconds: not a finite number"),
        (["crypto", "--repeat", "two"], "argument --repeat: not an integer: 'two'"),
        (["packets", "--duration", "0.5"], "argument --duration: must be >= 1"),
        (["packets", "--repeat", "0"], "argument --repeat: must be >= 1, got 0"),
        (["packets", "--workers", "0"], "argument --workers: must be from 1 to 64"),
        (["packets", "--guest-timeout", "-5"], "argument --guest-timeout: must be"),
    ],
)
def test_bench_arguments_bad_number_exits_2_with_message(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "never.json"
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--json", str(out)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())


def test_bench_arguments_good_numbers_accepted() -> None:
    # the twin of the rejections: the same checks let sane values through
    import argparse

    from bench import crypto

    parser = argparse.ArgumentParser()
    crypto.add_arguments(parser)
    args = parser.parse_args(["--repeat", "1", "--batch", "1024", "--seconds", "0.01"])
    assert (args.repeat, args.batch, args.seconds) == (1, 1024, 0.01)


def test_interruptible_ctrl_c_one_line_status_130(capsys) -> None:
    def run() -> int:
        raise KeyboardInterrupt

    assert interruptible("espgate bench crypto", run) == INTERRUPTED_STATUS == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        "espgate bench crypto: interrupted, no results written"
    ]
    assert interruptible("x", lambda: 0) == 0


def _plot_ok(path: Path) -> None:
    path.write_bytes(b"\x89PNG new")


def test_write_outputs_writes_all_three(tmp_path: Path) -> None:
    paths = write_outputs(tmp_path / "r.json", {"a": 1}, "# md\n", _plot_ok)
    assert [p.name for p in paths] == ["r.json", "r.md", "r.png"]
    assert json.loads(paths[0].read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r.md", "r.png"]


def test_write_outputs_interrupted_in_plot_keeps_previous_set(tmp_path: Path) -> None:
    write_outputs(tmp_path / "r.json", {"run": 1}, "# first\n", _plot_ok)

    def plot_interrupted(path: Path) -> None:
        path.write_bytes(b"half a png")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_outputs(tmp_path / "r.json", {"run": 2}, "# second\n", plot_interrupted)
    # the first run's three files, untouched, and no temporary file left over
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r.md", "r.png"]
    assert json.loads((tmp_path / "r.json").read_text()) == {"run": 1}
    assert (tmp_path / "r.md").read_text() == "# first\n"
    assert (tmp_path / "r.png").read_bytes() == b"\x89PNG new"


def test_write_outputs_interrupted_first_run_writes_nothing(tmp_path: Path) -> None:
    def plot_interrupted(path: Path) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_outputs(tmp_path / "r.json", {}, "", plot_interrupted)
    assert not list(tmp_path.iterdir())


def test_udp_loops_count_every_datagram_on_loopback() -> None:
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx,
    ):
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        rx.bind(("127.0.0.1", 0))
        rx.setblocking(False)
        tx.connect(rx.getsockname())
        # bounded by count: 1000 datagrams, then the loop stops by itself
        sent, refused, ns = _rawloops.udp_send_loop(tx.fileno(), 36, 0.0, 30.0, 1000)
        assert (sent, refused) == (1000, 0) and ns > 0
        got, nbytes, _, late = _rawloops.udp_recv_loop(rx.fileno(), 36, 30.0, 0.3)
        assert (got, nbytes, late) == (1000, 36_000, 0)


def test_udp_loops_bad_arguments_rejected() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        with pytest.raises(AssertionError):
            _rawloops.udp_send_loop(s.fileno(), 4, 0.0, 1.0, 10)
        with pytest.raises(AssertionError):
            _rawloops.udp_send_loop(s.fileno(), 64, -1.0, 1.0, 10)
        with pytest.raises(AssertionError):
            _rawloops.udp_recv_loop(s.fileno(), 64, 1.0, 0.0)


def test_udp_payload_fits_ip_size() -> None:
    assert udp_payload("udp-1400") == 1372
    assert udp_payload("udp-64") == 36


@needs_root
def test_kernel_probe_reason_when_unavailable() -> None:
    ok, reason = probe_kernel_esp()
    assert ok or "rfc4106" in reason


@needs_root
@needs_iperf
def test_bench_packets_quick_plain_espgate_schema(tmp_path: Path) -> None:
    out = tmp_path / "packets.json"
    argv = ["packets", "--quick", "--no-progress", "--duration", "2"]
    argv += ["--modes", "plain", "espgate", "kernel", "--json", str(out)]
    assert main(argv) == 0
    doc = json.loads(out.read_text())
    points = doc["points"]
    assert {(p["mode"], p["traffic"]) for p in points} == {
        (m, t) for m in ("plain", "espgate", "kernel") for t in TRAFFIC
    }
    for p in points:
        assert p.keys() >= PACKET_KEYS, p
        assert p["mode"] in MODES and p["emulated"] is False
        if p["mode"] == "kernel":
            continue
        assert p["available"] is True, p
        assert _is_pos(p["gbit_per_s"]) and _is_pos(p["cpu_s_per_gb"]), p
        if p["traffic"].startswith("udp-"):
            assert _is_pos(p["pps"]) and 0 <= p["loss_pct"] <= 100, p
    kernel = [p for p in points if p["mode"] == "kernel"]
    ok, _ = probe_kernel_esp()
    if not ok:
        # this host's kernel has no ESP/GCM: listed, not measured, with the reason
        assert all(p["available"] is False and p["reason"] for p in kernel)
        assert "kernel-cli" not in doc["peers"]
    else:
        # measured through XFRM, and nothing of ours left in the namespaces
        assert all(p["available"] and _is_pos(p["gbit_per_s"]) for p in kernel)
        assert doc["peers"]["kernel-hub"]["sa_in"]["packets"] > 0
        for listing in doc["peers"]["kernel-cleanup"].values():
            assert listing == {"state": "", "policy": ""}
    # the espgate peers really carried the traffic, in both directions
    peers = doc["peers"]
    assert peers["espgate-cli"]["sa_out"]["packets"] > 0
    assert peers["espgate-hub"]["sa_in"]["drops"]["auth"] == 0
    assert peers["espgate-hub"]["sa_out"]["packets"] > 0
    assert out.with_suffix(".png").exists()
    assert "espgate / plain" in out.with_suffix(".md").read_text()


def _committed() -> dict[str, str]:
    # digests of the committed results, to prove a run left them alone
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(RESULTS_DIR.iterdir())
    }


@pytest.mark.parametrize("bench", ["crypto", "packets"])
@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "is a directory, not a .json file"),
        ("sub/", "is a directory, not a .json file"),
        ("gone/deeper/x.json", "no directory "),
        ("x.md", "does not end in .json"),
    ],
)
def test_bench_json_directory_or_missing_directory_exits_2(
    bench: str, name: str, message: str, tmp_path: Path, capsys
) -> None:
    (tmp_path / "sub").mkdir()
    with pytest.raises(SystemExit) as exc:
        main([bench, "--quick", "--json", f"{tmp_path}/{name}"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "argument --json: " in err and message in err
    assert f"'{tmp_path}/{name}'" in err
    assert "Traceback" not in err
    # nothing made: no missing directory created, no file written
    assert [p.name for p in tmp_path.iterdir()] == ["sub"]
    assert not list((tmp_path / "sub").iterdir())


def test_json_path_file_in_existing_directory_accepted(tmp_path: Path) -> None:
    # the twin of the refusals above
    assert json_path(f"{tmp_path}/r.json") == tmp_path / "r.json"
    with pytest.raises(argparse.ArgumentTypeError):
        json_path(f"{tmp_path}/nope/r.json")


def test_results_dir_is_the_committed_one() -> None:
    assert Path(__file__).resolve().parents[1] / "bench" / "results" == RESULTS_DIR
    assert (RESULTS_DIR / "crypto.json").is_file()


def test_bench_crypto_quick_without_json_writes_scratch_honouring_numbers(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    before = _committed()
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    # from a directory that looks like the repository root
    cwd = tmp_path / "cwd"
    (cwd / "bench" / "results").mkdir(parents=True)
    monkeypatch.chdir(cwd)
    argv = ["crypto", "--quick", "--no-progress", "--repeat", "2", "--seconds", "0.002"]
    assert main(argv) == 0
    (made,) = scratch.iterdir()
    assert made.name.startswith("espgate-bench-crypto-")
    out = made / "crypto.json"
    assert f"wrote {out}, " in capsys.readouterr().out
    doc = json.loads(out.read_text())
    # the numbers given win over --quick's, in the document and its Markdown
    assert (doc["config"]["repeat"], doc["config"]["seconds_per_sample"]) == (2, 0.002)
    assert all(p["repeats"] == 2 for p in doc["points"])
    assert "median over 2 repeats of 0.002 s" in out.with_suffix(".md").read_text()
    assert doc["command"] == "espgate bench crypto " + " ".join(argv[1:])
    assert not list((cwd / "bench" / "results").iterdir())
    assert _committed() == before


@pytest.fixture(autouse=True)
def sigint_restored():
    # main() installs a SIGINT handler for the process' end: not for pytest's
    before = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, before)


def _refused(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize(
    "name",
    [
        "crypto.json",
        "packets.json",
        "../results/crypto.json",
        "./packets-guest.json",
    ],
)
def test_bench_crypto_quick_into_committed_results_refused(
    name: str, capsys, sigint_restored
) -> None:
    before = _committed()
    err = _refused(
        ["crypto", "--quick", "--no-progress", "--json", f"{RESULTS_DIR}/{name}"],
        capsys,
    )
    assert "--quick does not write" in err and "committed results" in err
    assert _committed() == before


def test_bench_crypto_quick_relative_name_inside_results_refused(
    monkeypatch, capsys, sigint_restored
) -> None:
    before = _committed()
    monkeypatch.chdir(RESULTS_DIR)
    err = _refused(["crypto", "--quick", "--json", "crypto.json"], capsys)
    assert "--quick does not write 'crypto.json'" in err
    assert _committed() == before


def test_bench_crypto_quick_symlink_into_results_refused(
    tmp_path: Path, capsys, sigint_restored
) -> None:
    (tmp_path / "link").symlink_to(RESULTS_DIR)
    before = _committed()
    _refused(["crypto", "--quick", "--json", f"{tmp_path}/link/x.json"], capsys)
    assert _committed() == before


def test_bench_crypto_over_packets_document_refused(
    tmp_path: Path, capsys, sigint_restored
) -> None:
    # not --quick: the benchmark field alone decides, before any measuring
    out = tmp_path / "packets.json"
    out.write_text('{"benchmark": "packets", "points": []}\n')
    err = _refused(["crypto", "--json", str(out)], capsys)
    assert "holds the 'packets' benchmark's results" in err
    assert out.read_text() == '{"benchmark": "packets", "points": []}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["packets.json"]


@needs_root
def test_bench_packets_over_crypto_document_refused(
    tmp_path: Path, capsys, sigint_restored
) -> None:
    out = tmp_path / "r.json"
    out.write_text('{"benchmark": "crypto"}')
    err = _refused(["packets", "--quick", "--json", str(out)], capsys)
    assert "holds the 'crypto' benchmark's results" in err


def test_check_outputs_same_benchmark_or_new_file_accepted(tmp_path: Path) -> None:
    # the twin of the refusals: replacing crypto with crypto, or a new name
    out = tmp_path / "r.json"
    check_outputs(out, "crypto", quick=True)
    out.write_text('{"benchmark": "crypto"}')
    check_outputs(out, "crypto", quick=True)
    check_outputs(RESULTS_DIR / "crypto.json", "crypto", quick=False)
    with pytest.raises(OutputError, match="no benchmark results"):
        out.write_text("my notes")
        check_outputs(out, "crypto")


def test_bench_sibling_md_directory_refused_up_front(
    tmp_path: Path, capsys, sigint_restored
) -> None:
    (tmp_path / "dd.md").mkdir()
    out = tmp_path / "dd.json"
    out.write_text('{"benchmark": "crypto", "run": 1}')
    err = _refused(["crypto", "--quick", "--json", str(out)], capsys)
    assert f"'{tmp_path}/dd.md' is a directory, not a file" in err
    assert out.read_text() == '{"benchmark": "crypto", "run": 1}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dd.json", "dd.md"]


def test_write_outputs_sibling_png_directory_writes_nothing(tmp_path: Path) -> None:
    (tmp_path / "r.png").mkdir()
    with pytest.raises(OutputError, match="r.png' is a directory"):
        write_outputs(tmp_path / "r.json", {"benchmark": "x"}, "", _plot_ok)
    assert [p.name for p in tmp_path.iterdir()] == ["r.png"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "'' is empty, not a .json file name"),
        ("{tmp}/x.json/", "'{tmp}/x.json/' ends in '/', not a .json file name"),
        ("{tmp}/sub/", "'{tmp}/sub/' is a directory, not a .json file"),
        ("{tmp}/sub", "'{tmp}/sub' is a directory, not a .json file"),
    ],
)
def test_json_path_empty_or_trailing_slash_accurate_message(
    text: str, message: str, tmp_path: Path
) -> None:
    (tmp_path / "sub").mkdir()
    with pytest.raises(argparse.ArgumentTypeError) as exc:
        json_path(text.format(tmp=tmp_path))
    assert str(exc.value) == message.format(tmp=tmp_path)


def test_interruptible_ctrl_c_after_write_says_written(tmp_path: Path, capsys) -> None:
    def run() -> int:
        write_outputs(tmp_path / "r.json", {"a": 1}, "", _plot_ok)
        raise KeyboardInterrupt  # as if during the "wrote" line

    assert interruptible("espgate bench crypto", run) == 130
    err = capsys.readouterr().err
    assert f"interrupted; already wrote {tmp_path}/r.json" in err
    assert "no results written" not in err


def test_interruptible_final_sigint_after_return_exits_130() -> None:
    # a real process: SIGINT after the command returned, before exit
    script = (
        "import os, signal, sys\n"
        "from bench.common import interruptible\n"
        "status = interruptible('x', lambda: 0, final=True)\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "sys.exit(status)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 130, done.stderr
    assert "x: interrupted, no results written" in done.stderr


def test_interruptible_not_final_leaves_sigint_alone(sigint_restored) -> None:
    before = signal.getsignal(signal.SIGINT)
    assert interruptible("x", lambda: 0) == 0
    assert signal.getsignal(signal.SIGINT) is before
