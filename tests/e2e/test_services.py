"""Services over two clusters with real processes: launch_server.py, launch_manager.py, the
skylets it starts (with their gateways), the `local` cluster and an ssh cluster whose host is a
real sshd on 127.0.0.12 (tests/sshd.py). A job's replicas serve HTTP (`python3 -m
http.server`) on both clusters; a Link joins the clusters and a LoadBalancer Service exposes
the replicas on the local cluster's gateway.

Each replica takes every CPU of its node, so the scheduler puts one per cluster. Replicas of
one job share a port, so each binds its own host's address: 127.0.0.1 on the local cluster,
and on the ssh host the address its SSH session came in on ($SSH_CONNECTION)."""
from __future__ import annotations

import os
import signal
import socket
import threading
import time
import urllib.request
import uuid
from typing import List, Optional, Tuple

import pytest

from skyshift.api.errors import ConflictError, NotFoundError
from skyshift.gateway.addresses import gateway_address
from skyshift.v1 import objects_pb2 as pb
from tests.conftest import wait_for
from tests.e2e.control_plane import replicas_of, running_plane
from tests.sshd import remove_remote_state, ssh_client_key, ssh_cluster_spec, start_ssh_hosts  # noqa: F401

pytestmark = pytest.mark.slow

JOB = "web"
#: Seconds within which traffic must have left a cluster whose replicas died.
SWITCH_DEADLINE = 5.0
RUN = """addr=127.0.0.1
if [ -n "${SSH_CONNECTION:-}" ]; then set -- $SSH_CONNECTION; addr=$3; fi
printf '%s' "$SKYSHIFT_REPLICA_NAME" > id.txt
exec python3 -m http.server --bind "$addr" PORT
"""


def free_port(*addresses: str) -> int:
    """A port free on every address (replicas of one job listen on the same port)."""
    while True:
        with socket.socket() as probe:
            probe.bind((addresses[0], 0))
            port = probe.getsockname()[1]
        try:
            for address in addresses[1:]:
                with socket.socket() as other:
                    other.bind((address, port))
            return port
        except OSError:
            continue


def fetch_id(port: int, timeout: float = 5.0) -> str:
    """The replica that answered a request through the service address."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/id.txt", timeout=timeout) as response:
        return response.read().decode()


@pytest.fixture
def plane(tmp_path, monkeypatch):
    monkeypatch.delenv("SSH_CONNECTION", raising=False)  # only replicas on the ssh host may see one
    with running_plane(tmp_path / "home", extra_settings={
        "ssh": {"connect_timeout": 1.0, "command_timeout": 5.0},
        "gateway": {"health_interval": 0.2, "health_timeout": 0.5, "bind_retry_interval": 0.3,
                    "link_retry_interval": 0.3, "link_probe_interval": 2.0},
        # A killed replica is replaced only after the test watched the traffic move away.
        "controllers": {"job_restart_backoff_initial": 120.0, "job_restart_backoff_max": 120.0}}) as control_plane:
        yield control_plane


@pytest.fixture
def clusters(plane, start_ssh_hosts, ssh_client_key):  # noqa: F811
    """("local", ssh cluster name, its host address), both READY."""
    (server,) = start_ssh_hosts(1)
    name = f"ssh-{uuid.uuid4().hex[:6]}"
    with plane.client() as client:
        client.create(ssh_cluster_spec(name, [server], ssh_client_key))
        wait_for(lambda: all(is_ready(client, c) for c in ("local", name)), 60, message="clusters READY")
    try:
        yield "local", name, server.address
    finally:
        remove_remote_state(name)


def is_ready(client, cluster: str) -> bool:
    try:
        return client.get("clusters", cluster).status.phase == "READY"
    except NotFoundError:  # the manager creates the local cluster when it starts
        return False


def node_cpus(client, cluster: str) -> float:
    capacity = client.get("clusters", cluster).status.capacity
    return min(node.resources["cpus"] for node in capacity.values())


def scale(client, replicas: int) -> None:
    while True:
        job = client.get("jobs", JOB)
        job.spec.replicas = replicas
        try:
            client.update(job)
            return
        except ConflictError:
            continue


def running(client) -> List[pb.Replica]:
    return [r for r in replicas_of(client, JOB) if r.status.phase == "RUNNING"
            and not r.metadata.HasField("deletion_timestamp")]


def try_fetch_id(port: int, timeout: float = 5.0) -> Optional[str]:
    """fetch_id, or None when the request failed (e.g. before the service has endpoints)."""
    try:
        return fetch_id(port, timeout)
    except OSError:
        return None


def answers(port: int, count: int) -> List[Optional[str]]:
    return [try_fetch_id(port) for _ in range(count)]


class Traffic:
    """Requests through the service address, one after the other, in a thread:
    (time, replica name or None when the request failed)."""

    def __init__(self, port: int):
        self.port = port
        self.results: List[Tuple[float, Optional[str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.results.append((time.monotonic(), try_fetch_id(self.port, timeout=2.0)))

    def __enter__(self) -> "Traffic":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)


def test_a_service_spreads_fails_over_and_scales_across_two_clusters(plane, clusters):
    local, remote, remote_host = clusters
    target_port = free_port("127.0.0.1", remote_host)
    service_port = free_port("127.0.0.1")
    with plane.client() as client:
        cpus = min(node_cpus(client, local), node_cpus(client, remote))

        created = plane.skyctl("create", "link", "mesh", "--source", local, "--target", remote)
        assert created.returncode == 0, created.stderr
        wait_for(lambda: client.get("links", "mesh").status.phase == "ACTIVE", 30, message="link ACTIVE")
        created = plane.skyctl("create", "service", "web", "--selector", "app", "web", "--ports", str(service_port),
                               str(target_port), "--type", "LoadBalancer", "--primary-cluster", local)
        assert created.returncode == 0, created.stderr

        job = pb.Job()
        job.metadata.name = JOB
        job.metadata.labels["app"] = "web"
        job.spec.run = RUN.replace("PORT", str(target_port))
        job.spec.ports.append(target_port)
        job.spec.resources["cpus"] = cpus
        job.spec.replicas = 1
        client.create(job)
        wait_for(lambda: len(running(client)) == 1, 60, message="one replica RUNNING")
        first = running(client)[0]
        wait_for(lambda: set(answers(service_port, 3)) == {first.metadata.name}, 30, interval=0.2,
                 message="the service answers from the first replica")
        service = client.get("services", "web")
        assert service.status.external_ip == gateway_address(client.get("clusters", local), plane.settings.gateway)

        # Scaling adds an endpoint: the second replica lands on the other cluster.
        scale(client, 2)
        wait_for(lambda: len(running(client)) == 2, 60, message="two replicas RUNNING")
        by_name = {r.metadata.name: r.spec.cluster for r in running(client)}
        assert set(by_name.values()) == {local, remote}
        wait_for(lambda: {cluster: len(items.endpoints) for cluster, items in
                          client.get("endpoints", "web").spec.endpoints.items()} == {local: 1, remote: 1}, 30,
                 message="one endpoint per cluster")
        wait_for(lambda: {by_name.get(name) for name in answers(service_port, 8)} == {local, remote}, 30, interval=0.2,
                 message="requests reach replicas on both clusters")
        described = plane.skyctl("describe", "service", "web")
        assert described.returncode == 0, described.stderr
        assert f"{local} (primary)" in described.stdout and f"{remote_host}:{target_port}" in described.stdout

        # ClusterIP from inside a replica: the ssh replica's variables point at its own cluster's
        # gateway, which reaches both clusters over the link the other way.
        remote_replica = next(name for name, cluster in by_name.items() if cluster == remote)
        probe = ("import os, urllib.request as u; print(u.urlopen('http://%s:%s/id.txt' % ("
                 "os.environ['WEB_SERVICE_HOST'], os.environ['WEB_SERVICE_PORT']), timeout=5).read().decode())")
        result = client.exec(remote_replica, ["python3", "-c", probe])
        assert result.exit_code == 0, result.output
        assert result.output.decode().strip() in by_name

        # Killing the local cluster's replica moves all traffic to the remote one.
        local_replica = next(name for name, cluster in by_name.items() if cluster == local)
        with Traffic(service_port) as traffic:
            wait_for(lambda: len(traffic.results) >= 5, 30, message="traffic flowing")
            replica_dir = plane.settings.clusters_dir / local / "replicas" / "default" / local_replica
            pid_file = replica_dir / ".skyshift" / "pid"
            killed_at = time.monotonic()
            os.killpg(int(pid_file.read_text()), signal.SIGKILL)

            def switched():
                after = [answer for at, answer in traffic.results if at > killed_at]
                return len(after) >= 5 and all(answer == remote_replica for answer in after[-5:])

            wait_for(switched, 30, interval=0.05, message="traffic moved to the remote cluster")
            switch_time = next(at for at, answer in traffic.results if at > killed_at and answer == remote_replica)
            steady = len(traffic.results)
            wait_for(lambda: len(traffic.results) >= steady + 30, 30, message="more requests after the switch")
        after_switch = [answer for _, answer in traffic.results[steady:]]
        assert switch_time - killed_at < SWITCH_DEADLINE
        assert None not in after_switch, f"{after_switch.count(None)} failed requests after the switch"
        assert set(after_switch) == {remote_replica}


def test_bad_service_specs_are_refused_or_reported(plane):
    out_of_range = plane.skyctl("create", "service", "bad", "--selector", "app", "web", "--ports", "70000", "80")
    assert out_of_range.returncode != 0 and "spec.ports[0].port" in out_of_range.stderr
    no_selector = plane.skyctl("create", "service", "bad", "--ports", "80", "8080")
    assert no_selector.returncode != 0 and "spec.selector" in no_selector.stderr
    unknown_type = plane.skyctl("create", "service", "bad", "--selector", "app", "web", "--ports", "80", "8080",
                                "--type", "ExternalName")
    assert unknown_type.returncode != 0 and "ExternalName" in unknown_type.stderr

    # A port already in use on the local cluster's gateway address: a condition says so, and
    # goes away once the port is free.
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    taken = squatter.getsockname()[1]
    with plane.client() as client:
        def ports_condition(status: str):
            service = client.get("services", "squat")
            return next((c for c in service.status.conditions if c.type == "PortsAvailable" and c.status == status),
                        None)

        try:
            created = plane.skyctl("create", "service", "squat", "--selector", "app", "web", "--ports", str(taken),
                                   "80")
            assert created.returncode == 0, created.stderr
            condition = wait_for(lambda: ports_condition("False"), 60, message="PortsAvailable False")
            assert condition.reason == "PortInUse"
            assert f"local: 127.0.0.1:{taken}" in condition.message
            assert "PortInUse" in plane.skyctl("describe", "service", "squat").stdout
        finally:
            squatter.close()
        wait_for(lambda: ports_condition("True"), 30, message="PortsAvailable True once the port is free")
