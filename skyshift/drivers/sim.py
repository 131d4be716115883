"""The sim driver: a SIMULATED cluster for scale tests and benchmarks. Nothing runs.

A sim cluster has `spec.simulation.nodes` identical nodes with `spec.simulation.node_resources`
(default: one node with DEFAULT_NODE_RESOURCES). A replica "runs" on the first node with room
for its resources (or the node the scheduler bound it to) and counts against that node's
allocatable resources until it "exits":

* after ``SIM_DURATION`` seconds (a float in the job's `envs`; without it, it runs until
  stopped), with exit code ``SIM_EXIT_CODE`` (default 0);
* or when stopped, with exit code 143 (as if SIGTERM had ended it).

Its `setup` and `run` are never executed. Its logs say that it is simulated, its capabilities
include "simulated", and its endpoints carry the node's name instead of a reachable address.
Replicas are records on disk like the local driver's, so adopt() after a restart works alike.
"""
from __future__ import annotations

import asyncio
import dataclasses
import datetime
import math
import signal
import time
from typing import AsyncIterator, Dict, Mapping, Optional, Sequence, Tuple

import structlog

from skyshift.api.errors import InvalidError, LimitError
from skyshift.config import Settings
from skyshift.drivers.base import (
    LOGS, SIMULATED, Endpoint, NodeResources, Phase, ReplicaState, Resources, phase_for_exit,
    replica_resources, subtract_usage,
)
from skyshift.drivers.records import RecordedDriver, ReplicaRecord
from skyshift.v1 import objects_pb2 as pb

log = structlog.get_logger(__name__)

DURATION_ENV = "SIM_DURATION"
EXIT_CODE_ENV = "SIM_EXIT_CODE"
#: Resources of each simulated node when the cluster does not set spec.simulation.node_resources.
DEFAULT_NODE_RESOURCES: Resources = {"cpus": 8.0, "memory": 32768.0, "disk": 102400.0}
STOPPED_EXIT_CODE = 128 + signal.SIGTERM
SIMULATED_MESSAGE = "simulated: nothing runs"


@dataclasses.dataclass
class SimRecord(ReplicaRecord):
    #: Seconds it "runs"; None: until stopped.
    duration: Optional[float] = None
    exit_code: int = 0
    #: When it was stopped (seconds since the epoch), if it was.
    stop_time: Optional[float] = None


# ---------------------------------------------------------------- pure helpers


def sim_parameters(envs: Mapping[str, str]) -> Tuple[Optional[float], int]:
    """(duration in seconds or None for "until stopped", exit code) from a job's envs."""
    duration: Optional[float] = None
    if envs.get(DURATION_ENV, "") != "":
        try:
            duration = float(envs[DURATION_ENV])
        except ValueError:
            duration = -1.0
        if not math.isfinite(duration) or duration < 0:
            raise InvalidError(f"spec.template.envs.{DURATION_ENV}",
                               f"must be a number of seconds >= 0, got {envs[DURATION_ENV]!r}")
    exit_code = 0
    if envs.get(EXIT_CODE_ENV, "") != "":
        try:
            exit_code = int(envs[EXIT_CODE_ENV])
        except ValueError:
            exit_code = -1
        if not 0 <= exit_code <= 255:
            raise InvalidError(f"spec.template.envs.{EXIT_CODE_ENV}",
                               f"must be an exit code 0-255, got {envs[EXIT_CODE_ENV]!r}")
    return duration, exit_code


def sim_nodes(cluster: pb.Cluster) -> NodeResources:
    """The simulated nodes of a cluster: node-0, node-1... each with the same resources."""
    simulation = cluster.spec.simulation
    resources = dict(simulation.node_resources) or dict(DEFAULT_NODE_RESOURCES)
    return {f"node-{index}": dict(resources) for index in range(simulation.nodes or 1)}


def choose_node(requested: str, resources: Resources, free: NodeResources) -> str:
    """The node a replica "runs" on: `requested` if set (it must have room), else the first
    node with room. LimitError when there is none: a real cluster could not run it either."""
    if requested and requested not in free:
        raise InvalidError("spec.node", f"the simulated cluster has no node {requested!r}")
    for node in [requested] if requested else list(free):
        if all(free[node].get(name, 0.0) >= amount for name, amount in resources.items() if amount > 0):
            return node
    where = f"node {requested}" if requested else "any node"
    raise LimitError(f"simulated cluster: {where} lacks room for {resources}")


def sim_state(record: SimRecord, now: float) -> ReplicaState:
    """A simulated replica's state at time `now` (seconds since the epoch)."""
    end = record.start_time + record.duration if record.duration is not None else math.inf
    common = dict(start_time=record.start_time, node=record.node, message=SIMULATED_MESSAGE)
    if record.stop_time is not None and record.stop_time < end:
        return ReplicaState(Phase.FAILED, exit_code=STOPPED_EXIT_CODE, finish_time=record.stop_time,
                            **common)
    if now >= end:
        return ReplicaState(phase_for_exit(record.exit_code), exit_code=record.exit_code, finish_time=end,
                            **common)
    endpoints = tuple(Endpoint(record.node, port, record.node) for port in record.ports)
    return ReplicaState(Phase.RUNNING, endpoints=endpoints, **common)


def _timestamp(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).isoformat(timespec="milliseconds")


# ---------------------------------------------------------------- the driver


class SimDriver(RecordedDriver):
    """A simulated cluster (see the module docstring): replicas are timed records, no process."""

    manager = "sim"
    capabilities = frozenset({LOGS, SIMULATED})
    record_type = SimRecord

    def __init__(self, cluster: pb.Cluster, settings: Settings):
        super().__init__(cluster, settings)
        self._nodes = sim_nodes(cluster)
        #: The timer that ends each replica with a duration.
        self._timers: Dict[str, asyncio.TimerHandle] = {}
        #: Set when a replica ends (or is forgotten), for logs(follow=True).
        self._ended: Dict[str, asyncio.Event] = {}

    async def capacity(self) -> NodeResources:
        return {node: dict(resources) for node, resources in self._nodes.items()}

    def _launch(self, key: str, replica: pb.Replica, replica_ips: Optional[Sequence[str]]) -> None:
        duration, exit_code = sim_parameters(replica.spec.template.envs)
        resources = replica_resources(replica)
        node = choose_node(replica.spec.node, resources, subtract_usage(self._nodes, self.running_usage()))
        record = SimRecord(key=key, uid=replica.metadata.uid, node=node, resources=resources,
                           ports=list(replica.spec.template.ports), start_time=time.time(), duration=duration,
                           exit_code=exit_code)
        self.files.create(key)
        self.files.write(record)
        self._records[key] = record
        log.info("replica_started", cluster=self.cluster_name, replica=key, node=node, simulated=True)
        self._publish(key, self._state(record))
        self._track(key)

    def _state(self, record: ReplicaRecord) -> ReplicaState:
        return sim_state(record, time.time())

    def _track(self, key: str) -> None:
        record = self._records.get(key)
        if record is None or key in self._timers:
            return
        state = self._state(record)
        if state.finished:
            self._publish(key, state)
            self._signal_ended(key)
        elif record.duration is not None:
            remaining = record.start_time + record.duration - time.time()
            self._timers[key] = asyncio.get_running_loop().call_later(max(0.0, remaining), self._on_timer, key)

    def _on_timer(self, key: str) -> None:
        self._timers.pop(key, None)
        self._track(key)

    def _untrack(self, key: str) -> None:
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        self._signal_ended(key)

    def _signal_ended(self, key: str) -> None:
        event = self._ended.pop(key, None)
        if event is not None:
            event.set()

    async def _stop_locked(self, key: str) -> None:
        record = self._records[key]
        if self._state(record).finished:
            return
        record.stop_time = time.time()
        self.files.write(record)
        self._untrack(key)
        log.info("replica_stopped", cluster=self.cluster_name, replica=key, simulated=True)
        self._publish(key, self._state(record))

    async def logs(self, handle: str, follow: bool = False) -> AsyncIterator[bytes]:
        record = self._record(handle)
        yield (f"[simulated] SkyShift sim driver: nothing runs. Replica {record.key} \"started\" on "
               f"simulated node {record.node} at {_timestamp(record.start_time)}.\n").encode()
        state = self._state(record)
        if follow and not state.finished:
            event = self._ended.setdefault(record.key, asyncio.Event())
            await event.wait()
            state = self._state(record)
        if state.finished:
            how = " (stopped)" if record.stop_time is not None else ""
            yield (f"[simulated] Replica {record.key} \"exited\" with code {state.exit_code}{how} at "
                   f"{_timestamp(state.finish_time or 0.0)}.\n").encode()
