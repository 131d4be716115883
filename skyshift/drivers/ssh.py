"""The ssh driver: replicas on existing machines reached over SSH (paramiko), on-prem style.

A Cluster with ``manager: ssh`` lists its machines in ``spec.hosts`` (host, port, username,
ssh_key_path each), or in the original format's ``access_config`` (host, username,
ssh_key_path, optional port). Each host is one node, named by its host (``host:port`` when
two entries share a host).

Multi-tenancy: a replica runs as the account of the SkyShift user who submitted it, taken from
its ``skyshift.dev/user`` label (or annotation) and mapped through ``access_config.user_map``
(``"alice=skyshift-t1,bob=skyshift-t2"``). Without a map every replica runs as the host's
username; with one, a user missing from it is refused. Each account keeps its replicas in its
own home (skyshift/drivers/ssh_remote.py), so each user has their own queue of replicas, and
`stop_all(user)` stops one user's replicas only.

Replicas run detached from the SSH session (setsid, output to files) under the same wrapper as
the local driver, so they survive the connection closing and the skylet restarting; `adopt()`
reads their state files back from every host and account. Phase changes are found by polling
each (host, account) with one command per poll interval.

A host that does not answer within ``ssh.command_timeout`` is failed: its connections are closed,
calls to it fail fast for a backoff period, its replicas report UNKNOWN and it drops out of
`capacity()`; the other hosts are not affected.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import os
import re
import socket
import time
import zlib
from typing import AsyncIterator, Dict, List, Optional, Sequence, Set, Tuple

import structlog

from skyshift.api.errors import (
    ConflictError, DeadlineError, InvalidError, NotFoundError, PreconditionError, UnavailableError,
)
from skyshift.config import Settings
from skyshift.drivers import ssh_remote as remote
from skyshift.drivers.base import (
    EXEC, LOGS, Driver, Endpoint, NodeResources, Phase, ReplicaState, Resources, is_replica_key,
    phase_for_exit, replica_env, replica_key, replica_resources,
)
from skyshift.drivers.local import LOST_MESSAGE, STOPPED_MESSAGE, wrapper_script
from skyshift.drivers.records import ReplicaRecord
from skyshift.drivers.ssh_pool import ConnectionPool, Target
from skyshift.v1 import objects_pb2 as pb

log = structlog.get_logger(__name__)

#: Label (or annotation) naming the SkyShift user who submitted a replica.
USER_LABEL = "skyshift.dev/user"
DEFAULT_PORT = 22
#: POSIX account names (useradd's default rule), at most 32 characters.
ACCOUNT_NAME = re.compile(r"^[a-z_][a-z0-9_.-]{0,30}[a-z0-9_.$-]?$")
#: Node names become a path component on the hosts.
NODE_NAME = re.compile(r"^[A-Za-z0-9:][A-Za-z0-9.:_-]*$")


# ---------------------------------------------------------------- cluster spec


@dataclasses.dataclass(frozen=True)
class Host:
    node: str
    host: str
    port: int
    username: str
    key_path: str


def cluster_hosts(cluster: pb.Cluster) -> List[Host]:
    """The cluster's machines, from spec.hosts or the original access_config format."""
    spec = cluster.spec
    access = spec.access_config
    entries: List[Tuple[str, str, int, str, str]] = []  # (field path, host, port, username, key)
    if spec.hosts:
        for index, entry in enumerate(spec.hosts):
            entries.append((f"spec.hosts[{index}]", entry.host, entry.port or DEFAULT_PORT,
                            entry.username or access.get("username", ""),
                            entry.ssh_key_path or access.get("ssh_key_path", "")))
    elif access.get("host"):
        try:
            port = int(access.get("port") or DEFAULT_PORT)
        except ValueError:
            raise InvalidError("spec.access_config.port", f"{access['port']!r} is not a port number") from None
        entries.append(("spec.access_config", access["host"], port, access.get("username", ""),
                        access.get("ssh_key_path", "")))
    else:
        raise InvalidError("spec.hosts", "an ssh cluster needs at least one host")
    hosts: List[Host] = []
    for field, host, port, username, key_path in entries:
        if not host or not NODE_NAME.match(host):
            raise InvalidError(f"{field}.host", f"{host!r} is not a host name or address")
        if not 1 <= port <= 65535:
            raise InvalidError(f"{field}.port", f"{port} is not a port number")
        check_account(username, f"{field}.username")
        hosts.append(Host(node=host, host=host, port=port, username=username,
                          key_path=os.path.expanduser(key_path) if key_path else ""))
    shared = {host.host for host in hosts if sum(other.host == host.host for other in hosts) > 1}
    hosts = [dataclasses.replace(host, node=f"{host.host}:{host.port}") if host.host in shared else host
             for host in hosts]
    if len({host.node for host in hosts}) != len(hosts):
        raise InvalidError("spec.hosts", "a host and port appear twice")
    return hosts


def check_account(name: str, field: str) -> None:
    if not name:
        raise InvalidError(field, "required")
    if not ACCOUNT_NAME.match(name):
        raise InvalidError(field, f"{name!r} is not a valid user account name")


def parse_user_map(text: str) -> Dict[str, str]:
    """``"alice=skyshift-t1, bob=skyshift-t2"`` -> {"alice": "skyshift-t1", "bob": "skyshift-t2"}."""
    mapping: Dict[str, str] = {}
    field = "spec.access_config.user_map"
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        user, separator, account = (part.strip() for part in item.partition("="))
        if not separator or not user:
            raise InvalidError(field, f"{item!r} is not USER=ACCOUNT")
        check_account(account, f"{field}.{user}")
        mapping[user] = account
    return mapping


# ---------------------------------------------------------------- handles and records


@dataclasses.dataclass
class SSHRecord(ReplicaRecord):
    #: The SkyShift user who submitted the replica ("" when the replica named none).
    user: str = ""
    #: The account it runs as on its host.
    account: str = ""


def make_handle(account: str, node: str, key: str) -> str:
    return f"{account}@{node}/{key}"


def parse_handle(handle: str) -> Tuple[str, str, str]:
    """(account, node, key) of a handle; NotFoundError if it is not one of this driver's."""
    account, _, rest = handle.partition("@")
    node, _, key = rest.partition("/")
    # The key becomes a path on the host: only DNS-1123 labels, never "..".
    if not (ACCOUNT_NAME.match(account) and NODE_NAME.match(node) and is_replica_key(key)):
        raise NotFoundError(f"{handle!r} is not a replica handle of the ssh driver")
    return account, node, key


@dataclasses.dataclass
class _Known:
    """A replica this driver instance knows about, with the last state it observed."""

    record: SSHRecord
    state: ReplicaState


# ---------------------------------------------------------------- the driver


class SSHDriver(Driver):
    """Replicas on a cluster of SSH hosts. See the module docstring."""

    manager = "ssh"
    capabilities = frozenset({LOGS, EXEC})

    def __init__(self, cluster: pb.Cluster, settings: Settings):
        super().__init__(cluster, settings)
        self.hosts: Dict[str, Host] = {host.node: host for host in cluster_hosts(cluster)}
        self.user_map = parse_user_map(cluster.spec.access_config.get("user_map", ""))
        self.pool = ConnectionPool(settings.ssh, known_hosts_path=str(self.state_path / "known_hosts"))
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=settings.ssh.threads, thread_name_prefix=f"ssh-{self.cluster_name}")
        self._known: Dict[str, _Known] = {}
        #: (node, account) pairs adopt() could not read; the poller reads them once they answer.
        self._unscanned: Set[Tuple[str, str]] = set()
        self._poller: Optional[asyncio.Task] = None
        #: Refreshes in flight, per (node, account).
        self._refreshing: Dict[Tuple[str, str], asyncio.Task] = {}
        self._closed = False

    # -- accounts and places

    def accounts(self, node: str) -> List[str]:
        """Every account replicas may run as on `node`."""
        return sorted({self.hosts[node].username, *self.user_map.values()})

    def account_for(self, replica: pb.Replica, node: str) -> Tuple[str, str]:
        """(SkyShift user, account) a replica runs as."""
        user = replica.metadata.labels.get(USER_LABEL) or replica.metadata.annotations.get(USER_LABEL, "")
        if not self.user_map or not user:
            return user, self.hosts[node].username
        account = self.user_map.get(user)
        if account is None:
            raise InvalidError(f"metadata.labels[{USER_LABEL}]",
                               f"user {user!r} has no account on cluster {self.cluster_name} "
                               "(spec.access_config.user_map)")
        return user, account

    def _node_for(self, replica: pb.Replica, key: str) -> str:
        node = replica.spec.node
        if node:
            if node not in self.hosts:
                raise InvalidError("spec.node", f"cluster {self.cluster_name} has no node {node!r} "
                                                f"(nodes: {', '.join(sorted(self.hosts))})")
            return node
        for known in self._known.values():
            if known.record.key == key and known.record.uid == replica.metadata.uid:
                return known.record.node
        # Unbound to a node: a stable choice, so a repeated start finds the replica again.
        nodes = sorted(self.hosts)
        return nodes[zlib.crc32(key.encode()) % len(nodes)]

    def _target(self, node: str, account: str) -> Target:
        host = self.hosts[node]
        return Target(host.host, host.port, account, host.key_path)

    def _base(self, node: str) -> str:
        return f"{self.settings.ssh.remote_dir}/{self.cluster_name}/{node}"

    # -- running programs on hosts

    async def _run(self, node: str, account: str, program: str, *args: object, stdin: bytes = b"",
                   timeout: Optional[float] = None, combine: bool = False,
                   limit: int = 0) -> Tuple[int, bytes, bytes]:
        """Run one of ssh_remote's programs: (exit code, stdout, stderr)."""
        if self._closed:
            raise UnavailableError(f"the ssh driver of cluster {self.cluster_name} is closed")
        target = self._target(node, account)
        line = remote.command(program, *args)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._run_blocking, target, line, stdin,
                                          timeout or self.settings.ssh.command_timeout, combine, limit)

    def _run_blocking(self, target: Target, line: str, stdin: bytes, timeout: float, combine: bool,
                      limit: int) -> Tuple[int, bytes, bytes]:
        try:
            with self.pool.session(target, timeout) as channel:
                channel.settimeout(timeout)
                channel.set_combine_stderr(combine)
                channel.exec_command(line)
                if stdin:
                    channel.sendall(stdin)
                channel.shutdown_write()
                output = _read_all(channel.recv, limit)
                errors = b"" if combine else _read_all(channel.recv_stderr, 0)
                if not channel.status_event.wait(timeout):
                    raise socket.timeout()
                code = channel.recv_exit_status()
        except UnavailableError:
            raise
        except socket.timeout:
            self.pool.fail_host(target.address, f"no answer within {timeout:g}s")
            raise UnavailableError(f"ssh {target}: no answer within {timeout:g}s") from None
        except Exception as error:  # paramiko's SSHException, EOFError, OSError: the connection broke
            raise UnavailableError(f"ssh {target}: {error or type(error).__name__}") from error
        if code < 0:  # the channel closed without an exit status: the connection was lost
            raise UnavailableError(f"ssh {target}: connection lost")
        return code, output, errors

    # -- resources

    async def probe(self) -> Tuple[NodeResources, Dict[str, str]]:
        """Capacity of the nodes that answer, and why each other node does not."""
        nodes = sorted(self.hosts)
        results = await asyncio.gather(*(self._node_capacity(node) for node in nodes), return_exceptions=True)
        capacity: NodeResources = {}
        errors: Dict[str, str] = {}
        for node, result in zip(nodes, results):
            if isinstance(result, BaseException):
                if not isinstance(result, (UnavailableError, ValueError)):
                    raise result
                errors[node] = str(result)
            else:
                capacity[node] = result
        return capacity, errors

    async def capacity(self) -> NodeResources:
        capacity, errors = await self.probe()
        for node, error in errors.items():
            log.warning("ssh_node_unavailable", cluster=self.cluster_name, node=node, error=error)
        return capacity

    async def _node_capacity(self, node: str) -> Resources:
        code, output, errors = await self._run(node, self.hosts[node].username, remote.CAPACITY,
                                               self.settings.drivers.gpu_probe_timeout)
        if code != 0:
            raise UnavailableError(f"node {node}: reading its resources failed: {errors.decode(errors='replace')}")
        return remote.parse_capacity(output.decode(errors="replace"))

    def running_usage(self) -> List[Tuple[str, Resources]]:
        return [(known.record.node, known.record.resources) for known in self._known.values()
                if known.state.phase == Phase.RUNNING]

    # -- states

    def _state_of(self, status: remote.RemoteStatus, record: SSHRecord) -> ReplicaState:
        if status.exit_code is not None:
            return ReplicaState(phase_for_exit(status.exit_code), exit_code=status.exit_code,
                                start_time=record.start_time, finish_time=status.finish_time, node=record.node,
                                message=STOPPED_MESSAGE if status.stopped else "")
        if status.alive:
            address = self.hosts[record.node].host if record.node in self.hosts else record.node
            endpoints = tuple(Endpoint(address, port, record.node) for port in record.ports)
            return ReplicaState(Phase.RUNNING, start_time=record.start_time, node=record.node, endpoints=endpoints)
        return ReplicaState(Phase.FAILED, start_time=record.start_time, node=record.node, message=LOST_MESSAGE)

    def _observe(self, handle: str, record: SSHRecord, state: ReplicaState, announce: bool = True) -> None:
        """Remember a replica's latest state and tell the status streams about a change
        (unless `announce` is False: adopt() returns the states it found instead)."""
        self._known[handle] = _Known(record, state)
        if announce:
            self._publish(handle, state)
        else:
            self._published[handle] = (state.phase, state.exit_code)
        self._ensure_poller()

    def _unreachable(self, handle: str, error: Exception) -> ReplicaState:
        known = self._known.get(handle)
        node = parse_handle(handle)[1]
        state = ReplicaState(Phase.UNKNOWN, start_time=known.record.start_time if known else None, node=node,
                             message=f"host unreachable: {error}")
        if known is not None and not known.state.finished:
            self._observe(handle, known.record, state)
        return state

    async def _read_status(self, node: str, account: str, keys: Sequence[str] = ()) -> Tuple[
            List[Tuple[str, SSHRecord, ReplicaState]], List[str]]:
        """States of `keys` (all replicas when empty) of one account on one node, and the keys
        that have no state there."""
        code, output, errors = await self._run(node, account, remote.STATUS, self._base(node), *keys)
        if code != 0:
            raise UnavailableError(f"node {node}: reading replica states failed: "
                                   f"{errors.decode(errors='replace').strip()}")
        text = output.decode(errors="replace")
        found = []
        for status in remote.parse_status(text):
            try:
                record = SSHRecord.from_json(status.record_json.encode())
            except (ValueError, TypeError) as error:
                log.warning("replica_record_unreadable", cluster=self.cluster_name, node=node, account=account,
                            replica=status.key, error=str(error))
                continue
            record.node, record.account = node, account  # where it was found is where it is
            found.append((make_handle(account, node, status.key), record, self._state_of(status, record)))
        return found, remote.missing_keys(text)

    # -- replicas

    async def start(self, replica: pb.Replica, replica_ips: Optional[Sequence[str]] = None) -> str:
        key = replica_key(replica)
        node = self._node_for(replica, key)
        user, account = self.account_for(replica, node)
        handle = make_handle(account, node, key)
        uid = replica.metadata.uid
        async with self._lock_for(key):
            for attempt in range(2):
                outcome, existing = await self._start_remote(node, account, key, user, replica, replica_ips)
                if outcome == "STARTED":
                    record = existing
                    log.info("replica_started", cluster=self.cluster_name, replica=key, node=node, account=account)
                    self._observe(handle, record, ReplicaState(
                        Phase.RUNNING, start_time=record.start_time, node=node,
                        endpoints=tuple(Endpoint(self.hosts[node].host, port, node) for port in record.ports)))
                    return handle
                if existing is not None and existing.uid == uid:
                    await self._refresh(node, account, [key])
                    return handle
                if attempt == 1 or (outcome == "BUSY" and existing is None):
                    raise ConflictError(f"replica {key} is being started by another driver instance")
                # The old Replica object is gone and a new one took its name (or left unreadable state).
                log.info("replica_replaced", cluster=self.cluster_name, replica=key,
                         old_uid=existing.uid if existing else None, uid=uid)
                await self._stop_remote(handle)
                await self._remove_remote(handle)
        raise AssertionError("unreachable")

    async def _start_remote(self, node: str, account: str, key: str, user: str, replica: pb.Replica,
                            replica_ips: Optional[Sequence[str]]) -> Tuple[str, Optional[SSHRecord]]:
        """Run START on the node: ("STARTED", new record) or ("BUSY" | "EXISTS", record found)."""
        template = replica.spec.template
        variables = replica_env(replica, replica_ips)
        record = SSHRecord(key=key, uid=replica.metadata.uid, node=node, resources=replica_resources(replica),
                           ports=list(template.ports), start_time=time.time(), user=user, account=account)
        payload = remote.start_payload(template.setup, template.run, variables, record.to_json())
        code, output, errors = await self._run(node, account, remote.START, self._base(node), key,
                                               wrapper_script(remote.LOCK_FD), stdin=payload)
        lines = output.decode(errors="replace").splitlines()
        if code != 0 or not lines:
            raise UnavailableError(f"starting replica {key} on node {node} failed (exit {code}): "
                                   f"{errors.decode(errors='replace').strip()}")
        outcome = lines[0]
        if outcome == "STARTED":
            return outcome, record
        found = None
        if len(lines) > 1:
            try:
                found = SSHRecord.from_json(lines[1].encode())
            except (ValueError, TypeError):
                found = None
        return outcome, found

    async def status(self, handle: str) -> ReplicaState:
        account, node, key = self._parse(handle)
        known = self._known.get(handle)
        if known is not None and known.state.finished:
            return known.state
        try:
            found, missing = await self._read_status(node, account, [key])
        except UnavailableError as error:
            return self._unreachable(handle, error)
        if missing or not found:
            raise NotFoundError(f"no replica {handle!r} on cluster {self.cluster_name}")
        _, record, state = found[0]
        self._observe(handle, record, state)
        return state

    async def _refresh(self, node: str, account: str, keys: Sequence[str]) -> None:
        """Read the states of known replicas of one (node, account) and publish changes."""
        try:
            found, missing = await self._read_status(node, account, keys)
        except UnavailableError as error:
            for key in keys:
                self._unreachable(make_handle(account, node, key), error)
            return
        for handle, record, state in found:
            self._observe(handle, record, state)
        for key in missing:
            # Its files were deleted on the host behind our back.
            handle = make_handle(account, node, key)
            known = self._known.pop(handle, None)
            if known is not None:
                self._publish(handle, ReplicaState(Phase.FAILED, start_time=known.record.start_time, node=node,
                                                   message="its files were removed from the host"))

    async def stop(self, handle: str) -> None:
        try:
            _, _, key = self._parse(handle)
        except NotFoundError:
            return
        async with self._lock_for(key):
            await self._stop_remote(handle)

    async def _stop_remote(self, handle: str) -> None:
        account, node, key = self._parse(handle)
        drivers = self.settings.drivers
        interval = drivers.stop_poll_interval
        timeout = (self.settings.ssh.command_timeout + drivers.pid_file_timeout + drivers.stop_grace_period
                   + drivers.kill_timeout)
        code, output, errors = await self._run(
            node, account, remote.STOP, self._base(node), key, remote.polls(drivers.pid_file_timeout, interval),
            drivers.stop_grace_period, drivers.kill_timeout, interval, timeout=timeout)
        result = output.decode(errors="replace").strip()
        if code == 3:
            raise UnavailableError(f"replica {key}: its wrapper recorded no pid within {drivers.pid_file_timeout}s")
        if code == 4:
            raise UnavailableError(f"replica {key}: its processes survived SIGKILL for {drivers.kill_timeout}s")
        if code != 0:
            raise UnavailableError(f"stopping replica {key} on node {node} failed (exit {code}): "
                                   f"{errors.decode(errors='replace').strip()}")
        if result in ("GONE", "FINISHED"):
            return
        if result == "KILLED":
            log.info("replica_kill", cluster=self.cluster_name, replica=key, grace_period=drivers.stop_grace_period)
        await self._refresh(node, account, [key])
        known = self._known.get(handle)
        log.info("replica_stopped", cluster=self.cluster_name, replica=key, node=node,
                 exit_code=known.state.exit_code if known else None)

    async def remove(self, handle: str) -> None:
        try:
            _, _, key = self._parse(handle)
        except NotFoundError:
            return
        async with self._lock_for(key):
            await self._stop_remote(handle)
            await self._remove_remote(handle)

    async def _remove_remote(self, handle: str) -> None:
        account, node, key = self._parse(handle)
        code, _, errors = await self._run(node, account, remote.REMOVE, self._base(node), key)
        if code != 0:
            raise UnavailableError(f"removing replica {key} on node {node} failed: "
                                   f"{errors.decode(errors='replace').strip()}")
        self._known.pop(handle, None)
        self._forget_published(handle)

    async def stop_all(self, user: Optional[str] = None) -> List[str]:
        """Stop every replica of this cluster, or only those `user` submitted; returns their
        handles. Other users' replicas, and anything else on the hosts, are left alone.
        UnavailableError (after stopping the rest) when a host could not be reached."""
        pairs = [(node, account) for node in sorted(self.hosts) for account in self.accounts(node)
                 if user is None or not self.user_map or account == self.user_map.get(user)]
        scans = await asyncio.gather(*(self._read_status(node, account) for node, account in pairs),
                                     return_exceptions=True)
        stopped, failures = [], []
        for (node, account), scan in zip(pairs, scans):
            if isinstance(scan, BaseException):
                if not isinstance(scan, UnavailableError):
                    raise scan
                failures.append(f"{account}@{node}: {scan}")
                continue
            for handle, record, state in scan[0]:
                if (user is None or record.user == user) and not state.finished:
                    await self.stop(handle)
                    stopped.append(handle)
        if failures:
            raise UnavailableError("could not reach " + "; ".join(failures))
        return stopped

    async def adopt(self) -> List[Tuple[str, str, ReplicaState]]:
        pairs = [(node, account) for node in sorted(self.hosts) for account in self.accounts(node)]
        scans = await asyncio.gather(*(self._read_status(node, account) for node, account in pairs),
                                     return_exceptions=True)
        adopted = []
        for (node, account), scan in zip(pairs, scans):
            if isinstance(scan, BaseException):
                if not isinstance(scan, UnavailableError):
                    raise scan
                # Its replicas are found once it answers again (see _poll).
                log.warning("ssh_adopt_unreachable", cluster=self.cluster_name, node=node, account=account,
                            error=str(scan))
                self._unscanned.add((node, account))
                continue
            for handle, record, state in scan[0]:
                self._observe(handle, record, state, announce=False)
                adopted.append((record.key, handle, state))
        self._ensure_poller()
        return sorted(adopted, key=lambda item: (item[0], item[1]))

    # -- watching

    def _ensure_poller(self) -> None:
        if self._poller is None and not self._closed:
            self._poller = asyncio.get_running_loop().create_task(self._poll_forever(),
                                                                  name=f"ssh-poll-{self.cluster_name}")

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.drivers.poll_interval)
            self._poll()

    def _poll(self) -> None:
        """Start a refresh of every (node, account) with replicas to watch, except those whose
        previous refresh is still waiting for a slow host: hosts never delay each other."""
        groups: Dict[Tuple[str, str], List[str]] = {}
        for known in self._known.values():
            if not known.state.finished:
                groups.setdefault((known.record.node, known.record.account), []).append(known.record.key)
        for pair in self._unscanned:
            groups.setdefault(pair, [])
        for (node, account), keys in groups.items():
            if (node, account) in self._refreshing:
                continue
            refresh = self._rescan(node, account) if (node, account) in self._unscanned \
                else self._refresh(node, account, keys)
            task = asyncio.get_running_loop().create_task(refresh)
            self._refreshing[(node, account)] = task
            task.add_done_callback(lambda done, pair=(node, account): self._refresh_done(pair, done))

    def _refresh_done(self, pair: Tuple[str, str], task: asyncio.Task) -> None:
        self._refreshing.pop(pair, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("ssh_refresh_failed", cluster=self.cluster_name, node=pair[0], account=pair[1],
                      error=repr(task.exception()))

    async def _rescan(self, node: str, account: str) -> None:
        try:
            found, _ = await self._read_status(node, account)
        except UnavailableError:
            return
        self._unscanned.discard((node, account))
        for handle, record, state in found:
            if handle not in self._known:
                log.info("replica_adopted", cluster=self.cluster_name, replica=record.key, node=node)
            self._observe(handle, record, state)

    # -- looking inside

    async def logs(self, handle: str, follow: bool = False) -> AsyncIterator[bytes]:
        account, node, key = self._parse(handle)
        drivers = self.settings.drivers
        line = remote.command(remote.LOGS, self._base(node), key, int(follow), drivers.log_follow_interval)
        async for chunk in self._stream(node, account, line, drivers.log_chunk_bytes, key):
            yield chunk

    async def _stream(self, node: str, account: str, line: str, chunk_bytes: int, key: str) -> AsyncIterator[bytes]:
        """The output of a long command, read as it arrives without holding a thread."""
        target = self._target(node, account)
        loop = asyncio.get_running_loop()
        timeout = self.settings.ssh.command_timeout
        channel, release = await loop.run_in_executor(self._executor, self.pool.open_channel, target)
        try:
            channel.set_combine_stderr(True)
            try:
                await asyncio.wait_for(loop.run_in_executor(self._executor, channel.exec_command, line), timeout)
            except asyncio.TimeoutError:
                self.pool.fail_host(target.address, f"no answer within {timeout:g}s")
                raise UnavailableError(f"ssh {target}: no answer within {timeout:g}s") from None
            except Exception as error:
                raise UnavailableError(f"ssh {target}: {error or type(error).__name__}") from error
            async for chunk in _read_channel(channel, chunk_bytes):
                yield chunk
            if not await loop.run_in_executor(self._executor, channel.status_event.wait, timeout):
                raise UnavailableError(f"ssh {target}: connection lost while streaming")
            code = channel.recv_exit_status()
            if code == remote.NOT_FOUND_EXIT:
                raise NotFoundError(f"no replica {key} on node {node} of cluster {self.cluster_name}")
            if code < 0:
                raise UnavailableError(f"ssh {target}: connection lost while streaming")
        finally:
            release()

    async def exec(self, handle: str, command: List[str]) -> Tuple[int, bytes]:
        account, node, key = self._parse(handle)
        if not command or not all(isinstance(arg, str) and "\0" not in arg for arg in command):
            raise InvalidError("command", "must be a non-empty list of strings without NUL characters")
        state = await self.status(handle)
        if state.phase == Phase.UNKNOWN:
            raise UnavailableError(f"replica {handle}: {state.message}")
        if state.phase != Phase.RUNNING:
            raise PreconditionError(f"replica {handle} is not running")
        drivers = self.settings.drivers
        began = time.monotonic()
        code, output, _ = await self._run(node, account, remote.EXEC, self._base(node), key, drivers.exec_timeout,
                                          *command, timeout=drivers.exec_timeout + self.settings.ssh.command_timeout,
                                          combine=True, limit=drivers.exec_max_output_bytes)
        if code == remote.NOT_FOUND_EXIT:
            raise NotFoundError(f"no replica {handle!r} on cluster {self.cluster_name}")
        if code == 137 and time.monotonic() - began >= drivers.exec_timeout:
            raise DeadlineError(f"exec in replica {handle} did not finish within {drivers.exec_timeout}s")
        return code, output

    # -- helpers

    def _parse(self, handle: str) -> Tuple[str, str, str]:
        account, node, key = parse_handle(handle)
        if node not in self.hosts or account not in self.accounts(node):
            raise NotFoundError(f"cluster {self.cluster_name} has no node {node!r} with account {account!r} "
                                f"(handle {handle!r})")
        return account, node, key

    async def close(self) -> None:
        self._closed = True
        if self._poller is not None:
            self._poller.cancel()
            try:
                await self._poller
            except asyncio.CancelledError:
                pass
            self._poller = None
        for task in list(self._refreshing.values()):
            task.cancel()
        await asyncio.gather(*self._refreshing.values(), return_exceptions=True)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.pool.close)
        self._executor.shutdown(wait=False, cancel_futures=True)
        await super().close()


def _read_all(recv, limit: int) -> bytes:
    """Read a channel stream to its end, keeping the first `limit` bytes (0: everything)."""
    kept = bytearray()
    dropped = 0
    while True:
        chunk = recv(64 * 1024)
        if not chunk:
            break
        if limit:
            room = limit - len(kept)
            kept += chunk[:max(0, room)]
            dropped += max(0, len(chunk) - max(0, room))
        else:
            kept += chunk
    if dropped:
        kept += f"\n[output truncated: {dropped} more bytes]\n".encode()
    return bytes(kept)


async def _read_channel(channel, chunk_bytes: int) -> AsyncIterator[bytes]:
    """Chunks of a paramiko channel's output until its end, woken by the channel's pollable
    descriptor (set by paramiko on data, end of file and close)."""
    loop = asyncio.get_running_loop()
    readable = asyncio.Event()
    fd = channel.fileno()
    loop.add_reader(fd, readable.set)
    try:
        while True:
            if channel.recv_ready():
                data = channel.recv(chunk_bytes)
                if data:
                    yield data
                    continue
            if channel.eof_received or channel.closed:
                return
            readable.clear()
            if channel.recv_ready() or channel.eof_received or channel.closed:
                continue
            await readable.wait()
    finally:
        loop.remove_reader(fd)
