"""What `skyctl describe` shows besides the object itself: related objects and Events.

`RELATED` maps a kind to the functions that fetch its extra sections; add one there to show more
for a kind (the Events section comes last for every kind).
"""
from __future__ import annotations

from typing import Callable, Dict, List

from google.protobuf.message import Message

from skyshift.api import kinds
from skyshift.api.errors import InvalidError, NotFoundError
from skyshift.api.wellknown import JOB_LABEL

from skyctl import printers

#: Label the job controller puts on every Replica of a Job.

SectionFetcher = Callable[[object, Message, float], printers.Section]   # (client, object, now)


def job_replicas(client, job: Message, now: float) -> printers.Section:
    replicas = client.list_all("replicas", job.metadata.namespace, label_selector=f"{JOB_LABEL}={job.metadata.name}")
    ordered = sorted(replicas.items, key=lambda replica: (replica.spec.rank, replica.metadata.name))
    return printers.objects_section("Replicas", kinds.resolve("replicas"), ordered, now, exclude=("JOB",))


def service_endpoints(client, service: Message, now: float) -> printers.Section:
    """The Service's endpoints per cluster, from its Endpoints object (made by the endpoints controller)."""
    try:
        endpoints = client.get("endpoints", service.metadata.name, service.metadata.namespace)
    except NotFoundError:
        return printers.Section("Endpoints", [], [])
    primary = endpoints.spec.primary_cluster
    rows = [[cluster + (" (primary)" if cluster == primary else ""), f"{e.address}:{e.port}", e.node or printers.NONE]
            for cluster in sorted(endpoints.spec.endpoints) for e in endpoints.spec.endpoints[cluster].endpoints]
    return printers.Section("Endpoints", ["CLUSTER", "ADDRESS", "NODE"], rows)


RELATED: Dict[str, List[SectionFetcher]] = {
    "Job": [job_replicas],
    "Service": [service_endpoints],
}


def events(client, obj: Message, now: float) -> printers.Section:
    """The Events about `obj`, newest last. Events live in the object's namespace; those about a
    cluster-scoped object may be in any namespace."""
    kind = kinds.kind_of(obj)
    namespace = obj.metadata.namespace if kind.namespaced else ""
    listed = client.list_all("events", namespace, field_selector=f"spec.involved_name={obj.metadata.name}")

    def about_obj(event: Message) -> bool:
        try:
            return kinds.resolve(event.spec.involved_kind) is kind
        except InvalidError:  # a kind this client does not know
            return False

    def when(event: Message):
        stamp = event.spec.last_time if printers.is_set(event.spec.last_time) else event.metadata.creation_timestamp
        return stamp.seconds, stamp.nanos

    return printers.events_section(sorted(filter(about_obj, listed.items), key=when), now)


def sections(client, obj: Message, now: float) -> List[printers.Section]:
    fetchers = RELATED.get(kinds.kind_of(obj).name, [])
    return [fetch(client, obj, now) for fetch in fetchers] + [events(client, obj, now)]
