"""``python -m benchmarks`` (what ``benchmarks/run`` runs): the whole benchmark in one go.

Order: start nginx, the switch target (green) and the five proxies; check each one passes
the 1 MiB file unchanged (sha256); warm each up; then ``runs`` rounds, each measuring every
target in turn (keep-alive, new connections, 1 MiB; the order of targets rotates per round
so that noise from other work on the machine spreads over all of them), sampling the
proxy's RSS meanwhile; then switch latency on both routers; stop everything (by PID); then
the figures that need a real systemd. Results go to ``--out`` (latest.md, latest.json).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks import report, sandboxed, switching
from benchmarks.targets import (
    BIG_PATH,
    CLIENT_CPU,
    SERVER_CPU,
    SMALL_PATH,
    Target,
    TargetError,
    Targets,
    big_sha256_via,
    pick_ports,
    tool_versions,
    wait_ready,
    which_missing,
)
from benchmarks.wrk import Sample, Wrk, WrkError
from switcher.model import Mode
from switcher.router.control import request

ROOT = Path(__file__).resolve().parents[1]
PAUSE = 0.5  # seconds between wrk runs (lets TIME_WAIT churn and the CPUs settle)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="benchmarks/run",
        description="Benchmark the alive-switch router against a direct connection, HAProxy "
                    "(1 thread, TCP and HTTP mode) and systemd-socket-proxyd, in one run.")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: 1 run × 2 s, 5 switches, 3 rollbacks")
    p.add_argument("--runs", type=int, help="rounds over all targets (default 5)")
    p.add_argument("--seconds", type=float, help="seconds per wrk run (default 5)")
    p.add_argument("--connections", type=int, default=50,
                   help="wrk connections for the small responses (default 50)")
    p.add_argument("--big-connections", type=int, default=8,
                   help="wrk connections for the 1 MiB responses (default 8)")
    p.add_argument("--only", default="",
                   help="comma-separated targets (direct is always measured): "
                        + ", ".join(report.ROWS))
    p.add_argument("--tests", default="keepalive,close,big",
                   help="comma-separated subset of: keepalive, close (new connections), big "
                        "(1 MiB responses); default all")
    p.add_argument("--baseline", metavar="REV|DIR", default="",
                   help="also run the router of git revision REV (e.g. HEAD~1), or of the "
                        "switcher package in DIR, beside this checkout's, to measure a change "
                        "against it in the same run")
    p.add_argument("--skip-systemd", action="store_true",
                   help="leave out warm rollback and status (they boot a systemd sandbox)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results",
                   help="where latest.md and latest.json go (default benchmarks/results)")
    p.add_argument("--label", default="",
                   help="also write <out>/<label>.md and .json (to compare runs)")
    args = p.parse_args(argv)
    args.runs = args.runs or (1 if args.quick else 5)
    args.seconds = args.seconds or (2.0 if args.quick else 5.0)
    args.switch_trials = 5 if args.quick else 20
    args.rollbacks = 3 if args.quick else 10
    args.statuses = 3 if args.quick else 10
    return args


def say(message: str) -> None:
    print(f"benchmarks: {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    missing = which_missing()
    if missing:
        say(f"missing: {', '.join(missing)}; run benchmarks/run, which installs them")
        return 2
    signal.signal(signal.SIGTERM, _interrupt)
    os.environ.setdefault("SANDBOX_LOCK_WAIT", "900")
    try:
        raw = run(args)
    except KeyboardInterrupt:
        say("interrupted; every process it started was stopped")
        return 130
    except (TargetError, WrkError) as e:
        say(f"failed: {e}")
        return 1
    stats = report.summarize(raw)
    text = report.markdown(raw, stats)
    write(args, raw, stats, text)
    print(text)
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(), "versions": tool_versions(), "notes": [],
        "settings": {"runs": args.runs, "seconds": args.seconds,
                     "connections": args.connections, "big_connections": args.big_connections,
                     "client_cpu": CLIENT_CPU, "server_cpu": SERVER_CPU,
                     "switch_trials": args.switch_trials},
    }
    raw["load_before"] = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="alive-bench-", dir="/tmp"))
    ports = pick_ports(12)
    try:
        with started(tmp, ports, args) as (targets, stamp):
            raw["targets"] = measure_data_plane(targets, args, raw["notes"])
            raw["switch"] = {
                t.mode: {"trials": [asdict(x) for x in switching.measure(t, stamp,
                                                                         args.switch_trials)]}
                for t in targets if t.kind == "router" and "@" not in t.name}
        raw["load_after_data_plane"] = os.getloadavg()
        raw["systemd"] = systemd_figures(tmp, ports[9:12], args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    notes_on_noise(raw)
    return raw


@contextmanager
def started(tmp: Path, ports: list[int], args: argparse.Namespace
            ) -> Iterator[tuple[list[Target], switching.Stamp]]:
    backend, r_tcp, r_http, h_tcp, h_http, proxyd, green, b_tcp, b_http = ports[:9]
    wanted = set(filter(None, args.only.split(","))) or set(report.ROWS)
    unknown = wanted - set(report.ROWS)
    if unknown:
        raise TargetError(f"unknown --only target(s) {', '.join(sorted(unknown))}; "
                          f"one of {', '.join(report.ROWS)}")
    starters: dict[str, Callable[[Targets], Target]] = {
        "router-tcp": lambda t: t.router(Mode.tcp, r_tcp, backend, green),
        "router-http": lambda t: t.router(Mode.http, r_http, backend, green),
        "haproxy-tcp": lambda t: t.haproxy("tcp", h_tcp, backend),
        "haproxy-http": lambda t: t.haproxy("http", h_http, backend),
        "socket-proxyd": lambda t: t.socket_proxyd(proxyd, backend),
    }
    if args.baseline:
        base = checkout(args.baseline, tmp / "baseline")
        starters["router-tcp@baseline"] = lambda t: t.router(Mode.tcp, b_tcp, backend, green,
                                                            baseline=base)
        starters["router-http@baseline"] = lambda t: t.router(Mode.http, b_http, backend,
                                                             green, baseline=base)
        wanted |= {f"{name}@baseline" for name in wanted}
    targets = Targets(tmp)
    stamp = switching.Stamp(green)
    try:
        say(f"starting nginx and the proxies on 127.0.0.1 ports {ports[0]}-{ports[6]}")
        chosen = [targets.nginx(backend)]
        chosen += [start(targets) for name, start in starters.items() if name in wanted]
        for target in chosen:
            wait_ready(target)
        yield chosen, stamp
    finally:
        targets.close()
        stamp.close()


def checkout(rev: str, where: Path) -> Path:
    """A directory holding the ``switcher`` package of ``rev``: a directory that has one, or
    a git revision, extracted into ``where``."""
    if (Path(rev) / "switcher" / "router").is_dir():
        return Path(rev).resolve()
    where.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "switcher"],
                             capture_output=True, check=False)
    if archive.returncode != 0:
        raise TargetError(f"git archive {rev} failed: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(where)], input=archive.stdout, check=True)
    return where


def measure_data_plane(targets: list[Target], args: argparse.Namespace,
                       notes: list[str]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    reference = big_sha256_via(targets[0])
    for t in targets:
        digest = big_sha256_via(t)
        results[t.name] = {"kind": t.kind, "mode": t.mode, "port": t.port,
                           "sha256_ok": digest == reference, "samples": {},
                           "figures": {}}
        if digest != reference:
            notes.append(f"{t.name}: the 1 MiB file came through CHANGED (sha256 {digest})")
    wrk = Wrk()
    try:
        say("warming up")
        for t in targets:
            wrk.run(t.url + SMALL_PATH, connections=args.connections, seconds=1)
        tests = {
            "keepalive": (SMALL_PATH, args.connections, False),
            "close": (SMALL_PATH, args.connections, True),
            "big": (BIG_PATH, args.big_connections, False),
        }
        tests = {name: how for name, how in tests.items() if name in args.tests.split(",")}
        for round_ in range(args.runs):
            order = targets[round_ % len(targets):] + targets[:round_ % len(targets)]
            say(f"round {round_ + 1}/{args.runs}: {', '.join(t.name for t in order)}")
            for t in order:
                peak = 0
                for test, (path, conns, close) in tests.items():
                    cpu = t.cpu_seconds()
                    blocks = allocated_blocks(t)
                    with rss_peak(t) as peak_of:
                        sample = wrk.run(t.url + path, connections=conns,
                                         seconds=args.seconds, close=close)
                    cpu = t.cpu_seconds() - cpu
                    peak = max(peak, peak_of())
                    t.check_alive()
                    record(results[t.name], test, sample, cpu)
                    grown = allocated_blocks(t)
                    if test == "keepalive" and blocks is not None and grown is not None:
                        results[t.name]["figures"].setdefault("blocks_per_100k", []).append(
                            (grown - blocks) / max(sample.requests, 1) * 1e5)
                    time.sleep(PAUSE)
                if t.proc is not None and t.kind != "direct":
                    results[t.name]["figures"].setdefault("rss_mb", []).append(peak / 1e6)
    finally:
        wrk.close()
    for name, result in results.items():
        errors = sum(s["errors"] for runs in result["samples"].values() for s in runs)
        if errors:
            notes.append(f"{name}: wrk counted {errors} socket errors or non-2xx answers")
    return results


def record(result: dict[str, Any], test: str, sample: Sample, cpu: float) -> None:
    """Keep the sample; derive the figures. ``cpu``: seconds the target's process used
    during it (for direct, nginx's)."""
    result["samples"].setdefault(test, []).append({**sample.to_json(), "cpu_s": cpu})
    figures = result["figures"]
    per_request = cpu / max(sample.requests, 1) * 1e6
    if test == "keepalive":
        figures.setdefault("keepalive_rps", []).append(sample.rps)
        figures.setdefault("p50_ms", []).append(sample.p50_ms)
        figures.setdefault("p99_ms", []).append(sample.p99_ms)
        figures.setdefault("keepalive_cpu_us", []).append(per_request)
    elif test == "close":
        figures.setdefault("close_rps", []).append(sample.rps)
        figures.setdefault("close_cpu_us", []).append(per_request)
    else:
        figures.setdefault("big_mib_s", []).append(sample.mib_s)
        figures.setdefault("big_cpu_ms_per_gib", []).append(
            cpu * 1000 / max(sample.bytes / 2**30, 1e-9))


def allocated_blocks(target: Target) -> int | None:
    """The router's ``sys.getallocatedblocks()`` (its control ``status``), or None: not a
    router, or one from before it reported them (a --baseline)."""
    if target.control is None:
        return None
    blocks = request(target.control, {"cmd": "status"}, timeout=5).get("allocated_blocks")
    return blocks if isinstance(blocks, int) else None


@contextmanager
def rss_peak(target: Target, every: float = 0.1) -> Iterator[Callable[[], int]]:
    """Sample the target's RSS in the background; yields a getter of the peak so far."""
    peak = [target.rss()]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(every):
            peak[0] = max(peak[0], target.rss())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield lambda: peak[0]
    finally:
        done.set()
        thread.join()


def systemd_figures(tmp: Path, ports: list[int], args: argparse.Namespace) -> dict[str, Any]:
    if args.skip_systemd:
        return {"error": "skipped (--skip-systemd)"}
    if os.geteuid() != 0:
        return {"error": "needs root (it boots systemd in namespaces)"}
    try:
        figures = sandboxed.measure(tmp, ports, args.rollbacks, args.statuses, say)
    except Exception as e:
        say(f"the systemd figures failed:\n{traceback.format_exc()}")
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    return {"watch_setting_s": sandboxed.WATCH, **asdict(figures)}


def notes_on_noise(raw: dict[str, Any]) -> None:
    notes = raw["notes"]
    before, after = raw["load_before"][0], raw.get("load_after_data_plane", [0])[0]
    notes.append(f"load average (1 min) before the run {before:.2f}, after the data-plane "
                 f"figures {after:.2f} (wrk and one server keep 2 CPUs busy by themselves)")
    wide = []
    for name, t in raw.get("targets", {}).items():
        values = t["figures"].get("keepalive_rps", [])
        if len(values) > 1 and (max(values) - min(values)) / max(values) > 0.10:
            wide.append(name)
    if wide:
        notes.append(f"keep-alive runs of {', '.join(wide)} spread over more than 10%: "
                     "other work on this shared machine; compare ratios of one run")


def machine() -> dict[str, Any]:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cpus = os.cpu_count() or 1
    try:
        debian = "Debian " + Path("/etc/debian_version").read_text().strip()
    except OSError:
        debian = platform.platform()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    summary = f"{cpus} × {model}, {mem:.0f} GiB, {debian}, Linux {platform.release()}"
    return {"summary": summary, "cpus": cpus, "cpu": model, "kernel": platform.release(),
            "os": debian, "memory_gib": round(mem, 1)}


def write(args: argparse.Namespace, raw: dict[str, Any], stats: dict[str, Any],
          text: str) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    data = json.dumps({**raw, "summary": stats}, indent=1, default=str) + "\n"
    names = ["latest", *([args.label] if args.label else [])]
    for name in names:
        (args.out / f"{name}.md").write_text(text)
        (args.out / f"{name}.json").write_text(data)
    say(f"wrote {', '.join(str(args.out / n) + '.{md,json}' for n in names)}")


if __name__ == "__main__":
    sys.exit(main())
