"""The driver contract (skyshift/drivers/base.py): one suite that every driver passes.

To add a driver: add its name to DRIVERS and define a fixture `<name>_cluster` returning the
pb.Cluster it serves (it may use other fixtures, e.g. sshd hosts).

Every replica here speaks to real and simulated drivers alike: drivers that run commands run its
`setup` and `run`; the sim driver reads SIM_DURATION / SIM_EXIT_CODE from its envs. Tests about
real processes skip on drivers with the "simulated" capability. Jobs that must wait for the test
wait for a file `release` in their working directory, which the test creates through exec.
"""
from __future__ import annotations

import asyncio
import pathlib
import re
import uuid
from typing import Dict, List, Optional

import pytest

from skyshift.api.errors import InvalidError, NotFoundError, PreconditionError
from skyshift.drivers import get_driver
from skyshift.drivers.base import EXEC, LOGS, SIMULATED, Driver, NotSupportedError, Phase, ReplicaState
from skyshift.v1 import objects_pb2 as pb
from tests.conftest import async_wait_for, make_settings

DRIVERS = ["local", "sim", "ssh"]

FAST_DRIVER_SETTINGS = {
    "stop_grace_period": 1.0,
    "stop_poll_interval": 0.01,
    "poll_interval": 0.1,
    "log_follow_interval": 0.02,
}
NAMESPACE = "default"
#: What a job waiting for the test runs: it waits for ./release, then exits.
WAIT_FOR_RELEASE = 'while [ ! -e release ]; do sleep 0.02; done'


# ---------------------------------------------------------------- clusters and drivers


def _cluster(name: str, manager: str) -> pb.Cluster:
    cluster = pb.Cluster()
    cluster.metadata.name = name
    cluster.spec.manager = manager
    return cluster


@pytest.fixture
def local_cluster() -> pb.Cluster:
    return _cluster("local", "local")


@pytest.fixture
def sim_cluster() -> pb.Cluster:
    cluster = _cluster("sim-contract", "sim")
    cluster.spec.simulation.nodes = 2
    cluster.spec.simulation.node_resources.update({"cpus": 4, "memory": 8192})
    return cluster


@pytest.fixture(params=DRIVERS)
def cluster(request) -> pb.Cluster:
    return request.getfixturevalue(f"{request.param}_cluster")


@pytest.fixture
async def new_driver(cluster, tmp_path):
    """Makes driver instances on one state directory (as successive skylets would)."""
    settings = make_settings(tmp_path / "home", drivers=dict(FAST_DRIVER_SETTINGS))
    drivers: List[Driver] = []

    def make() -> Driver:
        drivers.append(get_driver(cluster.spec.manager, cluster, settings))
        return drivers[-1]

    yield make
    # Stop everything any instance started (each stop ends a whole process group), then close.
    cleaner = make()
    failures = []
    for _, handle, _ in await cleaner.adopt():
        try:
            await cleaner.stop(handle)
        except Exception as error:  # keep stopping the others
            failures.append(error)
    for driver in drivers:
        await driver.close()
    assert not failures, failures


@pytest.fixture
def driver(new_driver) -> Driver:
    return new_driver()


def simulated(driver: Driver) -> bool:
    return SIMULATED in driver.capabilities


def needs_processes(driver: Driver) -> None:
    if simulated(driver):
        pytest.skip("a simulated driver runs no processes")


# ---------------------------------------------------------------- replicas


def make_replica(name: Optional[str] = None, *, run: str = "", setup: str = "", envs: Optional[Dict[str, str]] = None,
                 job_name: str = "job", rank: int = 0, replicas: int = 1, cpus: float = 1.0,
                 uid: Optional[str] = None) -> pb.Replica:
    replica = pb.Replica()
    replica.metadata.name = name or f"r-{uuid.uuid4().hex[:8]}"
    replica.metadata.namespace = NAMESPACE
    replica.metadata.uid = uid or uuid.uuid4().hex
    replica.spec.job_name = job_name
    replica.spec.rank = rank
    template = replica.spec.template
    template.run = run
    template.setup = setup
    template.replicas = replicas
    template.envs.update(envs or {})
    template.resources.update({"cpus": cpus, "memory": 100})
    return replica


def finite(exit_code: int = 0, output: str = "hello-output", **kwargs) -> pb.Replica:
    """Prints `output` and exits with `exit_code` (the sim: after 0.2 s)."""
    envs = {"SIM_DURATION": "0.2", "SIM_EXIT_CODE": str(exit_code)}
    return make_replica(run=f"echo {output}; exit {exit_code}", envs=envs, **kwargs)


def forever(run: str = "sleep 300", **kwargs) -> pb.Replica:
    """Runs until stopped."""
    return make_replica(run=run, **kwargs)


def until_released(exit_code: int = 0, **kwargs) -> pb.Replica:
    """Prints "first", waits for the test's release(), prints "second", exits with `exit_code`
    (the sim: runs 1 s)."""
    envs = {"SIM_DURATION": "1.0", "SIM_EXIT_CODE": str(exit_code)}
    run = f"echo first; {WAIT_FOR_RELEASE}; echo second; exit {exit_code}"
    return make_replica(run=run, envs=envs, **kwargs)


async def release(driver: Driver, handle: str) -> None:
    if EXEC in driver.capabilities:
        exit_code, output = await driver.exec(handle, ["touch", "release"])
        assert exit_code == 0, output


async def wait_finished(driver: Driver, handle: str, timeout: float = 10.0) -> ReplicaState:
    async def finished():
        state = await driver.status(handle)
        return state if state.finished else None

    return await async_wait_for(finished, timeout=timeout, message=f"{handle} to finish")


async def read_logs(driver: Driver, handle: str) -> bytes:
    return b"".join([chunk async for chunk in driver.logs(handle)])


async def wait_for_output(driver: Driver, handle: str, pattern: bytes, timeout: float = 10.0) -> re.Match:
    async def found():
        return re.search(pattern, await read_logs(driver, handle))

    return await async_wait_for(found, timeout=timeout, message=f"{pattern!r} in the logs of {handle}")


async def next_change(stream, handle: str, timeout: float = 10.0) -> ReplicaState:
    while True:
        changed, state = await asyncio.wait_for(stream.__anext__(), timeout)
        if changed == handle:
            return state


def process_alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie has ended: it only waits for its parent to reap it)."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


# ---------------------------------------------------------------- resources


async def test_capacity_and_allocatable_shape(driver):
    capacity = await driver.capacity()
    assert capacity and all(isinstance(node, str) and node for node in capacity)
    for resources in capacity.values():
        assert all(isinstance(name, str) and isinstance(amount, float) for name, amount in resources.items())
        assert resources["cpus"] > 0 and resources["memory"] > 0
    assert await driver.allocatable() == capacity  # nothing runs yet
    assert LOGS in driver.capabilities


async def test_allocatable_accounts_running_replicas(driver):
    capacity = await driver.capacity()
    handle = await driver.start(forever(cpus=1))
    node = (await driver.status(handle)).node
    assert node in capacity
    allocatable = await driver.allocatable()
    assert allocatable[node]["cpus"] == capacity[node]["cpus"] - 1
    assert allocatable[node]["memory"] == capacity[node]["memory"] - 100
    await driver.stop(handle)
    assert await driver.allocatable() == capacity


# ---------------------------------------------------------------- running to the end


async def test_success_goes_running_then_succeeded(driver):
    stream = driver.watch_status()
    handle = await driver.start(finite(exit_code=0))
    running = await next_change(stream, handle)
    assert running.phase == Phase.RUNNING and running.exit_code is None
    done = await next_change(stream, handle)
    assert done.phase == Phase.SUCCEEDED and done.exit_code == 0
    state = await driver.status(handle)
    assert state.phase == Phase.SUCCEEDED and state.exit_code == 0
    assert state.start_time <= state.finish_time
    assert state.node in await driver.capacity()
    await stream.aclose()


async def test_failure_reports_the_exact_exit_code(driver):
    handle = await driver.start(finite(exit_code=3))
    state = await wait_finished(driver, handle)
    assert state.phase == Phase.FAILED and state.exit_code == 3


async def test_setup_runs_before_run_and_its_failure_skips_run(driver):
    needs_processes(driver)
    handle = await driver.start(make_replica(setup="echo prepared > setup-done", run="cat setup-done"))
    assert (await wait_finished(driver, handle)).exit_code == 0
    assert b"prepared" in await read_logs(driver, handle)

    handle = await driver.start(make_replica(setup="echo setting-up; exit 4", run="echo run-ran"))
    state = await wait_finished(driver, handle)
    assert state.phase == Phase.FAILED and state.exit_code == 4
    logs = await read_logs(driver, handle)
    assert b"setting-up" in logs and b"run-ran" not in logs


# ---------------------------------------------------------------- logs


async def test_logs_hold_the_output_after_the_end(driver):
    handle = await driver.start(finite(exit_code=0, output="hello-output"))
    await wait_finished(driver, handle)
    logs = await read_logs(driver, handle)
    assert (b"simulated" if simulated(driver) else b"hello-output") in logs


async def test_logs_follow_streams_new_output_until_the_end(driver):
    handle = await driver.start(until_released(exit_code=0))
    follow = driver.logs(handle, follow=True)
    received = b""
    first = b"started" if simulated(driver) else b"first"
    while first not in received:
        received += await asyncio.wait_for(follow.__anext__(), 10)
    assert (await driver.status(handle)).phase == Phase.RUNNING  # streamed while it runs
    await release(driver, handle)
    async for chunk in follow:  # ends by itself once the replica has finished
        received += chunk
    assert (b"exited" if simulated(driver) else b"second") in received
    assert (await driver.status(handle)).finished


# ---------------------------------------------------------------- stop


async def test_stop_ends_the_whole_process_group(driver):
    handle = await driver.start(forever(run="sleep 300 & echo child=$!; wait"))
    child = None
    if not simulated(driver):
        child = int((await wait_for_output(driver, handle, rb"child=(\d+)")).group(1))
        assert process_alive(child)
    await driver.stop(handle)
    state = await driver.status(handle)
    assert state.phase == Phase.FAILED and state.exit_code == 143 and state.message
    if child is not None:
        await async_wait_for(lambda: not process_alive(child), timeout=5, message=f"child {child} to end")


async def test_stop_kills_after_the_grace_period(driver):
    needs_processes(driver)
    handle = await driver.start(forever(run="trap '' TERM; sleep 300 & echo child=$!; wait"))
    child = int((await wait_for_output(driver, handle, rb"child=(\d+)")).group(1))
    await driver.stop(handle)
    state = await driver.status(handle)
    assert state.phase == Phase.FAILED and state.exit_code == 137
    await async_wait_for(lambda: not process_alive(child), timeout=5, message=f"child {child} to end")


async def test_stop_is_idempotent(driver):
    handle = await driver.start(forever())
    await driver.stop(handle)
    await driver.stop(handle)
    finished = await driver.start(finite())
    await wait_finished(driver, finished)
    await driver.stop(finished)
    assert (await driver.status(finished)).exit_code == 0
    await driver.stop("default/never-started")


async def test_remove_forgets_the_replica(driver):
    handle = await driver.start(forever())
    await driver.remove(handle)
    with pytest.raises(NotFoundError):
        await driver.status(handle)
    assert handle not in [found for _, found, _ in await driver.adopt()]
    await driver.remove(handle)


async def test_status_of_an_unknown_handle(driver):
    with pytest.raises(NotFoundError):
        await driver.status("default/never-started")
    with pytest.raises(NotFoundError):
        await driver.status("../../etc")


# ---------------------------------------------------------------- never twice


async def test_start_twice_starts_one_copy(driver, new_driver):
    capacity = await driver.capacity()
    replica = forever(run="echo started; sleep 300", cpus=1)
    handles = await asyncio.gather(*(driver.start(replica) for _ in range(3)))
    handles.append(await driver.start(replica))
    handles.append(await new_driver().start(replica))  # another instance on the same state
    assert len(set(handles)) == 1
    handle = handles[0]
    node = (await driver.status(handle)).node
    assert (await driver.allocatable())[node]["cpus"] == capacity[node]["cpus"] - 1
    if not simulated(driver):
        await wait_for_output(driver, handle, b"started")
        await driver.stop(handle)
        assert (await read_logs(driver, handle)).count(b"started") == 1


async def test_a_finished_replica_is_not_run_again(driver):
    replica = finite(exit_code=3, output="ran-once")
    handle = await driver.start(replica)
    await wait_finished(driver, handle)
    assert await driver.start(replica) == handle
    state = await driver.status(handle)
    assert state.phase == Phase.FAILED and state.exit_code == 3
    if not simulated(driver):
        assert (await read_logs(driver, handle)).count(b"ran-once") == 1


async def test_a_new_replica_with_an_old_name_replaces_it(driver):
    handle = await driver.start(forever(name="reused"))
    new_handle = await driver.start(finite(exit_code=0, output="new-one", name="reused"))
    state = await wait_finished(driver, new_handle)
    assert state.exit_code == 0
    if not simulated(driver):
        logs = await read_logs(driver, new_handle)
        assert b"new-one" in logs
    assert [found for _, found, _ in await driver.adopt()] == [new_handle]
    assert handle == new_handle  # same key; the old replica's processes were stopped


async def test_adopt_after_restart_finds_the_running_replica_and_its_exit(driver, new_driver):
    replica = until_released(exit_code=5)
    handle = await driver.start(replica)
    if not simulated(driver):
        await wait_for_output(driver, handle, b"first")
    await driver.close()  # the old skylet is gone; its replica keeps running

    restarted = new_driver()
    stream = restarted.watch_status()
    adopted = {key: (found, state) for key, found, state in await restarted.adopt()}
    key = f"{NAMESPACE}/{replica.metadata.name}"
    assert adopted[key][0] == handle and adopted[key][1].phase == Phase.RUNNING
    assert await restarted.start(replica) == handle  # the new skylet does not start it again
    await release(restarted, handle)
    change = await next_change(stream, handle)
    assert change.phase == Phase.FAILED and change.exit_code == 5
    assert (await restarted.status(handle)).exit_code == 5
    if not simulated(driver):
        assert (await read_logs(restarted, handle)).count(b"first") == 1


# ---------------------------------------------------------------- what the job sees


async def test_job_sees_its_variables(driver, monkeypatch):
    needs_processes(driver)
    monkeypatch.setenv("SKYSHIFT_TOKEN", "secret-of-the-skylet")
    print_env = "env | grep -E '^(SKYSHIFT_|GREETING=)' | sort; pwd"
    replica = make_replica(run=print_env, job_name="train", rank=2, replicas=3, envs={"GREETING": "hi there"})
    handle = await driver.start(replica)
    await wait_finished(driver, handle)
    logs = (await read_logs(driver, handle)).decode()
    lines = set(logs.splitlines())
    assert {"GREETING=hi there", "SKYSHIFT_JOB_NAME=train", f"SKYSHIFT_NAMESPACE={NAMESPACE}",
            "SKYSHIFT_REPLICA_RANK=2", "SKYSHIFT_NUM_REPLICAS=3"} <= lines
    assert "SKYSHIFT_TOKEN" not in logs
    if driver.manager == "local":
        assert "SKYSHIFT_REPLICA_IPS=127.0.0.1,127.0.0.1,127.0.0.1" in lines
        workdir = driver.settings.clusters_dir / driver.cluster_name / "replicas" / NAMESPACE / replica.metadata.name
        assert str(workdir) in lines

    handle = await driver.start(make_replica(run='echo "ips=$SKYSHIFT_REPLICA_IPS"', replicas=2),
                                replica_ips=["10.0.0.1", "10.0.0.2"])
    await wait_finished(driver, handle)
    assert b"ips=10.0.0.1,10.0.0.2" in await read_logs(driver, handle)


async def test_shell_metacharacters_pass_literally(driver, tmp_path):
    needs_processes(driver)
    tricky = {"DOLLAR": "$(touch pwned-env)", "SEMI": "; touch pwned-semi #", "TICKS": "`touch pwned-ticks`",
              "QUOTE": "'\"; rm -rf nothing-here"}
    run = 'printf "%s\\n" "$SKYSHIFT_JOB_NAME" "$DOLLAR" "$SEMI" "$TICKS" "$QUOTE"; ls -A'
    handle = await driver.start(make_replica(run=run, job_name="$(touch pwned-job); rm x", envs=tricky))
    assert (await wait_finished(driver, handle)).exit_code == 0
    logs = (await read_logs(driver, handle)).decode().splitlines()
    assert logs[:5] == ["$(touch pwned-job); rm x", *tricky.values()]
    assert not [line for line in logs if "pwned" in line and line not in logs[:5]]  # ls -A of its directory
    assert not list(tmp_path.rglob("pwned*")) and not list(pathlib.Path.cwd().glob("pwned*"))


async def test_bad_replica_names_are_refused(driver):
    for namespace, name in (("default", "$(touch pwned)"), ("default", "../escape"), ("a;b", "ok")):
        replica = forever()
        replica.metadata.namespace, replica.metadata.name = namespace, name
        with pytest.raises(InvalidError):
            await driver.start(replica)
    assert await driver.adopt() == []


# ---------------------------------------------------------------- exec


async def test_exec_where_supported(driver):
    handle = await driver.start(forever(run=WAIT_FOR_RELEASE))
    if EXEC not in driver.capabilities:
        with pytest.raises(NotSupportedError):
            await driver.exec(handle, ["true"])
        return
    exit_code, output = await driver.exec(handle, ["bash", "-c", 'echo "rank=$SKYSHIFT_REPLICA_RANK"; exit 7'])
    assert (exit_code, output) == (7, b"rank=0\n")
    assert (await driver.exec(handle, ["no-such-command-here"]))[0] == 127
    await release(driver, handle)
    await wait_finished(driver, handle)
    with pytest.raises(PreconditionError):
        await driver.exec(handle, ["true"])
