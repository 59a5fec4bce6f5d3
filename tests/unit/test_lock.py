"""The environment's lock: who waits for whom, and for how long (switcher/lock.py).

A holder is a real second process holding the flock (the kernel's rules, not a fake's);
time is a fake clock, so patience is checked exactly and no test sleeps for it."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from switcher.errors import LockHeldError
from switcher.lock import RECORD_GRACE, Holder, Lock

HOLD = """\
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
os.ftruncate(fd, 0)
os.pwrite(fd, sys.argv[2].encode(), 0)
print("held", flush=True)
sys.stdin.read()  # until the test closes our stdin
"""


class Holding:
    """A process that holds the lock file's flock with ``line`` written in it."""

    def __init__(self, path: Path, line: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path), line],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline() == "held\n"

    def end(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        self.proc.wait(10)
        self.proc.stdout.close()


class FakeTime:
    """A clock that moves only when the lock sleeps; ``on_sleep`` runs at each sleep."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept = 0.0
        self.on_sleep: list[tuple[float, Holding]] = []  # (at, holder to end then)

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds > 0
        self.now += seconds
        self.slept += seconds
        for at, holder in list(self.on_sleep):
            if self.now >= at:
                holder.end()
                self.on_sleep.remove((at, holder))


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "run" / "app-prod.lock"


@pytest.fixture
def holders() -> Iterator[list[Holding]]:
    started: list[Holding] = []
    yield started
    for holder in started:
        if holder.proc.poll() is None:
            holder.end()


def hold(holders: list[Holding], path: Path, command: str, pid: int = 4242) -> Holding:
    path.parent.mkdir(parents=True, exist_ok=True)
    holder = Holding(path, f"pid {pid}, `{command}`, since 2026-12-01T21:40:00+0000\n")
    holders.append(holder)
    return holder


def lock(path: Path, command: str, t: FakeTime, said: list[str], **kw: float) -> Lock:
    return Lock(path, command, say=said.append, clock=t.clock, sleep=t.sleep, **kw)


def test_a_free_lock_is_taken_at_once_and_names_its_holder(path: Path) -> None:
    with Lock(path, "deploy prod B") as held:
        line = path.read_text()
        assert line.startswith(f"pid {os.getpid()}, `deploy prod B`, since ")
        assert Holder(line.strip()).command == "deploy prod B"
        assert held.fd >= 0
    assert path.read_text() == ""  # released: no stale holder for the next message


def test_a_deploy_held_by_a_deploy_is_refused_at_once(path: Path,
                                                      holders: list[Holding]) -> None:
    hold(holders, path, "deploy prod A")
    t, said = FakeTime(), []
    with pytest.raises(LockHeldError) as refused:
        lock(path, "deploy prod B", t, said, retire_wait=40).acquire()
    assert "pid 4242, `deploy prod A`" in refused.value.message
    assert "--wait SECONDS" in refused.value.hint
    assert t.slept == 0 and said == []


def test_a_deploy_waits_for_a_retire_within_its_bound_and_says_so(
        path: Path, holders: list[Holding]) -> None:
    retire = hold(holders, path, "retire prod blue")
    t, said = FakeTime(), []
    t.on_sleep.append((t.now + 7, retire))  # the retire ends 7 s in
    with lock(path, "deploy prod B", t, said, retire_wait=40):
        assert "`deploy prod B`" in path.read_text()
    assert said == ["waiting for another alive-switch command (pid 4242, `retire prod blue`, "
                    "since 2026-12-01T21:40:00+0000) for at most 40 s"]
    assert 7 <= t.slept < 7.1


def test_a_retire_that_outlasts_its_bound_is_exit_4_with_how_long(
        path: Path, holders: list[Holding]) -> None:
    hold(holders, path, "retire prod blue")
    t, said = FakeTime(), []
    with pytest.raises(LockHeldError) as refused:
        lock(path, "deploy prod B", t, said, retire_wait=40).acquire()
    assert refused.value.exit_code == 4
    assert "(waited 40.0 s)" in refused.value.message
    assert t.slept == pytest.approx(40)


def test_wait_queues_behind_a_deploy_for_at_most_that_long(
        path: Path, holders: list[Holding]) -> None:
    first = hold(holders, path, "deploy prod A")
    t, said = FakeTime(), []
    t.on_sleep.append((t.now + 3, first))
    with lock(path, "deploy prod B", t, said, wait=5):
        pass
    assert said == [said[0]] and "`deploy prod A`" in said[0] and "at most 5 s" in said[0]
    hold(holders, path, "deploy prod C")
    t2 = FakeTime()
    with pytest.raises(LockHeldError):
        lock(path, "deploy prod B", t2, [], wait=5).acquire()
    assert t2.slept == pytest.approx(5)


def test_a_retire_waits_as_long_as_a_deploy_holds(path: Path,
                                                  holders: list[Holding]) -> None:
    deploy = hold(holders, path, "deploy prod A")
    t, said = FakeTime(), []
    t.on_sleep.append((t.now + 3600, deploy))
    with lock(path, "retire prod blue", t, said, wait=math.inf, retire_wait=40):
        pass
    assert said[0].endswith("until it ends")
    assert t.slept >= 3600


def test_a_retire_does_not_get_a_second_retire_s_grace(path: Path,
                                                       holders: list[Holding]) -> None:
    hold(holders, path, "retire prod green")
    with pytest.raises(LockHeldError):
        lock(path, "retire prod blue", FakeTime(), [], retire_wait=40).acquire()


def test_each_holder_gets_its_own_patience(path: Path, holders: list[Holding]) -> None:
    """A retire ends and a deploy takes the lock at once: the waiting deploy does not
    inherit the grace it had for the retire."""
    retire = hold(holders, path, "retire prod blue")
    t, said = FakeTime(), []

    def retire_then_deploy(seconds: float) -> None:
        FakeTime.sleep(t, seconds)
        if retire.proc.poll() is None and t.now >= 1002:
            retire.end()
            hold(holders, path, "deploy prod A", pid=77)

    t.sleep = retire_then_deploy  # type: ignore[method-assign]
    with pytest.raises(LockHeldError) as refused:
        lock(path, "deploy prod B", t, said, retire_wait=40).acquire()
    assert "pid 77, `deploy prod A`" in refused.value.message
    assert t.slept < 2.2  # refused as soon as the deploy held it, not 40 s later


def test_a_holder_whose_line_is_not_written_yet_gets_a_moment(
        path: Path, holders: list[Holding]) -> None:
    """Between a holder's flock and its line the file is empty: that is not "unknown"."""
    path.parent.mkdir(parents=True)
    empty = Holding(path, "")
    holders.append(empty)
    t, said = FakeTime(), []
    with pytest.raises(LockHeldError) as refused:
        lock(path, "deploy prod B", t, said).acquire()
    assert t.slept == pytest.approx(RECORD_GRACE)
    assert "unknown" in refused.value.message
    assert said == []  # nothing to name yet


@pytest.mark.parametrize(("line", "command", "retire"), [
    ("pid 1, `retire prod blue`, since x", "retire prod blue", True),
    ("pid 1, `retirement`, since x", "retirement", False),
    ("pid 1, `deploy prod retire`, since x", "deploy prod retire", False),
    ("garbage", "", False),
    ("", "", False),
])
def test_the_holder_line_is_read_back(line: str, command: str, retire: bool) -> None:
    assert Holder(line).command == command
    assert Holder(line).is_retire is retire
