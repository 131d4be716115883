"""The Scheduler against a real etcd and API server; the test plays the clusters (Cluster
objects with READY status and per-node capacity) and the skylets (replica status).

The scheduler acts on every Cluster and every pending Replica of the API server, so each test
gets its own etcd and API server: nothing another test left behind can take its capacity.
"""
from __future__ import annotations

import asyncio
import collections
import uuid
from typing import Dict, List, Mapping, Optional, Sequence

import pytest

from skyshift.client import AsyncClient
from skyshift.store.embedded import EmbeddedEtcd
from skyshift.v1 import objects_pb2 as pb
from tests.conftest import ServerThread, async_wait_for, make_settings

from scheduler.scheduler import Scheduler

FAST = {"scheduler": {"unschedulable_retry_delay": 0.05}, "controllers": {"queue_backoff_initial": 0.01}}


@pytest.fixture
def isolated_api(tmp_path):
    etcd = EmbeddedEtcd(tmp_path / "etcd", fast=True)
    etcd.start()
    try:
        etcd.wait_healthy(20)
        server = ServerThread(make_settings(tmp_path / "home", **FAST), etcd.endpoint).start()
        try:
            yield server
        finally:
            server.stop()
    finally:
        etcd.stop(kill=True)


@pytest.fixture
async def api(isolated_api):
    async with AsyncClient(endpoint=isolated_api.endpoint, settings=isolated_api.settings) as client:
        yield client


def caches_synced(scheduler: Scheduler) -> bool:
    return all(informer.has_synced for informer in
               (scheduler.clusters, scheduler.replicas, scheduler.policies, scheduler.jobs))


class Running:
    """A Scheduler running as a task of the test's event loop."""

    def __init__(self, client: AsyncClient):
        self.scheduler = Scheduler(client)
        self.task: Optional[asyncio.Task] = None

    async def start(self) -> Scheduler:
        self.task = asyncio.get_running_loop().create_task(self.scheduler.run())
        await async_wait_for(lambda: caches_synced(self.scheduler) or self.task.done(),
                             message="scheduler caches synced")
        return self.scheduler

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)


@pytest.fixture
async def start_scheduler(api):
    running: List[Running] = []

    async def start() -> Scheduler:
        runner = Running(api)
        running.append(runner)
        return await runner.start()

    yield start
    for runner in running:
        await runner.stop()


# ---------------------------------------------------------------------------- playing the clusters


async def add_cluster(client: AsyncClient, name: str, nodes: int = 1, cpus: float = 8, memory: float = 16384,
                      labels: Optional[Mapping[str, str]] = None, phase: str = "READY",
                      capabilities: Sequence[str] = ("images", "logs")) -> pb.Cluster:
    cluster = pb.Cluster(metadata=pb.ObjectMeta(name=name, labels=labels or {}))
    cluster.spec.manager = "sim"
    cluster = await client.create(cluster)
    cluster.status.phase = phase
    cluster.status.capabilities.extend(capabilities)
    for index in range(nodes):
        node = f"{name}-n{index}"
        cluster.status.capacity[node].resources.update({"cpus": cpus, "memory": memory})
        cluster.status.allocatable[node].resources.update({"cpus": cpus, "memory": memory})
    return await client.update_status(cluster)


async def set_cluster_phase(client: AsyncClient, name: str, phase: str) -> None:
    cluster = await client.get("clusters", name)
    cluster.status.phase = phase
    await client.update_status(cluster)


def replica_obj(namespace: str, name: str, job: str = "", cpus: float = 1, labels: Optional[Mapping[str, str]] = None,
                gang: bool = False, replicas: int = 1, placement: Optional[pb.Placement] = None,
                image: str = "") -> pb.Replica:
    obj = pb.Replica(metadata=pb.ObjectMeta(name=name, namespace=namespace, labels=labels or {}))
    obj.spec.job_name = job or name
    obj.spec.template.resources["cpus"] = cpus
    obj.spec.template.replicas = replicas
    obj.spec.template.gang = gang
    obj.spec.template.image = image
    obj.spec.template.run = "sleep 1"
    if placement is not None:
        obj.spec.template.placement.CopyFrom(placement)
    return obj


async def add_replicas(client: AsyncClient, objects: Sequence[pb.Replica]) -> None:
    for start in range(0, len(objects), 1000):
        results = await client.batch_create(objects[start:start + 1000])
        assert all(item.error is None for item in results), [item.error for item in results if item.error]


async def replicas_of(client: AsyncClient, namespace: str) -> List[pb.Replica]:
    return (await client.list_all("replicas", namespace)).items


def scheduled_condition(replica: pb.Replica) -> Optional[pb.Condition]:
    return next((c for c in replica.status.conditions if c.type == "Scheduled"), None)


async def wait_bound(client: AsyncClient, namespace: str, count: int, timeout: float = 20.0) -> List[pb.Replica]:
    async def enough():
        items = await replicas_of(client, namespace)
        bound = [r for r in items if r.spec.cluster and r.status.phase == "SCHEDULED"]
        return bound if len(bound) >= count else None

    return await async_wait_for(enough, timeout, interval=0.05, message=f"{count} replicas bound in {namespace}")


async def wait_unschedulable(client: AsyncClient, namespace: str, name: str, contains: str = "",
                             reason: str = "Unschedulable") -> pb.Condition:
    async def marked():
        replica = await client.get("replicas", name, namespace)
        condition = scheduled_condition(replica)
        if (condition is not None and condition.status == "False" and condition.reason == reason
                and contains in condition.message and not replica.spec.cluster):
            return condition
        return None

    return await async_wait_for(marked, 20.0, interval=0.05, message=f"{name} marked {reason} ({contains!r})")


def count_by_cluster(replicas: Sequence[pb.Replica]) -> Dict[str, int]:
    return dict(collections.Counter(r.spec.cluster for r in replicas if r.spec.cluster))


def term(name: str, labels: Dict[str, str], weight: int = 0) -> pb.PlacementTerm:
    return pb.PlacementTerm(name=name, match_labels=labels, weight=weight)


# ---------------------------------------------------------------------------- tests


async def test_pending_replica_is_bound_marked_scheduled_and_an_event_recorded(api, namespace_name, start_scheduler):
    await add_cluster(api, "c1", nodes=2)
    await start_scheduler()
    await add_replicas(api, [replica_obj(namespace_name, "web-0", job="web", cpus=2)])
    (replica,) = await wait_bound(api, namespace_name, 1)
    assert replica.spec.cluster == "c1" and replica.spec.node in ("c1-n0", "c1-n1")
    condition = scheduled_condition(replica)
    assert condition.status == "True" and condition.reason == "Scheduled"

    async def event():
        events = (await api.list_all("events", namespace_name)).items
        return [e for e in events if e.spec.involved_name == "web-0" and e.spec.reason == "Scheduled"]

    (recorded,) = await async_wait_for(event, 10, message="Scheduled event")
    assert recorded.spec.message == f"bound to cluster c1, node {replica.spec.node}"


async def test_a_burst_never_overcommits_and_the_rest_say_why(api, namespace_name, start_scheduler):
    await add_cluster(api, "east", nodes=8, cpus=8)
    await add_cluster(api, "west", nodes=8, cpus=8)
    await start_scheduler()
    await add_replicas(api, [replica_obj(namespace_name, f"r-{i}") for i in range(200)])
    await wait_bound(api, namespace_name, 128)

    async def settled():
        items = await replicas_of(api, namespace_name)
        waiting = [r for r in items if not r.spec.cluster and (scheduled_condition(r) or pb.Condition()).reason]
        return items if len(waiting) == 72 else None

    items = await async_wait_for(settled, 20, interval=0.05, message="72 replicas marked unschedulable")
    bound = [r for r in items if r.spec.cluster]
    assert len(bound) == 128
    assert count_by_cluster(bound) == {"east": 64, "west": 64}
    per_node = collections.Counter(r.spec.node for r in bound)
    assert set(per_node.values()) == {8}, "no node holds more than its 8 cpus"
    message = scheduled_condition(next(r for r in items if not r.spec.cluster)).message
    assert message == ("east, west: NodeFit (insufficient cpus: need 1, max free on a node 0)")


async def test_replica_that_fits_nowhere_waits_until_a_cluster_appears(api, namespace_name, start_scheduler):
    await add_cluster(api, "small", cpus=2)
    await add_cluster(api, "booting", cpus=64, phase="PROVISIONING")
    await start_scheduler()
    await add_replicas(api, [replica_obj(namespace_name, "big", cpus=4)])
    condition = await wait_unschedulable(api, namespace_name, "big")
    assert condition.message == ("booting: ClusterNotReady (phase PROVISIONING); "
                                 "small: NodeFit (insufficient cpus: need 4, max free on a node 2)")
    replica = await api.get("replicas", "big", namespace_name)
    assert replica.status.phase == "PENDING"
    failed = [e for e in (await api.list_all("events", namespace_name)).items if e.spec.reason == "FailedScheduling"]
    assert failed and failed[0].spec.type == "Warning"

    await add_cluster(api, "large", cpus=16)
    (replica,) = await wait_bound(api, namespace_name, 1)
    assert replica.spec.cluster == "large"


async def test_cluster_becoming_ready_schedules_waiting_replicas(api, namespace_name, start_scheduler):
    await add_cluster(api, "later", cpus=8, phase="INIT")
    await start_scheduler()
    await add_replicas(api, [replica_obj(namespace_name, "r")])
    await wait_unschedulable(api, namespace_name, "r", "later: ClusterNotReady (phase INIT)")
    await set_cluster_phase(api, "later", "READY")
    (replica,) = await wait_bound(api, namespace_name, 1)
    assert replica.spec.cluster == "later"


async def test_capacity_freed_by_a_finished_replica_is_reused(api, namespace_name, start_scheduler):
    await add_cluster(api, "tiny", cpus=2)
    await start_scheduler()
    await add_replicas(api, [replica_obj(namespace_name, f"r-{i}") for i in range(3)])
    bound = await wait_bound(api, namespace_name, 2)
    waiting = next(r.metadata.name for r in await replicas_of(api, namespace_name) if not r.spec.cluster)
    await wait_unschedulable(api, namespace_name, waiting, "NodeFit")
    finished = bound[0]  # the test's skylet reports it done
    finished.status.phase = "SUCCEEDED"
    await api.update_status(finished)
    replica = await async_wait_for(lambda: _bound_now(api, namespace_name, waiting), 20, message="reuse")
    assert replica.spec.cluster == "tiny"


async def _bound_now(client: AsyncClient, namespace: str, name: str) -> Optional[pb.Replica]:
    replica = await client.get("replicas", name, namespace)
    return replica if replica.spec.cluster else None


async def test_running_replicas_are_not_counted_twice(api, namespace_name, start_scheduler):
    """Once the skylet's reports of allocatable subtract a running replica, the scheduler stops
    holding that replica itself, so the accounting is exact again."""
    await add_cluster(api, "c", cpus=4)
    await start_scheduler()
    await add_replicas(api, [replica_obj(namespace_name, "a", cpus=3)])
    (running,) = await wait_bound(api, namespace_name, 1)
    running.status.phase = "RUNNING"
    await api.update_status(running)
    for _ in range(2):  # two heartbeats: the second was surely measured after the start
        cluster = await api.get("clusters", "c")
        cluster.status.allocatable["c-n0"].resources["cpus"] = 1  # 4 - the running replica's 3
        cluster.status.heartbeat_time.GetCurrentTime()
        await api.update_status(cluster)
    await add_replicas(api, [replica_obj(namespace_name, "b", cpus=1)])
    replica = await async_wait_for(lambda: _bound_now(api, namespace_name, "b"), 20, message="b bound")
    assert replica.spec.cluster == "c"
    await add_replicas(api, [replica_obj(namespace_name, "c", cpus=1)])
    await wait_unschedulable(api, namespace_name, "c", "c: NodeFit (insufficient cpus: need 1, max free on a node 0)")


async def test_replicas_of_a_job_spread_over_clusters(api, namespace_name, start_scheduler):
    for name in ("a", "b", "c"):
        await add_cluster(api, name, cpus=32)
    await start_scheduler()
    await add_replicas(api, [replica_obj(namespace_name, f"train-{i}", job="train", replicas=6) for i in range(6)])
    bound = await wait_bound(api, namespace_name, 6)
    assert count_by_cluster(bound) == {"a": 2, "b": 2, "c": 2}


async def test_preferences_pick_the_preferred_cluster(api, namespace_name, start_scheduler):
    await add_cluster(api, "plain", cpus=32)
    await add_cluster(api, "gpu", cpus=8, labels={"accelerator": "a100"})
    await start_scheduler()
    placement = pb.Placement(preferences=[term("a100", {"accelerator": "a100"}, weight=80)])
    await add_replicas(api, [replica_obj(namespace_name, f"p-{i}", job="p", replicas=4, placement=placement)
                             for i in range(4)])
    bound = await wait_bound(api, namespace_name, 4)
    assert count_by_cluster(bound) == {"gpu": 4}


async def test_placement_filters_restrict_clusters(api, namespace_name, start_scheduler):
    await add_cluster(api, "us", cpus=32, labels={"region": "us"})
    await add_cluster(api, "eu", cpus=2, labels={"region": "eu"})
    await start_scheduler()
    placement = pb.Placement(filters=[term("eu-only", {"region": "eu"})])
    await add_replicas(api, [replica_obj(namespace_name, f"f-{i}", placement=placement) for i in range(3)])
    bound = await wait_bound(api, namespace_name, 2)
    assert count_by_cluster(bound) == {"eu": 2}
    waiting = next(r.metadata.name for r in await replicas_of(api, namespace_name) if not r.spec.cluster)
    condition = await wait_unschedulable(api, namespace_name, waiting)
    assert condition.message == ("eu: NodeFit (insufficient cpus: need 1, max free on a node 0); "
                                 "us: PlacementFilters (labels do not match filter 'eu-only')")


async def test_filter_policy_include_and_exclude(api, namespace_name, start_scheduler):
    for name in ("c1", "c2", "c3"):
        await add_cluster(api, name, cpus=32)
    include = pb.FilterPolicy(metadata=pb.ObjectMeta(name="only-c2-c3", namespace=namespace_name))
    include.spec.labels_selector["team"] = "ml"
    include.spec.cluster_filter.include.extend(["c2", "c3"])
    exclude = pb.FilterPolicy(metadata=pb.ObjectMeta(name="never-c3", namespace=namespace_name))
    exclude.spec.labels_selector["team"] = "ml"
    exclude.spec.cluster_filter.exclude.append("c3")
    await api.create(include)
    await api.create(exclude)
    await start_scheduler()
    await add_replicas(api, [replica_obj(namespace_name, f"ml-{i}", job="ml", replicas=4, labels={"team": "ml"})
                             for i in range(4)]
                       + [replica_obj(namespace_name, f"web-{i}", job="web", replicas=3, labels={"team": "web"})
                          for i in range(3)])
    bound = await wait_bound(api, namespace_name, 7)
    assert count_by_cluster([r for r in bound if r.metadata.labels["team"] == "ml"]) == {"c2": 4}
    assert count_by_cluster([r for r in bound if r.metadata.labels["team"] == "web"]) == {"c1": 1, "c2": 1, "c3": 1}


async def test_gang_is_placed_all_or_nothing(api, namespace_name, start_scheduler):
    await add_cluster(api, "g1", cpus=4)
    await add_cluster(api, "g2", cpus=4)
    await start_scheduler()
    await add_replicas(api, [replica_obj(namespace_name, f"gang-{i}", job="gang", cpus=3, gang=True, replicas=3)
                             for i in range(3)])
    for index in range(3):
        condition = await wait_unschedulable(api, namespace_name, f"gang-{index}", "gang")
        assert condition.message.startswith(f"gang {namespace_name}/gang: replica ")
        assert "so none of the 3 pending replicas is placed: g1, g2: NodeFit" in condition.message
    assert count_by_cluster(await replicas_of(api, namespace_name)) == {}
    await add_cluster(api, "g3", cpus=4)
    bound = await wait_bound(api, namespace_name, 3)
    assert count_by_cluster(bound) == {"g1": 1, "g2": 1, "g3": 1}


async def test_gang_waits_until_all_its_replicas_exist(api, namespace_name, start_scheduler):
    await add_cluster(api, "big", cpus=64)
    await start_scheduler()
    members = [replica_obj(namespace_name, f"m-{i}", job="m", gang=True, replicas=3) for i in range(3)]
    await add_replicas(api, members[:2])
    condition = await wait_unschedulable(api, namespace_name, "m-0", reason="WaitingForGang")
    assert condition.message == (f"gang {namespace_name}/m: 2 of its 3 replicas exist; "
                                 "they are placed together once all exist")
    assert count_by_cluster(await replicas_of(api, namespace_name)) == {}
    await add_replicas(api, members[2:])
    await wait_bound(api, namespace_name, 3)


async def test_replicas_created_before_the_scheduler_started_are_scheduled(api, namespace_name, start_scheduler):
    await add_cluster(api, "early", nodes=2, cpus=8)
    await add_replicas(api, [replica_obj(namespace_name, f"old-{i}") for i in range(10)])
    await start_scheduler()
    bound = await wait_bound(api, namespace_name, 10)
    assert count_by_cluster(bound) == {"early": 10}


async def test_a_restarted_scheduler_still_counts_bound_replicas(api, namespace_name):
    await add_cluster(api, "full", cpus=4)
    first = Running(api)
    await first.start()
    try:
        await add_replicas(api, [replica_obj(namespace_name, f"r-{i}") for i in range(4)])
        await wait_bound(api, namespace_name, 4)
    finally:
        await first.stop()
    second = Running(api)
    await second.start()
    try:
        await add_replicas(api, [replica_obj(namespace_name, "one-more")])
        await wait_unschedulable(api, namespace_name, "one-more",
                                 "full: NodeFit (insufficient cpus: need 1, max free on a node 0)")
    finally:
        await second.stop()


async def test_a_conflict_requeues_only_that_replica(api, namespace_name):
    """The cache holds a stale copy of one replica: its bind fails with a conflict and is
    retried, while the other replica of the batch is bound."""
    await add_cluster(api, "c", cpus=8)
    await add_replicas(api, [replica_obj(namespace_name, name) for name in ("stale", "fresh")])
    scheduler = Scheduler(api)
    scheduler.informers.start()
    await async_wait_for(lambda: caches_synced(scheduler), message="caches synced")
    await scheduler.replicas.stop()  # freeze the replica cache
    stale = await api.get("replicas", "stale", namespace_name)
    stale.metadata.labels["touched"] = "yes"
    await api.update(stale)

    await scheduler.schedule_batch([f"{namespace_name}/stale", f"{namespace_name}/fresh"])
    assert (await api.get("replicas", "fresh", namespace_name)).spec.cluster == "c"
    assert not (await api.get("replicas", "stale", namespace_name)).spec.cluster
    assert scheduler.queue.num_requeues(f"{namespace_name}/stale") == 1
    assert scheduler.ledger.assignment(f"{namespace_name}/stale") is None, "its capacity is not held"
    await scheduler.informers.stop()

    runner = Running(api)
    await runner.start()
    try:
        await wait_bound(api, namespace_name, 2)
    finally:
        await runner.stop()


@pytest.fixture
async def namespace_name(api):
    name = f"t-{uuid.uuid4().hex[:10]}"
    await api.create(pb.Namespace(metadata=pb.ObjectMeta(name=name)))
    return name
