"""Gateway-to-gateway forwarding (skyshift/gateway/mesh.py, gateway.py) over real loopback
connections: the HMAC handshake, what a remote gateway refuses, two gateways serving one
Service with endpoints on both clusters, and a removed Link ending cross-cluster traffic."""
from __future__ import annotations

import asyncio
import dataclasses

import pytest

from skyshift import config
from skyshift.gateway import addresses, plan
from skyshift.gateway.gateway import Gateway
from skyshift.gateway.mesh import CONNECT, PROBE, MeshError, Route, open_tunnel, ping
from tests.conftest import async_wait_for
from tests.unit.gateway_support import NamedEchoServer, ask_name, free_port
from tests.unit.test_gateway_plan import cluster, endpoints, link, service

ADDRESS = "127.0.0.1"
#: Where the replica of cluster b listens (same port as a's, as replicas of one job do), and
#: where b's gateway serves Service ports (a's is ADDRESS).
REMOTE_REPLICA = "127.0.0.2"
REMOTE_GATEWAY = "127.0.0.3"
SECRET = bytes.fromhex("cd" * 32)


def settings(**changes) -> config.GatewaySettings:
    return dataclasses.replace(config.GatewaySettings(), connect_timeout=2.0, health_interval=0.05,
                               health_timeout=1.0, **changes)


@pytest.fixture
async def echo():
    """echo(name, address, port) -> a started NamedEchoServer."""
    started = []

    async def start(name: str, address: str = ADDRESS, port: int = 0) -> NamedEchoServer:
        started.append(await NamedEchoServer(name, address, port).start())
        return started[-1]

    yield start
    for server in started:
        await server.stop()


@pytest.fixture
async def gateways():
    """gateways(*clusters) -> started Gateways on 127.0.0.1 (mesh on free ports)."""
    started = []

    async def start(*names: str):
        made = []
        for name in names:
            gateway = Gateway(name, settings())
            await gateway.start(ADDRESS)
            started.append(gateway)
            made.append(gateway)
        return made

    yield start
    for gateway in started:
        await gateway.close()


def clusters_of(*gateways: Gateway):
    """Cluster objects as the gateways' skylets publish them."""
    return {gateway.cluster: cluster(gateway.cluster, gateway.mesh.address) for gateway in gateways}


async def apply(gateways, services, eps, links):
    clusters = clusters_of(*gateways)
    for gateway in gateways:
        address = ADDRESS if gateway.cluster == "a" else REMOTE_GATEWAY
        problems = await gateway.apply(plan.build_plan(gateway.cluster, address, services,
                                                       {"default/web": eps}, links, clusters))
        assert problems == {"default/web": []}


async def test_a_tunnel_reaches_only_the_remote_clusters_endpoints(echo, gateways):
    server = await echo("remote-replica")
    (remote,) = await gateways("b")
    eps = endpoints("web", {"b": [(ADDRESS, server.port)]})
    await remote.apply(plan.build_plan("b", ADDRESS, [], {"default/web": eps}, [link("ab", "a", "b", SECRET.hex())],
                                       clusters_of(remote)))
    route = Route("ab", remote.mesh.address, SECRET)

    reader, writer = await open_tunnel(route, CONNECT, ADDRESS, server.port)
    assert (await reader.readline()) == b"remote-replica\n"
    writer.write(b"hello")
    assert await reader.readexactly(5) == b"hello"
    writer.close()

    await ping(route, timeout=2.0)
    _, probe = await open_tunnel(route, PROBE, ADDRESS, server.port)
    probe.close()
    with pytest.raises(MeshError, match="is not an endpoint of this cluster"):
        await open_tunnel(route, CONNECT, ADDRESS, free_port())
    with pytest.raises(MeshError, match="does not hold the secret"):
        await open_tunnel(Route("ab", remote.mesh.address, b"wrong"), CONNECT, ADDRESS, server.port)
    with pytest.raises(MeshError, match="no link 'ac'"):
        await open_tunnel(Route("ac", remote.mesh.address, SECRET), CONNECT, ADDRESS, server.port)
    await server.stop()
    with pytest.raises(MeshError, match="unhealthy"):
        await open_tunnel(route, PROBE, ADDRESS, server.port)
    with pytest.raises(MeshError, match="cannot connect"):
        await open_tunnel(route, CONNECT, ADDRESS, server.port)


async def test_two_gateways_balance_over_both_clusters_until_the_link_goes(echo, gateways):
    on_a = await echo("on-a")
    await echo("on-b", REMOTE_REPLICA, on_a.port)
    gateway_a, gateway_b = await gateways("a", "b")
    port = free_port()
    web = service("web", [(port, on_a.port)])
    eps = endpoints("web", {"a": [(ADDRESS, on_a.port)], "b": [(REMOTE_REPLICA, on_a.port)]})
    await apply([gateway_a, gateway_b], [web], eps, [link("ab", "a", "b", SECRET.hex())])
    names = [await ask_name(ADDRESS, port) for _ in range(6)]
    assert names.count("on-a") == 3 and names.count("on-b") == 3

    # A connection through the link stays open; removing the link ends it, and every later
    # connection stays on this cluster.
    reader, writer = await asyncio.open_connection(ADDRESS, port)
    while (await reader.readline()) != b"on-b\n":
        writer.close()
        reader, writer = await asyncio.open_connection(ADDRESS, port)
    await apply([gateway_a, gateway_b], [web], eps, [])
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    assert [await ask_name(ADDRESS, port) for _ in range(4)] == ["on-a"] * 4


async def test_a_remote_endpoint_failing_its_probe_leaves_rotation(echo, gateways):
    on_a = await echo("on-a")
    on_b = await echo("on-b", REMOTE_REPLICA, on_a.port)
    gateway_a, gateway_b = await gateways("a", "b")
    port = free_port()
    web = service("web", [(port, on_a.port)])
    eps = endpoints("web", {"a": [(ADDRESS, on_a.port)], "b": [(REMOTE_REPLICA, on_a.port)]})
    await apply([gateway_b, gateway_a], [web], eps, [link("ab", "a", "b", SECRET.hex())])
    remote = next(backend for backend in gateway_a.backends.values() if backend.cluster == "b")

    await on_b.stop()  # b's gateway answers a's probes through the link with "unhealthy"

    await async_wait_for(lambda: not remote.healthy, 5, message="the remote endpoint taken out")
    assert "unhealthy" in remote.reason
    assert [await ask_name(ADDRESS, port) for _ in range(4)] == ["on-a"] * 4


async def test_the_mesh_listener_address_comes_from_settings():
    port = free_port()
    gateway = Gateway("a", settings(mesh_port=port))
    try:
        assert await gateway.start(ADDRESS) == f"{ADDRESS}:{port}"
        assert addresses.split_host_port(gateway.mesh.address) == (ADDRESS, port)
    finally:
        await gateway.close()
