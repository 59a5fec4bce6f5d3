"""What the router's tests share: the router as a real subprocess on a listener passed as
systemd passes it (LISTEN_FDS, NOTIFY_SOCKET), its settings and state, polling."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from switcher import state as files
from switcher.model import Color, Mode, RouterSettings, State
from switcher.router.control import request
from tests.launch import LAUNCH

ROUTER = Path(sys.executable).with_name("alive-switch-router")


def wait_for(check: Callable[[], Any], timeout: float = 5.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


@dataclass
class Router:
    tmp: Path
    port: int
    ports: dict[Color, int]
    listener: socket.socket
    proc: subprocess.Popen[bytes]
    notify_sock: socket.socket
    messages: list[str] = field(default_factory=list)

    @classmethod
    def spawn(cls, tmp: Path, port: int, ports: dict[Color, int], backlog: int,
              env: dict[str, str] | None = None, program: list[str] | None = None) -> Router:
        """Run the router on a listener passed as systemd passes it, with NOTIFY_SOCKET;
        ``program`` (the router's command line before STATE_DIR) may run a variant."""
        # Closed here if anything below fails (a port still bound, say): left to the
        # collector, an unbound socket fails some later test with a ResourceWarning.
        with contextlib.ExitStack() as undo:
            listener = undo.enter_context(socket.socket())
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", port))
            listener.listen(backlog)
            notify = undo.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM))
            notify.bind(str(tmp / "notify"))
            with (tmp / "stderr").open("wb") as stderr:
                proc = subprocess.Popen(
                    [sys.executable, "-c", LAUNCH, str(listener.fileno()),
                     *(program or [str(ROUTER)]), str(tmp / "state" / "app-test")],
                    pass_fds=[listener.fileno()], stderr=stderr,
                    env={**os.environ, "NOTIFY_SOCKET": str(tmp / "notify"), **(env or {})})
            undo.pop_all()
        return cls(tmp, port, ports, listener, proc, notify)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.listener.close()
        self.notify_sock.close()

    @property
    def env_dir(self) -> Path:
        return self.tmp / "state" / "app-test"

    @property
    def control_path(self) -> str:
        return str(self.tmp / "run" / "app-test" / "control.sock")

    def control(self, message: dict[str, Any]) -> dict[str, Any]:
        return request(self.control_path, message, timeout=5)

    def stderr(self) -> str:
        return (self.tmp / "stderr").read_text()

    def notified(self, predicate: Callable[[str], bool], timeout: float = 5.0) -> str:
        """The first sd_notify message (so far or to come) that satisfies ``predicate``."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for message in self.messages[seen:]:
                if predicate(message):
                    return message
            seen = len(self.messages)
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no such notification; got {self.messages}\n{self.stderr()}")
            self.notify_sock.settimeout(left)
            with contextlib.suppress(TimeoutError):
                self.messages.append(self.notify_sock.recv(4096).decode())


def write_settings(env_dir: Path, tmp: Path, ports: dict[Color, int], **overrides: Any) -> None:
    settings = RouterSettings(
        app="app", env="test", mode=Mode(overrides.pop("mode", "tcp")),
        colors={c: ("127.0.0.1", p) for c, p in ports.items()},
        control_socket=str(tmp / "run" / "app-test" / "control.sock"), **overrides)
    files.save_router_settings(env_dir, settings)


def blue_live(**changes: Any) -> State:
    return State(active=Color.blue, builds={Color.blue: "b1", Color.green: None}, **changes)


def ready_router(tmp: Path, ports: Iterator[int], state: State | None = None,
                 backlog: int = 8, **overrides: Any) -> Router:
    """A router on the next three of ``ports`` (public, blue, green) with ``overrides`` as
    its settings and ``state`` (blue live by default), once it has sent READY=1."""
    port, blue, green = next(ports), next(ports), next(ports)
    colors = {Color.blue: blue, Color.green: green}
    env_dir = tmp / "state" / "app-test"
    env_dir.mkdir(parents=True, exist_ok=True)
    write_settings(env_dir, tmp, colors, **overrides)
    files.save_state(env_dir, state or blue_live())
    router = Router.spawn(tmp, port, colors, backlog=backlog)
    try:
        router.notified(lambda m: "READY=1" in m)
    except BaseException:
        router.close()
        raise
    return router


def close_all(routers: list[Router]) -> None:
    """End every router, then check none logged a traceback (asyncio reports exceptions in
    callbacks on stderr)."""
    for router in routers:
        router.close()
    for router in routers:
        assert "Traceback" not in router.stderr(), router.stderr()
        assert "Exception in" not in router.stderr(), router.stderr()
