"""The skylet on the local driver, in-process, against a real API server: the test plays the
scheduler by creating Replicas bound to the skylet's cluster, and checks what a user sees
(Replica and Cluster status, logs and exec through the API server's relay)."""
from __future__ import annotations

import asyncio
import copy
import os
import pathlib
import uuid

import pytest

from skylet.agent import REPLICA_FINALIZER, Selection, Skylet
from skyshift.api.errors import ConflictError, NotFoundError
from skyshift.client import AsyncClient
from skyshift.api.conditions import get_condition
from skyshift.v1 import objects_pb2 as pb
from tests.conftest import async_wait_for

JOB_LABEL = "skyshift.dev/job"


@pytest.fixture
def settings(api_server, tmp_path):
    settings = copy.deepcopy(api_server.settings)
    settings.home = str(tmp_path / "home")
    settings.skylet.heartbeat_interval = 0.2
    settings.skylet.heartbeat_debounce = 0.02
    settings.drivers.stop_grace_period = 2.0
    return settings


class SkyletRunner:
    """Starts and stops in-process skylets for one cluster, like the cluster controller would."""

    def __init__(self, client: AsyncClient, settings, cluster: str):
        self.client, self.settings, self.cluster = client, settings, cluster
        self.task = None
        self.skylet = None

    def start(self) -> Skylet:
        assert self.task is None
        self.skylet = Skylet(self.client, Selection(names=(self.cluster,)), self.settings)
        self.task = asyncio.ensure_future(self.skylet.run())
        return self.skylet

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
            self.task = None


@pytest.fixture
async def cluster(aclient: AsyncClient):
    obj = pb.Cluster()
    obj.metadata.name = f"local-{uuid.uuid4().hex[:8]}"
    obj.spec.manager = "local"
    await aclient.create(obj)
    yield obj.metadata.name
    try:
        await aclient.delete("clusters", obj.metadata.name)
    except NotFoundError:
        pass


@pytest.fixture
async def skylet(aclient: AsyncClient, settings, cluster):
    runner = SkyletRunner(aclient, settings, cluster)
    runner.start()
    yield runner
    # Delete what the test left, so the skylet stops its processes before it goes.
    for replica in (await aclient.list("replicas", field_selector=f"spec.cluster={cluster}")).items:
        try:
            await aclient.delete("replicas", replica.metadata.name, replica.metadata.namespace)
        except NotFoundError:
            pass
    if runner.task is None:
        runner.start()
    await async_wait_for(lambda: _none_left(aclient, cluster), timeout=30, message="replicas stopped and removed")
    await runner.stop()


async def _none_left(client: AsyncClient, cluster: str) -> bool:
    return not (await client.list("replicas", field_selector=f"spec.cluster={cluster}")).items


async def bind(client: AsyncClient, namespace: str, name: str, cluster: str, run: str, job: str = "",
               rank: int = 0, replicas: int = 1) -> pb.Replica:
    """Create a Replica bound to `cluster` and mark it SCHEDULED, as the scheduler does (whose
    status write loses to the skylet's when the skylet has started the replica already)."""
    replica = pb.Replica()
    replica.metadata.namespace = namespace
    replica.metadata.name = name
    if job:
        replica.metadata.labels[JOB_LABEL] = job
    replica.spec.template.run = run
    replica.spec.template.replicas = replicas
    replica.spec.template.resources["cpus"] = 0.5
    replica.spec.job_name = job or name
    replica.spec.rank = rank
    replica.spec.cluster = cluster
    replica = await client.create(replica)
    replica.status.phase = "SCHEDULED"
    try:
        return await client.update_status(replica)
    except ConflictError:
        return await client.get("replicas", name, namespace)


async def phase_of(client: AsyncClient, namespace: str, name: str, *phases: str):
    replica = await client.get("replicas", name, namespace)
    return replica if replica.status.phase in phases else None


async def read_logs(client: AsyncClient, namespace: str, follow: bool = False, **which) -> bytes:
    return b"".join([chunk.data async for chunk in client.logs(namespace=namespace, follow=follow, **which)])


async def test_heartbeats_make_the_cluster_ready_with_capacity(aclient, skylet, cluster):
    ready = await async_wait_for(lambda: _cluster_in(aclient, cluster, "READY"), timeout=15,
                                 message="cluster READY")
    status = ready.status
    (node, resources), = status.capacity.items()
    assert resources.resources["cpus"] == os.cpu_count()
    assert resources.resources["memory"] > 0
    assert status.allocatable[node].resources["cpus"] == os.cpu_count()
    assert set(status.capabilities) >= {"logs", "exec"}
    assert status.agent_endpoint == skylet.skylet.endpoint
    assert get_condition(status.conditions, "Ready").status == "True"
    first = status.heartbeat_time.ToNanoseconds()
    await async_wait_for(lambda: _heartbeat_after(aclient, cluster, first), timeout=5, message="a later heartbeat")


async def _cluster_in(client: AsyncClient, name: str, phase: str):
    cluster = await client.get("clusters", name)
    return cluster if cluster.status.phase == phase else None


async def _heartbeat_after(client: AsyncClient, name: str, nanoseconds: int) -> bool:
    return (await client.get("clusters", name)).status.heartbeat_time.ToNanoseconds() > nanoseconds


async def test_replica_runs_to_completion_and_its_logs_stay_readable(aclient, skylet, cluster, namespace):
    await bind(aclient, namespace, "ok", cluster, "echo hello from $SKYSHIFT_REPLICA_NAME")
    await bind(aclient, namespace, "bad", cluster, "echo failing >&2; exit 3")

    done = await async_wait_for(lambda: phase_of(aclient, namespace, "ok", "SUCCEEDED", "FAILED"), timeout=15,
                                message="replica ok finished")
    assert done.status.phase == "SUCCEEDED"
    assert done.status.exit_code == 0
    assert done.status.handle
    assert done.status.finish_time.ToNanoseconds() >= done.status.start_time.ToNanoseconds() > 0
    assert REPLICA_FINALIZER in done.metadata.finalizers
    failed = await async_wait_for(lambda: phase_of(aclient, namespace, "bad", "SUCCEEDED", "FAILED"), timeout=15,
                                  message="replica bad finished")
    assert (failed.status.phase, failed.status.exit_code) == ("FAILED", 3)

    assert await read_logs(aclient, namespace, replica="ok") == b"hello from ok\n"
    assert await read_logs(aclient, namespace, replica="bad") == b"failing\n"


async def test_logs_of_a_job_follow_every_replica_until_they_end(aclient, skylet, cluster, namespace):
    job = pb.Job()
    job.metadata.namespace, job.metadata.name = namespace, "web"
    job.spec.run = "true"
    await aclient.create(job)  # the relay looks the job up; its replicas are found by label
    script = "for i in 1 2 3; do echo line-$i-$SKYSHIFT_REPLICA_RANK; sleep 0.2; done"
    for rank in range(2):
        await bind(aclient, namespace, f"web-{rank}", cluster, script, job="web", rank=rank, replicas=2)
    await async_wait_for(lambda: phase_of(aclient, namespace, "web-1", "RUNNING", "SUCCEEDED"), timeout=15,
                         message="replicas started")

    chunks = [chunk async for chunk in aclient.logs(job="web", namespace=namespace, follow=True)]

    by_replica = {}
    for chunk in chunks:
        by_replica[chunk.replica] = by_replica.get(chunk.replica, b"") + chunk.data
    assert by_replica == {f"web-{rank}": b"".join(f"line-{i}-{rank}\n".encode() for i in (1, 2, 3))
                          for rank in range(2)}
    for rank in range(2):  # follow ended because the replicas did (their status write may trail the exit)
        await async_wait_for(lambda rank=rank: phase_of(aclient, namespace, f"web-{rank}", "SUCCEEDED"), timeout=10,
                             message=f"web-{rank} SUCCEEDED")


async def test_exec_runs_beside_the_replica_and_delete_stops_it(aclient, skylet, cluster, namespace, settings):
    await bind(aclient, namespace, "server", cluster, "echo ready; exec sleep 300")
    await async_wait_for(lambda: _started(aclient, namespace, "server"), timeout=15, message="replica RUNNING")

    result = await aclient.exec("server", ["bash", "-c", "echo rank=$SKYSHIFT_REPLICA_RANK; pwd; exit 4"],
                                namespace=namespace)
    assert result.exit_code == 4
    lines = result.output.decode().splitlines()
    assert lines[0] == "rank=0"
    workdir = pathlib.Path(lines[1])
    assert workdir.is_dir() and str(workdir).startswith(settings.home)

    await aclient.delete("replicas", "server", namespace)
    await async_wait_for(lambda: _gone(aclient, namespace, "server"), timeout=15, message="replica gone")
    # Its finalizer kept the Replica until the skylet had stopped the processes and removed their files.
    assert not workdir.exists()


async def modify(client: AsyncClient, namespace: str, name: str, change) -> None:
    """Read, change and update a replica, again if it changed in between."""
    while True:
        replica = await client.get("replicas", name, namespace)
        change(replica)
        try:
            await client.update(replica)
            return
        except ConflictError:
            continue


async def _gone(client: AsyncClient, namespace: str, name: str) -> bool:
    try:
        await client.get("replicas", name, namespace)
    except NotFoundError:
        return True
    return False


async def test_restarted_skylet_adopts_running_replicas_and_starts_nothing_twice(
        aclient, skylet, cluster, namespace, tmp_path):
    starts = tmp_path / "starts"
    release = tmp_path / "release"
    script = f"echo started >> {starts}; while [ ! -e {release} ]; do sleep 0.05; done; echo released"
    await bind(aclient, namespace, "long", cluster, script)
    await bind(aclient, namespace, "orphan", cluster, "exec sleep 300")
    first = await async_wait_for(lambda: _started(aclient, namespace, "long"), timeout=15, message="replica RUNNING")
    await async_wait_for(lambda: _started(aclient, namespace, "orphan"), timeout=15, message="orphan RUNNING")
    orphan_dir = pathlib.Path(skylet.settings.home, "clusters", cluster, "replicas", namespace, "orphan")
    assert orphan_dir.is_dir()

    await skylet.stop()
    # While no skylet runs: "long" finishes, and "orphan" is deleted (its finalizer is removed by
    # hand, as the cluster controller does for an absent skylet).
    release.touch()
    await modify(aclient, namespace, "orphan", lambda orphan: orphan.metadata.finalizers.remove(REPLICA_FINALIZER))
    await aclient.delete("replicas", "orphan", namespace)
    skylet.start()

    done = await async_wait_for(lambda: phase_of(aclient, namespace, "long", "SUCCEEDED", "FAILED"), timeout=15,
                                message="adopted replica finished")
    assert done.status.phase == "SUCCEEDED"
    assert done.status.handle == first.status.handle
    assert starts.read_text() == "started\n"
    assert await read_logs(aclient, namespace, replica="long") == b"released\n"
    # The orphan's processes were stopped and its files removed.
    await async_wait_for(lambda: not orphan_dir.exists(), timeout=15, message="orphan removed")


async def _started(client: AsyncClient, namespace: str, name: str):
    """The replica once it runs and carries the skylet's finalizer (both written after the start)."""
    replica = await phase_of(client, namespace, name, "RUNNING")
    return replica if replica is not None and REPLICA_FINALIZER in replica.metadata.finalizers else None
