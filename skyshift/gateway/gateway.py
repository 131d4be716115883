"""The gateway of one cluster: Service listeners, their balancers, health checks and the mesh
listener, brought in line with a GatewayPlan by `apply` (idempotent; call it on every change).

    gateway = Gateway("local", settings.gateway)
    mesh = await gateway.start("127.0.0.1")          # "127.0.0.1:PORT" to publish
    problems = await gateway.apply(plan)              # {service key: [why a port is not served]}
    ...
    await gateway.close()

Backends keep their health and connection counts across plans as long as their endpoint,
route and probe stay the same; a Link that leaves the plan ends every connection over it.
"""
from __future__ import annotations

import asyncio
import errno
from typing import Dict, List, Optional, Tuple

import structlog

from skyshift import config
from skyshift.gateway.balancer import Backend, Balancer, EndpointProber, HealthChecker
from skyshift.gateway.mesh import CONNECT, PROBE, MeshServer, open_tunnel
from skyshift.gateway.plan import BIND_FAILED, PORT_IN_USE, Address, BackendSpec, GatewayPlan, Problem
from skyshift.gateway.proxy import Listener, Sessions, Streams

log = structlog.get_logger(__name__)


class Gateway:
    def __init__(self, cluster: str, settings: config.GatewaySettings):
        self.cluster = cluster
        self.settings = settings
        self.plan = GatewayPlan(cluster, "")
        self.sessions = Sessions()
        self.prober = EndpointProber(settings.health_timeout)
        self.health = HealthChecker(self._probe, settings.health_interval, settings.health_timeout)
        self.mesh = MeshServer(self.plan_secret, self.is_local_target, self.prober.probe, self.sessions,
                               settings.connect_timeout, settings.buffer_size, settings.idle_timeout)
        self.backends: Dict[BackendSpec, Backend] = {}
        self.balancers: Dict[Tuple[str, int], Balancer] = {}   # (service key, target port)
        self.listeners: Dict[Address, Listener] = {}
        self._health_task: Optional[asyncio.Task] = None

    # ------------------------------------------------------------------ life

    async def start(self, address: str, mesh_port: Optional[int] = None) -> str:
        """Start the mesh listener on `address` and the health checks; returns the mesh "host:port"."""
        self.plan = GatewayPlan(self.cluster, address)
        port = self.settings.mesh_port if mesh_port is None else mesh_port
        mesh = await self.mesh.start(address, port)
        self._health_task = asyncio.get_running_loop().create_task(self.health.run(),
                                                                   name=f"gateway-health-{self.cluster}")
        log.info("gateway_started", cluster=self.cluster, mesh=mesh)
        return mesh

    async def close(self) -> None:
        for listener in self.listeners.values():
            await listener.close()
        self.listeners.clear()
        await self.mesh.close()
        for link in list(self.plan.secrets):
            self.sessions.close(link)
        if self._health_task is not None:
            self._health_task.cancel()
            await asyncio.gather(self._health_task, return_exceptions=True)
        await self.prober.close()
        log.info("gateway_stopped", cluster=self.cluster)

    # ------------------------------------------------------------------ the plan

    def plan_secret(self, link: str) -> Optional[bytes]:
        return self.plan.secrets.get(link)

    def is_local_target(self, address: str, port: int) -> bool:
        return (address, port) in self.plan.local_targets

    async def apply(self, plan: GatewayPlan) -> Dict[str, List[Problem]]:
        """Serve `plan`; returns, per Service key, why some of its ports are not served here
        (the plan's own conflicts, and ports that could not be bound)."""
        gone_links = set(self.plan.secrets) - set(plan.secrets)
        self.plan = plan
        for link in gone_links:
            log.info("gateway_link_removed", cluster=self.cluster, link=link, connections=self.sessions.count(link))
            self.sessions.close(link)
        self._update_backends(plan)
        problems = {key: list(service.problems) for key, service in plan.services.items()}
        wanted: Dict[Address, Tuple[str, int]] = {}
        for key, service in plan.services.items():
            for listen, target_port in service.listeners.items():
                wanted[listen] = (key, target_port)
        for listen in set(self.listeners) - set(wanted):
            await self.listeners.pop(listen).close()
        for listen, (key, target_port) in sorted(wanted.items()):
            balancer = self.balancers[(key, target_port)]
            listener = self.listeners.get(listen)
            if listener is not None:
                listener.balancer = balancer
                continue
            listener = Listener(listen[0], listen[1], balancer, self._dial, self.settings.connect_attempts,
                                self.settings.buffer_size, self.settings.idle_timeout, self.sessions)
            try:
                await listener.start()
            except OSError as error:
                reason = PORT_IN_USE if error.errno == errno.EADDRINUSE else BIND_FAILED
                problems[key].append(Problem(reason, f"{listen[0]}:{listen[1]}: {error.strerror or error}"))
                continue
            self.listeners[listen] = listener
            log.info("gateway_listening", cluster=self.cluster, service=key, address=f"{listen[0]}:{listen[1]}",
                     target_port=target_port)
        return problems

    def _update_backends(self, plan: GatewayPlan) -> None:
        backends: Dict[BackendSpec, Backend] = {}
        balancers: Dict[Tuple[str, int], Balancer] = {}
        for key, service in plan.services.items():
            for target_port, specs in service.backends.items():
                members = []
                for spec in specs:
                    backend = backends.get(spec) or self.backends.get(spec)
                    if backend is None:
                        backend = Backend(spec.address, spec.port, spec.cluster, spec.route, spec.health_path,
                                          self.settings.failure_threshold)
                    backends[spec] = backend
                    members.append(backend)
                balancer = self.balancers.get((key, target_port)) or Balancer(service.balancing)
                balancer.update(service.balancing, members)
                balancers[(key, target_port)] = balancer
        self.backends = backends
        self.balancers = balancers
        self.health.backends = set(backends.values())

    # ------------------------------------------------------------------ connections

    async def _dial(self, backend: Backend) -> Streams:
        timeout = self.settings.connect_timeout
        if backend.route is None:
            async with asyncio.timeout(timeout):
                return await asyncio.open_connection(backend.address, backend.port, limit=self.settings.buffer_size)
        return await open_tunnel(backend.route, CONNECT, backend.address, backend.port, timeout=timeout,
                                 buffer_size=self.settings.buffer_size)

    async def _probe(self, backend: Backend) -> None:
        if backend.route is None:
            await self.prober.probe(backend.address, backend.port, backend.health_path)
            return
        _, writer = await open_tunnel(backend.route, PROBE, backend.address, backend.port, backend.health_path,
                                      timeout=self.settings.health_timeout)
        writer.close()
