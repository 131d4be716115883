"""Service gateway throughput: small HTTP requests and a bulk transfer, through the gateway vs
the same server reached directly, in the same run.

    python -m bench.bench_gateway [--duration 5] [--connections 32] [--bulk-mib 512] [--repeat 3] [--mesh]

Processes (each its own interpreter, all on loopback): a backend with three servers (a bare
asyncio protocol answering "ok" to every HTTP request, the fastest Python answers, so the
gateway's own cost shows; an aiohttp application doing the same, a typical Python web service;
and a bulk port that sends the number of bytes asked for), a gateway
(skyshift.gateway.Gateway, one Service port per server, whose only endpoint is that server) and
the load generator: `wrk` when installed, else a Python asyncio client (bounded by time).
With --mesh, a second gateway process sits between them: the first forwards over the mesh
(HMAC handshake per connection), as for an endpoint on a linked cluster.

Rows, each a median over --repeat runs, with the direct figure as the baseline, for each of
the two HTTP servers:
* requests/s and p99 latency with keep-alive connections (the gateway only copies bytes);
* requests/s and p99 latency with a new connection per request (the gateway also accepts,
  chooses a backend and connects, per request);
and MB/s of one large transfer. The gateway's CPU time per request is in the notes.
Target: the gateway's request rates at least 0.5x the direct ones.
"""
from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

from bench import common

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"
CLOSING_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
LINK, SECRET = "bench", bytes.fromhex("5e" * 32)
CHUNK = 1024 * 1024
RATE_TARGET = 0.5


# ---------------------------------------------------------------------------- the servers (child roles)

class HttpOk(asyncio.Protocol):
    """Answers every request (headers only, no body) with RESPONSE; honours Connection: close."""

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            request, self.buffer = self.buffer[:end], self.buffer[end + 4:]
            if b"connection: close" in request.lower():
                self.transport.write(CLOSING_RESPONSE)
                self.transport.close()
                return
            self.transport.write(RESPONSE)


async def serve_bulk(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Reads a byte count line, sends that many zero bytes, closes."""
    line = (await reader.readline()).strip()
    if not line.isdigit():
        writer.close()  # a health probe of the gateway (connect, close)
        return
    remaining = int(line)
    chunk = bytes(CHUNK)
    while remaining > 0:
        writer.write(chunk[:min(CHUNK, remaining)])
        remaining -= CHUNK
        await writer.drain()
    writer.close()


async def run_backend() -> None:
    """Prints the ports of: the raw HTTP server, the aiohttp server, the bulk server."""
    from aiohttp import web

    loop = asyncio.get_running_loop()
    raw = await loop.create_server(HttpOk, "127.0.0.1", 0, backlog=1024)

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/", ok)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    listening = socket.create_server(("127.0.0.1", 0), backlog=1024)
    await web.SockSite(runner, listening).start()
    bulk = await asyncio.start_server(serve_bulk, "127.0.0.1", 0)
    ports = (raw.sockets[0].getsockname()[1], listening.getsockname()[1], bulk.sockets[0].getsockname()[1])
    print(*ports, flush=True)
    try:
        await wait_for_signal()
    finally:
        await runner.cleanup()


async def run_gateway(listen: Sequence[int], backends: Sequence[int], route: str) -> None:
    """A gateway serving each listen port with the backend port at the same position. With
    `route` (a mesh address), the backends are reached through that gateway. Prints its mesh address."""
    from skyshift import config
    from skyshift.gateway.gateway import Gateway
    from skyshift.gateway.mesh import Route
    from skyshift.gateway.plan import BackendSpec, GatewayPlan, ServicePlan

    gateway = Gateway("bench", config.GatewaySettings())
    mesh = await gateway.start("127.0.0.1", 0)
    plan = GatewayPlan("bench", "127.0.0.1", secrets={LINK: SECRET})
    via = Route(LINK, route, SECRET) if route else None
    for index, (port, backend) in enumerate(zip(listen, backends)):
        plan.services[f"bench/s{index}"] = ServicePlan(
            f"bench/s{index}", "round_robin", listeners={("127.0.0.1", port): backend},
            backends={backend: [BackendSpec("127.0.0.1", backend, "backend" if via else "bench", via)]})
    plan.local_targets = {("127.0.0.1", backend) for backend in backends}
    problems = await gateway.apply(plan)
    if any(problems.values()):
        raise SystemExit(f"gateway could not serve: {problems}")
    print(mesh, flush=True)
    try:
        await wait_for_signal()
    finally:
        await gateway.close()


async def wait_for_signal() -> None:
    stopping = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, stopping.set)
    await stopping.wait()


# ---------------------------------------------------------------------------- load

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wrk(port: int, connections: int, duration: float, close: bool) -> Tuple[float, float]:
    """(requests/s, p99 latency ms) measured by wrk."""
    command = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "--latency",
               f"http://127.0.0.1:{port}/"]
    if close:
        command[1:1] = ["-H", "Connection: close"]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))
    value, unit = re.search(r"99%\s+([\d.]+)(us|ms|s)", output).groups()
    return rate, float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


async def python_load(port: int, connections: int, duration: float, close: bool) -> Tuple[float, float]:
    """(requests/s, p99 latency ms) from `connections` asyncio clients for `duration` seconds."""
    request = b"GET / HTTP/1.1\r\nHost: bench\r\n" + (b"Connection: close\r\n" if close else b"") + b"\r\n"
    latencies: List[float] = []
    deadline = time.perf_counter() + duration

    async def client() -> None:
        connection = None
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            if connection is None:
                connection = await asyncio.open_connection("127.0.0.1", port)
            reader, writer = connection
            writer.write(request)
            await reader.readuntil(b"\r\n\r\nok")
            latencies.append(time.perf_counter() - start)
            if close:
                writer.close()
                connection = None
        if connection is not None:
            connection[1].close()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(connections)))
    return len(latencies) / (time.perf_counter() - started), common.percentile(latencies, 99) * 1000


def bulk(port: int, size: int) -> float:
    """MB/s of receiving `size` bytes from the bulk port (directly or through a gateway)."""
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        start = time.perf_counter()
        sock.sendall(f"{size}\n".encode())
        received = 0
        while received < size:
            count = sock.recv_into(view)
            if not count:
                raise RuntimeError(f"bulk transfer ended after {received} of {size} bytes")
            received += count
        return size / (time.perf_counter() - start) / 1e6


# ---------------------------------------------------------------------------- the benchmark

#: The backend's servers, in the order it prints their ports.
SERVERS = ("raw", "aiohttp", "bulk")
HTTP_SERVERS = {"raw": "an asyncio protocol answering 'ok' (the gateway's ceiling)",
                "aiohttp": "an aiohttp application answering 'ok' (a typical Python web service)"}


class Processes:
    """The backend and gateway processes, stopped by PID on exit. `direct[server]` and
    `through[server]` are the ports of each backend server and of the gateway in front of it."""

    def __init__(self, mesh: bool):
        self.mesh = mesh
        self.started: List[subprocess.Popen] = []

    def _start(self, *args: str) -> Tuple[subprocess.Popen, str]:
        process = common.python_process(["-m", "bench.bench_gateway", "--role", *args], stdout=subprocess.PIPE,
                                        text=True)
        self.started.append(process)
        line = process.stdout.readline().strip()
        if not line:
            raise RuntimeError(f"{args[0]} process did not start")
        return process, line

    def __enter__(self) -> "Processes":
        try:
            _, ports = self._start("backend")
            self.direct = dict(zip(SERVERS, (int(port) for port in ports.split())))
            self.through = {server: free_port() for server in SERVERS}
            backends = [str(self.direct[server]) for server in SERVERS]
            route = ""
            if self.mesh:  # the remote gateway, which alone reaches the backend
                _, route = self._start("gateway", "--listen", *(str(free_port()) for _ in SERVERS),
                                       "--backends", *backends)
            self.gateway, _ = self._start("gateway", "--listen", *(str(self.through[s]) for s in SERVERS),
                                          "--backends", *backends, "--route", route)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for process in self.started:
            common.stop_process(process)


async def measure(args: argparse.Namespace, port: int, close: bool) -> Tuple[float, float]:
    if shutil.which("wrk"):
        return await asyncio.to_thread(wrk, port, args.connections, args.duration, close)
    return await python_load(port, args.connections, args.duration, close)


async def run(args: argparse.Namespace) -> List[common.Result]:
    generator = "wrk -t1" if shutil.which("wrk") else "Python asyncio client"
    path = "two gateways (mesh)" if args.mesh else "the gateway"
    runs: Dict[str, List[Tuple[float, float]]] = {}
    gateway_cpu: Dict[str, List[float]] = {}
    with Processes(args.mesh) as processes:
        for repetition in range(args.repeat):
            for server in HTTP_SERVERS:
                for close in (False, True):
                    mode = f"{server}-{'close' if close else 'keepalive'}"
                    runs.setdefault(f"direct-{mode}", []).append(
                        await measure(args, processes.direct[server], close))
                    with common.CpuMeter(gateway=processes.gateway.pid) as meter:
                        result = await measure(args, processes.through[server], close)
                    runs.setdefault(f"gateway-{mode}", []).append(result)
                    gateway_cpu.setdefault(mode, []).append(
                        meter.used["gateway"] * 1e6 / max(1.0, result[0] * args.duration))
            size = args.bulk_mib * 1024 * 1024
            runs.setdefault("direct-bulk", []).append((bulk(processes.direct["bulk"], size), 0.0))
            runs.setdefault("gateway-bulk", []).append((bulk(processes.through["bulk"], size), 0.0))
            common.say(f"repetition {repetition + 1}: " + ", ".join(
                f"{name} {values[-1][0]:,.0f}" for name, values in runs.items()))

    def med(name: str, index: int = 0) -> float:
        return common.median([value[index] for value in runs[name]])

    results = []
    for server, description in HTTP_SERVERS.items():
        for close, label in ((False, f"keep-alive, {args.connections} connections"),
                             (True, f"new connection per request, {args.connections} in flight")):
            mode = f"{server}-{'close' if close else 'keepalive'}"
            rate, direct_rate = med(f"gateway-{mode}"), med(f"direct-{mode}")
            results.append(common.Result(
                "gateway", f"HTTP requests through {path} to {server}, {label}", rate, "req/s",
                f"{server} directly", direct_rate, f"≥ {RATE_TARGET}× baseline", rate >= RATE_TARGET * direct_rate,
                f"{description}; {generator}, {args.duration:g}s x {args.repeat}: {fmt(runs[f'gateway-{mode}'])} vs "
                f"{fmt(runs[f'direct-{mode}'])}; gateway CPU {common.median(gateway_cpu[mode]):.0f} µs per request"))
            results.append(common.Result(
                "gateway", f"p99 latency through {path} to {server}, {label}", med(f"gateway-{mode}", 1), "ms",
                f"{server} directly", med(f"direct-{mode}", 1), "", None))
    results.append(common.Result(
        "gateway", f"bulk transfer of {args.bulk_mib} MiB through {path}", med("gateway-bulk"), "MB/s",
        "same server directly", med("direct-bulk"), "", None,
        f"one connection; runs {fmt(runs['gateway-bulk'])} vs {fmt(runs['direct-bulk'])}; "
        f"gateway buffer {args.buffer_kib} KiB"))
    return results


def fmt(values: Sequence[Tuple[float, float]]) -> str:
    return "[" + ", ".join(f"{value[0]:,.0f}" for value in values) + "]"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = common.parser(__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of load per measurement")
    parser.add_argument("--connections", type=int, default=32, help="concurrent client connections")
    parser.add_argument("--bulk-mib", type=int, default=512, help="MiB of the bulk transfer")
    parser.add_argument("--mesh", action="store_true", help="go through two gateways joined by the mesh")
    parser.add_argument("--role", choices=("backend", "gateway"), help=argparse.SUPPRESS)
    parser.add_argument("--listen", type=int, nargs="*", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--backends", type=int, nargs="*", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--route", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role:
        from skyshift import logging as skyshift_logging

        skyshift_logging.configure("warning")  # stdout carries the ports to the parent
    if args.role == "backend":
        asyncio.run(run_backend())
        return 0
    if args.role == "gateway":
        asyncio.run(run_gateway(args.listen, args.backends, args.route))
        return 0
    from skyshift import config

    args.buffer_kib = config.GatewaySettings().buffer_size // 1024
    return common.main(run, args)


if __name__ == "__main__":
    sys.exit(main())
