"""SkyletService: the API server asks a skylet for a replica's logs, or to exec beside it.

The skylet serves it on `settings.skylet.listen` (loopback, any free port by default) and
publishes the address in Cluster.status.agent_endpoint; only the API server calls it.
"""
from __future__ import annotations

from typing import AsyncIterator, Callable, Tuple

import grpc
import structlog

from skyshift.api.errors import PreconditionError, SkyShiftError
from skyshift.drivers.base import Driver
from skyshift.v1 import api_pb2, api_pb2_grpc

log = structlog.get_logger(__name__)

#: (namespace, replica name) -> the driver of the replica's cluster and its handle there ("" if
#: it never started); raises NotFoundError when the replica is not on a cluster this skylet serves.
Locate = Callable[[str, str], Tuple[Driver, str]]


class SkyletServicer(api_pb2_grpc.SkyletServiceServicer):
    def __init__(self, locate: Locate):
        self.locate = locate

    async def Logs(self, request: api_pb2.LogsRequest, context) -> AsyncIterator[api_pb2.LogChunk]:
        try:
            driver, handle = self.locate(request.namespace, request.replica)
            if not handle:
                return  # never started (e.g. it could not be): no output
            async for data in driver.logs(handle, follow=request.follow):
                yield api_pb2.LogChunk(replica=request.replica, data=data)
        except SkyShiftError as error:
            await context.abort(error.code, error.message)

    async def Exec(self, request: api_pb2.ExecRequest, context) -> api_pb2.ExecResponse:
        try:
            driver, handle = self.locate(request.namespace, request.replica)
            if not handle:
                raise PreconditionError(f"replica {request.replica} is not running")
            exit_code, output = await driver.exec(handle, list(request.command))
        except SkyShiftError as error:
            await context.abort(error.code, error.message)
        log.info("replica_exec", namespace=request.namespace, replica=request.replica, exit_code=exit_code)
        return api_pb2.ExecResponse(exit_code=exit_code, output=output)


async def serve(locate: Locate, listen: str) -> Tuple[grpc.aio.Server, str]:
    """Start a grpc.aio server with SkyletService on `listen`; returns it and its "host:port"."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    api_pb2_grpc.add_SkyletServiceServicer_to_server(SkyletServicer(locate), server)
    port = server.add_insecure_port(listen)
    if not port:
        raise OSError(f"the skylet cannot listen on {listen}")
    await server.start()
    host = listen.rpartition(":")[0] or "127.0.0.1"
    return server, f"{host}:{port}"
