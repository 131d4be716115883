"""Real sshd servers on loopback for the ssh driver's tests (fake hosts).

Each `SSHServer` is one `sshd -D -e -f CONFIG` process with its own config and host key,
listening on its own 127.0.0.x address and a free port, so a test can kill one "host" while
the others keep answering. Nothing here installs packages: scripts/install_test_deps.sh does
(CI runs it), and the fixtures skip with `SSHD_MISSING` when /usr/sbin/sshd is absent.

Test users are unprivileged local accounts (`useradd -m`) that accept a client key generated
for the test session; creating them is idempotent, so concurrent or repeated sessions share them.
"""
from __future__ import annotations

import dataclasses
import fcntl
import os
import pathlib
import pwd
import shutil
import signal
import socket
import subprocess
import time
import uuid
from typing import TYPE_CHECKING, Iterable, Iterator, List, Optional, Sequence, Tuple

import pytest

if TYPE_CHECKING:
    from skyshift.v1 import objects_pb2 as pb

SSHD = "/usr/sbin/sshd"
SSH_KEYGEN = "ssh-keygen"
SSHD_MISSING = f"{SSHD} is missing: run scripts/install_test_deps.sh (installs openssh-server)"
TEST_USERS = ("skyshift-t1", "skyshift-t2")
#: Loopback addresses of the fake hosts: one sshd each.
HOST_ADDRESSES = tuple(f"127.0.0.{n}" for n in range(12, 30))
READY_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0


def missing_reason() -> Optional[str]:
    """Why real-sshd tests cannot run here, or None when they can."""
    if not os.access(SSHD, os.X_OK):
        return SSHD_MISSING
    if shutil.which(SSH_KEYGEN) is None:
        return f"{SSH_KEYGEN} is missing: run scripts/install_test_deps.sh (installs openssh-client)"
    if os.geteuid() != 0:
        return "creating the test users and running sshd needs root"
    return None


def generate_key(path: pathlib.Path, comment: str = "skyshift-test") -> pathlib.Path:
    """An ed25519 key pair without passphrase at `path` and `path`.pub."""
    subprocess.run([SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                   check=True, capture_output=True)
    return path


def ensure_user(name: str, public_key: str) -> pwd.struct_passwd:
    """Create the unprivileged user `name` if needed and authorize `public_key` for it.

    `usermod -p '*'` because sshd refuses key logins to accounts with a locked password ('!').
    The key is appended under a lock, never replacing other sessions' keys.
    """
    try:
        pwd.getpwnam(name)
    except KeyError:
        result = subprocess.run(["useradd", "-m", "-s", "/bin/bash", name], capture_output=True, text=True)
        if result.returncode not in (0, 9):  # 9: created meanwhile by a concurrent session
            raise RuntimeError(f"useradd {name} failed: {result.stderr.strip()}")
    subprocess.run(["usermod", "-p", "*", name], check=True, capture_output=True)
    account = pwd.getpwnam(name)
    ssh_dir = pathlib.Path(account.pw_dir) / ".ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    os.chown(ssh_dir, account.pw_uid, account.pw_gid)
    authorized = ssh_dir / "authorized_keys"
    line = public_key.strip()
    with open(authorized, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        if line not in handle.read().splitlines():
            handle.write(line + "\n")
    os.chown(authorized, account.pw_uid, account.pw_gid)
    os.chmod(authorized, 0o600)
    return account


def revoke_key(name: str, public_key: str) -> None:
    """Remove `public_key` from the user's authorized keys (other sessions' keys stay)."""
    authorized = pathlib.Path(pwd.getpwnam(name).pw_dir) / ".ssh" / "authorized_keys"
    with open(authorized, "r+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        kept = [line for line in handle.read().splitlines() if line != public_key.strip()]
        handle.seek(0)
        handle.truncate()
        handle.write("".join(line + "\n" for line in kept))


def free_port(address: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((address, 0))
        return sock.getsockname()[1]


def answers_ssh(address: str, port: int, timeout: float = 0.5) -> bool:
    """True when something at address:port sends an SSH banner."""
    try:
        with socket.create_connection((address, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            return sock.recv(8).startswith(b"SSH-")
    except OSError:
        return False


class SSHServer:
    """One fake host: an sshd on `address`:`port` whose files live in `directory`."""

    def __init__(self, directory: pathlib.Path, address: str, users: Iterable[str] = TEST_USERS):
        self.directory = pathlib.Path(directory)
        self.address = address
        self.users = tuple(users)
        self.port = 0
        self.process: Optional[subprocess.Popen] = None
        self.config_path = self.directory / "sshd_config"
        self.log_path = self.directory / "sshd.log"
        self.host_key = self.directory / "ssh_host_ed25519_key"

    @property
    def pid(self) -> Optional[int]:
        return self.process.pid if self.process else None

    def _write_config(self) -> None:
        self.config_path.write_text("\n".join([
            f"ListenAddress {self.address}:{self.port}",
            f"HostKey {self.host_key}",
            "PidFile none",
            "AuthorizedKeysFile .ssh/authorized_keys",
            "StrictModes no",
            "UsePAM no",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PubkeyAuthentication yes",
            "PermitRootLogin no",
            f"AllowUsers {' '.join(self.users)}",
            # Room for the driver's pooled channels and parallel tests.
            "MaxSessions 64",
            "MaxStartups 64:30:128",
            "LogLevel VERBOSE",
            "",
        ]))

    def start(self, timeout: float = READY_TIMEOUT, same_port: bool = False) -> "SSHServer":
        """Start sshd on a free port, or with `same_port` on the port it had (a host coming
        back); its host key is kept across restarts."""
        self.directory.mkdir(parents=True, exist_ok=True)
        if not self.host_key.exists():
            generate_key(self.host_key, comment=f"host-{self.address}")
        os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege-separation directory
        deadline = time.monotonic() + timeout
        while True:
            # The port is free when picked; another process may take it before sshd binds,
            # in which case sshd exits and we try another one.
            if not (same_port and self.port):
                self.port = free_port(self.address)
            self._write_config()
            with open(self.log_path, "ab") as log:
                self.process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.config_path)],
                                                stdin=subprocess.DEVNULL, stdout=log, stderr=log)
            while time.monotonic() < deadline:
                if answers_ssh(self.address, self.port):
                    return self
                if self.process.poll() is not None:
                    break
                time.sleep(0.02)
            if self.process.poll() is None or time.monotonic() >= deadline or same_port:
                self.stop()
                raise RuntimeError(f"sshd on {self.address}:{self.port} not ready after {timeout}s; "
                                   f"see {self.log_path}")

    def _processes(self) -> list:
        """The listener and its per-connection sshd processes (sessions run under those)."""
        if not self.process:
            return []
        return [self.process.pid] + descendants(self.process.pid)

    def kill(self) -> None:
        """The host dies: SIGKILL its sshd and every session it serves, so open connections drop too.

        Replicas started detached were re-parented away from sshd and keep running; tests stop
        them by the pids in their state files (the fake hosts share this machine's filesystem).
        """
        for pid in reversed(self._processes()):
            _signal(pid, signal.SIGKILL)
        if self.process:
            self.process.wait(STOP_TIMEOUT)

    def drop_connections(self) -> None:
        """Kill every session the host serves, as a restarted network would; the listener stays."""
        for pid in reversed(self._processes()[1:]):
            _signal(pid, signal.SIGKILL)

    def freeze(self) -> None:
        """The host stops answering without closing anything (SIGSTOP): the kernel still accepts
        TCP connections and buffers data, but nothing replies, so only timeouts notice."""
        for pid in self._processes():
            _signal(pid, signal.SIGSTOP)

    def thaw(self) -> None:
        for pid in self._processes():
            _signal(pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.thaw()
            self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.kill()


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def descendants(pid: int) -> list:
    """Pids of every process below `pid`, parents before children (read from /proc)."""
    children: dict = {}
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
        parent = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(0), []):
            found.append(child)
            queue.append(child)
    return found


# ---------------------------------------------------------------- pytest fixtures
# Imported by tests/integration/conftest.py and by the e2e tests that need fake hosts.


@dataclasses.dataclass
class ClientKey:
    """The key SkyShift logs in with; every test user accepts it."""

    path: pathlib.Path
    users: Tuple[str, ...]


def ssh_cluster_spec(name: str, servers: Sequence[SSHServer], key: ClientKey, username: str = TEST_USERS[0],
                     user_map: str = "") -> "pb.Cluster":
    """A Cluster of the fake hosts `servers`, logging in as `username` with `key`."""
    from skyshift.v1 import objects_pb2 as pb

    cluster = pb.Cluster()
    cluster.metadata.name = name
    cluster.spec.manager = "ssh"
    for server in servers:
        host = cluster.spec.hosts.add()
        host.host, host.port, host.username, host.ssh_key_path = server.address, server.port, username, str(key.path)
    if user_map:
        cluster.spec.access_config["user_map"] = user_map
    return cluster


def remove_remote_state(cluster_name: str, users: Iterable[str] = TEST_USERS,
                        remote_dir: str = ".skyshift/replicas") -> None:
    """Kill the replicas the ssh driver left running for `cluster_name` (e.g. on a host a test
    killed) and delete their files from the test users' homes (the fake hosts share this
    machine's filesystem and processes)."""
    for user in users:
        account = pwd.getpwnam(user)
        root = pathlib.Path(account.pw_dir) / remote_dir / cluster_name
        for pid_file in root.glob("*/*/*/.skyshift/pid"):
            try:
                pid = int(pid_file.read_text())
                # Only a group still led by the test user's process (never a reused pid).
                if os.stat(f"/proc/{pid}").st_uid == account.pw_uid and os.getpgid(pid) == pid:
                    os.killpg(pid, signal.SIGKILL)
            except (OSError, ValueError):
                pass  # ended already
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def ssh_client_key(tmp_path_factory) -> Iterator[ClientKey]:
    reason = missing_reason()
    if reason:
        pytest.skip(reason)
    path = generate_key(tmp_path_factory.mktemp("ssh-client") / "id_ed25519")
    public_key = path.with_name(path.name + ".pub").read_text()
    for user in TEST_USERS:
        ensure_user(user, public_key)
    yield ClientKey(path=path, users=TEST_USERS)
    for user in TEST_USERS:
        revoke_key(user, public_key)


@pytest.fixture
def start_ssh_hosts(ssh_client_key, tmp_path):
    """Starts fake hosts for one test: `start_ssh_hosts(2)` -> [SSHServer, SSHServer]. Each is
    stopped by its pid at the end of the test."""
    started: List[SSHServer] = []

    def start(count: int) -> List[SSHServer]:
        servers = []
        for _ in range(count):
            # Addresses after the two shared hosts' (ssh_hosts), so every host has its own.
            address = HOST_ADDRESSES[2 + len(started) % (len(HOST_ADDRESSES) - 2)]
            server = SSHServer(tmp_path / f"sshd-{len(started)}", address)
            started.append(server)
            servers.append(server.start())
        return servers

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def ssh_hosts(ssh_client_key, tmp_path_factory) -> List[SSHServer]:
    """Two fake hosts shared by the tests that never kill them (127.0.0.12 and 127.0.0.13)."""
    servers = [SSHServer(tmp_path_factory.mktemp("sshd"), address) for address in HOST_ADDRESSES[:2]]
    try:
        for server in servers:
            server.start()
        yield servers
    finally:
        for server in servers:
            server.stop()


@pytest.fixture
def ssh_cluster(ssh_hosts, ssh_client_key) -> "pb.Cluster":
    """A Cluster of the shared fake hosts, with a fresh name (so fresh state on the hosts),
    its users mapped: alice -> skyshift-t1, bob -> skyshift-t2."""
    name = f"ssh-{uuid.uuid4().hex[:8]}"
    yield ssh_cluster_spec(name, ssh_hosts, ssh_client_key, user_map=f"alice={TEST_USERS[0]},bob={TEST_USERS[1]}")
    remove_remote_state(name)
