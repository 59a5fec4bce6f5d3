"""Foundation, against a real systemd: install, the socket held by systemd, a color unit
running the sample app from a build, values reaching the process byte for byte, reboot."""

from __future__ import annotations

import time

import pytest

from tests.ports import port_block
from tests.system.harness import Env, build_on, get, listening, wait_for
from tests.system.sandbox import Sandbox

pytestmark = pytest.mark.system
LISTEN, BLUE, GREEN, NEW_LISTEN = port_block(__name__, 4)


@pytest.fixture(scope="module")
def env(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> Env:
    e = Env(sandbox, tmp_path_factory.mktemp("foundation"), "found", "prod", LISTEN, BLUE, GREEN)
    # A TOML literal string: every character, each backslash included, is the value.
    e.write_config(
        extra="environment = { TRICKY = 'sp ace \"q\" \\ $HOME 100% end\\', UNI = \"grüße ✓\" }"
    )
    e.make_build("b1")
    return e


def test_install_holds_the_port_in_systemd_without_an_app(env: Env) -> None:
    out = env.ok("install", "prod")
    assert f"wrote /etc/systemd/system/{env.prefix}.socket" in out
    assert env.show(f"{env.prefix}.socket", "ActiveState") == "active"
    assert env.show(f"{env.prefix}.socket", "UnitFileState") == "enabled"
    assert env.show(env.unit("blue"), "ActiveState") == "inactive"
    ss = env.sandbox.run("ss", "-Hltnp", f"sport = :{LISTEN}").stdout
    assert "systemd" in ss, ss
    assert listening(LISTEN)
    # No live color yet: the router closes (tcp mode) instead of forwarding anywhere.
    assert env.show(f"{env.prefix}.service", "ActiveState") == "active"


def test_second_install_changes_nothing_and_says_so(env: Env) -> None:
    out = env.ok("install", "prod")
    assert "nothing changed" in out
    assert "wrote" not in out


def test_color_unit_runs_the_build_on_its_port_and_stops_in_time(env: Env) -> None:
    link = env.sandbox.state_dir / env.prefix / "blue"
    link.symlink_to(env.builds / "b1")
    try:
        env.sandbox.systemctl("start", env.unit("blue"), check=True)
        assert wait_for("blue serving", lambda: build_on(BLUE) == "b1")
        began = time.monotonic()
        env.sandbox.systemctl("stop", env.unit("blue"), check=True)
        assert time.monotonic() - began < 5, "stop_timeout is 5 s"
        assert not listening(BLUE)
    finally:
        link.unlink()


def test_environment_and_exec_reach_the_process_byte_for_byte(env: Env) -> None:
    link = env.sandbox.state_dir / env.prefix / "blue"
    link.symlink_to(env.builds / "b1")
    try:
        env.sandbox.systemctl("start", env.unit("blue"), check=True)
        wait_for("blue serving", lambda: listening(BLUE))
        _, environ = get(BLUE, "/env")
        assert environ["TRICKY"] == 'sp ace "q" \\ $HOME 100% end\\'
        assert environ["UNI"] == "grüße ✓"
        assert (environ["PORT"], environ["HOST"], environ["COLOR"]) == (
            str(BLUE),
            "127.0.0.1",
            "blue",
        )
    finally:
        env.sandbox.systemctl("stop", env.unit("blue"))
        link.unlink()


def test_percent_in_exec_stays_literal(env: Env) -> None:
    """A `%` in exec is not a specifier: the process receives it as typed."""
    env.config.write_text(env.config.read_text().replace('server.py"', 'server.py 100%n ${PORT}"'))
    try:
        env.ok("install", "prod")
        link = env.sandbox.state_dir / env.prefix / "blue"
        link.symlink_to(env.builds / "b1")
        env.sandbox.systemctl("start", env.unit("blue"), check=True)
        wait_for("blue serving", lambda: listening(BLUE))
        _, argv = get(BLUE, "/argv")
        assert list(argv)[-2:] == ["100%n", str(BLUE)]
    finally:
        env.sandbox.systemctl("stop", env.unit("blue"))
        (env.sandbox.state_dir / env.prefix / "blue").unlink(missing_ok=True)
        env.config.write_text(env.config.read_text().replace(' 100%n ${PORT}"', '"'))
        env.ok("install", "prod")


def test_socket_change_is_refused_without_rebind(env: Env) -> None:
    env.write_config(listen=str(NEW_LISTEN))
    try:
        done = env.cli("install", "prod")
        assert done.returncode == 2, done.stderr
        assert "--rebind" in done.stderr
        assert "[Socket]" in done.stderr
        assert listening(LISTEN), "the live socket was not touched"
        assert not listening(NEW_LISTEN)
        out = env.ok("install", "prod", "--rebind")
        assert "rebind: the public port was closed for up to" in out
        assert wait_for("new port listening", lambda: listening(NEW_LISTEN))
        assert not listening(LISTEN)
    finally:
        env.write_config()
        env.ok("install", "prod", "--rebind")
    assert wait_for("old port back", lambda: listening(LISTEN))


def test_verify_inside_sandbox_is_clean(env: Env) -> None:
    done = env.sandbox.run(
        "systemd-analyze",
        "verify",
        f"{env.prefix}.socket",
        f"{env.prefix}.service",
        env.unit("blue"),
        env.unit("green"),
    )
    assert (done.returncode, done.stderr) == (0, "")


def test_reboot_brings_the_socket_back(env: Env) -> None:
    env.sandbox.reboot()
    assert wait_for("socket after reboot", lambda: listening(LISTEN))
    assert env.show(f"{env.prefix}.socket", "ActiveState") == "active"
