"""Create throughput.

    python -m bench.bench_create [--creates 3000] [--in-flight 32] [--batch-total 20000] [--repeat 3]

* Single-object Create with `--in-flight` calls in flight (AsyncClient) against a bare grpc.aio
  echo server (bench/echo.py, its own process) called with the same concurrency and a payload
  as large as the serialized CreateRequest. Target: >= 0.5x the echo rate.
* BatchCreate (batches of `--batch-size`, `--batches-in-flight` at a time) against raw aetcd
  puts of the same stored bytes, with as many puts in flight as the server issues for those
  batches (batches in flight x api.batch_concurrency). Target: >= 0.5x raw etcd.

Repetitions are interleaved (echo, create, raw puts, batch, echo, ...) so that load from other
users of the machine hits figure and baseline alike; medians are reported. The CPU time each
process (API server, etcd, this client; echo server) spent per operation is printed too: it is
far less noisy than the rates and shows where the time goes.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import time
from typing import Dict, List

import aetcd
import grpc

from bench import common
from bench.echo import METHOD as ECHO_METHOD
from skyshift.client import AsyncClient
from skyshift.client import base as client_base
from skyshift.store.etcd import parse_endpoints


@contextlib.contextmanager
def echo_server():
    """The echo server process; yields (its address, its pid)."""
    process = common.python_process(["-m", "bench.echo"], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        port = process.stdout.readline().strip()
        if not port:
            raise RuntimeError(f"echo server exited with code {process.wait()}")
        yield f"127.0.0.1:{int(port)}", process.pid
    finally:
        common.stop_process(process)
        process.stdout.close()


class Measurement:
    """Throughput of one run, and the CPU milliseconds each process spent per operation."""

    def __init__(self, total: int, seconds: float, meter: common.CpuMeter):
        self.rate = total / seconds
        self.cpu_ms = meter.per_operation_ms(total)

    def describe(self) -> str:
        cpu = ", ".join(f"{name} {ms:.2f}" for name, ms in self.cpu_ms.items())
        return f"{self.rate:,.0f}/s (CPU ms per op: {cpu})"


async def measure(total: int, meter: common.CpuMeter, work) -> Measurement:
    with meter:
        started = time.perf_counter()
        await work()
        seconds = time.perf_counter() - started
    return Measurement(total, seconds, meter)


async def measure_echo(echo, payload: bytes, total: int, in_flight: int, meter: common.CpuMeter) -> Measurement:
    return await measure(total, meter, lambda: common.run_concurrently(total, in_flight, lambda _: echo(payload)))


async def measure_creates(client: AsyncClient, namespace: str, total: int, in_flight: int,
                          meter: common.CpuMeter) -> Measurement:
    await client.create(common.make_namespace(namespace))
    jobs = [common.make_job(f"job-{i}", namespace) for i in range(total)]
    return await measure(total, meter,
                         lambda: common.run_concurrently(total, in_flight, lambda i: client.create(jobs[i])))


async def measure_batches(client: AsyncClient, namespace: str, total: int, batch_size: int, in_flight: int,
                          meter: common.CpuMeter) -> Measurement:
    await client.create(common.make_namespace(namespace))
    jobs = [common.make_job(f"job-{i}", namespace) for i in range(total)]
    return await measure(total, meter, lambda: common.batch_create_all(client, jobs, batch_size, in_flight))


async def measure_raw_puts(etcd: aetcd.Client, prefix: str, value: bytes, total: int, in_flight: int,
                           meter: common.CpuMeter) -> Measurement:
    return await measure(total, meter, lambda: common.run_concurrently(
        total, in_flight, lambda i: etcd.put(f"{prefix}/job-{i}".encode(), value)))


async def run(args) -> List[common.Result]:
    with common.ControlPlane(args.etcd_no_fsync) as plane, echo_server() as (echo_address, echo_pid):
        common.say(plane.describe())
        client_pid = os.getpid()
        api_meter = common.CpuMeter(server=plane.server.pid, etcd=plane.etcd.process.pid, client=client_pid)
        echo_meter = common.CpuMeter(echo=echo_pid, client=client_pid)
        raw_meter = common.CpuMeter(etcd=plane.etcd.process.pid, client=client_pid)
        settings = plane.settings
        raw_in_flight = args.raw_in_flight or args.batches_in_flight * settings.api.batch_concurrency
        host, port = parse_endpoints(plane.etcd.endpoint)
        async with AsyncClient(endpoint=plane.endpoint, settings=settings) as client, \
                grpc.aio.insecure_channel(echo_address) as channel, aetcd.Client(host=host, port=port) as etcd:
            echo = channel.unary_unary(ECHO_METHOD)
            sample = common.make_job("job-0", "bench-sample")
            payload = client_base.create_request(sample).SerializeToString()
            await client.create(common.make_namespace("bench-sample"))
            stored = (await client.create(sample)).SerializeToString()  # ~ what the server writes
            common.say(f"payload: CreateRequest {len(payload)} bytes; stored Job {len(stored)} bytes")
            # Warm up channels, the server's code paths and etcd.
            await measure_echo(echo, payload, 300, args.in_flight, echo_meter)
            await measure_creates(client, "bench-warmup", 300, args.in_flight, api_meter)
            runs: Dict[str, List[Measurement]] = {"echo": [], "create": [], "raw": [], "batch": []}
            for rep in range(args.repeat):
                runs["echo"].append(await measure_echo(echo, payload, args.creates, args.in_flight, echo_meter))
                runs["create"].append(await measure_creates(client, f"create-{rep}", args.creates, args.in_flight,
                                                            api_meter))
                runs["raw"].append(await measure_raw_puts(etcd, f"/bench/scratch/raw-{rep}/default", stored,
                                                          args.batch_total, raw_in_flight, raw_meter))
                runs["batch"].append(await measure_batches(client, f"batch-{rep}", args.batch_total, args.batch_size,
                                                           args.batches_in_flight, api_meter))
                for name, measurements in runs.items():
                    common.say(f"rep {rep} {name}: {measurements[-1].describe()}")
    create_rates, echo_rates, batch_rates, raw_rates = ([m.rate for m in runs[name]]
                                                        for name in ("create", "echo", "batch", "raw"))
    create, echo_rate = common.median(create_rates), common.median(echo_rates)
    batch, raw = common.median(batch_rates), common.median(raw_rates)
    setup = plane.etcd_mode
    return [
        common.Result("create", f"Create, {args.in_flight} in flight ({args.creates} per rep)", create, "ops/s",
                      f"grpc.aio echo, {args.in_flight} in flight, {len(payload)} B", echo_rate, "≥ 0.5× baseline",
                      create >= 0.5 * echo_rate,
                      f"medians of {args.repeat}; create {fmt(create_rates)}; echo {fmt(echo_rates)}; CPU ms per op, "
                      f"median: {cpu(runs['create'])} vs {cpu(runs['echo'])}; {setup}"),
        common.Result("create", f"BatchCreate, batches of {args.batch_size}, {args.batches_in_flight} in flight",
                      batch, "ops/s", f"raw aetcd puts, {raw_in_flight} in flight", raw, "≥ 0.5× baseline",
                      batch >= 0.5 * raw,
                      f"medians of {args.repeat} x {args.batch_total} objects; batch {fmt(batch_rates)}; "
                      f"raw {fmt(raw_rates)}; CPU ms per object, median: {cpu(runs['batch'])} vs {cpu(runs['raw'])}"),
    ]


def cpu(measurements: List[Measurement]) -> str:
    names = measurements[0].cpu_ms
    return ", ".join(f"{name} {common.median([m.cpu_ms[name] for m in measurements]):.2f}" for name in names)


def fmt(rates) -> str:
    return "[" + ", ".join(f"{r:,.0f}" for r in rates) + "]/s"


def main() -> int:
    parser = common.parser(__doc__.splitlines()[0])
    parser.add_argument("--creates", type=int, default=3000, help="single creates per repetition")
    parser.add_argument("--in-flight", type=int, default=32, help="single creates (and echo calls) in flight")
    parser.add_argument("--batch-total", type=int, default=20000, help="objects batch-created per repetition")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--batches-in-flight", type=int, default=4)
    parser.add_argument("--raw-in-flight", type=int, default=0,
                        help="raw puts in flight (default: as many etcd writes as the server has in flight, "
                             "batches in flight x api.batch_concurrency)")
    return common.main(run, parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
