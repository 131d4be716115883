"""No injection: hostile names, labels, annotations and env values sent to a real control plane
(API server, manager, local cluster's skylet and driver) never reach a shell as code. Hostile
names and labels are refused at admission; hostile env values arrive in the replica literally;
no canary file is ever created."""
from __future__ import annotations

import pytest

from skyshift.api.errors import InvalidError
from skyshift.v1 import objects_pb2 as pb
from tests.conftest import wait_for
from tests.e2e.control_plane import running_plane
from tests.hostile import payloads

pytestmark = pytest.mark.slow


@pytest.fixture
def plane(tmp_path):
    with running_plane(tmp_path / "home") as control_plane:
        yield control_plane


def job(name: str) -> pb.Job:
    job = pb.Job(metadata=pb.ObjectMeta(name=name, namespace="default"))
    job.spec.resources["cpus"] = 0.1
    job.spec.restart_policy = "Never"
    return job


def test_hostile_env_values_arrive_literally_and_run_nothing(plane, tmp_path):
    canary = tmp_path / "pwned"
    values = payloads(canary)
    out = tmp_path / "values"
    hostile = job("hostile-envs")
    hostile.metadata.annotations["note"] = f"$(touch {canary})"  # free text, never executed either
    hostile.spec.envs.update({f"V{index}": value for index, value in enumerate(values)})
    # The job's own script quotes its variables, as any script should: then each arrives intact.
    hostile.spec.run = "printf '%s\\0' " + " ".join(f'"$V{index}"' for index in range(len(values))) + f" > {out}"
    with plane.client() as client:
        client.create(hostile)
        wait_for(lambda: client.get("jobs", "hostile-envs").status.phase in ("COMPLETED", "FAILED"), 90,
                 message="the job to finish")
        assert client.get("jobs", "hostile-envs").status.phase == "COMPLETED"
    assert out.read_bytes().split(b"\0")[:-1] == [value.encode() for value in values]
    assert not canary.exists()


def test_hostile_names_labels_and_env_names_are_refused(plane, tmp_path):
    canary = tmp_path / "pwned"
    with plane.client() as client:
        for bad_name in ["x;touch", "$(touch)", "a b", "../etc", "a\nb", "UPPER"]:
            with pytest.raises(InvalidError, match="metadata.name"):
                client.create(job(bad_name))
        for bad_value in payloads(canary):
            labelled = job("labelled")
            labelled.metadata.labels["app"] = bad_value
            with pytest.raises(InvalidError, match="metadata.labels"):
                client.create(labelled)
        for bad_env in ["A;B", "A B", "$(touch x)", "BASH_FUNC_x%%", "1A", "A=B", ""]:
            bad = job("bad-env")
            bad.spec.envs[bad_env] = "1"
            bad.spec.run = "true"
            with pytest.raises(InvalidError, match="spec.envs"):
                client.create(bad)
        with pytest.raises(InvalidError, match="metadata.name"):
            client.create(pb.Namespace(metadata=pb.ObjectMeta(name="$(touch x)")))
    assert not canary.exists()


def test_hostile_env_values_through_skyctl(plane, tmp_path):
    canary = tmp_path / "pwned"
    args = ["create", "job", "via-cli", "--cpus", "0.1", "--restart-policy", "Never", "--wait",
            "--run", 'printf "%s|" "$A" "$B"']
    value_a, value_b = f"$(touch {canary})", f"`touch {canary}`;touch {canary}"
    result = plane.skyctl(*args, "--env", "A", value_a, "--env", "B", value_b)
    assert result.returncode == 0, result.stderr
    assert f"{value_a}|{value_b}|" in result.stdout
    assert not canary.exists()
