"""The command line: config errors, the sessions table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from control.cli import format_sessions, main

ESPGATE = str(Path(sys.executable).with_name("espgate"))


def test_check_config_default_ok(capsys):
    assert main(["check-config"]) == 0
    assert "profile remote-access" in capsys.readouterr().out


def test_check_config_error_exit_2_names_file_line_field(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[server]\nike_port = 70000\n[[profiles]]\nname = "x"\n')
    proc = subprocess.run([ESPGATE, "check-config", str(bad)], capture_output=True,
                          text=True)
    assert proc.returncode == 2
    assert f"{bad}:2: server.ike_port: port 70000 out of range" in proc.stderr


def test_serve_bad_config_exit_2(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[engine]\ncrypto = 'rot13'\n")
    proc = subprocess.run([ESPGATE, "serve", "--config", str(bad)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "engine.crypto" in proc.stderr and ":2:" in proc.stderr


def test_show_without_daemon_says_so(tmp_path):
    proc = subprocess.run([ESPGATE, "show", "sessions", "--socket",
                           str(tmp_path / "none.sock")], capture_output=True, text=True)
    assert proc.returncode == 1 and "cannot reach the daemon" in proc.stderr


def test_format_sessions_one_row_per_child():
    sessions = [{
        "identity": "alice@example.net", "outside": "198.18.1.2:4500",
        "inside": "198.18.128.10",
        "children": [{"spi_in": "c0000001", "spi_out": "00abcdef", "packets_in": 3,
                      "packets_out": 4, "bytes_in": 300, "bytes_out": 400}],
    }]
    text = format_sessions(sessions)
    assert "alice@example.net" in text and "c0000001/00abcdef" in text
    assert "3/4" in text and text.endswith("1 session(s)")


def test_demo_rejects_nonpositive_bytes():
    proc = subprocess.run([ESPGATE, "demo", "--bytes", "-5"], capture_output=True,
                          text=True)
    assert proc.returncode == 2 and "must be positive" in proc.stderr


def test_selftest_empty_case_list_is_an_error():
    proc = subprocess.run([ESPGATE, "selftest", "--cases", ""], capture_output=True,
                          text=True)
    assert proc.returncode == 2 and "names no case" in proc.stderr


def test_format_sessions_without_inside_address_shows_dash():
    sessions = [{"identity": "bob", "outside": "198.18.1.2:4500", "inside": None,
                 "children": []}]
    assert "None" not in format_sessions(sessions)


def test_format_sessions_shows_session_mtu():
    sessions = [{"identity": "carol", "outside": "198.18.1.2:4500",
                 "inside": "198.18.128.12", "mtu": 1380,
                 "children": [{"spi_in": "c0000002", "spi_out": "00abcdee",
                               "packets_in": 0, "packets_out": 0, "bytes_in": 0,
                               "bytes_out": 0}]}]  # fmt: skip
    header, row = format_sessions(sessions).splitlines()[:2]
    assert header.split()[4] == "mtu" and row.split()[4] == "1380"


def test_format_sessions_lists_accepted_routes():
    sessions = [{"identity": "branch1", "outside": "198.18.1.2:4500",
                 "inside": "198.18.128.13", "children": [],
                 "accepted_routes": [{"prefix": "10.77.0.0/16", "metric": 20,
                                      "tag": 7}]}]  # fmt: skip
    lines = format_sessions(sessions).splitlines()
    assert "branch1: route 10.77.0.0/16 metric 20 tag 7" in lines


def test_format_sessions_shows_session_id_first():
    sessions = [{"session": "553d0123abcd4567", "identity": "dave",
                 "outside": "198.18.1.2:4500", "inside": None, "children": []}]
    header, row = format_sessions(sessions).splitlines()[:2]
    assert header.split()[0] == "session" and row.split()[0] == "553d0123abcd4567"


def test_version_prints_package_version():
    proc = subprocess.run([ESPGATE, "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("espgate 0.")


def test_check_config_piped_into_closed_reader_no_traceback():
    # `espgate check-config | head -0`: the reader is gone before we write
    proc = subprocess.run(f"{ESPGATE} check-config | head -c 0", shell=True,
                          capture_output=True, text=True, timeout=60)
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr


def test_show_sessions_extra_word_is_an_error(tmp_path):
    proc = subprocess.run([ESPGATE, "show", "sessions", "sa", "--socket",
                           str(tmp_path / "none.sock")], capture_output=True, text=True)
    assert proc.returncode == 2 and "takes no 'sa'" in proc.stderr


def test_check_config_state_dir_is_a_file_exit_2(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")
    conf = tmp_path / "c.toml"
    default = Path(__file__).parents[1] / "control" / "defaults" / "default.toml"
    conf.write_text(default.read_text().replace(
        "[server]\n", f'[server]\nstate_dir = "{afile}"\n', 1))
    proc = subprocess.run([ESPGATE, "check-config", str(conf)], capture_output=True,
                          text=True)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and f"{afile} is not a directory" in proc.stderr


def test_serve_state_dir_not_creatable_exit_2(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")
    proc = subprocess.run(
        [ESPGATE, "serve", "--state-dir", str(afile / "sub"), "--control-socket",
         str(tmp_path / "ctl.sock")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"cannot create state directory {afile / 'sub'}" in proc.stderr
    assert not (tmp_path / "ctl.sock").exists()


def test_format_engines_userspace_mode_says_not_probed():
    from control.cli import format_engines

    text = format_engines({"profiles": {"ra": "userspace"}, "dataplane": "process",
                           "kernel_available": None,
                           "kernel_reason": "not probed: every profile uses the "
                                            "userspace engine"})  # fmt: skip
    assert "None" not in text and "kernel engine: not probed" in text
    assert "profile ra: userspace" in text


def test_clear_session_error_goes_to_stderr_rc_1(tmp_path, monkeypatch, capsys):
    import control.cli as cli

    monkeypatch.setattr(cli, "request",
                        lambda *a, **k: {"error": "no session 'nope'"})
    assert main(["clear", "session", "nope", "--socket", str(tmp_path / "s")]) == 1
    out, err = capsys.readouterr()
    assert out == "" and "clear session failed: no session 'nope'" in err


def test_reload_dataplane_prints_pid_line(tmp_path, monkeypatch, capsys):
    import control.cli as cli

    monkeypatch.setattr(cli, "request", lambda *a, **k: {"dataplane_pid": 4242})
    assert main(["reload", "dataplane", "--socket", str(tmp_path / "s")]) == 0
    assert capsys.readouterr().out == "dataplane restarted: pid 4242\n"


# -- state_dir, --socket, show counters ------------------------------------------


def _config_with_state_dir(tmp_path: Path, state_dir: str) -> Path:
    from control.config import default_text

    line = f'[server]\nstate_dir = "{state_dir}"\n'
    text = default_text().replace("[server]\n", line, 1)
    path = tmp_path / "conf" / "espgate.toml"
    path.parent.mkdir()
    path.write_text(text)
    return path


def test_load_relative_state_dir_from_config_directory(tmp_path, monkeypatch):
    from control.config import load

    path = _config_with_state_dir(tmp_path, "state-rel")
    monkeypatch.chdir(tmp_path)
    assert load(str(path)).server.state_dir == str(path.parent / "state-rel")


def test_check_config_state_dir_error_names_line(tmp_path, capsys):
    path = _config_with_state_dir(tmp_path, "state-rel")
    (path.parent / "state-rel").write_text("a file, not a directory")
    assert main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:5: server.state_dir:" in err


def test_socket_at_regular_file_says_not_a_socket(tmp_path, capsys):
    victim = tmp_path / "file"
    victim.write_text("x")
    assert main(["show", "counters", "--socket", str(victim)]) == 1
    assert "not a socket" in capsys.readouterr().err
    assert main(["show", "counters", "--socket", str(tmp_path)]) == 1
    assert "a directory, not a socket" in capsys.readouterr().err


def test_format_counters_values_in_one_column():
    from control.cli import format_counters

    answer = {"daemon": {"ike_rx_500": 1}, "pools": {"v4": {"in_use": 2}}}
    text = format_counters(answer)
    lines = text.splitlines()
    assert lines == ["daemon.ike_rx_500  1", "pools.v4.in_use    2"]
