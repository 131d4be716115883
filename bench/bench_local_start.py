"""Job start-up latency on the local cluster: create Job -> its Replica RUNNING.

    python -m bench.bench_local_start [--jobs 30] [--timeout 60]

A real local control plane in a temporary SKYSHIFT_HOME, as tests/e2e/control_plane.py starts
it: `launch_server` (with its embedded etcd) and `launch_manager --controllers
job,scheduler,cluster`, whose cluster controller creates the `local` cluster and starts its
skylet. The instance runs with the default settings (the e2e tests' fast timings are undone).
`--jobs` Jobs (`run: sleep 30`, restart policy Never, 0.1 cpus), one after the other, are
created through the SDK as `skyctl create job` does; each one's latency is create call ->
a watch event with its Replica's status.phase RUNNING (with the step create -> bound,
spec.cluster set, on the way). Each Job is then deleted and its Replica awaited gone.
Targets: p50 <= 300 ms, p99 <= 1 s. Baseline in the same run: create -> the Job's own ADDED
watch event (the API round trip alone). At the end every process is stopped by the pid
recorded under the temporary home (manager, skylets, API server, leftover replicas).
"""
from __future__ import annotations

import asyncio
import pathlib
import tempfile
import time
from typing import Dict, List

from bench import common
from skyctl import builders
from skyshift import config
from skyshift.api.errors import ConflictError
from skyshift.client import AsyncClient
from tests.e2e.control_plane import FAST_SETTINGS, ControlPlane

JOB_LABEL = "skyshift.dev/job"
CONTROLLERS = "job,scheduler,cluster"
#: Seconds to wait for the local cluster to become READY.
READY_TIMEOUT = 120.0


def default_timings() -> Dict[str, Dict]:
    """The defaults of every setting the e2e control plane makes fast (users get the defaults)."""
    defaults = config.Settings()
    return {section: {name: getattr(getattr(defaults, section), name) for name in fields}
            for section, fields in FAST_SETTINGS.items()}


class Timeline:
    """perf_counter() times at which the watches saw each Job's milestones, and waiters for them."""

    MILESTONES = ("added", "bound", "running", "gone")

    def __init__(self):
        self.seen: Dict[str, Dict[str, float]] = {}
        self._events: Dict[tuple, asyncio.Event] = {}

    def mark(self, job: str, milestone: str) -> None:
        times = self.seen.setdefault(job, {})
        if milestone not in times:
            times[milestone] = time.perf_counter()
            self._event(job, milestone).set()

    def _event(self, job: str, milestone: str) -> asyncio.Event:
        return self._events.setdefault((job, milestone), asyncio.Event())

    async def wait(self, job: str, milestone: str, timeout: float) -> float:
        try:
            await asyncio.wait_for(self._event(job, milestone).wait(), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"job {job}: no '{milestone}' event within {timeout:g}s") from None
        return self.seen[job][milestone]


async def follow_jobs(client: AsyncClient, revision: int, timeline: Timeline) -> None:
    async for event in client.watch("jobs", "default", resource_version=revision):
        if event.type == "ADDED":
            timeline.mark(event.object.metadata.name, "added")


async def follow_replicas(client: AsyncClient, revision: int, timeline: Timeline) -> None:
    async for event in client.watch("replicas", "default", resource_version=revision):
        replica = event.object
        job = replica.metadata.labels.get(JOB_LABEL, "")
        if event.type == "DELETED":
            timeline.mark(job, "gone")
            continue
        if replica.spec.cluster:
            timeline.mark(job, "bound")
        if replica.status.phase == "RUNNING":
            timeline.mark(job, "running")


async def wait_local_ready(client: AsyncClient) -> float:
    started = time.monotonic()
    while True:
        clusters = (await client.list("clusters", field_selector="metadata.name=local")).items
        if clusters and clusters[0].status.phase == "READY":
            return time.monotonic() - started
        if time.monotonic() - started > READY_TIMEOUT:
            raise TimeoutError(f"the local cluster is not READY after {READY_TIMEOUT:.0f}s")
        await asyncio.sleep(0.1)


async def delete_job(client: AsyncClient, name: str, attempts: int = 5) -> None:
    """Delete without preconditions; retried because the server answers such a delete with
    ConflictError when the Job's status changes between its read and its conditional delete."""
    for attempt in range(attempts):
        try:
            await client.delete("jobs", name)
            return
        except ConflictError:
            if attempt == attempts - 1:
                raise
            common.say(f"job {name}: delete conflicted with a concurrent write; retrying")


async def start_one(client: AsyncClient, timeline: Timeline, name: str, timeout: float) -> Dict[str, float]:
    """Create the Job, wait for its Replica RUNNING, delete it and wait for the Replica to go;
    milliseconds from the create call to each milestone."""
    job = builders.job(name, run="sleep 30", restart_policy="Never", cpus=0.1)
    began = time.perf_counter()
    await client.create(job)
    running = await timeline.wait(name, "running", timeout)
    await delete_job(client, name)
    await timeline.wait(name, "gone", timeout)
    seen = timeline.seen[name]
    return {"added": (seen["added"] - began) * 1000, "bound": (seen["bound"] - began) * 1000,
            "running": (running - began) * 1000}


async def measure(plane: ControlPlane, args) -> Dict[str, List[float]]:
    async with AsyncClient(endpoint=plane.endpoint, settings=plane.settings) as client:
        common.say(f"local cluster READY after {await wait_local_ready(client):.1f}s")
        revision = (await client.list("jobs", "default", limit=1)).resource_version
        timeline = Timeline()
        watches = [asyncio.create_task(follow_jobs(client, revision, timeline)),
                   asyncio.create_task(follow_replicas(client, revision, timeline))]
        try:
            await start_one(client, timeline, "warmup", args.timeout)
            samples: Dict[str, List[float]] = {"added": [], "bound": [], "running": []}
            for index in range(args.jobs):
                for milestone, ms in (await start_one(client, timeline, f"start-{index}", args.timeout)).items():
                    samples[milestone].append(ms)
                common.say(f"job {index}: " + ", ".join(f"{m} {v[-1]:.0f} ms" for m, v in samples.items()))
            return samples
        finally:
            for task in watches:
                task.cancel()
            await asyncio.gather(*watches, return_exceptions=True)


async def run(args) -> List[common.Result]:
    with tempfile.TemporaryDirectory(prefix="skyshift-bench-") as root:
        plane = ControlPlane(pathlib.Path(root) / "home", extra_settings=default_timings())
        try:
            plane.start_server()
            plane.manager = plane._start("launch_manager", "--controllers", CONTROLLERS)
            common.say(f"API server pid {plane.server.pid} at {plane.endpoint}, manager pid {plane.manager.pid} "
                       f"({CONTROLLERS}), home {plane.home}")
            samples = await measure(plane, args)
        finally:
            plane.stop()
    running, added, bound = samples["running"], samples["added"], samples["bound"]
    p50, p99 = common.percentile(running, 50), common.percentile(running, 99)
    note = (f"{args.jobs} sequential jobs after one warm-up; create->bound p50 {common.percentile(bound, 50):.0f} "
            f"p99 {common.percentile(bound, 99):.0f} ms; bound->RUNNING p50 "
            f"{common.percentile([r - b for r, b in zip(running, bound)], 50):.0f} ms; max create->RUNNING "
            f"{max(running):.0f} ms; etcd: embedded (launch_server), default settings")
    return [
        common.Result("local_start", "create Job -> Replica RUNNING, p50", p50, "ms",
                      "create -> Job ADDED event, p50", common.percentile(added, 50), "≤ 300 ms", p50 <= 300, note),
        common.Result("local_start", "create Job -> Replica RUNNING, p99", p99, "ms",
                      "create -> Job ADDED event, p99", common.percentile(added, 99), "≤ 1000 ms", p99 <= 1000),
    ]


def main() -> int:
    parser = common.parser(__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=30, help="jobs started one after the other")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each job's milestones")
    return common.main(run, parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
