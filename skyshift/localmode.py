"""Local mode: a single user needs no set-up step (DESIGN.md §6).

When no API server is configured (no client.endpoint in config.yaml, no SKYSHIFT_API_SERVER,
no --server) and nothing answers at the address the local server recorded, skyctl calls
`ensure_running(settings)`, which starts the local control plane in the background:

* `python -m launch_server --home H`: the API server and its embedded etcd; it records its
  pid and endpoint under H/api;
* `python -m launch_manager --home H`: the controllers, whose cluster controller creates the
  `local` cluster and starts its skylet; its pid is recorded in H/manager/pid.

Both run detached (their own sessions, output in H/logs) and outlive skyctl. An exclusive
flock on H/localmode.lock makes two skyctl invocations that start at once wait for each other
instead of starting two control planes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import pathlib
import subprocess
import sys
import time
from typing import Callable, Iterator, List, Optional

from skyshift import config, processes
from skyshift.api.errors import UnavailableError

LOCK_FILE = "localmode.lock"
#: Lines of a component's log quoted when it fails to start.
LOG_TAIL_LINES = 15
#: Seconds between checks while waiting for the lock or for the API server to answer.
POLL_INTERVAL = 0.05


@dataclasses.dataclass(frozen=True)
class Component:
    """One background process of the local control plane."""

    title: str
    module: str
    pid_file: pathlib.Path
    log_file: pathlib.Path
    home: pathlib.Path

    def command(self) -> List[str]:
        return [sys.executable, "-m", self.module, "--home", str(self.home)]

    def pid(self) -> Optional[int]:
        """The pid of this component running for this home, or None."""
        return processes.running(self.pid_file, [self.module, "--home", str(self.home)])

    def log_tail(self) -> str:
        try:
            lines = self.log_file.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return ""
        return "\n".join(lines[-LOG_TAIL_LINES:])


def api_server(settings: config.Settings) -> Component:
    return Component("API server", "launch_server", settings.api_dir / "pid", settings.log_dir / "api_server.log",
                     settings.home_path)


def manager(settings: config.Settings) -> Component:
    return Component("controller manager", "launch_manager", settings.home_path / "manager" / "pid",
                     settings.log_dir / "manager.log", settings.home_path)


def is_local_default(settings: config.Settings) -> bool:
    """Whether the client uses the local default endpoint (nothing configured)."""
    return not settings.client.endpoint


def recorded_pids(settings: config.Settings) -> List[int]:
    """The pids of every local control plane process recorded under $SKYSHIFT_HOME that still
    runs, in the order to stop them in: the manager (which would restart stopped skylets), the
    skylets, then the API server."""
    skylets = [processes.running(path, ["-m", "skylet"]) for path in sorted(settings.skylets_dir.glob("*.pid"))]
    pids = [manager(settings).pid(), *skylets, api_server(settings).pid()]
    return [pid for pid in pids if pid]


def _answering_endpoint(settings: config.Settings, timeout: float) -> Optional[str]:
    """The recorded endpoint of the local API server if it answers within `timeout` seconds."""
    from skyshift.client import Client

    try:
        endpoint = settings.api_endpoint_file.read_text().strip()
    except FileNotFoundError:
        return None
    if not endpoint or api_server(settings).pid() is None:
        return None
    with Client(endpoint=endpoint, settings=settings) as client:
        return endpoint if client.ping(timeout=timeout) else None


@contextlib.contextmanager
def _locked(settings: config.Settings) -> Iterator[None]:
    path = settings.home_path / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    timeout = settings.skylet.local_lock_timeout
    deadline = time.monotonic() + timeout
    with open(path, "a") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise UnavailableError(f"another skyctl has been starting the local control plane under "
                                           f"{settings.home} for over {timeout:g}s ({path} is locked)") from None
                time.sleep(POLL_INTERVAL)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _spawn(component: Component, settings: config.Settings, notify: Callable[[str], None]) -> subprocess.Popen:
    environment = dict(os.environ, SKYSHIFT_HOME=str(settings.home_path))
    environment.pop("SKYSHIFT_API_SERVER", None)
    process = processes.spawn(component.command(), component.log_file, env=environment)
    notify(f"started the local {component.title} (pid {process.pid}, log {component.log_file})")
    return process


def _start_failed(component: Component, problem: str) -> UnavailableError:
    return UnavailableError(f"the local {component.title} {problem}; the end of {component.log_file}:\n"
                            f"{component.log_tail()}")


def _wait_for_server(component: Component, settings: config.Settings, process: Optional[subprocess.Popen],
                     deadline: float) -> str:
    """Wait until the API server (started by us as `process`, or by someone before) answers."""
    while True:
        if process is not None and process.poll() is not None:
            raise _start_failed(component, f"exited with code {process.returncode} while starting")
        endpoint = _answering_endpoint(settings, timeout=max(POLL_INTERVAL, min(1.0, deadline - time.monotonic())))
        if endpoint:
            return endpoint
        if time.monotonic() > deadline:
            if process is not None:
                processes.terminate(process.pid, settings.skylet.stop_timeout)
            raise _start_failed(component, f"did not answer within {settings.client.local_start_timeout:g}s")
        time.sleep(POLL_INTERVAL)


def ensure_running(settings: config.Settings, notify: Callable[[str], None] = lambda message: None) -> str:
    """Start whatever part of the local control plane is not running; return the API server's
    endpoint once it answers. Cheap when everything already runs. `notify` is told, in a
    sentence, about every process started."""
    server, controllers = api_server(settings), manager(settings)
    endpoint = _answering_endpoint(settings, timeout=1.0)
    if endpoint and controllers.pid():
        return endpoint
    with _locked(settings):
        deadline = time.monotonic() + settings.client.local_start_timeout
        endpoint = _answering_endpoint(settings, timeout=1.0)
        if not endpoint:
            # A server that runs but does not answer yet is starting: wait for it, start no second one.
            process = None if server.pid() else _spawn(server, settings, notify)
            endpoint = _wait_for_server(server, settings, process, deadline)
        if not controllers.pid():
            process = _spawn(controllers, settings, notify)
            processes.write_pid(controllers.pid_file, process.pid)
    return endpoint
