"""A real local control plane for end-to-end tests: `launch_server.py` and `launch_manager.py`
processes (the manager's cluster controller starts the skylets), skyctl run as a user would,
and a teardown that stops every process by the pid recorded under $SKYSHIFT_HOME."""
from __future__ import annotations

import contextlib

import os
import pathlib
import signal
import subprocess
import sys
from typing import Dict, Iterator, List, Optional

import yaml

from skyshift import config, localmode, processes
from skyshift.client import Client
from tests.conftest import wait_for

ROOT = pathlib.Path(__file__).resolve().parents[2]
#: Fast timings for tests, written to the instance's config.yaml (skylets read it too).
FAST_SETTINGS = {
    "skylet": {"heartbeat_interval": 0.5, "heartbeat_debounce": 0.05, "not_ready_grace": 5.0,
               "eviction_grace": 5.0, "restart_backoff_initial": 0.2, "restart_backoff_max": 2.0,
               "status_poll_interval": 0.2, "stop_timeout": 5.0},
    "drivers": {"stop_grace_period": 2.0},
    "controllers": {"lease_duration": 2.0, "renew_deadline": 1.5, "retry_period": 0.2,
                    "job_restart_backoff_initial": 0.2},
}


def write_config(home: pathlib.Path, extra: Optional[Dict] = None) -> None:
    home.mkdir(parents=True, exist_ok=True)
    values = {section: dict(fields) for section, fields in FAST_SETTINGS.items()}
    for section, fields in (extra or {}).items():
        values.setdefault(section, {}).update(fields)
    (home / "config.yaml").write_text(yaml.safe_dump(values))


def environment(home: pathlib.Path) -> Dict[str, str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("SKYSHIFT_")}
    env["SKYSHIFT_HOME"] = str(home)
    return env


@contextlib.contextmanager
def running_plane(home: pathlib.Path, **options) -> Iterator["ControlPlane"]:
    """A ControlPlane (see its arguments) with its API server and manager started; everything it
    started is stopped by PID on exit."""
    plane = ControlPlane(home, **options)
    try:
        plane.start_server()
        plane.start_manager()
        yield plane
    finally:
        plane.stop()


class ControlPlane:
    """One SkyShift instance under `home`; `etcd` ("host:port") is used instead of the embedded
    one when given (so the API server can be killed without losing its etcd); `extra_settings`
    go to its config.yaml on top of FAST_SETTINGS."""

    def __init__(self, home: pathlib.Path, etcd: Optional[str] = None, extra_settings: Optional[Dict] = None):
        self.home = home
        self.etcd = etcd
        write_config(home, extra_settings)
        self.settings = config.load(home, env={})
        self.server: Optional[subprocess.Popen] = None
        self.manager: Optional[subprocess.Popen] = None

    def _start(self, module: str, *args: str) -> subprocess.Popen:
        log_dir = self.home / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        with open(log_dir / f"{module}.test.log", "ab") as log:
            return subprocess.Popen([sys.executable, "-m", module, "--home", str(self.home), *args], cwd=ROOT,
                                    stdout=log, stderr=subprocess.STDOUT, env=environment(self.home))

    def start_server(self, timeout: float = 30.0) -> str:
        self.server = self._start("launch_server", *(["--etcd", self.etcd] if self.etcd else []))
        pid = self.server.pid
        wait_for(lambda: processes.read_pid(self.settings.api_dir / "pid") == pid and self.ping(), timeout,
                 interval=0.05, message="the API server to answer")
        return self.endpoint

    def start_manager(self) -> None:
        self.manager = self._start("launch_manager")

    @property
    def endpoint(self) -> str:
        return self.settings.api_endpoint_file.read_text().strip()

    def ping(self) -> bool:
        try:
            with Client(endpoint=self.endpoint, settings=self.settings) as client:
                return client.ping(timeout=1.0)
        except FileNotFoundError:
            return False

    def client(self) -> Client:
        return Client(endpoint=self.endpoint, settings=self.settings)

    def skyctl(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "skyctl", *args], cwd=ROOT, env=environment(self.home),
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)

    def skylet_pid(self, name: str = "local") -> Optional[int]:
        return processes.running(self.settings.skylets_dir / f"{name}.pid", ["-m", "skylet", "--cluster", name])

    def kill(self, process: Optional[subprocess.Popen]) -> None:
        """kill -9, as a crash."""
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(10)

    def stop(self) -> None:
        """Stop every process of the instance by its pid (the manager first, so it restarts no
        skylet), and the replicas' process groups the local driver left (only if a test failed
        half-way)."""
        if self.manager is not None and self.manager.poll() is None:
            processes.terminate(self.manager.pid, 10.0)
            self.manager.wait(10)
        for pid in localmode.recorded_pids(self.settings):
            processes.terminate(pid, 10.0)
        if self.server is not None and self.server.poll() is None:
            processes.terminate(self.server.pid, 10.0)
            self.server.wait(10)
        for pid_file in self.settings.clusters_dir.glob("*/replicas/*/*/.skyshift/pid"):
            pid = processes.read_pid(pid_file)
            if pid and processes.is_alive(pid) and processes.matches(pid, ["skyshift-replica"]):
                os.killpg(pid, signal.SIGKILL)


def started_once(path: pathlib.Path) -> bool:
    return path.exists() and path.read_text() == "started\n"


def replicas_of(client: Client, job: str) -> List:
    return client.list("replicas", "default", label_selector=f"skyshift.dev/job={job}").items
