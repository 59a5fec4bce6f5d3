"""Profile the router under wrk::

    .venv/bin/python -m benchmarks.profile [tcp|http] [keepalive|close|big] [--native]

Starts nginx and the router (as the benchmark does), points wrk at it and records the
router with py-spy (``pip install py-spy`` into .venv; not a dependency of the project),
writes its collapsed stacks (``benchmarks/results/profile-MODE-LOAD.txt``, for any flame
graph tool) and prints the functions with the most samples, by themselves and with what
they call. Use it to see where a change to switcher/router/ should go; measure its effect
with ``benchmarks/run``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from pathlib import Path

from benchmarks.targets import BIG_PATH, SMALL_PATH, Targets, pick_ports, wait_ready
from benchmarks.wrk import Wrk
from switcher.model import Mode

PY_SPY = Path(sys.executable).with_name("py-spy")


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile")
    p.add_argument("mode", choices=["tcp", "http"], nargs="?", default="tcp")
    p.add_argument("load", choices=["keepalive", "close", "big"], nargs="?", default="close")
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--connections", type=int, default=50)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--native", action="store_true", help="py-spy --native (C frames too)")
    args = p.parse_args()
    if not PY_SPY.exists():
        print(f"{PY_SPY} is missing: .venv/bin/pip install py-spy", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="alive-prof-", dir="/tmp"))
    backend, port, green = pick_ports(3)
    targets = Targets(tmp)
    wrk = Wrk()
    try:
        wait_ready(targets.nginx(backend))
        router = targets.router(Mode(args.mode), port, backend, green)
        wait_ready(router)
        assert router.proc is not None
        args.out.mkdir(parents=True, exist_ok=True)
        stacks = args.out / f"profile-{args.mode}-{args.load}.txt"
        spy = subprocess.Popen(
            [str(PY_SPY), "record", "--pid", str(router.proc.pid), "--rate", "500",
             "--duration", str(int(args.seconds)), "--output", str(stacks), "--format",
             "raw", *(["--native"] if args.native else ["--nonblocking"])],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        path = BIG_PATH if args.load == "big" else SMALL_PATH
        result: list[object] = []
        load = threading.Thread(target=lambda: result.append(wrk.run(
            router.url + path, connections=8 if args.load == "big" else args.connections,
            seconds=args.seconds, close=args.load == "close")))
        load.start()
        load.join()
        _, err = spy.communicate(timeout=60)
        print(result[0])
        if spy.returncode != 0:
            print(f"py-spy failed ({spy.returncode}):\n{err}", file=sys.stderr)
            return 1
        print(f"collapsed stacks: {stacks}")
        top(stacks)
    finally:
        wrk.close()
        targets.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def top(stacks: Path, count: int = 25) -> None:
    """Print the functions with the most samples: by themselves, and inclusive."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in stacks.read_text().splitlines():
        frames, _, n = line.rpartition(" ")
        if not frames or not n.isdigit():
            continue
        names = frames.split(";")
        total += int(n)
        own[names[-1]] += int(n)
        for name in set(names):
            inclusive[name] += int(n)
    for title, counter in (("self", own), ("inclusive", inclusive)):
        print(f"\n-- {title} (of {total} samples)")
        for name, samples in counter.most_common(count):
            print(f"{100 * samples / max(total, 1):5.1f}%  {name}")


if __name__ == "__main__":
    sys.exit(main())
