"""The wheel carries the templates: built, installed into a fresh virtualenv, it renders
from / exactly what units/ holds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def test_wheel_installs_into_a_fresh_venv_and_renders_from_root(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(ROOT),
                    "-w", str(tmp_path)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("alive_switch-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([venv / "bin/pip", "install", "-q", "--disable-pip-version-check",
                    str(wheel)], check=True, capture_output=True)
    out = tmp_path / "out"
    done = subprocess.run([venv / "bin/alive-switch", "--config",
                           str(ROOT / "examples/alive-switch.toml"), "render", "production",
                           "--out", str(out)], cwd="/", capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr
    rendered = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert rendered, "nothing rendered"
    for rel in rendered:
        assert (out / rel).read_text() == (ROOT / "units" / rel).read_text(), rel
    assert (venv / "bin/alive-switch-router").exists()
