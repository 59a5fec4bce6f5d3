"""Progressive delivery end to end in a real systemd: canary steps under load from hundreds
of distinct clients (source addresses across 127.0.0.0/8, and X-Forwarded-For behind a
trusted proxy), a build failing its pages aborted at its first step, promote and abort from
a second process, a router restart and a SIGKILLed CLI mid-step, the preview header from
pre_switch, and pause/resume."""

from __future__ import annotations

import collections
import itertools
import json
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from tests.load import one_request
from tests.ports import port_block
from tests.system.harness import CLI, Env, build_on, frozen_at, get, kill_frozen, wait_for
from tests.system.sandbox import Sandbox
from tests.system.test_http import router_status
from tests.system.test_traffic import NGINX_APP, build

pytestmark = pytest.mark.system
LISTEN, BLUE, GREEN = port_block(__name__, 3)
CLIENTS = 400  # per group: the minimum of distinct clients
TOLERANCE = 7  # percentage points a step's share may miss its target by
STEP = 5.0  # seconds per step in the share test: every client is seen in each step
MARGIN = 0.4  # seconds around a step's change where requests are not counted


@pytest.fixture(scope="module")
def env(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> Env:
    e = Env(sandbox, tmp_path_factory.mktemp("canary"), "can", "prod", LISTEN, BLUE, GREEN)
    configure(e)
    build(e, "C0")
    e.ok("install", "prod")
    e.ok("deploy", "prod", "C0")
    return e


def configure(e: Env, pre_switch: str = "") -> None:
    extra = f"pre_switch = {json.dumps(pre_switch)}\n" if pre_switch else ""
    e.write_config(drain=1, watch=1, mode="http", command="/bin/sh run.sh", extra=extra,
                   also='trusted_proxies = ["127.0.0.1"]\n\n'
                        "[env.prod.analysis]\nmin_requests = 20\n")


@pytest.fixture(autouse=True)
def default_config(env: Env) -> Iterator[None]:
    configure(env)
    yield
    configure(env)


# -- a crowd of clients --------------------------------------------------------------------------

@dataclass(frozen=True)
class Client:
    """A source address of its own, or one behind the trusted proxy (127.0.0.1)."""

    source: str
    forwarded: str = ""


def by_address(n: int) -> list[Client]:
    return [Client(f"127.{1 + i // 250}.{i % 250}.{7 + i % 3}") for i in range(n)]


def by_forwarded(n: int) -> list[Client]:
    # The rightmost hop not trusted is the client; the trusted proxy appended itself.
    return [Client("127.0.0.1", f"10.{i // 250}.{i % 250}.1, 127.0.0.1") for i in range(n)]


@dataclass
class Crowd:
    """Threads that send GET / on a new connection for each client in turn, recording
    (start time, client, build or failure) of every request."""

    clients: list[Client]
    threads: int = 6
    timeout: float = 5.0
    max_seconds: float = 90.0
    seen: list[tuple[float, int, str]] = field(default_factory=list)
    failures: collections.Counter[int] = field(default_factory=collections.Counter)
    _stop: threading.Event = field(default_factory=threading.Event)
    _next: Iterator[int] = field(default_factory=itertools.count)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _workers: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Crowd:
        deadline = time.monotonic() + self.max_seconds
        self._workers = [threading.Thread(target=self._run, args=(deadline,), daemon=True)
                         for _ in range(self.threads)]
        for worker in self._workers:
            worker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join()

    def wait(self, count: int, timeout: float = 30) -> None:
        target = len(self.seen) + count
        wait_for(f"{count} requests", lambda: len(self.seen) >= target, timeout=timeout)

    def _run(self, deadline: float) -> None:
        while not self._stop.is_set() and time.monotonic() < deadline:
            with self._lock:
                index = next(self._next) % len(self.clients)
            began = time.time()
            outcome = ask(self.clients[index], self.timeout)
            with self._lock:
                self.seen.append((began, index, outcome))
                if outcome.startswith("!"):
                    self.failures[index] += 1

    @property
    def failed(self) -> int:
        return sum(self.failures.values())


def ask(client: Client, timeout: float) -> str:
    """The build that answered, or "!<what failed>"."""
    forwarded = f"X-Forwarded-For: {client.forwarded}\r\n" if client.forwarded else ""
    outcome, detail = one_request(LISTEN, timeout, source=client.source, headers=forwarded)
    return detail if outcome == "ok" else f"!{outcome} {detail}"


def canary_events(stdout: str) -> list[dict]:
    events = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    return [e for e in events if e.get("event") == "canary"]


def switch_time(stdout: str) -> float:
    events = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    return next(e["time"] for e in events if e.get("event") == "phase"
                and e["phase"] == "switching" and e["status"] == "started")


def shares(crowd: Crowd, group: range, begin: float, end: float, new: str) -> tuple[float, int]:
    """The percent of ``group``'s clients served by ``new`` in [begin, end]; how many
    clients were seen there. A client seen on both builds in one step fails the test."""
    builds: dict[int, set[str]] = collections.defaultdict(set)
    for began, index, outcome in crowd.seen:
        if index in group and begin + MARGIN <= began <= end - MARGIN:
            builds[index].add(outcome)
    torn = {i: b for i, b in builds.items() if len(b) > 1}
    assert not torn, f"clients served by both builds within one step: {list(torn.items())[:5]}"
    moved = sum(1 for b in builds.values() if new in b)
    return 100 * moved / max(len(builds), 1), len(builds)


def never_back(crowd: Crowd, old: str, new: str) -> None:
    """Once a client reached ``new`` it is never served by ``old`` again."""
    moved: set[int] = set()
    for _, index, outcome in sorted(crowd.seen):
        if outcome == new:
            moved.add(index)
        assert not (outcome == old and index in moved), f"client {index} went back to {old}"


# -- the tests ------------------------------------------------------------------------------------

def test_steps_move_a_sticky_share_of_clients_then_the_full_switch(env: Env) -> None:
    old, new = build_on(LISTEN), build(env, "C1")
    clients = by_address(CLIENTS) + by_forwarded(CLIENTS)
    with Crowd(clients) as crowd:
        crowd.wait(len(clients))
        done = env.cli("deploy", "prod", new, "--json", "--canary", "10,50",
                       "--step-seconds", str(STEP))
        crowd.wait(200)
    assert done.returncode == 0, done.stdout + done.stderr
    started = [e for e in canary_events(done.stdout) if e["status"] == "started"]
    bounds = [(started[0]["time"], started[1]["time"], 10),
              (started[1]["time"], switch_time(done.stdout), 50)]
    for name, group in (("source address", range(CLIENTS)),
                        ("X-Forwarded-For", range(CLIENTS, 2 * CLIENTS))):
        for begin, end, target in bounds:
            share, seen = shares(crowd, group, begin, end, new)
            print(f"{name}: step {target} %: {share:.1f} % of {seen} clients on {new}")
            assert seen >= 0.9 * CLIENTS, f"only {seen} of {CLIENTS} clients seen: too slow"
            assert abs(share - target) <= TOLERANCE, (name, target, share)
    never_back(crowd, old, new)
    assert crowd.failed == 0, crowd.failures.most_common(5)
    assert build_on(LISTEN) == new
    assert env.status_json()["canary"] is None


def test_a_build_failing_its_pages_is_aborted_at_its_first_step(env: Env) -> None:
    old = build_on(LISTEN)
    bad = build(env, "BAD500", NGINX_APP)
    with Crowd(by_address(CLIENTS)) as crowd:
        crowd.wait(CLIENTS)
        done = env.cli("deploy", "prod", bad, "--canary", "10,50", "--step-seconds", "10")
        crowd.wait(100)
    assert done.returncode == 5, done.stdout + done.stderr
    assert "canary step 1 (10 % of clients on" in done.stderr, done.stderr
    hurt = len(crowd.failures)
    print(f"{hurt} of {CLIENTS} clients saw errors ({crowd.failed} failed requests)")
    assert 0 < hurt <= (10 + TOLERANCE) * CLIENTS / 100
    assert all(build_on(LISTEN) == old for _ in range(20))
    record = json.loads(env.ok("status", "prod", "--json"))["last"]
    assert record["failed_phase"] == "canary" and record["canary"]["ended"]["step"] == 1


def deploying(env: Env, name: str, *extra: str) -> subprocess.Popen[str]:
    """A deploy running a long canary step, started in the background; returns once its
    first step's split is in place."""
    proc = env.sandbox.popen(CLI, "--config", env.config, "deploy", "prod", name,
                             "--canary", "10,50", "--step-seconds", "60", *extra,
                             cwd=env.home, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for("the first step", lambda: router_status(env).get("canary"), timeout=30)
    return proc


def timed(env: Env, *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    began = time.monotonic()
    done = env.cli(*args)
    return done, time.monotonic() - began


def test_abort_and_promote_from_a_second_process(env: Env) -> None:
    old = build_on(LISTEN)
    proc = deploying(env, build(env, "C2"))
    aborted, took = timed(env, "abort", "prod")
    out, err = proc.communicate(timeout=30)
    print(f"abort answered in {took:.2f} s (CLI start included)")
    assert aborted.returncode == 0, aborted.stdout + aborted.stderr
    assert proc.returncode == 5, out + err
    assert took < 2.0
    assert router_status(env)["canary"] is None and build_on(LISTEN) == old

    proc = deploying(env, build(env, "C3"))
    promoted, took = timed(env, "promote", "prod")
    out, err = proc.communicate(timeout=60)
    print(f"promote answered in {took:.2f} s")
    assert promoted.returncode == 0 and proc.returncode == 0, out + err
    assert took < 2.0
    assert build_on(LISTEN) == "C3"


def on_new(clients: list[Client], new: str) -> set[int]:
    return {i for i, c in enumerate(clients) if ask(c, 5) == new}


def test_a_router_restart_mid_step_keeps_the_share(env: Env) -> None:
    new = build(env, "C4")
    clients = by_address(CLIENTS)
    proc = deploying(env, new)
    try:
        before = on_new(clients, new)
        env.sandbox.systemctl("restart", f"{env.prefix}.service", check=True)
        wait_for("the router back", lambda: router_status(env).get("canary"))
        after = on_new(clients, new)
        print(f"{len(before)} of {CLIENTS} clients on {new} before the restart, "
              f"{len(after)} after, {len(before ^ after)} moved")
        assert before == after
        assert abs(100 * len(before) / CLIENTS - 10) <= TOLERANCE
    finally:
        env.cli("abort", "prod")
        proc.communicate(timeout=30)


def test_a_cli_killed_mid_step_leaves_the_split_for_the_next_command(env: Env) -> None:
    old = build_on(LISTEN)
    proc, pid = frozen_at(env, "canary_step", "deploy", "prod", build(env, "C5"),
                          "--canary", "30")
    kill_frozen(proc, pid)
    info = env.status_json()
    assert info["canary"]["percent"] == 30, info
    assert "canary: 30 % of clients on" in env.ok("status", "prod")
    out = env.ok("deploy", "prod", old, "--force")
    assert "was left by an interrupted deploy: every client is back on" in out, out
    assert env.status_json()["canary"] is None and build_on(LISTEN) == old


def test_pre_switch_previews_the_new_build_and_the_token_is_logged_nowhere(env: Env) -> None:
    old = build_on(LISTEN)
    hook = (f'curl -s -H "$ALIVE_SWITCH_PREVIEW" http://127.0.0.1:{LISTEN}/ > preview.json && '
            f"curl -s http://127.0.0.1:{LISTEN}/ > live.json && "
            'printf %s "$ALIVE_SWITCH_PREVIEW" > token.txt')
    configure(env, pre_switch=f"/bin/sh -c '{hook}'")
    new = build(env, "C6")
    env.ok("deploy", "prod", new)
    path = env.builds / new
    assert json.loads((path / "preview.json").read_text())["build"] == new
    assert json.loads((path / "live.json").read_text())["build"] == old
    token = (path / "token.txt").read_text().partition(": ")[2]
    assert len(token) >= 16
    journal = env.sandbox.run("journalctl", "--no-pager", "-o", "verbose").stdout
    history = (env.sandbox.state_dir / env.prefix / "history.jsonl").read_text()
    for where, text in (("journal", journal), ("history", history),
                        ("status", env.ok("status", "prod", "--json"))):
        assert token not in text, f"the preview token is in the {where}"
    assert get(LISTEN)[1]["build"] == new


def test_a_pause_holds_requests_and_resume_answers_them(env: Env) -> None:
    crowd = Crowd(by_address(50), threads=4, timeout=10)
    with crowd:
        crowd.wait(50)
        env.ok("pause", "prod", "--max-wait", "5")
        wait_for("held requests", lambda: router_status(env)["paused"]["held"] >= 4)
        paused_at = time.monotonic()
        wait_for("a 2 s pause", lambda: time.monotonic() - paused_at >= 2, every=0.1)
        out = env.ok("resume", "prod")
        crowd.wait(50)
    print(out.strip(), f"; {len(crowd.seen)} requests, {crowd.failed} failed")
    assert crowd.failed == 0, crowd.failures
    assert "held requests released" in out
    second = env.cli("pause", "prod", "--max-wait", "5")
    again = env.cli("pause", "prod")
    env.ok("resume", "prod")
    assert second.returncode == 0 and again.returncode == 2, again.stderr
    assert "already paused" in again.stderr


def test_a_pause_past_max_wait_answers_503_with_retry_after(env: Env) -> None:
    env.ok("pause", "prod", "--max-wait", "1")
    began = time.monotonic()
    head = raw_get().partition("\r\n\r\n")[0]
    took = time.monotonic() - began
    print(f"held for {took:.2f} s, then {head.splitlines()[0]}")
    assert head.startswith("HTTP/1.1 503") and 0.8 <= took <= 3, head
    assert "\r\nretry-after: 1" in head.lower(), head
    assert router_status(env)["paused"] is None
    assert build_on(LISTEN)


def raw_get() -> str:
    with socket.create_connection(("127.0.0.1", LISTEN), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data.decode(errors="replace")


def test_a_pre_switch_hook_may_pause(env: Env) -> None:
    cli = f"{CLI} --config {env.config}"
    configure(env, pre_switch=f"/bin/sh -c '{cli} pause prod --max-wait 5 && "
              f"{cli} status prod --json > paused.json && {cli} resume prod'")
    new = build(env, "C7")
    env.ok("deploy", "prod", new)
    assert json.loads((env.builds / new / "paused.json").read_text())["router"]["paused"]
    assert build_on(LISTEN) == new
