"""Validation and defaults (skyshift.api.validation): every error names the field path."""
import pytest

from skyshift.api import convert, kinds, validation
from skyshift.api.errors import InvalidError
from skyshift.v1 import objects_pb2 as pb


def manifest_object(kind: str, spec=None, metadata=None, status=None):
    metadata = {"name": "x", **({"namespace": "default"} if kinds.resolve(kind).namespaced else {}),
                **(metadata or {})}
    return convert.from_manifest({"kind": kind, "metadata": metadata, "spec": spec or {}, "status": status or {}})


def admit(obj):
    """What the API server checks on create; returns the defaulted object."""
    kind = kinds.kind_of(obj)
    validation.check_wire_values(obj)
    validation.validate_metadata(kind, obj)
    validation.validate_spec(kind, obj)
    return obj


def rejected(obj) -> InvalidError:
    with pytest.raises(InvalidError) as caught:
        admit(obj)
    return caught.value


def job(**spec):
    return manifest_object("Job", spec)


# ---------------------------------------------------------------- names


@pytest.mark.parametrize("name", ["a", "web", "web-1", "1web", "a" * 63, "x-y-z0"])
def test_valid_names(name):
    validation.check_name(name, "metadata.name")


@pytest.mark.parametrize("name, problem", [
    ("", "required"), ("a" * 64, "longer than 63"), ("Web", "DNS-1123"), ("web_1", "DNS-1123"),
    ("-web", "DNS-1123"), ("web-", "DNS-1123"), ("web.1", "DNS-1123"), ("wéb", "DNS-1123"), ("a b", "DNS-1123"),
    ("a/b", "DNS-1123"), ("web\n", "DNS-1123"),
])
def test_invalid_names(name, problem):
    with pytest.raises(InvalidError) as caught:
        validation.check_name(name, "metadata.name")
    assert caught.value.field == "metadata.name" and problem in str(caught.value)


def test_object_names_and_namespaces_are_checked():
    assert rejected(manifest_object("Job", metadata={"name": "Bad_Name"})).field == "metadata.name"
    assert rejected(manifest_object("Job", metadata={"name": ""})).field == "metadata.name"
    assert rejected(manifest_object("Job", metadata={"namespace": ""})).field == "metadata.namespace"
    assert rejected(manifest_object("Job", metadata={"namespace": "Team"})).field == "metadata.namespace"
    cluster_with_namespace = manifest_object("Cluster", {"manager": "local"}, metadata={"namespace": "default"})
    error = rejected(cluster_with_namespace)
    assert error.field == "metadata.namespace" and "cluster-scoped" in str(error)


# ---------------------------------------------------------------- labels and metadata


@pytest.mark.parametrize("labels", [
    {"app": "web"}, {"example.com/app": "web"}, {"a.b-c_d": "V1.0-x_y"}, {"app": ""}, {"k": "v" * 63},
])
def test_valid_labels(labels):
    admit(manifest_object("Job", metadata={"labels": labels}))


@pytest.mark.parametrize("labels, field", [
    ({"-app": "web"}, "metadata.labels"),
    ({"app-": "web"}, "metadata.labels"),
    ({"": "web"}, "metadata.labels"),
    ({"k" * 64: "v"}, "metadata.labels"),
    ({"Example.com/app": "web"}, "metadata.labels"),
    ({"a/b/c": "v"}, "metadata.labels"),
    ({"example.com/": "v"}, "metadata.labels"),
    ({"app": "-web"}, "metadata.labels.app"),
    ({"app": "web app"}, "metadata.labels.app"),
    ({"app": "v" * 64}, "metadata.labels.app"),
    ({"app\n": "web"}, "metadata.labels"),
    ({"app": "web\n"}, "metadata.labels.app"),
])
def test_invalid_labels_name_the_field(labels, field):
    assert rejected(manifest_object("Job", metadata={"labels": labels})).field == field


def test_annotation_keys_are_checked_but_values_are_free():
    admit(manifest_object("Job", metadata={"annotations": {"example.com/note": "any text, even\nnewlines"}}))
    assert rejected(manifest_object("Job", metadata={"annotations": {"bad key": "x"}})).field == \
        "metadata.annotations"


def test_finalizers_must_be_valid_and_unique():
    admit(manifest_object("Job", metadata={"finalizers": ["example.com/cleanup", "skyshift"]}))
    assert rejected(manifest_object("Job", metadata={"finalizers": ["ok", "not ok"]})).field == \
        "metadata.finalizers[1]"
    assert rejected(manifest_object("Job", metadata={"finalizers": ["a", "a"]})).field == "metadata.finalizers"
    assert rejected(manifest_object("Job", metadata={"finalizers": ["a\n"]})).field == "metadata.finalizers[0]"


def test_owner_references_name_a_kind_and_object():
    admit(manifest_object("Replica", {"job_name": "j"}, metadata={"owner_references": [{"kind": "Job",
                                                                                         "name": "j"}]}))
    error = rejected(manifest_object("Job", metadata={"owner_references": [{"kind": "Widget", "name": "w"}]}))
    assert error.field == "metadata.owner_references[0].kind"
    error = rejected(manifest_object("Job", metadata={"owner_references": [{"kind": "Job", "name": "Bad"}]}))
    assert error.field == "metadata.owner_references[0].name"


# ---------------------------------------------------------------- Job


def test_job_defaults():
    admitted = admit(job(run="true"))
    assert admitted.spec.replicas == 1
    assert admitted.spec.restart_policy == "Always"
    assert admitted.spec.backoff_limit == validation.DEFAULT_BACKOFF_LIMIT


def test_replicas_zero_explicit_is_an_error_but_absent_defaults_to_one():
    error = rejected(job(replicas=0))
    assert error.field == "spec.replicas" and "at least 1" in str(error)
    assert rejected(job(replicas=-2)).field == "spec.replicas"
    absent = pb.Job()
    absent.metadata.name, absent.metadata.namespace = "x", "default"
    assert not absent.spec.HasField("replicas")
    assert admit(absent).spec.replicas == 1
    assert admit(job(replicas=5)).spec.replicas == 5


def test_backoff_limit_zero_is_kept_negative_rejected():
    assert admit(job(backoff_limit=0)).spec.backoff_limit == 0
    assert rejected(job(backoff_limit=-1)).field == "spec.backoff_limit"


@pytest.mark.parametrize("policy", ["Always", "OnFailure", "Never"])
def test_restart_policies(policy):
    assert admit(job(restart_policy=policy)).spec.restart_policy == policy


@pytest.mark.parametrize("policy", ["always", "Sometimes", "never "])
def test_unknown_restart_policy(policy):
    error = rejected(job(restart_policy=policy))
    assert error.field == "spec.restart_policy" and "OnFailure" in str(error)


def test_image_pull_policy():
    admit(job(image_pull_policy="IfNotPresent"))
    assert rejected(job(image_pull_policy="Sometimes")).field == "spec.image_pull_policy"


@pytest.mark.parametrize("resources, field", [
    ({"cpus": -1}, "spec.resources.cpus"),
    ({"memory": -0.5}, "spec.resources.memory"),
    ({"gpus": -1}, "spec.resources.gpus"),
    ({"V100": -2}, "spec.resources.V100"),
    ({"bad name": 1}, "spec.resources"),
])
def test_negative_or_misnamed_resources(resources, field):
    assert rejected(job(resources=resources)).field == field


@pytest.mark.parametrize("amount", [float("nan"), float("inf"), float("-inf")])
def test_resources_must_be_finite(amount):
    # Through the API (protobuf) rather than a manifest, which rejects these already.
    obj = job()
    obj.spec.resources["cpus"] = amount
    error = rejected(obj)
    assert error.field == "spec.resources.cpus"


def test_zero_resources_are_fine():
    admit(job(resources={"cpus": 0, "memory": 0, "gpus": 0, "A100": 0}))


@pytest.mark.parametrize("ports, field", [
    ([0], "spec.ports[0]"), ([80, 65536], "spec.ports[1]"), ([-1], "spec.ports[0]"),
])
def test_job_ports_in_range(ports, field):
    error = rejected(job(ports=ports))
    assert error.field == field and "out of range" in str(error)


def test_job_ports_bounds_are_valid():
    admit(job(ports=[1, 65535]))


@pytest.mark.parametrize("name", ["1ABC", "A-B", "A B", "", "A=B", "A\n"])
def test_invalid_env_names(name):
    error = rejected(job(envs={name: "v"}))
    assert error.field == "spec.envs" and repr(name) in str(error)


def test_valid_env_names():
    admit(job(envs={"_A": "1", "a1": "2", "PATH_X": ""}))


def test_volumes_need_a_container_dir():
    assert rejected(job(volumes={"data": {"host_dir": "/srv"}})).field == "spec.volumes.data.container_dir"


# ---------------------------------------------------------------- placement


def placement(filters=(), preferences=()):
    return job(placement={"filters": list(filters), "preferences": list(preferences)})


def test_valid_placement_and_default_weight():
    admitted = admit(placement(
        filters=[{"name": "gpu", "match_labels": {"zone": "a"}},
                 {"name": "x", "match_expressions": [{"key": "tier", "operator": "NotIn", "values": ["spot"]},
                                                     {"key": "gpu", "operator": "Exists"}]}],
        preferences=[{"name": "fast", "match_labels": {"speed": "fast"}},
                     {"name": "big", "match_labels": {"size": "big"}, "weight": 100}]))
    assert [p.weight for p in admitted.spec.placement.preferences] == [1, 100]


@pytest.mark.parametrize("filters, preferences, field", [
    ([{"name": "empty"}], [], "spec.placement.filters[0]"),
    ([{"name": "a", "match_labels": {"k": "v"}}, {"name": "a", "match_labels": {"k": "w"}}], [],
     "spec.placement.filters[1].name"),
    ([{"name": "w", "match_labels": {"k": "v"}, "weight": 5}], [], "spec.placement.filters[0].weight"),
    ([{"name": "l", "match_labels": {"bad key": "v"}}], [], "spec.placement.filters[0].match_labels"),
    ([{"name": "op", "match_expressions": [{"key": "k", "operator": "Equals", "values": ["v"]}]}], [],
     "spec.placement.filters[0].match_expressions[0].operator"),
    ([{"name": "key", "match_expressions": [{"operator": "Exists"}]}], [],
     "spec.placement.filters[0].match_expressions[0].key"),
    ([{"name": "in", "match_expressions": [{"key": "k", "operator": "In"}]}], [],
     "spec.placement.filters[0].match_expressions[0].values"),
    ([{"name": "ex", "match_expressions": [{"key": "k", "operator": "Exists", "values": ["v"]}]}], [],
     "spec.placement.filters[0].match_expressions[0].values"),
    ([], [{"name": "heavy", "match_labels": {"k": "v"}, "weight": 101}], "spec.placement.preferences[0].weight"),
    ([], [{"name": "neg", "match_labels": {"k": "v"}, "weight": -1}], "spec.placement.preferences[0].weight"),
    ([], [{"name": "p", "match_labels": {"k": "v"}}, {"name": "q"}], "spec.placement.preferences[1]"),
])
def test_invalid_placement_terms(filters, preferences, field):
    assert rejected(placement(filters, preferences)).field == field


# ---------------------------------------------------------------- Replica


def test_replica_template_is_validated_with_its_path():
    admitted = admit(manifest_object("Replica", {"job_name": "j", "template": {"run": "true"}}))
    assert admitted.spec.template.replicas == 1
    assert rejected(manifest_object("Replica", {"template": {}})).field == "spec.job_name"
    assert rejected(manifest_object("Replica", {"job_name": "j", "template": {"replicas": 0}})).field == \
        "spec.template.replicas"
    assert rejected(manifest_object("Replica", {"job_name": "j", "rank": -1})).field == "spec.rank"
    assert rejected(manifest_object("Replica", {"job_name": "j", "cluster": "Bad_C"})).field == "spec.cluster"


# ---------------------------------------------------------------- Service


def service(**spec):
    return manifest_object("Service", {"selector": {"app": "web"}, "ports": [{"port": 80}], **spec})


def test_service_defaults():
    admitted = admit(service())
    assert admitted.spec.type == "ClusterIP"
    assert admitted.spec.balancing == "round_robin"
    assert admitted.spec.ports[0].target_port == 80
    assert admitted.spec.ports[0].protocol == "TCP"


@pytest.mark.parametrize("spec, field", [
    ({"selector": {}}, "spec.selector"),
    ({"selector": {"bad key": "x"}}, "spec.selector"),
    ({"ports": []}, "spec.ports"),
    ({"ports": [{"port": 0}]}, "spec.ports[0].port"),
    ({"ports": [{"port": 80}, {"port": 81, "target_port": 70000}]}, "spec.ports[1].target_port"),
    ({"ports": [{"port": 80, "node_port": 65536}]}, "spec.ports[0].node_port"),
    ({"ports": [{"port": 80, "protocol": "SCTP"}]}, "spec.ports[0].protocol"),
    ({"type": "External"}, "spec.type"),
    ({"balancing": "random"}, "spec.balancing"),
    ({"primary_cluster": "Bad_Cluster"}, "spec.primary_cluster"),
])
def test_invalid_services(spec, field):
    assert rejected(service(**spec)).field == field


def test_service_primary_cluster_auto_or_name():
    admit(service(primary_cluster="auto"))
    admit(service(primary_cluster="c1"))


# ---------------------------------------------------------------- other kinds


def cluster(**spec):
    return manifest_object("Cluster", spec)


def test_cluster_manager_is_required_and_normalised():
    assert rejected(cluster()).field == "spec.manager"
    assert rejected(cluster(manager="mainframe")).field == "spec.manager"
    assert admit(cluster(manager="Kubernetes")).spec.manager == "kubernetes"


@pytest.mark.parametrize("spec, field", [
    ({"manager": "ssh"}, "spec.hosts"),
    ({"manager": "ssh", "hosts": [{"port": 22}]}, "spec.hosts[0].host"),
    ({"manager": "ssh", "hosts": [{"host": "h", "port": 70000}]}, "spec.hosts[0].port"),
    ({"manager": "local", "num_nodes": -1}, "spec.num_nodes"),
    ({"manager": "local", "disk_size": -1}, "spec.disk_size"),
    ({"manager": "sim", "simulation": {"nodes": -1}}, "spec.simulation.nodes"),
    ({"manager": "sim", "simulation": {"nodes": 1, "node_resources": {"cpus": -4}}},
     "spec.simulation.node_resources.cpus"),
])
def test_invalid_clusters(spec, field):
    assert rejected(cluster(**spec)).field == field


def test_ssh_cluster_with_access_config_host():
    admit(cluster(manager="ssh", access_config={"host": "10.0.0.1", "username": "me"}))


def test_links_join_two_different_clusters():
    admit(manifest_object("Link", {"source_cluster": "a", "target_cluster": "b"}))
    assert rejected(manifest_object("Link", {"source_cluster": "a"})).field == "spec.target_cluster"
    assert rejected(manifest_object("Link", {"source_cluster": "a", "target_cluster": "a"})).field == \
        "spec.target_cluster"


def test_filter_policies():
    admit(manifest_object("FilterPolicy", {"cluster_filter": {"include": ["a"], "exclude": ["b"]},
                                           "labels_selector": {"app": "x"}}))
    assert rejected(manifest_object("FilterPolicy", {"cluster_filter": {"exclude": ["ok", "Not_OK"]}})).field == \
        "spec.cluster_filter.exclude[1]"
    assert rejected(manifest_object("FilterPolicy", {"labels_selector": {"app": "-x"}})).field == \
        "spec.labels_selector.app"


def test_roles_and_bindings():
    admit(manifest_object("Role", {"rules": [{"resources": ["jobs", "*"], "verbs": ["get", "*"]}]}))
    assert rejected(manifest_object("Role", {"rules": [{"resources": ["jobs"], "verbs": ["fly"]}]})).field == \
        "spec.rules[0].verbs"
    assert rejected(manifest_object("Role", {"rules": [{}, {"resources": ["widgets"]}]})).field == \
        "spec.rules[1].resources"
    assert rejected(manifest_object("RoleBinding", {})).field == "spec.role"


def test_leases_and_events():
    assert rejected(manifest_object("Lease", {"lease_duration_seconds": -1})).field == "spec.lease_duration_seconds"
    admit(manifest_object("Event", {"type": "Warning"}))
    assert rejected(manifest_object("Event", {"type": "Error"})).field == "spec.type"


# ---------------------------------------------------------------- status


def test_status_phases_and_conditions():
    kind = kinds.resolve("jobs")
    validation.validate_status(kind, manifest_object("Job", status={"phase": "RUNNING"}))
    for status, field in [({"phase": "DANCING"}, "status.phase"),
                          ({"conditions": [{"status": "True"}]}, "status.conditions[0].type"),
                          ({"conditions": [{"type": "Ready", "status": "Maybe"}]}, "status.conditions[0].status")]:
        with pytest.raises(InvalidError) as caught:
            validation.validate_status(kind, manifest_object("Job", status=status))
        assert caught.value.field == field


def test_cluster_capacity_must_not_be_negative():
    obj = manifest_object("Cluster", {"manager": "local"},
                          status={"phase": "READY", "capacity": {"n1": {"resources": {"cpus": -1}}}})
    with pytest.raises(InvalidError) as caught:
        validation.validate_status(kinds.resolve("clusters"), obj)
    assert caught.value.field == "status.capacity.n1.cpus"


# ---------------------------------------------------------------- unknown protobuf fields


def test_unknown_protobuf_fields_are_rejected_with_their_path():
    # A newer client's field 99 inside spec.placement.filters[0] (tag 99, varint 1).
    term = pb.PlacementTerm(name="f", match_labels={"k": "v"}).SerializeToString() + b"\x98\x06\x01"
    obj = job()
    obj.spec.placement.filters.add().MergeFromString(term)
    with pytest.raises(InvalidError) as caught:
        validation.check_wire_values(obj)
    assert caught.value.field == "spec.placement.filters[0]"
    assert "99" in str(caught.value)


def test_defaults_are_idempotent():
    once = admit(job(run="x", placement={"preferences": [{"name": "p", "match_labels": {"a": "b"}}]}))
    twice = pb.Job()
    twice.CopyFrom(once)
    assert admit(twice) == once


@pytest.mark.parametrize("seconds, nanos", [(0, -1), (0, 10 ** 9), (10 ** 15, 0), (-(10 ** 12), 0)])
def test_timestamps_out_of_range_are_rejected_with_their_path(seconds, nanos):
    lease = manifest_object("Lease")
    lease.spec.renew_time.seconds, lease.spec.renew_time.nanos = seconds, nanos
    error = rejected(lease)
    assert error.field == "spec.renew_time"
    job_with_status = job()
    job_with_status.status.conditions.add(type="Ready", status="True").last_transition_time.nanos = -5
    with pytest.raises(InvalidError) as caught:
        validation.check_wire_values(job_with_status)
    assert caught.value.field == "status.conditions[0].last_transition_time"
