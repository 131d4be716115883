"""One process holding many Watch streams on the API server, for bench_watch.

    python -m bench.watch_worker --endpoint HOST:PORT --namespace NS --streams 250 \
        --resource-version REV [--name-prefix P]

With --name-prefix, stream i watches only the job named P-i; without, every stream watches the
whole namespace. Streams use plain grpc.aio (no SDK). Reports on stdout, one JSON object a line:
  {"type": "ready"}  once every stream has received at least one event;
  {"type": "delivered", "name": N, "first_ns": .., "median_ns": .., "last_ns": ..}  once every
      stream has received the event for job N (time.monotonic_ns(), the system-wide
      CLOCK_MONOTONIC, so the parent can compare it with its own clock).
Exits when stdin closes (the parent's way to stop it, and what happens if the parent dies).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from typing import Dict, List

import grpc

from skyshift.v1 import api_pb2, api_pb2_grpc


class Deliveries:
    """Readiness, and receipt times per job name when every stream sees every job."""

    def __init__(self, streams: int, shared: bool):
        self.streams = streams
        self.shared = shared
        self.times: Dict[str, List[int]] = {}
        self.silent = set(range(streams))

    def received(self, stream: int, name: str, at_ns: int) -> None:
        if self.silent:
            self.silent.discard(stream)
            if not self.silent:
                emit({"type": "ready"})
        if not self.shared:
            return
        times = self.times.setdefault(name, [])
        times.append(at_ns)
        if len(times) == self.streams:
            del self.times[name]
            emit({"type": "delivered", "name": name, "first_ns": min(times),
                  "median_ns": int(statistics.median(times)), "last_ns": max(times)})


def emit(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def watch(stub, request: api_pb2.WatchRequest, index: int, deliveries: Deliveries) -> None:
    async for event in stub.Watch(request):
        at_ns = time.monotonic_ns()
        deliveries.received(index, event.object.job.metadata.name, at_ns)


async def stdin_closed() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while await reader.read(4096):
        pass


async def main(args) -> None:
    async with grpc.aio.insecure_channel(args.endpoint) as channel:
        stub = api_pb2_grpc.ObjectServiceStub(channel)
        deliveries = Deliveries(args.streams, shared=not args.name_prefix)
        tasks = []
        for index in range(args.streams):
            name = f"{args.name_prefix}-{index}" if args.name_prefix else ""
            request = api_pb2.WatchRequest(kind="jobs", namespace=args.namespace, name=name,
                                           resource_version=args.resource_version)
            tasks.append(asyncio.create_task(watch(stub, request, index, deliveries)))
        waiting = asyncio.create_task(stdin_closed())
        done, _ = await asyncio.wait([waiting, *tasks], return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for task in done:
            if task is not waiting and task.exception() is not None:
                raise task.exception()


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--streams", type=int, required=True)
    parser.add_argument("--resource-version", type=int, required=True,
                        help="watch from here, so events created after it reach every stream")
    parser.add_argument("--name-prefix", default="", help="stream i watches only the job named PREFIX-i")
    return parser.parse_args()


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
