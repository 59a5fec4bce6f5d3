"""The systemctl adapter: how the CLI runs systemctl / systemd-run (the one other caller is
the takeover's cut-over, ops/takeover/cutover.py, which PID 1 runs on its own).

Failures become :class:`SystemdError` naming the command, systemd's words and the
``journalctl`` line to read. ``tests/fakes.py``'s FakeSystemd stands in for it in unit tests.
"""

from __future__ import annotations

import subprocess
from typing import Protocol

from switcher.errors import SystemdError

UnitProps = dict[str, str]


class Systemd(Protocol):
    def daemon_reload(self) -> None: ...
    def start(self, unit: str) -> None: ...
    def stop(self, unit: str) -> None: ...
    def restart(self, unit: str) -> None: ...
    def reload(self, unit: str) -> None: ...
    def reset_failed(self, unit: str) -> None: ...
    def enable(self, unit: str) -> None: ...
    def disable(self, unit: str) -> None: ...
    def show(self, unit: str, *props: str) -> UnitProps: ...
    def show_many(self, units: list[str], *props: str) -> dict[str, UnitProps]: ...
    def schedule(self, name: str, after: float, argv: list[str]) -> None: ...
    def cancel(self, name: str) -> None: ...
    def start_transient(self, name: str, argv: list[str]) -> None: ...


def run(argv: list[str], unit: str = "", timeout: float = 120) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              check=False)
    except FileNotFoundError:
        raise SystemdError(f"{argv[0]} not found", "install systemd (is this a systemd host?)"
                           ) from None
    except subprocess.TimeoutExpired:
        raise SystemdError(f"`{' '.join(argv)}` took longer than {timeout:g} s",
                           _hint(unit)) from None
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip().replace("\n", "; ")
        raise SystemdError(f"`{' '.join(argv)}` failed (exit {done.returncode}): {said}",
                           _hint(unit))
    return done.stdout


def _hint(unit: str) -> str:
    if unit:
        return f"see: journalctl -u {unit} -n 50 --no-pager; systemctl status {unit}"
    return "see: journalctl -n 50 --no-pager"


class Systemctl:
    """The real thing."""

    def daemon_reload(self) -> None:
        run(["systemctl", "daemon-reload"])

    def start(self, unit: str) -> None:
        run(["systemctl", "start", unit], unit)

    def stop(self, unit: str) -> None:
        run(["systemctl", "stop", unit], unit)

    def restart(self, unit: str) -> None:
        run(["systemctl", "restart", unit], unit)

    def reload(self, unit: str) -> None:
        run(["systemctl", "reload", unit], unit)

    def reset_failed(self, unit: str) -> None:
        # Fails when the unit is not failed and not loaded: that is fine.
        subprocess.run(["systemctl", "reset-failed", unit], capture_output=True, check=False)

    def enable(self, unit: str) -> None:
        run(["systemctl", "enable", "--no-reload", unit], unit)

    def disable(self, unit: str) -> None:
        run(["systemctl", "disable", "--no-reload", unit], unit)

    def show(self, unit: str, *props: str) -> UnitProps:
        out = run(["systemctl", "show", unit, *(f"--property={p}" for p in props)], unit)
        values: UnitProps = {}
        for line in out.splitlines():
            key, _, value = line.partition("=")
            values[key] = value
        return values

    def show_many(self, units: list[str], *props: str) -> dict[str, UnitProps]:
        """One systemctl call for several units (each call costs ~10 ms)."""
        out = run(["systemctl", "show", *units, *(f"--property={p}" for p in props)])
        blocks = out.rstrip("\n").split("\n\n")
        found: dict[str, UnitProps] = {}
        for unit, block in zip(units, blocks, strict=False):
            found[unit] = dict(line.partition("=")[::2] for line in block.splitlines())
        return found

    def schedule(self, name: str, after: float, argv: list[str]) -> None:
        run(["systemd-run", "--quiet", "--collect", f"--unit={name}",
             f"--on-active={after:.3f}s", "--timer-property=AccuracySec=100ms", *argv], name)

    def cancel(self, name: str) -> None:
        # A timer that already fired or never existed is nothing to cancel.
        subprocess.run(["systemctl", "stop", f"{name}.timer", f"{name}.service"],
                       capture_output=True, check=False)

    def start_transient(self, name: str, argv: list[str]) -> None:
        """Run ``argv`` as ``<name>.service`` under PID 1: it goes on if the caller dies.
        Returns once it has started; it stays loaded (exited or failed) until stopped."""
        subprocess.run(["systemctl", "reset-failed", f"{name}.service"], capture_output=True,
                       check=False)
        run(["systemd-run", "--quiet", f"--unit={name}", "--service-type=exec",
             "--property=RemainAfterExit=yes", *argv], name)
