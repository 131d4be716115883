"""The local API server behind `skyctl api start|stop|status|info`: a detached
`python -m launch_server` whose pid and endpoint live under $SKYSHIFT_HOME/api (launch_server
writes them when it serves and removes them when it stops)."""
from __future__ import annotations

import dataclasses
import os
import pathlib
import subprocess
import time
from typing import List, Optional

from skyshift import config, localmode, processes


class LocalServerError(Exception):
    """The local server could not be started or stopped; the message says why."""


@dataclasses.dataclass
class Started:
    endpoint: str
    pid: int
    already_running: bool


class LocalServer:
    def __init__(self, settings: config.Settings):
        self.settings = settings
        self.component = localmode.api_server(settings)
        self.log_file = self.component.log_file
        self.endpoint_file = settings.api_endpoint_file
        self.etcd_endpoint_file = settings.etcd_dir / "endpoint"

    @staticmethod
    def _read(path: pathlib.Path) -> Optional[str]:
        try:
            return path.read_text().strip() or None
        except FileNotFoundError:
            return None

    def pid(self) -> Optional[int]:
        """The pid of the local server running for this home, or None."""
        return self.component.pid()

    def endpoint(self) -> Optional[str]:
        return self._read(self.endpoint_file)

    def etcd_endpoint(self) -> Optional[str]:
        return self._read(self.etcd_endpoint_file)

    def _remove_records(self) -> None:
        """Forget a server that died without cleaning up (e.g. SIGKILL)."""
        for path in (self.endpoint_file, self.component.pid_file):
            path.unlink(missing_ok=True)

    def command(self, etcd: Optional[str], listen: Optional[str]) -> List[str]:
        command = self.component.command()
        if etcd:
            command += ["--etcd", etcd]
        if listen:
            command += ["--listen", listen]
        return command

    def start(self, etcd: Optional[str] = None, listen: Optional[str] = None) -> Started:
        """Start the server detached and wait until it answers; returns at once if one runs."""
        running, endpoint = self.pid(), self.endpoint()
        if running and endpoint:
            return Started(endpoint, running, already_running=True)
        if running:
            raise LocalServerError(f"an API server (pid {running}) is starting or stopping under "
                                   f"{self.settings.home}; try again shortly")
        self._remove_records()
        environment = dict(os.environ, SKYSHIFT_HOME=str(self.settings.home_path))
        process = processes.spawn(self.command(etcd, listen), self.log_file, env=environment)
        try:
            endpoint = self._wait_started(process)
        except BaseException:
            self._terminate(process.pid)
            raise
        return Started(endpoint, process.pid, already_running=False)

    def _wait_started(self, process: subprocess.Popen) -> str:
        from skyshift.client import Client

        timeout = self.settings.client.local_start_timeout
        deadline = time.monotonic() + timeout
        while True:
            code = process.poll()
            if code is not None:
                last = (self.component.log_tail().splitlines() or [""])[-1].strip()
                raise LocalServerError(f"the API server exited with code {code} while starting"
                                       f"{f' ({last})' if last else ''}; see {self.log_file}")
            endpoint = self.endpoint()
            if endpoint and processes.read_pid(self.component.pid_file) == process.pid:
                with Client(endpoint=endpoint, settings=self.settings) as client:
                    if client.ping(timeout=max(0.1, deadline - time.monotonic())):
                        return endpoint
            if time.monotonic() > deadline:
                raise LocalServerError(f"the API server did not answer within {timeout:g}s; see {self.log_file}")
            time.sleep(self.settings.skyctl.server_poll_interval)

    def _embedded_etcd_pids(self) -> List[int]:
        """The embedded etcd of this home (it runs in its own session, so it outlives a killed server)."""
        expected = ["--data-dir", str(self.settings.etcd_dir / "data")]
        pids = [int(entry.name) for entry in pathlib.Path("/proc").glob("[0-9]*")]
        return [pid for pid in pids if processes.matches(pid, expected)]

    def _terminate(self, pid: int) -> bool:
        """SIGTERM (the server then stops its etcd and removes its records), SIGKILL after the stop
        timeout; then nothing of it may remain. True once the server is gone."""
        settings = self.settings.skyctl
        if not processes.terminate(pid, settings.server_stop_timeout, settings.server_poll_interval):
            return False
        for orphan in self._embedded_etcd_pids():  # only after a SIGKILL
            processes.terminate(orphan, settings.server_stop_timeout, settings.server_poll_interval)
        self._remove_records()
        return True

    def stop(self) -> Optional[int]:
        """Stop the running server; returns its pid, or None if none was running."""
        pid = self.pid()
        if pid is None:
            self._remove_records()
            return None
        if not self._terminate(pid):
            raise LocalServerError(f"the API server (pid {pid}) did not exit")
        return pid
