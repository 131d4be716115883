"""The API server: grpc.aio with the object service, health and reflection."""
from __future__ import annotations

import asyncio
from typing import Optional

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from skyshift.config import Settings
from skyshift.store.etcd import Store
from skyshift.v1 import api_pb2

from api_server.agents import AgentRelay
from api_server.registry import Registry
from api_server.servicer import ObjectServicer, decoder
from api_server.watch_cache import WatchCache

log = structlog.get_logger(__name__)

SERVICE_NAME = api_pb2.DESCRIPTOR.services_by_name["ObjectService"].full_name


def _serialize(message) -> bytes:
    # Watch streams send events already serialized once for all their watchers.
    return message if isinstance(message, bytes) else message.SerializeToString()


def _object_service_handler(servicer: ObjectServicer) -> grpc.GenericRpcHandler:
    """Like the generated add_ObjectServiceServicer_to_server, but responses may be bytes."""
    from google.protobuf import symbol_database

    database = symbol_database.Default()
    handlers = {}
    for method in api_pb2.DESCRIPTOR.services_by_name["ObjectService"].methods:
        if not hasattr(servicer, method.name):
            continue  # not served yet: clients get UNIMPLEMENTED
        request_class = database.GetSymbol(method.input_type.full_name)
        factory = grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
        handlers[method.name] = factory(getattr(servicer, method.name),
                                        request_deserializer=decoder(request_class),
                                        response_serializer=_serialize)
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)


class ApiServer:
    def __init__(self, settings: Settings, etcd_endpoints: str):
        self.settings = settings
        self.store = Store(settings.etcd, etcd_endpoints)
        self.registry = Registry(self.store, settings)
        self.watch_cache = WatchCache(self.store, settings.watch)
        self.agents = AgentRelay(self.registry)
        self.server: Optional[grpc.aio.Server] = None
        self.health = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
        self.port = 0

    @property
    def endpoint(self) -> str:
        host = self.settings.api.listen.rpartition(":")[0] or "127.0.0.1"
        return f"{host}:{self.port}"

    async def start(self) -> str:
        await self.store.connect()
        await self.registry.ensure_namespaces()
        self.watch_cache.start()
        size = self.settings.api.max_message_bytes
        self.server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", size),
            ("grpc.max_send_message_length", size),
            ("grpc.so_reuseport", 0),
        ])
        self.server.add_generic_rpc_handlers((_object_service_handler(ObjectServicer(self.registry, self.watch_cache,
                                                                                     self.agents)),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME),
                                            self.server)
        self.port = self.server.add_insecure_port(self.settings.api.listen)
        if not self.port:
            raise OSError(f"cannot listen on {self.settings.api.listen}")
        await self.server.start()
        await self._set_serving(health_pb2.HealthCheckResponse.SERVING)
        log.info("api_server_started", endpoint=self.endpoint)
        return self.endpoint

    async def _set_serving(self, status) -> None:
        for name in ("", SERVICE_NAME):
            result = self.health.set(name, status)
            if asyncio.iscoroutine(result):
                await result

    async def stop(self) -> None:
        if self.server is not None:
            await self._set_serving(health_pb2.HealthCheckResponse.NOT_SERVING)
            await self.watch_cache.stop()
            await self.server.stop(self.settings.api.shutdown_grace)
            await self.agents.close()
        await self.store.close()
        log.info("api_server_stopped")

    async def wait(self) -> None:
        if self.server is not None:
            await self.server.wait_for_termination()
