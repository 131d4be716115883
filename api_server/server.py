"""The API server: grpc.aio with the object service, health and reflection."""
from __future__ import annotations

import asyncio
from typing import Optional

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from skyshift.config import Settings, save_client_config
from skyshift.store.etcd import Store
from skyshift.v1 import api_pb2

from api_server import tls
from api_server.agents import AgentRelay
from api_server.gate import Gate, OpenAccess
from api_server.registry import Registry
from api_server.servicer import ObjectServicer, decoder
from api_server.watch_cache import WatchCache

log = structlog.get_logger(__name__)

SERVICE_NAME = api_pb2.DESCRIPTOR.services_by_name["ObjectService"].full_name


def _serialize(message) -> bytes:
    # Watch streams send events already serialized once for all their watchers.
    return message if isinstance(message, bytes) else message.SerializeToString()


def _object_service_handler(servicer: ObjectServicer, gate: Optional[Gate] = None) -> grpc.GenericRpcHandler:
    """Like the generated add_ObjectServiceServicer_to_server, but responses may be bytes. With
    a gate (auth on), every servicer method runs behind it (api_server/gate.py)."""
    from google.protobuf import symbol_database

    database = symbol_database.Default()
    access = gate if gate is not None else OpenAccess()
    handlers = {}
    for method in api_pb2.DESCRIPTOR.services_by_name["ObjectService"].methods:
        behavior = getattr(servicer, method.name, None) or getattr(access, method.name, None)
        if behavior is None:
            continue  # not served yet: clients get UNIMPLEMENTED
        if gate is not None and method.name in gate.guarded_methods:
            behavior = gate.guard(method.name, behavior, method.server_streaming)
        request_class = database.GetSymbol(method.input_type.full_name)
        factory = grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
        handlers[method.name] = factory(behavior,
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
        self.gate = Gate(settings, self.registry, self.watch_cache) if settings.auth.enabled else None
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
        if self.gate is not None:
            await self.gate.start()
        size = self.settings.api.max_message_bytes
        self.server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", size),
            ("grpc.max_send_message_length", size),
            ("grpc.so_reuseport", 0),
        ])
        self.server.add_generic_rpc_handlers((_object_service_handler(ObjectServicer(self.registry, self.watch_cache,
                                                                                     self.agents), self.gate),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME),
                                            self.server)
        self.port = self._add_port()
        if not self.port:
            raise OSError(f"cannot listen on {self.settings.api.listen}")
        await self.server.start()
        await self._set_serving(health_pb2.HealthCheckResponse.SERVING)
        log.info("api_server_started", endpoint=self.endpoint)
        return self.endpoint

    def _add_port(self) -> int:
        """Listen, with TLS when configured; a CA made here is recorded as this home's client.ca_file
        (and forgotten again when TLS is off), so local clients trust it."""
        listen = self.settings.api.listen
        generated_ca = str(self.settings.tls_dir / "ca.pem")
        if not self.settings.tls.enabled:
            if self.settings.config_file.exists() and self.settings.client.ca_file == generated_ca:
                save_client_config(self.settings, ca_file="")
            return self.server.add_insecure_port(listen)
        files = tls.ensure_server_files(self.settings)
        if files.ca is not None:
            save_client_config(self.settings, ca_file=str(files.ca))
        return self.server.add_secure_port(listen, tls.server_credentials(self.settings, files))

    async def _set_serving(self, status) -> None:
        for name in ("", SERVICE_NAME):
            result = self.health.set(name, status)
            if asyncio.iscoroutine(result):
                await result

    async def stop(self) -> None:
        if self.server is not None:
            await self._set_serving(health_pb2.HealthCheckResponse.NOT_SERVING)
            if self.gate is not None:
                await self.gate.stop_caches()
            await self.watch_cache.stop()
            await self.server.stop(self.settings.api.shutdown_grace)
            await self.agents.close()
        if self.gate is not None:
            await self.gate.stop()
        await self.store.close()
        log.info("api_server_stopped")

    async def wait(self) -> None:
        if self.server is not None:
            await self.server.wait_for_termination()
