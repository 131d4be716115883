"""A bare grpc.aio unary echo server: the baseline for the API server's unary calls.

    python -m bench.echo        # prints its port on stdout, serves until SIGTERM

Requests and responses are raw bytes (no protobuf work at all), so it measures what gRPC and
asyncio alone cost per call in one Python process, on the same loopback as the API server.
"""
from __future__ import annotations

import asyncio
import signal

import grpc

METHOD = "/bench.Echo/Echo"


async def _echo(request: bytes, context) -> bytes:
    return request


async def serve() -> None:
    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler("bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(_echo)})
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    print(port, flush=True)
    await stopping.wait()
    await server.stop(1)


if __name__ == "__main__":
    asyncio.run(serve())
