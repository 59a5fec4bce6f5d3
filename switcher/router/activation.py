"""The router's boundary with systemd: sockets passed in (sd_listen_fds), sd_notify, logging.

Everything here is a no-op outside systemd except :func:`listen_sockets`, which refuses:
the router never binds the public port itself, so without a passed socket it cannot run.
"""

from __future__ import annotations

import os
import socket
import sys

from systemd import daemon

from switcher.errors import SwitchError


class NoSocketError(SwitchError):
    """No listening socket was passed the way systemd passes one."""


def listen_sockets(unit: str) -> list[socket.socket]:
    """Take the listening sockets passed by systemd; ``unit`` names the socket unit for hints.

    sd_listen_fds(3) honours ``LISTEN_FDS`` only when ``LISTEN_PID`` is this process, and
    clears both, so nothing the router might spawn inherits them.
    """
    count, meant_for = os.environ.get("LISTEN_FDS"), os.environ.get("LISTEN_PID")
    fds = daemon.listen_fds(unset_environment=True)
    if not fds:
        if count is None:
            why = "LISTEN_FDS is not set"
        elif meant_for != str(os.getpid()):
            why = f"LISTEN_FDS is meant for PID {meant_for}, not this process ({os.getpid()})"
        else:
            why = f"LISTEN_FDS={count}"
        raise NoSocketError(
            f"no listening socket was passed ({why}); the router takes the public port from "
            f"{unit}.socket and never binds it itself",
            f"systemctl start {unit}.socket {unit}.service (or, to try it by hand: "
            f"systemd-socket-activate -l PORT alive-switch-router STATE_DIR)")
    for fd in fds:
        if not daemon.is_socket(fd, socket.AF_UNSPEC, socket.SOCK_STREAM, 1):
            raise NoSocketError(f"fd {fd} passed by systemd is not a listening stream socket",
                                f"check ListenStream= in {unit}.socket")
    return [socket.socket(fileno=fd) for fd in fds]


class Notifier:
    """sd_notify(3) messages to systemd; silent when not run by systemd (no NOTIFY_SOCKET)."""

    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self._status = ""

    def send(self, message: str) -> None:
        if self.enabled:
            daemon.notify(message)

    def ready(self, status: str) -> None:
        self._status = status
        self.send(f"READY=1\nSTATUS={status}")

    def status(self, text: str) -> None:
        """STATUS=, only when it changed (each update costs PID 1 some work)."""
        if text != self._status:
            self._status = text
            self.send(f"STATUS={text}")

    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings (half of WatchdogSec=), or None when disabled.

        systemd-python has no sd_watchdog_enabled(3); these are the variables it reads.
        """
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        if not self.enabled or not usec.isdigit() or int(usec) == 0:
            return None
        if pid and pid != str(os.getpid()):
            return None
        return int(usec) / 2e6


# Under systemd, stderr goes to the journal, which reads a "<N>" prefix as the priority.
_PREFIXED = bool(os.environ.get("JOURNAL_STREAM"))
PRIORITY = {"err": 3, "warning": 4, "notice": 5, "info": 6}


def log(priority: str, message: str) -> None:
    prefix = f"<{PRIORITY[priority]}>" if _PREFIXED else f"alive-switch-router: {priority}: "
    sys.stderr.write(f"{prefix}{message}\n")
    sys.stderr.flush()
