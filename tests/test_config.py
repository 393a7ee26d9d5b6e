"""Config loading: the embedded default, and errors that name file, line, field."""

from __future__ import annotations

import ipaddress

import pytest

from control import config
from control.config import ConfigError

GOOD = """\
[server]
listen = "198.18.1.1"

[pools.office]
range = "198.18.128.10-198.18.128.20"

[[profiles]]
name = "staff"
local_identity = "fqdn:vpn.example.net"
psk = "a-long-enough-secret"
pool = "office"
"""


def test_load_default_embedded():
    cfg = config.load()
    assert cfg.profiles[0].auth == "psk"
    assert cfg.pools["default"].first == ipaddress.IPv4Address("198.18.128.10")
    assert cfg.engine.crypto == "ipsec-mb"


def test_parse_minimal_fills_defaults():
    cfg = config.parse(GOOD, "t.toml")
    assert cfg.server.ike_port == 500 and cfg.server.natt_port == 4500
    assert cfg.profiles[0].esp == config.ESP_PROPOSALS
    assert cfg.pools["office"].size == 11


def test_repr_hides_psk():
    cfg = config.parse(GOOD, "t.toml")
    assert "a-long-enough-secret" not in repr(cfg)


def test_parse_pool_prefix_excludes_network_and_broadcast():
    cfg = config.parse(GOOD.replace("198.18.128.10-198.18.128.20", "198.18.64.0/30"),
                       "t.toml")
    assert str(cfg.pools["office"].first) == "198.18.64.1"
    assert str(cfg.pools["office"].last) == "198.18.64.2"


@pytest.mark.parametrize(
    ("old", "new", "line", "field", "problem"),
    [
        ('pool = "office"', 'pool = "lab"', 11, "profiles[0].pool", "unknown pool"),
        ('listen = "198.18.1.1"', 'listen = "nowhere"', 2, "server.listen",
         "not an IP address"),
        ('range = "198.18.128.10-198.18.128.20"', 'range = "x-y"', 5,
         "pools.office.range", "expected"),
        ('psk = "a-long-enough-secret"', 'psk = "short"', 10, "profiles[0].psk",
         "shorter"),
        ('psk = "a-long-enough-secret"', "psk = 12", 10, "profiles[0].psk",
         "expected str"),
        ('name = "staff"', 'name = "staff"\nmtu = 3', 9, "profiles[0].mtu",
         "unknown field"),
    ],
)
def test_parse_error_names_file_line_field(old, new, line, field, problem):
    with pytest.raises(ConfigError) as info:
        config.parse(GOOD.replace(old, new), "/etc/espgate.toml")
    err = info.value
    assert (err.source, err.line, err.fieldname) == ("/etc/espgate.toml", line, field)
    assert problem in err.problem
    assert str(err).startswith(f"/etc/espgate.toml:{line}: {field}: ")


def test_parse_second_profile_error_points_at_second_table():
    text = GOOD + '\n[[profiles]]\nname = "b"\nlocal_identity = "fqdn:x"\n' \
        'psk = "another-long-secret"\npool = "gone"\n'
    with pytest.raises(ConfigError) as info:
        config.parse(text, "t.toml")
    assert info.value.fieldname == "profiles[1].pool"
    assert info.value.line == 17


def test_parse_syntax_error_has_line():
    with pytest.raises(ConfigError) as info:
        config.parse("[server]\nlisten = \n", "bad.toml")
    assert info.value.line == 2 and info.value.fieldname == "syntax"


def test_parse_missing_profiles():
    with pytest.raises(ConfigError, match="profiles: missing"):
        config.parse("[server]\n", "t.toml")


def test_load_missing_file_names_it(tmp_path):
    with pytest.raises(ConfigError, match="nope.toml: file"):
        config.load(tmp_path / "nope.toml")


CERT_PROFILE = """\
[[profiles]]
name = "certs"
local_identity = "fqdn:vpn.espgate.example"
local_auth = "rsa-sig"
remote_auth = ["rsa-sig", "pre-share"]
psk = "a-long-enough-secret"
certificate = "pki/server.pem"
private_key = "pki/server.key"
ca = ["pki/ca.pem"]
"""


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory):
    from control.lab.pki import LabPki

    base = tmp_path_factory.mktemp("cfg")
    LabPki.create(base, "rsa", chain=True)
    return base


def test_parse_cert_profile_resolves_paths_next_to_file(pki_dir):
    cfg = config.parse(CERT_PROFILE, str(pki_dir / "espgate.toml"))
    p = cfg.profiles[0]
    assert p.local_auth == "rsa-sig" and p.remote_auth == ("rsa-sig", "pre-share")
    assert p.certificate == str(pki_dir / "pki/server.pem")
    assert p.ca == (str(pki_dir / "pki/ca.pem"),)


def test_parse_cert_profile_missing_key_names_field(pki_dir):
    text = CERT_PROFILE.replace('private_key = "pki/server.key"\n', "")
    with pytest.raises(ConfigError, match=r"profiles\[0\].private_key: missing"):
        config.parse(text, str(pki_dir / "espgate.toml"))


def test_parse_cert_profile_identity_not_in_certificate_rejected(pki_dir):
    text = CERT_PROFILE.replace("vpn.espgate.example", "other.example")
    with pytest.raises(ConfigError, match="local_identity"):
        config.parse(text, str(pki_dir / "espgate.toml"))


def test_parse_cert_profile_wrong_key_type_rejected(pki_dir):
    text = CERT_PROFILE.replace('local_auth = "rsa-sig"', 'local_auth = "ecdsa-sig"')
    with pytest.raises(ConfigError, match="local_auth: ecdsa-sig with a rsa-sig key"):
        config.parse(text, str(pki_dir / "espgate.toml"))


def test_parse_remote_cert_auth_without_ca_rejected(pki_dir):
    text = CERT_PROFILE.replace('ca = ["pki/ca.pem"]\n', "")
    with pytest.raises(ConfigError, match=r"profiles\[0\].ca:"):
        config.parse(text, str(pki_dir / "espgate.toml"))


def test_parse_bad_crl_file_rejected(pki_dir):
    text = CERT_PROFILE + 'crl = ["pki/ca.pem"]\n'
    with pytest.raises(ConfigError, match=r"profiles\[0\].crl:"):
        config.parse(text, str(pki_dir / "espgate.toml"))


def test_parse_huge_pool_prefix_rejected_without_listing_it():
    with pytest.raises(ConfigError, match="more than"):
        config.parse(GOOD.replace("198.18.128.10-198.18.128.20", "0.0.0.0/0"), "t")


@pytest.mark.parametrize("bad", ["127.0.0.1-127.0.0.5", "224.0.0.1-224.0.0.9",
                                 "0.0.0.0-0.0.0.3", "255.255.255.250-255.255.255.255"])
def test_parse_pool_of_unusable_addresses_rejected(bad):
    with pytest.raises(ConfigError, match="cannot use"):
        config.parse(GOOD.replace("198.18.128.10-198.18.128.20", bad), "t")


def test_parse_pool_prefix_with_host_bits_rejected():
    with pytest.raises(ConfigError, match="pools.office.range"):
        config.parse(GOOD.replace("198.18.128.10-198.18.128.20", "198.18.128.10/24"),
                     "t")


def test_parse_overlapping_pools_rejected():
    text = GOOD.replace('[[profiles]]', '[pools.lab]\nrange = "198.18.128.15/32"\n\n'
                        '[[profiles]]')
    with pytest.raises(ConfigError, match="overlaps pool 'office'"):
        config.parse(text, "t")


@pytest.mark.parametrize(
    "psk", ['["my-real-secret-psk-value"]', "98765432109876543210"]
)
def test_parse_wrong_psk_type_does_not_echo_it(psk):
    with pytest.raises(ConfigError) as info:
        config.parse(GOOD.replace('"a-long-enough-secret"', psk), "t")
    assert "my-real-secret" not in str(info.value)
    assert "98765432109876543210" not in str(info.value)


def test_parse_profiles_as_table_does_not_echo_contents():
    with pytest.raises(ConfigError) as info:
        config.parse(GOOD.replace("[[profiles]]", "[profiles]"), "t")
    assert "a-long-enough-secret" not in str(info.value)


@pytest.mark.parametrize(("old", "new", "field"), [
    ('listen = "198.18.1.1"', 'listen = "::"', "server.listen"),
    ('listen = "198.18.1.1"', 'control_socket = "relative.sock"',
     "server.control_socket"),
    ('listen = "198.18.1.1"', f'control_socket = "/{"x" * 120}"',
     "server.control_socket"),
    ('local_identity = "fqdn:vpn.example.net"', 'local_identity = "ipv4:300.1.1.1"',
     "profiles[0].local_identity"),
    ('local_identity = "fqdn:vpn.example.net"', 'local_identity = "fqdn:"',
     "profiles[0].local_identity"),
    ('name = "staff"', 'name = ""', "profiles[0].name"),
    ('pool = "office"', 'pool = "office"\nesp = []', "profiles[0].esp"),
    ('pool = "office"', 'pool = "office"\nlocal_ts = []', "profiles[0].local_ts"),
])
def test_parse_values_that_would_fail_at_runtime_rejected(old, new, field):
    with pytest.raises(ConfigError) as info:
        config.parse(GOOD.replace(old, new), "t")
    assert info.value.fieldname == field


def test_load_non_utf8_file_is_a_config_error(tmp_path):
    path = tmp_path / "binary.toml"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="not UTF-8"):
        config.load(path)


def test_replace_server_checks_overrides():
    cfg = config.parse(GOOD, "t")
    with pytest.raises(ConfigError, match="--listen"):
        config.replace_server(cfg, listen="nope")


def test_parse_certificate_map_reads_rules(pki_dir):
    text = CERT_PROFILE + (
        'match_certificate = [{ field = "issuer.cn", contains = "client CA" },\n'
        '                     { field = "subject", equals = "CN=x,O=y" }]\n'
    )
    p = config.parse(text, str(pki_dir / "espgate.toml")).profiles[0]
    assert p.match_certificate == (
        ("issuer.cn", "contains", "client CA"),
        ("subject", "equals", "CN=x,O=y"),
    )


@pytest.mark.parametrize(
    "rule",
    [
        '{ field = "serial", equals = "1" }',
        '{ field = "subject.xx", equals = "1" }',
        '{ field = "subject", equals = "a", contains = "b" }',
        '{ field = "subject", startswith = "a" }',
        '{ field = "subject", equals = "" }',
        '"subject contains a"',
    ],
)
def test_parse_bad_certificate_map_rule_rejected(pki_dir, rule):
    text = CERT_PROFILE + f"match_certificate = [{rule}]\n"
    with pytest.raises(ConfigError, match=r"profiles\[0\].match_certificate"):
        config.parse(text, str(pki_dir / "espgate.toml"))


def test_parse_certificate_map_with_psk_only_rejected():
    text = GOOD + 'match_certificate = [{ field = "subject.o", equals = "x" }]\n'
    with pytest.raises(ConfigError, match="needs a certificate remote_auth"):
        config.parse(text, "t.toml")


@pytest.mark.parametrize("pattern", ["dn:XX=1", "keyid:nothex", "ipv4:198.18.0.0/99"])
def test_parse_bad_identity_pattern_names_it(pattern):
    text = GOOD + f'match_identity = ["{pattern}"]\n'
    with pytest.raises(ConfigError, match=r"t.toml:\d+: profiles\[0\].match_identity"):
        config.parse(text, "t.toml")


def test_parse_identity_patterns_of_every_kind():
    patterns = ["*@example.net", "198.18.0.0/15", "dn:O=espgate lab,OU=ops",
                "keyid:0a0b", "fqdn:host.example", "ipv6:2001:db8::/32"]
    text = GOOD + f"match_identity = {patterns!r}\n".replace("'", '"')
    assert config.parse(text, "t.toml").profiles[0].match_identity == tuple(patterns)


def test_profile_rekey_times_default_and_parse() -> None:
    base = _rekey_config("")
    assert (base.profiles[0].ike_rekey_time, base.profiles[0].child_rekey_time) == (
        86400,
        28800,
    )
    config = _rekey_config("ike_rekey_time = 0\nchild_rekey_time = 30\n")
    assert (config.profiles[0].ike_rekey_time, config.profiles[0].child_rekey_time) == (
        0,
        30,
    )


@pytest.mark.parametrize("value", [1, 4, 25_920_001])
def test_profile_rekey_time_out_of_range_is_refused(value: int) -> None:
    with pytest.raises(ConfigError, match="child_rekey_time: .* is not 0 or 5"):
        _rekey_config(f"child_rekey_time = {value}\n")


def _rekey_config(lines: str) -> config.Config:
    # the last profile table of GOOD gets the extra keys
    return config.parse(GOOD + lines, "t.toml")


def test_parse_half_open_limits_default_and_set():
    cfg = config.parse(GOOD, "t.toml")
    assert (cfg.server.cookie_threshold, cfg.server.half_open_per_source) == (50, 10)
    text = GOOD.replace(
        'listen = "198.18.1.1"\n',
        'listen = "198.18.1.1"\ncookie_threshold = 0\nhalf_open_per_source = 3\n',
    )
    cfg = config.parse(text, "t.toml")
    assert (cfg.server.cookie_threshold, cfg.server.half_open_per_source) == (0, 3)


@pytest.mark.parametrize("value", ["-1", "1000001", "true", '"5"'])
def test_parse_half_open_limit_out_of_range_rejected(value):
    text = GOOD.replace(
        'listen = "198.18.1.1"\n',
        f'listen = "198.18.1.1"\ncookie_threshold = {value}\n',
    )
    with pytest.raises(ConfigError) as exc:
        config.parse(text, "t.toml")
    assert exc.value.fieldname == "server.cookie_threshold" and exc.value.line == 3


def test_parse_windows_proposals_off_by_default_and_bound():
    from control.ike.messages import DhGroup, IntegId
    from control.ikebind import build_responder_config

    cfg = config.parse(GOOD, "t.toml")
    assert cfg.profiles[0].windows_proposals is False
    profile = build_responder_config(cfg, {}).profiles[0]
    assert DhGroup.MODP_1024 not in profile.dh_groups
    assert all(a.integ != IntegId.AUTH_HMAC_SHA1_96 for a in profile.ike_proposals)
    cfg = config.parse(GOOD + "windows_proposals = true\n", "t.toml")
    profile = build_responder_config(cfg, {}).profiles[0]
    assert DhGroup.MODP_1024 in profile.dh_groups
    assert any(a.integ == IntegId.AUTH_HMAC_SHA1_96 for a in profile.ike_proposals)
def test_profile_flow_limit_and_liveness_default_and_parse() -> None:
    base = _rekey_config("").profiles[0]
    assert (base.flow_limit, base.dpd_delay, base.dpd_timeout) == (0, 30, 120)
    lines = "flow_limit = 50000\ndpd_delay = 0\ndpd_timeout = 5\n"
    profile = _rekey_config(lines).profiles[0]
    assert (profile.flow_limit, profile.dpd_delay, profile.dpd_timeout) == (
        50000,
        0,
        5,
    )


@pytest.mark.parametrize(
    "line,problem",
    [
        ("flow_limit = 50001", "flow_limit: 50001 is not 0..50000"),
        ("flow_limit = -1", "flow_limit: -1 is not 0..50000"),
        ("dpd_delay = 86401", "dpd_delay: 86401 is not 0 or 1..86400"),
        ("dpd_timeout = 0", "dpd_timeout: 0 is not 1..86400"),
        ('dpd_delay = "30"', "dpd_delay: expected int"),
    ],
)
def test_profile_flow_limit_or_liveness_out_of_range_is_refused(
    line: str, problem: str
) -> None:
    with pytest.raises(ConfigError, match=problem):
        _rekey_config(line + "\n")


def _server_line(line: str) -> str:
    return GOOD.replace('listen = "198.18.1.1"\n', f'listen = "198.18.1.1"\n{line}\n')


def test_parse_fragment_size_default_set_and_off() -> None:
    assert config.parse(GOOD, "t.toml").server.fragment_size == 1280
    for value in (576, 1200, 0):
        text = _server_line(f"fragment_size = {value}")
        assert config.parse(text, "t.toml").server.fragment_size == value


@pytest.mark.parametrize("value", ["575", "65536", "-1", '"1280"'])
def test_parse_fragment_size_out_of_range_rejected(value: str) -> None:
    with pytest.raises(ConfigError) as exc:
        config.parse(_server_line(f"fragment_size = {value}"), "t.toml")
    assert exc.value.fieldname == "server.fragment_size" and exc.value.line == 3


def test_bind_fragment_size_reaches_the_responder() -> None:
    from control.ikebind import build_responder_config

    cfg = config.parse(_server_line("fragment_size = 600"), "t.toml")
    assert build_responder_config(cfg, {}).fragment_size == 600


def test_parse_session_lifetime_default_and_bounds() -> None:
    from control.ikebind import build_responder_config

    assert config.parse(GOOD, "t.toml").profiles[0].session_lifetime == 0
    for value in (120, 25_920_000):
        cfg = _rekey_config(f"session_lifetime = {value}\n")
        assert cfg.profiles[0].session_lifetime == value
        bound = build_responder_config(cfg, {}).profiles[0]
        assert bound.session_lifetime == value


@pytest.mark.parametrize("value", [119, 25_920_001, -1])
def test_parse_session_lifetime_out_of_range_rejected(value: int) -> None:
    with pytest.raises(ConfigError, match="session_lifetime: .* is not 0 or 120"):
        _rekey_config(f"session_lifetime = {value}\n")


@pytest.mark.parametrize("window", [32, 1000, 8192])
def test_parse_replay_window_must_be_power_of_two_in_range(window):
    text = GOOD.replace('[pools.office]', f'[engine]\nreplay_window = {window}\n\n'
                        '[pools.office]')
    with pytest.raises(ConfigError) as info:
        config.parse(text, "t.toml")
    assert info.value.fieldname == "engine.replay_window" and info.value.line == 5


def test_parse_replay_window_accepted():
    text = GOOD.replace('[pools.office]', '[engine]\nreplay_window = 4096\n\n'
                        '[pools.office]')
    assert config.parse(text, "t.toml").engine.replay_window == 4096


def test_parse_ipv4_and_ipv6_pools_side_by_side():
    text = GOOD.replace('[[profiles]]', '[pools.v6]\nrange = "2001:db8:18:1::/64"\n'
                        'client_prefix = 128\n\n[[profiles]]')
    cfg = config.parse(text, "t.toml")
    assert set(cfg.pools) == {"office", "v6"}
