"""The README's first command, end to end: examples/demo/demo.py (what examples/demo/run
runs once it has installed the packages and the virtualenv) boots its own sandbox, deploys
1, 2 and a broken 3 under load, rolls back, prints a summary, writes the timeline and
cleans up; with --keep it leaves the sandbox to try by hand until its PID 1 is killed.

Each test runs the demo as a subprocess: it boots its own sandbox, so none of this
module's fixtures does (pytest runs modules one after another, and a module's sandbox is
killed when it ends)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.system.conftest import check_host
from tests.system.harness import ROOT, wait_for
from tests.system.sandbox import LOCK_FILE, LOCK_WAIT_VAR

pytestmark = pytest.mark.system
DEMO = ROOT / "examples/demo/demo.py"
BUDGET = 80  # seconds for one demo run (it takes ~25 s on an idle 2-core machine)


def run_demo(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    check_host()
    began = time.monotonic()
    queue = float(os.environ.get(LOCK_WAIT_VAR, "0"))  # waiting for another sandbox
    done = subprocess.run([sys.executable, DEMO, "--out", tmp_path / "timeline.svg", *args],
                          capture_output=True, text=True, timeout=BUDGET + 30 + queue,
                          check=False, cwd=tmp_path)
    took = time.monotonic() - began
    print(f"\ndemo{' ' + ' '.join(args) if args else ''}: exit {done.returncode} in "
          f"{took:.1f} s\n{done.stdout}{done.stderr}")
    return done, took


def workdir_of(out: str) -> Path:
    match = re.search(r"over (/\S+alive-switch-demo-\S+)$", out, re.MULTILINE)
    assert match, out
    return Path(match.group(1))


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str],
                                                             float, Path]:
    tmp = tmp_path_factory.mktemp("demo")
    done, took = run_demo(tmp)
    return done, took, tmp


def test_the_demo_keeps_every_guarantee_it_can_check(
        demo: tuple[subprocess.CompletedProcess[str], float, Path]) -> None:
    done, _, tmp = demo
    out = done.stdout
    total = re.search(r"^  total +([\d.]+) s$", out, re.MULTILINE)  # from its boot on
    assert total, out
    assert float(total.group(1)) < BUDGET
    served = re.search(r"requests +([\d,]+) served, (\d+) failed \(([^)]*)\)", out)
    assert served, out
    assert int(served.group(1).replace(",", "")) > 500
    assert served.group(2) == "0", served.group(0)
    assert re.fullmatch(r"refused 0, reset 0, eof 0, timeout 0, non2xx 0, other 0",
                        served.group(3))
    builds = re.search(r"served by +build 1 on blue ([\d,]+) · build 2 on green ([\d,]+) · "
                       r"build 3: (\d+)", out)
    assert builds, out
    assert builds.group(3) == "0"
    assert re.search(r"deploy 1 +[\d.]+ s +→ blue +health [\d.]+ s · switch \d+ ms", out)
    assert re.search(r"deploy 2 +[\d.]+ s +→ green +health", out)
    assert re.search(r"deploy 3 +[\d.]+ s +refused \(exit 3\) at \w+; green kept serving", out)
    assert "blue retired by its timer" in out
    svg = (tmp / "timeline.svg").read_text()
    assert svg.startswith("<svg") and svg.rstrip().endswith("</svg>")
    for needle in ("blue: build 1", "green: build 2", "failed: 0", "switch → green (2)",
                   "3 refused", "blue retired"):
        assert needle in svg, needle
    assert 'fill="#2f6fdf"' in svg and 'fill="#1fa35a"' in svg  # both colors have an area
    workdir = workdir_of(out)
    assert not workdir.exists()  # cleaned up: the sandbox's root went with it
    assert str(workdir) not in LOCK_FILE.read_text()  # not recorded as running any more


def test_the_demo_rolls_back_to_build_1_and_exits_0(
        demo: tuple[subprocess.CompletedProcess[str], float, Path]) -> None:
    done, _, _ = demo
    out = done.stdout
    assert re.search(r"rollback +[\d.]+ s +→ blue +health .* \(build 1, ", out), out
    assert 'Status: "serving blue (build 1)"' in out
    assert "green retired by its timer" in out
    assert "all guarantees held" in out
    assert done.returncode == 0


def test_keep_leaves_a_sandbox_to_try_by_hand_until_its_pid_1_is_killed(
        tmp_path: Path) -> None:
    done, _ = run_demo(tmp_path, "--keep")
    out = done.stdout
    workdir = workdir_of(out)
    pid = int(re.search(r"Stop it: kill -KILL (\d+)", out).group(1))  # type: ignore[union-attr]
    try:
        status = next(line.strip() for line in out.splitlines()
                      if line.strip().startswith("nsenter") and line.endswith(" status demo"))
        shown = subprocess.run(shlex.split(status), capture_output=True, text=True,
                               timeout=30, check=False)
        assert shown.returncode == 0, shown.stderr
        assert "demo-demo:" in shown.stdout and "blue" in shown.stdout
        assert workdir.exists()
    finally:
        os.kill(pid, 9)
    wait_for("the keeper to clean up", lambda: not workdir.exists(), timeout=20)
    wait_for("the sandbox lock to be released",
             lambda: str(workdir) not in LOCK_FILE.read_text(), timeout=10)
