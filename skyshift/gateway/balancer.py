"""Choosing a backend for each new connection, and keeping dead backends out of rotation.

* `Backend`: one endpoint (address:port of a replica, on this cluster or behind a remote
  gateway) with its health and the number of connections it carries now.
* `Balancer`: the backends of one Service port and a policy: round_robin, or
  least_connections (fewest active connections; ties go round robin).
* `HealthChecker`: probes every backend each interval. A backend that fails a connect is
  taken out at once; one that fails `failure_threshold` probes in a row is taken out too; one
  successful probe puts it back.
* `EndpointProber`: the probe of an endpoint on this cluster: a TCP connect, or an HTTP GET of
  a path (aiohttp) that must answer with a status below 500.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
from typing import TYPE_CHECKING, Awaitable, Callable, Collection, Iterable, List, Optional, Set

import structlog

if TYPE_CHECKING:
    import aiohttp

    from skyshift.gateway.mesh import Route

log = structlog.get_logger(__name__)

ROUND_ROBIN = "round_robin"
LEAST_CONNECTIONS = "least_connections"
POLICIES = (ROUND_ROBIN, LEAST_CONNECTIONS)


class ProbeError(Exception):
    """A health probe failed; the message says why."""


class Backend:
    """An endpoint of a Service as one gateway sees it. `route` is None for an endpoint on the
    gateway's own cluster, else how to reach the remote cluster's gateway."""

    def __init__(self, address: str, port: int, cluster: str = "", route: Optional["Route"] = None,
                 health_path: str = "", failure_threshold: int = 1):
        self.address = address
        self.port = port
        self.cluster = cluster
        self.route = route
        self.health_path = health_path
        self.failure_threshold = failure_threshold
        self.healthy = True
        self.failures = 0
        self.active = 0
        self.reason = ""

    def __repr__(self) -> str:
        where = f" via {self.route.link}" if self.route is not None else ""
        return f"Backend({self.address}:{self.port}@{self.cluster}{where})"

    def _take_out(self, reason: str) -> None:
        self.reason = reason
        if self.healthy:
            self.healthy = False
            log.info("endpoint_down", endpoint=f"{self.address}:{self.port}", cluster=self.cluster, reason=reason)

    def connect_failed(self, reason: str) -> None:
        self.failures += 1
        self._take_out(f"connect failed: {reason}")

    def probe_failed(self, reason: str) -> None:
        self.failures += 1
        if self.failures >= self.failure_threshold:
            self._take_out(f"health probe failed: {reason}")

    def probe_succeeded(self) -> None:
        self.failures = 0
        self.reason = ""
        if not self.healthy:
            self.healthy = True
            log.info("endpoint_up", endpoint=f"{self.address}:{self.port}", cluster=self.cluster)


class Balancer:
    """The backends of one Service port and how connections are spread over them."""

    def __init__(self, policy: str = ROUND_ROBIN, backends: Iterable[Backend] = ()):
        if policy not in POLICIES:
            raise ValueError(f"unknown balancing policy {policy!r} (one of: {', '.join(POLICIES)})")
        self.policy = policy
        self.backends: List[Backend] = list(backends)
        self._turn = itertools.count()

    def update(self, policy: str, backends: Iterable[Backend]) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown balancing policy {policy!r}")
        self.policy = policy
        self.backends = list(backends)

    def healthy(self) -> List[Backend]:
        return [backend for backend in self.backends if backend.healthy]

    def choose(self, exclude: Collection[Backend] = ()) -> Optional[Backend]:
        """The backend for a new connection; None when no healthy one is left."""
        candidates = [backend for backend in self.backends if backend.healthy and backend not in exclude]
        if not candidates:
            return None
        if self.policy == LEAST_CONNECTIONS:
            fewest = min(backend.active for backend in candidates)
            candidates = [backend for backend in candidates if backend.active == fewest]
        return candidates[next(self._turn) % len(candidates)]


Probe = Callable[[Backend], Awaitable[None]]


class HealthChecker:
    """Probes a set of backends every `interval` seconds (each probe bounded by `timeout`)."""

    def __init__(self, probe: Probe, interval: float, timeout: float):
        self.probe = probe
        self.interval = interval
        self.timeout = timeout
        self.backends: Set[Backend] = set()

    async def run(self) -> None:
        while True:
            await self.check_all()
            await asyncio.sleep(self.interval)

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(backend) for backend in list(self.backends)))

    async def check(self, backend: Backend) -> None:
        try:
            await asyncio.wait_for(self.probe(backend), self.timeout)
        except asyncio.TimeoutError:
            backend.probe_failed(f"no answer within {self.timeout:g}s")
        except (OSError, EOFError, ProbeError) as error:
            backend.probe_failed(str(error) or type(error).__name__)
        else:
            backend.probe_succeeded()


class EndpointProber:
    """Probes endpoints this gateway reaches directly: TCP connect, or HTTP GET of a path."""

    def __init__(self, timeout: float):
        self.timeout = timeout
        self._session: Optional["aiohttp.ClientSession"] = None

    async def probe(self, address: str, port: int, path: str = "") -> None:
        """Return when the endpoint is healthy; raise ProbeError, OSError or TimeoutError if not."""
        if path:
            await self._http(address, port, path)
            return
        _, writer = await asyncio.wait_for(asyncio.open_connection(address, port), self.timeout)
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()

    async def _http(self, address: str, port: int, path: str) -> None:
        import aiohttp  # only gateways with HTTP-probed services need it

        if self._session is None:
            # No keep-alive: each probe must see whether the endpoint accepts connections now.
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True),
                                                  timeout=aiohttp.ClientTimeout(total=self.timeout))
        try:
            host = f"[{address}]" if ":" in address else address
            async with self._session.get(f"http://{host}:{port}{path}", allow_redirects=False) as response:
                if response.status >= 500:
                    raise ProbeError(f"GET {path} answered {response.status}")
        except aiohttp.ClientError as error:
            raise ProbeError(f"GET {path}: {error}") from None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
