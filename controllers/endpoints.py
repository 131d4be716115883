"""The Endpoints controller: for each Service, the live addresses behind it, per cluster
(DESIGN.md §4), kept in an Endpoints object of the same name and namespace.

An endpoint is a RUNNING Replica of the Service's namespace whose labels match the Service's
selector (and that is not being deleted), once per target port of the Service: at the address
its skylet reported in `status.endpoints` (the one reported for that port, else its first one),
or at its node's address (skyshift.gateway.addresses.node_address) when it reported none.

The Endpoints object also records the Service's primary cluster: the one the Service names, or
for "auto" the cluster with the most endpoints (skyshift.gateway.plan.choose_primary). It is
owned by the Service (owner reference) and deleted here once the Service is gone. Every write
is conditional: creates fail on an existing name, updates and deletes carry the
resource_version they were computed from. Gateways write the status (their conditions).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Set, Tuple

import structlog

from skyshift import config
from skyshift.api.errors import AlreadyExistsError, ConflictError, NotFoundError
from skyshift.client import AsyncClient
from skyshift.gateway.addresses import node_address
from skyshift.gateway.plan import beyond_status, choose_primary
from skyshift.runtime import Controller, InformerFactory, clone, key_of, object_key, split_key
from skyshift.v1 import objects_pb2 as pb

log = structlog.get_logger(__name__)

RUNNING = "RUNNING"
#: Services by namespace (an index of the services informer).
SERVICES_BY_NAMESPACE = "by-namespace"
#: Replicas by namespace (an index of the replicas informer).
REPLICAS_BY_NAMESPACE = "by-namespace"


def by_namespace(obj) -> List[str]:
    return [obj.metadata.namespace]


def selects(service: pb.Service, labels) -> bool:
    selector = service.spec.selector
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())


def owned_by(endpoints: pb.Endpoints, service: Optional[pb.Service]) -> bool:
    """Whether `endpoints` belongs to `service` (None: to any Service)."""
    return any(ref.kind == "Service" and (service is None or ref.uid == service.metadata.uid)
               for ref in endpoints.metadata.owner_references)


def replica_endpoints(replica: pb.Replica, target_ports: List[int],
                      cluster: Optional[pb.Cluster]) -> List[pb.Endpoint]:
    """Where the replica serves each target port; [] when that cannot be known."""
    reported = replica.status.endpoints
    found = []
    for port in target_ports:
        address = next((e.address for e in reported if e.port == port), reported[0].address if reported else None)
        if address is None and cluster is not None:
            address = node_address(cluster, replica.spec.node)
        if address:
            found.append(pb.Endpoint(address=address, port=port, node=replica.spec.node))
    return found


def desired_spec(service: pb.Service, replicas: List[pb.Replica], clusters: Dict[str, pb.Cluster],
                 current_primary: str) -> pb.EndpointsSpec:
    spec = pb.EndpointsSpec()
    spec.selector.update(service.spec.selector)
    target_ports = sorted({port.target_port for port in service.spec.ports})
    found: Dict[str, Set[Tuple[str, int, str]]] = {}
    serving: Dict[str, int] = {}
    for replica in replicas:
        where = replica.spec.cluster
        if (replica.status.phase != RUNNING or not where or replica.metadata.HasField("deletion_timestamp")
                or not selects(service, replica.metadata.labels)):
            continue
        endpoints = replica_endpoints(replica, target_ports, clusters.get(where))
        if endpoints:
            serving[where] = serving.get(where, 0) + 1
            found.setdefault(where, set()).update((e.address, e.port, e.node) for e in endpoints)
    for where, items in found.items():
        for address, port, node in sorted(items):
            spec.endpoints[where].endpoints.add(address=address, port=port, node=node)
    spec.primary_cluster = choose_primary(service, serving, current_primary)
    return spec


class EndpointsController(Controller):
    name = "endpoints"

    def __init__(self, client: AsyncClient, informers: Optional[InformerFactory] = None,
                 settings: Optional[config.Settings] = None, namespace: Optional[str] = None):
        """namespace: manage only the Services of this namespace (default: all)."""
        super().__init__(client, informers, settings)
        self.services = self.informer("services", namespace)
        self.services.add_index(SERVICES_BY_NAMESPACE, by_namespace)
        self.enqueue_on_change(self.services)
        self.endpoints = self.informer("endpoints", namespace)
        self.enqueue_on_change(self.endpoints)
        self.replicas = self.informer("replicas", namespace)
        self.replicas.add_index(REPLICAS_BY_NAMESPACE, by_namespace)
        self.replicas.add_handler(self._replica_changed)
        self.clusters = self.informer("clusters")
        self.clusters.add_handler(self._cluster_changed)

    def _replica_changed(self, event_type: str, replica: pb.Replica, old: Optional[pb.Replica]) -> None:
        for version in (replica, old):
            if version is None:
                continue
            for service in self.services.by_index(SERVICES_BY_NAMESPACE, version.metadata.namespace):
                if selects(service, version.metadata.labels):
                    self.queue.add(object_key(service))

    def _cluster_changed(self, event_type: str, cluster: pb.Cluster, old: Optional[pb.Cluster]) -> None:
        # Node addresses come from cluster specs; heartbeats (status) change nothing here.
        if beyond_status(event_type, cluster, old):
            for service in self.services.list():
                self.queue.add(object_key(service))

    async def reconcile(self, key: str) -> Optional[float]:
        service = self.services.get(key)
        existing = self.endpoints.get(key)
        if service is None or service.metadata.HasField("deletion_timestamp"):
            if existing is not None and owned_by(existing, service) and not existing.metadata.HasField(
                    "deletion_timestamp"):
                await self._delete(existing)
            return None
        namespace, _ = split_key(key)
        replicas = self.replicas.by_index(REPLICAS_BY_NAMESPACE, namespace)
        clusters = {cluster.metadata.name: cluster for cluster in self.clusters.list()}
        spec = desired_spec(service, replicas, clusters, existing.spec.primary_cluster if existing else "")
        if existing is None:
            await self._create(service, spec)
            return None
        if existing.spec == spec and owned_by(existing, service):
            return None
        updated = clone(existing)
        updated.spec.CopyFrom(spec)
        _set_owner(updated, service)
        await self.client.update(updated)  # CAS on the cached resource_version
        log.info("endpoints_updated", endpoints=key, clusters={c: len(e.endpoints) for c, e in spec.endpoints.items()},
                 primary=spec.primary_cluster)
        return None

    async def _create(self, service: pb.Service, spec: pb.EndpointsSpec) -> None:
        endpoints = pb.Endpoints()
        endpoints.metadata.name = service.metadata.name
        endpoints.metadata.namespace = service.metadata.namespace
        _set_owner(endpoints, service)
        endpoints.spec.CopyFrom(spec)
        try:
            await self.client.create(endpoints)
        except AlreadyExistsError:
            # Made meanwhile (our cache is behind): look again once the cache has it.
            raise ConflictError(f"endpoints {object_key(service)} exists already") from None
        log.info("endpoints_created", endpoints=object_key(service),
                 clusters={c: len(e.endpoints) for c, e in spec.endpoints.items()})

    async def _delete(self, endpoints: pb.Endpoints) -> None:
        try:
            await self.client.delete("endpoints", endpoints.metadata.name, endpoints.metadata.namespace,
                                     resource_version=endpoints.metadata.resource_version, uid=endpoints.metadata.uid)
        except NotFoundError:
            return
        log.info("endpoints_deleted", endpoints=key_of(endpoints.metadata.namespace, endpoints.metadata.name))


def _set_owner(endpoints: pb.Endpoints, service: pb.Service) -> None:
    del endpoints.metadata.owner_references[:]
    endpoints.metadata.owner_references.add(kind="Service", name=service.metadata.name, uid=service.metadata.uid,
                                            controller=True)
