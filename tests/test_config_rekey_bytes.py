"""The per-profile `child_rekey_bytes` key: default, bounds, located errors."""

from __future__ import annotations

import pytest

from control import config
from control.config import ConfigError

BASE = """\
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


def test_child_rekey_bytes_defaults_off() -> None:
    assert config.parse(BASE, "t.toml").profiles[0].child_rekey_bytes == 0


@pytest.mark.parametrize("value", [0, 65_536, 1 << 30, 1 << 50])
def test_child_rekey_bytes_in_range_accepted(value: int) -> None:
    cfg = config.parse(BASE + f"child_rekey_bytes = {value}\n", "t.toml")
    assert cfg.profiles[0].child_rekey_bytes == value


@pytest.mark.parametrize("value", [1, 65_535, (1 << 50) + 1, -5])
def test_child_rekey_bytes_out_of_range_refused(value: int) -> None:
    where = r"t\.toml:\d+.*child_rekey_bytes: .* is not 0"
    with pytest.raises(ConfigError, match=where):
        config.parse(BASE + f"child_rekey_bytes = {value}\n", "t.toml")


def test_child_rekey_bytes_wrong_type_refused() -> None:
    with pytest.raises(ConfigError, match="child_rekey_bytes"):
        config.parse(BASE + 'child_rekey_bytes = "1M"\n', "t.toml")
