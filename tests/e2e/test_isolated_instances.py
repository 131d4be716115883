"""Two SkyShift instances side by side (different SKYSHIFT_HOME, each with its own embedded etcd)
share no file, no port and no object."""
from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
from typing import Dict, List, Set

import pytest

from skyshift import config, processes
from skyshift.client import Client
from skyshift.store.embedded import etcd_binary
from skyshift.v1 import objects_pb2 as pb
from tests.conftest import wait_for
from tests.e2e.control_plane import ROOT, environment

pytestmark = pytest.mark.slow

ETCD_BINARY = str(etcd_binary())
#: Files every process may hold open that belong to no instance.
SYSTEM_PREFIXES = ("/dev/", "/proc/", "/sys/")


def start_instance(home: pathlib.Path, *args: str) -> subprocess.Popen:
    (home / "logs").mkdir(parents=True)
    with open(home / "logs" / "launch_server.test.log", "ab") as log:
        return subprocess.Popen([sys.executable, "launch_server.py", "--home", str(home), *args], cwd=ROOT,
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=environment(home))


def process_tree(pid: int) -> List[int]:
    """`pid` and its descendants (the embedded etcd is a child of launch_server.py)."""
    children: Dict[int, List[int]] = {}
    for entry in pathlib.Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            except (FileNotFoundError, ProcessLookupError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    tree, pending = [], [pid]
    while pending:
        current = pending.pop()
        tree.append(current)
        pending.extend(children.get(current, ()))
    return tree


def open_targets(pids: List[int]) -> Set[str]:
    targets = set()
    for pid in pids:
        for fd in pathlib.Path(f"/proc/{pid}/fd").iterdir():
            try:
                targets.add(os.readlink(fd))
            except FileNotFoundError:
                continue
    return targets


def listening_ports(socket_inodes: Set[str]) -> Set[int]:
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in pathlib.Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in socket_inodes:  # LISTEN
                ports.add(int(fields[1].rpartition(":")[2], 16))
    return ports


def footprint(pid: int):
    """(open files, listening ports) of an instance's processes."""
    targets = open_targets(process_tree(pid))
    files = {t for t in targets if t.startswith("/") and not t.startswith(SYSTEM_PREFIXES)}
    inodes = {t[len("socket:["):-1] for t in targets if t.startswith("socket:[")}
    return files, listening_ports(inodes)


def test_two_instances_share_no_file_port_or_object(tmp_path):
    homes = [tmp_path / "one", tmp_path / "two"]
    servers = [start_instance(home) for home in homes]
    trees: List[List[int]] = []
    try:
        settings = [config.load(home, env={}) for home in homes]
        for server, setting in zip(servers, settings):
            wait_for(lambda: server.poll() is not None or setting.api_endpoint_file.exists(), timeout=60,
                     message="the API server's endpoint file")
            assert server.poll() is None, "launch_server.py exited"
        endpoints = [s.api_endpoint_file.read_text().strip() for s in settings]
        etcds = [(home / "etcd" / "endpoint").read_text().strip() for home in homes]
        assert endpoints[0] != endpoints[1] and etcds[0] != etcds[1]

        trees.extend(process_tree(server.pid) for server in servers)
        assert all(len(tree) >= 2 for tree in trees), "each launch_server.py runs its own etcd"
        (files_one, ports_one), (files_two, ports_two) = footprint(servers[0].pid), footprint(servers[1].pid)
        assert not files_one & files_two, f"shared files: {files_one & files_two}"
        for files, home in ((files_one, homes[0]), (files_two, homes[1])):
            outside = {f for f in files if not f.startswith(f"{home}/")}
            assert not outside, f"files outside {home}: {outside}"
        assert ports_one and ports_two and not ports_one & ports_two
        for endpoint, ports in zip(endpoints + etcds, (ports_one, ports_two, ports_one, ports_two)):
            assert int(endpoint.rpartition(":")[2]) in ports

        clients = [Client(endpoint=e, settings=s) for e, s in zip(endpoints, settings)]
        try:
            namespace = pb.Namespace(metadata=pb.ObjectMeta(name="only-in-one"))
            clients[0].create(namespace)
            assert "only-in-one" in {n.metadata.name for n in clients[0].list("namespaces").items}
            assert "only-in-one" not in {n.metadata.name for n in clients[1].list("namespaces").items}
            clients[1].create(namespace)  # the same name is free in the other instance
        finally:
            for client in clients:
                client.close()
    finally:
        for server in servers:
            if server.poll() is None:
                os.kill(server.pid, signal.SIGTERM)
        for server in servers:
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(10)
        for pid in (pid for tree in trees for pid in tree[1:]):
            if processes.command_line(pid)[:1] == [ETCD_BINARY]:
                os.kill(pid, signal.SIGKILL)  # an etcd its server did not stop (only if that failed)
    for server, setting, home in zip(servers, settings, homes):
        assert server.returncode == 0
        assert not setting.api_endpoint_file.exists() and not (home / "etcd" / "endpoint").exists()
