"""The Service controller: a Service's status, from its Endpoints and the gateways' reports.

* `status.external_ip`: for NodePort and LoadBalancer Services, the gateway address of the
  primary cluster (the one the Service names, or "auto": the cluster with the most endpoints,
  as resolved in the Endpoints object), where the gateway listens on each port's node_port
  (the service port when node_port is 0). Empty for ClusterIP Services, reached on every
  cluster's own gateway address (the replicas' `<NAME>_SERVICE_HOST`).
* Conditions (observed_generation set):
  - EndpointsReady: some running replica matches the selector (NoEndpoints otherwise);
  - PrimaryClusterReady (NodePort, LoadBalancer): the primary cluster is resolved and exists
    (NoEndpoints for "auto" without endpoints, ClusterNotFound);
  - PortsAvailable: every gateway serves the Service's ports as asked; False with the reason
    a gateway reported in the Endpoints' `Gateway/<cluster>` conditions (PortInUse when the
    port is taken on that gateway, BindFailed, UnsupportedProtocol, BadAnnotation); Unknown
    until a gateway reported;
  - Ready: all of the above are True.
Bad specs the API can tell at once (ports out of range, empty selector, unknown type) are
rejected by validation (skyshift/api/validation.py) and never get here.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import structlog

from skyshift import config
from skyshift.api.conditions import FALSE, TRUE, UNKNOWN, observe_generation, remove_condition, set_condition
from skyshift.client import AsyncClient
from skyshift.gateway.addresses import gateway_address
from skyshift.gateway.plan import EXTERNAL_TYPES, GATEWAY_CONDITION_PREFIX, beyond_status, external_port
from skyshift.runtime import Controller, InformerFactory, clone, object_key
from skyshift.v1 import objects_pb2 as pb

log = structlog.get_logger(__name__)

ENDPOINTS_READY = "EndpointsReady"
PRIMARY_READY = "PrimaryClusterReady"
PORTS_AVAILABLE = "PortsAvailable"
READY = "Ready"


def gateway_reports(endpoints: Optional[pb.Endpoints]) -> List[Tuple[str, pb.Condition]]:
    """(cluster, condition) of every gateway that reported on the Service."""
    if endpoints is None:
        return []
    return sorted(((condition.type[len(GATEWAY_CONDITION_PREFIX):], condition)
                   for condition in endpoints.status.conditions if condition.type.startswith(GATEWAY_CONDITION_PREFIX)),
                  key=lambda report: report[0])


class ServiceController(Controller):
    name = "service"

    def __init__(self, client: AsyncClient, informers: Optional[InformerFactory] = None,
                 settings: Optional[config.Settings] = None, namespace: Optional[str] = None):
        super().__init__(client, informers, settings)
        self.services = self.informer("services", namespace)
        self.enqueue_on_change(self.services)
        self.endpoints = self.informer("endpoints", namespace)
        self.enqueue_on_change(self.endpoints)
        self.clusters = self.informer("clusters")
        self.clusters.add_handler(self._cluster_changed)

    def _cluster_changed(self, event_type: str, cluster: pb.Cluster, old: Optional[pb.Cluster]) -> None:
        # external_ip follows the primary cluster's gateway address (its annotations).
        if beyond_status(event_type, cluster, old):
            for service in self.services.list():
                if service.spec.type in EXTERNAL_TYPES:
                    self.queue.add(object_key(service))

    async def reconcile(self, key: str) -> Optional[float]:
        service = self.services.get(key)
        if service is None or service.metadata.HasField("deletion_timestamp"):
            return None
        endpoints = self.endpoints.get(key)
        updated = clone(service)
        status = updated.status
        generation = service.metadata.generation
        ready = [self._endpoints_ready(service, endpoints, status, generation),
                 self._ports_available(endpoints, status, generation)]
        if service.spec.type in EXTERNAL_TYPES:
            ready.append(self._primary_ready(service, endpoints, status, generation))
        else:
            status.external_ip = ""
            remove_condition(status.conditions, PRIMARY_READY)
        if all(ready):
            set_condition(status.conditions, READY, TRUE, "Serving", "the service is served", generation)
        else:
            set_condition(status.conditions, READY, FALSE, "NotServing", "see the other conditions", generation)
        observe_generation(updated)
        if updated.status != service.status:
            await self.client.update_status(updated)
            log.info("service_status", service=key, external_ip=status.external_ip, ready=all(ready))
        return None

    @staticmethod
    def _endpoints_ready(service: pb.Service, endpoints: Optional[pb.Endpoints], status: pb.ServiceStatus,
                         generation: int) -> bool:
        counts = {cluster: len(items.endpoints) for cluster, items in endpoints.spec.endpoints.items()} \
            if endpoints is not None else {}
        if not any(counts.values()):
            selector = ",".join(f"{k}={v}" for k, v in sorted(service.spec.selector.items()))
            message = f"no running replica in namespace {service.metadata.namespace} matches {selector}"
            set_condition(status.conditions, ENDPOINTS_READY, FALSE, "NoEndpoints", message, generation)
            return False
        where = ", ".join(f"{cluster}: {count}" for cluster, count in sorted(counts.items()) if count)
        set_condition(status.conditions, ENDPOINTS_READY, TRUE, "EndpointsFound",
                      f"{sum(counts.values())} endpoints ({where})", generation)
        return True

    @staticmethod
    def _ports_available(endpoints: Optional[pb.Endpoints], status: pb.ServiceStatus, generation: int) -> bool:
        reports = gateway_reports(endpoints)
        if not reports:
            set_condition(status.conditions, PORTS_AVAILABLE, UNKNOWN, "NoGatewayReport",
                          "no gateway has reported on this service yet", generation)
            return False
        failing = [(cluster, condition) for cluster, condition in reports if condition.status != TRUE]
        if failing:
            set_condition(status.conditions, PORTS_AVAILABLE, FALSE, failing[0][1].reason,
                          "; ".join(f"{cluster}: {condition.message}" for cluster, condition in failing), generation)
            return False
        set_condition(status.conditions, PORTS_AVAILABLE, TRUE, "Listening",
                      f"served by the gateways of {', '.join(cluster for cluster, _ in reports)}", generation)
        return True

    def _primary_ready(self, service: pb.Service, endpoints: Optional[pb.Endpoints], status: pb.ServiceStatus,
                       generation: int) -> bool:
        primary = endpoints.spec.primary_cluster if endpoints is not None else ""
        cluster = self.clusters.get(primary) if primary else None
        if cluster is None:
            status.external_ip = ""
            if primary:
                reason, message = "ClusterNotFound", f"primary cluster {primary!r} does not exist"
            else:
                reason, message = "NoEndpoints", "primary_cluster auto: no cluster has endpoints yet"
            set_condition(status.conditions, PRIMARY_READY, FALSE, reason, message, generation)
            return False
        status.external_ip = gateway_address(cluster, self.settings.gateway)
        exposed = ", ".join(f"{status.external_ip}:{external_port(port)}" for port in service.spec.ports)
        set_condition(status.conditions, PRIMARY_READY, TRUE, "Exposed", f"cluster {primary} exposes {exposed}",
                      generation)
        return True
