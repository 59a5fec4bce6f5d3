"""The exception tree. Library code raises these; only ``cli.main`` and the router's
``main`` turn them into exit codes::

    SwitchError (1, internal)
    ├── UsageError (2)            bad arguments or bad input (a build path, a color)
    │   └── ConfigError (2)       the config file: names the file, the key and the fix
    ├── AbortedError (3)          stopped before the switch; the old color still serves
    ├── LockHeldError (4)         another command holds the environment's lock
    ├── SwitchedBackError (5)     switched, then switched back during `watch`
    ├── NeedsRepairError (6)      state.json unreadable or inconsistent: run `repair`
    ├── SystemdError (1)          a systemctl call failed; carries a journalctl hint
    ├── RouterError (1)           the router's control socket failed or refused a command
    └── SteerError (1)            direct mode: the kernel refused the BPF program or a map
                                  update, or a color's listener cannot be found or copied
"""

from __future__ import annotations


class SwitchError(Exception):
    exit_code = 1

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\n  next: {self.hint}" if self.hint else self.message


class UsageError(SwitchError):
    exit_code = 2


class ConfigError(UsageError):
    def __init__(self, path: str, key: str, problem: str, fix: str) -> None:
        where = f"{path}: {key}" if key else path
        super().__init__(f"{where}: {problem}", fix)
        self.path = path
        self.key = key


class AbortedError(SwitchError):
    exit_code = 3


class LockHeldError(SwitchError):
    exit_code = 4


class SwitchedBackError(SwitchError):
    exit_code = 5


class NeedsRepairError(SwitchError):
    exit_code = 6


class SystemdError(SwitchError):
    exit_code = 1


class RouterError(SwitchError):
    exit_code = 1


class SteerError(SwitchError):
    exit_code = 1
