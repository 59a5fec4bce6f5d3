"""What direct mode needs from the host, probed for ``check`` and ``install``.

The router (root, in its unit) loads an sk_lookup program and attaches it to the network
namespace — CAP_BPF (or CAP_SYS_ADMIN) and CAP_NET_ADMIN — and copies a color's listener
with ``pidfd_getfd(2)``, which needs ptrace access to the color: CAP_SYS_PTRACE, and Yama's
``ptrace_scope`` below 3 (3 forbids it to everyone). Each missing piece is named; the way
out is always ``mode = "tcp"``: never a half-working mode.

Read from ``/proc/self/status``::

    CapEff:	000001ffffffffff      (hex bit mask; bit 12 NET_ADMIN, 19 SYS_PTRACE,
                                   21 SYS_ADMIN, 39 BPF)
"""

from __future__ import annotations

import enum
import os
from pathlib import Path

from switcher.errors import SteerError

STATUS = Path("/proc/self/status")
PTRACE_SCOPE = Path("/proc/sys/kernel/yama/ptrace_scope")
PTRACE_FORBIDDEN = 3  # Yama: no process may ptrace another, whatever its capabilities


class Cap(enum.IntEnum):
    net_admin = 12
    sys_ptrace = 19
    sys_admin = 21
    bpf = 39


def effective(status: str) -> set[Cap]:
    """The capabilities of a ``/proc/<pid>/status`` text's CapEff mask."""
    line = next((ln for ln in status.splitlines() if ln.startswith("CapEff:")), "CapEff: 0")
    mask = int(line.split()[1], 16)
    return {cap for cap in Cap if mask >> cap & 1}


def ptrace_scope(path: Path = PTRACE_SCOPE) -> int:
    """Yama's ptrace_scope; 0 (classic ptrace rules) without Yama."""
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return 0


def missing(caps: set[Cap], scope: int) -> list[str]:
    """What is missing for direct mode, given these capabilities and ptrace scope."""
    problems = []
    if not caps & {Cap.bpf, Cap.sys_admin}:
        problems.append("CAP_BPF (or CAP_SYS_ADMIN): bpf(2) cannot load the steering program")
    if not caps & {Cap.net_admin, Cap.sys_admin}:
        problems.append("CAP_NET_ADMIN (or CAP_SYS_ADMIN): the program cannot be attached to "
                        "the network namespace")
    if scope >= PTRACE_FORBIDDEN:
        problems.append(f"ptrace access: Yama ptrace_scope = {scope} forbids copying a "
                        "color's listener (pidfd_getfd)")
    elif Cap.sys_ptrace not in caps:
        problems.append("CAP_SYS_PTRACE: a color's listener cannot be copied (pidfd_getfd)")
    return problems


def bpf_problem() -> str:
    """"" when this host loads and attaches an sk_lookup program (one that steers nothing,
    closed at once), else what the kernel said."""
    from switcher.router import steer  # noqa: PLC0415 - only direct mode pays for it

    try:
        prog = steer.load_program(steer.assemble([steer.mov_imm(steer.R0, steer.SK_PASS),
                                                  steer.exit_()]))
    except SteerError as e:
        return f"bpf(2): {e.message}"
    try:
        os.close(steer.attach(prog))
    except SteerError as e:
        return f"bpf(2): {e.message}"
    finally:
        os.close(prog)
    return ""


def problems() -> list[str]:
    """Everything direct mode would lack on this host, measured; [] when it has it all."""
    found = missing(effective(STATUS.read_text()), ptrace_scope())
    if found:
        return found
    problem = bpf_problem()
    return [problem] if problem else []
