"""Many hosts: the Ansible collection in ansible/, run by a real ansible-playbook over real
SSH against three test hosts (hosts.py), each with its own systemd, network namespace and
overlays. alive-switch reaches the hosts only as the wheelhouse the controller builds.

The hosts are shared by the module's tests, which run in order and build on each other
(Ansible over SSH is slow: the playbook runs are kept few):

    role from nothing → build 1 (and again: no change) · rolling 2 under load, batch 1, then
    batch 2 (forced) · again: changed=0 · --check: nothing changes · a build failing its
    health gate on h1 · failing on h2 only, with rollback · max_failed 1 · h2 unreachable
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import tarfile
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.load import Load, Tally, one_request
from tests.system.conftest import check_host
from tests.system.harness import APP, ROOT, VENV_BIN, get
from tests.system.hosts import SSHD, Fleet, Host

pytestmark = pytest.mark.system
APP_NAME, ENV = "fl", "prod"
PREFIX = f"{APP_NAME}-{ENV}"
LISTEN = 9000  # every host has its own loopback, so its own 9000
BUILDS = f"/srv/{APP_NAME}/builds/{ENV}"
VENV_CLI = "/opt/alive-switch/bin/alive-switch"
COMPILERS = ("gcc", "cc", "x86_64-linux-gnu-gcc-12", "c89", "c99")
CONFIG: dict[str, Any] = {
    "app": APP_NAME,
    "env": {ENV: {
        "listen": LISTEN,
        "ports": {"blue": 9001, "green": 9002},
        "builds": BUILDS,
        "exec": "/usr/bin/python3 server.py",
        "drain": 0.5,
        "watch": 1,
        "standby": 60,
        "health": {"path": "/api/health", "timeout": 4, "interval": 0.1},
        "unit": {"stop_timeout": 5, "restart_sec": 1},
        "checks": {"disk_max_percent": 99, "memory_min_mb": 50},
    }},
}
SITE = """\
- name: Set up alive-switch
  hosts: all
  gather_facts: false
  roles: [alive_switch.fleet.host]
- name: Roll the first build
  ansible.builtin.import_playbook: alive_switch.fleet.rolling
"""
RECAP = re.compile(r"^(\S+)\s+: ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)"
                   r"\s+skipped=(\d+)\s+rescued=(\d+)", re.MULTILINE)


@dataclass
class Play:
    """One ansible-playbook run: exit code, output, the recap per host."""

    returncode: int
    output: str
    log: Path  # the whole output, kept with the test's files

    @property
    def recap(self) -> dict[str, dict[str, int]]:
        keys = ("ok", "changed", "unreachable", "failed", "skipped", "rescued")
        return {m[1]: dict(zip(keys, map(int, m.groups()[1:]), strict=True))
                for m in RECAP.finditer(self.output)}

    def changed(self) -> dict[str, int]:
        return {host: counts["changed"] for host, counts in self.recap.items()}

    def summary(self) -> list[str]:
        """The rolling playbook's per-host summary lines."""
        return re.findall(r'^\s+"((?:h\d): [^"]*)",?$', self.output, re.MULTILINE)


@dataclass
class World:
    fleet: Fleet
    work: Path
    runs: int = 0

    def play(self, playbook: str, *extra: str, check: bool = False,
             command: str = "ansible-playbook") -> Play:
        argv = [str(VENV_BIN / command), playbook, *extra]
        if check:
            argv.append("--check")
        env = {"PATH": f"{VENV_BIN}:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
               "ANSIBLE_CONFIG": str(self.fleet.ansible_cfg), "ANSIBLE_NOCOLOR": "1",
               "ANSIBLE_FORCE_COLOR": "0", "HOME": str(self.fleet.root)}
        self.runs += 1
        log = self.work / f"play-{self.runs}.log"
        began = time.monotonic()
        lines = []
        with log.open("w") as out, subprocess.Popen(
                argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                cwd=self.work) as proc:
            out.write(f"{shlex.join(argv)}\n")
            assert proc.stdout is not None
            for line in proc.stdout:  # each line stamped: where a run spends its time
                lines.append(line)
                out.write(f"[{time.monotonic() - began:6.1f}] {line}")
            returncode = proc.wait()
        return Play(returncode, "".join(lines), log)

    def facts(self) -> dict[str, dict[str, Any]]:
        """``alive_switch.fleet.info`` on every host (ad hoc): its fact per host."""
        done = self.play_adhoc("alive_switch.fleet.info", f"env={ENV}")
        found = re.findall(r"^(h\d) \| SUCCESS => (\{.*?^\})$", done.output,
                           re.MULTILINE | re.DOTALL)
        assert len(found) == 3, play_ok(done)
        return {host: json.loads(body)["ansible_facts"]["alive_switch"] for host, body in found}

    def play_adhoc(self, module: str, args: str) -> Play:
        return self.play("all", "-m", module, "-a", args, command="ansible")

    def roll(self, archive: Path, *extra: str, check: bool = False) -> Play:
        return self.play("alive_switch.fleet.rolling", "-e", f"alive_switch_env={ENV}",
                         "-e", f"alive_switch_build_archive={archive}", *extra, check=check)

    def archive(self, name: str, **settings: str) -> Path:
        """``<name>.tar.gz``: the sample app and settings files, no top-level directory."""
        path = self.work / f"{name}.tar.gz"
        with tarfile.open(path, "w:gz") as tar:
            tar.add(APP, arcname="server.py")
            for key, value in settings.items():
                setting = self.work / f"{name}.{key}"
                setting.write_text(value)
                tar.add(setting, arcname=key)
        return path

    @property
    def hosts(self) -> list[Host]:
        return list(self.fleet.hosts.values())


class PacedLoad(Load):
    """Load's client (a new connection per request, every failure classified) at a steady
    pace: three hosts' routers and apps share this machine's two cores with Ansible, and an
    unpaced client on each would starve the playbook it is meant to witness."""

    PAUSE = 0.01  # seconds between one thread's requests

    def _run(self) -> None:
        while not self._stop.wait(self.PAUSE) and time.monotonic() < self.deadline:
            outcome, build = one_request(self.port, self.timeout)
            with self._lock:
                self.tally.add(outcome, build)


def status(host: Host) -> dict[str, Any]:
    done = host.run(VENV_CLI, "status", ENV, "--json", check=True)
    return dict(json.loads(done.stdout))


def serving(host: Host) -> str:
    """The build answering on the host's public port."""
    code, body = host.call(get, LISTEN)
    assert code == 200, body
    return str(body["build"])


def history(host: Host) -> list[dict[str, Any]]:
    """The host's deploys and rollbacks (not the standby timers' retires), oldest first."""
    path = host.state_dir / PREFIX / "history.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] \
        if path.exists() else []
    return [r for r in records if r.get("kind") in ("deploy", "rollback")]


def build_dirs(host: Host) -> set[str]:
    return {p.name for p in host.path(BUILDS).iterdir()}


def play_ok(play: Play) -> str:
    return f"ansible-playbook → {play.returncode} (all of it: {play.log})\n{play.output[-6000:]}"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    check_host()
    work = tmp_path_factory.mktemp("fleet-work")
    wheelhouse = build_wheelhouse(work / "wheelhouse")
    fleet = Fleet(tmp_path_factory.mktemp("fleet"))
    try:
        fleet.boot()
        install_collection(fleet, work)
        for host in fleet.hosts.values():
            # The host builds nothing: no compiler (the machine's is hidden in its /usr).
            host.run("rm", "-f", *(f"/usr/bin/{name}" for name in COMPILERS), check=True)
        group_vars = fleet.root / "group_vars"
        group_vars.mkdir(exist_ok=True)
        (group_vars / "all.json").write_text(json.dumps({
            "alive_switch_env": ENV, "alive_switch_config": CONFIG,
            "alive_switch_wheelhouse": str(wheelhouse)}))
        (work / "site.yml").write_text(SITE)
        yield World(fleet, work)
    finally:
        fleet.kill()


def build_wheelhouse(wheelhouse: Path) -> Path:
    """Every wheel a host needs, built here: alive-switch from this checkout, each dependency
    (systemd-python from its sdist: it has no wheel) kept between runs in .venv."""
    cache = VENV_BIN.parent / "fleet-wheels" / _dependencies_key()
    if not cache.is_dir():
        partial = cache.with_suffix(".partial")
        shutil.rmtree(partial, ignore_errors=True)
        pip_wheel(partial, str(ROOT))
        for own in partial.glob("alive_switch-*.whl"):
            own.unlink()
        partial.rename(cache)
    shutil.copytree(cache, wheelhouse)
    pip_wheel(wheelhouse, "--no-deps", str(ROOT))
    return wheelhouse


def _dependencies_key() -> str:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    text = "\n".join(sorted(project["dependencies"]))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def pip_wheel(directory: Path, *args: str) -> None:
    done = subprocess.run([str(VENV_BIN / "pip"), "wheel", "-q", "--disable-pip-version-check",
                           "--wheel-dir", str(directory), *args], capture_output=True, text=True,
                          timeout=600, check=False)
    assert done.returncode == 0, f"pip wheel {' '.join(args)}:\n{done.stdout}\n{done.stderr}"


def install_collection(fleet: Fleet, work: Path) -> None:
    env = {**os.environ, "ANSIBLE_CONFIG": str(fleet.ansible_cfg), "HOME": str(fleet.root)}
    galaxy = str(VENV_BIN / "ansible-galaxy")
    for argv in ([galaxy, "collection", "build", str(ROOT / "ansible"), "--output-path",
                  str(work), "--force"],):
        subprocess.run(argv, check=True, capture_output=True, env=env, timeout=120)
    (tarball,) = work.glob("alive_switch-fleet-*.tar.gz")
    subprocess.run([galaxy, "collection", "install", str(tarball), "-p",
                    str(fleet.root / "collections"), "--force"], check=True,
                   capture_output=True, env=env, timeout=120)


# -- the tests, in order ------------------------------------------------------------------


def test_host_role_sets_up_every_host_from_nothing_and_then_changes_nothing(
        world: World) -> None:
    for host in world.hosts:
        absent = host.run("sh", "-c", "command -v alive-switch || ls /opt/alive-switch")
        assert absent.returncode != 0, f"{host.name} already has alive-switch: {absent.stdout}"
        assert not host.path("/usr/bin/gcc").exists()
    b1 = world.archive("b1")

    first = world.play("site.yml", "-e", f"alive_switch_build_archive={b1}")
    assert first.returncode == 0, play_ok(first)
    for host in world.hosts:
        assert serving(host) == "b1"
        assert status(host)["live_build"] == "b1"
        # installed into the host's own /opt and /etc: the machine's stay without it
        assert host.path("/opt/alive-switch/bin/alive-switch").exists()
        assert host.path("/etc/alive-switch/alive-switch.toml").read_text().startswith(
            'router_exec = "/opt/alive-switch/bin/alive-switch-router"\napp = "fl"\n')
    assert not Path("/opt/alive-switch").exists()

    again = world.play("site.yml", "-e", f"alive_switch_build_archive={b1}")
    assert again.returncode == 0, play_ok(again)
    assert again.changed() == {"h1": 0, "h2": 0, "h3": 0}, play_ok(again)


def test_rolling_under_load_loses_no_request_and_a_second_run_changes_nothing(
        world: World) -> None:
    b2, b3 = world.archive("b2"), world.archive("b3")
    loads = [host.call(PacedLoad(LISTEN, threads=2).__enter__) for host in world.hosts]
    try:
        for load in loads:
            load.wait_requests(50)
        by_one = world.roll(b2, "-e", "alive_switch_batch=1")
        assert by_one.returncode == 0, play_ok(by_one)
        assert by_one.changed() == {"h1": 3, "h2": 3, "h3": 3}, play_ok(by_one)
        for load in loads:
            load.wait_requests(50)
        by_two = world.roll(b2, "-e", "alive_switch_batch=2", "-e", "alive_switch_force=true")
        assert by_two.returncode == 0, play_ok(by_two)
        for load in loads:
            load.wait_requests(50)
    finally:
        tallies: list[Tally] = [load.stop() for load in loads]
    for host, tally in zip(world.hosts, tallies, strict=True):
        assert tally.failed == 0, f"{host.name}: {tally.summary()} {tally.examples}"
        assert tally.builds["b2"] > 0, f"{host.name}: {tally.builds}"
        assert serving(host) == "b2"
        deploys = [r for r in history(host) if r.get("build") == "b2"]
        assert len(deploys) == 2, deploys  # batch 1, then batch 2 (forced: the other color)
    # batch 1 went host by host, in inventory order
    first_b2 = [next(r["time"] for r in history(h) if r["build"] == "b2") for h in world.hosts]
    assert first_b2 == sorted(first_b2)
    assert any(line.startswith("h3: switched, build b2") for line in by_two.summary()), \
        play_ok(by_two)

    second = world.roll(b2, "-e", "alive_switch_batch=2")
    assert second.returncode == 0, play_ok(second)
    assert second.changed() == {"h1": 0, "h2": 0, "h3": 0}, play_ok(second)
    assert all(": unchanged, build b2" in line for line in second.summary()), play_ok(second)
    facts = world.facts()
    assert {host: fact["live_build"] for host, fact in facts.items()} == {
        "h1": "b2", "h2": "b2", "h3": "b2"}

    before = {host.name: (status(host)["live"], len(history(host))) for host in world.hosts}
    checked = world.roll(b3, "-e", "alive_switch_batch=2", check=True)
    assert checked.returncode == 0, play_ok(checked)
    for host in world.hosts:
        assert (status(host)["live"], len(history(host))) == before[host.name]
        assert "b3" not in build_dirs(host)
        assert serving(host) == "b2"


def test_a_build_failing_its_health_gate_stops_the_run_at_host_1(world: World) -> None:
    bad = world.archive("bad-health", HEALTH_STATUS="503")
    before = {host.name: len(history(host)) for host in world.hosts}

    run = world.roll(bad)

    assert run.returncode != 0, play_ok(run)
    assert "exited 3 (aborted before the switch" in run.output, play_ok(run)
    assert "not reached: h2, h3" in run.output, play_ok(run)
    h1, h2, h3 = world.hosts
    assert history(h1)[-1]["outcome"] != "ok" and history(h1)[-1]["build"] == "bad-health"
    assert serving(h1) == "b2"
    for host in (h2, h3):  # never touched: nothing unpacked, nothing deployed
        assert "bad-health" not in build_dirs(host)
        assert len(history(host)) == before[host.name]
        assert serving(host) == "b2"


def test_a_build_failing_on_host_2_only_rolls_back_host_1(world: World) -> None:
    bad = world.archive("bad-on-h2")
    h1, h2, h3 = world.hosts
    # Only h2's copy of the build answers its health check wrongly.
    marker = h2.path(f"{BUILDS}/bad-on-h2")
    marker.mkdir()
    (marker / "HEALTH_STATUS").write_text("500")
    before_h3 = len(history(h3))

    run = world.roll(bad, "-e", "alive_switch_rollback_on_failure=true")

    assert run.returncode != 0, play_ok(run)
    lines = run.summary()
    assert any(line.startswith("h1: rolled back, build b2") for line in lines), play_ok(run)
    assert any(line.startswith("h2: failed") for line in lines), play_ok(run)
    assert "h3: not reached" in lines, play_ok(run)
    assert [r["kind"] for r in history(h1)[-2:]] == ["deploy", "rollback"], history(h1)
    assert [r["build"] for r in history(h1)[-2:]] == ["bad-on-h2", "b2"]
    for host in world.hosts:
        assert serving(host) == "b2"
    assert len(history(h3)) == before_h3 and "bad-on-h2" not in build_dirs(h3)


def test_max_failed_tolerates_one_failing_host_and_stops_at_the_second(world: World) -> None:
    bad = world.archive("bad-twice")
    h1, h2, h3 = world.hosts
    for host in (h1, h2):
        copy = host.path(f"{BUILDS}/bad-twice")
        copy.mkdir()
        (copy / "START_EXIT").write_text("1")
    before_h3 = len(history(h3))

    run = world.roll(bad, "-e", "alive_switch_max_failed=1")

    assert run.returncode != 0, play_ok(run)
    assert history(h2)[-1]["build"] == "bad-twice", "h2 was not tried after h1 failed"
    assert "2 host(s) failed (h1, h2), over alive_switch_max_failed=1" in run.output, \
        play_ok(run)
    assert "h3: not reached" in run.summary(), play_ok(run)
    assert len(history(h3)) == before_h3
    for host in world.hosts:
        assert serving(host) == "b2"


def test_an_unreachable_host_fails_clearly_and_stops_the_run(world: World) -> None:
    b4 = world.archive("b4")
    h1, h2, h3 = world.hosts
    world.fleet.close_ssh("h2")
    sshd = h2.path(str(SSHD))
    sshd.unlink()  # its sshd gone (from h2's /usr only)
    try:
        run = world.roll(b4)
    finally:
        shutil.copy2(SSHD, sshd)
    assert run.returncode != 0, play_ok(run)
    assert run.recap["h2"]["unreachable"] == 1, play_ok(run)
    assert "UNREACHABLE" in run.output and "h2" in run.output
    assert "1 host(s) failed (h2), over alive_switch_max_failed=0" in run.output, play_ok(run)
    assert {"h1: switched, build b4", "h2: unreachable", "h3: not reached"} <= {
        line.partition(" on ")[0] for line in run.summary()}, play_ok(run)
    assert serving(h1) == "b4"
    assert serving(h3) == "b2" and "b4" not in build_dirs(h3)
