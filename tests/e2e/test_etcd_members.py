"""The API server on a 3-member etcd keeps working when one member dies."""
import pytest

from skyshift.store.embedded import EmbeddedEtcd, free_port
from skyshift.v1 import objects_pb2 as pb
from tests.conftest import ServerThread, make_settings

pytestmark = pytest.mark.slow


@pytest.fixture
def etcd_cluster(tmp_path):
    names = ["m0", "m1", "m2"]
    peers = {name: free_port() for name in names}
    initial = ",".join(f"{name}=http://127.0.0.1:{port}" for name, port in peers.items())
    members = [EmbeddedEtcd(tmp_path / name, peer_port=peers[name], fast=True, name=name, initial_cluster=initial)
               for name in names]
    try:
        for member in members:
            member.start()
        for member in members:
            member.wait_healthy(10)
        yield members
    finally:
        for member in members:
            member.stop(kill=True)


def _job(name: str) -> pb.Job:
    job = pb.Job()
    job.metadata.name = name
    job.spec.run = "true"
    return job


def test_survives_losing_one_member(etcd_cluster, tmp_path):
    endpoints = ",".join(member.endpoint for member in etcd_cluster)
    server = ServerThread(make_settings(tmp_path / "home", etcd={"request_timeout": 2.0}), endpoints).start()
    try:
        from skyshift.client import Client

        with Client(endpoint=server.endpoint, settings=server.settings) as client:
            client.create(_job("before"))
            etcd_cluster[0].stop(kill=True)
            # Writes are conditional, so a create retried after a failover is still exactly one object.
            created = client.create(_job("after"))
            assert created.metadata.name == "after"
            names = sorted(j.metadata.name for j in client.list("jobs", "default").items)
            assert names == ["after", "before"]
    finally:
        server.stop()
