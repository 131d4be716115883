"""What one cluster's gateway should do, computed from API objects (pure: no I/O).

For every Service (all namespaces), the gateway of cluster C
* listens on C's gateway address at each Service port (ClusterIP: replicas on C reach the
  Service there, through the `<NAME>_SERVICE_HOST/PORT` variables), and, when C is the
  Service's primary cluster and its type is NodePort or LoadBalancer, also at each node_port
  (the service port when node_port is 0): the external address;
* forwards each connection to an endpoint of the matching target port: endpoints on C
  directly, endpoints on a linked cluster through that cluster's gateway, endpoints on
  clusters C has no Link with not at all.

Conflicts are decided here for ports claimed twice: the older Service keeps the port.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Iterable, List, Mapping, Optional, Set, Tuple

from google.protobuf.message import Message

from skyshift.gateway.addresses import mesh_address
from skyshift.gateway.mesh import Route
from skyshift.runtime.informer import object_key
from skyshift.v1 import objects_pb2 as pb

#: Service annotation: HTTP path whose GET (status below 500) tells an endpoint is healthy;
#: without it endpoints are probed with a TCP connect.
HEALTH_PATH_ANNOTATION = "gateway.skyshift.dev/health-path"
#: Link annotation holding the Link's shared secret (hex), written by the Link controller.
SECRET_ANNOTATION = "link.skyshift.dev/secret"
EXTERNAL_TYPES = ("NodePort", "LoadBalancer")
#: Condition a cluster's gateway writes on each Service's Endpoints: "Gateway/<cluster>".
GATEWAY_CONDITION_PREFIX = "Gateway/"
AUTO = "auto"

Address = Tuple[str, int]

#: Reasons of the problems a gateway reports for a Service.
PORT_IN_USE = "PortInUse"
BIND_FAILED = "BindFailed"
UNSUPPORTED_PROTOCOL = "UnsupportedProtocol"
BAD_ANNOTATION = "BadAnnotation"


@dataclasses.dataclass(frozen=True)
class Problem:
    """Why (part of) a Service is not served by a gateway as asked."""

    reason: str
    message: str


@dataclasses.dataclass(frozen=True)
class BackendSpec:
    """One endpoint a Service port forwards to; `route` is None when it is on this cluster."""

    address: str
    port: int
    cluster: str
    route: Optional[Route] = None
    health_path: str = ""


@dataclasses.dataclass
class ServicePlan:
    key: str
    balancing: str
    #: (address, port) this gateway listens on -> the target port it forwards to.
    listeners: Dict[Address, int] = dataclasses.field(default_factory=dict)
    #: target port -> its endpoints, in a stable order.
    backends: Dict[int, List[BackendSpec]] = dataclasses.field(default_factory=dict)
    #: Why some of its ports are not served here (found while planning).
    problems: List[Problem] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class GatewayPlan:
    cluster: str
    address: str
    services: Dict[str, ServicePlan] = dataclasses.field(default_factory=dict)
    #: Links of this cluster -> their secrets (what the mesh listener accepts).
    secrets: Dict[str, bytes] = dataclasses.field(default_factory=dict)
    #: Endpoints on this cluster: the only addresses remote gateways may ask to reach.
    local_targets: Set[Address] = dataclasses.field(default_factory=set)


def gateway_condition(cluster: str) -> str:
    return f"{GATEWAY_CONDITION_PREFIX}{cluster}"


def beyond_status(event_type: str, obj: Message, old: Optional[Message]) -> bool:
    """Whether an informer event changes more than status (heartbeats and gateway reports only
    change status; nothing planned from these objects depends on it). Resyncs (old is obj) count."""
    if event_type != "MODIFIED" or old is None or old is obj:
        return True
    return (old.spec != obj.spec or old.metadata.annotations != obj.metadata.annotations
            or old.metadata.labels != obj.metadata.labels
            or old.metadata.HasField("deletion_timestamp") != obj.metadata.HasField("deletion_timestamp"))


def link_secret(link: pb.Link) -> Optional[bytes]:
    text = link.metadata.annotations.get(SECRET_ANNOTATION, "")
    try:
        return bytes.fromhex(text) or None
    except ValueError:
        return None


def peer_routes(cluster: str, links: Iterable[pb.Link], clusters: Mapping[str, pb.Cluster]) -> Dict[str, Route]:
    """Linked cluster -> how to reach its gateway, for the usable Links of `cluster` (not being
    deleted, with a secret, the peer's gateway published). Of two Links between the same
    clusters, the first by name is used."""
    routes: Dict[str, Route] = {}
    for link in sorted(links, key=lambda item: item.metadata.name):
        ends = (link.spec.source_cluster, link.spec.target_cluster)
        if cluster not in ends or link.metadata.HasField("deletion_timestamp"):
            continue
        peer = ends[1] if ends[0] == cluster else ends[0]
        secret = link_secret(link)
        peer_cluster = clusters.get(peer)
        address = mesh_address(peer_cluster) if peer_cluster is not None else ""
        if secret is not None and address and peer not in routes:
            routes[peer] = Route(link.metadata.name, address, secret)
    return routes


def cluster_secrets(cluster: str, links: Iterable[pb.Link]) -> Dict[str, bytes]:
    secrets: Dict[str, bytes] = {}
    for link in links:
        if cluster in (link.spec.source_cluster, link.spec.target_cluster) \
                and not link.metadata.HasField("deletion_timestamp"):
            secret = link_secret(link)
            if secret is not None:
                secrets[link.metadata.name] = secret
    return secrets


def choose_primary(service: pb.Service, counts: Mapping[str, int], current: str = "") -> str:
    """The Service's primary cluster: the one it names, or for "auto" (and unset) the cluster
    with the most endpoints; the current primary keeps the role while it ties for the most,
    so equal counts do not make it flap. "" when "auto" finds no endpoint."""
    named = service.spec.primary_cluster
    if named and named != AUTO:
        return named
    most = max(counts.values(), default=0)
    if most == 0:
        return ""
    if counts.get(current, 0) == most:
        return current
    return min(name for name, count in counts.items() if count == most)


def external_port(port: pb.ServicePort) -> int:
    return port.node_port or port.port


def _age_order(service: pb.Service) -> Tuple[int, int, str]:
    stamp = service.metadata.creation_timestamp
    return stamp.seconds, stamp.nanos, object_key(service)


def health_path(service: pb.Service) -> Tuple[str, Optional[Problem]]:
    """(path, problem): the Service's HTTP health path ("" for TCP probes), or why it is refused."""
    path = service.metadata.annotations.get(HEALTH_PATH_ANNOTATION, "")
    if path and (not path.startswith("/") or any(char.isspace() for char in path) or len(path) > 256):
        return "", Problem(BAD_ANNOTATION, f"annotation {HEALTH_PATH_ANNOTATION}: {path[:80]!r} is not an "
                                           "absolute URL path; endpoints are probed with TCP")
    return path, None


def build_plan(cluster: str, address: str, services: Iterable[pb.Service], endpoints: Mapping[str, pb.Endpoints],
               links: Iterable[pb.Link], clusters: Mapping[str, pb.Cluster]) -> GatewayPlan:
    """The plan of the gateway of `cluster`, which listens on `address`. `endpoints` maps a
    Service's key ("namespace/name") to its Endpoints object."""
    links = list(links)
    routes = peer_routes(cluster, links, clusters)
    plan = GatewayPlan(cluster, address, secrets=cluster_secrets(cluster, links))
    for item in endpoints.values():
        local = item.spec.endpoints.get(cluster)
        if local is not None:
            plan.local_targets.update((endpoint.address, endpoint.port) for endpoint in local.endpoints)
    claimed: Dict[Address, str] = {}
    for service in sorted(services, key=_age_order):
        if service.metadata.HasField("deletion_timestamp"):
            continue
        key = object_key(service)
        path, problem = health_path(service)
        service_plan = ServicePlan(key, service.spec.balancing or "round_robin")
        if problem:
            service_plan.problems.append(problem)
        backing = endpoints.get(key)
        primary = backing.spec.primary_cluster if backing is not None else ""
        for port in service.spec.ports:
            if port.protocol == "UDP":
                service_plan.problems.append(Problem(UNSUPPORTED_PROTOCOL,
                                                     f"port {port.port}/UDP: the gateway forwards TCP only"))
                continue
            wanted = [(address, port.port)]
            if service.spec.type in EXTERNAL_TYPES and primary == cluster:
                wanted.append((address, external_port(port)))
            for listen in wanted:
                owner = claimed.get(listen)
                target = service_plan.listeners.get(listen)
                if owner is not None and owner != key:
                    service_plan.problems.append(Problem(PORT_IN_USE, f"{listen[0]}:{listen[1]} is used by "
                                                                      f"service {owner}"))
                elif target is not None and target != port.target_port:
                    service_plan.problems.append(Problem(PORT_IN_USE, f"{listen[0]}:{listen[1]} is claimed by "
                                                                      "two of its ports"))
                else:
                    claimed[listen] = key
                    service_plan.listeners[listen] = port.target_port
            service_plan.backends.setdefault(port.target_port, _backends(backing, port.target_port, cluster,
                                                                         routes, path))
        plan.services[key] = service_plan
    return plan


def _backends(backing: Optional[pb.Endpoints], target_port: int, cluster: str, routes: Mapping[str, Route],
              path: str) -> List[BackendSpec]:
    if backing is None:
        return []
    found: List[BackendSpec] = []
    for where in sorted(backing.spec.endpoints):
        if where != cluster and where not in routes:
            continue  # no Link to that cluster
        route = routes.get(where) if where != cluster else None
        for endpoint in backing.spec.endpoints[where].endpoints:
            if endpoint.port == target_port:
                found.append(BackendSpec(endpoint.address, endpoint.port, where, route, path))
    return found


def env_name(service_name: str) -> str:
    return service_name.upper().replace("-", "_")


def service_env(services: Iterable[pb.Service], namespace: str, address: str) -> Dict[str, str]:
    """`<NAME>_SERVICE_HOST` / `<NAME>_SERVICE_PORT` (its first port) of every Service in
    `namespace`, for a replica whose cluster's gateway listens on `address`."""
    env: Dict[str, str] = {}
    for service in services:
        if service.metadata.namespace != namespace or not service.spec.ports \
                or service.metadata.HasField("deletion_timestamp"):
            continue
        prefix = env_name(service.metadata.name)
        env[f"{prefix}_SERVICE_HOST"] = address
        env[f"{prefix}_SERVICE_PORT"] = str(service.spec.ports[0].port)
    return env
