"""CPU cost of heartbeats: many sim clusters served by one skylet, through the API server.

    python -m bench.bench_sim_heartbeats [--clusters 1000] [--nodes 8] [--seconds 60]

etcd and the API server run as their own processes (bench.common.ControlPlane); `--clusters`
Clusters with spec.manager sim and spec.simulation.nodes `--nodes` are created, then ONE skylet
process (`python -m skylet --manager sim`) serves them all. Once every cluster is READY, for
`--seconds` the benchmark measures the CPU seconds per second of the skylet and of the API
server (utime + stime from /proc/PID/stat; printed as ms of CPU per second,
1000 = one core busy) and counts the Cluster MODIFIED events on a watch
(heartbeats written per second). Baseline in the same run: the API server's CPU while idle for
as long, with the clusters created and the watch open, before the skylet starts. No target (the
issue asks for the figures).
"""
from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from typing import List

from bench import common
from skyshift.client import AsyncClient
from skyshift.v1 import objects_pb2 as pb

#: Seconds to wait for the skylet to report every cluster READY.
READY_TIMEOUT = 300.0


def sim_cluster(index: int, nodes: int) -> pb.Cluster:
    cluster = pb.Cluster()
    cluster.metadata.name = f"sim-{index:05d}"
    cluster.spec.manager = "sim"
    cluster.spec.simulation.nodes = nodes
    return cluster


class ModifiedCounter:
    """Counts Cluster MODIFIED events from a watch opened at `revision`, in the background."""

    def __init__(self, client: AsyncClient, revision: int):
        self.count = 0
        self._task = asyncio.create_task(self._consume(client, revision))

    async def _consume(self, client: AsyncClient, revision: int) -> None:
        async for event in client.watch("clusters", resource_version=revision):
            if event.type == "MODIFIED":
                self.count += 1

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


@contextlib.contextmanager
def skylet_process(plane: common.ControlPlane):
    """The one skylet serving every sim cluster; stopped by its pid."""
    log = open(plane.root / "skylet.log", "ab")
    process = common.python_process(["-m", "skylet", "--manager", "sim", "--server", plane.endpoint,
                                     "--home", str(plane.home), "--log-level", "warning"],
                                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        yield process
    finally:
        common.stop_process(process)
        log.close()


async def ready_count(client: AsyncClient) -> int:
    clusters = (await client.list_all("clusters", field_selector="spec.manager=sim")).items
    return sum(cluster.status.phase == "READY" for cluster in clusters)


async def wait_all_ready(client: AsyncClient, skylet: subprocess.Popen, total: int) -> float:
    """Seconds until every sim cluster is READY."""
    started = time.monotonic()
    while (ready := await ready_count(client)) < total:
        if skylet.poll() is not None:
            raise RuntimeError(f"the skylet exited with code {skylet.returncode}")
        if time.monotonic() - started > READY_TIMEOUT:
            raise TimeoutError(f"only {ready} of {total} clusters READY after {READY_TIMEOUT:.0f}s")
        await asyncio.sleep(0.5)
    return time.monotonic() - started


async def measure(seconds: float, counter: ModifiedCounter, **pids: int):
    """(CPU seconds per second of each process, MODIFIED events per second) over `seconds`."""
    events = counter.count
    with common.CpuMeter(**pids) as meter:
        started = time.monotonic()
        await asyncio.sleep(seconds)
        elapsed = time.monotonic() - started
    return ({name: used / elapsed for name, used in meter.used.items()}, (counter.count - events) / elapsed)


async def run(args) -> List[common.Result]:
    with common.ControlPlane(args.etcd_no_fsync) as plane:
        common.say(plane.describe())
        settings = plane.settings
        interval = settings.skylet.heartbeat_interval
        async with AsyncClient(endpoint=plane.endpoint, settings=settings) as client:
            clusters = [sim_cluster(i, args.nodes) for i in range(args.clusters)]
            await common.batch_create_all(client, clusters)
            revision = (await client.list("clusters", limit=1)).resource_version
            counter = ModifiedCounter(client, revision)
            try:
                common.say(f"{args.clusters} sim clusters of {args.nodes} nodes created; API server idle for "
                           f"{args.seconds:g}s (baseline)")
                idle_cpu, idle_events = await measure(args.seconds, counter, server=plane.server.pid,
                                                      etcd=plane.etcd.process.pid)
                with skylet_process(plane) as skylet:
                    took = await wait_all_ready(client, skylet, args.clusters)
                    common.say(f"skylet pid {skylet.pid}: all {args.clusters} clusters READY after {took:.1f}s; "
                               f"measuring for {args.seconds:g}s")
                    busy_cpu, rate = await measure(args.seconds, counter, server=plane.server.pid,
                                                   etcd=plane.etcd.process.pid, skylet=skylet.pid)
                    if skylet.poll() is not None:
                        raise RuntimeError(f"the skylet exited with code {skylet.returncode} while measured")
            finally:
                await counter.close()
    common.say(f"idle: CPU s/s {fmt(idle_cpu)}, {idle_events:.1f} MODIFIED/s; heartbeating: CPU s/s "
               f"{fmt(busy_cpu)}, {rate:.1f} MODIFIED/s")
    setup = (f"{args.clusters} sim clusters x {args.nodes} nodes, one skylet, skylet.heartbeat_interval "
             f"{interval:g}s (expected {args.clusters / interval:,.0f} heartbeats/s), {args.seconds:g}s windows; "
             f"etcd CPU {busy_cpu['etcd']:.3f} s/s (idle {idle_cpu['etcd']:.3f}); {plane.etcd_mode}")
    baseline = f"API server idle, {args.clusters} clusters stored"
    return [
        common.Result("sim_heartbeats", "API server CPU while heartbeating", busy_cpu["server"] * 1000, "ms CPU/s",
                      baseline, idle_cpu["server"] * 1000, "", None, setup),
        common.Result("sim_heartbeats", "skylet CPU (one process, all clusters)", busy_cpu["skylet"] * 1000, "ms CPU/s",
                      baseline, idle_cpu["server"] * 1000, "", None,
                      f"{busy_cpu['skylet'] * 1000 / max(rate, 1e-9):.2f} ms skylet CPU per heartbeat, "
                      f"{busy_cpu['server'] * 1000 / max(rate, 1e-9):.2f} ms API server CPU per heartbeat"),
        common.Result("sim_heartbeats", "heartbeats written (Cluster MODIFIED events)", rate, "/s",
                      f"clusters / heartbeat_interval ({interval:g}s)", args.clusters / interval, "", None),
    ]


def fmt(cpu) -> str:
    return ", ".join(f"{name} {value:.3f}" for name, value in cpu.items())


def main() -> int:
    parser = common.parser(__doc__.splitlines()[0])
    parser.add_argument("--clusters", type=int, default=1000, help="sim clusters served by the one skylet")
    parser.add_argument("--nodes", type=int, default=8, help="spec.simulation.nodes of each cluster")
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the idle and the measured window")
    return common.main(run, parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
