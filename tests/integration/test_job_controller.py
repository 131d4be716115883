"""The Job controller against a real API server: the test plays the scheduler (binding Replicas
to clusters) and the skylets (reporting Replica phases through update_status)."""
from __future__ import annotations

import asyncio
import copy
import time
import uuid
from typing import Dict, List

import pytest

from controllers.job import FINALIZER, JOB_LABEL, UNBOUND, JobController, replica_name
from skyshift.api.errors import ConflictError, NotFoundError
from skyshift.client import AsyncClient
from skyshift.api.conditions import get_condition
from skyshift.v1 import objects_pb2 as pb
from tests.conftest import async_wait_for

BACKOFF = 0.2  # job_restart_backoff_initial for these tests


@pytest.fixture
async def controller(aclient: AsyncClient, api_server, namespace):
    settings = copy.deepcopy(api_server.settings)
    settings.controllers.job_restart_backoff_initial = BACKOFF
    settings.controllers.job_restart_backoff_max = 10 * BACKOFF
    job_controller = JobController(aclient, settings=settings, namespace=namespace)
    task = asyncio.ensure_future(job_controller.run())
    yield job_controller
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


@pytest.fixture
async def clusters(aclient: AsyncClient):
    """make(name) creates a Cluster object (deleted after the test); names are unique per test."""
    made: List[str] = []
    suffix = uuid.uuid4().hex[:6]

    async def make(name: str) -> str:
        cluster = pb.Cluster()
        cluster.metadata.name = f"{name}-{suffix}"
        cluster.spec.manager = "sim"
        await aclient.create(cluster)
        made.append(cluster.metadata.name)
        return cluster.metadata.name

    yield make
    for name in made:
        try:
            await aclient.delete("clusters", name)
        except NotFoundError:
            pass


def new_job(name: str, namespace: str, replicas: int = 1, restart_policy: str = "Always", backoff_limit: int = 6,
            **labels) -> pb.Job:
    job = pb.Job()
    job.metadata.name = name
    job.metadata.namespace = namespace
    job.metadata.labels.update(labels)
    job.spec.run = "python train.py"
    job.spec.resources["cpus"] = 1
    job.spec.replicas = replicas
    job.spec.restart_policy = restart_policy
    job.spec.backoff_limit = backoff_limit
    return job


async def modify(client: AsyncClient, kind: str, name: str, namespace: str, change):
    """Read, change and update an object, again if the controller wrote it in between."""
    while True:
        obj = await client.get(kind, name, namespace)
        change(obj)
        try:
            return await client.update(obj)
        except ConflictError:
            continue


async def replicas_of(client: AsyncClient, namespace: str, job: str) -> Dict[str, pb.Replica]:
    listed = await client.list("replicas", namespace, label_selector=f"{JOB_LABEL}={job}")
    return {r.metadata.name: r for r in listed.items}


async def wait_replica_names(client: AsyncClient, namespace: str, job: str, names, timeout: float = 10.0):
    async def check():
        current = await replicas_of(client, namespace, job)
        return current if sorted(current) == sorted(names) else None
    return await async_wait_for(check, timeout, message=f"replicas of {job} to be {sorted(names)}")


async def wait_job(client: AsyncClient, namespace: str, name: str, predicate, message: str, timeout: float = 10.0):
    async def check():
        job = await client.get("jobs", name, namespace)
        return job if predicate(job) else None
    return await async_wait_for(check, timeout, message=message)


async def bind(client: AsyncClient, namespace: str, name: str, cluster: str) -> pb.Replica:
    """What the scheduler does."""
    replica = await client.get("replicas", name, namespace)
    replica.spec.cluster = cluster
    replica.spec.node = "node-0"
    replica = await client.update(replica)
    replica.status.phase = "SCHEDULED"
    return await client.update_status(replica)


async def report(client: AsyncClient, namespace: str, name: str, phase: str, exit_code: int = 0) -> pb.Replica:
    """What a skylet does."""
    replica = await client.get("replicas", name, namespace)
    replica.status.phase = phase
    replica.status.exit_code = exit_code
    return await client.update_status(replica)


async def wait_events(client: AsyncClient, namespace: str, reasons):
    async def recorded():
        return set(reasons) <= {e.spec.reason for e in (await client.list("events", namespace)).items}
    await async_wait_for(recorded, message=f"events {sorted(reasons)}")


def counts(job: pb.Job) -> Dict[str, Dict[str, int]]:
    return {cluster: dict(phases.counts) for cluster, phases in job.status.replica_status.items()}


async def test_replicas_are_created_with_names_labels_and_owner(aclient, namespace, controller, clusters):
    cluster = await clusters("c1")
    job = await aclient.create(new_job("web", namespace, replicas=3, app="web", team="x"))
    replicas = await wait_replica_names(aclient, namespace, "web", ["web-0", "web-1", "web-2"])
    for rank in range(3):
        replica = replicas[f"web-{rank}"]
        assert dict(replica.metadata.labels) == {"app": "web", "team": "x", JOB_LABEL: "web"}
        [owner] = replica.metadata.owner_references
        assert (owner.kind, owner.name, owner.uid, owner.controller) == ("Job", "web", job.metadata.uid, True)
        assert replica.spec.job_name == "web" and replica.spec.rank == rank
        assert replica.spec.template == job.spec
        assert replica.status.phase == "PENDING"

    job = await wait_job(aclient, namespace, "web", lambda j: counts(j) == {UNBOUND: {"PENDING": 3}},
                         "pending counts")
    assert FINALIZER in job.metadata.finalizers
    assert job.status.phase == "PENDING" and job.status.observed_generation == job.metadata.generation

    for name in replicas:
        await bind(aclient, namespace, name, cluster)
    job = await wait_job(aclient, namespace, "web", lambda j: counts(j) == {cluster: {"SCHEDULED": 3}},
                         "all replicas scheduled")
    assert job.status.phase == "SCHEDULED"
    assert get_condition(job.status.conditions, "Scheduled").status == "True"

    await report(aclient, namespace, "web-0", "RUNNING")
    job = await wait_job(aclient, namespace, "web", lambda j: counts(j) == {cluster: {"RUNNING": 1, "SCHEDULED": 2}},
                         "one replica running")
    assert job.status.phase == "RUNNING"
    assert job.status.HasField("start_time")
    ready = get_condition(job.status.conditions, "Ready")
    assert (ready.status, ready.message) == ("False", "1/3 replicas running")
    for name in ("web-1", "web-2"):
        await report(aclient, namespace, name, "RUNNING")
    job = await wait_job(aclient, namespace, "web", lambda j: get_condition(j.status.conditions, "Ready").status
                         == "True", "Ready")
    assert counts(job) == {cluster: {"RUNNING": 3}}

    # Level-triggered and idempotent: with nothing changing, nothing is written.
    settled = job.metadata.resource_version
    controller.queue.add(f"{namespace}/web")
    await asyncio.sleep(0.3)
    assert (await aclient.get("jobs", "web", namespace)).metadata.resource_version == settled
    assert sorted(await replicas_of(aclient, namespace, "web")) == ["web-0", "web-1", "web-2"]


async def test_scale_up_and_down(aclient, namespace, controller):
    await aclient.create(new_job("scale", namespace, replicas=2))
    await wait_replica_names(aclient, namespace, "scale", ["scale-0", "scale-1"])

    await modify(aclient, "jobs", "scale", namespace, lambda job: setattr(job.spec, "replicas", 5))
    await wait_replica_names(aclient, namespace, "scale", [f"scale-{rank}" for rank in range(5)])

    job = await modify(aclient, "jobs", "scale", namespace, lambda job: setattr(job.spec, "replicas", 2))
    await wait_replica_names(aclient, namespace, "scale", ["scale-0", "scale-1"])
    job = await wait_job(aclient, namespace, "scale",
                         lambda j: j.status.observed_generation == job.metadata.generation
                         and counts(j) == {UNBOUND: {"PENDING": 2}}, "status of the scaled-down job")
    await wait_events(aclient, namespace, {"ReplicasCreated", "ReplicasDeleted"})


async def test_restart_policy_always_replaces_exited_replicas_after_backoff(aclient, namespace, controller, clusters):
    cluster = await clusters("c1")
    await aclient.create(new_job("svc", namespace, replicas=2, restart_policy="Always"))
    await wait_replica_names(aclient, namespace, "svc", ["svc-0", "svc-1"])
    for name in ("svc-0", "svc-1"):
        await bind(aclient, namespace, name, cluster)
        await report(aclient, namespace, name, "RUNNING")

    exited = time.monotonic()
    await report(aclient, namespace, "svc-0", "SUCCEEDED")
    replicas = await wait_replica_names(aclient, namespace, "svc", ["svc-0r1", "svc-1"])
    assert time.monotonic() - exited >= BACKOFF * 0.9, "a restart waits for the backoff"
    fresh = replicas["svc-0r1"]
    assert fresh.spec.rank == 0 and fresh.status.phase == "PENDING" and not fresh.spec.cluster
    job = await wait_job(aclient, namespace, "svc", lambda j: j.status.restarts == 1, "one restart")
    assert job.status.phase == "RUNNING"

    await report(aclient, namespace, "svc-1", "FAILED", exit_code=3)
    await wait_replica_names(aclient, namespace, "svc", ["svc-0r1", "svc-1r1"])
    await wait_job(aclient, namespace, "svc", lambda j: j.status.restarts == 2, "two restarts")
    await wait_events(aclient, namespace, {"ReplicaReplaced"})


async def test_restart_policy_on_failure_backs_off_then_fails_the_job(aclient, namespace, controller, clusters):
    cluster = await clusters("c1")
    await aclient.create(new_job("flaky", namespace, replicas=2, restart_policy="OnFailure", backoff_limit=2))
    await wait_replica_names(aclient, namespace, "flaky", ["flaky-0", "flaky-1"])
    await bind(aclient, namespace, "flaky-1", cluster)
    await report(aclient, namespace, "flaky-1", "SUCCEEDED")  # success is never restarted under OnFailure

    waited = []
    current = "flaky-0"
    for attempt in (1, 2):
        await bind(aclient, namespace, current, cluster)
        await report(aclient, namespace, current, "RUNNING")
        failed_at = time.monotonic()
        await report(aclient, namespace, current, "FAILED", exit_code=1)
        current = replica_name("flaky", 0, attempt)
        await wait_replica_names(aclient, namespace, "flaky", [current, "flaky-1"])
        waited.append(time.monotonic() - failed_at)
    # The second restart waits twice as long as the first.
    assert waited[0] >= BACKOFF * 0.9 and waited[1] >= 2 * BACKOFF * 0.9

    await bind(aclient, namespace, current, cluster)
    await report(aclient, namespace, current, "FAILED", exit_code=1)
    job = await wait_job(aclient, namespace, "flaky", lambda j: j.status.phase == "FAILED", "the job to fail")
    failed = get_condition(job.status.conditions, "Failed")
    assert (failed.status, failed.reason) == ("True", "BackoffLimitExceeded")
    assert job.status.restarts == 2 and job.status.HasField("completion_time")
    await asyncio.sleep(3 * BACKOFF)
    assert sorted(await replicas_of(aclient, namespace, "flaky")) == ["flaky-0r2", "flaky-1"], "no restart after"


async def test_on_failure_job_completes_when_every_replica_succeeds(aclient, namespace, controller, clusters):
    cluster = await clusters("c1")
    await aclient.create(new_job("batch", namespace, replicas=2, restart_policy="OnFailure"))
    await wait_replica_names(aclient, namespace, "batch", ["batch-0", "batch-1"])
    for name in ("batch-0", "batch-1"):
        await bind(aclient, namespace, name, cluster)
        await report(aclient, namespace, name, "SUCCEEDED")
    job = await wait_job(aclient, namespace, "batch", lambda j: j.status.phase == "COMPLETED", "COMPLETED")
    assert get_condition(job.status.conditions, "Complete").status == "True"
    assert counts(job) == {cluster: {"SUCCEEDED": 2}}


async def test_restart_policy_never_fails_the_job_without_replacing(aclient, namespace, controller, clusters):
    cluster = await clusters("c1")
    await aclient.create(new_job("once", namespace, replicas=2, restart_policy="Never"))
    await wait_replica_names(aclient, namespace, "once", ["once-0", "once-1"])
    for name in ("once-0", "once-1"):
        await bind(aclient, namespace, name, cluster)
    await report(aclient, namespace, "once-0", "SUCCEEDED")
    await report(aclient, namespace, "once-1", "FAILED", exit_code=2)
    job = await wait_job(aclient, namespace, "once", lambda j: j.status.phase == "FAILED", "FAILED")
    failed = get_condition(job.status.conditions, "Failed")
    assert failed.reason == "ReplicaFailed" and "exit code 2" in failed.message
    await asyncio.sleep(3 * BACKOFF)
    assert sorted(await replicas_of(aclient, namespace, "once")) == ["once-0", "once-1"]

    await aclient.create(new_job("twice", namespace, replicas=1, restart_policy="Never"))
    await wait_replica_names(aclient, namespace, "twice", ["twice-0"])
    await bind(aclient, namespace, "twice-0", cluster)
    await report(aclient, namespace, "twice-0", "SUCCEEDED")
    await wait_job(aclient, namespace, "twice", lambda j: j.status.phase == "COMPLETED", "COMPLETED")


async def test_replicas_lost_with_their_cluster_are_replaced(aclient, namespace, controller, clusters):
    doomed, healthy = await clusters("doomed"), await clusters("healthy")
    await aclient.create(new_job("mobile", namespace, replicas=3, restart_policy="Never"))
    await wait_replica_names(aclient, namespace, "mobile", ["mobile-0", "mobile-1", "mobile-2"])
    await bind(aclient, namespace, "mobile-0", doomed)
    await bind(aclient, namespace, "mobile-1", doomed)
    await bind(aclient, namespace, "mobile-2", healthy)
    for name in ("mobile-0", "mobile-1", "mobile-2"):
        await report(aclient, namespace, name, "RUNNING")

    # An evicted replica is replaced at once, whatever the restart policy.
    await report(aclient, namespace, "mobile-2", "EVICTED")
    await wait_replica_names(aclient, namespace, "mobile", ["mobile-0", "mobile-1", "mobile-2r1"], timeout=BACKOFF * 10)

    # A deleted cluster takes its running replicas with it; one that already finished lost nothing.
    await report(aclient, namespace, "mobile-1", "SUCCEEDED")
    await aclient.delete("clusters", doomed)
    replicas = await wait_replica_names(aclient, namespace, "mobile", ["mobile-0r1", "mobile-1", "mobile-2r1"])
    assert all(r.status.phase == "PENDING" and not r.spec.cluster
               for name, r in replicas.items() if name != "mobile-1")
    job = await wait_job(aclient, namespace, "mobile",
                         lambda j: counts(j) == {UNBOUND: {"PENDING": 2}, doomed: {"SUCCEEDED": 1}}, "re-pending")
    assert job.status.restarts == 0, "a lost cluster is not a restart"
    assert job.status.phase == "PENDING"


async def test_deleting_a_job_deletes_its_replicas_first(aclient, namespace, controller):
    await aclient.create(new_job("gone", namespace, replicas=3))
    await wait_replica_names(aclient, namespace, "gone", ["gone-0", "gone-1", "gone-2"])
    await wait_job(aclient, namespace, "gone", lambda j: FINALIZER in j.metadata.finalizers, "the finalizer")
    # A replica that is not the job's (no owner reference) is left alone.
    stray = pb.Replica()
    stray.metadata.name = "stray"
    stray.metadata.namespace = namespace
    stray.spec.job_name = "gone"
    await aclient.create(stray)

    await aclient.delete("jobs", "gone", namespace)

    async def job_gone():
        try:
            await aclient.get("jobs", "gone", namespace)
            return False
        except NotFoundError:
            return True
    await async_wait_for(job_gone, message="the job to be deleted")
    remaining = (await aclient.list("replicas", namespace)).items
    assert [r.metadata.name for r in remaining] == ["stray"]


async def test_a_replica_deleted_by_hand_is_recreated(aclient, namespace, controller):
    await aclient.create(new_job("heal", namespace, replicas=2))
    await wait_replica_names(aclient, namespace, "heal", ["heal-0", "heal-1"])
    await aclient.delete("replicas", "heal-1", namespace)
    await wait_replica_names(aclient, namespace, "heal", ["heal-0", "heal-1"])
    job = await aclient.get("jobs", "heal", namespace)
    assert job.status.restarts == 0


def test_replica_names_never_collide_and_fit_a_dns_label():
    assert replica_name("a", 1, 0) == "a-1" and replica_name("a", 0, 1) == "a-0r1"
    # Jobs "a" and "a-0" cannot produce the same name: the rank token never holds a dash.
    names = {replica_name(job, rank, attempt) for job in ("a", "a-0", "a-1", "a-0r1")
             for rank in range(12) for attempt in range(12)}
    assert len(names) == 4 * 12 * 12
    long_a, long_b = "x" * 63, "x" * 62 + "y"
    for rank, attempt in ((0, 0), (123, 45)):
        a, b = replica_name(long_a, rank, attempt), replica_name(long_b, rank, attempt)
        assert len(a) <= 63 and len(b) <= 63 and a != b
        assert a.endswith(f"-{rank}r{attempt}" if attempt else f"-{rank}")
