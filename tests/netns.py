"""Network namespaces a test creates and deletes (``ip netns``), and a way to run code in one.

Namespaces belong to threads: ``Netns.run`` calls ``fn`` in a thread that joined the
namespace with setns(2), so sockets (and a BPF program attached there) never touch the
host's network, and the test process itself stays where it was.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import subprocess
import threading
from collections.abc import Callable
from typing import Any, TypeVar

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
_serial = itertools.count()
T = TypeVar("T")


class Netns:
    def __init__(self, tag: str) -> None:
        self.name = f"as-{tag}-{os.getpid()}-{next(_serial)}"
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        subprocess.run(["ip", "-n", self.name, "link", "set", "lo", "up"], check=True)

    def ip(self, *args: str) -> None:
        subprocess.run(["ip", "-n", self.name, *args], check=True)

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a thread inside this namespace; its result or its exception."""
        outcome: list[Any] = []

        def body() -> None:
            try:
                fd = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
                try:
                    if _libc.setns(fd, CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), "setns")
                finally:
                    os.close(fd)
                outcome.append((True, fn(*args)))
            except BaseException as e:
                outcome.append((False, e))

        thread = threading.Thread(target=body)
        thread.start()
        thread.join()
        ok, value = outcome[0]
        if not ok:
            raise value
        return value  # type: ignore[no-any-return]

    def delete(self) -> None:
        subprocess.run(["ip", "netns", "delete", self.name], check=True)


def linked(a: Netns, b: Netns, a_address: str, b_address: str) -> None:
    """A veth pair between ``a`` and ``b`` with these /24 addresses, up."""
    subprocess.run(["ip", "link", "add", "veth-as-a", "netns", a.name, "type", "veth",
                    "peer", "name", "veth-as-b", "netns", b.name], check=True)
    for ns, dev, address in ((a, "veth-as-a", a_address), (b, "veth-as-b", b_address)):
        ns.ip("addr", "add", f"{address}/24", "dev", dev)
        ns.ip("link", "set", dev, "up")
