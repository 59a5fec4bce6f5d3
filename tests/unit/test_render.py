"""Rendered units: a pure function of config values, golden in units/, clean under
`systemd-analyze verify`, and no config value can inject a directive."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from switcher import config, render
from switcher.model import Color

ROOT = Path(__file__).parents[2]
EXAMPLE = ROOT / "examples/alive-switch.toml"


def example() -> config.Config:
    return config.load(str(EXAMPLE), check_owner=False)


def rendered_example() -> dict[str, str]:
    cfg = example()
    return {**render.render(cfg, cfg.env["production"]), **render.render(cfg, cfg.env["staging"])}


def test_units_dir_is_exactly_the_rendered_example() -> None:
    files = rendered_example()
    on_disk = {str(p.relative_to(ROOT / "units")): p.read_text()
               for p in (ROOT / "units").rglob("*") if p.is_file()}
    assert sorted(on_disk) == sorted(files), "units/ has extra or missing files"
    for rel, text in files.items():
        assert on_disk[rel] == text, (f"units/{rel} drifted from the templates: run "
                                      "`alive-switch render production --out units/` and staging")


def test_render_does_not_depend_on_the_config_path(tmp_path: Path) -> None:
    copy = tmp_path / "elsewhere.toml"
    shutil.copy(EXAMPLE, copy)
    other = config.load(str(copy), check_owner=False)
    assert render.render(other, other.env["production"]) == render.render(
        example(), example().env["production"])


def test_unit_discipline() -> None:
    files = rendered_example()
    router = files["alive-production.service"]
    unit_section = router.split("[Service]")[0]
    for line in ("Requires=alive-production.socket", "After=alive-production.socket",
                 "StartLimitIntervalSec=0"):
        assert line in unit_section
    for line in ("Type=notify", "NotifyAccess=main", "Restart=always", "LimitNOFILE=65536",
                 "WatchdogSec=", "ExecReload="):
        assert line in router
    color = files["alive-production@.service"]
    unit_part, service_part = color.split("[Service]")
    assert "StartLimitBurst=3" in unit_part
    assert "StartLimitIntervalSec=300s" in unit_part
    assert "StartLimit" not in service_part
    for line in ("Restart=on-failure", "RestartSec=10s", "TimeoutStartSec=60s",
                 "TimeoutStopSec=30s", "NoNewPrivileges=yes", "ProtectKernelTunables=yes",
                 "ProtectKernelModules=yes", "ProtectControlGroups=yes", "RestrictSUIDSGID=yes",
                 "LockPersonality=yes"):
        assert line in service_part
    for strict_only in ("ProtectSystem", "ProtectHome", "PrivateTmp"):
        assert strict_only not in color
    socket_unit = files["alive-production.socket"]
    assert "ListenStream=9000\nBacklog=4096" in socket_unit
    assert "WantedBy=sockets.target" in socket_unit
    assert "PORT=9001" in files["alive-production@blue.service.d/color.conf"]
    assert "PORT=9002" in files["alive-production@green.service.d/color.conf"]


def configured(tmp_path: Path, extra: str, exec_line: str = "/usr/bin/node server.js"
               ) -> tuple[config.Config, config.Environment]:
    text = EXAMPLE.read_text().replace(
        'exec = "/usr/bin/python3 /srv/alive/app/server.py"\nenvironment = { APP_ENV = '
        '"production" }', f"exec = {exec_line!r}\n{extra}")
    path = tmp_path / "c.toml"
    path.write_text(text)
    cfg = config.load(str(path), check_owner=False)
    return cfg, cfg.env["production"]


def test_strict_hardening(tmp_path: Path) -> None:
    cfg, env = configured(tmp_path, '[env.production.unit]\nhardening = "strict"\n'
                          '[env.production.health]\npath = "/h"\n'.replace(
                              '[env.production.health]\npath = "/h"\n', ""))
    color = render.render(cfg, env)["alive-production@.service"]
    for line in ("ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes",
                 "ReadWritePaths=/srv/alive/builds/production"):
        assert line in color


def test_values_cannot_inject_directives_or_specifiers(tmp_path: Path) -> None:
    cfg, env = configured(tmp_path, r"""environment = { A = 'x" ExecStartPre=/bin/evil', """
                          r"""B = '100% \ $HOME', C = 'trailing\' }""",
                          exec_line="/usr/bin/env %n $PORT")
    color = render.render(cfg, env)["alive-production@.service"]
    assert 'Environment="A=x\\" ExecStartPre=/bin/evil"' in color
    assert 'Environment="B=100%% \\\\ $HOME"' in color
    assert 'Environment="C=trailing\\\\"' in color
    assert "ExecStart=/usr/bin/env %%n $PORT" in color
    assert not [ln for ln in color.splitlines() if ln.startswith("ExecStartPre")]


def verify(files: dict[str, str], directory: Path, router_exec: str
           ) -> subprocess.CompletedProcess[str]:
    for rel, text in files.items():
        path = directory / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text.replace("/usr/local/bin/alive-switch-router", router_exec))
    units = sorted({rel.split("/")[0].removesuffix(".d") for rel in files if "@." not in rel})
    return subprocess.run(["systemd-analyze", "verify", "--man=no", *units], cwd=directory,
                          env={"SYSTEMD_UNIT_PATH": f"{directory}:", "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, check=False)


def router_binary() -> str:
    return str(Path(sys.executable).parent / "alive-switch-router")


def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    done = verify(rendered_example(), tmp_path, router_binary())
    assert (done.returncode, done.stderr) == (0, "")


def test_verify_negative_control_catches_an_unknown_key(tmp_path: Path) -> None:
    files = rendered_example()
    files["alive-production@.service"] = files["alive-production@.service"].replace(
        "Restart=on-failure", "Restart=on-failure\nRestartSecs=5")
    done = verify(files, tmp_path, router_binary())
    assert done.returncode == 0, "verify exits 0 on an unknown key: stderr is what counts"
    assert "RestartSecs" in done.stderr


@pytest.mark.parametrize("color", list(Color))
def test_dropins_name_their_color(color: Color) -> None:
    files = rendered_example()
    dropin = files[f"alive-production@{color.value}.service.d/color.conf"]
    assert f"WorkingDirectory=/var/lib/alive-switch/alive-production/{color.value}" in dropin
