"""``alive-switch-router STATE_DIR``: the router unit's ExecStart; the only place it exits.

STATE_DIR is the environment's state directory (``<state_dir>/<app>-<env>/``) holding
``router.json`` and ``state.json``. The listening socket comes from systemd (LISTEN_FDS).

Exit codes are sysexits(3) values, which ``systemctl status`` names (e.g. ``78/CONFIG``)::

    0   stopped on SIGTERM/SIGINT after draining
    1   internal error (a bug; the traceback is on stderr)
    64  USAGE     wrong command line
    66  NOINPUT   no listening socket was passed (it never binds the port itself)
    78  CONFIG    router.json missing or unreadable
"""

from __future__ import annotations

import enum
import sys
import traceback
from pathlib import Path

from switcher.errors import SwitchError, UsageError
from switcher.router import activation, server

USAGE = "usage: alive-switch-router STATE_DIR"
HELP = f"""{USAGE}

Forward connections on the listening socket systemd passes (LISTEN_FDS) to the live color
named in STATE_DIR/state.json, as configured in STATE_DIR/router.json. Run by the router
unit of an environment; `alive-switch status ENV` shows what it does.

exit codes: 0 stopped, 1 internal error, 64 usage, 66 no listening socket passed,
78 router.json missing or unreadable"""


class Exit(enum.IntEnum):
    OK = 0
    INTERNAL = 1
    USAGE = 64
    NO_SOCKET = 66
    CONFIG = 78


def exit_code(error: SwitchError) -> Exit:
    if isinstance(error, activation.NoSocketError):
        return Exit.NO_SOCKET
    if isinstance(error, server.SettingsError):
        return Exit.CONFIG
    if isinstance(error, UsageError):
        return Exit.USAGE
    return Exit.INTERNAL


def parse_args(argv: list[str]) -> Path:
    if argv in (["-h"], ["--help"]):
        print(HELP)
        raise SystemExit(Exit.OK)
    if len(argv) != 1 or argv[0].startswith("-"):
        raise UsageError(f"expected one argument, got {argv!r}\n{USAGE}",
                         "it is run by the router unit; see `systemctl cat <app>-<env>`")
    return Path(argv[0]).absolute()


def main(argv: list[str] | None = None) -> int:
    try:
        env_dir = parse_args(sys.argv[1:] if argv is None else argv)
        sockets = activation.listen_sockets(unit=env_dir.name)
        settings = server.load_settings(env_dir)
        server.run(env_dir, settings, sockets)
    except SwitchError as e:
        activation.log("err", str(e))
        return exit_code(e)
    except Exception:
        activation.log("err", f"internal error:\n{traceback.format_exc()}")
        return Exit.INTERNAL
    return Exit.OK


if __name__ == "__main__":
    sys.exit(main())
