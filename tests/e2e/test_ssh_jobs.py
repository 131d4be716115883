"""Jobs on ssh clusters with real processes: launch_server.py, launch_manager.py, the skylets it
starts, and real sshd "hosts" on loopback (tests/sshd.py). A job spreads over two ssh clusters;
when a host dies, its replicas are evicted and replaced on the other one."""
from __future__ import annotations

import uuid

import pytest

from tests.conftest import wait_for
from tests.e2e.control_plane import replicas_of, running_plane
from tests.sshd import remove_remote_state, ssh_client_key, ssh_cluster_spec, start_ssh_hosts  # noqa: F401

pytestmark = pytest.mark.slow

LABEL = "kind"


@pytest.fixture
def plane(tmp_path):
    with running_plane(tmp_path / "home", extra_settings={"ssh": {
        "connect_timeout": 1.0, "command_timeout": 2.0, "retry_backoff_initial": 0.2, "retry_backoff_max": 1.0}}) as control_plane:
        yield control_plane


@pytest.fixture
def ssh_clusters(plane, start_ssh_hosts, ssh_client_key):  # noqa: F811
    """Two ssh clusters of one fake host each, labelled kind=ssh; returns [(name, host)]."""
    made = []
    with plane.client() as client:
        for server in start_ssh_hosts(2):
            cluster = ssh_cluster_spec(f"ssh-{uuid.uuid4().hex[:6]}", [server], ssh_client_key)
            cluster.metadata.labels[LABEL] = "ssh"
            client.create(cluster)
            made.append((cluster.metadata.name, server))
        wait_for(lambda: all(client.get("clusters", name).status.phase == "READY" for name, _ in made), 60,
                 message="ssh clusters READY")
    try:
        yield made
    finally:
        for name, _ in made:
            remove_remote_state(name)


def test_a_job_spreads_over_two_ssh_clusters(plane, ssh_clusters):
    result = plane.skyctl("create", "job", "spread", "--replicas", "2", "--cpus", "0.1", "--filter", f"{LABEL}=ssh",
                          "--wait", "--run", "echo rank $SKYSHIFT_REPLICA_RANK as $(whoami)")
    assert result.returncode == 0, result.stderr
    assert sorted(result.stdout.splitlines()[1:]) == [f"[spread-{rank}] rank {rank} as skyshift-t1"
                                                      for rank in range(2)]
    with plane.client() as client:
        clusters = {replica.spec.cluster for replica in replicas_of(client, "spread")}
    assert clusters == {name for name, _ in ssh_clusters}


def test_a_dead_hosts_replicas_are_replaced_on_the_other_host(plane, ssh_clusters):
    created = plane.skyctl("create", "job", "durable", "--replicas", "2", "--cpus", "0.1", "--filter",
                           f"{LABEL}=ssh", "--run", "echo up; exec sleep 300")
    assert created.returncode == 0, created.stderr
    with plane.client() as client:
        running = wait_for(lambda: _running(client), 60, message="replicas RUNNING")
        assert {r.spec.cluster for r in running} == {name for name, _ in ssh_clusters}
        (lost_name, lost_host), (kept_name, _) = sorted(
            ssh_clusters, key=lambda pair: pair[0] != running[0].spec.cluster)
        lost_replica = running[0].metadata.name

        lost_host.kill()

        wait_for(lambda: client.get("clusters", lost_name).status.phase == "NOT_READY", 60,
                 message="the dead host's cluster NOT_READY")
        replaced = wait_for(lambda: (replicas := _running(client)) and all(
            r.spec.cluster == kept_name for r in replicas) and replicas, 120, message="replicas all on the kept host")
        assert lost_replica not in {r.metadata.name for r in replaced}
        assert client.get("jobs", "durable").status.phase == "RUNNING"

    deleted = plane.skyctl("delete", "job", "durable")
    assert deleted.returncode == 0, deleted.stderr
    with plane.client() as client:
        wait_for(lambda: not replicas_of(client, "durable"), 60, message="replicas gone")


def _running(client):
    """The job's current replicas when both run (superseded ones may still be going away)."""
    current = [r for r in replicas_of(client, "durable") if not r.metadata.HasField("deletion_timestamp")
               and r.status.phase not in ("EVICTED", "SUCCEEDED", "FAILED")]
    return current if len(current) == 2 and all(r.status.phase == "RUNNING" for r in current) else None
