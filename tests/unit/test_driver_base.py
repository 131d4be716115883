"""Shared driver helpers (skyshift/drivers/base.py, records.py) and the driver factory."""
import json
import stat

import grpc
import pytest

from skyshift import config
from skyshift.api.errors import InvalidError
from skyshift.drivers import get_driver
from skyshift.drivers.base import (
    NotSupportedError, Phase, ReplicaState, is_replica_key, phase_for_exit, replica_env, replica_key,
    replica_resources, subtract_usage,
)
from skyshift.drivers.records import ReplicaRecord, StateDir, write_atomic
from skyshift.v1 import objects_pb2 as pb


def make_replica(name="r-0", namespace="default", **template) -> pb.Replica:
    replica = pb.Replica()
    replica.metadata.name = name
    replica.metadata.namespace = namespace
    replica.spec.job_name = "job"
    envs = template.pop("envs", {})
    replica.spec.template.envs.update(envs)
    for field, value in template.items():
        setattr(replica.spec.template, field, value)
    return replica


def test_replica_key_accepts_only_dns_labels():
    assert replica_key(make_replica("train-0", "team-a")) == "team-a/train-0"
    for namespace, name in (("default", "$(touch x)"), ("default", ".."), ("default", "a/b"), ("", "ok"),
                            ("Default", "ok"), ("default", "x" * 64)):
        with pytest.raises(InvalidError):
            replica_key(make_replica(name, namespace))


def test_is_replica_key():
    assert is_replica_key("default/r-0")
    for text in ("default", "default/r-0/x", "../etc", "default/..", "a;b/c", "/r", ""):
        assert not is_replica_key(text)


def test_replica_env_has_the_jobs_envs_and_skyshifts_variables():
    replica = make_replica(envs={"GREETING": "$(not run) ; `x`", "SKYSHIFT_REPLICA_RANK": "99"}, replicas=3)
    replica.spec.rank = 2
    env = replica_env(replica)
    assert env["GREETING"] == "$(not run) ; `x`"
    assert env["SKYSHIFT_REPLICA_RANK"] == "2"  # SkyShift's own variables win
    assert env["SKYSHIFT_NUM_REPLICAS"] == "3"
    assert env["SKYSHIFT_JOB_NAME"] == "job"
    assert env["SKYSHIFT_NAMESPACE"] == "default"
    assert env["SKYSHIFT_REPLICA_NAME"] == "r-0"
    assert env["SKYSHIFT_REPLICA_IPS"] == "127.0.0.1,127.0.0.1,127.0.0.1"
    assert replica_env(replica, ["10.0.0.1", "10.0.0.2", "10.0.0.3"])["SKYSHIFT_REPLICA_IPS"] == \
        "10.0.0.1,10.0.0.2,10.0.0.3"


def test_replica_env_defaults_to_one_replica():
    assert replica_env(make_replica())["SKYSHIFT_NUM_REPLICAS"] == "1"


@pytest.mark.parametrize("envs", [{"BAD NAME": "x"}, {"1ST": "x"}, {"A=B": "x"}, {"OK": "nul\0byte"}])
def test_replica_env_refuses_what_a_process_environment_cannot_hold(envs):
    with pytest.raises(InvalidError):
        replica_env(make_replica(envs=envs))


def test_replica_resources():
    replica = make_replica()
    replica.spec.template.resources.update({"cpus": 2, "V100": 1})
    assert replica_resources(replica) == {"cpus": 2.0, "V100": 1.0}


def test_subtract_usage():
    capacity = {"a": {"cpus": 4.0, "memory": 1000.0}, "b": {"cpus": 2.0}}
    usage = [("a", {"cpus": 1.0, "memory": 200.0}), ("a", {"cpus": 1.5, "gpus": 1.0}), ("b", {"cpus": 3.0}),
             ("gone", {"cpus": 1.0})]
    assert subtract_usage(capacity, usage) == {"a": {"cpus": 1.5, "memory": 800.0}, "b": {"cpus": 0.0}}
    assert capacity == {"a": {"cpus": 4.0, "memory": 1000.0}, "b": {"cpus": 2.0}}  # not modified


def test_phases():
    assert phase_for_exit(0) == Phase.SUCCEEDED
    assert phase_for_exit(3) == Phase.FAILED
    assert Phase.RUNNING == "RUNNING"
    assert ReplicaState(Phase.FAILED, 1).finished and not ReplicaState(Phase.RUNNING).finished
    assert not ReplicaState(Phase.UNKNOWN).finished


def test_get_driver(tmp_path):
    settings = config.load(tmp_path, env={})
    cluster = pb.Cluster()
    cluster.metadata.name = "sim-1"
    driver = get_driver("sim", cluster, settings)
    assert driver.manager == "sim" and "simulated" in driver.capabilities
    assert driver.state_path == tmp_path / "clusters" / "sim-1"
    with pytest.raises(NotSupportedError) as error:
        get_driver("mainframe", cluster, settings)
    assert error.value.code == grpc.StatusCode.UNIMPLEMENTED and "local" in error.value.message
    cluster.metadata.name = "../escape"
    with pytest.raises(InvalidError):
        get_driver("sim", cluster, settings)


def test_write_atomic_is_private_and_complete(tmp_path):
    path = tmp_path / "state.json"
    write_atomic(path, b"first")
    write_atomic(path, b"second")
    assert path.read_bytes() == b"second"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temporary file left


def test_state_dir_records(tmp_path):
    files = StateDir(tmp_path)
    assert files.keys() == []
    for key in ("ns-b/r-1", "ns-a/r-2", "ns-a/r-1"):
        files.create(key)
        files.write(ReplicaRecord(key=key, uid="u", node="n", resources={"cpus": 1.0}, ports=[80], start_time=1.0))
    files.create("ns-a/no-record")
    assert files.keys() == ["ns-a/r-1", "ns-a/r-2", "ns-b/r-1"]
    assert files.read("ns-a/r-1", ReplicaRecord).ports == [80]
    assert stat.S_IMODE(files.meta_dir("ns-a/r-1").stat().st_mode) == 0o700
    files.remove("ns-b/r-1")
    assert not (tmp_path / "replicas" / "ns-b").exists()  # an empty namespace directory goes too
    files.remove("ns-a/r-1")
    assert (tmp_path / "replicas" / "ns-a").exists()
    assert files.read("ns-b/r-1", ReplicaRecord) is None


def test_records_ignore_unknown_fields_and_survive_corruption(tmp_path):
    files = StateDir(tmp_path)
    files.create("ns/r")
    data = {"key": "ns/r", "uid": "u", "node": "n", "resources": {}, "ports": [], "start_time": 2.0, "later": 1}
    files.file("ns/r", "state.json").write_text(json.dumps(data))
    assert files.read("ns/r", ReplicaRecord).start_time == 2.0
    files.file("ns/r", "state.json").write_text("{not json")
    assert files.read("ns/r", ReplicaRecord) is None
