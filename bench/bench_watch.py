"""Create -> watch event latency, with 1 and with 1,000 watch streams on one API server.

    python -m bench.bench_watch [--samples 200] [--shared-samples 100] [--streams 1000] \
        [--worker-processes 4] [--repeat 3]

Latency is from just before the Create call is sent to the moment the watching client has the
event (the Create round trip is included). Phases:
1. one watcher (the SDK's AsyncClient.watch on its own namespace);
2. the same measured stream while `--streams` other streams are open from `--worker-processes`
   client processes (bench/watch_worker.py, plain grpc.aio), each filtered to one job name in
   the same namespace: the server offers every event to all of them, each sends nothing;
3. all `--streams` streams watch the same namespace: every event goes to every stream, and the
   figure is the time until the LAST of them has it.
Baseline, measured in each phase: a raw aetcd put -> aetcd watch event of the same bytes.
etcd's own watcher and watch-stream counts (its /metrics) are read before, during both
phases with 1,000 streams, and after: they must not change.
Per repetition the p50 and p99 of `--samples` sequential samples are taken; medians of those
over the repetitions are reported.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
import time
from typing import AsyncIterator, Awaitable, Callable, Dict, List, Optional

import aetcd

from bench import common
from skyshift.client import AsyncClient
from skyshift.store.etcd import parse_endpoints

#: Seconds one event may take before the benchmark gives up.
EVENT_TIMEOUT = 30.0
#: Seconds the worker processes get to open their streams and see the first event.
READY_TIMEOUT = 180.0
#: etcd's metrics of its own watches -> what they count.
ETCD_WATCH_METRICS = {"etcd_debugging_mvcc_watcher_total": "etcd watchers",
                      "etcd_debugging_mvcc_watch_stream_total": "etcd watch streams"}


class Arrivals:
    """When each expected job name arrived on one watch stream (time.monotonic_ns)."""

    def __init__(self):
        self._waiting: Dict[str, asyncio.Future] = {}
        self._error: Optional[BaseException] = None

    def expect(self, name: str) -> asyncio.Future:
        """Call before the write, so that an event arriving early is not missed."""
        future = self._waiting.setdefault(name, asyncio.get_running_loop().create_future())
        if self._error is not None:
            future.set_exception(self._error)
        return future

    def arrived(self, name: str) -> None:
        future = self._waiting.pop(name, None)
        if future is not None and not future.done():
            future.set_result(time.monotonic_ns())

    async def consume(self, events: AsyncIterator, name_of: Callable[[object], str]) -> None:
        """Record every event of `events`; if the stream fails, so does every wait."""
        try:
            async for event in events:
                self.arrived(name_of(event))
            raise RuntimeError("the watch stream ended")
        except Exception as error:  # noqa: BLE001 - handed to the waiters
            self._error = error
            for future in self._waiting.values():
                if not future.done():
                    future.set_exception(error)


async def sequential_latencies(names: List[str], write: Callable[[str], Awaitable],
                               expect: Callable[[str], Awaitable[int]]) -> List[float]:
    """Milliseconds from just before each write to its arrival, one write at a time."""
    samples = []
    for name in names:
        arrival = expect(name)
        started = time.monotonic_ns()
        await write(name)
        samples.append((await asyncio.wait_for(arrival, EVENT_TIMEOUT) - started) / 1e6)
    return samples


class SdkStream:
    """The measured stream: AsyncClient.watch on one namespace, from a revision."""

    def __init__(self, client: AsyncClient, namespace: str, revision: int):
        self.client = client
        self.namespace = namespace
        self.arrivals = Arrivals()
        events = client.watch("jobs", namespace, resource_version=revision)
        self._task = asyncio.create_task(self.arrivals.consume(events, lambda event: event.object.metadata.name))

    async def latencies(self, prefix: str, count: int) -> List[float]:
        names = [f"{prefix}-{i}" for i in range(count)]
        return await sequential_latencies(
            names, lambda name: self.client.create(common.make_job(name, self.namespace)), self.arrivals.expect)

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


async def raw_etcd_latencies(etcd_endpoint: str, prefix: str, value: bytes, count: int) -> List[float]:
    """The baseline: aetcd put -> aetcd watch event, on a client opened and closed here (so it
    is not counted in the etcd watcher metrics read elsewhere)."""
    host, port = parse_endpoints(etcd_endpoint)
    async with aetcd.Client(host=host, port=port) as etcd:
        arrivals = Arrivals()
        watch = await etcd.watch_prefix(prefix.encode())
        task = asyncio.create_task(arrivals.consume(watch, lambda event: event.kv.key.decode()))
        try:
            keys = [f"{prefix}{i}" for i in range(count)]
            return await sequential_latencies(keys, lambda key: etcd.put(key.encode(), value), arrivals.expect)
        finally:
            task.cancel()
            await watch.cancel()
            await asyncio.gather(task, return_exceptions=True)


class WatchWorkers:
    """`streams` watch streams held by `processes` bench.watch_worker processes."""

    def __init__(self, endpoint: str, namespace: str, streams: int, processes: int, revision: int,
                 filtered: bool):
        self.endpoint = endpoint
        self.namespace = namespace
        self.counts = [streams // processes + (1 if i < streams % processes else 0) for i in range(processes)]
        self.revision = revision
        self.filtered = filtered
        self.processes: List[asyncio.subprocess.Process] = []
        self._readers: List[asyncio.Task] = []
        self._ready = 0
        self._ready_future: Optional[asyncio.Future] = None
        self._delivered: Dict[str, List[dict]] = {}
        self._complete: Dict[str, asyncio.Future] = {}
        self._failed: Optional[asyncio.Future] = None

    def names(self, worker: int) -> List[str]:
        """Job names the streams of a filtered worker watch."""
        return [f"bg{worker}-{i}" for i in range(self.counts[worker])]

    async def __aenter__(self) -> "WatchWorkers":
        loop = asyncio.get_running_loop()
        self._ready_future = loop.create_future()
        self._failed = loop.create_future()
        try:
            for worker, count in enumerate(self.counts):
                args = ["-m", "bench.watch_worker", "--endpoint", self.endpoint, "--namespace", self.namespace,
                        "--streams", str(count), "--resource-version", str(self.revision)]
                if self.filtered:
                    args += ["--name-prefix", f"bg{worker}"]
                process = await asyncio.create_subprocess_exec(sys.executable, *args, cwd=common.REPO,
                                                               stdin=asyncio.subprocess.PIPE,
                                                               stdout=asyncio.subprocess.PIPE)
                self.processes.append(process)
                self._readers.append(asyncio.create_task(self._read(process)))
        except BaseException:
            await self.__aexit__()
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        for process in self.processes:
            if process.stdin is not None and not process.stdin.is_closing():
                process.stdin.close()  # the worker's signal to close its streams and exit
        for process in self.processes:
            try:
                await asyncio.wait_for(process.wait(), common.STOP_TIMEOUT)
            except asyncio.TimeoutError:
                process.kill()
                await process.wait()
        for reader in self._readers:
            reader.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)
        if self._failed.done():
            self._failed.exception()  # workers exiting now is expected: mark it as seen

    async def _read(self, process: asyncio.subprocess.Process) -> None:
        while True:
            line = await process.stdout.readline()
            if not line:
                if not self._failed.done():
                    self._failed.set_exception(RuntimeError(f"watch worker {process.pid} exited "
                                                            f"(code {await process.wait()})"))
                return
            message = json.loads(line)
            if message["type"] == "ready":
                self._ready += 1
                if self._ready == len(self.processes):
                    self._ready_future.set_result(None)
            elif message["type"] == "delivered":
                arrived = self._delivered.setdefault(message["name"], [])
                arrived.append(message)
                if len(arrived) == len(self.processes):
                    self._future(message["name"]).set_result(self._delivered.pop(message["name"]))

    def _future(self, name: str) -> asyncio.Future:
        return self._complete.setdefault(name, asyncio.get_running_loop().create_future())

    async def _wait(self, future: asyncio.Future, timeout: float, what: str):
        done, _ = await asyncio.wait([future, self._failed], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if self._failed in done:
            self._failed.result()
        if future not in done:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        return future.result()

    async def wait_ready(self) -> None:
        await self._wait(self._ready_future, READY_TIMEOUT, "the watch workers' streams")

    async def delivered(self, name: str) -> List[dict]:
        """Each worker's report once all its streams have the event for `name`."""
        reports = await self._wait(self._future(name), EVENT_TIMEOUT, f"every stream to get {name}")
        del self._complete[name]
        return reports


async def shared_latencies(client: AsyncClient, workers: WatchWorkers, prefix: str,
                           count: int) -> Dict[str, List[float]]:
    """Per event: ms until the first, the median (of the workers' medians) and the last stream had it."""
    result: Dict[str, List[float]] = {"first": [], "median": [], "last": []}
    for i in range(count):
        name = f"{prefix}-{i}"
        started = time.monotonic_ns()
        await client.create(common.make_job(name, workers.namespace))
        reports = await workers.delivered(name)
        result["first"].append((min(r["first_ns"] for r in reports) - started) / 1e6)
        result["median"].append((common.median([r["median_ns"] for r in reports]) - started) / 1e6)
        result["last"].append((max(r["last_ns"] for r in reports) - started) / 1e6)
    return result


class Percentiles:
    """p50 and p99 per repetition, and their medians over the repetitions."""

    def __init__(self):
        self.p50: List[float] = []
        self.p99: List[float] = []

    def add(self, samples: List[float]) -> None:
        self.p50.append(common.percentile(samples, 50))
        self.p99.append(common.percentile(samples, 99))

    def median(self, p: int) -> float:
        return common.median(self.p50 if p == 50 else self.p99)

    def describe(self) -> str:
        return (f"p50 per rep [{', '.join(f'{v:.1f}' for v in self.p50)}] ms, "
                f"p99 per rep [{', '.join(f'{v:.1f}' for v in self.p99)}] ms")


async def current_revision(client: AsyncClient, namespace: str) -> int:
    return (await client.list("jobs", namespace, limit=1)).resource_version


@dataclasses.dataclass
class Phase:
    """What one phase measured: latency at the measured stream(s), the raw etcd baseline, and
    etcd's watch metrics while the phase's streams were open."""

    latency: Percentiles
    raw: Percentiles
    etcd_watches: Dict[str, float]
    note: str = ""


class WatchBench:
    def __init__(self, args, plane: common.ControlPlane, client: AsyncClient):
        self.args = args
        self.plane = plane
        self.client = client
        self.value = common.make_job("job-0", "bench").SerializeToString()

    def etcd_watches(self) -> Dict[str, float]:
        return self.plane.etcd_metrics(ETCD_WATCH_METRICS)

    async def raw(self, phase: str, rep: int) -> List[float]:
        return await raw_etcd_latencies(self.plane.etcd.endpoint, f"/bench/watch/{phase}-{rep}/", self.value,
                                        self.args.samples)

    async def measured_stream(self, namespace: str, revision: int, label: str, raw: Percentiles) -> Percentiles:
        """Sequential creates on `namespace`, timed at one SDK watch stream."""
        latency = Percentiles()
        stream = SdkStream(self.client, namespace, revision)
        try:
            await stream.latencies("warmup", 20)
            for rep in range(self.args.repeat):
                raw.add(await self.raw(namespace, rep))
                latency.add(await stream.latencies(f"r{rep}", self.args.samples))
                common.say(f"{label}, rep {rep}: p50 {latency.p50[-1]:.1f} ms, p99 {latency.p99[-1]:.1f} ms "
                           f"(raw etcd p50 {raw.p50[-1]:.1f}, p99 {raw.p99[-1]:.1f})")
        finally:
            await stream.close()
        return latency

    async def single(self) -> Phase:
        namespace = "watch-single"
        await self.client.create(common.make_namespace(namespace))
        etcd_watches = self.etcd_watches()
        raw = Percentiles()
        latency = await self.measured_stream(namespace, await current_revision(self.client, namespace),
                                             "1 watcher", raw)
        return Phase(latency, raw, etcd_watches)

    async def filtered(self) -> Phase:
        """The measured stream among `streams` others on its namespace, each filtered to one name."""
        namespace, streams = "watch-filtered", self.args.streams
        await self.client.create(common.make_namespace(namespace))
        revision = await current_revision(self.client, namespace)
        async with WatchWorkers(self.plane.endpoint, namespace, streams, self.args.worker_processes, revision,
                                filtered=True) as workers:
            names = [name for worker in range(len(workers.counts)) for name in workers.names(worker)]
            await common.batch_create_all(self.client, [common.make_job(n, namespace) for n in names])
            await workers.wait_ready()
            etcd_watches = self.etcd_watches()
            common.say(f"{streams} filtered streams open; etcd watch metrics: {etcd_watches}")
            raw = Percentiles()
            latency = await self.measured_stream(namespace, revision, f"1 of {streams + 1} streams", raw)
        return Phase(latency, raw, etcd_watches, f"{streams} streams from {self.args.worker_processes} processes")

    async def shared(self) -> Phase:
        """`streams` streams on the same namespace: the time until the last of them has each event."""
        namespace, streams = "watch-shared", self.args.streams
        await self.client.create(common.make_namespace(namespace))
        revision = await current_revision(self.client, namespace)
        last, first, raw = Percentiles(), Percentiles(), Percentiles()
        medians: List[float] = []
        server_us: List[float] = []
        clients_us: List[float] = []
        async with WatchWorkers(self.plane.endpoint, namespace, streams, self.args.worker_processes, revision,
                                filtered=False) as workers:
            await self.client.create(common.make_job("ready", namespace))
            await workers.wait_ready()
            etcd_watches = self.etcd_watches()
            common.say(f"{streams} streams on the same objects; etcd watch metrics: {etcd_watches}")
            await shared_latencies(self.client, workers, "warmup", 5)
            meter = common.CpuMeter(server=self.plane.server.pid,
                                    **{f"worker{i}": p.pid for i, p in enumerate(workers.processes)})
            deliveries = self.args.shared_samples * streams
            for rep in range(self.args.repeat):
                raw.add(await self.raw(namespace, rep))
                with meter:
                    samples = await shared_latencies(self.client, workers, f"r{rep}", self.args.shared_samples)
                last.add(samples["last"])
                first.add(samples["first"])
                medians.append(common.percentile(samples["median"], 50))
                # CPU per delivered message: the server's, and the receiving processes' together.
                server_us.append(meter.used["server"] / deliveries * 1e6)
                clients_us.append(sum(v for k, v in meter.used.items() if k != "server") / deliveries * 1e6)
                common.say(f"all {streams} streams, rep {rep}: last stream p50 {last.p50[-1]:.1f} ms, "
                           f"p99 {last.p99[-1]:.1f} ms; first stream p50 {first.p50[-1]:.1f} ms "
                           f"(raw etcd p50 {raw.p50[-1]:.1f}, p99 {raw.p99[-1]:.1f}); CPU per delivered event: "
                           f"server {server_us[-1]:.0f} µs, receiving clients {clients_us[-1]:.0f} µs")
        note = (f"medians over {self.args.repeat} reps of {self.args.shared_samples} creates; {last.describe()}; "
                f"first stream p50 {first.median(50):.1f} ms, median stream p50 {common.median(medians):.1f} ms; "
                f"CPU per delivered event: server {common.median(server_us):.0f} µs, receiving clients "
                f"{common.median(clients_us):.0f} µs")
        return Phase(last, raw, etcd_watches, note)


async def run(args) -> List[common.Result]:
    with common.ControlPlane(args.etcd_no_fsync) as plane:
        common.say(plane.describe())
        async with AsyncClient(endpoint=plane.endpoint, settings=plane.settings) as client:
            bench = WatchBench(args, plane, client)
            single = await bench.single()  # its etcd metrics: before any client stream
            filtered = await bench.filtered()
            shared = await bench.shared()
            after = bench.etcd_watches()
            common.say(f"etcd watch metrics after the streams closed: {after}")
    setup = plane.etcd_mode
    reps = f"medians over {args.repeat} reps of {args.samples} sequential creates"
    n = args.streams
    rows = [("1 watcher", single, f"{reps}; {single.latency.describe()}; {setup}", False),
            (f"1 of {n + 1} streams ({n} name-filtered)", filtered,
             f"{reps}; {filtered.latency.describe()}; {filtered.note}", True),
            (f"LAST of {n} streams on the same objects", shared, shared.note, True)]
    results = []
    for label, phase, note, has_target in rows:
        results.append(common.Result("watch", f"create→event p50, {label}", phase.latency.median(50), "ms",
                                     "raw aetcd put→watch p50", phase.raw.median(50), "", None, note))
        p99 = phase.latency.median(99)
        results.append(common.Result("watch", f"create→event p99, {label}", p99, "ms", "raw aetcd put→watch p99",
                                     phase.raw.median(99), "≤ 25 ms" if has_target else "",
                                     p99 <= 25 if has_target else None))
    for metric, label in ETCD_WATCH_METRICS.items():
        seen = [phase.etcd_watches[metric] for phase in (single, filtered, shared)] + [after[metric]]
        results.append(common.Result(
            "watch", f"{label} with {n} client streams", shared.etcd_watches[metric], "",
            "before any client stream", single.etcd_watches[metric], "constant", len(set(seen)) == 1,
            f"before / {n} filtered / {n} shared / after: {' / '.join(f'{v:.0f}' for v in seen)}"))
    return results


def main() -> int:
    parser = common.parser(__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200, help="sequential creates per rep (1-watcher phases)")
    parser.add_argument("--shared-samples", type=int, default=100, help="creates per rep when all streams share")
    parser.add_argument("--streams", type=int, default=1000, help="client watch streams")
    parser.add_argument("--worker-processes", type=int, default=4, help="client processes holding the streams")
    return common.main(run, parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
