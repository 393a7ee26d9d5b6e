"""Config checks from two new users' reports: pools, manglers, secrets, routes.

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


# -- second report, item 4: the headend's inside address is no client's --------------


@pytest.mark.parametrize(
    ("server", "pool"),
    [
        ('inside_address = "198.18.128.15"', "staff"),
        ('inside_address = "198.18.128.10"', "staff"),
        ('inside_address6 = "2001:db8:18:1::20"', "staff6"),
    ],
)
def test_parse_inside_address_in_a_pool_refused_at_its_line(server, pool):
    err = refused(f"[server]\n{server}\n\n" + BASE)
    key = server.split()[0]
    assert (err.line, err.fieldname) == (2, f"server.{key}")
    assert f"is inside pool {pool!r}" in err.problem


def test_parse_inside_address6_in_a_client_prefix_refused():
    # the last /64 client prefix covers more than its first address
    text = "[server]\ninside_address6 = \"2001:db8:18:3::99\"\n\n" + BASE.replace(
        '"2001:db8:18:1::/120"', '"2001:db8:18::/62"\nclient_prefix = 64'
    )
    assert "inside pool 'staff6'" in refused(text).problem


def test_parse_inside_addresses_next_to_pools_accepted():
    text = '[server]\ninside_address = "198.18.128.9"\n'
    text += 'inside_address6 = "2001:db8:18:2::1"\n\n' + BASE
    server = config.parse(text, "t.toml").server
    assert (server.inside_address, server.inside_address6) == (
        "198.18.128.9", "2001:db8:18:2::1",
    )  # fmt: skip


# -- third report, item 7: an inside address names one host on the inside ------------


@pytest.mark.parametrize(
    ("server", "problem"),
    [
        ('inside_address = "0.0.0.0"', "0.0.0.0 is the unspecified address"),
        ('inside_address = "127.0.0.1"', "127.0.0.1 is a loopback address"),
        ('inside_address = "224.0.0.9"', "224.0.0.9 is a multicast address"),
        (
            'inside_address = "255.255.255.255"',
            "255.255.255.255 is the limited broadcast address",
        ),
        ('inside_address = "169.254.1.1"', "169.254.1.1 is a link-local address"),
        ('inside_address6 = "::"', ":: is the unspecified address"),
        ('inside_address6 = "::1"', "::1 is a loopback address"),
        ('inside_address6 = "ff02::1"', "ff02::1 is a multicast address"),
        ('inside_address6 = "fe80::1"', "fe80::1 is a link-local address"),
    ],
)
def test_parse_inside_address_not_a_host_address_refused_at_its_line(server, problem):
    err = refused(f"[server]\n{server}\n\n" + BASE)
    assert (err.line, err.fieldname) == (2, f"server.{server.split()[0]}")
    assert err.problem == problem


@pytest.mark.parametrize(
    ("server", "what"),
    [
        ('inside_address = "198.18.128.0"', "network address of pool 'net'"),
        ('inside_address = "198.18.128.255"', "broadcast address of pool 'net'"),
        (
            'inside_address6 = "2001:db8:18:1::"',
            "subnet-router anycast address of pool 'staff6'",
        ),
    ],
)
def test_parse_inside_address_pool_edge_refused_at_its_line(server, what):
    # the tester's pool 198.18.128.0/24 hands out .1-.254; /120 of /128s ::1-::ff
    text = f"[server]\n{server}\n\n" + BASE
    text = text.replace("[pools.staff6]", '[pools.net]\nrange = "198.18.128.0/24"\n\n'
                        "[pools.staff6]").replace(  # fmt: skip
        '[pools.staff]\nrange = "198.18.128.10-198.18.128.20"',
        '[pools.staff]\nrange = "198.18.129.10-198.18.129.20"',
    )
    err = refused(text)
    assert (err.line, err.fieldname) == (2, f"server.{server.split()[0]}")
    assert what in err.problem


def test_parse_inside_address_next_to_pool_prefix_accepted():
    text = '[server]\ninside_address = "198.18.129.1"\n\n' + BASE.replace(
        '"198.18.128.10-198.18.128.20"', '"198.18.128.0/24"'
    )
    assert config.parse(text, "t.toml").server.inside_address == "198.18.129.1"


# -- second report, item 8: a mangler's identity type must be admitted ---------------


@pytest.mark.parametrize(
    ("mangler", "patterns", "admitted"),
    [
        ("fqdn:hostname", '["*@espgate.example"]', False),
        ("email:username", '["*@espgate.example"]', True),
        ("fqdn:hostname", '["*.espgate.example"]', True),
        ("fqdn:all", '["*"]', True),
        ("email:domain", '["*"]', True),
        ("fqdn:domain", '["alice@espgate.example", "*@b.example"]', False),
        ("fqdn:domain", '["*@b.example", "host.espgate.example"]', True),
    ],
)
def test_parse_mangler_needs_pattern_admitting_its_identity_type(
    mangler, patterns, admitted
):
    text = with_profile(
        f'authorization_user = "local"\nname_mangler = "{mangler}"\n'
        f"match_identity = {patterns}"
    )
    if admitted:
        assert config.parse(text, "t.toml").profiles[0].name_mangler == mangler
        return
    err = refused(text)
    assert err.fieldname == "profiles[0].name_mangler"
    assert "no match_identity pattern admits fqdn identities" in err.problem


# -- second report, item 9: empty access lists, route_accept, user_password -----------

ACL_POLICY = 'route_set_access_list = "none"'


@pytest.mark.parametrize(
    "entries", ['["deny any"]', '["deny 10.0.0.0/8", "permit 10.1.0.0/16"]']
)
def test_parse_policy_using_access_list_that_permits_nothing_refused(entries):
    text = with_policy(ACL_POLICY) + f"\n[access_lists.none]\nentries = {entries}\n"
    err = refused(text)
    assert (err.line, err.fieldname) == (
        POLICY_LINE, "policies.staff.route_set_access_list",
    )  # fmt: skip
    assert err.problem == "access list 'none' (line 21) permits nothing"


def test_parse_unused_access_list_that_permits_nothing_warns(caplog):
    text = BASE + '\n[access_lists.none]\nentries = ["deny any"]\n'
    with caplog.at_level("WARNING", logger="espgate.config"):
        parsed = config.parse(text, "t.toml")
    assert parsed.access_lists["none"] == ()
    assert [r.getMessage() for r in caplog.records] == [
        "t.toml:22: access list none permits nothing; a RADIUS route-set naming "
        "it would push no routes"
    ]


def test_parse_used_access_list_that_permits_something_no_warning(caplog):
    text = with_policy(ACL_POLICY)
    text += '\n[access_lists.none]\nentries = ["deny 10.1.0.0/16", "permit any"]\n'
    with caplog.at_level("WARNING", logger="espgate.config"):
        parsed = config.parse(text, "t.toml")
    assert ipaddress.IPv4Network("10.0.0.0/16") in parsed.access_lists["none"]
    assert not caplog.records


@pytest.mark.parametrize(
    ("value", "word"),
    [
        ("any tag 10 tag 11", "tag"),
        ("any distance 5 tag 1 distance 5", "distance"),
        ("ANY Tag 10 tag 10", "tag"),
    ],
)
def test_parse_route_accept_repeated_keyword_refused(value, word):
    err = refused(with_policy(f'route_accept = "{value}"'))
    assert (err.line, err.fieldname) == (POLICY_LINE, "policies.staff.route_accept")
    assert err.problem == f"{word!r} given more than once in {value!r}"


def test_parse_route_accept_each_keyword_once_accepted():
    text = with_policy('route_accept = "any tag 10 distance 20"')
    policy = config.parse(text, "t.toml").policies["staff"]
    assert policy.route_accept == "any tag 10 distance 20"


NO_PASSWORD = BASE.replace('user_password = "group-pass-1"\n', "")


@pytest.mark.parametrize(
    ("lines", "key"),
    [
        ('authorization_user = "radius:corp"\nauthorization_username = "u"',
         "authorization_user"),
        ('authorization_group = "radius:corp"\nauthorization_group_name = "g"',
         "authorization_group"),
    ],
)  # fmt: skip
def test_parse_radius_authorization_without_user_password_refused(lines, key):
    err = refused(NO_PASSWORD + lines + "\n")
    assert (err.line, err.fieldname) == (PROFILE_LINE + 3, f"profiles[0].{key}")
    assert err.problem == (
        "[radius.corp] (line 1) has no user_password (sent as User-Password)"
    )
    # with the password written down the same profile is accepted
    assert config.parse(BASE + lines + "\n", "t.toml").profiles[0].name == "p"


def test_parse_aaa_psk_without_user_password_accepted():
    text = NO_PASSWORD.replace(
        'psk = "a-long-enough-psk-0123"', 'aaa_psk = "corp"'
    )
    assert config.parse(text, "t.toml").radius["corp"].user_password == "espgate"


# -- second report, item 10: what check-config shows --------------------------------


def test_describe_shows_server_aaa_routes_and_config_mode():
    text = '[server]\ninside_address = "198.18.60.1"\nstate_dir = ""\n\n' + BASE
    text = text.replace(
        'dns_servers = ["198.19.1.53"]',
        'route_set_access_list = "branch"\nroute_set_prefix = ["198.19.9.0/24"]\n'
        'route_set_interface = true\nroute_accept = "any tag 10 distance 20"',
    )
    text += 'config_mode = "both"\n[profiles.cisco_attributes]\n'
    text += "configuration_url = 28700\n"
    text += '\n[access_lists.branch]\nentries = ["deny host 198.19.1.1", '
    text += '"permit 198.19.1.0/30"]\n'
    lines = config.describe(config.parse(text, "t.toml")).splitlines()
    assert "  inside address: 198.18.60.1" in lines
    server = next(ln for ln in lines if ln.startswith("  server: "))
    assert server.endswith("state directory none (leases in memory)")
    assert "  radius corp: servers 127.0.0.1:1812; timeout 2 s, retransmit 2, " \
        "nas-identifier espgate" in lines  # fmt: skip
    assert "  access list branch: permits 198.19.1.0/32, 198.19.1.2/31" in lines
    assert "  policy staff: pool none; route set 198.19.9.0/24, access list " \
        "branch, interface; route accept any tag 10 distance 20" in lines  # fmt: skip
    profile = lines[-1]
    assert "; config mode both; cisco attributes configuration_url 28700; " in profile
    whole = "\n".join(lines)
    for secret in ("group-pass-1", "radius-test-secret-0123", "a-long-enough-psk"):
        assert secret not in whole


def test_describe_shows_state_directory_and_no_inside_address():
    text = '[server]\nstate_dir = "/var/lib/espgate-test"\n\n' + BASE
    lines = config.describe(config.parse(text, "t.toml")).splitlines()
    assert "  inside address: none" in lines
    assert any(ln.endswith("state directory /var/lib/espgate-test") for ln in lines)
