"""The wheel carries every module and the templates: built, installed into a fresh
virtualenv, every module of it imports, it renders from / exactly what units/ holds, and one
command of each wing runs (the core: render; the operations: init; the router: its usage)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]
IMPORT_ALL = """
import importlib, pathlib, sys
root = pathlib.Path(sys.argv[1])
names = sorted(".".join(p.relative_to(root.parent).with_suffix("").parts)
               for p in root.rglob("*.py") if p.name != "__main__.py")
for name in names:
    importlib.import_module(name.removesuffix(".__init__"))
print(len(names))
"""


def test_wheel_installs_into_a_fresh_venv_imports_and_runs_each_wing(tmp_path: Path) -> None:
    # From a copy without build/: setuptools never empties build/lib, so a module moved
    # or removed since the last build would ship anyway from a working checkout.
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, symlinks=True, ignore=shutil.ignore_patterns(
        "build", ".venv", ".git", "*.egg-info", "__pycache__", ".*_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(source),
                    "-w", str(tmp_path)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("alive_switch-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([venv / "bin/pip", "install", "-q", "--disable-pip-version-check",
                    str(wheel)], check=True, capture_output=True)
    site = subprocess.run([venv / "bin/python", "-c", "import switcher, pathlib; "
                           "print(pathlib.Path(switcher.__file__).parent)"], cwd="/",
                          capture_output=True, text=True, check=True).stdout.strip()
    assert site.startswith(str(venv)), site  # the wheel's copy, not the checkout
    shipped = {p.relative_to(site) for p in Path(site).rglob("*.py")}
    ours = {p.relative_to(ROOT / "switcher") for p in (ROOT / "switcher").rglob("*.py")}
    assert shipped == ours, f"not in the wheel: {sorted(map(str, ours - shipped))}"
    imported = subprocess.run([venv / "bin/python", "-c", IMPORT_ALL, site], cwd="/",
                              capture_output=True, text=True, check=False)
    assert imported.returncode == 0, imported.stderr
    assert int(imported.stdout) == len(shipped) - 2  # both __main__ modules run, not import

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

    config = tmp_path / "init" / "alive-switch.toml"
    done = subprocess.run([venv / "bin/alive-switch", "--config", str(config), "init",
                           "staging", "--listen", "8998", "--ports", "8996,8997", "--exec",
                           "/usr/bin/node server.js", "--builds", str(tmp_path / "builds"),
                           "--health", "/api/health"], cwd="/", capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert "[env.staging]" in config.read_text()

    router = subprocess.run([venv / "bin/alive-switch-router"], cwd="/", capture_output=True,
                            text=True, check=False)
    assert router.returncode == 64, router.stderr  # EX_USAGE, with its usage line
    assert "usage: alive-switch-router STATE_DIR" in router.stderr
