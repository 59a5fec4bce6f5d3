"""alive_switch.fleet.to_toml (ansible/plugins/filter/toml.py): the host role's config file
reads back, with tomllib, as the mapping it was written from."""

from __future__ import annotations

import importlib.util
import tomllib
from pathlib import Path
from types import ModuleType

import pytest
from ansible.errors import AnsibleFilterError

FILTER = Path(__file__).resolve().parents[2] / "ansible/plugins/filter/toml.py"


def load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fleet_toml", FILTER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


to_toml = load().to_toml
CONFIG = {
    "app": "alive",
    "router_exec": "/opt/alive-switch/bin/alive-switch-router",
    "env": {"production": {
        "listen": "[::1]:9000",
        "ports": {"blue": 9001, "green": 9002},
        "exec": '/usr/bin/node "server.js" \\ ünï',
        "drain": 0.5,
        "environment": {"NODE_ENV": "production", "odd key": "x"},
        "health": {"path": "/api/health", "expect_status": [200, 204]},
        "router": {"trusted_proxies": [], "mode": "http"},
        "unit": {"hardening": "strict"},
        "checks": {"disk_max_percent": 80},
    }},
    "flag": True,
}


def test_a_config_reads_back_as_written() -> None:
    text = to_toml(CONFIG)
    assert tomllib.loads(text) == CONFIG
    assert text.startswith('app = "alive"\n')
    assert "[env.production.ports]\nblue = 9001\n" in text


def test_values_toml_cannot_hold_are_refused_with_their_key() -> None:
    with pytest.raises(AnsibleFilterError, match=r"env\.x is a NoneType"):
        to_toml({"env": {"x": [None]}})
    with pytest.raises(AnsibleFilterError, match="needs a mapping"):
        to_toml(["a"])
