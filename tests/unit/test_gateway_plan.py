"""What a cluster's gateway serves (skyshift/gateway/plan.py) and where (addresses.py)."""
from __future__ import annotations

from typing import Dict, List, Tuple

from skyshift import config
from skyshift.gateway import addresses, plan
from skyshift.v1 import objects_pb2 as pb

SECRET = "ab" * 32


def cluster(name: str, mesh: str = "", manager: str = "local") -> pb.Cluster:
    obj = pb.Cluster()
    obj.metadata.name = name
    obj.spec.manager = manager
    if mesh:
        obj.metadata.annotations[addresses.MESH_ANNOTATION] = mesh
    return obj


def service(name: str, ports: List[Tuple[int, int]], type_: str = "ClusterIP", primary: str = "auto",
            created: int = 1, namespace: str = "default", node_port: int = 0) -> pb.Service:
    obj = pb.Service()
    obj.metadata.name = name
    obj.metadata.namespace = namespace
    obj.metadata.creation_timestamp.seconds = created
    obj.spec.type = type_
    obj.spec.selector["app"] = name
    obj.spec.primary_cluster = primary
    for port, target in ports:
        obj.spec.ports.add(port=port, target_port=target, node_port=node_port, protocol="TCP")
    return obj


def endpoints(name: str, per_cluster: Dict[str, List[Tuple[str, int]]], primary: str = "",
              namespace: str = "default") -> pb.Endpoints:
    obj = pb.Endpoints()
    obj.metadata.name = name
    obj.metadata.namespace = namespace
    obj.spec.primary_cluster = primary
    for where, items in per_cluster.items():
        for address, port in items:
            obj.spec.endpoints[where].endpoints.add(address=address, port=port)
    return obj


def link(name: str, source: str, target: str, secret: str = SECRET) -> pb.Link:
    obj = pb.Link()
    obj.metadata.name = name
    obj.spec.source_cluster = source
    obj.spec.target_cluster = target
    if secret:
        obj.metadata.annotations[plan.SECRET_ANNOTATION] = secret
    return obj


CLUSTERS = {name: cluster(name, f"127.0.0.1:{port}") for name, port in (("a", 7001), ("b", 7002), ("c", 7003))}


def test_local_endpoints_directly_and_linked_ones_through_their_gateway():
    web = service("web", [(80, 8080)])
    eps = endpoints("web", {"a": [("127.0.0.1", 8080)], "b": [("127.0.0.12", 8080)], "c": [("127.0.0.13", 8080)]})
    result = plan.build_plan("a", "127.0.0.1", [web], {"default/web": eps}, [link("ab", "b", "a")], CLUSTERS)
    served = result.services["default/web"]
    assert served.listeners == {("127.0.0.1", 80): 8080}
    backends = served.backends[8080]
    assert [(b.address, b.cluster) for b in backends] == [("127.0.0.1", "a"), ("127.0.0.12", "b")]
    assert backends[0].route is None
    assert backends[1].route == plan.Route("ab", "127.0.0.1:7002", bytes.fromhex(SECRET))
    assert result.secrets == {"ab": bytes.fromhex(SECRET)}
    assert result.local_targets == {("127.0.0.1", 8080)}


def test_links_without_secret_or_published_gateway_carry_nothing():
    eps = endpoints("web", {"b": [("127.0.0.12", 8080)], "c": [("127.0.0.13", 8080)]})
    clusters = dict(CLUSTERS, c=cluster("c"))  # c's gateway has not published its mesh address
    result = plan.build_plan("a", "127.0.0.1", [service("web", [(80, 8080)])], {"default/web": eps},
                             [link("ab", "a", "b", secret=""), link("ac", "a", "c")], clusters)
    assert result.services["default/web"].backends[8080] == []
    deleting = link("ab", "a", "b")
    deleting.metadata.deletion_timestamp.seconds = 5
    assert plan.peer_routes("a", [deleting], CLUSTERS) == {}


def test_external_ports_only_on_the_primary_cluster():
    web = service("web", [(80, 8080)], type_="NodePort", node_port=30080)
    eps = endpoints("web", {"a": [("127.0.0.1", 8080)]}, primary="a")
    on_primary = plan.build_plan("a", "127.0.0.1", [web], {"default/web": eps}, [], CLUSTERS)
    assert on_primary.services["default/web"].listeners == {("127.0.0.1", 80): 8080, ("127.0.0.1", 30080): 8080}
    elsewhere = plan.build_plan("b", "127.0.0.9", [web], {"default/web": eps}, [], CLUSTERS)
    assert elsewhere.services["default/web"].listeners == {("127.0.0.9", 80): 8080}


def test_the_older_service_keeps_a_port_claimed_twice():
    old = service("old", [(80, 8080)], created=1)
    new = service("new", [(80, 9090)], created=2, namespace="other")
    result = plan.build_plan("a", "127.0.0.1", [new, old], {}, [], CLUSTERS)
    assert result.services["default/old"].listeners == {("127.0.0.1", 80): 8080}
    assert result.services["other/new"].listeners == {}
    assert result.services["other/new"].problems == [
        plan.Problem(plan.PORT_IN_USE, "127.0.0.1:80 is used by service default/old")]


def test_udp_ports_and_bad_health_paths_are_reported():
    web = service("web", [(53, 53)])
    web.spec.ports[0].protocol = "UDP"
    web.metadata.annotations[plan.HEALTH_PATH_ANNOTATION] = "healthz"
    problems = plan.build_plan("a", "127.0.0.1", [web], {}, [], CLUSTERS).services["default/web"].problems
    assert [problem.reason for problem in problems] == [plan.BAD_ANNOTATION, plan.UNSUPPORTED_PROTOCOL]


def test_auto_primary_is_the_cluster_with_most_endpoints_and_does_not_flap_on_ties():
    auto = service("web", [(80, 80)], type_="LoadBalancer", primary="auto")
    assert plan.choose_primary(auto, {"a": 1, "b": 2}) == "b"
    assert plan.choose_primary(auto, {"a": 2, "b": 2}, current="b") == "b"
    assert plan.choose_primary(auto, {"a": 2, "b": 2}) == "a"
    assert plan.choose_primary(auto, {"a": 3, "b": 2}, current="b") == "a"
    assert plan.choose_primary(auto, {}) == ""
    assert plan.choose_primary(service("web", [(80, 80)], primary="b"), {"a": 5}) == "b"


def test_service_variables_for_replicas_of_the_namespace():
    services = [service("web-api", [(80, 8080), (443, 8443)]), service("db", [(5432, 5432)], namespace="other")]
    assert plan.service_env(services, "default", "127.0.0.1") == {
        "WEB_API_SERVICE_HOST": "127.0.0.1", "WEB_API_SERVICE_PORT": "80"}


def test_gateway_addresses_are_stable_distinct_loopback_addresses():
    settings = config.GatewaySettings()
    assert addresses.gateway_address(cluster("local"), settings) == "127.0.0.1"
    first, second = (addresses.gateway_address(cluster(name, manager="ssh"), settings) for name in ("ssh-a", "ssh-b"))
    assert first != second and first.startswith("127.") and second.startswith("127.")
    assert addresses.gateway_address(cluster("ssh-a", manager="ssh"), settings) == first
    chosen = cluster("ssh-a")
    chosen.metadata.annotations[addresses.ADDRESS_ANNOTATION] = "127.0.0.50"
    assert addresses.gateway_address(chosen, settings) == "127.0.0.50"


def test_node_addresses():
    ssh = cluster("lab", manager="ssh")
    ssh.spec.hosts.add(host="127.0.0.12", port=2222)
    assert addresses.node_address(ssh, "127.0.0.12") == "127.0.0.12"
    assert addresses.node_address(cluster("local"), "my-laptop") == "127.0.0.1"
    assert addresses.node_address(cluster("k", manager="kubernetes"), "10.1.2.3") == "10.1.2.3"
    assert addresses.node_address(cluster("k", manager="kubernetes"), "node-1") is None
