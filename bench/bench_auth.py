"""The cost of security, and fairness between users.

    python -m bench.bench_auth [--creates 3000] [--in-flight 32] [--repeat 3] [--flood-seconds 5]

* Create throughput with authentication, authorization (a namespace-scoped editor, the usual
  case) and the audit log on, against the same benchmark on an API server with them off, in
  the same run: one etcd, two API server processes (`launch_server.py --auth` and without),
  repetitions interleaved; medians. Target: >= 0.8x.
* Fairness: the Get latency (p99) of a user calling within its limit (`--victim-rate`/s) while
  another user floods the server (a separate process, `--flood-in-flight` calls in flight in a
  loop bounded by `--flood-seconds`), against the same user's p99 with no flood, measured back
  to back on an API server with the default limits. Target: <= 2x.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

import yaml

from bench import common
from skyshift import config, tokens
from skyshift.api.errors import LimitError
from skyshift.client import AsyncClient
from skyshift.store.embedded import EmbeddedEtcd
from skyshift.v1 import objects_pb2 as pb


@contextlib.contextmanager
def api_server(root: pathlib.Path, name: str, etcd: str, auth: bool, settings: Dict):
    """An API server process on `etcd`, its home root/name; yields (its home, its pid)."""
    home = root / name
    home.mkdir(parents=True)
    (home / "config.yaml").write_text(yaml.safe_dump(settings))
    with open(root / f"{home.name}.log", "ab") as log:
        process = common.python_process(["launch_server.py", "--home", str(home), "--etcd", etcd, "--log-level",
                                         "warning", *(["--auth"] if auth else [])],
                                        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        endpoint_file = config.load(home, env={}).api_endpoint_file

        def started() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"API server exited with code {process.returncode}, see {root}/{home.name}.log")
            return endpoint_file.exists()
        common.wait_until(started, common.START_TIMEOUT, "the API server's endpoint file")
        yield home, process.pid
    finally:
        common.stop_process(process)


def connect(home: pathlib.Path, token: str = "") -> AsyncClient:
    settings = config.load(home, env={})
    if token:
        settings.client.token = token
    return AsyncClient(endpoint=settings.api_endpoint_file.read_text().strip(), settings=settings)


async def new_user(admin: AsyncClient, role: str, namespace: str) -> str:
    """A user bound to `role` in `namespace`; its token."""
    name = f"bench-{role}-{os.urandom(3).hex()}"
    secret = await tokens.issue_token(admin, tokens.new_user(name))
    binding = pb.RoleBinding()
    binding.metadata.name = name
    binding.spec.role = role
    binding.spec.users.append(name)
    binding.spec.namespaces.append(namespace)
    await admin.create(binding)
    return secret


async def measure_creates(client: AsyncClient, namespace: str, total: int, in_flight: int) -> float:
    jobs = [common.make_job(f"job-{i}", namespace) for i in range(total)]
    seconds = await common.run_concurrently(total, in_flight, lambda i: client.create(jobs[i]))
    return total / seconds


async def get_latencies(client: AsyncClient, namespace: str, calls: int, rate: float) -> List[float]:
    """Latencies (ms) of `calls` Gets, one at a time, paced at `rate` per second (a user who
    stays within its limit)."""
    latencies = []
    next_call = time.perf_counter()
    for _ in range(calls):
        await asyncio.sleep(max(0.0, next_call - time.perf_counter()))
        started = time.perf_counter()
        await client.get("namespaces", namespace)
        latencies.append((time.perf_counter() - started) * 1000)
        next_call = started + 1 / rate
    return latencies


# ---------------------------------------------------------------------------- the flooding user

async def flood(home: pathlib.Path, token: str, namespace: str, seconds: float, in_flight: int) -> None:
    """Calls as fast as `in_flight` allow until `seconds` have passed; prints "ready" once
    going, then the counts of admitted and refused calls."""
    counts = {"ok": 0, "limited": 0}
    deadline = time.monotonic() + seconds
    async with connect(home, token) as client:
        client.settings.client.retry_attempts = 1

        async def worker() -> None:
            while time.monotonic() < deadline:
                try:
                    await client.get("namespaces", namespace)
                    counts["ok"] += 1
                except LimitError:
                    counts["limited"] += 1
        print("ready", flush=True)
        await asyncio.gather(*(worker() for _ in range(in_flight)))
    print(f"{counts['ok']} {counts['limited']}", flush=True)


@contextlib.contextmanager
def flooder(home: pathlib.Path, token: str, namespace: str, seconds: float, in_flight: int):
    process = common.python_process(["-m", "bench.bench_auth", "--flood", str(home), namespace, str(seconds),
                                     str(in_flight)], env=dict(os.environ, BENCH_TOKEN=token),
                                    stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        if process.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the flooding process exited with code {process.wait()}")
        yield process
    finally:
        common.stop_process(process)
        process.stdout.close()


# ---------------------------------------------------------------------------- the benchmark

async def run(args) -> List[common.Result]:
    root = pathlib.Path(tempfile.mkdtemp(prefix="skyshift-bench-auth-"))
    etcd = EmbeddedEtcd(root / "etcd" / "data", fast=args.etcd_no_fsync, log_file=root / "etcd.log")
    # The throughput server's per-user rate limit is set above what one client reaches, so that
    # part measures the checks, not the throttle (the limiter still runs); the fairness part has
    # a server of its own with the default limits.
    unthrottled = {"limits": {"requests_per_second": 1e6, "request_burst": 1_000_000}}
    try:
        etcd.start()
        etcd.wait_healthy(common.START_TIMEOUT)
        with api_server(root, "open", etcd.endpoint, False, {}) as (open_home, open_pid), \
                api_server(root, "auth", etcd.endpoint, True, unthrottled) as (auth_home, auth_pid):
            common.say(f"etcd {etcd.endpoint}; API servers: auth pid {auth_pid}, open pid {open_pid}; {root}")
            throughput = await measure_throughput(args, open_home, open_pid, auth_home, auth_pid)
        # Its own admin: the first auth server made "admin" in this etcd and keeps its token.
        fair = {"auth": {"admin_user": "fair-admin", "manager_user": "fair-manager"}}
        with api_server(root, "fair", etcd.endpoint, True, fair) as (fair_home, fair_pid):
            common.say(f"fairness: API server pid {fair_pid}, default limits")
            return throughput + [await measure_fairness(args, fair_home)]
    finally:
        etcd.stop(kill=True)
        shutil.rmtree(root, ignore_errors=True)


async def measure_throughput(args, open_home: pathlib.Path, open_pid: int, auth_home: pathlib.Path,
                             auth_pid: int) -> List[common.Result]:
    async with connect(open_home) as open_client, connect(auth_home) as admin:
        namespaces = [f"bench-{i}" for i in range(2 * args.repeat + 2)]
        for name in namespaces:
            await open_client.create(common.make_namespace(name))  # one etcd: both servers see them
        tokens_by_namespace = {name: await new_user(admin, "editor", name) for name in namespaces}
        rates: Dict[str, List[float]] = {"auth": [], "open": []}
        cpu: Dict[str, List[float]] = {"auth": [], "open": []}
        modes = [("open", open_home, open_pid), ("auth", auth_home, auth_pid)]
        for rep in range(-1, args.repeat):  # rep -1 warms both up
            for mode, home, pid in (modes if rep % 2 else modes[::-1]):  # alternate who goes first
                namespace = namespaces[2 * (rep + 1) + (mode == "auth")]
                total = args.creates if rep >= 0 else 300
                async with connect(home, tokens_by_namespace[namespace] if mode == "auth" else "") as client:
                    with common.CpuMeter(server=pid) as meter:
                        rate = await measure_creates(client, namespace, total, args.in_flight)
                if rep >= 0:
                    rates[mode].append(rate)
                    cpu[mode].append(meter.per_operation_ms(total)["server"])
                    common.say(f"rep {rep} {mode}: {rate:,.0f} creates/s, server CPU {cpu[mode][-1]:.3f} ms/create")
    auth_rate, open_rate = common.median(rates["auth"]), common.median(rates["open"])
    return [
        common.Result("auth", f"Create, {args.in_flight} in flight, auth + RBAC (namespaced editor) + audit on",
                      auth_rate, "ops/s", "the same with auth off", open_rate, "≥ 0.8× baseline",
                      auth_rate >= 0.8 * open_rate,
                      f"medians of {args.repeat} x {args.creates}; auth {fmt(rates['auth'])}; "
                      f"open {fmt(rates['open'])}; API server CPU per create, median: auth "
                      f"{common.median(cpu['auth']):.3f} ms, open {common.median(cpu['open']):.3f} ms"),
    ]


async def measure_fairness(args, home: pathlib.Path) -> common.Result:
    namespace = "bench-0"
    async with connect(home) as admin:
        victim_token = await new_user(admin, "viewer", namespace)
        flood_token = await new_user(admin, "viewer", namespace)
    async with connect(home, victim_token) as victim:
        await get_latencies(victim, namespace, 100, args.victim_rate)  # warm up
        alone = await get_latencies(victim, namespace, args.latency_calls, args.victim_rate)
        with flooder(home, flood_token, namespace, args.flood_seconds, args.flood_in_flight) as process:
            flooded = await get_latencies(victim, namespace, args.latency_calls, args.victim_rate)
            ok, limited = process.communicate(timeout=args.flood_seconds + 30)[0].split()
    p99_flooded, p99_alone = common.percentile(flooded, 99), common.percentile(alone, 99)
    return common.Result("auth", f"p99 Get latency of one user while another floods ({args.flood_in_flight} in flight)",
                         p99_flooded, "ms", "the same user's p99 without the flood", p99_alone, "≤ 2× baseline",
                         p99_flooded <= 2 * p99_alone,
                         f"{len(alone)} calls each; p50 {common.median(flooded):.2f} vs {common.median(alone):.2f} ms; "
                         f"flood: {ok} calls admitted, {limited} refused (RESOURCE_EXHAUSTED)")


def fmt(rates) -> str:
    return "[" + ", ".join(f"{r:,.0f}" for r in rates) + "]/s"


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--flood":
        home, namespace, seconds, in_flight = sys.argv[2:6]
        asyncio.run(flood(pathlib.Path(home), os.environ["BENCH_TOKEN"], namespace, float(seconds), int(in_flight)))
        return 0
    parser = common.parser(__doc__.splitlines()[0])
    parser.add_argument("--creates", type=int, default=3000, help="creates per repetition and mode")
    parser.add_argument("--in-flight", type=int, default=32, help="creates in flight")
    parser.add_argument("--latency-calls", type=int, default=400, help="Gets timed per fairness measurement")
    parser.add_argument("--victim-rate", type=float, default=80.0,
                        help="Gets per second of the measured user (within the default per-user limit)")
    parser.add_argument("--flood-seconds", type=float, default=10.0, help="upper bound of the flood's duration")
    parser.add_argument("--flood-in-flight", type=int, default=8, help="calls the flooding user keeps in flight")
    return common.main(run, parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
