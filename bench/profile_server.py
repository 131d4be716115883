"""Profile the API server process under one benchmark workload, with py-spy.

    pip install py-spy
    python -m bench.profile_server create|batch|list|fanout [--top 40] [--output FILE]

Starts the same control plane as the benchmarks, attaches `py-spy record` to the API server's
PID while the workload runs, and prints the functions with the most samples (own and
inclusive). `--output` keeps py-spy's collapsed stacks (for flamegraph.pl or speedscope).
Time inside gRPC's Cython and C core shows up as `Handle._run` (asyncio callbacks) and
`Thread.run` (gRPC's poller thread).
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import shutil
import signal
import subprocess
import tempfile
import time
from typing import List

from bench import common
from bench.bench_watch import WatchWorkers, current_revision, shared_latencies
from skyshift.client import AsyncClient

#: Samples per second py-spy takes.
SAMPLE_RATE = 200


async def prepare(workload: str, client: AsyncClient) -> None:
    await client.create(common.make_namespace("profile"))
    if workload == "list":
        await common.batch_create_all(client, [common.make_job(f"job-{i}", "profile") for i in range(10_000)])


async def run_workload(workload: str, client: AsyncClient, plane: common.ControlPlane) -> str:
    started = time.perf_counter()
    if workload == "create":
        jobs = [common.make_job(f"job-{i}", "profile") for i in range(5000)]
        await common.run_concurrently(len(jobs), 32, lambda i: client.create(jobs[i]))
        done = f"{len(jobs)} creates, 32 in flight"
    elif workload == "batch":
        jobs = [common.make_job(f"job-{i}", "profile") for i in range(20_000)]
        await common.batch_create_all(client, jobs)
        done = f"{len(jobs)} objects in batches of 500"
    elif workload == "list":
        for _ in range(20):
            await client.list("jobs", "profile")
        done = "20 lists of 10,000 jobs"
    else:
        revision = await current_revision(client, "profile")
        async with WatchWorkers(plane.endpoint, "profile", 1000, 4, revision, filtered=False) as workers:
            await client.create(common.make_job("ready", "profile"))
            await workers.wait_ready()
            started = time.perf_counter()
            await shared_latencies(client, workers, "event", 50)
        done = "50 events to 1,000 streams"
    return f"{done} in {time.perf_counter() - started:.1f} s"


def summarize(collapsed: str, top: int) -> List[str]:
    own, inclusive, total = collections.Counter(), collections.Counter(), 0
    with open(collapsed) as handle:
        for line in handle:
            stack, _, count = line.rstrip().rpartition(" ")
            samples = int(count)
            total += samples
            frames = stack.split(";")
            own[frames[-1]] += samples
            for frame in set(frames):
                inclusive[frame] += samples
    lines = [f"{total} samples at {SAMPLE_RATE}/s", "--- own time"]
    lines += [f"{100 * n / total:5.1f}% {frame}" for frame, n in own.most_common(top)]
    lines += ["--- inclusive"]
    lines += [f"{100 * n / total:5.1f}% {frame}" for frame, n in inclusive.most_common(top)]
    return lines


async def main(args) -> None:
    spy_binary = shutil.which("py-spy")
    if spy_binary is None:
        raise SystemExit("py-spy is not installed: pip install py-spy")
    with common.ControlPlane(args.etcd_no_fsync) as plane, tempfile.TemporaryDirectory() as directory:
        output = args.output or f"{directory}/stacks.txt"
        async with AsyncClient(endpoint=plane.endpoint, settings=plane.settings) as client:
            await prepare(args.workload, client)
            spy = subprocess.Popen([spy_binary, "record", "--pid", str(plane.server.pid), "--output", output,
                                    "--format", "raw", "--rate", str(SAMPLE_RATE)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                common.say(await run_workload(args.workload, client, plane))
            finally:
                spy.send_signal(signal.SIGINT)  # py-spy writes its output when interrupted
                try:
                    spy.wait(common.STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    spy.kill()
                    spy.wait()
        for line in summarize(output, args.top):
            print(line)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workload", choices=("create", "batch", "list", "fanout"))
    parser.add_argument("--top", type=int, default=40, help="functions to show")
    parser.add_argument("--output", help="keep py-spy's collapsed stacks here")
    parser.add_argument("--etcd-no-fsync", action="store_true")
    return parser.parse_args()


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
