"""The router's truth end to end, in a real systemd under new-connection load: the watch
judges the new color on the answers clients got (nginx answering 500 on its pages while its
health path says 200; a build that stops listening; one that never answers; a slow one), a
good build raises no alarm, and a real Prometheus scraping the router across two deploys
sees exactly what the clients counted."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.load import Load, Tally
from tests.ports import port_block
from tests.system.harness import APP, Env, build_on, nginx_app, wait_for
from tests.system.sandbox import Sandbox
from tests.system.test_http import router_status

pytestmark = pytest.mark.system
LISTEN, BLUE, GREEN, METRICS, PROMETHEUS = port_block(__name__, 5)
WATCH = 6
MIN_REQUESTS = 20
RESPONSE_TIMEOUT = 1
INTERVAL = 0.1  # the harness's health.interval

PYTHON_APP = f"#!/bin/sh\nexec {sys.executable} {APP}\n"
# nginx as the app: 200 on the health path, 500 on every page (the build the issue found).
NGINX_APP = nginx_app("500 broken")


@pytest.fixture(scope="module")
def env(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> Env:
    e = Env(sandbox, tmp_path_factory.mktemp("traffic"), "tr", "prod", LISTEN, BLUE, GREEN)
    e.write_config(drain=1, watch=WATCH, mode="http", command="/bin/sh run.sh", also=(
        # No pool: the deaf build must be met by new connects (a pooled connection to it
        # still works after its listener closed, and then only its health probe fails it).
        f'response_timeout = {RESPONSE_TIMEOUT}\nmetrics = "127.0.0.1:{METRICS}"\n'
        "pool_size = 0\n\n"
        f"[env.prod.analysis]\nmin_requests = {MIN_REQUESTS}\nmax_latency_ratio = 3\n"))
    build(e, "G0")
    e.ok("install", "prod")
    e.ok("deploy", "prod", "G0")
    return e


def build(e: Env, name: str, app: str = PYTHON_APP, **settings: str) -> str:
    path = e.make_build(name, **settings)
    (path / "run.sh").write_text(app)
    return name


def deploy_under_load(e: Env, name: str, threads: int = 4
                      ) -> tuple[subprocess.CompletedProcess[str], Tally, float]:
    """Deploy ``name`` while ``threads`` clients open a connection per request; (the CLI's
    result, what the clients saw, their requests per second)."""
    began = time.monotonic()
    with Load(LISTEN, threads=threads, max_seconds=60) as load:
        load.wait_requests(200)  # the old color has a baseline
        done = e.cli("deploy", "prod", name)
        load.wait_requests(50)  # and the clients are served after it
    tally = load.tally
    rate = (tally.ok + tally.failed) / (time.monotonic() - began)
    print(f"deploy {name} → {done.returncode}: {tally.summary()}, {rate:.0f} requests/s\n"
          f"{done.stdout}{done.stderr}")
    return done, tally, rate


def test_a_good_build_under_load_raises_no_alarm(env: Env) -> None:
    done, tally, _ = deploy_under_load(env, build(env, "G1"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert tally.failed == 0, tally.summary()
    assert "not judged on traffic" not in done.stdout  # it was: 4 clients fill min_requests


def test_a_build_failing_its_pages_is_switched_back_during_the_watch(env: Env) -> None:
    done, tally, rate = deploy_under_load(env, build(env, "NGINX500", NGINX_APP))
    assert done.returncode == 5, done.stdout + done.stderr
    assert "answers failed" in done.stderr, done.stderr
    assert build_on(LISTEN) == "G1"
    seen = tally.failures["non2xx"]
    # About one health.interval of traffic after min_requests (plus one tick's work).
    bound = MIN_REQUESTS + rate * (INTERVAL + 0.5)
    print(f"clients saw {seen} answers of 500 (bound {bound:.0f} at {rate:.0f}/s)")
    assert 0 < seen <= bound, tally.summary()
    assert tally.failed == seen, tally.summary()  # nothing else failed


def test_a_build_that_stops_listening_fails_on_its_refusals_while_the_fallback_serves(
        env: Env) -> None:
    before = router_status(env)["counters"]
    done, tally, _ = deploy_under_load(env, build(env, "DEAF", DEAF_AFTER="0.5"))
    assert done.returncode == 5, done.stdout + done.stderr
    assert tally.failed == 0, tally.summary()  # every refused connect went to the fallback
    after = router_status(env)["counters"]
    color = "blue" if env.status_json()["live"] == "green" else "green"
    refused = after[color]["failures"]["refused"] - before[color]["failures"]["refused"]
    assert refused > 0, (before, after)


def test_a_build_that_never_answers_fails_through_response_timeout(env: Env) -> None:
    done, tally, _ = deploy_under_load(env, build(env, "MUTE", PAGE_DELAY="3600"),
                                       threads=16)
    assert done.returncode == 5, done.stdout + done.stderr
    assert "answers failed" in done.stderr, done.stderr
    print(f"clients saw {tally.failures['non2xx']} answers of 504")
    assert build_on(LISTEN) == "G1"


def test_a_slow_build_fails_the_latency_ratio(env: Env) -> None:
    done, _, _ = deploy_under_load(env, build(env, "SLOW", PAGE_DELAY="0.3"))
    assert done.returncode == 5, done.stdout + done.stderr
    assert "p95" in done.stderr, done.stderr
    assert build_on(LISTEN) == "G1"


# -- a real Prometheus -------------------------------------------------------------------------

PROMETHEUS_CONFIG = """\
global: {{scrape_interval: 1s, evaluation_interval: 1s}}
scrape_configs:
  - job_name: alive
    static_configs: [{{targets: ["127.0.0.1:{port}"]}}]
"""


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[str]:
    (tmp_path / "prometheus.yml").write_text(PROMETHEUS_CONFIG.format(port=METRICS))
    with (tmp_path / "log").open("wb") as log:
        proc = subprocess.Popen(
            ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{PROMETHEUS}"], stdout=log, stderr=log)
    api = f"http://127.0.0.1:{PROMETHEUS}"
    try:
        # The first sample arrives some seconds after start: wait for up == 1, never sleep.
        wait_for("Prometheus scraping the router", lambda: query(api, "up") == [1.0],
                 timeout=60, every=0.2)
        yield api
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        print((tmp_path / "log").read_text()[-2000:])


def query(api: str, promql: str) -> list[float]:
    url = f"{api}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
    with urllib.request.urlopen(url, timeout=5) as answer:
        result = json.load(answer)["data"]["result"]
    return [float(r["value"][1]) for r in result]


def scraped(api: str, color: str) -> float:
    return sum(query(api, f'alive_switch_responses_total{{color="{color}"}}'))


def test_prometheus_sees_what_the_clients_counted_across_two_deploys(
        env: Env, prometheus: str) -> None:
    status = env.status_json()
    live, live_build = status["live"], status["live_build"]
    start = {c: sum(f["responses"].values())
             for c, f in router_status(env)["counters"].items()}
    first, second = build(env, "P1"), build(env, "P2")
    with Load(LISTEN, threads=4, max_seconds=60) as load:
        load.wait_requests(200)
        env.ok("deploy", "prod", first)
        other = env.status_json()["live"]
        assert other != live
        wait_for("alive_switch_live to follow the switch",
                 lambda: query(prometheus, f'alive_switch_live{{color="{other}"}}') == [1.0])
        load.wait_requests(200)
        env.ok("deploy", "prod", second)
        wait_for("alive_switch_live to follow the switch back",
                 lambda: query(prometheus, f'alive_switch_live{{color="{other}"}}') == [0.0])
        load.wait_requests(200)
    tally = load.tally
    assert tally.failed == 0, tally.summary()
    counted = {live: tally.builds[live_build] + tally.builds[second],
               other: tally.builds[first]}
    assert sum(counted.values()) == tally.ok, tally.builds  # no answer from another build
    for color, n in counted.items():
        expected = start[color] + n
        # Within one scrape interval of the last request, then exactly.
        wait_for(f"Prometheus's {color} count to reach {expected}",
                 lambda c=color, x=expected: scraped(prometheus, c) == x, timeout=10)
    assert query(prometheus, "alive_switch_switches_total")[0] >= 2
    # status shows the same figures over the router's last 60 s.
    recent = env.status_json()["colors"][live]["recent"]
    assert recent["answers"] > 0 and recent["answers_per_s"] > 0, recent
    assert recent["failed"] == 0, recent
