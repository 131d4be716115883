"""Two real controller managers against a real API server process: one leads, the other waits;
kill -9 the leader and the standby takes over within the lease duration, with no duplicate
Replicas; SIGTERM releases the lease and exits cleanly."""
from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time
import uuid
from typing import Optional

import pytest
import yaml

from skyshift.api.errors import ConflictError, NotFoundError
from skyshift.client import Client
from skyshift.v1 import objects_pb2 as pb
from tests.conftest import make_settings, wait_for

pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parents[2]
LEASE_DURATION, RENEW_DEADLINE, RETRY_PERIOD = 2.0, 1.5, 0.2
LEASE_NAMESPACE, LEASE_NAME = "skyshift-system", "skyshift-manager"


def start(script: str, home: pathlib.Path, *args: str) -> subprocess.Popen:
    home.mkdir(parents=True, exist_ok=True)
    log = open(home / f"{script}.log", "ab")
    return subprocess.Popen([sys.executable, str(ROOT / script), "--home", str(home), *args], cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "SKYSHIFT_HOME": str(home)})


def stop(process: subprocess.Popen, timeout: float = 15.0) -> Optional[int]:
    if process.poll() is None:
        os.kill(process.pid, signal.SIGTERM)
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
    return process.wait(timeout)


@pytest.fixture
def server(tmp_path):
    home = tmp_path / "server"
    process = start("launch_server.py", home)
    try:
        endpoint_file = home / "api" / "endpoint"
        wait_for(lambda: endpoint_file.exists() or process.poll() is not None, 30, message="the API server")
        assert process.poll() is None, (home / "launch_server.py.log").read_text()
        yield endpoint_file.read_text().strip()
    finally:
        stop(process)


def manager_home(tmp_path: pathlib.Path, name: str) -> pathlib.Path:
    home = tmp_path / name
    home.mkdir()
    (home / "config.yaml").write_text(yaml.safe_dump({"controllers": {
        "lease_duration": LEASE_DURATION, "renew_deadline": RENEW_DEADLINE, "retry_period": RETRY_PERIOD,
        "job_restart_backoff_initial": 0.1}}))
    return home


def holder(client: Client) -> Optional[str]:
    try:
        return client.get("leases", LEASE_NAME, LEASE_NAMESPACE).spec.holder_identity
    except NotFoundError:
        return None


def replica_names(client: Client, namespace: str):
    return sorted(r.metadata.name for r in client.list("replicas", namespace).items)


def ready_cluster(client: Client, name: str, cpus: float) -> None:
    """A cluster as its skylet would report it: READY, with one node's capacity."""
    cluster = pb.Cluster()
    cluster.metadata.name = name
    cluster.spec.manager = "sim"
    cluster = client.create(cluster)
    cluster.status.phase = "READY"
    for section in (cluster.status.capacity, cluster.status.allocatable):
        section["node-0"].resources.update({"cpus": cpus, "memory": 65536})
    client.update_status(cluster)


def bindings(client: Client, namespace: str, replica: str):
    """Every cluster the replica was ever bound to, oldest first (its history, empty values left out)."""
    clusters = [r.spec.cluster for r in reversed(client.history("replicas", replica, namespace))]
    return [cluster for index, cluster in enumerate(clusters) if cluster and (index == 0 or clusters[index - 1] != cluster)]


def bound_names(client: Client, namespace: str):
    return sorted(r.metadata.name for r in client.list("replicas", namespace).items if r.spec.cluster)


def test_standby_takes_over_when_the_leader_is_killed(server, tmp_path):
    """Both managers run the job controller and the scheduler (not the cluster controller: the
    test plays the cluster, and no skylet runs the replicas)."""
    client = Client(endpoint=server, settings=make_settings(tmp_path / "client"))
    managers = {}
    try:
        ready_cluster(client, "c1", cpus=8)
        homes = {name: manager_home(tmp_path, name) for name in ("a", "b")}
        managers["a"] = start("launch_manager.py", homes["a"], "--server", server, "--identity", "a",
                              "--controllers", "job,scheduler")
        wait_for(lambda: holder(client) == "a", 30, message="manager a to lead")
        assert (homes["a"] / "manager" / "pid").read_text() == str(managers["a"].pid)
        managers["b"] = start("launch_manager.py", homes["b"], "--server", server, "--identity", "b",
                              "--controllers", "job,scheduler")

        namespace = f"t-{uuid.uuid4().hex[:8]}"
        ns = pb.Namespace()
        ns.metadata.name = namespace
        client.create(ns)
        job = pb.Job()
        job.metadata.name = "train"
        job.metadata.namespace = namespace
        job.spec.run = "true"
        job.spec.resources["cpus"] = 1
        job.spec.replicas = 2
        client.create(job)
        wait_for(lambda: bound_names(client, namespace) == ["train-0", "train-1"], 20,
                 message="a's replicas, bound")
        wait_for(lambda: (homes["b"] / "manager" / "pid").exists(), 20, message="b to start")
        assert holder(client) == "a", "the standby must not take a lease that is being renewed"

        os.kill(managers["a"].pid, signal.SIGKILL)
        killed = time.monotonic()
        managers["a"].wait(10)
        wait_for(lambda: holder(client) == "b", LEASE_DURATION + 5, interval=0.05, message="b to take over")
        takeover = time.monotonic() - killed
        assert takeover <= LEASE_DURATION + RETRY_PERIOD + 1.0, f"took {takeover:.2f}s"
        lease = client.get("leases", LEASE_NAME, LEASE_NAMESPACE)
        assert lease.spec.lease_transitions == 1

        # b now acts: it scales the job, and no rank ever gets a second replica.
        while True:
            current = client.get("jobs", "train", namespace)
            current.spec.replicas = 3
            try:
                client.update(current)
                break
            except ConflictError:  # the controller wrote the job in between
                continue
        wait_for(lambda: bound_names(client, namespace) == ["train-0", "train-1", "train-2"], 20,
                 message="b's replicas, bound")
        time.sleep(0.5)  # a moment for a (wrong) second copy or binding to appear
        assert replica_names(client, namespace) == ["train-0", "train-1", "train-2"]
        for name in ("train-0", "train-1", "train-2"):
            assert bindings(client, namespace, name) == ["c1"], f"{name} was bound more than once"

        # SIGTERM: b releases the lease and exits cleanly.
        assert stop(managers["b"]) == 0
        lease = client.get("leases", LEASE_NAME, LEASE_NAMESPACE)
        assert lease.spec.holder_identity == ""
        assert not (homes["b"] / "manager" / "pid").exists()
    finally:
        for process in managers.values():
            stop(process)
        client.close()


def log_has(path: pathlib.Path, event: str) -> bool:
    return path.exists() and event in path.read_text()


def test_a_leader_cut_off_from_the_api_stops_acting_and_leads_again_later(tmp_path):
    """The manager starts before the API server (same home: it finds the endpoint there), leads,
    then loses the server: it must stop its controllers within the renew deadline, before its
    lease could expire. When the server is back, it leads again."""
    home = manager_home(tmp_path, "home")
    manager_log = home / "launch_manager.py.log"
    manager = start("launch_manager.py", home, "--identity", "m", "--controllers", "job")
    server = None
    try:
        wait_for(lambda: log_has(manager_log, "api_server_waiting"), 20, message="the manager to wait for the API")
        server = start("launch_server.py", home)
        endpoint_file = home / "api" / "endpoint"
        wait_for(endpoint_file.exists, 30, message="the API server")
        endpoint = endpoint_file.read_text().strip()
        client = Client(endpoint=endpoint, settings=make_settings(tmp_path / "client"))
        wait_for(lambda: holder(client) == "m", 30, message="the manager to lead")
        wait_for(lambda: log_has(manager_log, "controller_started"), 10, message="the controllers to start")

        assert stop(server) == 0
        cut_off = time.monotonic()
        wait_for(lambda: log_has(manager_log, "controllers_stopped"), RENEW_DEADLINE + 5, interval=0.05,
                 message="the cut-off leader to stop its controllers")
        assert time.monotonic() - cut_off < LEASE_DURATION, "it must stop before its lease can expire"
        assert log_has(manager_log, "leader_lost")
        assert manager.poll() is None, "it stays up, as a candidate"

        server = start("launch_server.py", home, "--listen", endpoint)
        wait_for(lambda: manager_log.read_text().count("controller_started") == 2, 30,
                 message="the manager to lead again")
        assert holder(client) == "m"
        client.close()

        assert stop(manager) == 0
        assert not (home / "manager" / "pid").exists()
    finally:
        stop(manager)
        if server is not None:
            stop(server)
