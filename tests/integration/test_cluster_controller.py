"""The cluster controller against a real API server, with real skylet processes it starts
(`python -m skylet`): supervision, NotReady and eviction, adoption after a controller restart,
probing and deletion. The controller manages only the clusters labelled for each test."""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import uuid

import pytest
import yaml

from controllers.cluster import FINALIZER, ClusterController
from skyshift import config, processes
from skyshift.api.errors import NotFoundError
from skyshift.client import AsyncClient
from skyshift.api.conditions import get_condition
from skyshift.v1 import objects_pb2 as pb
from tests.conftest import async_wait_for

GRACE = 1.5  # not_ready_grace and eviction_grace of these tests


@pytest.fixture
def settings(api_server, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    # Skylets read their settings from the home they are given.
    (home / "config.yaml").write_text(yaml.safe_dump({
        "skylet": {"heartbeat_interval": 0.2, "heartbeat_debounce": 0.02, "not_ready_grace": GRACE,
                   "eviction_grace": GRACE, "restart_backoff_initial": 0.1, "status_poll_interval": 0.1,
                   "stop_timeout": 5.0, "probe_timeout": 5.0},
        "drivers": {"stop_grace_period": 2.0},
    }))
    return config.load(home, env={})


class Harness:
    """The controller under test, restartable, and the clusters a test made."""

    def __init__(self, client: AsyncClient, settings, label: str):
        self.client, self.settings, self.label = client, settings, label
        self.task = None
        self.controller = None

    def start(self) -> ClusterController:
        self.controller = ClusterController(self.client, settings=self.settings, label_selector=f"test={self.label}")
        self.task = asyncio.ensure_future(self.controller.run())
        return self.controller

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
            self.task = None

    async def cluster(self, manager: str = "local", **spec) -> str:
        cluster = pb.Cluster()
        cluster.metadata.name = f"c-{uuid.uuid4().hex[:8]}"
        cluster.metadata.labels["test"] = self.label
        cluster.spec.manager = manager
        for field, value in spec.items():
            getattr(cluster.spec, field).extend(value)
        await self.client.create(cluster)
        return cluster.metadata.name

    def skylet_pid(self, cluster: str):
        return processes.running(self.settings.skylets_dir / f"{cluster}.pid", ["-m", "skylet", "--cluster", cluster])


@pytest.fixture
async def harness(aclient: AsyncClient, settings):
    harness = Harness(aclient, settings, uuid.uuid4().hex[:8])
    harness.start()
    yield harness
    if harness.task is None:
        harness.start()
    clusters = (await aclient.list("clusters", label_selector=f"test={harness.label}")).items
    for cluster in clusters:
        try:
            await aclient.delete("clusters", cluster.metadata.name)
        except NotFoundError:
            pass
    try:
        await async_wait_for(lambda: _none_labelled(aclient, harness.label), timeout=30, message="clusters deleted")
    finally:
        await harness.stop()
        for pid_file in settings.skylets_dir.glob("*.pid"):  # only if a test failed half-way
            pid = processes.running(pid_file, ["-m", "skylet", "--home", str(settings.home_path)])
            if pid is not None:
                processes.terminate(pid, 5.0)


async def _none_labelled(client: AsyncClient, label: str) -> bool:
    return not (await client.list("clusters", label_selector=f"test={label}")).items


async def phase_is(client: AsyncClient, name: str, *phases: str):
    cluster = await client.get("clusters", name)
    return cluster if cluster.status.phase in phases else None


async def replica_phase(client: AsyncClient, namespace: str, name: str, *phases: str):
    replica = await client.get("replicas", name, namespace)
    return replica if replica.status.phase in phases else None


async def bound_replica(client: AsyncClient, namespace: str, name: str, cluster: str, run: str) -> None:
    replica = pb.Replica()
    replica.metadata.namespace, replica.metadata.name = namespace, name
    replica.spec.template.run = run
    replica.spec.job_name, replica.spec.cluster = name, cluster
    await client.create(replica)


async def test_skylet_is_started_supervised_and_stopped_with_its_cluster(aclient, harness, settings):
    name = await harness.cluster()
    ready = await async_wait_for(lambda: phase_is(aclient, name, "READY"), timeout=20, message="cluster READY")
    assert FINALIZER in ready.metadata.finalizers
    assert ready.status.capacity and ready.status.agent_endpoint
    first = harness.skylet_pid(name)
    assert first is not None

    os.kill(first, signal.SIGKILL)
    second = await async_wait_for(lambda: (pid := harness.skylet_pid(name)) and pid != first and pid,
                                  timeout=20, message="skylet restarted")
    restarted_at = (await aclient.get("clusters", name)).status.heartbeat_time.ToNanoseconds()
    await async_wait_for(lambda: _heartbeat_after(aclient, name, restarted_at), timeout=10,
                         message="heartbeats from the new skylet")

    await aclient.delete("clusters", name)
    await async_wait_for(lambda: _cluster_gone(aclient, name), timeout=20, message="cluster gone")
    await async_wait_for(lambda: not processes.is_alive(second), timeout=10, message="skylet stopped")
    assert not (settings.skylets_dir / f"{name}.pid").exists()


async def _heartbeat_after(client: AsyncClient, name: str, nanoseconds: int) -> bool:
    return (await client.get("clusters", name)).status.heartbeat_time.ToNanoseconds() > nanoseconds


async def _cluster_gone(client: AsyncClient, name: str) -> bool:
    try:
        await client.get("clusters", name)
    except NotFoundError:
        return True
    return False


async def test_silent_cluster_becomes_not_ready_then_loses_its_replicas(aclient, harness, namespace):
    name = await harness.cluster()
    await async_wait_for(lambda: phase_is(aclient, name, "READY"), timeout=20, message="cluster READY")
    await bound_replica(aclient, namespace, "worker", name, "exec sleep 300")
    running = await async_wait_for(lambda: replica_phase(aclient, namespace, "worker", "RUNNING"), timeout=20,
                                   message="replica RUNNING")
    pid = harness.skylet_pid(name)

    os.kill(pid, signal.SIGSTOP)  # a hung skylet: alive, but silent
    try:
        not_ready = await async_wait_for(lambda: phase_is(aclient, name, "NOT_READY"), timeout=GRACE + 10,
                                         message="cluster NOT_READY")
        condition = get_condition(not_ready.status.conditions, "Ready")
        assert (condition.status, condition.reason) == ("Unknown", "HeartbeatMissing")
        evicted = await async_wait_for(lambda: replica_phase(aclient, namespace, "worker", "EVICTED"),
                                       timeout=GRACE + 10, message="replica EVICTED")
        assert "not ready" in evicted.status.message
    finally:
        os.kill(pid, signal.SIGCONT)

    # The skylet wakes up: the cluster is READY again, and the evicted replica's process is stopped.
    await async_wait_for(lambda: phase_is(aclient, name, "READY"), timeout=20, message="cluster READY again")
    workdir = harness.settings.clusters_dir / name / "replicas" / namespace / "worker"
    await async_wait_for(lambda: (workdir / ".skyshift" / "exit_code").exists(), timeout=20,
                         message="evicted replica stopped")
    assert running.status.handle
    final = await aclient.get("replicas", "worker", namespace)
    assert final.status.phase == "EVICTED"


async def test_restarted_controller_adopts_the_running_skylet(aclient, harness):
    name = await harness.cluster()
    await async_wait_for(lambda: phase_is(aclient, name, "READY"), timeout=20, message="cluster READY")
    pid = harness.skylet_pid(name)

    await harness.stop()
    assert processes.is_alive(pid)  # skylets outlive the manager
    harness.start()
    await async_wait_for(lambda: harness.controller.skylets.get(name), timeout=10, message="skylet known")
    assert harness.controller.skylets[name].pid == pid
    assert harness.skylet_pid(name) == pid


async def test_unreachable_ssh_cluster_is_an_error_with_the_reason(aclient, harness):
    port = _closed_port()
    name = await harness.cluster("ssh", hosts=[pb.SSHHost(host="127.0.0.1", port=port, username="nobody",
                                                          ssh_key_path="/nonexistent/key")])
    failed = await async_wait_for(lambda: phase_is(aclient, name, "ERROR"), timeout=20, message="cluster ERROR")
    condition = get_condition(failed.status.conditions, "Ready")
    assert condition.reason == "ProbeFailed"
    assert failed.status.message
    assert harness.skylet_pid(name) is None


def _closed_port() -> int:
    """A loopback port nothing listens on (it was free a moment ago)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def test_one_skylet_serves_every_sim_cluster(aclient, harness, namespace, settings):
    names = [await harness.cluster("sim") for _ in range(3)]
    for name in names:
        ready = await async_wait_for(lambda: phase_is(aclient, name, "READY"), timeout=20, message="sim READY")
        assert set(ready.status.capacity) == {"node-0"}
        assert "simulated" in ready.status.capabilities
    shared = processes.running(settings.skylets_dir / "@sim.pid", ["-m", "skylet", "--manager", "sim"])
    assert shared is not None
    assert all(harness.skylet_pid(name) is None for name in names)  # no skylet of their own

    replica = pb.Replica()
    replica.metadata.namespace, replica.metadata.name = namespace, "simulated"
    replica.spec.template.run = "never runs"
    replica.spec.template.envs["SIM_DURATION"] = "0.2"
    replica.spec.job_name, replica.spec.cluster = "simulated", names[1]
    await aclient.create(replica)
    await async_wait_for(lambda: replica_phase(aclient, namespace, "simulated", "SUCCEEDED"), timeout=20,
                         message="simulated replica SUCCEEDED")

    await aclient.delete("clusters", names[0])
    await async_wait_for(lambda: _cluster_gone(aclient, names[0]), timeout=20, message="first sim cluster gone")
    assert processes.is_alive(shared)  # still serving the others
    for name in names[1:]:
        await aclient.delete("clusters", name)
    for name in names[1:]:
        await async_wait_for(lambda: _cluster_gone(aclient, name), timeout=20, message="sim cluster gone")
    await async_wait_for(lambda: not processes.is_alive(shared), timeout=15, message="shared skylet stopped")
