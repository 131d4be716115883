"""The driver contract: what a skylet needs from the system a cluster runs on (DESIGN.md §5).

A driver is the boundary between SkyShift and one real system (processes on this machine, SSH
hosts, a simulation...). A skylet holds one driver per cluster and calls it from asyncio:

* ``capacity()`` / ``allocatable()``: resources per node, total and free.
* ``start(replica)`` -> handle, ``status(handle)``, ``watch_status()``, ``stop(handle)``,
  ``remove(handle)``: the life of a replica. ``start`` is idempotent: a replica already started
  (running or finished) is never started a second time, not even by another driver instance on
  the same state directory.
* ``logs(handle, follow)`` and ``exec(handle, command)``: looking inside a replica.
* ``adopt()``: after a skylet restart, every replica the previous instance left behind.

Handles are opaque strings that stay valid across driver instances (a new skylet finds them
again with ``adopt``). Drivers keep their state under ``$SKYSHIFT_HOME/clusters/<cluster>/``.
"""
from __future__ import annotations

import abc
import asyncio
import dataclasses
import enum
import weakref
from typing import AsyncIterator, Dict, FrozenSet, Iterable, List, Optional, Sequence, Set, Tuple

import grpc

from skyshift.api.errors import InvalidError, SkyShiftError
from skyshift.api.validation import DNS1123_LABEL, ENV_NAME, check_name
from skyshift.config import Settings
from skyshift.v1 import objects_pb2 as pb

#: node name -> resource name (cpus, memory MiB, gpus, disk MiB, accelerator) -> amount.
Resources = Dict[str, float]
NodeResources = Dict[str, Resources]

#: Capability names a driver may offer (reported in Cluster.status.capabilities).
LOGS = "logs"
EXEC = "exec"
IMAGES = "images"
SIMULATED = "simulated"

#: Environment variables SkyShift gives every replica; they win over the job's own `envs`.
JOB_NAME_ENV = "SKYSHIFT_JOB_NAME"
NAMESPACE_ENV = "SKYSHIFT_NAMESPACE"
REPLICA_NAME_ENV = "SKYSHIFT_REPLICA_NAME"
REPLICA_RANK_ENV = "SKYSHIFT_REPLICA_RANK"
NUM_REPLICAS_ENV = "SKYSHIFT_NUM_REPLICAS"
REPLICA_IPS_ENV = "SKYSHIFT_REPLICA_IPS"


class NotSupportedError(SkyShiftError):
    """The driver cannot do this (e.g. exec on a simulated cluster)."""

    code = grpc.StatusCode.UNIMPLEMENTED


class Phase(str, enum.Enum):
    """A replica's phase as a driver sees it (the values of ReplicaStatus.phase)."""

    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    #: The driver cannot tell (e.g. the host is unreachable).
    UNKNOWN = "UNKNOWN"


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """An address where a replica's port can be reached."""

    address: str
    port: int
    node: str


@dataclasses.dataclass(frozen=True)
class ReplicaState:
    """What a driver observes about one replica. Times are seconds since the epoch."""

    phase: Phase
    exit_code: Optional[int] = None
    start_time: Optional[float] = None
    finish_time: Optional[float] = None
    node: str = ""
    endpoints: Tuple[Endpoint, ...] = ()
    message: str = ""

    @property
    def finished(self) -> bool:
        return self.phase in (Phase.SUCCEEDED, Phase.FAILED)


def phase_for_exit(exit_code: int) -> Phase:
    return Phase.SUCCEEDED if exit_code == 0 else Phase.FAILED


# ---------------------------------------------------------------- reading a Replica


def replica_key(replica: pb.Replica) -> str:
    """"namespace/name" of a replica. Both parts must be DNS-1123 labels: they become path
    components of the replica's working directory, so anything else is refused."""
    check_name(replica.metadata.namespace, "metadata.namespace")
    check_name(replica.metadata.name, "metadata.name")
    return f"{replica.metadata.namespace}/{replica.metadata.name}"


def is_replica_key(text: str) -> bool:
    """Whether `text` has the form replica_key() produces."""
    parts = text.split("/")
    return len(parts) == 2 and all(len(part) <= 63 and DNS1123_LABEL.match(part) for part in parts)


def replica_resources(replica: pb.Replica) -> Resources:
    return {name: float(amount) for name, amount in replica.spec.template.resources.items()}


def num_replicas(replica: pb.Replica) -> int:
    template = replica.spec.template
    return template.replicas if template.HasField("replicas") else 1


def replica_env(replica: pb.Replica, replica_ips: Optional[Sequence[str]] = None) -> Dict[str, str]:
    """The variables a replica's process gets: the job's `envs`, then SkyShift's own.

    `replica_ips` are the addresses of all the job's replicas by rank (default: 127.0.0.1 for
    each, right for replicas on one machine). Values are passed through the process environment,
    never through a shell, so they arrive literally."""
    env: Dict[str, str] = {}
    for name, value in replica.spec.template.envs.items():
        if not ENV_NAME.match(name):
            raise InvalidError("spec.template.envs", f"{name!r} is not a valid environment variable name")
        if "\0" in value:
            raise InvalidError(f"spec.template.envs.{name}", "must not contain a NUL character")
        env[name] = value
    count = num_replicas(replica)
    ips = list(replica_ips) if replica_ips is not None else ["127.0.0.1"] * count
    job_name = replica.spec.job_name
    if "\0" in job_name:
        raise InvalidError("spec.job_name", "must not contain a NUL character")
    env.update({
        JOB_NAME_ENV: job_name,
        NAMESPACE_ENV: replica.metadata.namespace,
        REPLICA_NAME_ENV: replica.metadata.name,
        REPLICA_RANK_ENV: str(replica.spec.rank),
        NUM_REPLICAS_ENV: str(count),
        REPLICA_IPS_ENV: ",".join(ips),
    })
    return env


def subtract_usage(capacity: NodeResources, usage: Iterable[Tuple[str, Resources]]) -> NodeResources:
    """Capacity minus what replicas use, per node. Resources a node does not have are ignored;
    amounts never go below zero (an over-committed node simply has nothing free)."""
    free = {node: dict(resources) for node, resources in capacity.items()}
    for node, resources in usage:
        node_free = free.get(node)
        if node_free is None:
            continue
        for name, amount in resources.items():
            if name in node_free:
                node_free[name] = max(0.0, node_free[name] - amount)
    return free


# ---------------------------------------------------------------- the contract


class StatusStream:
    """Changes of replica states, as (handle, ReplicaState), from the moment it was created.
    Ends when the driver is closed or the stream's `aclose()` is called."""

    _END = object()

    def __init__(self, driver: "Driver"):
        self._driver = driver
        self._queue: "asyncio.Queue[object]" = asyncio.Queue()

    def __aiter__(self) -> "StatusStream":
        return self

    async def __anext__(self) -> Tuple[str, ReplicaState]:
        item = await self._queue.get()
        if item is self._END:
            raise StopAsyncIteration
        return item  # type: ignore[return-value]

    def _put(self, item: object) -> None:
        self._queue.put_nowait(item)

    async def aclose(self) -> None:
        self._driver._streams.discard(self)
        self._put(self._END)


class Driver(abc.ABC):
    """One cluster's driver. Subclasses implement the abstract methods; every method is called
    from the skylet's event loop."""

    #: The Cluster `spec.manager` value this driver serves.
    manager: str = ""
    #: What this driver can do, from LOGS, EXEC, IMAGES, SIMULATED.
    capabilities: FrozenSet[str] = frozenset()

    def __init__(self, cluster: pb.Cluster, settings: Settings):
        check_name(cluster.metadata.name, "cluster.metadata.name")
        self.cluster = cluster
        self.cluster_name = cluster.metadata.name
        self.settings = settings
        #: Everything this driver writes for its cluster lives under this directory.
        self.state_path = settings.clusters_dir / self.cluster_name
        self._streams: Set[StatusStream] = set()
        self._published: Dict[str, Tuple[Phase, Optional[int]]] = {}
        # One lock per replica key while someone uses it: start, stop and remove of a replica
        # never interleave.
        self._key_locks: "weakref.WeakValueDictionary[str, asyncio.Lock]" = weakref.WeakValueDictionary()

    def _lock_for(self, key: str) -> asyncio.Lock:
        lock = self._key_locks.get(key)
        if lock is None:
            lock = asyncio.Lock()
            self._key_locks[key] = lock
        return lock

    # -- resources

    @abc.abstractmethod
    async def capacity(self) -> NodeResources:
        """Total resources per node: {node: {"cpus": 8.0, "memory": 32000.0 (MiB), ...}}."""

    async def allocatable(self) -> NodeResources:
        """Capacity minus what this driver's running replicas use, per node."""
        return subtract_usage(await self.capacity(), self.running_usage())

    @abc.abstractmethod
    def running_usage(self) -> List[Tuple[str, Resources]]:
        """(node, resources) of every replica this driver currently runs."""

    # -- replicas

    @abc.abstractmethod
    async def start(self, replica: pb.Replica, replica_ips: Optional[Sequence[str]] = None) -> str:
        """Start `replica` and return its handle. Idempotent: if this replica (same key and uid)
        was already started, running or finished, return its handle and start nothing.
        `replica_ips`: addresses of the job's replicas by rank, for SKYSHIFT_REPLICA_IPS."""

    @abc.abstractmethod
    async def status(self, handle: str) -> ReplicaState:
        """The replica's current state; NotFoundError for an unknown handle."""

    def watch_status(self) -> StatusStream:
        """A stream of (handle, ReplicaState) for every phase change from now on. Subscribe
        before calling adopt()/start() so no change is missed."""
        stream = StatusStream(self)
        self._streams.add(stream)
        return stream

    @abc.abstractmethod
    async def stop(self, handle: str) -> None:
        """Stop the replica: SIGTERM to all its processes, SIGKILL after the grace period.
        Idempotent: stopping a finished replica or an unknown handle does nothing."""

    @abc.abstractmethod
    async def remove(self, handle: str) -> None:
        """Stop the replica if it runs, then forget it: its state, logs and files are deleted.
        Idempotent."""

    @abc.abstractmethod
    def logs(self, handle: str, follow: bool = False) -> AsyncIterator[bytes]:
        """The replica's output (stdout and stderr) as chunks of bytes, also after it finished.
        With `follow`, keeps streaming new output until the replica has finished."""

    async def exec(self, handle: str, command: List[str]) -> Tuple[int, bytes]:
        """Run `command` (argv, no shell) beside a running replica: (exit code, output)."""
        raise NotSupportedError(f"the {self.manager} driver cannot exec commands in replicas")

    @abc.abstractmethod
    async def adopt(self) -> List[Tuple[str, str, ReplicaState]]:
        """Every replica found under the state directory, as (replica key "namespace/name",
        handle, state): those still running, and those that finished while nobody watched.
        Running ones are watched from now on, so their exits reach watch_status()."""

    async def close(self) -> None:
        """Release watchers and end status streams. Replicas keep running."""
        for stream in list(self._streams):
            await stream.aclose()

    # -- for subclasses

    def _publish(self, handle: str, state: ReplicaState) -> None:
        """Tell every status stream about `state`, unless it repeats the last phase sent."""
        signature = (state.phase, state.exit_code)
        if self._published.get(handle) == signature:
            return
        self._published[handle] = signature
        for stream in list(self._streams):
            stream._put((handle, state))

    def _forget_published(self, handle: str) -> None:
        self._published.pop(handle, None)
