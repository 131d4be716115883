"""The Endpoints and Service controllers against a real API server; the test plays the
skylets, reporting Replica phases and endpoints through update_status."""
from __future__ import annotations

import asyncio
import uuid
from typing import Dict, List, Optional, Tuple

import pytest

from controllers.endpoints import EndpointsController
from controllers.service import ENDPOINTS_READY, PORTS_AVAILABLE, PRIMARY_READY, READY, ServiceController
from skyshift.api.conditions import get_condition
from skyshift.api.errors import InvalidError, NotFoundError
from skyshift.client import AsyncClient
from skyshift.gateway.addresses import gateway_address
from skyshift.gateway.plan import gateway_condition
from skyshift.v1 import objects_pb2 as pb
from tests.conftest import async_wait_for


@pytest.fixture
async def controllers(aclient: AsyncClient, namespace):
    running = [EndpointsController(aclient, namespace=namespace), ServiceController(aclient, namespace=namespace)]
    tasks = [asyncio.ensure_future(controller.run()) for controller in running]
    yield running
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


@pytest.fixture
async def clusters(aclient: AsyncClient):
    """make(name, manager, hosts) creates a Cluster (deleted after the test); returns its name."""
    made: List[str] = []
    suffix = uuid.uuid4().hex[:6]

    async def make(name: str, manager: str = "local", hosts: Tuple[str, ...] = ()) -> str:
        cluster = pb.Cluster()
        cluster.metadata.name = f"{name}-{suffix}"
        cluster.spec.manager = manager
        for host in hosts:
            cluster.spec.hosts.add(host=host)
        await aclient.create(cluster)
        made.append(cluster.metadata.name)
        return cluster.metadata.name

    yield make
    for name in made:
        try:
            await aclient.delete("clusters", name)
        except NotFoundError:
            pass


def new_service(name: str, namespace: str, ports=((80, 8080),), type_: str = "ClusterIP", primary: str = "",
                **selector) -> pb.Service:
    service = pb.Service()
    service.metadata.name = name
    service.metadata.namespace = namespace
    service.spec.type = type_
    service.spec.primary_cluster = primary
    service.spec.selector.update(selector or {"app": name})
    for port, target in ports:
        service.spec.ports.add(port=port, target_port=target)
    return service


async def run_replica(client: AsyncClient, namespace: str, name: str, cluster: str, labels: Dict[str, str],
                      endpoints: Optional[List[Tuple[str, int]]] = None, node: str = "node-1",
                      phase: str = "RUNNING") -> pb.Replica:
    """A Replica bound to `cluster` whose skylet reports `phase` and `endpoints`."""
    replica = pb.Replica()
    replica.metadata.name = name
    replica.metadata.namespace = namespace
    replica.metadata.labels.update(labels)
    replica.spec.job_name = "web"
    replica.spec.template.run = "serve"
    replica.spec.cluster = cluster
    replica.spec.node = node
    replica = await client.create(replica)
    return await report(client, replica, phase, endpoints)


async def report(client: AsyncClient, replica: pb.Replica, phase: str,
                 endpoints: Optional[List[Tuple[str, int]]] = None) -> pb.Replica:
    replica = await client.get("replicas", replica.metadata.name, replica.metadata.namespace)
    replica.status.phase = phase
    del replica.status.endpoints[:]
    for address, port in endpoints or ():
        replica.status.endpoints.add(address=address, port=port, node=replica.spec.node)
    return await client.update_status(replica)


def addresses(endpoints: pb.Endpoints) -> Dict[str, List[Tuple[str, int]]]:
    return {cluster: [(e.address, e.port) for e in items.endpoints]
            for cluster, items in endpoints.spec.endpoints.items()}


async def endpoints_of(client: AsyncClient, name: str, namespace: str) -> Optional[pb.Endpoints]:
    try:
        return await client.get("endpoints", name, namespace)
    except NotFoundError:
        return None


async def wait_endpoints(client, name, namespace, expected, timeout=10.0) -> pb.Endpoints:
    async def matches():
        found = await endpoints_of(client, name, namespace)
        return found if found is not None and addresses(found) == expected else None

    return await async_wait_for(matches, timeout, message=f"endpoints {expected}")


async def test_endpoints_follow_running_matching_replicas_per_cluster(aclient, namespace, controllers, clusters):
    a = await clusters("a")
    lab = await clusters("lab", manager="ssh", hosts=("127.0.0.12",))
    service = await aclient.create(new_service("web", namespace))
    await run_replica(aclient, namespace, "web-0", a, {"app": "web"}, [("127.0.0.1", 8080)])
    # Reported no endpoints: reached at its node's address on the target port.
    await run_replica(aclient, namespace, "web-1", lab, {"app": "web"}, node="127.0.0.12")
    # Not selected: other labels, not running, another namespace's replica is never listed.
    await run_replica(aclient, namespace, "db-0", a, {"app": "db"}, [("127.0.0.1", 5432)])
    pending = await run_replica(aclient, namespace, "web-2", a, {"app": "web"}, phase="SCHEDULED")

    endpoints = await wait_endpoints(aclient, "web", namespace, {a: [("127.0.0.1", 8080)], lab: [("127.0.0.12", 8080)]})
    assert [(ref.kind, ref.name, ref.uid) for ref in endpoints.metadata.owner_references] == [
        ("Service", "web", service.metadata.uid)]
    assert dict(endpoints.spec.selector) == {"app": "web"}

    # Scaling: a third replica starts and is added; one that fails is dropped.
    await report(aclient, pending, "RUNNING", [("127.0.0.2", 8080)])
    await wait_endpoints(aclient, "web", namespace,
                         {a: [("127.0.0.1", 8080), ("127.0.0.2", 8080)], lab: [("127.0.0.12", 8080)]})
    failed = await aclient.get("replicas", "web-1", namespace)
    await report(aclient, failed, "FAILED")
    await wait_endpoints(aclient, "web", namespace, {a: [("127.0.0.1", 8080), ("127.0.0.2", 8080)]})

    await aclient.delete("services", "web", namespace)
    await async_wait_for(lambda: _gone(aclient, "web", namespace), 10, message="endpoints deleted with the service")


async def _gone(client, name, namespace) -> bool:
    return await endpoints_of(client, name, namespace) is None


async def test_primary_auto_and_external_address(aclient, namespace, controllers, clusters, api_server):
    a, b = await clusters("a"), await clusters("b")
    await aclient.create(new_service("lb", namespace, ports=((80, 8080),), type_="LoadBalancer", primary="auto"))

    async def status_condition(kind):
        service = await aclient.get("services", "lb", namespace)
        return get_condition(service.status.conditions, kind)

    condition = await async_wait_for(lambda: status_condition(PRIMARY_READY), 10, message="primary condition")
    assert (condition.status, condition.reason) == ("False", "NoEndpoints")
    assert (await status_condition(ENDPOINTS_READY)).reason == "NoEndpoints"

    await run_replica(aclient, namespace, "lb-0", a, {"app": "lb"}, [("127.0.0.1", 8080)])
    await run_replica(aclient, namespace, "lb-1", b, {"app": "lb"}, [("127.0.0.2", 8080)])
    await run_replica(aclient, namespace, "lb-2", b, {"app": "lb"}, [("127.0.0.3", 8080)])
    endpoints = await wait_endpoints(aclient, "lb", namespace,
                                     {a: [("127.0.0.1", 8080)], b: [("127.0.0.2", 8080), ("127.0.0.3", 8080)]})
    assert endpoints.spec.primary_cluster == b
    cluster_b = await aclient.get("clusters", b)
    expected_ip = gateway_address(cluster_b, api_server.settings.gateway)

    async def exposed():
        service = await aclient.get("services", "lb", namespace)
        return service if service.status.external_ip == expected_ip else None

    service = await async_wait_for(exposed, 10, message="external_ip of the primary cluster")
    assert get_condition(service.status.conditions, PRIMARY_READY).status == "True"
    assert get_condition(service.status.conditions, ENDPOINTS_READY).message == f"3 endpoints ({a}: 1, {b}: 2)"
    # No gateway runs in this test: the ports are not known to be served yet.
    assert get_condition(service.status.conditions, PORTS_AVAILABLE).status == "Unknown"
    assert get_condition(service.status.conditions, READY).status == "False"
    assert service.status.observed_generation == service.metadata.generation


async def test_a_gateway_report_of_a_port_in_use_becomes_a_service_condition(aclient, namespace, controllers,
                                                                             clusters):
    a = await clusters("a")
    await aclient.create(new_service("web", namespace))
    endpoints = await async_wait_for(lambda: endpoints_of(aclient, "web", namespace), 10, message="endpoints")
    # What a gateway whose port is taken reports (skyshift/gateway/sync.py).
    condition = endpoints.status.conditions.add(type=gateway_condition(a), status="False", reason="PortInUse",
                                                message="127.0.0.1:80: address already in use")
    assert condition.type == f"Gateway/{a}"
    await aclient.update_status(endpoints)

    async def ports_condition():
        service = await aclient.get("services", "web", namespace)
        condition = get_condition(service.status.conditions, PORTS_AVAILABLE)
        return condition if condition is not None and condition.status == "False" else None

    condition = await async_wait_for(ports_condition, 10, message="PortsAvailable False")
    assert condition.reason == "PortInUse"
    assert condition.message == f"{a}: 127.0.0.1:80: address already in use"


async def test_a_named_primary_cluster_that_does_not_exist(aclient, namespace, controllers):
    await aclient.create(new_service("np", namespace, type_="NodePort", primary="nowhere"))

    async def primary_condition():
        service = await aclient.get("services", "np", namespace)
        return get_condition(service.status.conditions, PRIMARY_READY)

    condition = await async_wait_for(primary_condition, 10, message="primary condition")
    assert (condition.status, condition.reason) == ("False", "ClusterNotFound")


@pytest.mark.parametrize("change, field", [
    (lambda s: s.spec.ports[0].__setattr__("port", 70000), "spec.ports[0].port"),
    (lambda s: s.spec.ports[0].__setattr__("target_port", -1), "spec.ports[0].target_port"),
    (lambda s: s.spec.selector.clear(), "spec.selector"),
    (lambda s: s.spec.__setattr__("type", "ExternalName"), "spec.type"),
    (lambda s: s.spec.__setattr__("balancing", "random"), "spec.balancing"),
    (lambda s: s.spec.ClearField("ports"), "spec.ports"),
])
async def test_bad_service_specs_are_rejected(aclient, namespace, change, field):
    service = new_service("bad", namespace)
    change(service)
    with pytest.raises(InvalidError) as raised:
        await aclient.create(service)
    assert field in str(raised.value)
