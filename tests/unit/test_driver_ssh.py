"""The ssh driver's pure parts: reading a Cluster's hosts and user map, handles, and the
quoting and parsing of the programs it runs on hosts (skyshift/drivers/ssh_remote.py)."""
from __future__ import annotations

import io
import shlex
import tarfile

import pytest

from skyshift import config
from skyshift.api.errors import InvalidError, NotFoundError
from skyshift.drivers import ssh_remote as remote
from skyshift.drivers.ssh import USER_LABEL, SSHDriver, cluster_hosts, make_handle, parse_handle, parse_user_map
from skyshift.v1 import objects_pb2 as pb


def cluster(*hosts, **access) -> pb.Cluster:
    made = pb.Cluster()
    made.metadata.name = "onprem"
    made.spec.manager = "ssh"
    for host, port, username in hosts:
        entry = made.spec.hosts.add()
        entry.host, entry.port, entry.username = host, port, username
    made.spec.access_config.update(access)
    return made


def test_hosts_from_spec_with_defaults_from_access_config():
    hosts = cluster_hosts(cluster(("10.0.0.1", 0, ""), ("gpu-2.lab", 2222, "ops"),
                                  username="admin", ssh_key_path="~/.ssh/id_lab"))
    assert [(h.node, h.host, h.port, h.username) for h in hosts] == [
        ("10.0.0.1", "10.0.0.1", 22, "admin"), ("gpu-2.lab", "gpu-2.lab", 2222, "ops")]
    assert hosts[0].key_path.endswith("/.ssh/id_lab") and not hosts[0].key_path.startswith("~")


def test_hosts_from_the_original_access_config_format():
    host, = cluster_hosts(cluster(host="192.168.1.5", username="me", ssh_key_path="/keys/k", port="2200"))
    assert (host.node, host.port, host.username, host.key_path) == ("192.168.1.5", 2200, "me", "/keys/k")


def test_hosts_sharing_an_address_are_named_by_port():
    hosts = cluster_hosts(cluster(("127.0.0.1", 2201, "u"), ("127.0.0.1", 2202, "u")))
    assert [h.node for h in hosts] == ["127.0.0.1:2201", "127.0.0.1:2202"]


@pytest.mark.parametrize("made, field", [
    (cluster(), "spec.hosts"),
    (cluster(("../etc", 22, "u")), "spec.hosts[0].host"),
    (cluster(("h; rm -rf /", 22, "u")), "spec.hosts[0].host"),
    (cluster(("h", 70000, "u")), "spec.hosts[0].port"),
    (cluster(("h", 22, "")), "spec.hosts[0].username"),
    (cluster(("h", 22, "$(id)")), "spec.hosts[0].username"),
    (cluster(("h", 22, "u"), ("h", 22, "u")), "spec.hosts"),
    (cluster(host="h", username="u", port="ssh"), "spec.access_config.port"),
])
def test_bad_hosts_are_refused_with_the_field(made, field):
    with pytest.raises(InvalidError) as raised:
        cluster_hosts(made)
    assert field in str(raised.value)


def test_user_map():
    assert parse_user_map(" alice = skyshift-t1, bob=skyshift-t2 ,") == {"alice": "skyshift-t1", "bob": "skyshift-t2"}
    assert parse_user_map("") == {}
    for bad in ("alice", "=acct", "alice=Root;id", "alice="):
        with pytest.raises(InvalidError):
            parse_user_map(bad)


async def test_accounts_follow_the_label_and_the_map(tmp_path):
    made = cluster(("h1", 22, "admin"), user_map="alice=u-alice,bob=u-bob")
    driver = SSHDriver(made, config.load(tmp_path, env={}))
    replica = pb.Replica()
    assert driver.account_for(replica, "h1") == ("", "admin")
    replica.metadata.labels[USER_LABEL] = "bob"
    assert driver.account_for(replica, "h1") == ("bob", "u-bob")
    replica.metadata.labels.clear()
    replica.metadata.annotations[USER_LABEL] = "alice"
    assert driver.account_for(replica, "h1") == ("alice", "u-alice")
    replica.metadata.annotations[USER_LABEL] = "mallory"
    with pytest.raises(InvalidError, match="mallory"):
        driver.account_for(replica, "h1")
    assert driver.accounts("h1") == ["admin", "u-alice", "u-bob"]
    await driver.close()


async def test_handles_of_other_accounts_or_nodes_are_unknown(tmp_path):
    driver = SSHDriver(cluster(("h1", 22, "admin"), user_map="alice=u-alice"), config.load(tmp_path, env={}))
    for handle in ("root@h1/default/web-0", "admin@h2/default/web-0"):
        with pytest.raises(NotFoundError):
            await driver.status(handle)
        await driver.stop(handle)  # nothing to stop
    await driver.close()


def test_handles_round_trip_and_reject_anything_else():
    handle = make_handle("skyshift-t1", "127.0.0.1:2201", "default/web-0")
    assert handle == "skyshift-t1@127.0.0.1:2201/default/web-0"
    assert parse_handle(handle) == ("skyshift-t1", "127.0.0.1:2201", "default/web-0")
    for bad in ("default/web-0", "u@h/default", "u@h/a/b/c", "$(id)@h/a/b", "u@../a/b", "u@h/../b", "u@h/a/..",
                "u@h/A/b", ""):
        with pytest.raises(NotFoundError):
            parse_handle(bad)


def test_commands_pass_every_argument_literally():
    tricky = ["$(touch x)", "a b", "'quoted'", "semi;colon", "new\nline", ""]
    line = remote.command(remote.STATUS, *tricky)
    assert shlex.split(line) == ["bash", "-c", remote.STATUS, "skyshift-ssh", *tricky]


def test_env_script_quotes_values():
    script = remote.env_script({"B": "it's $(id)", "A": "x\ny"})
    assert script.splitlines()[0] == "export A='x"
    assert "export B='it'\"'\"'s $(id)'" in script


def test_start_payload_holds_the_replica_files():
    payload = remote.start_payload("echo setup", "echo run", {"X": "1"}, b'{"key": "default/r"}')
    with tarfile.open(fileobj=io.BytesIO(payload)) as archive:
        contents = {member.name: (archive.extractfile(member).read(), member.mode) for member in archive}
    assert contents == {"setup.sh": (b"echo setup", 0o600), "run.sh": (b"echo run", 0o600),
                        "env.sh": (b"export X=1\n", 0o600), "state.json.new": (b'{"key": "default/r"}', 0o600)}


def test_parse_status():
    output = ("R\tdefault/a\t-\t-\t1\t0\t{\"key\": \"default/a\"}\n"
              "R\tdefault/b\t3\n"  # cut short: ignored
              "R\tdefault/c\t137\t1700000000.5\t0\t1\t{\"key\": \"default/c\", \"x\": \"t\\tab\"}\n"
              "M\tdefault/gone\n")
    running, stopped = remote.parse_status(output)
    assert (running.key, running.exit_code, running.finish_time, running.alive, running.stopped) == (
        "default/a", None, None, True, False)
    assert (stopped.exit_code, stopped.finish_time, stopped.alive, stopped.stopped) == (137, 1700000000.5, False, True)
    assert stopped.record_json == '{"key": "default/c", "x": "t\\tab"}'
    assert remote.missing_keys(output) == ["default/gone"]


def test_parse_capacity():
    output = ("cpus\t8\ndisk_kib\t10485760\nMemTotal:       16384000 kB\n"
              "gpu\tNVIDIA A100-SXM4-40GB\ngpu\tNVIDIA A100-SXM4-40GB\n")
    assert remote.parse_capacity(output) == {"cpus": 8.0, "disk": 10240.0, "memory": 16000.0, "gpus": 2.0,
                                             "A100": 2.0}
    with pytest.raises(ValueError):
        remote.parse_capacity("disk_kib\t1\n")


def test_polls_cover_the_time():
    assert remote.polls(1.0, 0.01) == 100
    assert remote.polls(0.015, 0.01) == 2
    assert remote.polls(0, 0.01) == 1
