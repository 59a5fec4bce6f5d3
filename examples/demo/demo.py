"""alive-switch, working end to end in about half a minute: the README's first command.

``examples/demo/run`` installs what this needs and runs it, as root. It boots a real
systemd as PID 1 of private PID and mount namespaces (the tests' sandbox,
tests/system/sandbox.py) over a temporary directory, so the host's units, /etc, /var/lib
and /tmp outside that directory are left alone, and then, with the sample app
(examples/app/server.py) and the load client of the tests (tests/load.py, one new
connection per request):

    alive-switch init demo …        a config for app "demo", environment "demo"
    alive-switch install demo       the socket unit on 127.0.0.1:LISTEN, the router
    alive-switch deploy demo 1      → blue; the load starts once it serves
    alive-switch deploy demo 2      → green, under load; blue on standby, then retired
    alive-switch deploy demo 3      a broken build (it exits at start): refused, exit 3
    alive-switch rollback demo      → blue, build 1 again; green on standby, then retired

It prints a summary, writes a timeline (SVG) and exits 1 if a guarantee failed: a failed
request, a request answered by a build that was not live then, anything answered by
build 3. Exit 2: it could not run (not root, another sandbox running, ...).

``--keep`` leaves the sandbox running afterwards and prints commands to try by hand; a
small keeper process cleans up after it once its systemd is killed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

from timeline import Marker, svg  # noqa: E402

from switcher.ops import init  # noqa: E402
from tests.load import CLASSES, Load, Request  # noqa: E402
from tests.ports import port_block  # noqa: E402
from tests.system.sandbox import STATE_DIR, Sandbox, SandboxError  # noqa: E402

APP, ENV = "demo", "demo"
PREFIX = f"{APP}-{ENV}"
BIN = Path(sys.executable).parent  # the virtualenv's bin/, where alive-switch lives
CLI = BIN / "alive-switch"
SERVER = ROOT / "examples/app/server.py"
DRAIN, WATCH, STANDBY = 1, 1, 1  # seconds: short, so the whole demo takes ~30 s
COLORS = {"1": "blue", "2": "green"}  # the builds the demo expects each color to serve
SLACK = 0.3  # seconds a request answered by the old color may end after T0 + drain


@dataclass
class Step:
    """One CLI command the demo ran, and what it changed."""

    label: str
    argv: list[str]
    code: int
    out: str
    err: str
    began: float
    seconds: float
    switch_at: float | None = None  # T0, when the router switched (from state.json)
    record: dict[str, Any] = field(default_factory=dict)  # its history record


class Demo:
    def __init__(self, box: Sandbox, home: Path, ports: list[int], *, verbose: bool,
                 threads: int) -> None:
        self.box, self.home, self.verbose, self.threads = box, home, verbose, threads
        self.listen, self.blue, self.green = ports
        self.config = home / "alive-switch.toml"
        self.builds = home / "builds"
        self.env_dir = box.state_dir / PREFIX  # the sandbox's /var/lib/alive-switch/demo-demo
        self.t0 = time.time()
        self.steps: list[Step] = []
        self.markers: list[Marker] = []
        self.switches: list[tuple[float, str]] = []  # (T0, the build live from then on)
        self.problems: list[str] = []

    # ------------------------------------------------------------------ output

    def say(self, text: str) -> None:
        print(f"[{time.time() - self.t0:5.1f} s] {text}", flush=True)

    def shell(self, argv: list[str]) -> str:
        return "$ " + " ".join(["alive-switch", *map(shlex.quote, argv)])

    # ------------------------------------------------------------------ the scenario

    def setup(self) -> None:
        self.builds.mkdir()
        for name, files in (("1", {}), ("2", {}), ("3", {"START_EXIT": "1"})):
            build = self.builds / name
            build.mkdir()
            for key, value in files.items():
                (build / key).write_text(value + "\n")
        python = shutil.which("python3") or sys.executable
        req = init.Request(
            ENV, self.listen, (self.blue, self.green), f"{python} {shlex.quote(str(SERVER))}",
            str(self.builds), "/api/health",
            settings={"drain": DRAIN, "watch": WATCH, "standby": STANDBY})
        init.write(self.config, req, app=APP, router_exec=str(BIN / "alive-switch-router"))
        self.say(f"$ alive-switch init {ENV} --listen {self.listen} --ports "
                 f"{self.blue},{self.green} --builds {self.builds} … → {self.config}")
        self.say("  builds 1 and 2 of the sample app; build 3 is broken (a START_EXIT file: "
                 "it exits at once)")

    def run(self, label: str, *argv: str, expect: int = 0) -> Step:
        began = time.time()
        done = self.box.run(CLI, "--config", self.config, *argv, cwd=self.home, timeout=120)
        step = Step(label, list(argv), done.returncode, done.stdout, done.stderr, began,
                    time.time() - began)
        self.steps.append(step)
        if argv[0] in ("deploy", "rollback"):
            step.record = self.last_record(argv[0])
        if done.returncode != expect:
            self.problems.append(f"`{self.shell(list(argv))[2:]}` exited {done.returncode}, "
                                 f"expected {expect}: {done.stderr.strip()}")
        if self.verbose:
            for line in (done.stdout + done.stderr).splitlines():
                print(f"          {line}")
        return step

    def install(self) -> None:
        step = self.run("install", "install", ENV)
        self.say(f"{self.shell(step.argv)}  ({step.seconds:.1f} s): socket unit on "
                 f"127.0.0.1:{self.listen}, router started")

    def deploy(self, build: str, color: str) -> Step:
        step = self.run(f"deploy {build}", "deploy", ENV, build)
        self.markers.append(Marker(step.began, f"deploy {build}", "deploy"))
        self.switched(step, build, f"switch → {color} ({build})")
        return step

    def switched(self, step: Step, build: str, label: str) -> None:
        if step.code != 0:
            self.say(f"{self.shell(step.argv)}  failed (exit {step.code}): "
                     f"{step.err.strip()}")
            return
        state = json.loads((self.env_dir / "state.json").read_text())
        step.switch_at = float(state["drain_until"]) - DRAIN
        self.switches.append((step.switch_at, build))
        self.markers.append(Marker(step.switch_at, label, "switch"))
        phases = step.record.get("phases", {})
        self.say(f"{self.shell(step.argv)}  ok in {step.seconds:.1f} s: "
                 f"{step.record.get('message', '')} (health {phases.get('health', 0):.2f} s, "
                 f"switch {phases.get('switching', 0) * 1000:.0f} ms, watch "
                 f"{phases.get('watch', 0):.2f} s)")

    def broken_deploy(self) -> Step:
        step = self.run("deploy 3", "deploy", ENV, "3", expect=3)
        self.markers.append(Marker(step.began, "deploy 3", "deploy"))
        self.markers.append(Marker(step.began + step.seconds, "3 refused", "refused"))
        reason = step.err.strip().splitlines()[0] if step.err.strip() else "?"
        self.say(f"{self.shell(step.argv)}  refused, exit {step.code}, in "
                 f"{step.seconds:.1f} s: {reason.removeprefix('alive-switch: ')}")
        return step

    def rollback(self, color: str, build: str) -> Step:
        step = self.run("rollback", "rollback", ENV)
        self.markers.append(Marker(step.began, "rollback", "rollback"))
        self.switched(step, build, f"switch → {color} ({build})")
        return step

    def wait_retired(self, color: str, timeout: float = 10) -> None:
        if self.steps[-1].code != 0:
            return  # nothing was switched, so nothing retires
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for record in reversed(self.history()):
                if (record.get("kind") == "retire" and record.get("color") == color
                        and record["time"] >= self.steps[-1].began):
                    self.markers.append(Marker(record["time"], f"{color} retired", "retired"))
                    self.say(f"{color} retired by its timer ({PREFIX}-retire-{color}.timer): "
                             "standby over")
                    return
            time.sleep(0.1)
        self.problems.append(f"{color} was not retired within {timeout:g} s")

    # ------------------------------------------------------------------ facts

    def history(self) -> list[dict[str, Any]]:
        path = self.env_dir / "history.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def last_record(self, kind: str) -> dict[str, Any]:
        return next((r for r in reversed(self.history()) if r.get("kind") == kind), {})

    def status_line(self) -> str:
        shown = self.box.systemctl("status", "--no-pager", f"{PREFIX}.service").stdout
        return next((line.strip() for line in shown.splitlines()
                     if line.strip().startswith("Status:")), "(no Status: line)")

    def status_json(self) -> dict[str, Any]:
        step = self.box.run(CLI, "--config", self.config, "status", ENV, "--json",
                            cwd=self.home)
        return dict(json.loads(step.stdout)) if step.returncode == 0 else {}


# ---------------------------------------------------------------------- checking


def wrong_builds(requests: list[Request], switches: list[tuple[float, str]]) -> list[str]:
    """Requests answered by a build that was neither live nor the draining old one."""
    problems: list[str] = []
    for t, outcome, build in requests:
        if outcome != "ok":
            continue
        live_before = [b for at, b in switches if at <= t]
        if not live_before:
            problems.append(f"{build} answered at {t:.3f}, before any switch")
            continue
        current = live_before[-1]
        old = live_before[-2] if len(live_before) > 1 else None
        draining = old is not None and t <= switches[len(live_before) - 1][0] + DRAIN + SLACK
        if build != current and not (draining and build == old):
            problems.append(f"build {build} answered at {t:.3f} while {current} was live")
    return problems


def guarantees(demo: Demo, tally_requests: list[Request], failed: int,
               served: dict[str, int]) -> list[str]:
    problems = list(demo.problems)
    if failed:
        problems.append(f"{failed} requests failed")
    if served.get("3"):
        problems.append(f"build 3 answered {served['3']} requests")
    wrong = wrong_builds(tally_requests, demo.switches)
    if wrong:
        problems.append(f"{len(wrong)} requests answered by the wrong build, e.g. {wrong[0]}")
    if not served.get("1") or not served.get("2"):
        problems.append(f"expected both builds 1 and 2 to serve, got {served}")
    info = demo.status_json()
    if (info.get("live"), info.get("live_build")) != ("blue", "1"):
        problems.append(f"status says {info.get('live')} ({info.get('live_build')}) is live, "
                        "expected blue (1)")
    return problems


# ---------------------------------------------------------------------- summary


def summary(demo: Demo, tally: Any, seconds: float, status_line: str) -> list[str]:
    failed = ", ".join(f"{c} {tally.failures.get(c, 0)}" for c in CLASSES)
    served = " · ".join(f"build {b} on {COLORS.get(b, '?')} {n:,}"
                        for b, n in sorted(tally.builds.items()))
    lines = [
        "",
        "summary",
        f"  requests    {tally.ok:,} served, {tally.failed} failed ({failed})",
        f"              a new connection each, from {demo.threads} threads; worst latency "
        f"{tally.worst_latency * 1000:.0f} ms",
        f"  served by   {served} · build 3: {tally.builds.get('3', 0)}",
    ]
    for step in demo.steps:
        if step.argv[0] in ("deploy", "rollback"):
            lines.append(f"  {step.label:<11} {step.seconds:5.2f} s  {step_detail(step)}")
    switches = [s.record["phases"]["switching"] * 1000 for s in demo.steps
                if s.code == 0 and "switching" in s.record.get("phases", {})]
    if switches:
        lines.append(f"  switch      {min(switches):.0f}–{max(switches):.0f} ms: the switching "
                     "phase (re-check the process, write the intent, router acknowledges)")
    lines.append(f"  systemctl   {status_line}   (systemctl status {PREFIX})")
    lines.append(f"  total       {seconds:.1f} s")
    return lines


def step_detail(step: Step) -> str:
    """``→ green  health 0.67 s · switch 56 ms · watch 1.02 s`` or why it was refused."""
    phases = step.record.get("phases", {})
    if step.code != 0:
        return (f"refused (exit {step.code}) at {step.record.get('failed_phase')}; "
                f"{step.record.get('from') or 'the live color'} kept serving")
    text = (f"→ {step.record.get('color'):<6} health {phases.get('health', 0):.2f} s · switch "
            f"{phases.get('switching', 0) * 1000:.0f} ms · watch {phases.get('watch', 0):.2f} s")
    if step.label == "rollback":
        warm = "warm" if "warm" in step.out else "cold start: deploy 3 had used blue"
        text += f" (build {step.record.get('build')}, {warm})"
    return text


def caption(tally: Any, demo: Demo) -> str:
    switches = [s.record.get("phases", {}).get("switching", 0) * 1000 for s in demo.steps
                if s.code == 0 and s.record.get("phases")]
    return (f"{tally.ok:,} requests served, {tally.failed} failed · switch "
            f"{max(switches, default=0):.1f} ms at most · drain {DRAIN} s, watch {WATCH} s, "
            f"standby {STANDBY} s · build 3 refused, served {tally.builds.get('3', 0)}")


# ---------------------------------------------------------------------- keeping it up


def try_by_hand(demo: Demo) -> list[str]:
    pid = demo.box.pid
    enter = f"nsenter -t {pid} -m -p --wd={demo.home} --"
    cli = f"{enter} {CLI} --config {demo.config}"
    return [
        "",
        f"The sandbox keeps running: systemd is PID {pid} on this host. Try (as root):",
        f"  {cli} status {ENV}",
        f"  {cli} deploy {ENV} 2",
        f"  {cli} rollback {ENV}",
        f"  {cli} history {ENV}",
        f"  {enter} systemctl status --no-pager {PREFIX}.service",
        f"  {enter} journalctl --no-pager -u {PREFIX}@blue.service -n 20",
        f"  curl -s http://127.0.0.1:{demo.listen}/     # the network is shared with the host",
        f"Stop it: kill -KILL {pid}   (then {demo.home.parent} is removed)",
    ]


def keep_in_background(box: Sandbox, workdir: Path, var_lib_made: bool, code: int) -> None:
    """Leave the sandbox up: this process returns to the shell; a detached child waits for
    the sandbox's systemd to die, then undoes what it left (sysctls, cgroups, the lock)
    and removes the work directory."""
    sys.stdout.flush()
    if os.fork():
        os._exit(code)
    os.setsid()
    log = os.open(workdir / "keeper.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    for fd in (0, 1, 2):
        os.dup2(log, fd)
    # The console's copying thread did not survive fork(): restart it, or systemd would
    # block once the pty's buffer is full. (Reaching into the sandbox on purpose.)
    console = box._console
    if console is not None:
        console._log = (box.boot_log_path).open("ab")
        console._thread = threading.Thread(target=console._copy, daemon=True)
        console._thread.start()
    pid = box.pid
    while pid is not None and _alive(pid):
        time.sleep(0.5)
    cleanup(box, workdir, var_lib_made)
    os._exit(0)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def box_started(box: Sandbox, asked: float) -> float:
    """When the sandbox's boot began: not before another sandbox's lock was released."""
    try:
        return box.boot_script.stat().st_mtime
    except OSError:
        return asked


def cleanup(box: Sandbox, workdir: Path, var_lib_made: bool) -> None:
    box.kill()
    if var_lib_made:
        with contextlib.suppress(OSError):
            STATE_DIR.rmdir()  # the sandbox's mount point: empty, made for this demo
    shutil.rmtree(workdir, ignore_errors=True)


# ---------------------------------------------------------------------- main


def scenario(demo: Demo) -> tuple[Any, list[str]]:
    demo.setup()
    demo.install()
    demo.deploy("1", "blue")
    with Load(demo.listen, threads=demo.threads, record=True) as load:
        demo.markers.append(Marker(time.time(), "load starts", "load"))
        demo.say(f"load: {demo.threads} clients on 127.0.0.1:{demo.listen}, a new connection per "
                 "request")
        load.wait_requests(200)
        demo.deploy("2", "green")
        demo.wait_retired("blue")
        load.wait_requests(100)
        demo.broken_deploy()
        load.wait_requests(100)
        demo.rollback("blue", "1")
        demo.wait_retired("green")
        load.wait_requests(200)
        tally = load.stop()
    problems = guarantees(demo, tally.requests, tally.failed, dict(tally.builds))
    return tally, problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="examples/demo/run", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", action="store_true", help="leave the sandbox running "
                        "and print commands to try by hand")
    parser.add_argument("--out", default="alive-switch-demo.svg", help="where the timeline "
                        "goes (default: ./alive-switch-demo.svg)")
    parser.add_argument("--threads", type=int, default=4, help="load client threads")
    parser.add_argument("--verbose", "-v", action="store_true", help="show every command's "
                        "own output")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("demo: run it as root (it boots systemd in private namespaces)", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="alive-switch-demo-"))
    var_lib_made = not STATE_DIR.exists()
    box = Sandbox(workdir / "sandbox")
    kept = False
    try:
        waited = time.time()
        try:
            box.boot()
        except (SandboxError, BlockingIOError) as exc:
            print(f"demo: cannot boot the sandbox: {exc}", file=sys.stderr)
            return 2
        home = workdir / "home"
        home.mkdir(mode=0o755)
        demo = Demo(box, home, port_block("alive-switch-demo", 3), verbose=args.verbose,
                    threads=args.threads)
        began = demo.t0 = min(time.time(), box_started(box, waited))
        demo.say(f"booted systemd as PID 1 of private namespaces (PID {box.pid} on this "
                 f"host), over {workdir}")
        tally, problems = scenario(demo)
        for line in summary(demo, tally, time.time() - began, demo.status_line()):
            print(line)
        out = Path(args.out).absolute()
        out.write_text(svg(tally.requests, demo.markers, COLORS, caption(tally, demo)))
        print(f"  timeline    {out}")
        if problems:
            print("\nFAILED guarantees:")
            for problem in problems:
                print(f"  ✗ {problem}")
        else:
            print("\nall guarantees held: 0 failed requests, only the live build answered, "
                  "build 3 answered nothing")
        if args.keep:
            for line in try_by_hand(demo):
                print(line)
            kept = True
            keep_in_background(box, workdir, var_lib_made, 1 if problems else 0)
        return 1 if problems else 0
    finally:
        if not kept:
            cleanup(box, workdir, var_lib_made)


if __name__ == "__main__":
    sys.exit(main())
