"""List latency, and paginated listing of a large namespace.

    python -m bench.bench_list [--jobs 10000] [--jobs-large 100000] [--page-size 5000] [--repeat 10]

* `--jobs` jobs in one namespace (created with BatchCreate); List of all of them through the
  SDK (AsyncClient.list, objects decoded) against one raw etcd range of the same keys through
  aetcd's KV stub (values not decoded). Target: p50 <= 300 ms.
* `--jobs-large` jobs in another namespace, listed with AsyncClient.list_all in pages of
  `--page-size` (every page at the first page's revision): must work and return every job
  exactly once. Baseline: the same pages as raw etcd ranges at one revision.
Repetitions alternate raw and API listings; medians are reported.
"""
from __future__ import annotations

import os
import time
from typing import List, Tuple

import aetcd
from aetcd import rpc

from bench import common
from skyshift.client import AsyncClient
from skyshift.store.etcd import namespace_prefix, parse_endpoints, prefix_end


async def create_jobs(client: AsyncClient, namespace: str, count: int) -> float:
    """Create `count` jobs in a new namespace; seconds taken."""
    await client.create(common.make_namespace(namespace))
    started = time.perf_counter()
    await common.batch_create_all(client, [common.make_job(f"job-{i}", namespace) for i in range(count)])
    return time.perf_counter() - started


async def raw_range(etcd: aetcd.Client, namespace: str, page_size: int = 0) -> Tuple[float, int]:
    """(seconds, keys) to read every job key of `namespace` straight from etcd, in pages of
    `page_size` (0: one request) at the first page's revision."""
    prefix = namespace_prefix("jobs", namespace)
    end = prefix_end(prefix)
    started = time.perf_counter()
    start, revision, keys = prefix, 0, 0
    while True:
        response = await etcd.kvstub.Range(rpc.RangeRequest(key=start, range_end=end, limit=page_size,
                                                             revision=revision))
        revision = revision or response.header.revision
        keys += len(response.kvs)
        if not response.more:
            return time.perf_counter() - started, keys
        start = response.kvs[-1].key + b"\0"


def check_count(what: str, found: int, expected: int) -> None:
    if found != expected:
        raise AssertionError(f"{what} returned {found} jobs, expected {expected}")


async def api_list(client: AsyncClient, namespace: str, expected: int) -> float:
    started = time.perf_counter()
    result = await client.list("jobs", namespace)
    elapsed = time.perf_counter() - started
    check_count("List", len(result.items), expected)
    return elapsed


async def run(args) -> List[common.Result]:
    with common.ControlPlane(args.etcd_no_fsync) as plane:
        common.say(plane.describe())
        host, port = parse_endpoints(plane.etcd.endpoint)
        async with AsyncClient(endpoint=plane.endpoint, settings=plane.settings) as client, \
                aetcd.Client(host=host, port=port) as etcd:
            created = await create_jobs(client, "list-small", args.jobs)
            common.say(f"created {args.jobs} jobs in {created:.1f} s ({args.jobs / created:,.0f}/s)")
            await api_list(client, "list-small", args.jobs)  # warm-up
            await raw_range(etcd, "list-small")
            raw_times, api_times = [], []
            meter = common.CpuMeter(server=plane.server.pid, etcd=plane.etcd.process.pid, client=os.getpid())
            cpu_ms = []
            for rep in range(args.repeat):
                seconds, keys = await raw_range(etcd, "list-small")
                check_count("raw range", keys, args.jobs)
                raw_times.append(seconds * 1000)
                with meter:
                    api_times.append(await api_list(client, "list-small", args.jobs) * 1000)
                cpu_ms.append(meter.per_operation_ms(1))
            cpu = ", ".join(f"{name} {common.median([c[name] for c in cpu_ms]):.0f}" for name in meter.pids)
            common.say(f"List {args.jobs}: {fmt(api_times)}; raw range: {fmt(raw_times)}; CPU ms per List, "
                       f"median: {cpu}")

            created = await create_jobs(client, "list-large", args.jobs_large)
            common.say(f"created {args.jobs_large} jobs in {created:.1f} s ({args.jobs_large / created:,.0f}/s)")
            large_times, large_raw_times = [], []
            names_ok = True
            for rep in range(args.large_repeat):
                seconds, keys = await raw_range(etcd, "list-large", args.page_size)
                check_count("raw paginated range", keys, args.jobs_large)
                large_raw_times.append(seconds * 1000)
                started = time.perf_counter()
                listed = await client.list_all("jobs", "list-large", page_size=args.page_size)
                large_times.append((time.perf_counter() - started) * 1000)
                names = [job.metadata.name for job in listed.items]
                exact = len(names) == args.jobs_large and set(names) == {f"job-{i}" for i in range(args.jobs_large)}
                names_ok = names_ok and exact
                common.say(f"list_all {args.jobs_large} in pages of {args.page_size}: {large_times[-1]:.0f} ms, "
                           f"{len(names)} jobs, {len(set(names))} distinct, exact: {exact}; "
                           f"raw paginated range {seconds * 1000:.0f} ms")
    setup = plane.etcd_mode
    small, small_raw = common.median(api_times), common.median(raw_times)
    large, large_raw = common.median(large_times), common.median(large_raw_times)
    return [
        common.Result("list", f"List {args.jobs:,} jobs in one namespace, p50", small, "ms",
                      "raw etcd range of the same keys (aetcd)", small_raw, "≤ 300 ms", small <= 300,
                      f"{args.repeat} reps; API {fmt(api_times)}; raw {fmt(raw_times)}; CPU ms per List, median: "
                      f"{cpu}; {setup}"),
        common.Result("list", f"list_all {args.jobs_large:,} jobs, pages of {args.page_size}", large, "ms",
                      f"raw etcd ranges, pages of {args.page_size}", large_raw, "works, exact count", names_ok,
                      f"{args.large_repeat} reps: {', '.join(f'{t:.0f}' for t in large_times)} ms; every job "
                      f"exactly once: {names_ok}"),
    ]


def fmt(times_ms) -> str:
    return (f"p50 {common.median(times_ms):.0f} ms, min {min(times_ms):.0f}, max {max(times_ms):.0f} "
            f"({len(times_ms)} runs)")


def main() -> int:
    parser = common.parser(__doc__.splitlines()[0])
    parser.set_defaults(repeat=10)
    parser.add_argument("--jobs", type=int, default=10_000, help="jobs in the namespace listed at once")
    parser.add_argument("--jobs-large", type=int, default=100_000, help="jobs in the namespace listed in pages")
    parser.add_argument("--page-size", type=int, default=5000)
    parser.add_argument("--large-repeat", type=int, default=3, help="repetitions of the paginated listing")
    return common.main(run, parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
