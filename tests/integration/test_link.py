"""Links, gateways and Services together against a real API server: the Link, Endpoints and
Service controllers and the gateways' sync (as a skylet runs it) in this process, real echo
servers on loopback as the replicas (the test reports their phase and address as a skylet
would). Connections to a cluster's gateway reach replicas on both clusters while a Link joins
them, and only local ones once it is deleted."""
from __future__ import annotations

import asyncio
import copy
import socket
import uuid

import pytest

from controllers.endpoints import EndpointsController
from controllers.link import ACTIVE, CONNECTED, FAILED, LinkController
from controllers.service import PORTS_AVAILABLE, READY, ServiceController
from skyshift.api.conditions import get_condition
from skyshift.gateway.addresses import MESH_ANNOTATION, gateway_address
from skyshift.gateway.plan import SECRET_ANNOTATION
from skyshift.gateway.sync import GatewaySync
from skyshift.v1 import objects_pb2 as pb
from tests.conftest import async_wait_for
from tests.integration.test_endpoints import new_service, run_replica
from tests.unit.gateway_support import NamedEchoServer, ask_name, free_port

REPLICA_ADDRESSES = ("127.0.0.1", "127.0.0.2")


@pytest.fixture
def settings(api_server):
    fast = copy.deepcopy(api_server.settings)
    fast.gateway.health_interval = 0.1
    fast.gateway.bind_retry_interval = 0.2
    fast.gateway.link_retry_interval = 0.2
    fast.gateway.link_probe_interval = 1.0
    return fast


@pytest.fixture
async def mesh(aclient, namespace, settings):
    """Two clusters with gateways and the controllers; yields (cluster a, cluster b, gateway sync)."""
    suffix = uuid.uuid4().hex[:6]
    names = (f"mesh-a-{suffix}", f"mesh-b-{suffix}")
    for name in names:
        cluster = pb.Cluster()
        cluster.metadata.name = name
        cluster.spec.manager = "local"
        await aclient.create(cluster)
    sync = GatewaySync(aclient, settings=settings, serves=lambda cluster: cluster.metadata.name in names)
    running = [sync, LinkController(aclient, settings=settings),
               EndpointsController(aclient, settings=settings, namespace=namespace),
               ServiceController(aclient, settings=settings, namespace=namespace)]
    tasks = [asyncio.ensure_future(controller.run()) for controller in running]
    try:
        await async_wait_for(lambda: all_published(aclient, names), 10, message="gateways publish mesh addresses")
        yield names[0], names[1], sync
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for link in (await aclient.list("links")).items:
            if set(names) & {link.spec.source_cluster, link.spec.target_cluster}:
                await aclient.delete("links", link.metadata.name)
        for name in names:
            await aclient.delete("clusters", name)


async def all_published(client, names) -> bool:
    clusters = [await client.get("clusters", name) for name in names]
    return all(cluster.metadata.annotations.get(MESH_ANNOTATION) for cluster in clusters)


async def create_link(client, source: str, target: str) -> str:
    link = pb.Link()
    link.metadata.name = f"link-{uuid.uuid4().hex[:8]}"
    link.spec.source_cluster = source
    link.spec.target_cluster = target
    await client.create(link)
    return link.metadata.name


async def link_in_phase(client, name: str, phase: str):
    link = await client.get("links", name)
    return link if link.status.phase == phase else None


@pytest.fixture
async def replicas():
    """Echo servers named after their cluster, one per replica address, on one shared port."""
    port = free_port()
    started = []

    async def start(*names: str):
        for name, address in zip(names, REPLICA_ADDRESSES):
            started.append(await NamedEchoServer(name, address, port).start())
        return port

    yield start
    for server in started:
        await server.stop()


async def service_condition(client, name, namespace, type_, status):
    service = await client.get("services", name, namespace)
    condition = get_condition(service.status.conditions, type_)
    return condition if condition is not None and condition.status == status else None


async def test_a_link_carries_service_traffic_until_it_is_deleted(aclient, namespace, mesh, replicas, settings):
    a, b, sync = mesh
    link_name = await create_link(aclient, a, b)
    link = await async_wait_for(lambda: link_in_phase(aclient, link_name, ACTIVE), 10, message="link ACTIVE")
    assert len(link.metadata.annotations[SECRET_ANNOTATION]) == 64
    cluster_a, cluster_b = await aclient.get("clusters", a), await aclient.get("clusters", b)
    assert link.status.message == (f"{a} ({cluster_a.metadata.annotations[MESH_ANNOTATION]}) <-> "
                                   f"{b} ({cluster_b.metadata.annotations[MESH_ANNOTATION]})")
    assert get_condition(link.status.conditions, CONNECTED).status == "True"

    target_port = await replicas(a, b)
    address_a = gateway_address(cluster_a, settings.gateway)
    service_port = free_port(address_a)
    await aclient.create(new_service("web", namespace, ports=((service_port, target_port),)))
    await run_replica(aclient, namespace, "web-0", a, {"app": "web"}, [(REPLICA_ADDRESSES[0], target_port)])
    await run_replica(aclient, namespace, "web-1", b, {"app": "web"}, [(REPLICA_ADDRESSES[1], target_port)])

    async def both_reached():
        names = {await ask_name(address_a, service_port) for _ in range(6)}
        return names == {a, b}

    await async_wait_for(both_reached, 15, interval=0.1, message="connections reach both clusters' replicas")
    ready = await async_wait_for(lambda: service_condition(aclient, "web", namespace, READY, "True"), 10,
                                 message="service Ready")
    assert ready.reason == "Serving"
    ports = await service_condition(aclient, "web", namespace, PORTS_AVAILABLE, "True")
    assert ports.message == f"served by the gateways of {a}, {b}"

    replica = await aclient.get("replicas", "web-0", namespace)
    assert await sync.service_env(replica) == {"WEB_SERVICE_HOST": address_a, "WEB_SERVICE_PORT": str(service_port)}

    await aclient.delete("links", link_name)

    async def only_local():
        return {await ask_name(address_a, service_port) for _ in range(6)} == {a}

    await async_wait_for(only_local, 10, interval=0.1, message="traffic stays on the local cluster")


async def test_a_link_to_a_missing_cluster_fails_with_the_reason(aclient, mesh):
    a, _, _ = mesh
    link_name = await create_link(aclient, a, f"ghost-{uuid.uuid4().hex[:6]}")
    link = await async_wait_for(lambda: link_in_phase(aclient, link_name, FAILED), 10, message="link FAILED")
    assert get_condition(link.status.conditions, CONNECTED).reason == "ClusterNotFound"
    assert "does not exist" in link.status.message


async def test_a_port_in_use_on_the_gateway_is_reported_until_it_is_freed(aclient, namespace, mesh, replicas,
                                                                          settings):
    a, b, _ = mesh
    target_port = await replicas(a)
    address_a = gateway_address(await aclient.get("clusters", a), settings.gateway)
    squatter = socket.socket()
    squatter.bind((address_a, 0))
    squatter.listen()
    taken = squatter.getsockname()[1]
    try:
        await aclient.create(new_service("busy", namespace, ports=((taken, target_port),)))
        await run_replica(aclient, namespace, "busy-0", a, {"app": "busy"}, [(REPLICA_ADDRESSES[0], target_port)])
        condition = await async_wait_for(lambda: service_condition(aclient, "busy", namespace, PORTS_AVAILABLE,
                                                                   "False"), 10, message="PortsAvailable False")
        assert condition.reason == "PortInUse"
        assert f"{a}: {address_a}:{taken}" in condition.message
    finally:
        squatter.close()
    # Once the port is free the gateway binds it at its next retry.
    await async_wait_for(lambda: service_condition(aclient, "busy", namespace, PORTS_AVAILABLE, "True"), 10,
                         message="PortsAvailable True")
    assert await ask_name(address_a, taken) == a
