"""Scheduler throughput: pending replicas bound per second, with zero over-commit.

    python -m bench.bench_scheduler [--jobs 10000] [--clusters 100] [--nodes 8] [--repeat 1]

etcd and the API server run as their own processes (bench.common.ControlPlane); the Scheduler
runs in this process. The clusters (100 x 8 nodes by default) are READY Cluster objects whose
per-node capacity is set through the API. Each repetition:

1. baseline: BatchCreate (chunks of 1000) of `--jobs` replicas like the measured ones, but
   already bound to a cluster that does not exist, so the scheduler ignores them: the raw
   rate at which the control plane takes these objects in;
2. burst: a fresh Scheduler runs (caches synced) while `--jobs` pending one-replica replicas
   (1 cpu, 256 MiB) are created the same way; timed from the first create until the
   scheduler's informer has seen every one bound. Create->bound latency = the moment a
   replica is seen bound minus its server-side creation_timestamp;
3. backlog: `--jobs` pending replicas are created with no scheduler running, then a fresh
   Scheduler starts; timed from its start (initial list included) until all are bound. This
   is the placements/s figure held to the target (>= 1,000 placements/s).
At the end it sums, per node, the resources of every replica bound there and counts the
nodes whose allocatable is exceeded (the target is zero).

Each placement costs the API server two writes (the bind, then status SCHEDULED) plus the
Scheduled Event, while the baseline costs one write per object.
"""
from __future__ import annotations

import asyncio
import collections
import math
import time
from typing import Dict, List, Tuple

from bench import common
from skyshift import logging as skyshift_logging
from skyshift.client import AsyncClient
from skyshift.v1 import objects_pb2 as pb

from scheduler.scheduler import Scheduler

CHUNK = 1000
REPLICA_RESOURCES = {"cpus": 1.0, "memory": 256.0}
NODE_MEMORY = 256.0 * 1024
#: Seconds to wait for every replica of a repetition to be bound.
BIND_TIMEOUT = 600.0


def make_replica(namespace: str, name: str, cluster: str = "") -> pb.Replica:
    replica = pb.Replica()
    replica.metadata.name = name
    replica.metadata.namespace = namespace
    replica.metadata.labels.update({"app": "bench", "job": name})
    spec = replica.spec
    spec.job_name = name
    spec.template.image = "ubuntu:22.04"
    spec.template.run = "python train.py --epochs 10"
    spec.template.resources.update(REPLICA_RESOURCES)
    spec.template.replicas = 1
    spec.template.restart_policy = "Never"
    spec.cluster = cluster
    return replica


async def create_in_chunks(client: AsyncClient, objects: List) -> List[float]:
    """BatchCreate `objects` CHUNK at a time, in order; returns each chunk's seconds."""
    seconds = []
    for start in range(0, len(objects), CHUNK):
        began = time.perf_counter()
        for item in await client.batch_create(objects[start:start + CHUNK]):
            if item.error is not None:
                raise item.error
        seconds.append(time.perf_counter() - began)
    return seconds


async def add_clusters(client: AsyncClient, count: int, nodes: int, cpus: float) -> None:
    clusters = []
    for index in range(count):
        cluster = pb.Cluster()
        cluster.metadata.name = f"c{index:03d}"
        cluster.metadata.labels["bench"] = "yes"
        cluster.spec.manager = "sim"
        clusters.append(cluster)
    created = [item.object for item in await client.batch_create(clusters)]
    for cluster in created:
        cluster.status.phase = "READY"
        cluster.status.capabilities.extend(["images", "logs"])
        for node in range(nodes):
            resources = {"cpus": cpus, "memory": NODE_MEMORY}
            cluster.status.capacity[f"node-{node}"].resources.update(resources)
            cluster.status.allocatable[f"node-{node}"].resources.update(resources)
    for item in await client.batch_update(created, status=True):
        if item.error is not None:
            raise item.error


async def schedule_until_bound(client: AsyncClient, settings, namespace: str, jobs: int,
                               create: List[pb.Replica]) -> Tuple[float, List[float]]:
    """Run a fresh Scheduler until it has bound all `jobs` replicas of `namespace`; `create`
    (possibly empty) is created once its caches are synced. Returns (seconds from the creation
    of `create`, or else from the scheduler's start, until all are bound; create->bound seconds
    of each replica)."""
    async with AsyncClient(endpoint=client.endpoint, settings=settings) as scheduler_client:
        began = time.time()
        scheduler = Scheduler(scheduler_client)
        bound_at: Dict[str, float] = {}
        latencies: List[float] = []
        all_bound = asyncio.Event()

        def on_replica(event_type: str, replica: pb.Replica, old) -> None:
            if replica.metadata.namespace != namespace or not replica.spec.cluster:
                return
            if replica.metadata.name in bound_at:
                return
            now = time.time()
            bound_at[replica.metadata.name] = now
            latencies.append(now - replica.metadata.creation_timestamp.ToNanoseconds() / 1e9)
            if len(bound_at) == jobs:
                all_bound.set()

        scheduler.replicas.add_handler(on_replica)
        task = asyncio.get_running_loop().create_task(scheduler.run())
        try:
            if create:
                for informer in (scheduler.clusters, scheduler.replicas, scheduler.policies, scheduler.jobs):
                    await informer.wait_synced()
                began = time.time()
                await create_in_chunks(client, create)
            await asyncio.wait_for(all_bound.wait(), BIND_TIMEOUT)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    return max(bound_at.values()) - began, latencies


async def overcommitted_nodes(client: AsyncClient) -> Tuple[int, int]:
    """(nodes whose bound replicas need more than their allocatable, replicas bound to real nodes)."""
    clusters = {c.metadata.name: c for c in (await client.list_all("clusters")).items}
    used: Dict[Tuple[str, str], Dict[str, float]] = collections.defaultdict(lambda: collections.defaultdict(float))
    counted = 0
    for replica in (await client.list_all("replicas")).items:
        if replica.spec.cluster in clusters:
            counted += 1
            for name, amount in replica.spec.template.resources.items():
                used[(replica.spec.cluster, replica.spec.node)][name] += amount
    over = 0
    for (cluster, node), usage in used.items():
        allocatable = clusters[cluster].status.allocatable.get(node)
        if allocatable is None or any(amount > allocatable.resources.get(name, 0.0) + 1e-9
                                      for name, amount in usage.items()):
            over += 1
    return over, counted


async def run(args) -> List[common.Result]:
    # Room for every repetition's replicas, with a margin, on the nodes the benchmark declares.
    cpus = max(16.0, float(math.ceil(1.25 * 2 * args.jobs * args.repeat / (args.clusters * args.nodes))))
    burst_rates, backlog_rates, baselines, chunk_seconds, latencies = [], [], [], [], []
    with common.ControlPlane(args.etcd_no_fsync) as plane:
        common.say(plane.describe())
        settings = plane.settings
        async with AsyncClient(endpoint=plane.endpoint, settings=settings) as client:
            await add_clusters(client, args.clusters, args.nodes, cpus)
            common.say(f"{args.clusters} READY clusters x {args.nodes} nodes x {cpus:g} cpus")
            for repetition in range(args.repeat):
                names = [f"{prefix}-{repetition}" for prefix in ("baseline", "burst", "backlog")]
                for name in names:
                    await client.create(common.make_namespace(name))
                baseline_ns, burst_ns, backlog_ns = names

                objects = [make_replica(baseline_ns, f"r-{i:05d}", cluster="nowhere") for i in range(args.jobs)]
                began = time.perf_counter()
                chunk_seconds += await create_in_chunks(client, objects)
                baselines.append(args.jobs / (time.perf_counter() - began))

                burst = [make_replica(burst_ns, f"r-{i:05d}") for i in range(args.jobs)]
                seconds, samples = await schedule_until_bound(client, settings, burst_ns, args.jobs, burst)
                burst_rates.append(args.jobs / seconds)
                latencies += samples

                await create_in_chunks(client, [make_replica(backlog_ns, f"r-{i:05d}") for i in range(args.jobs)])
                seconds, _ = await schedule_until_bound(client, settings, backlog_ns, args.jobs, [])
                backlog_rates.append(args.jobs / seconds)
                common.say(f"repetition {repetition + 1}: baseline BatchCreate {baselines[-1]:,.0f} objects/s; "
                           f"burst {burst_rates[-1]:,.0f} placements/s; backlog {backlog_rates[-1]:,.0f} placements/s")
            over, counted = await overcommitted_nodes(client)
    baseline = common.median(baselines)
    chunk_ms = common.median(chunk_seconds) * 1000
    shape = f"{args.clusters} clusters x {args.nodes} nodes, {args.jobs} one-cpu replicas"
    create_baseline = "BatchCreate of the same replicas (chunks of 1000)"
    return [
        common.Result("scheduler", f"placements/s, backlog ({shape} pending before the scheduler starts; "
                      "timed from its start, initial list included)", common.median(backlog_rates), "objects/s",
                      create_baseline, baseline, ">= 1,000 placements/s", common.median(backlog_rates) >= 1000),
        common.Result("scheduler", f"placements/s, burst ({shape} created while the scheduler runs; timed from "
                      "the first create)", common.median(burst_rates), "objects/s", create_baseline, baseline, "",
                      None),
        common.Result("scheduler", "burst create->bound p50", common.percentile(latencies, 50) * 1000, "ms",
                      "one BatchCreate round trip of 1000 replicas", chunk_ms, "", None),
        common.Result("scheduler", "burst create->bound p99", common.percentile(latencies, 99) * 1000, "ms",
                      "one BatchCreate round trip of 1000 replicas", chunk_ms, "", None),
        common.Result("scheduler", f"over-committed nodes ({counted} bound replicas checked)", over, "nodes",
                      "none allowed", 0, "= 0", over == 0),
    ]


def main() -> int:
    parser = common.parser(__doc__.split("\n\n")[0])
    parser.set_defaults(repeat=1)
    parser.add_argument("--jobs", type=int, default=10_000, help="pending one-replica replicas per repetition")
    parser.add_argument("--clusters", type=int, default=100)
    parser.add_argument("--nodes", type=int, default=8, help="nodes per cluster")
    parser.add_argument("--log-level", default="warning", help="the in-process scheduler's log level")
    args = parser.parse_args()
    skyshift_logging.configure(args.log_level)
    return common.main(run, args)


if __name__ == "__main__":
    raise SystemExit(main())
