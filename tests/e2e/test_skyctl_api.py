"""`skyctl api start|status|info|stop` with real processes: the detached API server and its
embedded etcd under a temporary SKYSHIFT_HOME."""
from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
from typing import List

import pytest

from skyshift import processes

pytestmark = pytest.mark.slow


def run_skyctl(home: pathlib.Path, *args: str, server: str = "") -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k not in ("SKYSHIFT_API_SERVER", "SKYSHIFT_TOKEN")}
    environment["SKYSHIFT_HOME"] = str(home)
    if server:
        environment["SKYSHIFT_API_SERVER"] = server
    return subprocess.run([sys.executable, "-m", "skyctl", *args], capture_output=True, text=True,
                          env=environment, timeout=120)


def etcd_pids(home: pathlib.Path) -> List[int]:
    expected = ["--data-dir", str(home / "etcd" / "data")]
    return [int(p.name) for p in pathlib.Path("/proc").glob("[0-9]*") if processes.matches(int(p.name), expected)]


@pytest.fixture
def home(tmp_path):
    """A fresh SKYSHIFT_HOME; whatever the test started there is stopped by pid afterwards."""
    home = tmp_path / "home"
    started: List[int] = []
    yield home, started
    recorded = processes.read_pid(home / "api" / "pid")
    for pid in started + ([recorded] if recorded else []):
        if processes.is_alive(pid) and processes.matches(pid, ["launch_server", "--home", str(home)]):
            processes.terminate(pid, timeout=15)
    for pid in etcd_pids(home):
        processes.terminate(pid, timeout=5)


def test_api_start_status_get_stop(home):
    home, started = home
    status = run_skyctl(home, "api", "status")
    assert (status.returncode, status.stdout) == (1, "stopped\n")

    start = run_skyctl(home, "api", "start")
    match = re.fullmatch(r"API server running at (127\.0\.0\.1:\d+) \(pid (\d+), log (.+)\)\n", start.stdout)
    assert start.returncode == 0 and match, start.stdout + start.stderr
    endpoint, pid = match[1], int(match[2])
    started.append(pid)
    assert (home / "api" / "endpoint").read_text().strip() == endpoint
    assert pathlib.Path(match[3]) == home / "logs" / "api_server.log"
    assert etcd_pids(home), "the embedded etcd runs"

    again = run_skyctl(home, "api", "start")
    assert again.returncode == 0 and again.stdout == f"API server already running at {endpoint} (pid {pid})\n"
    status = run_skyctl(home, "api", "status")
    assert (status.returncode, status.stdout) == (0, f"running at {endpoint} (pid {pid})\n")
    info = run_skyctl(home, "api", "info").stdout
    assert f"endpoint:       {endpoint} (from {home / 'api' / 'endpoint'})" in info
    assert "reachable:      yes" in info and f"home:           {home}" in info
    assert re.search(r"etcd endpoint:  127\.0\.0\.1:\d+", info)

    # The address is given explicitly: with nothing configured skyctl would also start the
    # local controller manager (local mode), which is not what this test is about.
    created = run_skyctl(home, "create", "namespace", "from-cli", server=endpoint)
    assert created.returncode == 0, created.stderr
    listed = run_skyctl(home, "get", "namespaces", server=endpoint)
    assert listed.returncode == 0, listed.stderr
    assert [line.split()[0] for line in listed.stdout.splitlines()[1:]] == ["default", "from-cli", "skyshift-system"]

    stop = run_skyctl(home, "api", "stop")
    assert (stop.returncode, stop.stdout) == (0, f"API server stopped (pid {pid})\n")
    assert not processes.is_alive(pid)
    assert not (home / "api" / "endpoint").exists() and not (home / "api" / "pid").exists()
    assert etcd_pids(home) == []
    status = run_skyctl(home, "api", "status")
    assert (status.returncode, status.stdout) == (1, "stopped\n")
    assert run_skyctl(home, "api", "stop").stdout == "API server is not running\n"

    unreachable = run_skyctl(home, "get", "jobs", server=endpoint)
    assert unreachable.returncode == 1
    assert unreachable.stderr == f"error: cannot reach the API server at {endpoint} (start it with skyctl api start)\n"


def test_api_start_reports_a_server_that_fails(home):
    home, _ = home
    result = run_skyctl(home, "api", "start", "--listen", "not-an-address")
    assert result.returncode == 1
    assert result.stderr.startswith("error: the API server exited with code 1 while starting (")
    assert "not-an-address" in result.stderr and len(result.stderr.splitlines()) == 1
    assert etcd_pids(home) == []
    assert run_skyctl(home, "api", "status").stdout == "stopped\n"
