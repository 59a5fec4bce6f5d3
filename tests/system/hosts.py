"""Several test hosts on one machine, each reached by real SSH: the fleet tests' machines.

A host is a Sandbox (sandbox.py) booted with more of its own::

    unshare --pid --fork --mount --mount-proc --net <root>/boot.sh
      boot.sh: (sandbox.py's script, plus)
               ip link set lo up                     its own loopback: its own port 9000
               tmpfs on <root>/layers; overlays of /etc /usr /var /opt /srv on the machine's
               (upper layers in that tmpfs: what the host writes there stays in the host)
               its own cgroup subtree /<prefix>-<host> in the unified and name=systemd
               hierarchies (the boot script moves itself there before exec'ing systemd,
               which takes it as its root: two hosts' units of one name never share a cgroup)
               <root> bound at /run/sandbox; then its own tmpfs on /tmp and on /root

Each host has an ed25519 host key and an sshd_config in <root>; nothing listens: the
controller's ``ssh`` runs ``sshd -i`` inside the host's namespaces as its ``ProxyCommand``::

    <fleet>/ssh_config      Host h1 … ProxyCommand nsenter -t <PID 1> -m -p -n -- sshd -i …
    <fleet>/known_hosts     each host's key (StrictHostKeyChecking yes)
    <fleet>/id_ed25519      the controller's key, authorized on every host
    <fleet>/inventory.ini   the hosts, ansible_python_interpreter=/usr/bin/python3
    <fleet>/ansible.cfg     ssh through ssh_config, pipelining; Ansible's files in <fleet>

The fleet holds the machine's sandbox lock (LOCK_FILE) from before the first host boots until
the last is killed, recording every host's PID 1 (``pids``) and the machine's values that
sandboxes change, so that a fleet left by a killed test process is killed and undone by the
next sandbox or fleet. ``kill()`` closes the controller's SSH master connections (by PID),
kills each host's PID 1 (the kernel ends the rest of its namespaces: processes, mounts,
the network namespace and its veth-less loopback), removes its cgroups and restores the
sysctls.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shlex
import signal
import subprocess
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

from tests.system.sandbox import (
    LOCK_FILE,
    Sandbox,
    SandboxError,
    _HostTraces,
    remove_cgroup,
    take_lock,
    write_record,
)

SSHD = Path("/usr/sbin/sshd")
CLONE_NEWNET = 0x40000000
T = TypeVar("T")
OVERLAID = ("/etc", "/usr", "/var", "/opt", "/srv")
CGROUP_HIERARCHIES = ("unified", "systemd")  # DESIGN.md: the ones systemd tracks units in
HOST_NAMES = ("h1", "h2", "h3")
PREFIX = "alive-switch-fleet"

HOST_SETUP = """\
ip link set lo up
mount -t tmpfs -o mode=0700 tmpfs {layers}
for dir in {overlaid}; do
    name=${{dir#/}}
    mkdir "{layers}/$name.upper" "{layers}/$name.work"
    mount -t overlay overlay \\
        -o "lowerdir=$dir,upperdir={layers}/$name.upper,workdir={layers}/$name.work" "$dir"
done
for hierarchy in {hierarchies}; do
    mkdir -p "/sys/fs/cgroup/$hierarchy/{cgroup}"
    echo $$ > "/sys/fs/cgroup/$hierarchy/{cgroup}/cgroup.procs"
done
"""
HOST_FINISH = """\
mkdir -p /run/sandbox /run/sshd
mount --bind {root} /run/sandbox
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=0700 tmpfs /root
"""
SSHD_CONFIG = """\
HostKey /run/sandbox/ssh_host_ed25519_key
AuthorizedKeysFile /run/sandbox/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PidFile none
Subsystem sftp internal-sftp
LogLevel ERROR
"""
SSH_HOST = """\
Host {name}
    User root
    IdentityFile {fleet}/id_ed25519
    IdentitiesOnly yes
    UserKnownHostsFile {fleet}/known_hosts
    StrictHostKeyChecking yes
    ProxyCommand {proxy}
    ControlMaster auto
    ControlPath {fleet}/cm-%n
    ControlPersist 600
    LogLevel ERROR
"""
ANSIBLE_CFG = """\
[defaults]
inventory = {fleet}/inventory.ini
collections_path = {fleet}/collections
home = {fleet}/ansible-home
local_tmp = {fleet}/ansible-home/tmp
remote_tmp = /tmp/.ansible
retry_files_enabled = False
host_key_checking = True
forks = 5
nocows = True

[ssh_connection]
ssh_args = -F {fleet}/ssh_config
pipelining = True
"""


class Host(Sandbox):
    """One test host: a Sandbox with its own network namespace, overlays, /tmp and cgroups.

    It neither takes nor writes the machine's sandbox lock: its Fleet does, for all hosts.
    """

    UNSHARE = (*Sandbox.UNSHARE, "--net")
    NSENTER = (*Sandbox.NSENTER, "-n")

    def __init__(self, fleet: Fleet, name: str) -> None:
        super().__init__(fleet.root / name)
        self.fleet = fleet
        self.name = name
        self.cgroup = f"{PREFIX}-{name}"

    @property
    def proxy_command(self) -> str:
        """What the controller's ssh runs to reach this host's sshd."""
        return shlex.join(["nsenter", "-t", str(self.pid), "-m", "-p", "-n", "--",
                           str(SSHD), "-i", "-f", "/run/sandbox/sshd_config"])

    def path(self, inside: str) -> Path:
        """A path of the host's file system, as this machine reaches it (via /proc)."""
        assert self.pid is not None
        return Path(f"/proc/{self.pid}/root", inside.lstrip("/"))

    def call(self, function: Callable[..., T], *args: Any) -> T:
        """Run ``function(*args)`` in a thread inside this host's network namespace.

        Sockets it opens, and threads it starts, stay in that namespace (a thread's
        namespaces are copied to the threads it starts): ``host.call(Load(9000).__enter__)``
        loads the host's own port 9000.
        """
        assert self.pid is not None
        outcome: dict[str, Any] = {}

        def inside() -> None:
            try:
                enter_netns(self.pid or 0)
                outcome["value"] = function(*args)
            except BaseException as exc:  # re-raised in the caller's thread
                outcome["error"] = exc

        thread = threading.Thread(target=inside, name=f"netns-{self.name}")
        thread.start()
        thread.join()
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]  # type: ignore[no-any-return]

    def _take_lock(self) -> None:
        if self.fleet.lock_fd is None:
            raise SandboxError(f"host {self.name} booted outside its fleet's lock")

    def _write_lock(self) -> None:
        self.fleet.write_record()

    def _record_traces(self) -> _HostTraces:
        return _OwnCgroups(self.cgroup)

    def _prepare(self) -> None:
        super()._prepare()
        (self.root / "layers").mkdir(exist_ok=True)
        (self.root / "sshd_config").write_text(SSHD_CONFIG)
        key = self.root / "ssh_host_ed25519_key"
        if not key.exists():
            _keygen(key, self.name)

    def _script(self, console: Path) -> str:
        q = shlex.quote
        script = super()._script(console)
        setup = HOST_SETUP.format(
            layers=q(str(self.root / "layers")),
            overlaid=" ".join(OVERLAID),
            hierarchies=" ".join(CGROUP_HIERARCHIES),
            cgroup=self.cgroup,
        )
        finish = HOST_FINISH.format(root=q(str(self.root)))
        script = script.replace("mount --make-rprivate /\n", f"mount --make-rprivate /\n{setup}")
        head, sep, tail = script.rpartition("exec env -i")
        # systemd starts once /tmp, where the root may be, is the host's own: it reads the
        # stubs through the root's mount point.
        tail = tail.replace(str(self.stubs_dir), "/run/sandbox/stubs")
        return f"{head}{finish}{sep}{tail}"


class _OwnCgroups(_HostTraces):
    """A host's trace on the machine: its cgroup subtrees (the fleet restores the rest)."""

    def __init__(self, cgroup: str) -> None:
        super().__init__({}, set(), set())
        self.cgroup = cgroup

    def undo(self) -> None:
        for hierarchy in CGROUP_HIERARCHIES:
            remove_cgroup(Path("/sys/fs/cgroup", hierarchy, self.cgroup))


class Fleet:
    """Test hosts booted together under the machine's sandbox lock; see the module docstring."""

    def __init__(self, root: Path, names: Sequence[str] = HOST_NAMES) -> None:
        self.root = root
        self.lock_fd: int | None = None
        self.hosts = {name: Host(self, name) for name in names}
        self._traces: _HostTraces | None = None

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    @property
    def ssh_config(self) -> Path:
        return self.root / "ssh_config"

    @property
    def ansible_cfg(self) -> Path:
        return self.root / "ansible.cfg"

    @property
    def inventory(self) -> Path:
        return self.root / "inventory.ini"

    def boot(self, timeout: float = 30) -> Self:
        self.root.mkdir(parents=True, exist_ok=True)
        self.lock_fd = take_lock()
        try:
            self._traces = _HostTraces.now()
            self.write_record()
            key = self.root / "id_ed25519"
            if not key.exists():
                _keygen(key, "controller")
            for host in self.hosts.values():
                (host.root).mkdir(parents=True, exist_ok=True)
                (host.root / "authorized_keys").write_text((self.root / "id_ed25519.pub")
                                                           .read_text())
                host.boot(timeout)
            self._write_client_files()
        except BaseException:
            self.kill()
            raise
        return self

    def write_record(self) -> None:
        assert self.lock_fd is not None and self._traces is not None
        pids = [host.pid for host in self.hosts.values() if host.pid is not None]
        record = {"pid": pids[0] if pids else None, "pids": pids, "test_process": os.getpid(),
                  "root": str(self.root)}
        write_record(self.lock_fd, record | self._traces.record())

    def close_ssh(self, name: str) -> None:
        """End the controller's master connection to a host, if any (by its PID)."""
        check = self.ssh("-O", "check", name)
        match = re.search(r"pid=(\d+)", check.stderr)
        if match is None:
            return
        self.ssh("-O", "exit", name)
        pid = int(match.group(1))
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)

    def ssh(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ssh", "-F", str(self.ssh_config), *args], capture_output=True,
                              text=True, timeout=timeout, check=False)

    def kill(self) -> None:
        """Close SSH masters, kill every host, undo the machine's traces, release the lock."""
        if self.ssh_config.exists():
            for name in self.hosts:
                self.close_ssh(name)
        for host in self.hosts.values():
            host.kill()
        if self._traces is not None:
            self._traces.undo()
            self._traces = None
        if self.lock_fd is not None:
            os.ftruncate(self.lock_fd, 0)
            os.close(self.lock_fd)
            self.lock_fd = None

    def __enter__(self) -> Self:
        return self.boot()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill()

    def _write_client_files(self) -> None:
        fleet = self.root
        known, config, inventory = [], [], ["[fleet]"]
        for name, host in self.hosts.items():
            public = (host.root / "ssh_host_ed25519_key.pub").read_text().split()
            known.append(f"{name} {public[0]} {public[1]}\n")
            config.append(SSH_HOST.format(name=name, fleet=fleet, proxy=host.proxy_command))
            inventory.append(f"{name} ansible_python_interpreter=/usr/bin/python3")
        (fleet / "known_hosts").write_text("".join(known))
        self.ssh_config.write_text("\n".join(config))
        self.inventory.write_text("\n".join(inventory) + "\n")
        self.ansible_cfg.write_text(ANSIBLE_CFG.format(fleet=fleet))


def enter_netns(pid: int) -> None:
    """Move the calling thread (only it) into the network namespace of ``pid``."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"setns into the network namespace of {pid}: "
                          f"{os.strerror(error)}")
    finally:
        os.close(fd)


def _keygen(path: Path, comment: str) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f",
                    str(path)], check=True, capture_output=True)


__all__ = ["LOCK_FILE", "Fleet", "Host"]
