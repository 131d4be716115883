"""An ssh cluster losing a host: the host's replicas go UNKNOWN and it leaves the capacity,
within the timeouts of the settings, while the other host keeps working; when the host comes
back its replicas (which kept running) are seen RUNNING again.

Two ways to lose a host: its sshd and sessions are killed (connections refused at once), or it
is frozen with SIGSTOP (it accepts TCP connections but never answers: only timeouts notice).
"""
from __future__ import annotations

import time
import uuid

import pytest

from skyshift.drivers.base import Phase
from skyshift.drivers.ssh import SSHDriver
from tests.conftest import make_settings
from tests.integration.test_driver_contract import make_replica, next_change, wait_finished, wait_for_output
from tests.sshd import remove_remote_state, ssh_client_key, ssh_cluster_spec, start_ssh_hosts  # noqa: F401

pytestmark = pytest.mark.slow

CONNECT_TIMEOUT = 1.0
COMMAND_TIMEOUT = 2.0
#: What may pass before a lost host is noticed: a poll, then a refresh that waits out both timeouts.
NOTICE_WITHIN = 0.1 + CONNECT_TIMEOUT + COMMAND_TIMEOUT + 2.0


@pytest.fixture
async def two_host_cluster(start_ssh_hosts, ssh_client_key, tmp_path):  # noqa: F811
    lost, healthy = start_ssh_hosts(2)
    cluster = ssh_cluster_spec(f"ssh-e2e-{uuid.uuid4().hex[:8]}", [lost, healthy], ssh_client_key)
    settings = make_settings(
        tmp_path / "home",
        drivers={"stop_grace_period": 1.0, "stop_poll_interval": 0.01, "poll_interval": 0.1},
        ssh={"connect_timeout": CONNECT_TIMEOUT, "command_timeout": COMMAND_TIMEOUT,
             "retry_backoff_initial": 0.2, "retry_backoff_max": 1.0, "keepalive_interval": 1.0})
    driver = SSHDriver(cluster, settings)
    try:
        yield driver, lost, healthy
    finally:
        lost.stop()  # thaws a frozen one first
        await driver.close()
        remove_remote_state(cluster.metadata.name)


def on(node: str, run: str = "echo up; sleep 300"):
    replica = make_replica(run=run)
    replica.spec.node = node
    return replica


async def timed(awaitable):
    began = time.monotonic()
    result = await awaitable
    return result, time.monotonic() - began


@pytest.mark.parametrize("how", ["killed", "frozen"])
async def test_a_lost_host_goes_unknown_while_the_other_keeps_working(two_host_cluster, how):
    driver, lost, healthy = two_host_cluster
    stream = driver.watch_status()
    on_lost = await driver.start(on(lost.address))
    on_healthy = await driver.start(on(healthy.address))
    for handle in (on_lost, on_healthy):
        await wait_for_output(driver, handle, b"up")
        assert (await next_change(stream, handle)).phase == Phase.RUNNING

    if how == "killed":
        lost.kill()
    else:
        lost.freeze()

    change, took = await timed(next_change(stream, on_lost, timeout=NOTICE_WITHIN))
    assert change.phase == Phase.UNKNOWN and "unreachable" in change.message, change
    capacity, took = await timed(driver.capacity())
    assert set(capacity) == {healthy.address}
    assert took < CONNECT_TIMEOUT + COMMAND_TIMEOUT + 1.0

    # The healthy host answers as fast as ever, and takes new work.
    state, took = await timed(driver.status(on_healthy))
    assert state.phase == Phase.RUNNING and took < 1.0
    extra = await driver.start(on(healthy.address, run="echo extra"))
    assert (await wait_finished(driver, extra, timeout=5)).exit_code == 0
    state, took = await timed(driver.status(on_lost))
    assert state.phase == Phase.UNKNOWN and took < CONNECT_TIMEOUT + COMMAND_TIMEOUT + 1.0

    # The host comes back: its replica never stopped running.
    if how == "killed":
        lost.start(same_port=True)
    else:
        lost.thaw()
    change = await next_change(stream, on_lost, timeout=10)
    assert change.phase == Phase.RUNNING
    assert set(await driver.capacity()) == {lost.address, healthy.address}
    await driver.stop_all()
    await stream.aclose()
