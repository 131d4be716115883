"""The system identities: a skylet touches only its cluster and the replicas bound to it; the
manager may issue skylet tokens but not touch other users or access rules."""
from __future__ import annotations

import asyncio

import pytest

from skyshift import tokens
from skyshift.api.errors import PermissionDeniedError
from skyshift.client import AsyncClient
from skyshift.v1 import objects_pb2 as pb

from tests.conftest import wait_for
from tests.integration.api_helpers import names
from tests.integration.auth_helpers import (admin_token, auth_server, client_for, issue_token, new_namespace,
                                            new_user, unique)


@pytest.fixture(scope="module")
def server(etcd, tmp_path_factory):
    with auth_server(etcd, tmp_path_factory.mktemp("system-home")) as running:
        yield running


@pytest.fixture(scope="module")
def admin(server):
    with client_for(server, admin_token(server)) as client:
        yield client


def new_cluster(admin) -> str:
    return admin.create(pb.Cluster(metadata=pb.ObjectMeta(name=unique("c")), spec=pb.ClusterSpec(manager="sim"))
                        ).metadata.name


def new_replica(admin, namespace: str, cluster: str) -> pb.Replica:
    replica = pb.Replica(metadata=pb.ObjectMeta(name=unique("r"), namespace=namespace))
    replica.spec.job_name = "job"
    replica.spec.template.run = "true"
    replica.spec.cluster = cluster
    return admin.create(replica)


@pytest.fixture
def world(admin):
    """Two clusters, each with a replica bound to it, and a skylet token for the first."""
    namespace = new_namespace(admin)
    mine, theirs = new_cluster(admin), new_cluster(admin)
    return {
        "namespace": namespace, "mine": mine, "theirs": theirs,
        "my_replica": new_replica(admin, namespace, mine), "their_replica": new_replica(admin, namespace, theirs),
        "token": issue_token(admin, tokens.skylet_user(mine)),
    }


def denied(call, *args) -> bool:
    try:
        call(*args)
    except PermissionDeniedError:
        return True
    return False


def test_a_skylet_sees_only_its_cluster_and_its_replicas(server, world):
    with client_for(server, world["token"]) as skylet:
        assert names(skylet.list("replicas").items) == [world["my_replica"].metadata.name]
        assert skylet.get("replicas", world["my_replica"].metadata.name, world["namespace"])
        assert denied(skylet.get, "replicas", world["their_replica"].metadata.name, world["namespace"])
        # Its gateway reads every cluster, service, endpoints and link.
        assert {world["mine"], world["theirs"]} <= set(names(skylet.list("clusters").items))
        for kind in ("services", "endpoints", "links"):
            skylet.list(kind)
        assert denied(skylet.list, "jobs")
        assert denied(skylet.list, "users")
        assert denied(skylet.list, "events")


def test_a_skylet_updates_its_own_replicas_and_cluster_status(server, admin, world):
    with client_for(server, world["token"]) as skylet:
        mine = world["my_replica"]
        mine.status.phase = "RUNNING"
        assert skylet.update_status(mine).status.phase == "RUNNING"
        mine = skylet.get("replicas", mine.metadata.name, world["namespace"])
        mine.metadata.finalizers.append("skyshift.dev/skylet")
        skylet.update(mine)
        cluster = skylet.get("clusters", world["mine"])
        cluster.status.phase = "READY"
        cluster = skylet.update_status(cluster)
        assert cluster.status.phase == "READY"
        cluster.metadata.annotations["gateway.skyshift.dev/mesh"] = "127.0.0.1:1"  # what its gateway writes
        cluster = skylet.update(cluster)
        cluster.spec.num_nodes = 9  # its spec belongs to the admin
        assert denied(skylet.update, cluster)
        cluster = skylet.get("clusters", world["mine"])
        cluster.metadata.labels["promoted"] = "yes"
        assert denied(skylet.update, cluster)


def test_a_skylet_cannot_touch_another_clusters_replicas(server, admin, world):
    theirs = world["their_replica"]
    with client_for(server, world["token"]) as skylet:
        theirs.status.phase = "FAILED"
        assert denied(skylet.update_status, theirs)
        forged = pb.Replica()
        forged.CopyFrom(theirs)
        forged.spec.cluster = world["mine"]  # claims it is bound here: the stored object says otherwise
        assert denied(skylet.update_status, forged)
        assert denied(skylet.update, forged)
        assert denied(skylet.delete, "replicas", theirs.metadata.name, world["namespace"])
        their_cluster = admin.get("clusters", world["theirs"])
        their_cluster.status.phase = "ERROR"
        assert denied(skylet.update_status, their_cluster)
        their_cluster.metadata.annotations["gateway.skyshift.dev/mesh"] = "127.0.0.1:2"
        assert denied(skylet.update, their_cluster)
        mine = world["my_replica"]
        mine.status.phase = "RUNNING"
        results = skylet.batch_update([mine, forged], status=True)
        assert results[0].error is None and results[0].object.status.phase == "RUNNING"
        assert isinstance(results[1].error, PermissionDeniedError)
        assert denied(skylet.create, new_replica_object(world["namespace"], world["mine"]))
    # Nothing of theirs was written.
    stored = admin.get("replicas", theirs.metadata.name, world["namespace"])
    assert stored.metadata.resource_version == theirs.metadata.resource_version
    assert admin.get("clusters", world["theirs"]).metadata.resource_version == their_cluster.metadata.resource_version


def new_replica_object(namespace: str, cluster: str) -> pb.Replica:
    replica = pb.Replica(metadata=pb.ObjectMeta(name=unique("r"), namespace=namespace))
    replica.spec.job_name = "job"
    replica.spec.cluster = cluster
    return replica


async def test_a_skylet_watch_streams_only_its_replicas(server, admin, world):
    async with AsyncClient(endpoint=server.endpoint, settings=admin.settings, token=world["token"]) as skylet:
        start = admin.list("replicas", world["namespace"]).resource_version
        stream = skylet.watch("replicas", resource_version=start, field_selector="")
        await asyncio.to_thread(new_replica, admin, world["namespace"], world["theirs"])
        shown = await asyncio.to_thread(new_replica, admin, world["namespace"], world["mine"])
        event = await asyncio.wait_for(stream.__anext__(), 10)
        assert event.object.metadata.name == shown.metadata.name
        # Re-bound to another cluster: it leaves the skylet's view (DELETED), as with a selector.
        moved = admin.get("replicas", shown.metadata.name, world["namespace"])
        moved.spec.cluster = world["theirs"]
        await asyncio.to_thread(admin.update, moved)
        event = await asyncio.wait_for(stream.__anext__(), 10)
        assert (event.type, event.object.metadata.name) == ("DELETED", shown.metadata.name)
        await stream.aclose()


def test_the_manager_issues_skylet_tokens_only(server, admin, world):
    with client_for(server, server.settings.manager_token_file.read_text().strip()) as manager:
        token = issue_token(manager, tokens.skylet_user(unique("c")))
        with client_for(server, token) as skylet:
            assert skylet.can_i("list", "replicas").identity.startswith("skylet:")
        assert denied(manager.create, tokens.new_user(unique("plain")))
        victim = admin.get("users", server.settings.auth.admin_user)
        victim.metadata.labels[tokens.IDENTITY_LABEL] = tokens.SKYLET  # pretend it is a skylet user
        victim.metadata.labels[tokens.CLUSTER_LABEL] = "x"
        assert denied(manager.update, victim)
        assert denied(manager.update_status, victim)
        assert denied(manager.get, "users", server.settings.auth.admin_user)
        assert server.settings.auth.admin_user not in names(manager.list("users").items)
        assert denied(manager.list, "rolebindings")
        # Everything else is the manager's to run.
        manager.create(new_replica_object(world["namespace"], world["mine"]))


def test_a_user_labelled_as_a_system_identity_by_an_admin_loses_its_bindings(server, admin, world):
    name = unique("user")
    token = new_user(admin, "admin", name=name)
    with client_for(server, token) as user:
        assert user.can_i("delete", "users").allowed
        stored = admin.get("users", name)
        stored.metadata.labels[tokens.IDENTITY_LABEL] = tokens.SKYLET
        stored.metadata.labels[tokens.CLUSTER_LABEL] = world["mine"]
        admin.update(stored)

        def demoted() -> bool:
            return not user.can_i("delete", "users").allowed
        wait_for(demoted, timeout=5, message="the relabelled user to act as a skylet")
        assert user.can_i("list", "replicas").identity == f"skylet:{world['mine']}"
