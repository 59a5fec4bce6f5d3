"""A real systemd 252 booted as PID 1 of private PID and mount namespaces, for system tests.

How it boots (DESIGN.md, "Testing against a real systemd"; the script is BOOT_SCRIPT)::

    unshare --pid --fork --mount --mount-proc <root>/boot.sh
      boot.sh: mount --make-rprivate /
               tmpfs on /run (and on /var/log/journal when that exists)
               a private tmpfs on /sys/fs/cgroup holding the host's hierarchies (hybrid hosts)
               <root>/etc-systemd-system  bound over /etc/systemd/system
               <root>/state               bound over /var/lib/alive-switch
               a pty of this process      bound over /dev/console (copied to boot.log)
               exec env -i container=other SYSTEMD_UNIT_PATH=/etc/systemd/system:<root>/stubs \\
                    PATH=... /lib/systemd/systemd --system --unit=sandbox-boot.target

The root directory it is given::

    <root>/etc-systemd-system/  the sandbox's /etc/systemd/system (enable writes here)
    <root>/state/               the sandbox's /var/lib/alive-switch
    <root>/stubs/               hermetic units, rewritten at each boot
    <root>/boot.sh              the script above, rewritten at each boot
    <root>/boot.log             what systemd wrote to its console, appended at each boot

The unit path holds only those two directories: with the distribution's, the sandbox would
run systemd-tmpfiles against the host's /tmp, start the host's services and rewrite sysctls.
The stubs are empty targets, the boot target (it wants sockets.target, multi-user.target and
timers.target, so units enabled there start at boot) and journald with its two sockets, so
journalctl works. /tmp is the host's: units can run the project's virtualenv wherever the
checkout is. The network namespace is the host's: the host reaches units on 127.0.0.1.

A "reboot" is ``kill()`` then ``boot()`` over the same root (``reboot()``, or a new Sandbox):
the private /etc/systemd/system and state survive, /run and the journal do not.

What systemd as PID 1 would leave on the host, and what is done about it:
- it raises the sysctls fs.file-max, fs.nr_open and net.unix.max_dgram_qlen (the network
  namespace is shared): restored by ``kill()``.
- it creates controller directories in /sys/fs/cgroup and remounts that tmpfs read-only
  (one superblock, so for the host too): it gets a private tmpfs there instead.
- its cgroups (init.scope, system.slice, ...) in the host's hierarchies outlive it: the ones
  that appeared are removed by ``kill()``.
- units with PrivateTmp= leave /tmp/systemd-private-* (SIGKILL gives systemd no chance to
  clean up): the ones that appeared are removed by ``kill()``.
- journald's dev-log socket would symlink the host's /dev/log: the stub copy has no
  ``Symlinks=``. journald neither reads the kernel log nor writes to the host's terminals.
- the mount point /var/lib/alive-switch is created on the host if it is missing (empty).

Only one sandbox may run at a time on a machine (they share cgroup paths and interfere):
``boot()`` takes an flock on LOCK_FILE and refuses while another sandbox holds it. The file
records (JSON) the sandbox's PID 1 and the host's values above, so that a sandbox left
running by a test process that died (SIGKILL, CI timeout) is killed, and its traces undone,
by the next ``boot()``. A fleet of test hosts (hosts.py) holds the same lock for its whole
life and records every host's PID 1 under ``pids``: its hosts coexist among themselves
(each in its own cgroup subtree and namespaces), never beside a single sandbox.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any, NoReturn, Self, TypeVar

SYSTEMD_UNITS = Path("/lib/systemd/system")
SYSTEMD_BINARY = Path("/lib/systemd/systemd")
ETC_UNITS = Path("/etc/systemd/system")
STATE_DIR = Path("/var/lib/alive-switch")
LOCK_WAIT_VAR = "SANDBOX_LOCK_WAIT"  # seconds to wait for another sandbox to end (default 0)
LOCK_FILE = Path("/run/alive-switch-test-sandbox.lock")
BOOT_TARGET = "sandbox-boot.target"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
BASE_ENV = {"PATH": PATH, "LANG": "C.UTF-8"}

STUB_TARGETS = (
    *("sysinit", "basic", "shutdown", "sockets", "timers", "paths", "slices", "local-fs"),
    *("network", "network-online", "multi-user", "default"),
)
JOURNALD_UNITS = (
    "systemd-journald.service",
    "systemd-journald.socket",
    "systemd-journald-dev-log.socket",
)
BOOT_TARGET_TEXT = """\
[Unit]
Description=alive-switch test sandbox boot
Wants=systemd-journald.service sockets.target multi-user.target timers.target
"""
# What the distribution's sockets.target.wants/ holds for journald.
SOCKETS_TARGET_WANTS = "Wants=systemd-journald.socket systemd-journald-dev-log.socket\n"

BOOT_SCRIPT = """\
#!/bin/sh
# Written by tests/system/sandbox.py: PID 1 of fresh PID and mount namespaces.
set -eu
mount --make-rprivate /
mount -t tmpfs -o mode=0755 tmpfs /run
if [ -d /var/log/journal ]; then mount -t tmpfs -o mode=2755 tmpfs /var/log/journal; fi
mkdir -p /run/systemd/journald.conf.d
printf '[Journal]\\nStorage=volatile\\nReadKMsg=no\\nForwardToWall=no\\n' \\
    > /run/systemd/journald.conf.d/sandbox.conf

# systemd mkdirs controller directories in a tmpfs /sys/fs/cgroup and remounts it read-only,
# which the host would see: give it a private tmpfs holding the host's hierarchies.
if [ "$(stat -f -c %T /sys/fs/cgroup)" = tmpfs ]; then
    mkdir /run/host-cgroup
    mount --rbind /sys/fs/cgroup /run/host-cgroup
    mount -t tmpfs -o mode=0755 tmpfs /sys/fs/cgroup
    for entry in /run/host-cgroup/*; do
        name=${{entry##*/}}
        if [ -L "$entry" ]; then
            cp -P "$entry" /sys/fs/cgroup/
        elif mountpoint -q "$entry"; then
            mkdir "/sys/fs/cgroup/$name"
            mount --rbind "$entry" "/sys/fs/cgroup/$name"
        fi
    done
    umount -l /run/host-cgroup
    rmdir /run/host-cgroup
fi

mkdir -p {state_dir}
mount --bind {unit_source} {etc_units}
mount --bind {state_source} {state_dir}
mount --bind {console} /dev/console
exec env -i container=other SYSTEMD_UNIT_PATH={unit_path} PATH={path} \\
    {systemd} --system --unit={boot_target}
"""

HOST_SYSCTLS = tuple(
    Path("/proc/sys", name) for name in ("fs/file-max", "fs/nr_open", "net/unix/max_dgram_qlen")
)
PRIVATE_TMP_GLOBS = ("tmp/systemd-private-*", "var/tmp/systemd-private-*")
RUNNING_STATES = {"running", "degraded"}
POLL = 0.02  # seconds between checks while waiting for the sandbox

T = TypeVar("T")


class SandboxError(RuntimeError):
    """The sandbox could not boot, or was used while not booted."""


class Sandbox:
    """systemd booted in private namespaces over ``root``; see the module docstring."""

    # How the boot script is started, and which of its namespaces run() and popen() enter.
    UNSHARE: tuple[str, ...] = ("unshare", "--pid", "--fork", "--mount", "--mount-proc")
    NSENTER: tuple[str, ...] = ("-m", "-p")

    def __init__(self, root: Path) -> None:
        self.root = root
        self.unit_dir = root / "etc-systemd-system"
        self.state_dir = root / "state"
        self.stubs_dir = root / "stubs"
        self.boot_script = root / "boot.sh"
        self.boot_log_path = root / "boot.log"
        self.pid: int | None = None  # host PID of the sandbox's PID 1 (systemd)
        self._unshare: subprocess.Popen[bytes] | None = None
        self._console: _Console | None = None
        self._lock_fd: int | None = None
        self._traces: _HostTraces | None = None
        self._log_start = 0  # where the current boot's part of boot.log begins

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self._unshare is not None and self._unshare.poll() is None

    def boot(self, timeout: float = 20) -> Self:
        """Boot systemd and wait until it reports running (or degraded)."""
        if self._unshare is not None:
            raise SandboxError(f"sandbox over {self.root} is already booted (pid {self.pid})")
        self._take_lock()
        try:
            self._traces = self._record_traces()
            self._write_lock()
            self._prepare()
            self._start()
            self._wait_running(time.monotonic() + timeout)
        except BaseException:
            self.kill()
            raise
        return self

    def kill(self) -> None:
        """SIGKILL the sandbox's PID 1 (the kernel ends the rest), undo host traces.

        Idempotent. Returns once every process of the sandbox is gone.
        """
        if self._unshare is not None:
            self._kill_unshare(self._unshare)
            self._unshare = None
        self.pid = None
        if self._console is not None:
            self._console.close()
            self._console = None
        if self._traces is not None:
            self._traces.undo()
            self._traces = None
        if self._lock_fd is not None:
            os.ftruncate(self._lock_fd, 0)
            os.close(self._lock_fd)
            self._lock_fd = None

    def reboot(self, timeout: float = 20) -> Self:
        """Kill, then boot again over the same root."""
        self.kill()
        return self.boot(timeout)

    def __enter__(self) -> Self:
        return self if self._unshare is not None else self.boot()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill()

    def boot_log(self) -> str:
        """What the boot script and systemd wrote to the console since the last boot began."""
        try:
            with self.boot_log_path.open("rb") as log:
                log.seek(self._log_start)
                raw = log.read()
        except FileNotFoundError:
            return ""
        return raw.decode(errors="replace").replace("\r", "")

    # -- running commands inside -----------------------------------------------------------

    def run(
        self,
        *argv: str | os.PathLike[str],
        cwd: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        check: bool = False,
        timeout: float = 60,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run argv inside the sandbox and wait for it; output captured as text.

        The environment is PATH and LANG plus ``env``; the working directory ``cwd`` or
        this process's. On timeout the process group (nsenter and what it started inside)
        is killed and TimeoutExpired raised; ``check`` raises CalledProcessError.
        """
        with self.popen(
            *argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL if input is None else subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        ) as proc:
            try:
                out, err = proc.communicate(input, timeout=timeout)
            except subprocess.TimeoutExpired:
                kill_group(proc)
                proc.communicate()
                raise
        result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        if check:
            result.check_returncode()
        return result

    def popen(
        self,
        *argv: str | os.PathLike[str],
        cwd: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        stdin: int | IO[Any] | None = subprocess.DEVNULL,
        stdout: int | IO[Any] | None = None,
        stderr: int | IO[Any] | None = None,
    ) -> subprocess.Popen[str]:
        """Start argv inside the sandbox in the background (text mode), as ``run`` does.

        It runs in a new session, its own process group: ``kill_group(proc)`` ends it (and
        see there why not ``os.killpg``); ``proc.send_signal`` would reach only nsenter.
        """
        if self.pid is None:
            raise SandboxError(f"sandbox over {self.root} is not booted")
        workdir = os.fspath(cwd) if cwd is not None else os.getcwd()
        nsenter = ["nsenter", "-t", str(self.pid), *self.NSENTER, f"--wd={workdir}", "--"]
        return subprocess.Popen(
            [*nsenter, *(os.fspath(arg) for arg in argv)],
            env={**BASE_ENV, **(env or {})},
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            text=True,
            start_new_session=True,
        )

    def systemctl(
        self, *args: str, check: bool = False, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return self.run("systemctl", *args, check=check, timeout=timeout)

    def journal(self, unit: str, *args: str) -> str:
        """The messages of ``unit`` (``journalctl -u UNIT -o cat`` plus args)."""
        command = ("journalctl", "--no-pager", "-o", "cat", "-u", unit, *args)
        return self.run(*command, check=True).stdout

    # -- boot steps ------------------------------------------------------------------------

    def _take_lock(self) -> None:
        self._lock_fd = take_lock()

    def _record_traces(self) -> _HostTraces:
        return _HostTraces.now()

    def _write_lock(self) -> None:
        assert self._lock_fd is not None and self._traces is not None
        record = {"pid": self.pid, "test_process": os.getpid(), "root": str(self.root)}
        write_record(self._lock_fd, record | self._traces.record())

    def _prepare(self) -> None:
        for directory in (self.unit_dir, self.state_dir, self.stubs_dir):
            directory.mkdir(parents=True, exist_ok=True)
        write_stubs(self.stubs_dir)

    def _start(self) -> None:
        self._log_start = self.boot_log_path.stat().st_size if self.boot_log_path.exists() else 0
        self._console = _Console(self.boot_log_path)
        self.boot_script.write_text(self._script(self._console.path))
        self.boot_script.chmod(0o755)
        self._unshare = subprocess.Popen(
            [*self.UNSHARE, str(self.boot_script)],
            stdin=subprocess.DEVNULL,
            stdout=self._console.slave,
            stderr=self._console.slave,
            env=BASE_ENV,
            start_new_session=True,
        )

    def _script(self, console: Path) -> str:
        q = shlex.quote
        return BOOT_SCRIPT.format(
            state_dir=q(str(STATE_DIR)),
            etc_units=q(str(ETC_UNITS)),
            unit_source=q(str(self.unit_dir)),
            state_source=q(str(self.state_dir)),
            console=q(str(console)),
            unit_path=q(f"{ETC_UNITS}:{self.stubs_dir}"),
            path=q(PATH),
            systemd=q(str(SYSTEMD_BINARY)),
            boot_target=q(BOOT_TARGET),
        )

    def _wait_running(self, deadline: float) -> None:
        # unshare's child keeps its PID when the boot script execs systemd.
        self.pid = self._wait("unshare to fork", deadline, self._child)
        self._write_lock()
        self._wait("the boot script to exec systemd", deadline, self._runs_systemd)
        self._wait("systemd to report running", deadline, self._reports_running)

    def _child(self) -> int | None:
        assert self._unshare is not None
        return next(iter(children(self._unshare.pid)), None)

    def _runs_systemd(self) -> bool:
        try:
            exe = os.readlink(f"/proc/{self.pid}/exe")
        except FileNotFoundError:
            return False
        return Path(exe).resolve() == SYSTEMD_BINARY.resolve()

    def _reports_running(self) -> bool:
        try:
            state = self.systemctl("is-system-running", timeout=5)
        except subprocess.TimeoutExpired:
            return False
        return state.stdout.strip() in RUNNING_STATES

    def _wait(self, what: str, deadline: float, probe: Callable[[], T | None]) -> T:
        """Poll probe until it returns something other than None or False."""
        while True:
            if self._unshare is not None and self._unshare.poll() is not None:
                self._fail(f"the sandbox exited ({self._unshare.returncode}) waiting for {what}")
            value = probe()
            if value is not None and value is not False:
                return value
            if time.monotonic() > deadline:
                self._fail(f"timed out waiting for {what}")
            time.sleep(POLL)

    def _fail(self, message: str) -> NoReturn:
        self.kill()  # first: the console thread has then copied everything
        raise SandboxError(f"{message}; boot log ({self.boot_log_path}):\n{self.boot_log()}")

    def _kill_unshare(self, unshare: subprocess.Popen[bytes]) -> None:
        targets = [self.pid] if self.pid is not None else children(unshare.pid)
        for pid in targets:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        try:
            # unshare returns once its child, PID 1, is reaped; the kernel reaps the rest
            # of the namespace before that.
            unshare.wait(timeout=10)
        except subprocess.TimeoutExpired:  # killed before it had forked
            unshare.kill()
            unshare.wait()


class _Console:
    """A pty whose slave is the sandbox's /dev/console; a thread copies it to a log file.

    systemd as PID 1 writes its status to /dev/console and resets that terminal, which would
    otherwise be the host's console; it refuses a plain file there, so a pty it is.
    """

    def __init__(self, log_path: Path) -> None:
        self.master, self.slave = os.openpty()
        self.path = Path(os.ttyname(self.slave))
        self._log = log_path.open("ab")
        self._thread = threading.Thread(target=self._copy, name="sandbox-console", daemon=True)
        self._thread.start()

    def _copy(self) -> None:
        while True:
            try:
                data = os.read(self.master, 65536)
            except OSError:  # EIO: every slave end is closed
                return
            if not data:
                return
            self._log.write(data)
            self._log.flush()

    def close(self) -> None:
        os.close(self.slave)
        self._thread.join(timeout=5)
        os.close(self.master)
        self._log.close()


class _HostTraces:
    """What a sandbox leaves on the host that kill() undoes, recorded before it boots."""

    def __init__(self, sysctls: dict[str, str], private_tmp: set[str], cgroups: set[str]) -> None:
        self.sysctls = sysctls
        self.private_tmp = private_tmp
        self.cgroups = cgroups

    @classmethod
    def now(cls) -> _HostTraces:
        sysctls = {str(path): path.read_text() for path in HOST_SYSCTLS}
        return cls(sysctls, private_tmp_dirs(), top_cgroups())

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> _HostTraces:
        return cls(record["sysctls"], set(record["private_tmp"]), set(record["cgroups"]))

    def record(self) -> dict[str, Any]:
        return {
            "sysctls": self.sysctls,
            "private_tmp": sorted(self.private_tmp),
            "cgroups": sorted(self.cgroups),
        }

    def undo(self) -> None:
        for name, value in self.sysctls.items():
            path = Path(name)
            if path.read_text() != value:
                path.write_text(value)
        for directory in private_tmp_dirs() - self.private_tmp:
            shutil.rmtree(directory, ignore_errors=True)
        for cgroup in top_cgroups() - self.cgroups:
            remove_cgroup(Path(cgroup))


def take_lock() -> int:
    """flock LOCK_FILE (waiting up to $SANDBOX_LOCK_WAIT s); the open file, which records a
    sandbox's PID 1 (or a fleet's, ``pids``) and the host as it was before.

    The kernel drops the flock when the test process dies, but a sandbox then outlives
    it (SIGKILL, CI timeout): the next holder finds the record, kills those PID 1s and
    undoes their traces.
    """
    fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    # Several people (or agents) testing on one machine may queue instead of failing.
    patience = time.monotonic() + float(os.environ.get(LOCK_WAIT_VAR, "0"))
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= patience:
                    raise
                time.sleep(0.5)
    except BlockingIOError:
        holder = read_record(fd)
        os.close(fd)
        raise SandboxError(
            f"another sandbox is running (PID 1 {holder.get('pid')}, test process "
            f"{holder.get('test_process')}, root {holder.get('root')}); only one may "
            "run at a time"
        ) from None
    left_over = read_record(fd)
    pids = left_over.get("pids") or [left_over.get("pid")]
    if [pid for pid in pids if isinstance(pid, int) and kill_left_over(pid)]:
        _HostTraces.from_record(left_over).undo()
    return fd


def write_record(fd: int, record: dict[str, Any]) -> None:
    """Replace the lock file's record (see take_lock)."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)


def write_stubs(stubs: Path) -> None:
    """The hermetic unit directory: empty targets, the boot target, journald."""
    for name in STUB_TARGETS:
        text = f"[Unit]\nDescription=sandbox stub {name}.target\n"
        if name == "sockets":
            text += SOCKETS_TARGET_WANTS
        (stubs / f"{name}.target").write_text(text)
    (stubs / BOOT_TARGET).write_text(BOOT_TARGET_TEXT)
    for name in JOURNALD_UNITS:
        lines = (SYSTEMD_UNITS / name).read_text().splitlines()
        # Symlinks=/dev/log would write into the host's /dev (only mounts are private).
        kept = [line for line in lines if not line.startswith("Symlinks=")]
        (stubs / name).write_text("\n".join(kept) + "\n")


def children(pid: int) -> list[int]:
    """PIDs of the children of a single-threaded process."""
    try:
        return [
            int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        ]
    except FileNotFoundError:
        return []


def kill_group(proc: subprocess.Popen[Any], timeout: float = 5) -> None:
    """SIGKILL what a ``Sandbox.popen`` process runs inside the sandbox, then reap nsenter.

    nsenter is spared so that it reaps its child: killed first, it would leave that child a
    zombie of the host's PID 1, which may reap it late, and the sandbox's kill() waits until
    every process of the namespace is reaped.
    """
    for pid in process_group(proc.pid) - {proc.pid}:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def process_group(pgid: int) -> set[int]:
    """PIDs of the processes in a process group."""
    members = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[2]) == pgid:  # after "pid (comm)": state, ppid, pgrp
            members.add(int(stat.parent.name))
    return members


def read_record(fd: int) -> dict[str, Any]:
    """The lock file's record (see Sandbox._take_lock); empty if there is none."""
    try:
        record = json.loads(os.pread(fd, 1 << 20, 0) or b"{}")
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def kill_left_over(pid: int) -> bool:
    """SIGKILL a sandbox's PID 1 left by a test process that died; whether there was one.

    Only a systemd in another PID namespace than this process's: the PID may have been reused.
    """
    try:
        is_systemd = Path(os.readlink(f"/proc/{pid}/exe")).resolve() == SYSTEMD_BINARY.resolve()
        elsewhere = os.readlink(f"/proc/{pid}/ns/pid") != os.readlink("/proc/self/ns/pid")
    except FileNotFoundError:
        return False
    if not (is_systemd and elsewhere):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(POLL)
    return True


def private_tmp_dirs() -> set[str]:
    return {str(path) for pattern in PRIVATE_TMP_GLOBS for path in Path("/").glob(pattern)}


def top_cgroups() -> set[str]:
    """The first-level cgroups of every cgroup hierarchy mounted here."""
    mounts = [line.split() for line in Path("/proc/self/mounts").read_text().splitlines()]
    roots = [Path(fields[1]) for fields in mounts if fields[2] in {"cgroup", "cgroup2"}]
    return {str(child) for root in roots for child in root.iterdir() if child.is_dir()}


def remove_cgroup(cgroup: Path) -> None:
    """rmdir a cgroup tree bottom-up; a cgroup still in use stays."""
    for directory, _, _ in os.walk(cgroup, topdown=False):
        with contextlib.suppress(OSError):
            os.rmdir(directory)
