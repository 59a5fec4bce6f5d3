"""``python -m benchmarks.direct``: direct mode's data plane against a direct connection.

    wrk ─▶ 127.0.0.1:PUBLIC (held by a steering process, never accepted on)
              │ sk_lookup: the kernel hands the connection to nginx's own listener
    wrk ─────────────────────────────────────────────────────────────────▶ nginx :BACKEND

The steering process does what the router does in direct mode — loads the program, copies
nginx's listener out of it with pidfd_getfd, puts it in the map, closes the copy — and then
only waits: no process is in the data path. Interleaved A/B rounds (direct, steered, …)
and medians, because single short runs swing 0.83×–1.11× on this machine; then the switch:
the map update, and that update → the first new connection arriving on the other listener.

The program is attached to this process's network namespace, as the router's is: it steers
only PUBLIC on 127.0.0.1 (a port of the benchmark's block) and dies with the steerer.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from benchmarks.targets import (
    CLIENT_CPU,
    SERVER_CPU,
    SMALL_PATH,
    Target,
    TargetError,
    Targets,
    pick_ports,
    wait_ready,
)
from benchmarks.wrk import Sample, Wrk
from switcher.model import Color
from switcher.router import steer

STEERER = """
import signal, socket, sys
from switcher.model import Color
from switcher.router import listener, steer
public_port, pid, port = (int(a) for a in sys.argv[1:4])
public = socket.create_server(("127.0.0.1", public_port), backlog=4096)
s = steer.Steering(steer.target("127.0.0.1", public_port, "127.0.0.1"))
found = listener.find([pid], "127.0.0.1", port)
assert found, f"nginx (PID {pid}) does not listen on {port}"
copy = listener.copy(*found)
s.insert(Color.blue, copy)
copy.close()  # as the router does: the map holds the socket, not the descriptor
s.select(Color.blue)
print("steering", flush=True)
signal.sigwait({signal.SIGTERM})
s.close()
public.close()
"""


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.direct", description=__doc__)
    p.add_argument("--rounds", type=int, default=5, help="A/B rounds (default 5)")
    p.add_argument("--seconds", type=float, default=3, help="seconds per wrk run (default 3)")
    p.add_argument("--connections", type=int, default=50)
    p.add_argument("--switches", type=int, default=200, help="switch trials (default 200)")
    return p.parse_args(argv)


@contextlib.contextmanager
def steered(targets: Targets, public: int, nginx: Target) -> Iterator[Target]:
    assert nginx.proc is not None
    proc = subprocess.Popen([sys.executable, "-c", STEERER, str(public), str(nginx.proc.pid),
                             str(nginx.port)], stdout=subprocess.PIPE, text=True)
    try:
        ready = proc.stdout.readline() if proc.stdout is not None else ""
        if ready != "steering\n":
            raise TargetError(f"the steering process did not start (said {ready!r})")
        target = Target("direct-mode", "direct", "tcp", public)
        wait_ready(target)
        yield target
    finally:
        proc.terminate()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def measure(wrk: Wrk, targets: list[Target], args: argparse.Namespace
            ) -> dict[str, dict[str, list[Sample]]]:
    samples: dict[str, dict[str, list[Sample]]] = {t.name: {"keepalive": [], "close": []}
                                                    for t in targets}
    for round_ in range(args.rounds):
        order = targets if round_ % 2 == 0 else targets[::-1]
        for t in order:
            for test, close in (("keepalive", False), ("close", True)):
                samples[t.name][test].append(wrk.run(t.url + SMALL_PATH,
                                                     connections=args.connections,
                                                     seconds=args.seconds, close=close))
    return samples


def switch_times(trials: int, public: int, blue: int, green: int
                 ) -> tuple[list[float], list[float]]:
    """(map update, update → first new connection accepted on the other listener), in ms,
    switching between two listeners of this process."""
    updates, arrivals = [], []
    with (socket.create_server(("127.0.0.1", public)),
          socket.create_server(("127.0.0.1", blue)) as a,
          socket.create_server(("127.0.0.1", green)) as b):
        s = steer.Steering(steer.target("127.0.0.1", public, "127.0.0.1"))
        try:
            s.insert(Color.blue, a)
            s.insert(Color.green, b)
            for i in range(trials):
                color, sock = (Color.green, b) if i % 2 == 0 else (Color.blue, a)
                began = time.perf_counter()
                s.select(color)
                updated = time.perf_counter()
                with socket.create_connection(("127.0.0.1", public)):
                    sock.accept()[0].close()
                arrived = time.perf_counter()
                updates.append((updated - began) * 1000)
                arrivals.append((arrived - began) * 1000)
        finally:
            s.close()
    return updates, arrivals


def report(samples: dict[str, dict[str, list[Sample]]], switch: tuple[list[float], list[float]]
           ) -> str:
    def median(name: str, test: str, what: str) -> float:
        return statistics.median(getattr(x, what) for x in samples[name][test])

    lines = ["| | keep-alive req/s | new-connection req/s | p99 ms (keep-alive) |",
             "|---|---|---|---|"]
    for name in samples:
        lines.append(f"| {name} | {median(name, 'keepalive', 'rps'):,.0f} | "
                     f"{median(name, 'close', 'rps'):,.0f} | "
                     f"{median(name, 'keepalive', 'p99_ms'):.2f} |")
    ratio = [median("direct-mode", t, w) / median("direct", t, w)
             for t, w in (("keepalive", "rps"), ("close", "rps"), ("keepalive", "p99_ms"))]
    lines.append(f"| direct mode ÷ direct | {ratio[0]:.2f}× | {ratio[1]:.2f}× | "
                 f"{ratio[2]:.2f}× |")
    updates, arrivals = switch
    lines.append(f"\nswitch: map update median {statistics.median(updates) * 1000:.1f} µs; "
                 f"update → first new connection on the other listener median "
                 f"{statistics.median(arrivals):.3f} ms, max {max(arrivals):.3f} ms "
                 f"({len(arrivals)} trials)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    tmp = Path(tempfile.mkdtemp(prefix="alive-bench-direct-", dir="/tmp"))
    backend, public, switch_public, blue, green = pick_ports(5)
    targets = Targets(tmp)
    wrk = Wrk()
    try:
        nginx = targets.nginx(backend)
        wait_ready(nginx)
        with steered(targets, public, nginx) as mode:
            print(f"benchmarks.direct: wrk on CPU {CLIENT_CPU}, nginx on CPU {SERVER_CPU}; "
                  f"{args.rounds} A/B rounds × {args.seconds:g} s", file=sys.stderr)
            samples = measure(wrk, [nginx, mode], args)
        print(report(samples, switch_times(args.switches, switch_public, blue, green)))
    finally:
        wrk.close()
        targets.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
