"""Test ports: fixed blocks below the ephemeral range, never ``bind(0)``.

Load generators fill the ephemeral range (32768-60999 here) with client-side TIME_WAIT
sockets, and a listener cannot bind a port that is the local port of one, even with
SO_REUSEADDR. So tests take ports from 20000 up to just below the ephemeral range.

Each test module gets a block that starts at a place derived from its name and the
checkout's path (stable across runs; two checkouts testing at once, a clone in /tmp beside
the working tree say, start in different places instead of racing for the same ports),
skipping ports another module of this run already holds and ports that fail a
bind-and-listen probe with SO_REUSEADDR (someone else is listening there)::

    from tests.ports import port_block
    LISTEN, BLUE, GREEN = port_block(__name__, 3)
"""

from __future__ import annotations

import hashlib
import socket
import threading
from pathlib import Path

LOW = 20000
HIGH = 32767  # inclusive; lowered below the kernel's ephemeral range if that starts lower
EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")

CHECKOUT = str(Path(__file__).resolve().parents[1])
_lock = threading.Lock()
_given: dict[str, list[int]] = {}  # module -> its ports, in the order given, in this process


def highest_port() -> int:
    try:
        ephemeral_low = int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return HIGH
    return min(HIGH, ephemeral_low - 1)


def bindable(port: int) -> bool:
    """Whether a listener with SO_REUSEADDR can bind ``port`` on every IPv4 address now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("0.0.0.0", port))
            sock.listen()
        except OSError:
            return False
    return True


def start_of(module_name: str, low: int, high: int) -> int:
    digest = hashlib.sha256(module_name.encode()).digest()
    return low + int.from_bytes(digest[:4], "big") % (high - low + 1)


def port_block(module_name: str, count: int) -> list[int]:
    """``count`` free ports for ``module_name``; asking again gives the same ports first."""
    if count < 1:
        raise ValueError(f"count must be at least 1, not {count}")
    high = highest_port()
    span = high - LOW + 1
    with _lock:
        ports = _given.setdefault(module_name, [])
        taken = {port for block in _given.values() for port in block}
        start = start_of(f"{CHECKOUT}:{module_name}", LOW, high)
        offsets = iter(range(span))
        while len(ports) < count:
            offset = next(offsets, None)
            if offset is None:
                raise RuntimeError(f"only {len(ports)} of {count} ports free in {LOW}-{high}")
            port = LOW + (start - LOW + offset) % span
            if port not in taken and bindable(port):
                ports.append(port)
                taken.add(port)
        return ports[:count]
