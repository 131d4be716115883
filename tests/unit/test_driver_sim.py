"""The sim driver (skyshift/drivers/sim.py): its pure helpers, and its accounting of simulated
nodes (files under tmp_path only, no processes)."""

import pytest

from skyshift import config
from skyshift.api.errors import InvalidError, LimitError
from skyshift.drivers.base import Phase
from skyshift.drivers.sim import (
    DEFAULT_NODE_RESOURCES, SimDriver, SimRecord, choose_node, sim_nodes, sim_parameters, sim_state,
)
from skyshift.v1 import objects_pb2 as pb

def sim_cluster(nodes=0, **resources) -> pb.Cluster:
    cluster = pb.Cluster()
    cluster.metadata.name = "sim-unit"
    cluster.spec.manager = "sim"
    cluster.spec.simulation.nodes = nodes
    cluster.spec.simulation.node_resources.update(resources)
    return cluster

def sim_replica(name: str, cpus: float = 1.0, **envs) -> pb.Replica:
    replica = pb.Replica()
    replica.metadata.name = name
    replica.metadata.namespace = "default"
    replica.metadata.uid = name
    replica.spec.job_name = "job"
    replica.spec.template.resources["cpus"] = cpus
    replica.spec.template.envs.update(envs)
    return replica

def test_sim_parameters():
    assert sim_parameters({}) == (None, 0)
    assert sim_parameters({"SIM_DURATION": "2.5", "SIM_EXIT_CODE": "3"}) == (2.5, 3)
    assert sim_parameters({"SIM_DURATION": "", "OTHER": "x"}) == (None, 0)

@pytest.mark.parametrize("envs", [{"SIM_DURATION": "-1"}, {"SIM_DURATION": "nan"}, {"SIM_DURATION": "inf"},
                                  {"SIM_DURATION": "soon"}, {"SIM_EXIT_CODE": "256"}, {"SIM_EXIT_CODE": "x"}])
def test_sim_parameters_refuse_nonsense(envs):
    with pytest.raises(InvalidError):
        sim_parameters(envs)

def test_sim_nodes():
    assert sim_nodes(sim_cluster()) == {"node-0": DEFAULT_NODE_RESOURCES}
    assert sim_nodes(sim_cluster(3, cpus=2)) == {f"node-{i}": {"cpus": 2.0} for i in range(3)}

def test_choose_node():
    free = {"node-0": {"cpus": 1.0}, "node-1": {"cpus": 4.0, "V100": 1.0}}
    assert choose_node("", {"cpus": 1.0}, free) == "node-0"
    assert choose_node("", {"cpus": 2.0}, free) == "node-1"
    assert choose_node("", {"V100": 1.0, "gpus": 0.0}, free) == "node-1"  # zero amounts need nothing
    assert choose_node("node-1", {"cpus": 1.0}, free) == "node-1"
    with pytest.raises(LimitError):
        choose_node("", {"cpus": 8.0}, free)
    with pytest.raises(LimitError):
        choose_node("node-0", {"cpus": 2.0}, free)
    with pytest.raises(InvalidError):
        choose_node("node-9", {"cpus": 1.0}, free)

def test_sim_state_over_time():
    record = SimRecord(key="d/r", uid="u", node="node-0", resources={}, ports=[80], start_time=100.0,
                       duration=10.0, exit_code=3)
    running = sim_state(record, 105.0)
    assert running.phase == Phase.RUNNING and running.endpoints[0].port == 80
    assert "simulated" in running.message
    done = sim_state(record, 110.0)
    assert (done.phase, done.exit_code, done.finish_time) == (Phase.FAILED, 3, 110.0)
    record.stop_time = 120.0  # stopped after it had ended: it ended by itself
    assert sim_state(record, 130.0).exit_code == 3
    record.stop_time = 104.0
    stopped = sim_state(record, 130.0)
    assert (stopped.exit_code, stopped.finish_time) == (143, 104.0)
    forever = SimRecord(key="d/r", uid="u", node="n", resources={}, ports=[], start_time=0.0)
    assert sim_state(forever, 1e12).phase == Phase.RUNNING

async def test_sim_accounts_its_nodes(tmp_path):
    driver = SimDriver(sim_cluster(2, cpus=2, memory=1000), config.load(tmp_path, env={}))
    handles = [await driver.start(sim_replica(f"r-{i}", cpus=1.5)) for i in range(2)]
    assert {(await driver.status(handle)).node for handle in handles} == {"node-0", "node-1"}
    assert await driver.allocatable() == {node: {"cpus": 0.5, "memory": 1000.0} for node in ("node-0", "node-1")}
    with pytest.raises(LimitError):
        await driver.start(sim_replica("r-2", cpus=1.0))
    await driver.stop(handles[0])
    assert (await driver.status(await driver.start(sim_replica("r-2", cpus=1.0)))).node == "node-0"
    await driver.close()

async def test_sim_reports_each_change_once(tmp_path):
    driver = SimDriver(sim_cluster(), config.load(tmp_path, env={}))
    stream = driver.watch_status()
    handle = await driver.start(sim_replica("r-0"))
    await driver.start(sim_replica("r-0"))
    await driver.stop(handle)
    await driver.stop(handle)
    await driver.close()  # ends the stream
    assert [(found, state.phase, state.exit_code) async for found, state in stream] == [
        (handle, Phase.RUNNING, None), (handle, Phase.FAILED, 143)]
