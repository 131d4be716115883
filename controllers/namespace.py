"""The namespace controller: deleting a Namespace deletes everything in it (DESIGN.md §2).

The API server gives every Namespace the finalizer `skyshift.dev/namespace` and refuses new
objects in a Namespace being deleted. This controller then deletes each object the Namespace
holds (objects with finalizers of their own finish first, e.g. a Job's Replicas), and removes
the finalizer once a pass finds the Namespace empty, which lets the Namespace go.
"""
from __future__ import annotations

from typing import Optional

import structlog

from skyshift.api import kinds
from skyshift.api.errors import ConflictError, NotFoundError
from skyshift.api.wellknown import NAMESPACE_FINALIZER
from skyshift.runtime import Controller, clone

log = structlog.get_logger(__name__)

FINALIZER = NAMESPACE_FINALIZER


class NamespaceController(Controller):
    name = "namespace"

    def __init__(self, client, informers=None, settings=None):
        super().__init__(client, informers, settings)
        self.namespaces = self.informer("namespaces")
        self.enqueue_on_change(self.namespaces)

    async def reconcile(self, key: str) -> Optional[float]:
        namespace = self.namespaces.get(key)
        if namespace is None or not namespace.metadata.HasField("deletion_timestamp") \
                or FINALIZER not in namespace.metadata.finalizers:
            return None
        if namespace.status.phase != "TERMINATING":
            terminating = clone(namespace)
            terminating.status.phase = "TERMINATING"
            namespace = await self.client.update_status(terminating)
        remaining = 0
        for kind in kinds.all_kinds():
            if not kind.namespaced:
                continue
            for obj in (await self.client.list_all(kind.plural, namespace=key)).items:
                remaining += 1
                if obj.metadata.HasField("deletion_timestamp"):
                    continue  # its own finalizers are at work
                try:
                    await self.client.delete(kind.plural, obj.metadata.name, key, uid=obj.metadata.uid)
                except (NotFoundError, ConflictError):
                    pass  # gone already, or replaced: the next pass sees
        if remaining:
            log.info("namespace_draining", namespace=key, remaining=remaining)
            return self.settings.controllers.namespace_cleanup_interval
        emptied = clone(namespace)
        emptied.metadata.finalizers.remove(FINALIZER)
        await self.client.update(emptied)
        log.info("namespace_deleted", namespace=key)
        return None
