"""The skylet: the agent of one cluster, or of many simulated ones (DESIGN.md §5).

For every cluster it serves, the skylet holds the cluster's driver and

* heartbeats the Cluster's status every `skylet.heartbeat_interval` (and soon after a replica
  starts or ends): phase READY (NOT_READY while the driver cannot reach the cluster), capacity
  and allocatable per node, heartbeat_time, the driver's capabilities, and the address of its
  SkyletService (agent_endpoint) through which the API server relays logs and exec;
* watches the Replicas bound to the cluster (`spec.cluster`), starts those the scheduler bound
  (phase SCHEDULED), stops those being deleted or evicted, and reports what the driver
  observes (phase, exit code, start and finish time, endpoints, handle) into Replica status.

Replicas it started carry the finalizer `skyshift.dev/skylet`, so a deleted Replica disappears
only once its processes are stopped. After a restart the skylet calls `driver.adopt()` first:
what the previous skylet started is found again (the driver's records and the Replica's
status.handle are the truth) and never started a second time; what belongs to no Replica any
more is stopped and forgotten.

Every write is a compare-and-swap on resource_version; on a conflict the skylet re-reads the
object and applies its change again.
"""
from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import structlog
from google.protobuf import timestamp_pb2
from google.protobuf.message import Message

from skyshift import config
from skyshift.api.errors import ConflictError, NotFoundError, SkyShiftError, UnavailableError
from skyshift.client import AsyncClient
from skyshift.drivers import get_driver
from skyshift.drivers.base import Driver, ReplicaState, subtract_usage
from skyshift.runtime import Controller, InformerFactory, clone, key_of
from skyshift.api.conditions import FALSE, TRUE, now, set_condition
from skyshift.api.wellknown import SKYLET_FINALIZER
from skyshift.v1 import objects_pb2 as pb

from skylet import gateway_hook, service

log = structlog.get_logger(__name__)

REPLICA_FINALIZER = SKYLET_FINALIZER
READY_CONDITION = "Ready"
#: Replica phases nobody changes any more (EVICTED is written by the cluster controller).
TERMINAL_PHASES = frozenset({"SUCCEEDED", "FAILED", "EVICTED"})
#: Phases of a bound Replica the skylet has not started yet.
STARTABLE_PHASES = frozenset({"", "PENDING", "SCHEDULED"})
#: Times a write is re-read and retried after a conflict before the key is re-queued.
CONFLICT_ATTEMPTS = 5
LOST_MESSAGE = "lost: the cluster's driver has no record of this replica"


def timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


@dataclasses.dataclass(frozen=True)
class Selection:
    """The clusters a skylet serves: those named, or every cluster of one manager (how one
    skylet serves all simulated clusters as they come and go)."""

    names: Tuple[str, ...] = ()
    manager: str = ""

    def __post_init__(self) -> None:
        if bool(self.names) == bool(self.manager):
            raise ValueError("a skylet serves either named clusters or the clusters of one manager")

    def cluster_field_selector(self) -> str:
        if self.manager:
            return f"spec.manager={self.manager}"
        return f"metadata.name={self.names[0]}" if len(self.names) == 1 else ""

    def replica_field_selector(self) -> str:
        return f"spec.cluster={self.names[0]}" if len(self.names) == 1 else ""

    def serves(self, cluster: pb.Cluster) -> bool:
        if self.manager:
            return cluster.spec.manager == self.manager
        return cluster.metadata.name in self.names


# ---------------------------------------------------------------- status from driver states


def apply_replica_state(replica: pb.Replica, state: ReplicaState, handle: str) -> bool:
    """Write the driver's view of a replica into `replica.status`; False when nothing changed
    or the phase is already terminal (a finished or evicted replica is never revived)."""
    status = replica.status
    if status.phase in TERMINAL_PHASES:
        return False
    before = pb.ReplicaStatus()
    before.CopyFrom(status)
    status.phase = state.phase.value
    status.handle = handle
    if state.exit_code is not None:
        status.exit_code = state.exit_code
    if state.start_time:
        status.start_time.CopyFrom(timestamp(state.start_time))
    if state.finish_time:
        status.finish_time.CopyFrom(timestamp(state.finish_time))
    status.message = state.message
    del status.endpoints[:]
    for endpoint in state.endpoints:
        status.endpoints.add(address=endpoint.address, port=endpoint.port, node=endpoint.node)
    status.observed_generation = replica.metadata.generation
    return status != before


def apply_failure(replica: pb.Replica, message: str, handle: str = "") -> bool:
    """Mark a replica FAILED because it could not be started or was lost."""
    if replica.status.phase in TERMINAL_PHASES:
        return False
    replica.status.phase = "FAILED"
    replica.status.message = message
    replica.status.handle = handle
    replica.status.finish_time.CopyFrom(now())
    return True


def set_resources(field, resources: Dict[str, Dict[str, float]]) -> None:
    """Replace a map<string, ResourceMap> field with node -> resources."""
    field.clear()
    for node, amounts in resources.items():
        field[node].resources.update(amounts)


async def _write_retrying(client: AsyncClient, obj: Message, mutate: Callable[[Message], bool], kind: str,
                         status: bool) -> Optional[Message]:
    """Apply `mutate` to a copy of `obj` and write it (its status when `status`); on a conflict
    re-read the object and apply `mutate` again. Returns the written object, or None when
    `mutate` found nothing to change. NotFoundError when the object is gone; ConflictError
    after CONFLICT_ATTEMPTS."""
    write = client.update_status if status else client.update
    current = obj
    for _ in range(CONFLICT_ATTEMPTS):
        updated = clone(current)
        if not mutate(updated):
            return None
        try:
            return await write(updated)
        except ConflictError:
            current = await client.get(kind, current.metadata.name, current.metadata.namespace or None)
    raise ConflictError(f"{kind} {current.metadata.name} kept changing while the skylet wrote it")


async def update_status_retrying(client: AsyncClient, obj: Message, mutate: Callable[[Message], bool],
                                 kind: str) -> Optional[Message]:
    return await _write_retrying(client, obj, mutate, kind, status=True)


async def update_retrying(client: AsyncClient, obj: Message, mutate: Callable[[Message], bool],
                          kind: str) -> Optional[Message]:
    """Like update_status_retrying, for metadata (finalizers)."""
    return await _write_retrying(client, obj, mutate, kind, status=False)


# ---------------------------------------------------------------- one cluster


class ClusterAgent:
    """One cluster's driver and the handles of the replicas it runs there."""

    def __init__(self, cluster: pb.Cluster, driver: Driver):
        self.name = cluster.metadata.name
        self.generation = cluster.metadata.generation
        self.driver = driver
        self.handles: Dict[str, str] = {}   # replica key -> driver handle
        self._keys: Dict[str, str] = {}     # driver handle -> replica key
        self._pump: Optional[asyncio.Task] = None

    def remember(self, key: str, handle: str) -> None:
        self.handles[key] = handle
        self._keys[handle] = key

    def forget(self, key: str) -> None:
        handle = self.handles.pop(key, None)
        if handle is not None:
            self._keys.pop(handle, None)

    async def open(self, on_change: Callable[[str, ReplicaState], None]) -> List[str]:
        """Subscribe to the driver's status changes, then adopt what a previous skylet left;
        returns the keys of the adopted replicas."""
        stream = self.driver.watch_status()  # before adopt(), so no exit is missed

        async def pump() -> None:
            async for handle, state in stream:
                key = self._keys.get(handle)
                if key is not None:
                    on_change(key, state)

        self._pump = asyncio.get_running_loop().create_task(pump(), name=f"driver-status-{self.name}")
        adopted = await self.driver.adopt()
        for key, handle, state in adopted:
            self.remember(key, handle)
        log.info("replicas_adopted", cluster=self.name, count=len(adopted),
                 running=sum(1 for _, _, state in adopted if not state.finished))
        return [key for key, _, _ in adopted]

    async def close(self) -> None:
        """Stop watching; the replicas keep running (a new skylet adopts them)."""
        await self.driver.close()
        if self._pump is not None:
            self._pump.cancel()
            await asyncio.gather(self._pump, return_exceptions=True)


# ---------------------------------------------------------------- the skylet


class ClusterSync(Controller):
    """Opens an agent (driver + adoption) for every served cluster, and closes it when the
    cluster goes; a changed cluster spec gets a fresh driver."""

    name = "skylet-clusters"

    def __init__(self, skylet: "Skylet"):
        super().__init__(skylet.client, skylet.informers, skylet.settings)
        self.skylet = skylet
        self.clusters = self.informer("clusters", field_selector=skylet.selection.cluster_field_selector())
        self.enqueue_on_change(self.clusters)

    async def reconcile(self, key: str) -> Optional[float]:
        skylet = self.skylet
        cluster = self.clusters.get(key)
        agent = skylet.agents.get(key)
        wanted = cluster is not None and skylet.selection.serves(cluster)
        if agent is not None and (not wanted or agent.generation != cluster.metadata.generation):
            del skylet.agents[key]
            await agent.close()
            log.info("cluster_released", cluster=key)
            agent = None
        if not wanted or agent is not None:
            return None
        driver = get_driver(cluster.spec.manager, cluster, self.settings)
        agent = ClusterAgent(cluster, driver)
        try:
            adopted = await agent.open(skylet.on_driver_state)
        except BaseException:
            await agent.close()
            raise
        skylet.agents[key] = agent
        log.info("cluster_served", cluster=key, manager=cluster.spec.manager)
        # Publish this skylet's address before its replicas change, so logs of a replica that
        # just finished are never asked of the previous skylet.
        await skylet.heartbeats.beat_safely([agent])
        skylet.replica_sync.enqueue_cluster(key, adopted)
        return None


class ReplicaSync(Controller):
    """Reconciles each Replica bound to a served cluster with what its driver runs."""

    name = "skylet-replicas"

    def __init__(self, skylet: "Skylet"):
        super().__init__(skylet.client, skylet.informers, skylet.settings)
        self.skylet = skylet
        self.replicas = self.informer("replicas", field_selector=skylet.selection.replica_field_selector())
        self.replicas.add_index("cluster", lambda r: [r.spec.cluster] if r.spec.cluster else [])
        self.enqueue_on_change(self.replicas)

    def enqueue_cluster(self, cluster: str, extra_keys: Iterable[str] = ()) -> None:
        for replica in self.replicas.by_index("cluster", cluster):
            self.queue.add(key_of(replica.metadata.namespace, replica.metadata.name))
        for key in extra_keys:
            self.queue.add(key)

    def _agent_for(self, key: str, replica: Optional[pb.Replica]) -> Optional[ClusterAgent]:
        if replica is not None:
            return self.skylet.agents.get(replica.spec.cluster)
        # Deleted: whichever agent still holds a handle for it (adopted orphans too).
        return next((agent for agent in self.skylet.agents.values() if key in agent.handles), None)

    async def reconcile(self, key: str) -> Optional[float]:
        replica = self.replicas.get(key)
        agent = self._agent_for(key, replica)
        if agent is None:
            return None  # not ours, or its cluster's agent is not open yet (it enqueues it then)
        handle = agent.handles.get(key)
        if replica is None:
            if handle is not None:
                await self._remove(agent, key, handle)
            return None
        if replica.metadata.HasField("deletion_timestamp"):
            if handle is not None:
                await self._remove(agent, key, handle)
            await self._release(replica)
            return None
        phase = replica.status.phase
        if phase in TERMINAL_PHASES:
            if handle is not None:
                await self._stop_if_running(agent, key, handle, phase)
            return None
        if phase in STARTABLE_PHASES:
            handle = await self._start(agent, key, replica)
            if handle is None:
                return None
        else:
            handle = handle or replica.status.handle
            if not handle:
                await update_status_retrying(self.client, replica, lambda r: apply_failure(r, LOST_MESSAGE),
                                             "replicas")
                return None
        try:
            state = await agent.driver.status(handle)
        except NotFoundError:
            await update_status_retrying(self.client, replica, lambda r: apply_failure(r, LOST_MESSAGE, handle),
                                         "replicas")
            return None
        agent.remember(key, handle)
        written = await update_status_retrying(self.client, replica,
                                               lambda r: apply_replica_state(r, state, handle), "replicas")
        if written is not None and written.status.phase != phase:
            log.info("replica_phase", cluster=agent.name, replica=key, phase=written.status.phase,
                     previous=phase or "PENDING", exit_code=state.exit_code)
        if REPLICA_FINALIZER not in replica.metadata.finalizers:
            await update_retrying(self.client, written or replica, _add_finalizer, "replicas")
        return None

    async def _start(self, agent: ClusterAgent, key: str, replica: pb.Replica) -> Optional[str]:
        """Start the replica (idempotent in the driver); None when it cannot start at all, in
        which case it is marked FAILED with the reason."""
        try:
            handle = await agent.driver.start(await self.skylet.gateways.prepare(replica))
        except (UnavailableError, ConflictError):
            raise  # transient: retried with backoff
        except SkyShiftError as error:
            log.warning("replica_start_failed", cluster=agent.name, replica=key, error=error.message)
            await update_status_retrying(self.client, replica,
                                         lambda r: apply_failure(r, f"cannot start: {error.message}"), "replicas")
            return None
        agent.remember(key, handle)
        self.skylet.heartbeats.poke()
        return handle

    async def _stop_if_running(self, agent: ClusterAgent, key: str, handle: str, phase: str) -> None:
        """A finished replica may still run here, e.g. when it was evicted while its cluster was
        unreachable: stop it (its logs stay until the Replica is deleted)."""
        try:
            state = await agent.driver.status(handle)
        except NotFoundError:
            agent.forget(key)
            return
        if not state.finished:
            log.info("replica_stop", cluster=agent.name, replica=key, phase=phase)
            await agent.driver.stop(handle)
            self.skylet.heartbeats.poke()

    async def _remove(self, agent: ClusterAgent, key: str, handle: str) -> None:
        log.info("replica_remove", cluster=agent.name, replica=key)
        await agent.driver.remove(handle)
        agent.forget(key)
        self.skylet.heartbeats.poke()

    async def _release(self, replica: pb.Replica) -> None:
        try:
            await update_retrying(self.client, replica, _remove_finalizer, "replicas")
        except NotFoundError:
            pass  # gone already


def _add_finalizer(replica: pb.Replica) -> bool:
    if replica.metadata.HasField("deletion_timestamp") or REPLICA_FINALIZER in replica.metadata.finalizers:
        return False
    replica.metadata.finalizers.append(REPLICA_FINALIZER)
    return True


def _remove_finalizer(replica: pb.Replica) -> bool:
    if REPLICA_FINALIZER not in replica.metadata.finalizers:
        return False
    replica.metadata.finalizers.remove(REPLICA_FINALIZER)
    return True


class ApiLostError(Exception):
    """The API server has not answered for skylet.api_lost_timeout seconds."""


class Heartbeats:
    """Writes every served cluster's status, all in one batch, every heartbeat interval and
    shortly after `poke()` (a replica started or ended, so allocatable changed). Raises
    ApiLostError when the API server stays unreachable for skylet.api_lost_timeout seconds."""

    def __init__(self, skylet: "Skylet"):
        self.skylet = skylet
        self.settings = skylet.settings.skylet
        self._poked = asyncio.Event()
        self._answered_at = time.monotonic()
        #: The last version of each cluster this skylet wrote (newer than the cache for a moment).
        self._written: Dict[str, pb.Cluster] = {}

    def poke(self) -> None:
        self._poked.set()

    async def run(self) -> None:
        last_beat = time.monotonic()
        while True:
            # heartbeat_interval is a period: the time the last beat took to write counts.
            wait = max(0.0, last_beat + self.settings.heartbeat_interval - time.monotonic())
            try:
                await asyncio.wait_for(self._poked.wait(), wait)
                await asyncio.sleep(self.settings.heartbeat_debounce)  # let a burst of changes settle
            except asyncio.TimeoutError:
                pass
            self._poked.clear()
            last_beat = time.monotonic()
            silent = await self.beat_safely()
            if silent > self.settings.api_lost_timeout:
                raise ApiLostError(f"the API server has not answered for {silent:.0f}s")

    async def beat_safely(self, agents: Optional[List[ClusterAgent]] = None) -> float:
        """Heartbeat, logging failures; returns for how long the API server has not answered."""
        try:
            await self.beat(agents)
            self._answered_at = time.monotonic()
        except UnavailableError as error:
            log.warning("heartbeat_failed", error=error.message,
                        api_silent_for=round(time.monotonic() - self._answered_at, 1))
        except SkyShiftError as error:
            self._answered_at = time.monotonic()  # it answered, with an error
            log.warning("heartbeat_failed", error=error.message)
        return time.monotonic() - self._answered_at

    def _current(self, name: str) -> Optional[pb.Cluster]:
        cached = self.skylet.cluster_sync.clusters.get(name)
        written = self._written.get(name)
        if cached is None:
            return None
        if written is not None and written.metadata.resource_version > cached.metadata.resource_version:
            return written
        return cached

    async def beat(self, agents: Optional[List[ClusterAgent]] = None) -> None:
        """Write the status of the given clusters (default: all served), in batches."""
        agents = list(self.skylet.agents.values()) if agents is None else agents
        reports = await asyncio.gather(*(self._report(agent) for agent in agents))
        updates, mutators = [], {}
        for agent, mutate in zip(agents, reports):
            cluster = self._current(agent.name)
            if cluster is None:
                continue
            updated = clone(cluster)
            mutate(updated)
            updates.append(updated)
            mutators[agent.name] = mutate
        if not updates:
            await self.skylet.client.list("clusters", limit=1)  # nothing to write: still check the API answers
        chunk = self.skylet.settings.api.max_batch_items
        for start in range(0, len(updates), chunk):
            batch = updates[start:start + chunk]
            results = await self.skylet.client.batch_update(batch, status=True)
            for sent, result in zip(batch, results):
                name = sent.metadata.name
                if result.error is None:
                    self._written[name] = result.object
                elif isinstance(result.error, ConflictError):
                    await self._retry(name, mutators[name])
                elif not isinstance(result.error, NotFoundError):
                    log.warning("heartbeat_write_failed", cluster=name, error=result.error.message)

    async def _retry(self, name: str, mutate: Callable[[pb.Cluster], bool]) -> None:
        try:
            fresh = await self.skylet.client.get("clusters", name)
            self._written[name] = await update_status_retrying(
                self.skylet.client, fresh, mutate, "clusters")
        except NotFoundError:
            pass
        except ConflictError as error:
            log.warning("heartbeat_write_failed", cluster=name, error=error.message)

    async def _report(self, agent: ClusterAgent) -> Callable[[pb.Cluster], bool]:
        """Ask the driver for capacity; returns how to write it into a Cluster's status."""
        try:
            capacity = await asyncio.wait_for(agent.driver.capacity(), self.settings.probe_timeout)
            # What Driver.allocatable() computes, without asking the cluster for capacity twice.
            allocatable = subtract_usage(capacity, agent.driver.running_usage())
            # Drivers leave out the nodes they cannot reach (ssh): none at all is an outage.
            problem = None if capacity else "no node of the cluster answers"
        except (SkyShiftError, OSError, asyncio.TimeoutError) as error:
            capacity = allocatable = None
            problem = getattr(error, "message", None) or str(error) or type(error).__name__
            log.warning("cluster_unreachable", cluster=agent.name, error=problem)
        capabilities = sorted(agent.driver.capabilities)
        endpoint = self.skylet.endpoint

        def mutate(cluster: pb.Cluster) -> bool:
            status = cluster.status
            status.heartbeat_time.CopyFrom(now())
            status.agent_endpoint = endpoint
            del status.capabilities[:]
            status.capabilities.extend(capabilities)
            if problem is None:
                set_resources(status.capacity, capacity)
                set_resources(status.allocatable, allocatable)
            if cluster.metadata.HasField("deletion_timestamp"):
                status.phase = "DELETING"  # the cluster controller's phase, message and conditions stay
            elif problem is None:
                status.phase = "READY"
                status.message = ""
                set_condition(status.conditions, READY_CONDITION, TRUE, "SkyletHeartbeat",
                              "the skylet reaches the cluster", cluster.metadata.generation)
            else:
                status.phase = "NOT_READY"
                status.message = f"the skylet cannot reach the cluster: {problem}"
                set_condition(status.conditions, READY_CONDITION, FALSE, "ClusterUnreachable", status.message,
                              cluster.metadata.generation)
            return True  # heartbeat_time moved: always a write

        return mutate


class Skylet:
    """The agent process: serves the selected clusters until cancelled."""

    def __init__(self, client: AsyncClient, selection: Selection, settings: Optional[config.Settings] = None):
        self.client = client
        self.selection = selection
        self.settings = settings or client.settings
        self.informers = InformerFactory(client, self.settings.controllers)
        self.agents: Dict[str, ClusterAgent] = {}
        self.endpoint = ""
        self.cluster_sync = ClusterSync(self)
        self.replica_sync = ReplicaSync(self)
        self.heartbeats = Heartbeats(self)
        self.gateways = gateway_hook.GatewayHook(self)

    def on_driver_state(self, key: str, state: ReplicaState) -> None:
        self.replica_sync.queue.add(key)
        self.heartbeats.poke()

    def locate(self, namespace: str, name: str) -> Tuple[Driver, str]:
        """The driver of a replica this skylet serves and its handle there ("" while it has
        not been started) for SkyletService."""
        key = key_of(namespace, name)
        replica = self.replica_sync.replicas.get(key)
        agent = self.agents.get(replica.spec.cluster) if replica is not None else None
        if agent is None:
            raise NotFoundError(f"replica {key} is not on a cluster this skylet serves")
        return agent.driver, agent.handles.get(key) or replica.status.handle

    async def _resync_running(self) -> None:
        """A safety net beside the drivers' status streams: re-check running replicas now and then."""
        while True:
            await asyncio.sleep(self.settings.skylet.status_poll_interval)
            for agent in list(self.agents.values()):
                for key in list(agent.handles):
                    replica = self.replica_sync.replicas.get(key)
                    if replica is None or replica.status.phase not in TERMINAL_PHASES:
                        self.replica_sync.queue.add(key)

    async def run(self) -> None:
        server, self.endpoint = await service.serve(self.locate, self.settings.skylet.listen)
        log.info("skylet_started", endpoint=self.endpoint, clusters=list(self.selection.names),
                 manager=self.selection.manager)
        tasks = [asyncio.get_running_loop().create_task(coroutine, name=name) for name, coroutine in (
            ("cluster-sync", self.cluster_sync.run()), ("replica-sync", self.replica_sync.run()),
            ("heartbeats", self.heartbeats.run()), ("resync-running", self._resync_running()),
            ("gateways", self.gateways.run()))]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            # Half the time the supervisor waits before SIGKILL: open log streams are cut after it.
            await server.stop(self.settings.skylet.stop_timeout / 2)
            await self.informers.stop()
            for agent in list(self.agents.values()):
                await agent.close()
            self.agents.clear()
            log.info("skylet_stopped")
