"""The gateway's forwarding (skyshift/gateway/proxy.py) over real loopback connections: bytes
arrive intact in both directions, half-close is forwarded, a dead endpoint is skipped without
the client noticing, idle connections are closed."""
from __future__ import annotations

import asyncio
import hashlib
import os

import pytest

from skyshift.gateway.balancer import Backend, Balancer
from skyshift.gateway.proxy import Listener
from tests.unit.gateway_support import NamedEchoServer, ask_name, free_port, open_named

ADDRESS = "127.0.0.1"


async def dial(backend: Backend):
    return await asyncio.wait_for(asyncio.open_connection(backend.address, backend.port), 2.0)


@pytest.fixture
async def servers():
    started = []

    async def start(name: str) -> NamedEchoServer:
        server = await NamedEchoServer(name).start()
        started.append(server)
        return server

    yield start
    for server in started:
        await server.stop()


@pytest.fixture
async def gateway():
    """gateway(backends, policy, idle_timeout) -> a started Listener on a free port."""
    listeners = []

    async def start(backends, policy="round_robin", idle_timeout=60.0) -> Listener:
        listener = Listener(ADDRESS, free_port(), Balancer(policy, backends), dial, attempts=3,
                            buffer_size=65536, idle_timeout=idle_timeout)
        await listener.start()
        listeners.append(listener)
        return listener

    yield start
    for listener in listeners:
        await listener.close()


def backend_of(server: NamedEchoServer) -> Backend:
    return Backend(ADDRESS, server.port, cluster=server.name)


async def test_bytes_arrive_intact_both_ways(servers, gateway):
    server = await servers("a")
    listener = await gateway([backend_of(server)])
    payload = os.urandom(8 * 1024 * 1024)
    name, reader, writer = await open_named(ADDRESS, listener.port)
    assert name == "a"

    async def send():
        writer.write(payload)
        await writer.drain()
        writer.write_eof()

    sender = asyncio.ensure_future(send())
    echoed = await asyncio.wait_for(reader.readexactly(len(payload)), 30)
    await sender
    assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
    # The client's half-close reached the server, whose answer and close came back.
    assert await asyncio.wait_for(reader.read(), 5) == b"bye\n"
    writer.close()


async def test_half_close_keeps_the_other_direction_open(servers, gateway):
    server = await servers("a")
    listener = await gateway([backend_of(server)])
    _, reader, writer = await open_named(ADDRESS, listener.port)
    writer.write(b"last words")
    writer.write_eof()  # the client is done sending, but still reads
    assert await asyncio.wait_for(reader.read(), 5) == b"last wordsbye\n"
    writer.close()


async def test_a_dead_endpoint_is_skipped_without_failing_the_client(servers, gateway):
    alive, doomed = await servers("alive"), await servers("doomed")
    backends = [backend_of(alive), backend_of(doomed)]
    listener = await gateway(backends)
    assert {await ask_name(ADDRESS, listener.port) for _ in range(4)} == {"alive", "doomed"}

    await doomed.stop()

    answers = [await ask_name(ADDRESS, listener.port) for _ in range(20)]
    assert answers == ["alive"] * 20
    assert not backends[1].healthy and "connect failed" in backends[1].reason
    assert backends[0].healthy


async def test_no_healthy_endpoint_closes_the_connection(servers, gateway):
    server = await servers("a")
    backend = backend_of(server)
    listener = await gateway([backend])
    await server.stop()
    assert await ask_name(ADDRESS, listener.port) == ""
    assert not backend.healthy


async def test_an_idle_connection_is_closed(servers, gateway):
    server = await servers("a")
    listener = await gateway([backend_of(server)], idle_timeout=0.3)
    _, reader, writer = await open_named(ADDRESS, listener.port)
    writer.write(b"ping")
    assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
    # Nothing more flows: the gateway closes the connection after the idle timeout.
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


async def test_a_port_in_use_cannot_be_listened_on(servers, gateway):
    server = await servers("a")
    with pytest.raises(OSError):
        await Listener(ADDRESS, server.port, Balancer(), dial, 1, 65536, 60.0).start()


async def test_an_endpoint_with_an_unusable_address_is_taken_out(servers, gateway):
    server = await servers("a")
    broken = Backend("not an address", 80, cluster="b")
    listener = await gateway([broken, backend_of(server)])
    assert [await ask_name(ADDRESS, listener.port) for _ in range(3)] == ["a"] * 3
    assert not broken.healthy
