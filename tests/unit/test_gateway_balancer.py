"""Balancing policies and health checks (skyshift/gateway/balancer.py) with real servers on
loopback: round robin spreads, least connections picks the idle endpoint, endpoints failing
TCP or HTTP probes are taken out and come back once they recover."""
from __future__ import annotations

import asyncio

import pytest
from aiohttp import web

from skyshift.gateway.balancer import Backend, Balancer, EndpointProber, HealthChecker
from skyshift.gateway.proxy import Listener
from tests.conftest import async_wait_for
from tests.unit.gateway_support import NamedEchoServer, free_port, open_named

ADDRESS = "127.0.0.1"


async def dial(backend: Backend):
    return await asyncio.wait_for(asyncio.open_connection(backend.address, backend.port), 2.0)


@pytest.fixture
async def echo_servers():
    started = []

    async def start(*names: str):
        for name in names:
            started.append(await NamedEchoServer(name).start())
        return started[-len(names):]

    yield start
    for server in started:
        await server.stop()


def test_round_robin_takes_turns_over_healthy_backends():
    a, b, c = (Backend(ADDRESS, port) for port in (1, 2, 3))
    balancer = Balancer("round_robin", [a, b, c])
    assert [balancer.choose() for _ in range(6)] == [a, b, c, a, b, c]
    b.connect_failed("refused")
    assert {balancer.choose() for _ in range(4)} == {a, c}
    assert balancer.choose(exclude={a, c}) is None


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="unknown balancing policy"):
        Balancer("random")


async def test_least_connections_picks_the_idle_endpoint(echo_servers):
    busy, idle = await echo_servers("busy", "idle")
    backends = [Backend(ADDRESS, busy.port), Backend(ADDRESS, idle.port)]
    listener = Listener(ADDRESS, free_port(), Balancer("least_connections", backends), dial, 3, 65536, 60.0)
    await listener.start()
    try:
        first, _, long_lived = await open_named(ADDRESS, listener.port)
        other = "idle" if first == "busy" else "busy"
        # While one endpoint carries a long connection, every new one goes to the other.
        for _ in range(5):
            name, _, writer = await open_named(ADDRESS, listener.port)
            assert name == other
            writer.close()
            await async_wait_for(lambda: sum(b.active for b in backends) == 1, 5, message="connection closed")
        long_lived.close()
        await async_wait_for(lambda: sum(b.active for b in backends) == 0, 5, message="connections closed")
    finally:
        await listener.close()


async def test_health_checks_take_out_and_put_back_a_tcp_endpoint(echo_servers):
    (server,) = await echo_servers("a")
    port = server.port
    backend = Backend(ADDRESS, port, failure_threshold=2)
    prober = EndpointProber(timeout=1.0)
    checker = HealthChecker(lambda b: prober.probe(b.address, b.port, b.health_path), interval=0.05, timeout=1.0)
    checker.backends = {backend}
    task = asyncio.ensure_future(checker.run())
    try:
        await checker.check_all()
        assert backend.healthy
        await server.stop()
        await async_wait_for(lambda: not backend.healthy, 5, message="endpoint taken out")
        assert backend.failures >= 2 and "health probe failed" in backend.reason
        revived = await NamedEchoServer("a", port=port).start()
        try:
            await async_wait_for(lambda: backend.healthy, 5, message="endpoint back in rotation")
        finally:
            await revived.stop()
    finally:
        task.cancel()
        await prober.close()


async def test_one_failed_probe_below_the_threshold_keeps_the_endpoint():
    backend = Backend(ADDRESS, free_port(), failure_threshold=3)
    prober = EndpointProber(timeout=1.0)
    checker = HealthChecker(lambda b: prober.probe(b.address, b.port), interval=1.0, timeout=1.0)
    await checker.check(backend)
    await checker.check(backend)
    assert backend.healthy and backend.failures == 2
    await checker.check(backend)
    assert not backend.healthy


async def test_http_probes_follow_the_status_the_endpoint_answers():
    status = {"code": 200}

    async def health(request):
        return web.Response(status=status["code"], text="health")

    app = web.Application()
    app.router.add_get("/healthz", health)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, ADDRESS, port)
    await site.start()
    prober = EndpointProber(timeout=1.0)
    backend = Backend(ADDRESS, port, health_path="/healthz", failure_threshold=1)
    checker = HealthChecker(lambda b: prober.probe(b.address, b.port, b.health_path), interval=1.0, timeout=1.0)
    try:
        await checker.check(backend)
        assert backend.healthy
        status["code"] = 503
        await checker.check(backend)
        assert not backend.healthy and "503" in backend.reason
        status["code"] = 404  # any answer below 500: the server works
        await checker.check(backend)
        assert backend.healthy
    finally:
        await prober.close()
        await runner.cleanup()
