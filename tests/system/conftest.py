"""Fixtures that boot a real systemd (see sandbox.py). They fail, never skip, where they can't:
CI requires the system tests to run.

- ``sandbox``: one sandbox per test module, killed at the end of the module whatever happens.
- ``sandbox_factory``: ``boot(root=None)`` boots a new Sandbox over ``root`` (default: this
  test's own root) after killing the one it booted before: a reboot keeps the root's
  /etc/systemd/system and state. Everything it booted is killed when the test ends.

Only one sandbox runs at a time, so a module uses one of the two, not both (or kills the
module's ``sandbox`` before calling the factory).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import pytest

from tests.system.sandbox import Sandbox

REQUIRED_TOOLS = ("unshare", "nsenter", "systemctl", "journalctl", "systemd-run")


class SandboxFactory(Protocol):
    def __call__(self, root: Path | None = None) -> Sandbox: ...


def check_host() -> None:
    """Fail (not skip) with the reason the sandbox cannot run here."""
    if os.geteuid() != 0:
        pytest.fail("system tests need root (they boot systemd in namespaces)", pytrace=False)
    missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"system tests need {', '.join(missing)} (systemd, util-linux)", pytrace=False)


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    check_host()
    box = Sandbox(tmp_path_factory.mktemp("sandbox"))
    try:
        box.boot()
        yield box
    finally:
        box.kill()


@pytest.fixture
def sandbox_factory(tmp_path: Path) -> Iterator[SandboxFactory]:
    check_host()
    booted: list[Sandbox] = []

    def boot(root: Path | None = None) -> Sandbox:
        for box in booted:
            box.kill()
        box = Sandbox(root or tmp_path / "sandbox")
        booted.append(box)
        return box.boot()

    try:
        yield boot
    finally:
        for box in booted:
            box.kill()
