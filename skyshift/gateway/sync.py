"""Keeps the gateways of a skylet's clusters in line with Services, Endpoints, Links and Clusters.

For every cluster the skylet serves (simulated ones excepted: they run nothing), GatewaySync
* runs a Gateway on the cluster's gateway address (skyshift.gateway.addresses) and publishes
  its mesh "host:port" in the Cluster annotation gateway.skyshift.dev/mesh, where the Link
  controller and the gateways of linked clusters find it;
* applies the cluster's plan (skyshift.gateway.plan) on every change of those objects, and
  retries ports it could not bind every `gateway.bind_retry_interval` seconds;
* reports, per Service, whether the gateway serves it as asked: the condition
  `Gateway/<cluster>` in the status of the Service's Endpoints (True, reason Listening; or
  False with PortInUse, BindFailed, UnsupportedProtocol or BadAnnotation). The Service
  controller turns those into the Service's own conditions.

It also gives replicas the `<NAME>_SERVICE_HOST/PORT` variables of their namespace's Services
(`service_env`).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional

import structlog

from skyshift import config
from skyshift.api.conditions import FALSE, TRUE, remove_condition, set_condition
from skyshift.api.errors import NotFoundError, SkyShiftError
from skyshift.client import AsyncClient
from skyshift.gateway import plan as planning
from skyshift.gateway.addresses import MESH_ANNOTATION, gateway_address, mesh_address
from skyshift.gateway.gateway import Gateway
from skyshift.runtime import Controller, InformerFactory, clone, object_key
from skyshift.v1 import objects_pb2 as pb

log = structlog.get_logger(__name__)

LISTENING = "Listening"
#: Problems that may go away by themselves (another process frees the port): retried.
RETRIED = frozenset({planning.PORT_IN_USE, planning.BIND_FAILED})
#: Clusters of these managers run nothing, so they get no gateway.
NO_GATEWAY_MANAGERS = frozenset({"sim"})


class GatewaySync(Controller):
    """One key per served cluster (its name). `serves(cluster)` tells which clusters are ours."""

    name = "gateway"

    def __init__(self, client: AsyncClient, informers: Optional[InformerFactory] = None,
                 settings: Optional[config.Settings] = None,
                 serves: Callable[[pb.Cluster], bool] = lambda cluster: True):
        super().__init__(client, informers, settings)
        self.serves = serves
        self.clusters = self.informer("clusters")
        self.services = self.informer("services")
        self.endpoints = self.informer("endpoints")
        self.links = self.informer("links")
        for informer in (self.clusters, self.services, self.endpoints, self.links):
            informer.add_handler(self._changed)
        self.gateways: Dict[str, Gateway] = {}

    async def run(self) -> None:
        try:
            await super().run()
        finally:
            for name in list(self.gateways):
                await self.gateways.pop(name).close()

    # ------------------------------------------------------------------ what to reconcile

    def _ours(self, cluster: pb.Cluster) -> bool:
        return (self.serves(cluster) and cluster.spec.manager not in NO_GATEWAY_MANAGERS
                and not cluster.metadata.HasField("deletion_timestamp"))

    def _enqueue_all(self) -> None:
        for cluster in self.clusters.list():
            if self._ours(cluster):
                self.queue.add(cluster.metadata.name)
        for name in self.gateways:  # so gateways of clusters that went are closed
            self.queue.add(name)

    def _changed(self, event_type: str, obj, old) -> None:
        # Heartbeats and our own reports change status only, which no plan depends on.
        if planning.beyond_status(event_type, obj, old):
            self._enqueue_all()

    # ------------------------------------------------------------------ reconcile

    async def reconcile(self, name: str) -> Optional[float]:
        cluster = self.clusters.get(name)
        gateway = self.gateways.get(name)
        address = gateway_address(cluster, self.settings.gateway) if cluster is not None else ""
        if gateway is not None and (cluster is None or not self._ours(cluster) or gateway.plan.address != address):
            del self.gateways[name]
            await gateway.close()
            await self._withdraw(name)
            gateway = None
        if cluster is None or not self._ours(cluster):
            return None
        if gateway is None:
            gateway = Gateway(name, self.settings.gateway)
            try:
                await gateway.start(address)
            except BaseException:
                await gateway.close()
                raise
            self.gateways[name] = gateway
        await self._publish(cluster, gateway.mesh.address)
        endpoints = {object_key(item): item for item in self.endpoints.list()}
        clusters = {item.metadata.name: item for item in self.clusters.list()}
        plan = planning.build_plan(name, address, self.services.list(), endpoints, self.links.list(), clusters)
        problems = await gateway.apply(plan)
        await self._report(name, plan, problems)
        if any(problem.reason in RETRIED for found in problems.values() for problem in found):
            return self.settings.gateway.bind_retry_interval
        return None

    async def _publish(self, cluster: pb.Cluster, mesh: str) -> None:
        if mesh_address(cluster) == mesh:
            return
        updated = clone(cluster)
        updated.metadata.annotations[MESH_ANNOTATION] = mesh
        await self.client.update(updated)  # a conflict re-queues the cluster and we try again
        log.info("gateway_mesh_published", cluster=cluster.metadata.name, mesh=mesh)

    async def _report(self, cluster: str, plan: planning.GatewayPlan,
                      problems: Dict[str, List[planning.Problem]]) -> None:
        """Write the Gateway/<cluster> condition of each served Service's Endpoints, if it changed."""
        for key, service_plan in plan.services.items():
            endpoints = self.endpoints.get(key)
            if endpoints is None:
                continue  # the Endpoints controller has not made it yet; its creation re-queues us
            updated = clone(endpoints)
            found = problems.get(key, [])
            if found:
                status, reason, message = FALSE, found[0].reason, "; ".join(problem.message for problem in found)
            else:
                listening = ", ".join(f"{host}:{port}" for host, port in sorted(service_plan.listeners))
                status, reason, message = TRUE, LISTENING, f"listening on {listening}"
            if set_condition(updated.status.conditions, planning.gateway_condition(cluster), status, reason, message):
                try:
                    await self.client.update_status(updated)
                except NotFoundError:
                    pass  # deleted with its Service meanwhile

    async def _withdraw(self, cluster: str) -> None:
        """Remove the conditions of a gateway that stopped (best effort: they are reports)."""
        for endpoints in self.endpoints.list():
            updated = clone(endpoints)
            if remove_condition(updated.status.conditions, planning.gateway_condition(cluster)):
                try:
                    await self.client.update_status(updated)
                except SkyShiftError as error:
                    log.debug("gateway_withdraw_failed", cluster=cluster, endpoints=object_key(endpoints),
                              error=str(error))

    # ------------------------------------------------------------------ replicas

    async def service_env(self, replica: pb.Replica) -> Dict[str, str]:
        """The `<NAME>_SERVICE_HOST/PORT` variables for a replica about to start."""
        await self.services.wait_synced()
        await self.clusters.wait_synced()
        cluster = self.clusters.get(replica.spec.cluster)
        if cluster is None or cluster.spec.manager in NO_GATEWAY_MANAGERS:
            return {}
        return planning.service_env(self.services.list(), replica.metadata.namespace,
                                    gateway_address(cluster, self.settings.gateway))
