"""Config keys of AAA: [radius.NAME] groups and the EAP keys of a profile."""

from __future__ import annotations

from pathlib import Path

import pytest

from control.config import ConfigError, parse
from control.ikebind import build_radius_clients, build_responder_config
from control.lab.pki import LabPki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> LabPki:
    return LabPki.create(tmp_path_factory.mktemp("pki"), "p256")


def text(pki: LabPki, profile: str = "", radius: str = "") -> str:
    return f"""\
[pools.p]
range = "198.18.128.10-198.18.128.20"

[radius.office]
timeout = 1.5
retransmit = 3
{radius}
[[radius.office.servers]]
address = "127.0.0.1"
secret = "first-radius-secret-01"

[[radius.office.servers]]
address = "127.0.0.2"
port = 11812
secret = "second-radius-secret-02"

[[profiles]]
name = "eap"
local_identity = "fqdn:vpn.espgate.example"
local_auth = "ecdsa-sig"
remote_auth = ["eap"]
certificate = "{pki.server_cert_path}"
private_key = "{pki.server_key_path}"
pool = "p"
{profile}
"""


def test_parse_radius_group_and_eap_profile(pki: LabPki) -> None:
    config = parse(
        text(pki, 'aaa_authentication = "office"\neap_query_identity = true'), "t"
    )
    group = config.radius["office"]
    assert [(s.address, s.port) for s in group.servers] == [
        ("127.0.0.1", 1812),
        ("127.0.0.2", 11812),
    ]
    assert group.timeout == 1.5 and group.retransmit == 3
    assert "radius-secret" not in repr(group)
    profile = config.profiles[0]
    assert profile.aaa_authentication == "office" and profile.eap_query_identity
    core = build_responder_config(config, {}).profiles[0]
    assert core.remote_auth == ["eap"] and core.eap_query_identity
    clients = build_radius_clients(config)
    assert [s.port for s in clients["office"].servers] == [1812, 11812]


@pytest.mark.parametrize(
    "profile,radius,where,problem",
    [
        ("", "", "profiles[0].aaa_authentication", "missing"),
        ('aaa_authentication = "lab"', "", "profiles[0].aaa_authentication",
         "unknown radius group"),
        ('aaa_authentication = "office"\neap_timeout = 1', "",
         "profiles[0].eap_timeout", "out of range"),
        ('aaa_authentication = "office"', "nas_identifier = 5",
         "radius.office.nas_identifier", "expected str"),
    ],
)  # fmt: skip
def test_parse_eap_config_errors_are_located(
    pki: LabPki, profile: str, radius: str, where: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as info:
        parse(text(pki, profile, radius), "t.toml")
    assert info.value.fieldname == where and problem in info.value.problem
    assert info.value.line is not None


def test_parse_short_radius_secret_rejected(pki: LabPki) -> None:
    bad = text(pki, 'aaa_authentication = "office"').replace(
        "first-radius-secret-01", "short"
    )
    with pytest.raises(ConfigError) as info:
        parse(bad, "t.toml")
    assert info.value.fieldname == "radius.office.servers[0].secret"


def test_parse_eap_with_psk_on_our_side_rejected(tmp_path: Path) -> None:
    conf = """\
[radius.office]
servers = [{address = "127.0.0.1", secret = "first-radius-secret-01"}]

[[profiles]]
name = "eap"
local_identity = "fqdn:vpn.espgate.example"
psk = "a-long-enough-psk-0123"
remote_auth = ["eap"]
aaa_authentication = "office"
"""
    with pytest.raises(ConfigError) as info:
        parse(conf, "t.toml")
    assert info.value.fieldname == "profiles[0].local_auth"


def test_parse_config_mode_set_reaches_core(pki: LabPki) -> None:
    config = parse(text(pki, 'aaa_authentication = "office"\nconfig_mode = "set"'), "t")
    assert config.profiles[0].config_mode == "set"
    assert build_responder_config(config, {}).profiles[0].config_mode == "set"


def test_parse_config_mode_unknown_rejected(pki: LabPki) -> None:
    body = text(pki, 'aaa_authentication = "office"\nconfig_mode = "push"')
    with pytest.raises(ConfigError, match="profiles\\[0\\].config_mode"):
        parse(body, "t")


AAA = 'aaa_authentication = "office"'


def test_parse_cisco_attributes_override_numbers(pki: LabPki) -> None:
    body = (
        "cisco_attributes = {configuration_url = 16400, configuration_version = 16401}"
    )
    config = parse(text(pki, f"{AAA}\n{body}"), "t")
    assert dict(config.profiles[0].cisco_attributes) == {
        "configuration_url": 16400,
        "configuration_version": 16401,
    }
    # and the running headend's profile sends them under those numbers
    core = build_responder_config(config, {}).profiles[0]
    assert core.cisco_attribute("configuration_url") == 16400
    assert core.cisco_attribute("smartcard_removal_disconnect") == 28683


def test_parse_cisco_attributes_default_empty(pki: LabPki) -> None:
    assert parse(text(pki, AAA), "t").profiles[0].cisco_attributes == ()


@pytest.mark.parametrize(
    "body,problem",
    [
        ("configuration_url = 16383", "16383 is not 16384..32767"),
        ("configuration_url = 32768", "32768 is not 16384..32767"),
        ("configuration_url = 28685", "28685 is already in use"),
        ("configuration_url = 28672", "28672 is already in use"),
        ("config_url = 16400", "unknown field"),
        ('configuration_url = "16400"', "expected int"),
    ],
)
def test_parse_cisco_attributes_invalid_rejected(
    pki: LabPki, body: str, problem: str
) -> None:
    with pytest.raises(ConfigError, match=problem) as err:
        parse(text(pki, f"{AAA}\ncisco_attributes = {{ {body} }}"), "t")
    # file:line:field names the profile's table
    assert err.value.line is not None
    assert "profiles[0].cisco_attributes" in err.value.fieldname
