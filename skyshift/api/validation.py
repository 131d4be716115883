"""Validation and defaults of objects, per kind. Every error names the field path."""
from __future__ import annotations

import math
import re
from typing import Callable, Dict, Iterable

from google.protobuf import unknown_fields
from google.protobuf.message import Message

from skyshift.api import kinds
from skyshift.api.errors import InvalidError
from skyshift.v1 import objects_pb2 as pb

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?\Z")
LABEL_NAME = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)\Z")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?\Z")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?\Z")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")
FINALIZER = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_./]*[A-Za-z0-9])?\Z")

RESTART_POLICIES = ("Always", "OnFailure", "Never")
PULL_POLICIES = ("", "Always", "IfNotPresent", "Never")
CLUSTER_MANAGERS = ("local", "ssh", "kubernetes", "k8", "cloud", "sim")
SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer")
BALANCING = ("round_robin", "least_connections")
PROTOCOLS = ("TCP", "UDP")
OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")
VERBS = ("get", "list", "watch", "create", "update", "delete", "*")
CONDITION_STATUSES = ("True", "False", "Unknown")
#: Allowed values of status phases, per kind ("" means not yet set).
PHASES: Dict[str, Iterable[str]] = {
    "Namespace": ("", "ACTIVE", "TERMINATING"),
    "Cluster": ("", "INIT", "PROVISIONING", "READY", "NOT_READY", "ERROR", "DELETING"),
    "Job": ("", "PENDING", "SCHEDULED", "RUNNING", "COMPLETED", "FAILED", "DELETING"),
    "Replica": ("", "PENDING", "SCHEDULED", "RUNNING", "SUCCEEDED", "FAILED", "EVICTED", "UNKNOWN"),
    "Link": ("", "INIT", "ACTIVE", "FAILED"),
}
DEFAULT_BACKOFF_LIMIT = 6
MAX_PORT = 65535


def check_name(value: str, field: str, required: bool = True) -> None:
    if not value:
        if required:
            raise InvalidError(field, "required")
        return
    if len(value) > 63:
        raise InvalidError(field, f"{value[:70]!r} is longer than 63 characters")
    if not DNS1123_LABEL.match(value):
        raise InvalidError(field, f"{value!r} is not a DNS-1123 label (lower-case letters, digits and '-', "
                                  "starting and ending with a letter or digit)")


def _check_label_key(key: str, field: str) -> None:
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not DNS1123_SUBDOMAIN.match(prefix)):
        raise InvalidError(field, f"key {key!r}: the prefix must be a DNS-1123 subdomain")
    if not name or len(name) > 63 or not LABEL_NAME.match(name):
        raise InvalidError(field, f"key {key!r} is not a valid label key (at most 63 letters, digits, '-', '_' "
                                  "or '.', starting and ending with a letter or digit)")


def check_labels(labels, field: str) -> None:
    for key, value in labels.items():
        _check_label_key(key, field)
        if len(value) > 63 or not LABEL_VALUE.match(value):
            raise InvalidError(f"{field}.{key}", f"{value!r} is not a valid label value")


def _check_resources(resources, field: str) -> None:
    for name, amount in resources.items():
        if not name or not LABEL_NAME.match(name):
            raise InvalidError(field, f"{name!r} is not a valid resource name")
        if not 0 <= amount < math.inf:  # also rejects NaN
            raise InvalidError(f"{field}.{name}", f"must be a finite number, not negative, got {amount:g}")


def _check_port(value: int, field: str, allow_zero: bool = False) -> None:
    if allow_zero and value == 0:
        return
    if not 1 <= value <= MAX_PORT:
        raise InvalidError(field, f"port {value} is out of range 1-{MAX_PORT}")


def _check_choice(value: str, choices: Iterable[str], field: str) -> None:
    choices = tuple(choices)
    if value not in choices:
        shown = ", ".join(c for c in choices if c)
        raise InvalidError(field, f"unknown value {value!r} (one of: {shown})")


def _check_expressions(expressions, field: str) -> None:
    for index, expression in enumerate(expressions):
        path = f"{field}.match_expressions[{index}]"
        if not expression.key:
            raise InvalidError(f"{path}.key", "required")
        _check_choice(expression.operator, OPERATORS, f"{path}.operator")
        if expression.operator in ("In", "NotIn") and not expression.values:
            raise InvalidError(f"{path}.values", f"required for operator {expression.operator}")
        if expression.operator in ("Exists", "DoesNotExist") and expression.values:
            raise InvalidError(f"{path}.values", f"must be empty for operator {expression.operator}")


def _check_placement_terms(terms, field: str, preferences: bool) -> None:
    seen = set()
    for index, term in enumerate(terms):
        path = f"{field}[{index}]"
        if term.name in seen:
            raise InvalidError(f"{path}.name", f"duplicate name {term.name!r}")
        seen.add(term.name)
        if not term.match_labels and not term.match_expressions:
            raise InvalidError(path, "needs match_labels or match_expressions")
        check_labels(term.match_labels, f"{path}.match_labels")
        _check_expressions(term.match_expressions, path)
        if preferences:
            if term.weight == 0:
                term.weight = 1
            if not 1 <= term.weight <= 100:
                raise InvalidError(f"{path}.weight", f"must be within 1-100, got {term.weight}")
        elif term.weight:
            raise InvalidError(f"{path}.weight", "only preferences have a weight")


def _job_spec(spec: pb.JobSpec, field: str) -> None:
    if not spec.HasField("replicas"):
        spec.replicas = 1
    if spec.replicas < 1:
        raise InvalidError(f"{field}.replicas", f"must be at least 1, got {spec.replicas}")
    if not spec.restart_policy:
        spec.restart_policy = "Always"
    _check_choice(spec.restart_policy, RESTART_POLICIES, f"{field}.restart_policy")
    _check_choice(spec.image_pull_policy, PULL_POLICIES, f"{field}.image_pull_policy")
    if not spec.HasField("backoff_limit"):
        spec.backoff_limit = DEFAULT_BACKOFF_LIMIT
    if spec.backoff_limit < 0:
        raise InvalidError(f"{field}.backoff_limit", f"must not be negative, got {spec.backoff_limit}")
    _check_resources(spec.resources, f"{field}.resources")
    for index, port in enumerate(spec.ports):
        _check_port(port, f"{field}.ports[{index}]")
    for name in spec.envs:
        if not ENV_NAME.match(name):
            raise InvalidError(f"{field}.envs", f"{name!r} is not a valid environment variable name")
    for name, volume in spec.volumes.items():
        if not volume.container_dir:
            raise InvalidError(f"{field}.volumes.{name}.container_dir", "required")
    _check_placement_terms(spec.placement.filters, f"{field}.placement.filters", preferences=False)
    _check_placement_terms(spec.placement.preferences, f"{field}.placement.preferences", preferences=True)


def _cluster(obj: pb.Cluster) -> None:
    spec = obj.spec
    if not spec.manager:
        raise InvalidError("spec.manager", f"required (one of: {', '.join(CLUSTER_MANAGERS)})")
    spec.manager = spec.manager.lower()
    _check_choice(spec.manager, CLUSTER_MANAGERS, "spec.manager")
    if spec.num_nodes < 0:
        raise InvalidError("spec.num_nodes", f"must not be negative, got {spec.num_nodes}")
    if spec.disk_size < 0:
        raise InvalidError("spec.disk_size", f"must not be negative, got {spec.disk_size}")
    for index, host in enumerate(spec.hosts):
        if not host.host:
            raise InvalidError(f"spec.hosts[{index}].host", "required")
        _check_port(host.port, f"spec.hosts[{index}].port", allow_zero=True)
    if spec.manager == "ssh" and not spec.hosts and not spec.access_config.get("host"):
        raise InvalidError("spec.hosts", "an ssh cluster needs hosts (or access_config.host)")
    if spec.simulation.nodes < 0:
        raise InvalidError("spec.simulation.nodes", f"must not be negative, got {spec.simulation.nodes}")
    _check_resources(spec.simulation.node_resources, "spec.simulation.node_resources")


def _job(obj: pb.Job) -> None:
    _job_spec(obj.spec, "spec")


def _replica(obj: pb.Replica) -> None:
    if not obj.spec.job_name:
        raise InvalidError("spec.job_name", "required")
    _job_spec(obj.spec.template, "spec.template")
    if obj.spec.rank < 0:
        raise InvalidError("spec.rank", f"must not be negative, got {obj.spec.rank}")
    check_name(obj.spec.cluster, "spec.cluster", required=False)


def _service(obj: pb.Service) -> None:
    spec = obj.spec
    if not spec.type:
        spec.type = "ClusterIP"
    _check_choice(spec.type, SERVICE_TYPES, "spec.type")
    if not spec.balancing:
        spec.balancing = "round_robin"
    _check_choice(spec.balancing, BALANCING, "spec.balancing")
    if not spec.selector:
        raise InvalidError("spec.selector", "required: a Service selects replicas by label")
    check_labels(spec.selector, "spec.selector")
    if not spec.ports:
        raise InvalidError("spec.ports", "required: at least one port")
    for index, port in enumerate(spec.ports):
        path = f"spec.ports[{index}]"
        _check_port(port.port, f"{path}.port")
        if not port.target_port:
            port.target_port = port.port
        _check_port(port.target_port, f"{path}.target_port")
        _check_port(port.node_port, f"{path}.node_port", allow_zero=True)
        if not port.protocol:
            port.protocol = "TCP"
        _check_choice(port.protocol, PROTOCOLS, f"{path}.protocol")
    if spec.primary_cluster and spec.primary_cluster != "auto":
        check_name(spec.primary_cluster, "spec.primary_cluster")


def _link(obj: pb.Link) -> None:
    check_name(obj.spec.source_cluster, "spec.source_cluster")
    check_name(obj.spec.target_cluster, "spec.target_cluster")
    if obj.spec.source_cluster == obj.spec.target_cluster:
        raise InvalidError("spec.target_cluster", "must differ from spec.source_cluster")


def _filter_policy(obj: pb.FilterPolicy) -> None:
    for section in ("include", "exclude"):
        for index, name in enumerate(getattr(obj.spec.cluster_filter, section)):
            check_name(name, f"spec.cluster_filter.{section}[{index}]")
    check_labels(obj.spec.labels_selector, "spec.labels_selector")


def _role(obj: pb.Role) -> None:
    for index, rule in enumerate(obj.spec.rules):
        for verb in rule.verbs:
            _check_choice(verb, VERBS, f"spec.rules[{index}].verbs")
        for resource in rule.resources:
            if resource != "*":
                kinds.resolve(resource, f"spec.rules[{index}].resources")


def _role_binding(obj: pb.RoleBinding) -> None:
    check_name(obj.spec.role, "spec.role")


def _lease(obj: pb.Lease) -> None:
    if obj.spec.lease_duration_seconds < 0:
        raise InvalidError("spec.lease_duration_seconds", "must not be negative")


def _event(obj: pb.Event) -> None:
    if obj.spec.type and obj.spec.type not in ("Normal", "Warning"):
        raise InvalidError("spec.type", f"unknown value {obj.spec.type!r} (one of: Normal, Warning)")


_SPEC_VALIDATORS: Dict[str, Callable[[Message], None]] = {
    "Cluster": _cluster, "Job": _job, "Replica": _replica, "Service": _service, "Link": _link,
    "FilterPolicy": _filter_policy, "Role": _role, "RoleBinding": _role_binding, "Lease": _lease,
    "Event": _event,
}


def check_wire_values(message: Message, path: str = "") -> None:
    """Reject what protobuf decodes but the server must not store: fields it does not know (a
    newer client's, or garbage), which would be stored without validation, and timestamps out of
    the RFC 3339 range, which nobody could print."""
    unknown = unknown_fields.UnknownFieldSet(message)
    if len(unknown):
        number = next(iter(unknown)).field_number
        raise InvalidError(path or message.DESCRIPTOR.name, f"unknown field number {number}")
    if message.DESCRIPTOR.full_name == "google.protobuf.Timestamp":
        try:
            message.ToJsonString()
        except ValueError as error:
            raise InvalidError(path, str(error)) from None
        return
    for descriptor, value in message.ListFields():
        if descriptor.message_type is None:
            continue
        field = f"{path}.{descriptor.name}" if path else descriptor.name
        if descriptor.message_type.GetOptions().map_entry:
            if descriptor.message_type.fields_by_name["value"].message_type is not None:
                for key, item in value.items():
                    check_wire_values(item, f"{field}.{key}")
        elif descriptor.is_repeated:
            for index, item in enumerate(value):
                check_wire_values(item, f"{field}[{index}]")
        else:
            check_wire_values(value, field)


def validate_metadata(kind: kinds.Kind, obj: Message) -> None:
    meta = obj.metadata
    check_name(meta.name, "metadata.name")
    if kind.namespaced:
        check_name(meta.namespace, "metadata.namespace")
    elif meta.namespace:
        raise InvalidError("metadata.namespace", f"{kind.name} is cluster-scoped and has no namespace")
    check_labels(meta.labels, "metadata.labels")
    for key in meta.annotations:
        _check_label_key(key, "metadata.annotations")
    for index, finalizer in enumerate(meta.finalizers):
        if len(finalizer) > 253 or not FINALIZER.match(finalizer):
            raise InvalidError(f"metadata.finalizers[{index}]", f"{finalizer!r} is not a valid finalizer name")
    if len(set(meta.finalizers)) != len(meta.finalizers):
        raise InvalidError("metadata.finalizers", "duplicate entries")
    for index, owner in enumerate(meta.owner_references):
        path = f"metadata.owner_references[{index}]"
        kinds.resolve(owner.kind, f"{path}.kind")
        check_name(owner.name, f"{path}.name")


def validate_spec(kind: kinds.Kind, obj: Message) -> None:
    """Check the spec and fill its defaults (in place)."""
    validator = _SPEC_VALIDATORS.get(kind.name)
    if validator is not None:
        validator(obj)


def validate_status(kind: kinds.Kind, obj: Message) -> None:
    status = obj.status
    phases = PHASES.get(kind.name)
    if phases is not None:
        _check_choice(status.phase, phases, "status.phase")
    if kind.name == "Cluster":
        for section in ("capacity", "allocatable"):
            for node, resources in getattr(status, section).items():
                _check_resources(resources.resources, f"status.{section}.{node}")
    conditions = getattr(status, "conditions", ())
    for index, condition in enumerate(conditions):
        if not condition.type:
            raise InvalidError(f"status.conditions[{index}].type", "required")
        _check_choice(condition.status, CONDITION_STATUSES, f"status.conditions[{index}].status")
