"""The Link controller: a Link joins the gateways of two clusters into the mesh (DESIGN.md §4).

* Each Link gets a shared secret (hex) in its annotation link.skyshift.dev/secret, written
  once with a conditional update. The gateways of both clusters read it from the Link and
  authenticate each other with it (skyshift/gateway/mesh.py). Keeping a secret in an object
  annotation is a first step: it should move to a Secret kind with its own access rules (and
  the HMAC handshake to mTLS).
* Each gateway publishes its mesh address in its Cluster's annotation gateway.skyshift.dev/mesh;
  the Link's status shows both ("a (host:port) <-> b (host:port)").
* The controller probes both gateways through the mesh handshake (PING, which also proves the
  gateway knows this Link) every `gateway.link_probe_interval` seconds, and every
  `gateway.link_retry_interval` seconds while it fails. Phase ACTIVE when both answer, else
  FAILED with the reason (ClusterNotFound, NoGateway, GatewayUnreachable, GatewayRefused),
  also in the condition Connected.
* Deleting the Link is all it takes to stop cross-cluster traffic: gateways stop using, and
  close the connections over, Links that are gone.
"""
from __future__ import annotations

import asyncio
from typing import Optional, Tuple

import structlog

from skyshift import config
from skyshift.api.conditions import FALSE, TRUE, set_condition
from skyshift.client import AsyncClient
from skyshift.gateway.addresses import mesh_address
from skyshift.gateway.mesh import MeshError, Route, new_secret, ping
from skyshift.gateway.plan import SECRET_ANNOTATION, beyond_status, link_secret
from skyshift.runtime import Controller, InformerFactory, clone
from skyshift.v1 import objects_pb2 as pb

log = structlog.get_logger(__name__)

ACTIVE, FAILED, INIT = "ACTIVE", "FAILED", "INIT"
CONNECTED = "Connected"


class LinkController(Controller):
    name = "link"

    def __init__(self, client: AsyncClient, informers: Optional[InformerFactory] = None,
                 settings: Optional[config.Settings] = None):
        super().__init__(client, informers, settings)
        self.links = self.informer("links")
        self.enqueue_on_change(self.links)
        self.clusters = self.informer("clusters")
        self.clusters.add_handler(self._cluster_changed)

    def _cluster_changed(self, event_type: str, cluster: pb.Cluster, old: Optional[pb.Cluster]) -> None:
        if not beyond_status(event_type, cluster, old):
            return  # a heartbeat
        for link in self.links.list():
            if cluster.metadata.name in (link.spec.source_cluster, link.spec.target_cluster):
                self.queue.add(link.metadata.name)

    async def reconcile(self, key: str) -> Optional[float]:
        link = self.links.get(key)
        if link is None or link.metadata.HasField("deletion_timestamp"):
            return None
        secret = link_secret(link)
        if secret is None:
            updated = clone(link)
            updated.metadata.annotations[SECRET_ANNOTATION] = new_secret()
            updated = await self.client.update(updated)
            updated.status.phase = INIT
            updated.status.message = "waiting for the gateways to learn the link"
            await self.client.update_status(updated)
            log.info("link_secret_created", link=key)
            return None  # the update re-queues the link
        ends = (link.spec.source_cluster, link.spec.target_cluster)
        results = await asyncio.gather(*(self._probe(link, name, secret) for name in ends))
        failure = next((result for result in results if result[0] is not None), None)
        updated = clone(link)
        status = updated.status
        if failure is None:
            status.phase = ACTIVE
            status.message = " <-> ".join(f"{name} ({address})" for name, (_, address) in zip(ends, results))
            set_condition(status.conditions, CONNECTED, TRUE, "GatewaysReached", status.message,
                          link.metadata.generation)
        else:
            reason, message = failure
            status.phase = FAILED
            status.message = message
            set_condition(status.conditions, CONNECTED, FALSE, reason, message, link.metadata.generation)
        if updated.status != link.status:
            await self.client.update_status(updated)
            if status.phase != link.status.phase:
                log.info("link_phase", link=key, phase=status.phase, message=status.message)
        interval = self.settings.gateway
        return interval.link_probe_interval if failure is None else interval.link_retry_interval

    async def _probe(self, link: pb.Link, name: str, secret: bytes) -> Tuple[Optional[str], str]:
        """(None, mesh address) when the cluster's gateway answers for this link, else (reason, message)."""
        cluster = self.clusters.get(name)
        if cluster is None:
            return "ClusterNotFound", f"cluster {name!r} does not exist"
        address = mesh_address(cluster)
        if not address:
            return "NoGateway", f"cluster {name!r} has no gateway yet (its skylet has not published a mesh address)"
        try:
            await ping(Route(link.metadata.name, address, secret), self.settings.gateway.connect_timeout)
        except MeshError as error:
            return "GatewayRefused", f"the gateway of {name} at {address}: {error}"
        except (OSError, asyncio.TimeoutError) as error:
            return "GatewayUnreachable", f"the gateway of {name} at {address} does not answer: " \
                                         f"{error or type(error).__name__}"
        return None, address
