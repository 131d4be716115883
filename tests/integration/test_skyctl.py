"""skyctl against a real API server (the session's in-process server on real etcd)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import uuid

import pytest
import yaml
from click.testing import CliRunner

from skyshift.api.errors import NotFoundError
from skyshift.store.embedded import free_port
from skyshift.v1 import objects_pb2 as pb
from skyctl.main import cli
from tests.conftest import wait_for


@pytest.fixture
def skyctl(api_server, tmp_path):
    """Run skyctl in-process against the test server; returns click's Result."""
    def run(*args, input=None):
        return CliRunner().invoke(cli, ["--home", str(tmp_path / "home"), "--server", api_server.endpoint, *args],
                                  input=input)
    return run


def lines(text: str):
    return text.strip("\n").splitlines()


def table(text: str):
    """Rows of a skyctl table as {header: cell} (cells have no spaces in these tests)."""
    header, *rows = lines(text)
    return [dict(zip(header.split(), row.split())) for row in rows]


def exists(client, kind, name, namespace=None) -> bool:
    try:
        client.get(kind, name, namespace)
        return True
    except NotFoundError:
        return False


def test_apply_creates_then_reports_unchanged_and_configured(skyctl, client, namespace, tmp_path):
    new_namespace = f"{namespace}-x"
    manifest = tmp_path / "objects.yaml"
    manifest.write_text(textwrap.dedent(f"""\
        kind: Job
        metadata: {{name: web, namespace: {new_namespace}, labels: {{app: web}}}}
        spec: {{run: 'python -m http.server', replicas: 2}}
        ---
        kind: Namespace
        metadata: {{name: {new_namespace}}}
        ---
        kind: Job
        metadata: {{name: batch, namespace: {namespace}}}
        spec:
          run: |
            echo one
            echo two
        """))
    result = skyctl("apply", "-f", str(manifest))
    assert result.exit_code == 0, result.output
    assert lines(result.stdout) == [f"namespace/{new_namespace} created", "job/web created", "job/batch created"]
    assert client.get("jobs", "web", new_namespace).spec.replicas == 2

    again = skyctl("apply", "-f", str(manifest))
    assert lines(again.stdout) == [f"namespace/{new_namespace} unchanged", "job/web unchanged", "job/batch unchanged"]

    manifest.write_text(manifest.read_text().replace("replicas: 2", "replicas: 5").replace("app: web", "app: web2"))
    changed = skyctl("apply", "-f", str(manifest))
    assert lines(changed.stdout) == [f"namespace/{new_namespace} unchanged", "job/web configured",
                                     "job/batch unchanged"]
    web = client.get("jobs", "web", new_namespace)
    assert web.spec.replicas == 5 and dict(web.metadata.labels) == {"app": "web2"} and web.metadata.generation == 2
    client.delete("jobs", "web", new_namespace)
    client.delete("namespaces", new_namespace)


def test_apply_keeps_what_controllers_own(skyctl, client, namespace):
    job = pb.Job(metadata=pb.ObjectMeta(name="owned", namespace=namespace, finalizers=["skyshift.dev/replicas"]))
    job.spec.run = "old"
    created = client.create(job)
    created.status.phase = "RUNNING"
    client.update_status(created)
    manifest = f"kind: Job\nmetadata: {{name: owned, namespace: {namespace}}}\nspec: {{run: new}}\n"
    result = skyctl("apply", "-f", "-", input=manifest)
    assert lines(result.stdout) == ["job/owned configured"]
    stored = client.get("jobs", "owned", namespace)
    assert stored.spec.run == "new" and stored.status.phase == "RUNNING"
    assert list(stored.metadata.finalizers) == ["skyshift.dev/replicas"]
    stored.metadata.ClearField("finalizers")
    client.update(stored)


def test_apply_original_camel_case_manifest(skyctl, client, namespace, tmp_path):
    manifest = tmp_path / "original.json"
    manifest.write_text(json.dumps({
        "kind": "Job",
        "metadata": {"name": "camel", "namespace": namespace, "labels": {"app": "demo"}},
        "spec": {"image": "ubuntu:latest", "imagePullPolicy": "IfNotPresent", "resources": {"cpus": 1, "memory": "1Gi"},
                 "run": "echo hi", "envs": {"GREETING": "hi"}, "ports": [8080], "replicas": 2,
                 "restartPolicy": "OnFailure",
                 "placement": {"filters": [{"name": "zone", "matchLabels": {"zone": "a"}}],
                               "preferences": [{"name": "fast", "matchLabels": {"tier": "gold"}, "weight": 50}]}},
    }))
    result = skyctl("apply", "-f", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert lines(result.stdout) == ["job/camel created"]
    shown = yaml.safe_load(skyctl("get", "job", "camel", "-n", namespace, "-o", "yaml").stdout)
    spec = shown["spec"]
    assert spec["image_pull_policy"] == "IfNotPresent" and spec["restart_policy"] == "OnFailure"
    assert spec["resources"] == {"cpus": 1, "memory": 1024}
    assert spec["placement"]["preferences"][0]["weight"] == 50


def test_apply_with_unknown_field_creates_nothing(skyctl, client, namespace, tmp_path):
    manifest = tmp_path / "bad.yaml"
    manifest.write_text(textwrap.dedent(f"""\
        kind: Job
        metadata: {{name: fine, namespace: {namespace}}}
        spec: {{run: echo}}
        ---
        kind: Job
        metadata: {{name: broken, namespace: {namespace}}}
        spec:
          run: echo
          placement:
            filters:
            - name: zone
              matchLabel: {{zone: a}}
        """))
    result = skyctl("apply", "-f", str(manifest))
    assert result.exit_code == 1
    assert result.stderr == f"error: {manifest} (document 2): spec.placement.filters[0].matchLabel: unknown field\n"
    assert not exists(client, "jobs", "fine", namespace)
    assert not exists(client, "jobs", "broken", namespace)


def test_apply_reports_server_errors_per_object(skyctl, client, namespace):
    manifest = (f"kind: Job\nmetadata: {{name: lost, namespace: {namespace}-missing}}\nspec: {{run: x}}\n---\n"
                f"kind: Job\nmetadata: {{name: kept, namespace: {namespace}}}\nspec: {{run: x}}\n")
    result = skyctl("apply", "-f", "-", input=manifest)
    assert result.exit_code == 1
    assert lines(result.stdout) == ["job/kept created"]
    assert result.stderr.startswith(f'error: job/lost: namespace "{namespace}-missing" not found')


def test_create_job_with_flags_then_get_yaml(skyctl, namespace):
    result = skyctl("create", "job", "train", "-n", namespace, "--labels", "app", "ml", "--image", "ubuntu:22.04",
                    "--cpus", "2", "--memory", "4Gi", "--gpus", "1", "--accelerators", "V100:2", "-e", "EPOCHS", "10",
                    "--envs", "LR", "0.1", "--ports", "8080", "--replicas", "3", "--run", "python train.py",
                    "--setup", "pip install torch", "--restart_policy", "OnFailure", "--gang", "--filter", "zone=a")
    assert result.exit_code == 0, result.output
    assert result.stdout == "job/train created\n"
    job = yaml.safe_load(skyctl("get", "job/train", "-n", namespace, "-o", "yaml").stdout)
    assert job["kind"] == "Job" and job["metadata"]["labels"] == {"app": "ml"}
    spec = job["spec"]
    assert spec["image"] == "ubuntu:22.04" and spec["run"] == "python train.py" and spec["setup"] == "pip install torch"
    assert spec["resources"] == {"cpus": 2, "memory": 4096, "gpus": 1, "V100": 2}
    assert spec["envs"] == {"EPOCHS": "10", "LR": "0.1"} and spec["ports"] == [8080]
    assert spec["replicas"] == 3 and spec["restart_policy"] == "OnFailure" and spec["gang"] is True
    assert spec["placement"]["filters"] == [{"name": "cli", "match_labels": {"zone": "a"}}]


def test_create_every_kind(skyctl, client, namespace):
    suffix = uuid.uuid4().hex[:6]
    c1, c2, ns = f"a-{suffix}", f"b-{suffix}", f"made-{suffix}"
    commands = [
        ["create", "cluster", c1, "--manager", "local", "--labels", "site", "home"],
        ["create", "cluster", c2, "--manager", "ssh", "--host", "alice@127.0.0.1:2222", "--ssh_key_path", "/k"],
        ["create", "cluster", f"sim-{suffix}", "--sim-nodes", "4", "--sim-resources", "cpus", "8"],
        ["create", "svc", "web", "-n", namespace, "-s", "app", "web", "-p", "80", "8080", "--type", "NodePort"],
        ["create", "namespace", ns],
        ["create", "link", f"l-{suffix}", "--source", c1, "--target", c2],
        ["create", "filterPolicy", "policy", "-n", namespace, "-l", "app", "web", "-i", c1, "-e", c2],
    ]
    for command in commands:
        result = skyctl(*command)
        assert result.exit_code == 0, (command, result.output)
    assert client.get("clusters", c2).spec.hosts[0].port == 2222
    assert client.get("clusters", f"sim-{suffix}").spec.manager == "sim"
    assert client.get("services", "web", namespace).spec.ports[0].target_port == 8080
    assert list(client.get("filterpolicies", "policy", namespace).spec.cluster_filter.exclude) == [c2]
    link = next(row for row in table(skyctl("get", "links").stdout) if row["NAME"] == f"l-{suffix}")
    assert (link["SOURCE"], link["TARGET"]) == (c1, c2)
    duplicate = skyctl("create", "namespace", ns)
    assert duplicate.exit_code == 1 and duplicate.stderr == f'error: namespace "{ns}" already exists\n'
    invalid = skyctl("create", "job", "Bad_Name", "-n", namespace)
    assert invalid.exit_code == 1 and invalid.stderr.startswith("error: metadata.name: 'Bad_Name' is not a DNS-1123")
    for kind, name in (("links", f"l-{suffix}"), ("clusters", c1), ("clusters", c2), ("clusters", f"sim-{suffix}"),
                       ("namespaces", ns)):
        client.delete(kind, name)


def test_get_tables_selectors_and_formats(skyctl, client, namespace):
    for name, app in (("alpha", "web"), ("beta", "web"), ("gamma", "db")):
        skyctl("create", "job", name, "-n", namespace, "--labels", "app", app, "--run", "x", "--replicas", "2")
    rows = table(skyctl("get", "jobs", "-n", namespace).stdout)
    assert [(r["NAME"], r["REPLICAS"], r["PHASE"], r["RESTARTS"]) for r in rows] == [
        ("alpha", "0/2", "PENDING", "0"), ("beta", "0/2", "PENDING", "0"), ("gamma", "0/2", "PENDING", "0")]
    web = skyctl("get", "jobs", "-n", namespace, "-l", "app=web", "-o", "name")
    assert lines(web.stdout) == ["job/alpha", "job/beta"]
    by_field = skyctl("get", "jobs", "-n", namespace, "--field-selector", "metadata.name!=alpha", "-o", "name")
    assert lines(by_field.stdout) == ["job/beta", "job/gamma"]
    everywhere = table(skyctl("get", "jobs", "-A", "-l", "app=db").stdout)
    assert {"NAMESPACE": namespace, "NAME": "gamma"}.items() <= next(r for r in everywhere
                                                                      if r["NAMESPACE"] == namespace).items()
    wide = lines(skyctl("get", "jobs", "-n", namespace, "-o", "wide").stdout)
    assert wide[0].split()[-1] == "LABELS" and wide[1].endswith("app=web")
    listed = json.loads(skyctl("get", "jobs", "-n", namespace, "-o", "json").stdout)
    assert listed["kind"] == "List" and [i["metadata"]["name"] for i in listed["items"]] == ["alpha", "beta", "gamma"]
    empty = skyctl("get", "services", "-n", namespace)
    assert empty.exit_code == 0 and empty.stdout == ""
    assert empty.stderr == f"No services found in namespace {namespace}.\n"
    mixed = skyctl("get", "job/alpha", f"ns/{namespace}", "-n", namespace)
    assert mixed.exit_code == 0 and "alpha" in mixed.stdout and namespace in mixed.stdout
    missing = skyctl("get", "job", "alpha", "nope", "-n", namespace, "-o", "name")
    assert missing.exit_code == 1 and missing.stdout == "job/alpha\n"
    assert missing.stderr == f'error: job "nope" in namespace "{namespace}" not found\n'


def test_delete_by_names_selector_and_all(skyctl, client, namespace):
    for index in range(6):
        skyctl("create", "job", f"j{index}", "-n", namespace, "--labels", "group", "even" if index % 2 == 0 else "odd")
    result = skyctl("delete", "job", "j0", "missing", "j1", "-n", namespace)
    assert result.exit_code == 1
    assert lines(result.stdout) == ["job/j0 deleted", "job/j1 deleted"]
    assert result.stderr == f'error: job "missing" in namespace "{namespace}" not found\n'
    by_label = skyctl("delete", "jobs", "-l", "group=even", "-n", namespace)
    assert by_label.exit_code == 0 and lines(by_label.stdout) == ["job/j2 deleted", "job/j4 deleted"]
    everything = skyctl("delete", "jobs", "--all", "-n", namespace)
    assert lines(everything.stdout) == ["job/j3 deleted", "job/j5 deleted"]
    assert client.list("jobs", namespace).items == []
    nothing = skyctl("delete", "jobs", "--all", "-n", namespace)
    assert nothing.exit_code == 0 and nothing.stderr == f"No jobs found in namespace {namespace}.\n"


def test_delete_with_finalizers_says_it_waits(skyctl, client, namespace):
    client.create(pb.Job(metadata=pb.ObjectMeta(name="held", namespace=namespace, finalizers=["example.com/hold"])))
    result = skyctl("delete", "job/held", "-n", namespace)
    assert result.stdout == "job/held deleted (waiting for finalizers: example.com/hold)\n"
    held = client.get("jobs", "held", namespace)
    held.metadata.ClearField("finalizers")
    client.update(held)
    assert not exists(client, "jobs", "held", namespace)


def test_describe_job_with_replicas_and_events(skyctl, client, namespace):
    skyctl("create", "job", "train", "-n", namespace, "--run", "python train.py", "--cpus", "2", "--replicas", "2",
           "--labels", "app", "ml")
    for rank in range(2):
        replica = pb.Replica(metadata=pb.ObjectMeta(name=f"train-{rank}", namespace=namespace,
                                                    labels={"skyshift.dev/job": "train"}))
        replica.spec.job_name, replica.spec.rank, replica.spec.cluster = "train", rank, "c1"
        replica.spec.template.run = "python train.py"
        client.create(replica)
    other = pb.Replica(metadata=pb.ObjectMeta(name="other-0", namespace=namespace,
                                              labels={"skyshift.dev/job": "other"}))
    other.spec.job_name = "other"
    client.create(other)
    for index, (kind, name, reason) in enumerate((("Job", "train", "Created"), ("Cluster", "train", "Unrelated"),
                                                  ("Job", "train", "Scheduled"), ("Job", "other", "Elsewhere"))):
        event = pb.Event(metadata=pb.ObjectMeta(name=f"e{index}", namespace=namespace))
        event.spec.involved_kind, event.spec.involved_name, event.spec.reason = kind, name, reason
        event.spec.type, event.spec.message, event.spec.source = "Normal", f"{reason} happened", "test"
        event.spec.last_time.FromSeconds(1_700_000_000 + (10 - index))  # 'Created' is the newest
        client.create(event)
    result = skyctl("describe", "job", "train", "-n", namespace)
    assert result.exit_code == 0, result.output
    text = lines(result.stdout)
    assert text[0].split() == ["Name:", "train"] and ["Namespace:", namespace] in [t.split() for t in text]
    assert "  app=ml" in text and "  Run:            python train.py" in text and "    cpus: 2" in text
    replicas = text.index("Replicas:")
    assert text[replicas + 1].split() == ["NAME", "CLUSTER", "NODE", "PHASE", "EXIT", "AGE"]
    assert [t.split()[:2] for t in text[replicas + 2:replicas + 4]] == [["train-0", "c1"], ["train-1", "c1"]]
    events = text.index("Events:")
    reasons = [t.split()[1] for t in text[events + 2:]]
    assert reasons == ["Scheduled", "Created"]  # only this job's, newest last
    missing = skyctl("describe", "job/nope", "-n", namespace)
    assert missing.exit_code == 1 and missing.stderr == f'error: job "nope" in namespace "{namespace}" not found\n'


def test_history_after_two_updates(skyctl, client, namespace):
    skyctl("create", "job", "evolving", "-n", namespace, "--run", "v1")
    job = client.get("jobs", "evolving", namespace)
    job.spec.replicas = 4
    job = client.update(job)
    job.spec.run = "v2"
    job.metadata.labels["stage"] = "two"
    client.update(job)
    result = skyctl("history", "job/evolving", "-n", namespace)
    assert result.exit_code == 0, result.output
    header, first, second, third = lines(result.stdout)
    assert header.split() == ["REVISION", "GENERATION", "CHANGES"]
    assert [row.split()[1] for row in (first, second, third)] == ["1", "2", "3"]
    assert second.split()[2:] == ["spec.replicas"]
    assert third.split()[2:] == ["metadata.labels.stage,", "spec.run"]
    revisions = yaml.safe_load(skyctl("history", "jobs", "evolving", "-n", namespace, "-o", "yaml").stdout)
    assert [r["spec"]["run"] for r in revisions["items"]] == ["v1", "v1", "v2"]


def test_unreachable_server_is_one_line(tmp_path):
    address = f"127.0.0.1:{free_port()}"
    result = CliRunner().invoke(cli, ["--home", str(tmp_path), "--server", address, "get", "jobs"])
    assert result.exit_code == 1
    assert result.stderr == f"error: cannot reach the API server at {address} (start it with skyctl api start)\n"


def skyctl_process(api_server, tmp_path, *args, code=None):
    environment = dict(os.environ, SKYSHIFT_API_SERVER=api_server.endpoint, SKYSHIFT_HOME=str(tmp_path / "home"))
    command = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "skyctl", *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment)


def test_watch_prints_the_list_then_changes_until_ctrl_c(api_server, client, namespace, tmp_path):
    client.create(pb.Job(metadata=pb.ObjectMeta(name="before", namespace=namespace)))
    process = skyctl_process(api_server, tmp_path, "get", "jobs", "-n", namespace, "-w")
    output = []
    reader = threading.Thread(target=lambda: output.extend(process.stdout), daemon=True)
    try:
        reader.start()
        wait_for(lambda: any(line.startswith("before") for line in output), message="the initial list")
        client.create(pb.Job(metadata=pb.ObjectMeta(name="after", namespace=namespace)))
        wait_for(lambda: any(line.startswith("after") for line in output), message="the new job's row")
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=10) == 0
        assert process.stderr.read() == ""
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert output[0].split() == ["NAME", "REPLICAS", "PHASE", "RESTARTS", "AGE"]


def test_get_jobs_imports_no_heavy_modules(api_server, tmp_path):
    """`skyctl get jobs` loads the SDK but not yaml, kubernetes, libcloud or paramiko."""
    code = textwrap.dedent("""\
        import runpy, sys
        sys.argv = ['skyctl'] + sys.argv[1:]
        try:
            runpy.run_module('skyctl.main', run_name='__main__')
        except SystemExit:
            pass
        print('HEAVY', [m for m in ('yaml', 'kubernetes', 'libcloud', 'paramiko', 'aetcd') if m in sys.modules])
        """)
    process = skyctl_process(api_server, tmp_path, "get", "jobs", code=code)
    stdout, stderr = process.communicate(timeout=30)
    assert "HEAVY []" in stdout, stdout + stderr
    help_process = skyctl_process(api_server, tmp_path, "--help", code=code.replace("'yaml'", "'grpc', 'yaml'"))
    assert "HEAVY []" in help_process.communicate(timeout=30)[0]
