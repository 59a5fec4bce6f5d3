"""Progressive delivery in the router, as a real subprocess with real colors: the canary
split (http by client key, tcp by peer), the preview token, pause and resume.

Shares are measured over ≥ 400 distinct clients: source addresses across 127.0.0.0/8 (a
client socket bound to 127.x.y.z before connect), or X-Forwarded-For hops behind a trusted
proxy. Seeds are fixed, so the shares are the same on every run.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from switcher.model import Canary, Color, State
from switcher.router.control import dispatch
from switcher.router.split import Split
from tests.ports import port_block
from tests.routerkit import Router, blue_live, close_all, ready_router, wait_for, write_settings
from tests.unit.test_metrics import ask, value
from tests.unit.test_router import EchoColor, greeting
from tests.unit.test_router_http import Client, Color_

_ports = itertools.cycle(port_block(__name__, 45))

SEED = "deploy-20261202-0640"
TOKEN = "preview-token-0123456789abcdef"
# 400 source addresses across 127.0.0.0/8 (not 127.0.0.1: that is where the router is).
SOURCES = [f"127.{1 + i // 200}.{i % 200}.{1 + i % 7}" for i in range(400)]
HOPS = [f"198.51.{i // 200}.{i % 200 + 1}" for i in range(400)]


@pytest.fixture
def colors() -> Iterator[dict[Color, Any]]:
    started: dict[Color, Any] = {}
    yield started
    for server in started.values():
        server.stop()


@pytest.fixture
def router(tmp: Path, colors: dict[Color, Any]) -> Iterator[Callable[..., Router]]:
    """Start a router (http unless ``mode="tcp"``) with both colors running."""
    routers: list[Router] = []

    def start(state: State | None = None, **overrides: Any) -> Router:
        mode = overrides.pop("mode", "http")
        with contextlib.suppress(FileNotFoundError):
            (tmp / "notify").unlink()  # a restart: the last router's notify socket
        r = ready_router(tmp, _ports, state, backlog=64, mode=mode, **overrides)
        routers.append(r)
        for color in Color:
            if color in colors:
                colors.pop(color).stop()
            colors[color] = (Color_ if mode == "http" else EchoColor)(color.value,
                                                                       r.ports[color])
        return r

    yield start
    close_all(routers)


def canary(percent: int, seed: str = SEED, color: str = "green") -> dict[str, Any]:
    return {"cmd": "canary", "canary": {"color": color, "percent": percent, "step": 1,
                                        "seed": seed}}


def ok(r: Router, message: dict[str, Any]) -> dict[str, Any]:
    answer = r.control(message)
    assert answer["ok"], answer
    return answer


def refused(r: Router, message: dict[str, Any]) -> str:
    answer = r.control(message)
    assert not answer["ok"], answer
    return str(answer["error"])


def predicted(percent: int, keys: list[str], seed: str = SEED) -> set[str]:
    split = Split(Canary(Color.green, percent, 1, seed), None)
    return {k for k in keys if split.takes(k.encode())}


# -- clients -----------------------------------------------------------------------------------

def color_by_hop(port: int, hops: list[str]) -> dict[str, str]:
    """The color each X-Forwarded-For hop was served by (one keep-alive connection)."""
    with Client(port) as c:
        return {hop: c.get("/", f"X-Forwarded-For: {hop}\r\n").color for hop in hops}


def http_from(port: int, source: str) -> str:
    with socket.socket() as sock:
        sock.bind((source, 0))
        sock.settimeout(5)
        sock.connect(("127.0.0.1", port))
        sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return str(json.loads(data.partition(b"\r\n\r\n")[2])["color"])


def tcp_from(port: int, source: str) -> str:
    with socket.socket() as sock:
        sock.bind((source, 0))
        sock.settimeout(5)
        sock.connect(("127.0.0.1", port))
        return greeting(sock)


def share(served: dict[str, str], color: str = "green") -> float:
    return 100 * sum(c == color for c in served.values()) / len(served)


# -- the split ---------------------------------------------------------------------------------

def test_hops_behind_a_trusted_proxy_split_by_share_and_never_move_back(
        router: Callable[..., Router]) -> None:
    r = router(trusted_proxies=("127.0.0.1",))
    assert share(color_by_hop(r.port, HOPS[:50])) == 0  # no canary: everyone on blue
    ok(r, canary(10))
    ten = color_by_hop(r.port, HOPS)
    ok(r, canary(50))
    fifty = color_by_hop(r.port, HOPS)
    print(f"share on green: {share(ten):.1f} % at 10, {share(fifty):.1f} % at 50")
    assert abs(share(ten) - 10) <= 7 and abs(share(fifty) - 50) <= 7
    assert {h for h, c in ten.items() if c == "green"} == predicted(10, HOPS)
    assert not [h for h in HOPS if ten[h] == "green" and fifty[h] != "green"]
    status = r.control({"cmd": "status"})
    assert status["canary"] == canary(50)["canary"]
    # Counted on the color as live traffic is: its account and its tally.
    assert status["total"]["green"] == sum(c == "green" for c in [*ten.values(),
                                                                   *fifty.values()])
    assert status["counters"]["green"]["responses"]["2xx"] == status["total"]["green"]


def test_another_seed_moves_other_clients(router: Callable[..., Router]) -> None:
    r = router(trusted_proxies=("127.0.0.1",))
    ok(r, canary(50))
    first = color_by_hop(r.port, HOPS)
    ok(r, canary(50, seed="another-deploy"))
    second = color_by_hop(r.port, HOPS)
    moved = sum(first[h] != second[h] for h in HOPS)
    assert 100 <= moved <= 300, moved  # independent draws: about half differ


def test_the_rightmost_untrusted_hop_is_the_client(router: Callable[..., Router]) -> None:
    r = router(trusted_proxies=("127.0.0.1", "10.9.0.0/16"))
    ok(r, canary(50))
    # Clients whose own hop and whose proxy's hop would land on different colors.
    on = predicted(50, HOPS)
    green, blue = next(h for h in HOPS if h in on), next(h for h in HOPS if h not in on)
    with Client(r.port) as c:
        for client in (green, blue):
            want = "green" if client in on else "blue"
            for xff in (f"{client}", f"6.6.6.6, {client}, 10.9.0.5",
                        f"{client}, 10.9.3.3, 10.9.0.5"):
                assert c.get("/", f"X-Forwarded-For: {xff}\r\n").color == want, xff


def test_an_untrusted_peers_forwarded_hops_are_ignored(router: Callable[..., Router]) -> None:
    r = router()  # trusts nobody: every request is the peer's, 127.0.0.1
    ok(r, canary(50))
    want = "green" if predicted(50, ["127.0.0.1"]) else "blue"
    assert set(color_by_hop(r.port, HOPS[:100]).values()) == {want}


def test_http_clients_by_source_address(router: Callable[..., Router]) -> None:
    r = router()
    ok(r, canary(50))
    served = {source: http_from(r.port, source) for source in SOURCES}
    print(f"share on green by source address: {share(served):.1f} %")
    assert abs(share(served) - 50) <= 7
    assert {s for s, c in served.items() if c == "green"} == predicted(50, SOURCES)


def test_tcp_connections_by_peer_address(router: Callable[..., Router]) -> None:
    r = router(mode="tcp")
    ok(r, canary(10))
    ten = {source: tcp_from(r.port, source) for source in SOURCES}
    ok(r, canary(50))
    fifty = {source: tcp_from(r.port, source) for source in SOURCES}
    print(f"tcp share on green: {share(ten):.1f} % at 10, {share(fifty):.1f} % at 50")
    assert abs(share(ten) - 10) <= 7 and abs(share(fifty) - 50) <= 7
    assert not [s for s in SOURCES if ten[s] == "green" and fifty[s] != "green"]
    assert {s for s, c in fifty.items() if c == "green"} == predicted(50, SOURCES)
    status = r.control({"cmd": "status"})
    assert status["counters"]["green"]["connections"] == \
        sum(c == "green" for c in [*ten.values(), *fifty.values()])


def test_canary_null_sends_everyone_back_at_once(router: Callable[..., Router]) -> None:
    r = router(trusted_proxies=("127.0.0.1",))
    ok(r, canary(50))
    with Client(r.port) as kept:  # a keep-alive connection on green stays open across it
        green = next(h for h in HOPS if h in predicted(50, HOPS))
        assert kept.get("/", f"X-Forwarded-For: {green}\r\n").color == "green"
        assert ok(r, {"cmd": "canary", "canary": None}) == {"ok": True, "canary": None}
        assert kept.get("/", f"X-Forwarded-For: {green}\r\n").color == "blue"
    assert set(color_by_hop(r.port, HOPS).values()) == {"blue"}
    assert r.control({"cmd": "status"})["canary"] is None


def test_a_withdrawn_canarys_request_in_flight_finishes_on_its_color(
        router: Callable[..., Router]) -> None:
    # A drain long over (its drain_until in the past): withdrawing the canary must not
    # count as that drain's cut (it did: the request in flight on green came back cut).
    r = router(State(active=Color.blue, drain_until=time.time() - 100),
               trusted_proxies=("127.0.0.1",))
    ok(r, canary(50))
    green = next(h for h in HOPS if h in predicted(50, HOPS))
    with Client(r.port) as c:
        c.send(f"GET /slow?s=0.5 HTTP/1.1\r\nHost: t\r\nX-Forwarded-For: {green}\r\n"
               "\r\n".encode())
        wait_for(lambda: r.control({"cmd": "status"})["inflight"]["green"] == 1,
                 what="the request in flight on green")
        ok(r, {"cmd": "canary", "canary": None})
        answer = c.response()
        assert answer.status == 200 and answer.color == "green"


def test_a_switch_ends_the_canary(router: Callable[..., Router]) -> None:
    r = router(trusted_proxies=("127.0.0.1",))
    ok(r, canary(50))
    ok(r, {"cmd": "switch", "target": "green"})
    assert r.control({"cmd": "status"})["canary"] is None
    ok(r, {"cmd": "switch", "target": "blue"})  # with the canary still set, half on green
    assert set(color_by_hop(r.port, HOPS[:100]).values()) == {"blue"}


def test_a_restarted_router_keeps_the_canary_of_state_json(
        router: Callable[..., Router]) -> None:
    r = router(blue_live(canary=Canary(Color.green, 50, 2, SEED)), trusted_proxies=("127.0.0.1",))
    assert r.control({"cmd": "status"})["canary"] == {"color": "green", "percent": 50,
                                                      "step": 2, "seed": SEED}
    served = color_by_hop(r.port, HOPS)
    assert {h for h, c in served.items() if c == "green"} == predicted(50, HOPS)
    ok(r, {"cmd": "reload"})
    assert r.control({"cmd": "status"})["canary"]["percent"] == 50


def test_a_refused_canary_connect_falls_back_to_the_live_color(
        router: Callable[..., Router], colors: dict[Color, Any]) -> None:
    r = router(trusted_proxies=("127.0.0.1",))
    colors.pop(Color.green).stop()
    ok(r, canary(50))
    served = color_by_hop(r.port, HOPS[:100])
    assert set(served.values()) == {"blue"}
    on = len(predicted(50, HOPS[:100]))
    assert r.control({"cmd": "status"})["counters"]["green"]["failures"]["refused"] == on > 0


def test_bad_canaries_are_refused_and_change_nothing(router: Callable[..., Router]) -> None:
    r = router()
    assert "live color" in refused(r, canary(10, color="blue"))
    for percent in (0, 100, 10.5, True):
        assert "percent" in refused(r, canary(percent))  # type: ignore[arg-type]
    assert "seed" in refused(r, canary(10, seed=""))
    assert "canary" in refused(r, {"cmd": "canary"})
    assert r.control({"cmd": "status"})["canary"] is None


def test_the_status_line_says_the_share(router: Callable[..., Router]) -> None:
    r = router()
    ok(r, canary(25))
    r.notified(lambda m: "canary 25% of clients on green (step 1)" in m)


def test_the_canary_percent_metric_follows_the_share(router: Callable[..., Router]) -> None:
    metrics_port = next(_ports)
    r = router(metrics=f"127.0.0.1:{metrics_port}")

    def percent() -> float:
        text = ask(metrics_port, b"GET /metrics HTTP/1.0\r\n\r\n").partition(b"\r\n\r\n")[2]
        return value(text.decode(), "alive_switch_canary_percent", env="test")
    assert percent() == 0
    ok(r, canary(25))
    assert percent() == 25
    ok(r, {"cmd": "canary", "canary": None})
    assert percent() == 0


# -- preview -----------------------------------------------------------------------------------

PREVIEW = f"Alive-Switch-Preview: {TOKEN}\r\n"
CHUNKED_POST = ("POST /echo HTTP/1.1\r\nHost: t\r\n{extra}Transfer-Encoding: chunked\r\n\r\n"
                "5\r\nhello\r\n0\r\n\r\n")


def test_the_preview_header_goes_to_the_preview_color_and_never_reaches_one(
        router: Callable[..., Router], colors: dict[Color, Any]) -> None:
    r = router()
    with Client(r.port) as c:  # no preview yet: the header goes nowhere either
        assert c.get("/", "X-Probe: 1\r\n" + PREVIEW).color == "blue"
    assert ok(r, {"cmd": "preview", "color": "green", "token": TOKEN}) == \
        {"ok": True, "preview": "green"}
    with Client(r.port) as c:
        assert c.get("/", PREVIEW).color == "green"  # a head the fast path would take
        assert c.get("/", PREVIEW.lower()).color == "green"
        assert c.get("/", f"Alive-Switch-Preview: {TOKEN}x\r\n").color == "blue"
        assert c.get("/", f"Alive-Switch-Preview: {TOKEN[:-1]}\r\n").color == "blue"
        assert c.get("/", PREVIEW + PREVIEW).color == "blue"  # twice: matches nothing
        assert c.get("/").color == "blue"
        c.send(CHUNKED_POST.format(extra=PREVIEW).encode())  # the httptools path
        assert c.response().color == "green"
        c.send(CHUNKED_POST.format(extra="").encode())
        assert c.response().color == "blue"
    received = b"".join(colors[c].all_bytes for c in Color)
    assert b"X-Probe: 1" in received and b"hello" in received  # what did arrive
    assert b"alive-switch-preview" not in received.lower()
    assert TOKEN.encode() not in received
    assert ok(r, {"cmd": "preview", "color": None}) == {"ok": True, "preview": None}
    with Client(r.port) as c:
        assert c.get("/", PREVIEW).color == "blue"


def test_the_token_is_in_no_reply_status_or_log(router: Callable[..., Router]) -> None:
    r = router()
    errors = [refused(r, {"cmd": "preview", "color": "purple", "token": TOKEN}),
              refused(r, {"cmd": "preview", "color": "green", "token": TOKEN + "!"}),
              refused(r, {"cmd": "preview", "color": "green", "token": [TOKEN]}),
              refused(r, {"cmd": "preview", "color": "blue", "token": TOKEN}),  # live
              refused(r, {"cmd": "preview", "token": TOKEN})]
    assert all(TOKEN not in e for e in errors), errors
    assert "live color" in errors[3]
    ok(r, {"cmd": "preview", "color": "green", "token": TOKEN})
    status = r.control({"cmd": "status"})
    assert status["preview"] == "green"
    assert TOKEN not in json.dumps(status)
    with Client(r.port) as c:
        assert c.get("/", PREVIEW).color == "green"
    r.close()
    assert "preview" in r.stderr()  # the router did log about the preview ...
    assert TOKEN not in r.stderr()  # ... never its token


def test_preview_is_refused_in_tcp_mode(router: Callable[..., Router]) -> None:
    r = router(mode="tcp")
    assert "http" in refused(r, {"cmd": "preview", "color": "green", "token": TOKEN})
    assert r.control({"cmd": "status"})["preview"] is None


def test_a_switch_ends_the_preview(router: Callable[..., Router]) -> None:
    r = router()
    ok(r, {"cmd": "preview", "color": "green", "token": TOKEN})
    ok(r, {"cmd": "switch", "target": "green"})
    ok(r, {"cmd": "switch", "target": "blue"})
    assert r.control({"cmd": "status"})["preview"] is None
    with Client(r.port) as c:
        assert c.get("/", PREVIEW).color == "blue"


# -- pause -------------------------------------------------------------------------------------

GET = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"


def held(r: Router) -> int:
    paused = r.control({"cmd": "status"})["paused"]
    return -1 if paused is None else int(paused["held"])


def test_held_requests_are_answered_after_resume(router: Callable[..., Router],
                                                 colors: dict[Color, Any]) -> None:
    r = router()
    answer = ok(r, {"cmd": "pause", "max_wait": 30})
    assert answer["paused_until"] > time.time() + 25
    assert json.loads((r.env_dir / "pause.json").read_text()) == {"until": answer["paused_until"]}
    assert "already paused until" in refused(r, {"cmd": "pause", "max_wait": 5})
    r.notified(lambda m: "paused until" in m)
    clients = [Client(r.port) for _ in range(3)]
    try:
        for c in clients:
            c.send(GET)
        wait_for(lambda: held(r) == 3, what="three held requests")
        assert colors[Color.blue].requests == []  # not forwarded
        assert ok(r, {"cmd": "resume"}) == {"ok": True, "released": 3}
        assert [c.response().color for c in clients] == ["blue"] * 3
        assert [c.get("/").color for c in clients] == ["blue"] * 3  # and kept alive
    finally:
        for c in clients:
            c.sock.close()
    assert not (r.env_dir / "pause.json").exists()
    assert "not paused" in refused(r, {"cmd": "resume"})
    assert r.control({"cmd": "status"})["paused"] is None


def test_a_pause_that_runs_out_answers_503_with_retry_after(
        router: Callable[..., Router], colors: dict[Color, Any]) -> None:
    r = router()
    ok(r, {"cmd": "pause", "max_wait": 0.5})
    began = time.monotonic()
    with Client(r.port) as c:
        answer = c.get("/")
    assert time.monotonic() - began >= 0.4  # held until the pause's end
    assert answer.status == 503 and answer.headers["retry-after"] == "1", answer
    status = r.control({"cmd": "status"})
    assert status["paused"] is None
    assert status["total"] == {"blue": 0, "green": 0}  # it reached no color
    assert sum(status["counters"]["blue"]["responses"].values()) == 0
    assert colors[Color.blue].requests == []
    assert not (r.env_dir / "pause.json").exists()
    with Client(r.port) as c:
        assert c.get("/").status == 200


def test_bad_pauses_are_refused(router: Callable[..., Router]) -> None:
    r = router()
    for wait in (0, -1, 3601, "5", None, True):
        assert "max_wait" in refused(r, {"cmd": "pause", "max_wait": wait})
    assert r.control({"cmd": "status"})["paused"] is None


def test_a_pause_outlives_a_router_restart(router: Callable[..., Router]) -> None:
    r = router()
    until = ok(r, {"cmd": "pause", "max_wait": 30})["paused_until"]
    r.close()
    again = router()
    assert again.control({"cmd": "status"})["paused"] == {"until": until, "held": 0}
    with Client(again.port) as c:
        c.send(GET)
        wait_for(lambda: held(again) == 1, what="a held request")
        assert ok(again, {"cmd": "resume"}) == {"ok": True, "released": 1}
        assert c.response().status == 200
    assert not (again.env_dir / "pause.json").exists()


def test_tcp_pause_stops_accepting_and_resume_serves_the_queue(
        router: Callable[..., Router]) -> None:
    r = router(mode="tcp")
    ok(r, {"cmd": "pause", "max_wait": 30})
    socks = [socket.create_connection(("127.0.0.1", r.port), timeout=5) for _ in range(5)]
    try:
        socks[0].settimeout(0.3)  # the backlog took them; the router accepts none
        with pytest.raises(TimeoutError):
            socks[0].recv(1)
        socks[0].settimeout(5)
        assert r.control({"cmd": "status"})["counters"]["blue"]["connections"] == 0
        assert ok(r, {"cmd": "resume"}) == {"ok": True, "released": 0}
        assert [greeting(s) for s in socks] == ["blue"] * 5
    finally:
        for s in socks:
            s.close()
    ok(r, {"cmd": "pause", "max_wait": 0.3})  # and at its end, it accepts again
    with socket.create_connection(("127.0.0.1", r.port), timeout=5) as sock:
        assert greeting(sock) == "blue"
    assert r.control({"cmd": "status"})["paused"] is None


def test_a_request_in_flight_finishes_during_a_pause(router: Callable[..., Router]) -> None:
    r = router()
    with Client(r.port) as c:
        c.send(b"GET /slow?s=0.5 HTTP/1.1\r\nHost: t\r\n\r\n")
        wait_for(lambda: r.control({"cmd": "status"})["inflight"]["blue"] == 1,
                 what="the request in flight")
        ok(r, {"cmd": "pause", "max_wait": 30})
        assert c.response().status == 200  # answered while paused
        c.send(GET)  # the next one is held
        wait_for(lambda: held(r) == 1, what="the next request held")
        ok(r, {"cmd": "resume"})
        assert c.response().status == 200


def test_a_tcp_pause_outlives_a_router_restart(router: Callable[..., Router]) -> None:
    r = router(mode="tcp")
    until = ok(r, {"cmd": "pause", "max_wait": 30})["paused_until"]
    r.close()
    again = router(mode="tcp")
    assert again.control({"cmd": "status"})["paused"] == {"until": until, "held": 0}
    with socket.create_connection(("127.0.0.1", again.port), timeout=5) as sock:
        sock.settimeout(0.3)  # queued in the backlog: the new router accepts nothing yet
        with pytest.raises(TimeoutError):
            sock.recv(1)
        sock.settimeout(5)
        ok(again, {"cmd": "resume"})
        assert greeting(sock) == "blue"


class Failing:
    """Commands whose preview fails inside the router (the internal-error path)."""

    def set_preview(self, color: Color | None, token: str) -> dict[str, Any]:
        raise RuntimeError("boom")


def test_a_failing_preview_request_is_logged_without_its_line(
        capsys: pytest.CaptureFixture[str]) -> None:
    line = json.dumps({"cmd": "preview", "color": "green", "token": TOKEN}).encode()
    answer = asyncio.run(dispatch(Failing(), line))  # type: ignore[arg-type]
    logged = capsys.readouterr().err
    assert answer["ok"] is False and "boom" in answer["error"]
    assert "'preview'" in logged and "boom" in logged  # it was logged ...
    assert TOKEN not in logged and TOKEN not in json.dumps(answer)  # ... without the token


def test_the_hold_counts_in_no_timeout_nor_the_colors_duration(
        router: Callable[..., Router]) -> None:
    r = router(response_timeout=0.5)
    ok(r, {"cmd": "pause", "max_wait": 30})
    with Client(r.port) as c:
        c.send(GET)
        wait_for(lambda: held(r) == 1, what="a held request")
        time.sleep(1.5)  # the point: held for longer than response_timeout
        ok(r, {"cmd": "resume"})
        assert c.response().status == 200
    duration = r.control({"cmd": "status"})["counters"]["blue"]["duration"]
    assert sum(duration["counts"]) == 1 and duration["sum"] < 0.5, duration


def test_a_canary_or_preview_on_a_color_without_an_address_is_refused(
        router: Callable[..., Router], tmp: Path) -> None:
    r = router()
    write_settings(r.env_dir, tmp, {Color.blue: r.ports[Color.blue]}, mode="http")
    ok(r, {"cmd": "reload"})
    assert "no address" in refused(r, canary(10))
    assert "no address" in refused(r, {"cmd": "preview", "color": "green", "token": TOKEN})
    assert r.control({"cmd": "status"})["canary"] is None


@pytest.mark.parametrize("content", ["{not json", '{"until": "soon"}', "past"])
def test_an_unreadable_or_past_pause_file_is_removed_and_nothing_is_paused(
        router: Callable[..., Router], tmp: Path, content: str) -> None:
    env_dir = tmp / "state" / "app-test"
    env_dir.mkdir(parents=True)
    pause = env_dir / "pause.json"
    pause.write_text(json.dumps({"until": time.time() - 1}) if content == "past" else content)
    r = router()
    assert r.control({"cmd": "status"})["paused"] is None
    assert not pause.exists()
    with Client(r.port) as c:
        assert c.get("/").status == 200
