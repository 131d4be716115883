"""The registry of object kinds: names, scope and protobuf classes, and the Object envelope."""
from __future__ import annotations

import dataclasses
from typing import Dict, Iterable, List, Tuple, Type

from google.protobuf.message import Message

from skyshift.api.errors import InvalidError
from skyshift.v1 import objects_pb2 as pb

#: Namespace for cluster-scoped kinds in etcd keys (DESIGN.md §3).
CLUSTER_SCOPE = "_"
DEFAULT_NAMESPACE = "default"


@dataclasses.dataclass(frozen=True)
class Kind:
    name: str            # "FilterPolicy": the manifest's `kind`
    plural: str          # "filterpolicies": API requests and etcd keys
    field: str           # "filter_policy": the field of the Object oneof
    message: Type[Message]
    namespaced: bool
    short_names: Tuple[str, ...] = ()

    def new(self) -> Message:
        return self.message()


KINDS: List[Kind] = [
    Kind("Namespace", "namespaces", "namespace", pb.Namespace, False, ("ns",)),
    Kind("Cluster", "clusters", "cluster", pb.Cluster, False, ()),
    Kind("Job", "jobs", "job", pb.Job, True, ()),
    Kind("Replica", "replicas", "replica", pb.Replica, True, ("rep",)),
    Kind("Service", "services", "service", pb.Service, True, ("svc",)),
    Kind("Endpoints", "endpoints", "endpoints", pb.Endpoints, True, ("ep",)),
    Kind("Link", "links", "link", pb.Link, False, ()),
    Kind("FilterPolicy", "filterpolicies", "filter_policy", pb.FilterPolicy, True, ("fp",)),
    Kind("User", "users", "user", pb.User, False, ()),
    Kind("Role", "roles", "role", pb.Role, False, ()),
    Kind("RoleBinding", "rolebindings", "role_binding", pb.RoleBinding, False, ("rb",)),
    Kind("Lease", "leases", "lease", pb.Lease, True, ()),
    Kind("Event", "events", "event", pb.Event, True, ("ev",)),
]

_BY_ALIAS: Dict[str, Kind] = {}
for _kind in KINDS:
    for _alias in (_kind.name, _kind.plural, _kind.field, _kind.name.lower(), *_kind.short_names):
        _BY_ALIAS[_alias.lower()] = _kind
# Singular forms of plurals that are not just name.lower().
_BY_ALIAS["filterpolicy"] = _BY_ALIAS["filterpolicies"]
_BY_ALIAS["endpoint"] = _BY_ALIAS["endpoints"]
_BY_MESSAGE: Dict[str, Kind] = {k.message.DESCRIPTOR.full_name: k for k in KINDS}
_BY_FIELD: Dict[str, Kind] = {k.field: k for k in KINDS}


def resolve(name: str, field: str = "kind") -> Kind:
    """The kind for any of its names: "Job", "job", "jobs", "fp"... (case-insensitive)."""
    kind = _BY_ALIAS.get((name or "").strip().lower())
    if kind is None:
        known = ", ".join(k.plural for k in KINDS)
        raise InvalidError(field, f"unknown kind {name!r} (known: {known})")
    return kind


def kind_of(message: Message) -> Kind:
    """The kind of a typed object message (pb.Job -> Job)."""
    kind = _BY_MESSAGE.get(message.DESCRIPTOR.full_name)
    if kind is None:
        raise InvalidError("object", f"{message.DESCRIPTOR.full_name} is not an object kind")
    return kind


def wrap(message: Message) -> pb.Object:
    """Put a typed object into the Object envelope."""
    envelope = pb.Object()
    getattr(envelope, kind_of(message).field).CopyFrom(message)
    return envelope


def unwrap(envelope: pb.Object, field: str = "object") -> Tuple[Kind, Message]:
    """The kind and typed object inside an envelope."""
    which = envelope.WhichOneof("kind")
    if which is None:
        raise InvalidError(field, "no object given (set one of the Object fields, e.g. job)")
    return _BY_FIELD[which], getattr(envelope, which)


def all_kinds() -> Iterable[Kind]:
    return iter(KINDS)
