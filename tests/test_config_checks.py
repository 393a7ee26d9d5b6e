"""Config checks from a new user's report: pools of policies, manglers, secrets.

Every refused value is a ConfigError at the offending line, in words of our
own (no Python exception text), and never echoes a secret.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from control import config
from control.config import ConfigError

BASE = """\
[radius.corp]
user_password = "group-pass-1"
[[radius.corp.servers]]
address = "127.0.0.1"
secret = "radius-test-secret-0123"

[pools.staff]
range = "198.18.128.10-198.18.128.20"

[pools.staff6]
range = "2001:db8:18:1::/120"

[policies.staff]
dns_servers = ["198.19.1.53"]

[[profiles]]
name = "p"
local_identity = "fqdn:vpn.example"
psk = "a-long-enough-psk-0123"
"""
POLICY_LINE = 14
PROFILE_LINE = 16


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from control.lab.pki import LabPki

    base = tmp_path_factory.mktemp("pki")
    LabPki.create(base, "rsa", chain=True)
    return base / "pki"


def refused(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        config.parse(text, "t.toml")
    return info.value


def with_policy(line: str) -> str:
    return BASE.replace('dns_servers = ["198.19.1.53"]', line)


def with_profile(lines: str) -> str:
    return BASE + lines + "\n"


# -- item 3: the pools and netmask of a local policy -------------------------------


@pytest.mark.parametrize(
    ("line", "field", "problem"),
    [
        ('addr_pool = "nope"', "addr_pool", "unknown pool 'nope'"),
        ('ipv6_addr_pool = "staff"', "ipv6_addr_pool", "'staff' is not an IPv6 pool"),
        ('addr_pool = "staff6"', "addr_pool", "'staff6' is not an IPv4 pool"),
        ('ipv6_addr_pool = "gone"', "ipv6_addr_pool", "unknown pool 'gone'"),
        ('netmask = "255.0.255.0"', "netmask", "not a contiguous netmask"),
        ('netmask = "0.0.0.255"', "netmask", "not a contiguous netmask"),
        ('netmask = "0.0.0.0"', "netmask", "not a netmask a client can use"),
    ],
)
def test_parse_policy_pool_or_netmask_wrong_refused_at_its_line(line, field, problem):
    err = refused(with_policy(line))
    assert (err.line, err.fieldname) == (POLICY_LINE, f"policies.staff.{field}")
    assert err.problem == problem or problem in err.problem


def test_parse_policy_pools_and_netmask_of_right_kind_accepted():
    text = with_policy(
        'addr_pool = "staff"\nipv6_addr_pool = "staff6"\nnetmask = "255.255.255.0"'
    )
    policy = config.parse(text, "t.toml").policies["staff"]
    assert (policy.addr_pool, policy.ipv6_addr_pool) == ("staff", "staff6")
    assert policy.framed_ip_netmask == ipaddress.IPv4Address("255.255.255.0")


def test_parse_profile_ipv6_pool_naming_ipv4_pool_refused():
    err = refused(with_profile('ipv6_pool = "staff"'))
    assert err.fieldname == "profiles[0].ipv6_pool"
    assert err.problem == "'staff' is not an IPv6 pool"


# -- item 4: name manglers need what they read -------------------------------------


@pytest.mark.parametrize(
    ("lines", "problem"),
    [
        ('name_mangler = "dn:common-name"', "needs certificate authentication"),
        ('name_mangler = "eap:all"', "needs EAP authentication"),
        ('name_mangler = "eap:prefix:@"', "needs EAP authentication"),
        ('name_mangler = "email:username"\nmatch_identity = ["*.example"]', None),
        (
            'name_mangler = "email:username"\nmatch_identity = ["fqdn:a.example"]',
            "no match_identity pattern admits email identities",
        ),
        (
            'name_mangler = "fqdn:hostname"\n'
            'match_identity = ["198.18.0.0/16", "email:a@b.example"]',
            "no match_identity pattern admits fqdn identities",
        ),
    ],
)
def test_parse_name_mangler_without_its_source_refused(lines, problem):
    text = with_profile(f'authorization_user = "local"\n{lines}')
    if problem is None:
        assert config.parse(text, "t.toml").profiles[0].name_mangler
        return
    err = refused(text)
    assert (err.fieldname, err.line) == ("profiles[0].name_mangler", PROFILE_LINE + 5)
    assert problem in err.problem


def test_parse_name_mangler_unused_refused():
    err = refused(with_profile('name_mangler = "email:username"'))
    assert err.fieldname == "profiles[0].name_mangler"
    assert "without authorization_user" in err.problem
    err = refused(with_profile(
        'authorization_user = "local"\nauthorization_username = "u"\n'
        'name_mangler = "email:username"'
    ))  # fmt: skip
    assert "authorization_username is set" in err.problem


def test_parse_dn_mangler_with_certificate_auth_accepted(pki_dir: Path) -> None:
    text = BASE + f"""\
remote_auth = ["pubkey"]
ca = ["{pki_dir}/ca.pem"]
authorization_user = "local"
name_mangler = "dn:common-name"
"""
    assert config.parse(text, "t.toml").profiles[0].name_mangler == "dn:common-name"


# -- item 6: secrets are never echoed, never empty ----------------------------------


@pytest.mark.parametrize("value", ["12", "1234.5678", "true", "[1, 2]"])
@pytest.mark.parametrize(
    ("old", "key", "field"),
    [
        ('user_password = "group-pass-1"', "user_password",
         "radius.corp.user_password"),
        ('secret = "radius-test-secret-0123"', "secret",
         "radius.corp.servers[0].secret"),
        ('psk = "a-long-enough-psk-0123"', "psk", "profiles[0].psk"),
    ],
)  # fmt: skip
def test_parse_wrong_type_secret_says_only_its_type(old, key, field, value):
    err = refused(BASE.replace(old, f"{key} = {value}"))
    assert err.fieldname == field
    assert err.problem.startswith("expected str, got ")
    assert value not in str(err) and "5678" not in str(err)


def test_parse_empty_secrets_refused():
    err = refused(BASE.replace('"group-pass-1"', '""'))
    assert (err.fieldname, err.problem) == ("radius.corp.user_password", "empty")
    err = refused(BASE.replace('"radius-test-secret-0123"', '""'))
    assert err.fieldname == "radius.corp.servers[0].secret"
    # a PSK on a profile that takes its keys from RADIUS is still no empty key
    text = BASE.replace('psk = "a-long-enough-psk-0123"', 'psk = ""\naaa_psk = "corp"')
    assert refused(text).fieldname == "profiles[0].psk"


# -- item 7: the summary and the old auth key --------------------------------------


def test_describe_shows_auth_addresses_authorization_and_engine(pki_dir: Path):
    text = BASE + f"""\
pool = "staff"
authorization_group = "local:staff"

[[profiles]]
name = "eap"
local_identity = "fqdn:vpn.espgate.example"
local_auth = "rsa-sig"
certificate = "{pki_dir}/server.pem"
private_key = "{pki_dir}/server.key"
remote_auth = ["eap"]
aaa_authentication = "corp"
dhcp_server = "198.19.1.67"
dhcp_giaddr = "198.18.130.1"
engine = "kernel"
"""
    lines = config.describe(config.parse(text, "t.toml")).splitlines()
    assert lines[0] == "t.toml: ok"
    assert "  engine: userspace, crypto ipsec-mb, dataplane process" in lines
    assert "  pool staff6: 2001:db8:18:1::1 - 2001:db8:18:1::ff (255 /128 prefixes)" \
        in lines  # fmt: skip
    psk, eap = lines[-2], lines[-1]
    assert "auth local pre-share, remote pre-share;" in psk
    assert "addresses pool staff;" in psk and "engine userspace" in psk
    assert "authorization group local:staff;" in psk
    assert "auth local rsa-sig, remote eap (EAP via radius:corp);" in eap
    assert "addresses dhcp 198.19.1.67 via 198.18.130.1;" in eap
    assert eap.endswith("engine kernel") and "None" not in eap


def test_parse_old_auth_key_points_at_local_and_remote_auth():
    err = refused(with_profile('auth = "cert"'))
    assert err.fieldname == "profiles[0].auth"
    assert "local_auth" in err.problem and "remote_auth" in err.problem


# -- item 12: IPv6 pools skip the subnet-router anycast address ---------------------


def test_parse_ipv6_pool_of_128s_starts_above_the_zero_address():
    pool = config.parse(BASE, "t.toml").pools["staff6"]
    assert pool.first == ipaddress.IPv6Address("2001:db8:18:1::1") and pool.size == 255


def test_parse_ipv6_pool_of_client_prefixes_keeps_the_first_prefix():
    prefixes = '"2001:db8:18::/62"\nclient_prefix = 64'
    text = BASE.replace('"2001:db8:18:1::/120"', prefixes)
    pool = config.parse(text, "t.toml").pools["staff6"]
    assert pool.first == ipaddress.IPv6Address("2001:db8:18::") and pool.size == 4


def test_parse_ipv6_pool_of_one_128_refused():
    err = refused(BASE.replace('"2001:db8:18:1::/120"', '"2001:db8:18:1::/128"'))
    assert err.fieldname == "pools.staff6.range" and "anycast" in err.problem


# -- item 16: errors in our words ---------------------------------------------------


@pytest.mark.parametrize(
    ("old", "new", "field", "problem"),
    [
        ('local_identity = "fqdn:vpn.example"', 'local_identity = "keyid:xyz"',
         "profiles[0].local_identity", "expected hex digits in pairs, got 'xyz'"),
        ('local_identity = "fqdn:vpn.example"',
         'local_identity = "ipv6:198.19.1.53"', "profiles[0].local_identity",
         "not an IPv6 address: '198.19.1.53'"),
        ('local_identity = "fqdn:vpn.example"', 'local_identity = "ipv4:::1"',
         "profiles[0].local_identity", "not an IPv4 address: '::1'"),
        ('local_identity = "fqdn:vpn.example"', 'local_identity = "dn:garbage"',
         "profiles[0].local_identity", "not an RFC 4514 DN"),
        ('name = "p"', 'name = "p"\nmatch_identity = ["keyid:xyz"]',
         "profiles[0].match_identity", "expected hex digits in pairs"),
        ('name = "p"', 'name = "p"\nmatch_identity = ["ipv6:198.19.1.53"]',
         "profiles[0].match_identity", "not an IPv6 address: '198.19.1.53'"),
        ('name = "p"', 'name = "p"\nmatch_identity = ["10.0.0.0/33"]',
         "profiles[0].match_identity", "not an IP address or prefix"),
        ('range = "198.18.128.10-198.18.128.20"',
         'range = "198.18.128.250-198.18.128.10"', "pools.staff.range",
         "the last address 198.18.128.10 is below the first 198.18.128.250"),
        ('dns_servers = ["198.19.1.53"]', 'ipv6_dns_servers = ["198.19.1.53"]',
         "policies.staff.ipv6_dns_servers", "not an IPv6 address: '198.19.1.53'"),
        ('dns_servers = ["198.19.1.53"]', 'dns_servers = ["2001:db8::53"]',
         "policies.staff.dns_servers", "not an IPv4 address: '2001:db8::53'"),
        ('dns_servers = ["198.19.1.53"]', 'dhcp_server = "x"',
         "policies.staff.dhcp_server", "not an IP address: 'x'"),
        ('dns_servers = ["198.19.1.53"]', 'route_set_prefix = ["10.1.0.0/8"]',
         "policies.staff.route_set_prefix", "the prefix is 10.0.0.0/8"),
        ('dns_servers = ["198.19.1.53"]', 'route_accept = "any tag x"',
         "policies.staff.route_accept", "expected 'any [tag N] [distance N]'"),
    ],
)  # fmt: skip
def test_parse_error_in_our_words(old, new, field, problem):
    err = refused(BASE.replace(old, new))
    assert err.fieldname == field and problem in err.problem
    for python in ("fromhex", "parts expected", "octets", "invalid literal"):
        assert python not in err.problem


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ("permit host 1.2.3", "not an IPv4 address: '1.2.3'"),
        ("permit 10.0.0.0 0.0.x.255", "not an IPv4 address: '0.0.x.255'"),
        ("permit 10.1.0.0/8", "has host bits set; the prefix is 10.0.0.0/8"),
        ("permit 10.0.0.0/33", "not an IPv4 prefix: '10.0.0.0/33'"),
    ],
)
def test_parse_access_list_entry_error_in_our_words(entry, problem):
    err = refused(BASE + f'\n[access_lists.a]\nentries = ["{entry}"]\n')
    assert err.fieldname == "access_lists.a.entries[0]" and problem in err.problem


def test_parse_unreadable_ca_file_says_what_it_should_hold(tmp_path: Path):
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    text = with_profile(f'remote_auth = ["pubkey"]\nca = ["{junk}"]')
    err = refused(text)
    assert err.problem == f"{junk}: not a PEM certificate file"
    err = refused(text.replace(str(junk), str(tmp_path / "gone.pem")))
    assert err.problem == f"{tmp_path / 'gone.pem'}: no such file or directory"
