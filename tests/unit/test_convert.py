"""Manifest <-> protobuf conversion (skyshift.api.convert): field names, types, units, documents."""
import json

import pytest

from skyshift.api import convert
from skyshift.api.errors import InvalidError
from skyshift.v1 import api_pb2
from skyshift.v1 import objects_pb2 as pb


def job_manifest(spec=None, metadata=None):
    return {"kind": "Job", "metadata": metadata or {"name": "train"}, "spec": spec or {}}


def invalid_field(manifest) -> InvalidError:
    with pytest.raises(InvalidError) as caught:
        convert.from_manifest(manifest)
    return caught.value


# ---------------------------------------------------------------- field names


def test_snake_case_manifest_in_the_original_skyshift_format():
    job = convert.from_manifest(job_manifest({
        "image": "ubuntu:22.04", "image_pull_policy": "IfNotPresent", "run": "python train.py",
        "resources": {"cpus": 2, "memory": 1024, "gpus": 1, "V100": 1}, "envs": {"EPOCHS": "3"},
        "ports": [8080], "replicas": 3, "restart_policy": "OnFailure",
        "placement": {"filters": [{"name": "gpu", "match_labels": {"zone": "a"}}],
                      "preferences": [{"name": "cheap", "match_expressions": [
                          {"key": "tier", "operator": "In", "values": ["spot"]}], "weight": 20}]},
    }))
    assert isinstance(job, pb.Job)
    assert job.spec.image_pull_policy == "IfNotPresent"
    assert dict(job.spec.resources) == {"cpus": 2.0, "memory": 1024.0, "gpus": 1.0, "V100": 1.0}
    assert list(job.spec.ports) == [8080]
    assert job.spec.replicas == 3 and job.spec.restart_policy == "OnFailure"
    assert job.spec.placement.filters[0].match_labels == {"zone": "a"}
    expression = job.spec.placement.preferences[0].match_expressions[0]
    assert (expression.key, expression.operator, list(expression.values)) == ("tier", "In", ["spot"])
    assert job.spec.placement.preferences[0].weight == 20


def test_camel_case_names_are_accepted_at_any_depth():
    camel = convert.from_manifest(job_manifest({
        "imagePullPolicy": "Always", "restartPolicy": "Never",
        "placement": {"filters": [{"name": "f", "matchLabels": {"a": "b"},
                                   "matchExpressions": [{"key": "k", "operator": "Exists"}]}]},
    }, metadata={"name": "x", "ownerReferences": [{"kind": "Job", "name": "y"}]}))
    snake = convert.from_manifest(job_manifest({
        "image_pull_policy": "Always", "restart_policy": "Never",
        "placement": {"filters": [{"name": "f", "match_labels": {"a": "b"},
                                   "match_expressions": [{"key": "k", "operator": "Exists"}]}]},
    }, metadata={"name": "x", "owner_references": [{"kind": "Job", "name": "y"}]}))
    assert camel == snake


def test_kind_is_resolved_from_any_of_its_names():
    for name in ("Job", "job", "jobs"):
        assert isinstance(convert.from_manifest({"kind": name, "metadata": {"name": "a"}}), pb.Job)
    policy = convert.from_manifest({"kind": "FilterPolicy", "metadata": {"name": "p"},
                                    "spec": {"clusterFilter": {"include": ["c1"]}, "labelsSelector": {"a": "b"}}})
    assert list(policy.spec.cluster_filter.include) == ["c1"]


def test_default_namespace_fills_only_namespaced_kinds_without_one():
    assert convert.from_manifest(job_manifest(), default_namespace="team").metadata.namespace == "team"
    explicit = job_manifest(metadata={"name": "a", "namespace": "mine"})
    assert convert.from_manifest(explicit, default_namespace="team").metadata.namespace == "mine"
    cluster = convert.from_manifest({"kind": "Cluster", "metadata": {"name": "c"}}, default_namespace="team")
    assert cluster.metadata.namespace == ""


# ---------------------------------------------------------------- unknown fields


@pytest.mark.parametrize("manifest, path", [
    ({"kind": "Job", "metadata": {"name": "a"}, "spex": {}}, "spex"),
    (job_manifest(metadata={"name": "a", "labelz": {}}), "metadata.labelz"),
    (job_manifest({"replica": 2}), "spec.replica"),
    (job_manifest({"placement": {"filters": [{"name": "f", "bogus": 1}]}}), "spec.placement.filters[0].bogus"),
    (job_manifest({"placement": {"preferences": [{"name": "p", "matchExpressions": [{"key": "k", "op": "In"}]}]}}),
     "spec.placement.preferences[0].match_expressions[0].op"),
    (job_manifest({"volumes": {"data": {"container_dir": "/d", "size": 1}}}), "spec.volumes.data.size"),
    ({"kind": "Service", "metadata": {"name": "s"}, "spec": {"ports": [{"port": 80, "targetPrt": 81}]}},
     "spec.ports[0].targetPrt"),
])
def test_unknown_fields_are_errors_naming_their_path(manifest, path):
    error = invalid_field(manifest)
    assert error.field == path
    assert "unknown field" in str(error) and str(error).startswith(path)


# ---------------------------------------------------------------- types


@pytest.mark.parametrize("spec, path, problem", [
    ({"replicas": "three"}, "spec.replicas", "integer"),
    ({"replicas": True}, "spec.replicas", "integer"),
    ({"replicas": 2.5}, "spec.replicas", "integer"),
    ({"replicas": 2 ** 40}, "spec.replicas", "out of range"),
    ({"ports": 80}, "spec.ports", "list"),
    ({"ports": [80, "http"]}, "spec.ports[1]", "integer"),
    ({"ports": [80, None]}, "spec.ports[1]", "null"),
    ({"envs": ["A=1"]}, "spec.envs", "mapping"),
    ({"envs": {"A": {"nested": 1}}}, "spec.envs.A", "string"),
    ({"envs": {"A": None}}, "spec.envs.A", "null"),
    ({"run": ["echo", "hi"]}, "spec.run", "string"),
    ({"gang": "yes"}, "spec.gang", "true or false"),
    ({"resources": {"cpus": "many"}}, "spec.resources.cpus", "number"),
    ({"resources": {"cpus": float("inf")}}, "spec.resources.cpus", "finite"),
    ({"resources": {"cpus": [1]}}, "spec.resources.cpus", "number"),
    ({"placement": {"filters": {"name": "f"}}}, "spec.placement.filters", "list"),
    ({"placement": {"filters": ["gpu"]}}, "spec.placement.filters[0]", "mapping"),
    ({"placement": "anywhere"}, "spec.placement", "mapping"),
])
def test_type_errors_name_the_field_path(spec, path, problem):
    error = invalid_field(job_manifest(spec))
    assert error.field == path
    assert problem in str(error)


@pytest.mark.parametrize("manifest, path", [
    ("just a string", ""),
    ({"metadata": {"name": "a"}}, "kind"),
    ({"kind": "Widget", "metadata": {"name": "a"}}, "kind"),
    ({"kind": "Job", "metadata": "a"}, "metadata"),
    ({"kind": "Job", "metadata": {"name": "a", "creation_timestamp": "yesterday"}}, "metadata.creation_timestamp"),
    ({"kind": "Job", "metadata": {"name": "a", "labels": {None: "x"}}}, "metadata.labels"),
])
def test_malformed_manifests_name_the_field(manifest, path):
    assert invalid_field(manifest).field == path


def test_lenient_scalars_that_yaml_produces():
    job = convert.from_manifest(job_manifest({"replicas": "3", "envs": {"N": 4, "F": 1.5}, "gang": "True",
                                              "resources": {"cpus": "0.5"}}))
    assert job.spec.replicas == 3
    assert dict(job.spec.envs) == {"N": "4", "F": "1.5"}
    assert job.spec.gang is True
    assert job.spec.resources["cpus"] == 0.5
    cluster = convert.from_manifest({"kind": "Cluster", "metadata": {"name": "c"}, "spec": {"cpus": 8}})
    assert cluster.spec.cpus == "8"


def test_enum_fields_accept_names_and_numbers():
    event = api_pb2.WatchEvent()
    convert.fill(event, {"type": "DELETED", "resource_version": 7}, "")
    assert event.type == api_pb2.WatchEvent.DELETED and event.resource_version == 7
    convert.fill(event, {"type": 2}, "")
    assert event.type == api_pb2.WatchEvent.MODIFIED
    for bad in ("REMOVED", 99):
        with pytest.raises(InvalidError) as caught:
            convert.fill(api_pb2.WatchEvent(), {"type": bad}, "event")
        assert caught.value.field == "event.type"


def test_timestamps_parse_rfc3339():
    job = convert.from_manifest(job_manifest(metadata={"name": "a", "creationTimestamp": "2024-05-01T10:00:00Z"}))
    assert job.metadata.creation_timestamp.ToJsonString() == "2024-05-01T10:00:00Z"


# ---------------------------------------------------------------- units


@pytest.mark.parametrize("value, mib", [
    (512, 512.0), (1.5, 1.5), ("512", 512.0), ("512M", 512.0), ("512Mi", 512.0), ("4Gi", 4096.0),
    ("2G", 2048.0), ("2GB", 2048.0), ("0.5Gi", 512.0), ("1Ti", 1024.0 ** 2), ("1024Ki", 1.0),
    (" 4 gi ", 4096.0),
])
def test_memory_units(value, mib):
    job = convert.from_manifest(job_manifest({"resources": {"memory": value, "disk": value}}))
    assert job.spec.resources["memory"] == mib
    assert job.spec.resources["disk"] == mib


@pytest.mark.parametrize("value", ["lots", "4Zi", "-1Gi", "Gi", "1.2.3G", True])
def test_bad_sizes_name_the_resource(value):
    error = invalid_field(job_manifest({"resources": {"memory": value}}))
    assert error.field == "spec.resources.memory"


def test_units_only_apply_to_sizes():
    error = invalid_field(job_manifest({"resources": {"cpus": "4Gi"}}))
    assert error.field == "spec.resources.cpus"


def test_simulated_node_resources_accept_units():
    cluster = convert.from_manifest({"kind": "Cluster", "metadata": {"name": "sim"},
                                     "spec": {"manager": "sim",
                                              "simulation": {"nodes": 2, "node_resources": {"memory": "8Gi"}}}})
    assert cluster.spec.simulation.node_resources["memory"] == 8192.0


# ---------------------------------------------------------------- to_manifest


def full_job() -> pb.Job:
    return convert.from_manifest({
        "kind": "Job",
        "metadata": {"name": "train", "namespace": "ml", "labels": {"app": "train"},
                     "annotations": {"note": "x"}, "finalizers": ["example.com/keep"],
                     "creation_timestamp": "2024-05-01T10:00:00.250Z",
                     "owner_references": [{"kind": "Job", "name": "parent", "uid": "u1", "controller": True}]},
        "spec": {"image": "ubuntu", "run": "sleep 1", "resources": {"cpus": 1.5, "memory": "2Gi"},
                 "envs": {"A": "1"}, "ports": [80, 443], "replicas": 2, "restart_policy": "Never",
                 "volumes": {"data": {"container_dir": "/data", "host_dir": "/srv"}},
                 "placement": {"filters": [{"name": "f", "match_labels": {"zone": "a"}}]}, "gang": True},
        "status": {"phase": "RUNNING", "replica_status": {"c1": {"counts": {"RUNNING": 2}}},
                   "conditions": [{"type": "Ready", "status": "True"}]},
    })


def test_to_manifest_round_trips():
    job = full_job()
    manifest = convert.to_manifest(job)
    assert manifest["kind"] == "Job"
    assert manifest["spec"]["resources"] == {"cpus": 1.5, "memory": 2048}
    assert manifest["metadata"]["creation_timestamp"] == "2024-05-01T10:00:00.250Z"
    assert convert.from_manifest(manifest) == job
    # ...also through JSON, as `skyctl get -o json | skyctl apply -f -` does.
    assert convert.from_manifest(json.loads(json.dumps(manifest))) == job


def test_to_manifest_round_trips_every_kind():
    for kind in ("Namespace", "Cluster", "Replica", "Service", "Endpoints", "Link", "FilterPolicy", "User", "Role",
                 "RoleBinding", "Lease", "Event"):
        obj = convert.from_manifest({"kind": kind, "metadata": {"name": "x", "labels": {"k": "v"}}})
        manifest = convert.to_manifest(obj)
        assert manifest["kind"] == kind
        assert convert.from_manifest(manifest) == obj


def test_to_manifest_omits_unset_fields():
    job = pb.Job()
    job.metadata.name = "a"
    assert convert.to_manifest(job) == {"kind": "Job", "metadata": {"name": "a"}, "spec": {}, "status": {}}


# ---------------------------------------------------------------- documents


def test_load_manifests_reads_several_yaml_documents():
    text = """
kind: Namespace
metadata: {name: ml}
---
# a comment-only document between two objects
---
kind: Job
metadata:
  name: train
  namespace: ml
spec:
  run: python train.py
  resources: {memory: 4Gi}
"""
    manifests = convert.load_manifests(text)
    assert [m["kind"] for m in manifests] == ["Namespace", "Job"]
    job = convert.from_manifest(manifests[1])
    assert job.spec.resources["memory"] == 4096.0


def test_load_manifests_flattens_kind_list_and_plain_lists():
    text = json.dumps({"kind": "List", "items": [
        {"kind": "Job", "metadata": {"name": "a"}}, {"kind": "Job", "metadata": {"name": "b"}}]})
    assert [m["metadata"]["name"] for m in convert.load_manifests(text)] == ["a", "b"]
    text = "- {kind: Job, metadata: {name: a}}\n- {kind: Cluster, metadata: {name: c}}\n"
    assert [m["kind"] for m in convert.load_manifests(text)] == ["Job", "Cluster"]
    assert convert.load_manifests("kind: List\nitems: []\n") == []


def test_load_manifests_reports_syntax_errors_with_the_source():
    with pytest.raises(InvalidError) as caught:
        convert.load_manifests("kind: Job\nmetadata: {name: a\n", source="jobs.yaml")
    assert caught.value.field == "jobs.yaml"
