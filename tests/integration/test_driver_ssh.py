"""The ssh driver against real sshd servers on loopback (tests/sshd.py), beyond the contract
suite (test_driver_contract.py runs that on ssh too): detached replicas, adoption by a new
driver, one account per user, pooled and re-established connections, host keys.

The fake hosts share this machine's filesystem and process table, so the tests look at the
replicas' files and processes directly to check what the driver claims.
"""
from __future__ import annotations

import asyncio
import pathlib
import pwd
import re
import subprocess
import sys
from typing import List, Optional

import pytest

from skyshift.api.errors import InvalidError, UnavailableError
from skyshift.drivers.base import Driver, Phase
from skyshift.drivers.ssh import USER_LABEL, SSHDriver
from skyshift.v1 import objects_pb2 as pb
from tests.conftest import async_wait_for, make_settings
from tests.integration.test_driver_contract import make_replica, process_alive, wait_for_output
from tests.sshd import TEST_USERS, descendants, remove_remote_state, ssh_cluster_spec

ALICE_ACCOUNT, BOB_ACCOUNT = TEST_USERS
FAST = {
    "drivers": {"stop_grace_period": 1.0, "stop_poll_interval": 0.01, "poll_interval": 0.1,
                "log_follow_interval": 0.02},
    "ssh": {"connect_timeout": 2.0, "command_timeout": 5.0, "retry_backoff_initial": 0.1,
            "retry_backoff_max": 1.0},
}


@pytest.fixture
async def new_driver(tmp_path):
    """Makes driver instances (on one SkyShift home, as successive skylets would); stops every
    replica they started at the end."""
    drivers: List[SSHDriver] = []

    def make(cluster: pb.Cluster, **ssh_settings) -> SSHDriver:
        overrides = {"drivers": dict(FAST["drivers"]), "ssh": {**FAST["ssh"], **ssh_settings}}
        drivers.append(SSHDriver(cluster, make_settings(tmp_path / "home", **overrides)))
        return drivers[-1]

    yield make
    clusters = {driver.cluster_name: driver.cluster for driver in drivers}
    for driver in drivers:
        await driver.close()
    for cluster in clusters.values():
        cleaner = SSHDriver(cluster, make_settings(tmp_path / "home", **FAST))
        try:
            await cleaner.stop_all()
        except UnavailableError:
            pass  # a host the test made unreachable
        finally:
            await cleaner.close()


def replica(user: Optional[str] = None, node: str = "", run: str = "sleep 300", **kwargs) -> pb.Replica:
    made = make_replica(run=run, **kwargs)
    if user:
        made.metadata.labels[USER_LABEL] = user
    made.spec.node = node
    return made


def meta_dir(driver: SSHDriver, handle: str) -> pathlib.Path:
    """The replica's files on its host, seen from this machine."""
    account, rest = handle.split("@", 1)
    node, key = rest.split("/", 1)
    home = pathlib.Path(pwd.getpwnam(account).pw_dir)
    return home / driver.settings.ssh.remote_dir / driver.cluster_name / node / key / ".skyshift"


def wrapper_pid(driver: SSHDriver, handle: str) -> int:
    return int((meta_dir(driver, handle) / "pid").read_text())


def process_uid(pid: int) -> int:
    status = pathlib.Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^Uid:\s+(\d+)", status, re.MULTILINE).group(1))


def accepted_logins(server, account: str) -> int:
    """Logins sshd accepted for `account` so far (its log is the server's own record)."""
    return server.log_path.read_text().count(f"Accepted publickey for {account} ")


async def running(driver: Driver, handle: str) -> bool:
    return (await driver.status(handle)).phase == Phase.RUNNING


def test_paramiko_loads_only_when_a_connection_opens():
    check = ("import sys, skyshift.drivers, skyshift.drivers.ssh; "
             "sys.exit('paramiko imported' if 'paramiko' in sys.modules else 0)")
    subprocess.run([sys.executable, "-c", check], check=True, timeout=60)


# ---------------------------------------------------------------- detached replicas


async def test_replica_outlives_the_driver_and_is_adopted_by_a_new_one(new_driver, ssh_cluster, ssh_hosts):
    first = new_driver(ssh_cluster)
    handle = await first.start(replica(run="echo started; sleep 300"))
    await wait_for_output(first, handle, b"started")
    pid = wrapper_pid(first, handle)
    await first.close()

    # Every SSH session of the driver has ended on the hosts; the replica has not.
    await async_wait_for(lambda: not any(descendants(server.pid) for server in ssh_hosts), timeout=10,
                         message="the driver's sshd sessions to end")
    assert process_alive(pid)

    second = new_driver(ssh_cluster)
    adopted = {found: state for _, found, state in await second.adopt()}
    assert adopted[handle].phase == Phase.RUNNING
    await second.stop(handle)
    state = await second.status(handle)
    assert (state.phase, state.exit_code) == (Phase.FAILED, 143)
    await async_wait_for(lambda: not process_alive(pid), timeout=5, message="the replica to end")


# ---------------------------------------------------------------- one account per user


async def test_each_user_runs_as_their_mapped_account(new_driver, ssh_cluster):
    driver = new_driver(ssh_cluster)
    run = "id -un; sleep 300"
    handles = {user: await driver.start(replica(user=user, run=run)) for user in ("alice", "bob", None)}
    expected = {"alice": ALICE_ACCOUNT, "bob": BOB_ACCOUNT, None: ALICE_ACCOUNT}  # None: the hosts' username
    for user, handle in handles.items():
        account = expected[user]
        assert handle.startswith(f"{account}@")
        await wait_for_output(driver, handle, f"^{account}$".encode(), timeout=10)
        assert process_uid(wrapper_pid(driver, handle)) == pwd.getpwnam(account).pw_uid
        # Its state lives in that account's own home.
        assert meta_dir(driver, handle).is_relative_to(pwd.getpwnam(account).pw_dir)


async def test_a_user_without_an_account_is_refused(new_driver, ssh_cluster):
    driver = new_driver(ssh_cluster)
    with pytest.raises(InvalidError, match="carol"):
        await driver.start(replica(user="carol"))
    assert await driver.adopt() == []


async def test_without_a_user_map_everyone_runs_as_the_cluster_user(new_driver, ssh_hosts, ssh_client_key):
    cluster = ssh_cluster_spec(f"ssh-nomap-{ssh_hosts[0].port}", ssh_hosts, ssh_client_key, username=BOB_ACCOUNT)
    try:
        driver = new_driver(cluster)
        handle = await driver.start(replica(user="carol", run="id -un"))
        assert handle.startswith(f"{BOB_ACCOUNT}@")
        await wait_for_output(driver, handle, f"^{BOB_ACCOUNT}$".encode())
    finally:
        remove_remote_state(cluster.metadata.name)


async def test_stopping_one_users_replicas_leaves_the_others_running(new_driver, ssh_cluster, ssh_hosts):
    driver = new_driver(ssh_cluster)
    node = ssh_hosts[0].address
    alice = await driver.start(replica(user="alice", node=node, run="echo up; sleep 300"))
    bob = await driver.start(replica(user="bob", node=node, run="echo up; sleep 300"))
    other_bob = await driver.start(replica(user="bob", node=ssh_hosts[1].address, run="echo up; sleep 300"))
    for handle in (alice, bob, other_bob):
        await wait_for_output(driver, handle, b"up")
    alice_pid = wrapper_pid(driver, alice)

    await driver.stop(bob)
    assert (await driver.status(bob)).phase == Phase.FAILED
    assert await running(driver, alice) and process_alive(alice_pid)

    assert await driver.stop_all(user="bob") == [other_bob]  # bob's queue only
    assert (await driver.status(other_bob)).phase == Phase.FAILED
    assert await running(driver, alice) and process_alive(alice_pid)

    assert await driver.stop_all() == [alice]
    await async_wait_for(lambda: not process_alive(alice_pid), timeout=5, message="alice's replica to end")


async def test_a_user_cannot_look_into_another_users_replicas(new_driver, ssh_cluster):
    driver = new_driver(ssh_cluster)
    alice = await driver.start(replica(user="alice", run="echo alice-secret > notes; sleep 300"))
    bob = await driver.start(replica(user="bob"))
    await async_wait_for(lambda: (meta_dir(driver, alice).parent / "notes").exists(), timeout=10,
                         message="alice's file")
    alice_dir = meta_dir(driver, alice).parent
    for command in (["cat", str(alice_dir / "notes")], ["ls", str(alice_dir)],
                    ["cat", str(alice_dir / ".skyshift" / "env.sh")]):
        exit_code, output = await driver.exec(bob, command)
        assert exit_code != 0 and b"alice-secret" not in output, (command, output)
        assert b"Permission denied" in output
    assert (await driver.exec(alice, ["cat", "notes"])) == (0, b"alice-secret\n")


# ---------------------------------------------------------------- connections


async def test_connections_are_pooled_and_reestablished(new_driver, ssh_cluster, ssh_hosts):
    driver = new_driver(ssh_cluster)
    before = [accepted_logins(server, ALICE_ACCOUNT) for server in ssh_hosts]
    for _ in range(5):
        assert set(await driver.capacity()) == {server.address for server in ssh_hosts}
    logins = [accepted_logins(server, ALICE_ACCOUNT) - old for server, old in zip(ssh_hosts, before)]
    assert logins == [1, 1]  # one connection per host, reused

    # The hosts drop every connection (the listeners stay): the next call reconnects at once.
    for server in ssh_hosts:
        server.drop_connections()
    await async_wait_for(lambda: not any(descendants(server.pid) for server in ssh_hosts), timeout=5,
                         message="the sessions to end")
    assert set(await driver.capacity()) == {server.address for server in ssh_hosts}
    logins = [accepted_logins(server, ALICE_ACCOUNT) - old for server, old in zip(ssh_hosts, before)]
    assert logins == [2, 2]


async def test_many_concurrent_calls_share_a_bounded_pool(new_driver, ssh_cluster, ssh_hosts):
    driver = new_driver(ssh_cluster, pool_size=2, channels_per_connection=2)
    node = ssh_hosts[0].address
    before = accepted_logins(ssh_hosts[0], ALICE_ACCOUNT)
    replicas = [replica(node=node, run="echo ran") for _ in range(12)]
    handles = await asyncio.gather(*(driver.start(made) for made in replicas))
    states = await asyncio.gather(*(driver.status(handle) for handle in handles))
    assert all(state.phase in (Phase.RUNNING, Phase.SUCCEEDED) for state in states)
    for handle in handles:
        await wait_for_output(driver, handle, b"ran")
    assert accepted_logins(ssh_hosts[0], ALICE_ACCOUNT) - before <= 2


async def test_a_changed_host_key_is_refused(new_driver, start_ssh_hosts, ssh_client_key):
    server, = start_ssh_hosts(1)
    cluster = ssh_cluster_spec(f"ssh-key-{server.port}", [server], ssh_client_key)
    try:
        driver = new_driver(cluster)
        assert list(await driver.capacity()) == [server.address]  # first contact: key learned
        await driver.close()

        server.stop()
        server.host_key.unlink()
        server.host_key.with_name(server.host_key.name + ".pub").unlink()
        server.start(same_port=True)  # same address, another key: not the host we knew
        capacity, errors = await new_driver(cluster).probe()
        assert capacity == {}
        assert "key" in errors[server.address].lower()
    finally:
        remove_remote_state(cluster.metadata.name)
