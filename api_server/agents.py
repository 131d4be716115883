"""Relay of Logs and Exec to the skylets that run the replicas (SkyletService)."""
from __future__ import annotations

import asyncio
from typing import AsyncIterator, Dict, List

import grpc

from skyshift.api import kinds
from skyshift.api.errors import InvalidError, PreconditionError, UnavailableError, from_rpc_error
from skyshift.v1 import api_pb2, api_pb2_grpc, objects_pb2 as pb
from skyshift.api.wellknown import JOB_LABEL

from api_server.registry import Registry



class AgentRelay:
    def __init__(self, registry: Registry):
        self.registry = registry
        self._channels: Dict[str, grpc.aio.Channel] = {}

    def _stub(self, endpoint: str) -> api_pb2_grpc.SkyletServiceStub:
        channel = self._channels.get(endpoint)
        if channel is None:
            channel = self._channels[endpoint] = grpc.aio.insecure_channel(endpoint)
        return api_pb2_grpc.SkyletServiceStub(channel)

    async def close(self) -> None:
        await asyncio.gather(*(channel.close() for channel in self._channels.values()))
        self._channels.clear()

    async def _replicas(self, namespace: str, job: str, replica: str) -> List[pb.Replica]:
        namespace = namespace or kinds.DEFAULT_NAMESPACE
        if replica:
            return [await self.registry.get("replicas", namespace, replica)]
        if not job:
            raise InvalidError("job", "required (or replica)")
        await self.registry.get("jobs", namespace, job)  # NOT_FOUND for a job that does not exist
        items, _, _ = await self.registry.list("replicas", namespace, f"{JOB_LABEL}={job}", "", 0, "")
        return sorted(items, key=lambda r: (r.spec.rank, r.metadata.name))

    async def _agent(self, replica: pb.Replica) -> str:
        if not replica.spec.cluster:
            raise PreconditionError(f'replica "{replica.metadata.name}" is not scheduled to a cluster yet')
        cluster = await self.registry.get("clusters", "", replica.spec.cluster)
        if not cluster.status.agent_endpoint:
            raise UnavailableError(f'cluster "{cluster.metadata.name}" has no running skylet')
        return cluster.status.agent_endpoint

    async def logs(self, request: api_pb2.LogsRequest) -> AsyncIterator[api_pb2.LogChunk]:
        """Chunks of every selected replica, interleaved as they arrive."""
        replicas = [r for r in await self._replicas(request.namespace, request.job, request.replica)
                    if r.spec.cluster]
        queue: asyncio.Queue = asyncio.Queue(maxsize=64)
        done = object()

        async def pump(replica: pb.Replica) -> None:
            try:
                stub = self._stub(await self._agent(replica))
                call = stub.Logs(api_pb2.LogsRequest(namespace=replica.metadata.namespace,
                                                     replica=replica.metadata.name, follow=request.follow))
                async for chunk in call:
                    await queue.put(api_pb2.LogChunk(replica=replica.metadata.name, data=chunk.data))
            except grpc.aio.AioRpcError as error:
                await queue.put(from_rpc_error(error))
            except Exception as error:  # noqa: BLE001 - handed to the caller
                await queue.put(error)
            finally:
                await queue.put(done)

        tasks = [asyncio.create_task(pump(replica)) for replica in replicas]
        try:
            remaining = len(tasks)
            while remaining:
                item = await queue.get()
                if item is done:
                    remaining -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def exec(self, request: api_pb2.ExecRequest) -> api_pb2.ExecResponse:
        if not request.replica:
            raise InvalidError("replica", "required")
        if not request.command:
            raise InvalidError("command", "required")
        (replica,) = await self._replicas(request.namespace, "", request.replica)
        try:
            return await self._stub(await self._agent(replica)).Exec(
                api_pb2.ExecRequest(namespace=replica.metadata.namespace, replica=replica.metadata.name,
                                    command=request.command))
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from None
