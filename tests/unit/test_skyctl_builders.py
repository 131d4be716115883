"""skyctl: objects built from `create` flags, and manifests read by `apply` (no server)."""
import io

import pytest

from skyshift.api.errors import InvalidError
from skyctl import apply as applying
from skyctl import builders


def test_job_from_flags_fills_every_field():
    job = builders.job(
        "train", namespace="team-a", labels=[("app", "ml")], image="ubuntu:22.04", image_pull_policy="ifnotpresent",
        resources=[("disk", "10Gi"), ("tpu", "4")], cpus=2, memory="4Gi", gpus=1, accelerators=["V100:2", "T4"],
        envs=[("EPOCHS", "10")], ports=[8080, 8081], replicas=3, run="python train.py", setup="pip install x",
        restart_policy="onfailure", gang=True, filters=["zone=a", "tier = gold"], backoff_limit=2)
    assert job.metadata.name == "train" and job.metadata.namespace == "team-a"
    assert dict(job.metadata.labels) == {"app": "ml"}
    spec = job.spec
    assert spec.image == "ubuntu:22.04" and spec.image_pull_policy == "IfNotPresent"
    assert dict(spec.resources) == {"cpus": 2, "memory": 4096, "gpus": 1, "disk": 10240, "tpu": 4, "V100": 2, "T4": 1}
    assert dict(spec.envs) == {"EPOCHS": "10"}
    assert list(spec.ports) == [8080, 8081]
    assert spec.replicas == 3 and spec.restart_policy == "OnFailure" and spec.gang and spec.backoff_limit == 2
    assert spec.run == "python train.py" and spec.setup == "pip install x"
    (term,) = spec.placement.filters
    assert term.name == builders.CLI_FILTER_NAME and dict(term.match_labels) == {"zone": "a", "tier": "gold"}


def test_job_defaults_are_left_to_the_server():
    job = builders.job("hello", run="echo hi")
    assert job.metadata.namespace == "default"
    assert not job.spec.HasField("replicas") and not job.spec.HasField("backoff_limit")
    assert job.spec.restart_policy == "" and not job.spec.resources


@pytest.mark.parametrize("flags, flag", [
    ({"accelerators": ["V100:two"]}, "--accelerators"),
    ({"accelerators": [":2"]}, "--accelerators"),
    ({"accelerators": ["V100:-1"]}, "--accelerators"),
    ({"memory": "lots"}, "--memory"),
    ({"resources": [("cpus", "many")]}, "--resources"),
    ({"filters": ["zone"]}, "--filter"),
    ({"restart_policy": "Sometimes"}, "--restart-policy"),
])
def test_job_flag_errors_name_the_flag(flags, flag):
    with pytest.raises(builders.FlagError) as caught:
        builders.job("x", **flags)
    assert caught.value.flag == flag


def test_cluster_from_flags():
    cluster = builders.cluster(
        "lab", labels=[("site", "a")], manager="ssh", hosts=["alice@10.0.0.5", "10.0.0.6:2222"], username="bob",
        ssh_key_path="/keys/id", cpus="4+", memory="16", disk_size=100, accelerators="V100:2", ports=["22", "8888"],
        num_nodes=2, config_path="/kube/config")
    spec = cluster.spec
    assert cluster.metadata.namespace == "" and dict(cluster.metadata.labels) == {"site": "a"}
    assert spec.manager == "ssh" and spec.cpus == "4+" and spec.memory == "16" and spec.disk_size == 100
    assert [(h.host, h.port, h.username, h.ssh_key_path) for h in spec.hosts] == [
        ("10.0.0.5", 0, "alice", "/keys/id"), ("10.0.0.6", 2222, "bob", "/keys/id")]
    assert spec.accelerators == "V100:2" and list(spec.ports) == ["22", "8888"] and spec.num_nodes == 2
    assert spec.config_path == "/kube/config"


def test_simulated_cluster_implies_the_sim_manager():
    cluster = builders.cluster("big", sim_nodes=100, sim_resources=[("cpus", "32"), ("memory", "128Gi")])
    assert cluster.spec.manager == "sim"
    assert cluster.spec.simulation.nodes == 100
    assert dict(cluster.spec.simulation.node_resources) == {"cpus": 32, "memory": 131072}


def test_bad_host_is_a_flag_error():
    with pytest.raises(builders.FlagError) as caught:
        builders.cluster("lab", manager="ssh", hosts=["a@b@c"])
    assert caught.value.flag == "--host"


def test_service_link_namespace_filterpolicy():
    service = builders.service("web", namespace="ns1", selector=[("app", "web")], ports=[(80, 8080), (443, 8443)],
                               service_type="loadbalancer", primary_cluster="c1", balancing="least_connections")
    assert service.metadata.namespace == "ns1" and service.spec.type == "LoadBalancer"
    assert [(p.port, p.target_port) for p in service.spec.ports] == [(80, 8080), (443, 8443)]
    assert dict(service.spec.selector) == {"app": "web"} and service.spec.primary_cluster == "c1"
    link = builders.link("a-b", source="a", target="b")
    assert (link.spec.source_cluster, link.spec.target_cluster) == ("a", "b")
    assert builders.namespace("team-a", labels=[("x", "y")]).metadata.labels["x"] == "y"
    policy = builders.filter_policy("p", include=["a"], exclude=["b", "c"], selector=[("env", "prod")],
                                    labels=[("owner", "me")])
    assert list(policy.spec.cluster_filter.include) == ["a"]
    assert list(policy.spec.cluster_filter.exclude) == ["b", "c"]
    assert dict(policy.spec.labels_selector) == {"env": "prod"} and policy.metadata.labels["owner"] == "me"
    assert policy.metadata.namespace == "default"


ORIGINAL_FORMAT = """
kind: Job
metadata:
  name: camel
  labels: {app: demo}
spec:
  image: ubuntu:latest
  imagePullPolicy: IfNotPresent
  resources: {cpus: 1, memory: 512}
  run: echo hi
  envs: {A: "1"}
  ports: [8080]
  replicas: 2
  restartPolicy: Never
  placement:
    filters:
    - name: zone
      matchLabels: {zone: a}
---
kind: FilterPolicy
metadata: {name: policy}
spec:
  clusterFilter: {include: [c1], exclude: [c2]}
  labelsSelector: {app: demo}
---
kind: Namespace
metadata: {name: made-first}
"""


def test_load_objects_reads_the_original_format_namespaces_first():
    objects = applying.load_objects([("jobs.yaml", ORIGINAL_FORMAT)])
    assert [type(o).__name__ for o in objects] == ["Namespace", "Job", "FilterPolicy"]
    job = objects[1]
    assert job.metadata.namespace == "default"
    assert job.spec.image_pull_policy == "IfNotPresent" and job.spec.restart_policy == "Never"
    assert job.spec.placement.filters[0].match_labels["zone"] == "a"
    assert job.spec.backoff_limit == 6  # defaults are filled before comparing with the stored object
    assert list(objects[2].spec.cluster_filter.exclude) == ["c2"]


def test_load_objects_names_source_document_and_field():
    text = "kind: Job\nmetadata: {name: a}\n---\nkind: Job\nmetadata: {name: b}\nspec: {run: x, replicaz: 2}\n"
    with pytest.raises(InvalidError) as caught:
        applying.load_objects([("jobs.yaml", text)])
    assert caught.value.message == "jobs.yaml (document 2): spec.replicaz: unknown field"


def test_load_objects_checks_values_before_anything_is_sent():
    with pytest.raises(InvalidError) as caught:
        applying.load_objects([("job.json", '{"kind": "Job", "metadata": {"name": "a"}, "spec": {"replicas": 0}}')])
    assert caught.value.message.startswith("job.json: spec.replicas: must be at least 1")


def test_load_objects_namespace_flag():
    text = "kind: Job\nmetadata: {name: a}\n---\nkind: Job\nmetadata: {name: b, namespace: other}\n"
    with pytest.raises(InvalidError) as caught:
        applying.load_objects([("x.yaml", text)], namespace="mine")
    assert "document 2" in caught.value.message and "--namespace 'mine'" in caught.value.message
    (job,) = applying.load_objects([("x.yaml", "kind: Job\nmetadata: {name: a}\n")], namespace="mine")
    assert job.metadata.namespace == "mine"


def test_read_sources_directory_file_and_stdin(tmp_path):
    (tmp_path / "b.yaml").write_text("kind: Namespace\nmetadata: {name: b}\n")
    (tmp_path / "a.json").write_text('{"kind": "Namespace", "metadata": {"name": "a"}}')
    (tmp_path / "notes.txt").write_text("not a manifest")
    single = tmp_path / "c.yml"
    single.write_text("kind: Namespace\nmetadata: {name: c}\n")
    sources = applying.read_sources([str(tmp_path), str(single), "-"],
                                    io.StringIO("kind: Namespace\nmetadata: {name: d}\n"))
    assert [name.rsplit("/", 1)[-1] for name, _ in sources] == ["a.json", "b.yaml", "c.yml", "c.yml", "<stdin>"]
    names = [o.metadata.name for o in applying.load_objects(sources)]
    assert names == ["a", "b", "c", "c", "d"]
