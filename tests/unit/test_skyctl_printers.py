"""skyctl: tables, ages, manifests, the describe layout and revision diffs (no server)."""
import json

import pytest
import yaml

from skyshift.api import kinds
from skyshift.v1 import objects_pb2 as pb
from skyctl import printers

NOW = 1_700_000_000.0


def stamp(seconds_ago: float):
    from google.protobuf import timestamp_pb2

    result = timestamp_pb2.Timestamp()
    result.FromNanoseconds(int((NOW - seconds_ago) * 1e9))
    return result


def make_job(name="train", namespace="default", age=30, **spec) -> pb.Job:
    job = pb.Job()
    job.metadata.name = name
    job.metadata.namespace = namespace
    job.metadata.creation_timestamp.CopyFrom(stamp(age))
    for key, value in spec.items():
        setattr(job.spec, key, value)
    return job


@pytest.mark.parametrize("seconds, text", [
    (-5, "0s"), (0, "0s"), (45, "45s"), (119, "119s"), (125, "2m5s"), (600, "10m"), (179 * 60, "179m"),
    (3 * 3600 + 5 * 60, "3h5m"), (10 * 3600, "10h"), (3 * 86400 + 3600, "3d1h"), (30 * 86400, "30d"),
    (3 * 365 * 86400 + 10 * 86400, "3y10d"), (9 * 365 * 86400, "9y"),
])
def test_human_duration_like_kubectl(seconds, text):
    assert printers.human_duration(seconds) == text


def test_sizes_and_numbers():
    assert printers.mib(512) == "512Mi"
    assert printers.mib(1536) == "1.5Gi"
    assert printers.mib(2 * 1024 * 1024) == "2Ti"
    assert printers.number(2.0) == "2" and printers.number(0.5) == "0.5"


def test_job_table_aligns_columns_and_shows_replicas():
    running = make_job("train", replicas=3)
    running.status.phase = "RUNNING"
    running.status.replica_status["c1"].counts["RUNNING"] = 2
    running.status.replica_status["c2"].counts["PENDING"] = 1
    pending = make_job("a-much-longer-name", age=7200)
    lines = printers.Table(kinds.resolve("jobs")).lines([running, pending], NOW)
    assert lines == [
        "NAME                 REPLICAS   PHASE     RESTARTS   AGE",
        "train                2/3        RUNNING   0          30s",
        "a-much-longer-name   0/1        <none>    0          120m",
    ]


def test_all_namespaces_and_wide_add_columns():
    job = make_job(namespace="team-a", image="ubuntu", run="python x.py\n--flag")
    job.metadata.labels["app"] = "ml"
    job.spec.resources.update({"cpus": 2, "memory": 4096})
    headers, row = printers.Table(kinds.resolve("jobs"), wide=True, all_namespaces=True).lines([job], NOW)
    assert headers.split() == ["NAMESPACE", "NAME", "REPLICAS", "PHASE", "RESTARTS", "AGE", "IMAGE", "RESOURCES",
                               "CLUSTERS", "RUN", "LABELS"]
    assert row.split()[:2] == ["team-a", "train"]
    assert "cpus=2,memory=4Gi" in row and "python x.py --flag" in row and row.endswith("app=ml")


def test_later_rows_keep_the_first_widths():
    table = printers.Table(kinds.resolve("namespaces"))
    first = table.lines([pb.Namespace(metadata=pb.ObjectMeta(name="default"))], NOW)
    later = table.lines([pb.Namespace(metadata=pb.ObjectMeta(name="x"))], NOW)
    assert len(first) == 2 and len(later) == 1  # the header only once
    assert later[0].index("<none>") == first[1].index("<none>")


def test_cluster_columns_sum_nodes():
    cluster = pb.Cluster(metadata=pb.ObjectMeta(name="c1"))
    cluster.spec.manager = "local"
    cluster.status.phase = "READY"
    for node in ("n1", "n2"):
        cluster.status.capacity[node].resources.update({"cpus": 4, "memory": 8192, "V100": 1})
        cluster.status.allocatable[node].resources.update({"cpus": 3, "memory": 4096})
    headers, row = printers.Table(kinds.resolve("clusters"), wide=True).lines([cluster], NOW)
    cells = dict(zip(headers.split(), row.split()))
    assert cells["NODES"] == "2" and cells["CPUS"] == "6/8" and cells["MEMORY"] == "8Gi/16Gi"
    assert cells["GPUS"] == "-" and cells["ACCELERATORS"] == "V100:2" and cells["PHASE"] == "READY"


def test_replica_and_unknown_kind_columns():
    replica = pb.Replica(metadata=pb.ObjectMeta(name="train-0"))
    replica.spec.job_name, replica.spec.cluster, replica.spec.node = "train", "c1", "n1"
    replica.status.phase, replica.status.exit_code = "FAILED", 3
    headers, row = printers.Table(kinds.resolve("replicas")).lines([replica], NOW)
    assert headers.split() == ["NAME", "JOB", "CLUSTER", "NODE", "PHASE", "EXIT", "AGE"]
    assert row.split() == ["train-0", "train", "c1", "n1", "FAILED", "3", "<none>"]
    assert printers.Table(kinds.resolve("users")).lines([], NOW) == ["NAME   AGE"]


def test_manifests_single_and_list_in_yaml_and_json():
    job = make_job(run="echo a\necho b\n")
    text = printers.dump(printers.manifests([job], as_list=False), "yaml")
    assert "run: |\n    echo a\n    echo b\n" in text  # scripts stay readable
    assert yaml.safe_load(text)["metadata"]["name"] == "train"
    listed = json.loads(printers.dump(printers.manifests([job], as_list=True), "json"))
    assert listed["kind"] == "List" and listed["items"][0]["kind"] == "Job"


def test_describe_layout_with_conditions_and_sections():
    job = make_job(run="echo hi", replicas=2)
    job.metadata.labels.update({"app": "ml", "team": "a"})
    job.spec.resources["cpus"] = 1
    job.status.phase = "RUNNING"
    condition = job.status.conditions.add(type="Scheduled", status="True", reason="Bound", message="all bound")
    condition.last_transition_time.CopyFrom(stamp(60))
    event = pb.Event(metadata=pb.ObjectMeta(name="e1", namespace="default"))
    event.spec.type, event.spec.reason, event.spec.source = "Normal", "Scheduled", "scheduler"
    event.spec.message, event.spec.count = "bound to c1", 3
    event.spec.first_time.CopyFrom(stamp(600))
    event.spec.last_time.CopyFrom(stamp(5))
    text = printers.describe(job, [printers.events_section([event], NOW)], NOW)
    lines = text.splitlines()
    assert lines[0] == "Name:             train"
    assert "Namespace:        default" in lines and "Kind:             Job" in lines
    assert lines[lines.index("Labels:") + 1:lines.index("Labels:") + 3] == ["  app=ml", "  team=a"]
    assert "  Replicas: 2" in lines and "    cpus: 1" in lines and "  Phase: RUNNING" in lines
    conditions = lines.index("Conditions:")
    assert lines[conditions + 1].split() == ["TYPE", "STATUS", "REASON", "AGE", "MESSAGE"]
    assert lines[conditions + 2].split() == ["Scheduled", "True", "Bound", "60s", "all", "bound"]
    events = lines.index("Events:")
    assert "5s (x3 over 10m)" in lines[events + 2] and lines[events + 2].endswith("bound to c1")


def test_describe_empty_sections_say_none():
    namespace = pb.Namespace(metadata=pb.ObjectMeta(name="ns"))
    text = printers.describe(namespace, [printers.events_section([], NOW)], NOW)
    assert "Spec:             <none>" in text and "Events:  <none>" in text
    assert "Namespace:" not in text.replace("Kind:             Namespace", "")


def test_history_names_changed_fields_oldest_first():
    first = make_job(run="a")
    first.metadata.resource_version, first.metadata.generation = 10, 1
    second = pb.Job()
    second.CopyFrom(first)
    second.metadata.resource_version, second.metadata.generation = 12, 2
    second.spec.replicas = 3
    second.metadata.labels["app"] = "x"
    third = pb.Job()
    third.CopyFrom(second)
    third.metadata.resource_version = 15
    third.status.phase = "RUNNING"
    lines = printers.history_lines([third, second, first])  # the API answers newest first
    assert [line.split()[:2] for line in lines] == [["REVISION", "GENERATION"], ["10", "1"], ["12", "2"], ["15", "2"]]
    assert lines[2].endswith("metadata.labels.app, spec.replicas")
    assert lines[3].endswith("status.phase")


def test_change_summary_shortens_long_lists():
    assert printers.change_summary([]) == "no field changes"
    paths = [f"spec.p{i}" for i in range(6)]
    assert printers.change_summary(paths) == "spec.p0, spec.p1, spec.p2, spec.p3 (+2 more)"
