"""Jobs on the local cluster with real processes: launch_server.py, launch_manager.py (whose
cluster controller creates the `local` cluster and starts its skylet) and skyctl, as a user
runs them. Also local mode: skyctl starting the whole control plane by itself."""
from __future__ import annotations

import concurrent.futures
import pathlib
import signal
import subprocess
import sys

import pytest

from skyshift import processes
from tests.conftest import wait_for
from tests.e2e.control_plane import ControlPlane, ROOT, environment, replicas_of, running_plane

pytestmark = pytest.mark.slow


@pytest.fixture
def plane(tmp_path):
    with running_plane(tmp_path / "home") as control_plane:
        yield control_plane


def test_three_replica_job_runs_to_completion_with_its_logs(plane):
    result = plane.skyctl("create", "job", "trio", "--replicas", "3", "--cpus", "0.1", "--wait",
                          "--run", "echo out-$SKYSHIFT_REPLICA_RANK-of-$SKYSHIFT_NUM_REPLICAS")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "job/trio created"
    assert sorted(lines[1:]) == [f"[trio-{rank}] out-{rank}-of-3" for rank in range(3)]
    assert "COMPLETED" in result.stderr

    # The output stays readable after the job finished.
    logs = plane.skyctl("logs", "trio")
    assert logs.returncode == 0, logs.stderr
    assert sorted(logs.stdout.splitlines()) == [f"[trio-{rank}] out-{rank}-of-3" for rank in range(3)]
    one = plane.skyctl("logs", "trio", "--replica", "2")
    assert (one.returncode, one.stdout) == (0, "out-2-of-3\n")


def test_wait_exits_with_the_first_failed_replicas_exit_code(plane):
    # Rank 0 fails first (and fails the job); rank 1 a second later, with another code.
    result = plane.skyctl("create", "job", "fails", "--replicas", "2", "--cpus", "0.1", "--wait", "--run",
                          "echo rank $SKYSHIFT_REPLICA_RANK; sleep $SKYSHIFT_REPLICA_RANK; "
                          "exit $((SKYSHIFT_REPLICA_RANK + 3))")
    assert result.returncode == 3, result.stderr
    assert sorted(result.stdout.splitlines()[1:]) == ["[fails-0] rank 0", "[fails-1] rank 1"]
    assert "FAILED" in result.stderr


def test_exec_beside_a_running_replica_then_delete_stops_it(plane):
    created = plane.skyctl("create", "job", "srv", "--cpus", "0.1", "--run", "echo serving; exec sleep 300")
    assert created.returncode == 0, created.stderr
    with plane.client() as client:
        wait_for(lambda: any(r.status.phase == "RUNNING" for r in replicas_of(client, "srv")), 60,
                 message="replica RUNNING")

    result = plane.skyctl("exec", "srv", "--", "bash", "-c", "echo $SKYSHIFT_JOB_NAME in $PWD; exit 7")
    assert result.returncode == 7, result.stderr
    assert result.stdout.startswith("srv in ")
    workdir = result.stdout.split(" in ", 1)[1].strip()

    deleted = plane.skyctl("delete", "job", "srv")
    assert deleted.returncode == 0, deleted.stderr
    with plane.client() as client:
        wait_for(lambda: not replicas_of(client, "srv"), 60, message="replicas gone")
    # The skylet stopped the processes and removed their files before the Replica went.
    assert not pathlib.Path(workdir).exists()


def test_local_mode_starts_the_control_plane_and_runs_a_job(tmp_path):
    plane = ControlPlane(tmp_path / "fresh")  # nothing started: skyctl does it
    try:
        # Two skyctl at once on a fresh home: the lock makes them share one control plane.
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            results = list(pool.map(lambda _: plane.skyctl("get", "clusters"), range(2)))
        for result in results:
            assert result.returncode == 0, result.stderr
        assert len(_pids_running("launch_server", plane.home)) == 1
        assert len(_pids_running("launch_manager", plane.home)) == 1

        result = plane.skyctl("create", "job", "hi", "--run", "echo hi", "--wait")
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines() == ["job/hi created", "hi"]
    finally:
        plane.stop()


def _pids_running(module: str, home: pathlib.Path) -> list:
    return [int(entry.name) for entry in pathlib.Path("/proc").iterdir()
            if entry.name.isdigit() and processes.matches(int(entry.name), ["-m", module, "--home", str(home)])]


def test_ctrl_c_while_waiting_leaves_the_job_running_and_says_how_to_follow_it(plane):
    waiting = subprocess.Popen([sys.executable, "-m", "skyctl", "create", "job", "long", "--cpus", "0.1", "--wait",
                                "--run", "echo begun; exec sleep 300"], cwd=ROOT, env=environment(plane.home),
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with plane.client() as client:
            wait_for(lambda: any(r.status.phase == "RUNNING" for r in replicas_of(client, "long")), 60,
                     message="replica RUNNING")
        assert waiting.stdout.readline() == "job/long created\n"
        assert waiting.stdout.readline() == "begun\n"  # following the logs now
        waiting.send_signal(signal.SIGINT)
        stdout, stderr = waiting.communicate(timeout=30)
    finally:
        if waiting.poll() is None:
            waiting.kill()
    assert waiting.returncode == 130
    assert "skyctl logs long -f" in stderr and "skyctl delete job long" in stderr
    with plane.client() as client:
        assert client.get("jobs", "long").status.phase == "RUNNING"
        assert [r.status.phase for r in replicas_of(client, "long")] == ["RUNNING"]
