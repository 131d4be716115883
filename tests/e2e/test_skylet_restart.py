"""Crashes mid-job with real processes: kill -9 of the skylet, and of the API server and the
manager together. The replicas keep running, are adopted by the next skylet, and none runs twice
(each replica appends one line to a file per start)."""
from __future__ import annotations

import os
import signal

import pytest

from skyshift.store.embedded import EmbeddedEtcd
from tests.conftest import wait_for
from tests.e2e.control_plane import ControlPlane, replicas_of, running_plane, started_once

pytestmark = pytest.mark.slow

REPLICAS = 2


@pytest.fixture
def etcd(tmp_path):
    server = EmbeddedEtcd(tmp_path / "etcd", fast=True)
    server.start()
    try:
        server.wait_healthy(20)
        yield server
    finally:
        server.stop(kill=True)


@pytest.fixture
def plane(tmp_path, etcd):
    with running_plane(tmp_path / "home", etcd=etcd.endpoint) as control_plane:
        yield control_plane


def start_held_job(plane: ControlPlane, tmp_path):
    """A job whose replicas record each start, then run until `release` exists."""
    release = tmp_path / "release"
    script = (f"echo started >> {tmp_path}/starts-$SKYSHIFT_REPLICA_RANK; "
              f"while [ ! -e {release} ]; do sleep 0.05; done; echo done-$SKYSHIFT_REPLICA_RANK")
    result = plane.skyctl("create", "job", "held", "--replicas", str(REPLICAS), "--cpus", "0.1",
                          "--restart-policy", "Never", "--run", script)
    assert result.returncode == 0, result.stderr
    with plane.client() as client:
        wait_for(lambda: all(started_once(tmp_path / f"starts-{rank}") for rank in range(REPLICAS)), 60,
                 message="replicas started")
        running = wait_for(lambda: _all_running(client), 60, message="replicas RUNNING")
    return release, {r.metadata.name: r.status.handle for r in running}


def _all_running(client):
    replicas = replicas_of(client, "held")
    return replicas if len(replicas) == REPLICAS and all(r.status.phase == "RUNNING" for r in replicas) else None


def finish_and_check(plane: ControlPlane, tmp_path, release, handles) -> None:
    release.touch()
    with plane.client() as client:
        job = wait_for(lambda: (job := client.get("jobs", "held")).status.phase in ("COMPLETED", "FAILED") and job,
                       60, message="job finished")
        assert job.status.phase == "COMPLETED"
        assert job.status.restarts == 0
        final = replicas_of(client, "held")
    # The same replicas ran to the end, each started exactly once.
    assert {r.metadata.name: r.status.handle for r in final} == handles
    assert all(r.status.phase == "SUCCEEDED" for r in final)
    for rank in range(REPLICAS):
        assert started_once(tmp_path / f"starts-{rank}")
    logs = plane.skyctl("logs", "held")
    assert sorted(logs.stdout.splitlines()) == [f"[held-{rank}] done-{rank}" for rank in range(REPLICAS)]


def test_kill_9_skylet_mid_job(plane, tmp_path):
    release, handles = start_held_job(plane, tmp_path)
    first = plane.skylet_pid()
    os.kill(first, signal.SIGKILL)

    # The cluster controller starts a new skylet, which adopts the running replicas.
    wait_for(lambda: (pid := plane.skylet_pid()) and pid != first, 30, message="skylet restarted")
    finish_and_check(plane, tmp_path, release, handles)


def test_kill_9_api_server_and_manager_mid_job(plane, tmp_path):
    release, handles = start_held_job(plane, tmp_path)
    skylet = plane.skylet_pid()
    plane.kill(plane.server)
    plane.kill(plane.manager)

    # Restarted, the API server listens on a new port: the new manager replaces the skylet that
    # still talks to the old address, and the new skylet adopts the replicas.
    plane.start_server()
    plane.start_manager()
    wait_for(lambda: (pid := plane.skylet_pid()) and pid != skylet, 60, message="skylet replaced")
    with plane.client() as client:
        wait_for(lambda: client.get("clusters", "local").status.phase == "READY", 60, message="cluster READY")
    finish_and_check(plane, tmp_path, release, handles)
