"""What the unit tests of the operations share: a config on disk with two builds, a
Deployer over fakes, healthy color servers and pre-flight without the host's own checks."""

from __future__ import annotations

from pathlib import Path

from switcher import config
from switcher.ops.deploy import Deployer
from tests.fakes import FakeRouter, FakeSystemd
from tests.ports import port_block

LISTEN, BLUE, GREEN = port_block(__name__, 3)

def write_config(tmp_path: Path, extra: str = "", also: str = "") -> config.Config:
    builds = tmp_path / "builds"
    for name in ("b1", "b2"):
        (builds / name).mkdir(parents=True, exist_ok=True)
    path = tmp_path / "c.toml"
    path.write_text(f"""
app = "lc"
state_dir = "{tmp_path / 'state'}"
[env.prod]
listen = {LISTEN}
ports = {{ blue = {BLUE}, green = {GREEN} }}
builds = "{builds}"
exec = "/usr/bin/python3 server.py"
environment = {{ FROM_CONFIG = "yes" }}
drain = 0.1
watch = 0.1
standby = 30
{extra}
[env.prod.health]
path = "/h"
timeout = 1
interval = 0.05
{also}""")
    return config.load(str(path))


def write_config_path_free() -> config.Config:
    """A config for pure functions: nothing on disk is read but the file itself."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return write_config(Path(tmp))


def deployer(tmp_path: Path, extra: str = "") -> tuple[Deployer, FakeSystemd, list[str]]:
    cfg = write_config(tmp_path, extra)
    env = cfg.env["prod"]
    cfg.env_dir(env).mkdir(parents=True)
    sd, said = FakeSystemd(), []
    return (Deployer(cfg, env, sd, FakeRouter(), say=said.append, run_dir=tmp_path / "run"),
            sd, said)


class ShowFake(FakeSystemd):
    """FakeSystemd that also shows the properties it is given (FragmentPath, Listen…)."""

    def __init__(self, extra: dict[str, dict[str, str]]) -> None:
        super().__init__()
        self.extra = extra

    def show(self, unit: str, *props: str) -> dict[str, str]:
        return {**super().show(unit, *props),
                **{p: v for p, v in self.extra.get(unit, {}).items() if p in props}}
