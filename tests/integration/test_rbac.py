"""Authorization of users: Roles, RoleBindings, namespace scope, filtered lists and watches."""
from __future__ import annotations

import asyncio

import pytest

from skyshift.api.errors import PermissionDeniedError
from skyshift.client import AsyncClient
from skyshift.v1 import objects_pb2 as pb

from tests.integration.api_helpers import names
from tests.integration.auth_helpers import (admin_token, auth_server, bind, client_for, new_job, new_namespace,
                                            new_user, unique)


@pytest.fixture(scope="module")
def server(etcd, tmp_path_factory):
    with auth_server(etcd, tmp_path_factory.mktemp("rbac-home")) as running:
        yield running


@pytest.fixture(scope="module")
def admin(server):
    with client_for(server, admin_token(server)) as client:
        yield client


@pytest.fixture
def two_namespaces(admin):
    """(own, other): a user's namespace and one it has no rights in, each holding a job."""
    own, other = new_namespace(admin), new_namespace(admin)
    for namespace in (own, other):
        admin.create(new_job("existing", namespace))
    return own, other


def denied(call, *args, **kwargs) -> bool:
    try:
        result = call(*args, **kwargs)
        if hasattr(result, "__next__"):
            next(result)
    except PermissionDeniedError:
        return True
    return False


def test_builtin_roles_exist(admin):
    assert {"admin", "editor", "viewer"} <= set(names(admin.list("roles").items))


def test_a_namespace_scoped_editor_works_in_its_namespace(server, admin, two_namespaces):
    own, _ = two_namespaces
    with client_for(server, new_user(admin, "editor", [own])) as editor:
        job = editor.create(new_job("mine", own))
        assert editor.get("jobs", "mine", own).metadata.uid == job.metadata.uid
        job.metadata.labels["team"] = "a"
        job = editor.update(job)
        assert names(editor.list("jobs", own).items) == ["existing", "mine"]
        editor.delete("jobs", "mine", own)
        assert editor.get("namespaces", own).metadata.name == own  # its own namespace is readable


def test_a_namespace_scoped_editor_cannot_touch_another_namespace(server, admin, two_namespaces):
    own, other = two_namespaces
    with client_for(server, new_user(admin, "editor", [own])) as editor:
        theirs = admin.get("jobs", "existing", other)
        assert denied(editor.get, "jobs", "existing", other)
        assert denied(editor.list, "jobs", other)
        assert denied(editor.watch, "jobs", namespace=other)
        assert denied(editor.create, new_job("intruder", other))
        assert denied(editor.update, theirs)
        assert denied(editor.update_status, theirs)
        assert denied(editor.delete, "jobs", "existing", other)
        assert denied(editor.history, "jobs", "existing", other)
        assert denied(editor.get, "namespaces", other)
        assert denied(editor.delete, "namespaces", own)  # editors read namespaces only
    # Nothing was written by the refused calls.
    assert names(admin.list("jobs", other).items) == ["existing"]
    assert admin.get("jobs", "existing", other).metadata.resource_version == theirs.metadata.resource_version


def test_a_batch_with_one_forbidden_item_is_refused_whole(server, admin, two_namespaces):
    own, other = two_namespaces
    with client_for(server, new_user(admin, "editor", [own])) as editor:
        assert denied(editor.batch_create, [new_job("ok", own), new_job("intruder", other)])
    assert names(admin.list("jobs", own).items) == ["existing"]


def test_a_namespace_scoped_editor_gets_no_cluster_scoped_kind(server, admin, two_namespaces):
    own, _ = two_namespaces
    with client_for(server, new_user(admin, "editor", [own])) as editor:
        for kind in ("clusters", "links", "users", "roles", "rolebindings"):
            assert denied(editor.list, kind), kind
            assert denied(editor.get, kind, "anything"), kind
        assert denied(editor.create, pb.Cluster(metadata=pb.ObjectMeta(name=unique("c")),
                                                spec=pb.ClusterSpec(manager="sim")))
        assert denied(editor.create, pb.RoleBinding(metadata=pb.ObjectMeta(name=unique("rb")),
                                                    spec=pb.RoleBindingSpec(role="admin", users=["me"])))
        assert denied(editor.create, pb.Namespace(metadata=pb.ObjectMeta(name=unique("ns"))))


def test_lists_across_namespaces_show_only_what_the_user_may_see(server, admin, two_namespaces):
    own, other = two_namespaces
    with client_for(server, new_user(admin, "editor", [own])) as editor:
        jobs = editor.list("jobs").items
        assert {job.metadata.namespace for job in jobs} == {own}
        assert names(editor.list("namespaces").items) == [own]
        paged = editor.list_all("jobs", page_size=1).items
        assert [(j.metadata.namespace, j.metadata.name) for j in paged] == [(own, "existing")]


async def test_watches_across_namespaces_stream_only_what_the_user_may_see(server, admin, two_namespaces):
    own, other = two_namespaces
    settings = admin.settings
    token = new_user(admin, "viewer", [own])
    async with AsyncClient(endpoint=server.endpoint, settings=settings, token=token) as viewer:
        start = admin.list("jobs", own).resource_version
        stream = viewer.watch("jobs", resource_version=start)
        await asyncio.to_thread(admin.create, new_job("hidden", other))
        await asyncio.to_thread(admin.create, new_job("shown", own))
        event = await asyncio.wait_for(stream.__anext__(), 10)
        assert (event.type, event.object.metadata.namespace, event.object.metadata.name) == ("ADDED", own, "shown")
        await stream.aclose()


def test_a_viewer_reads_everything_but_users_and_writes_nothing(server, admin, two_namespaces):
    own, other = two_namespaces
    with client_for(server, new_user(admin, "viewer")) as viewer:
        assert {"existing"} == set(names(viewer.list("jobs", other).items))
        viewer.list("clusters")
        assert denied(viewer.list, "users")
        assert denied(viewer.create, new_job("nope", own))
        assert denied(viewer.delete, "jobs", "existing", own)
        answer = viewer.can_i("list", "jobs")
        assert answer.allowed and not answer.filtered


def test_a_new_binding_takes_effect_at_once(server, admin, two_namespaces):
    own, other = two_namespaces
    name = unique("user")
    with client_for(server, new_user(admin, name=name)) as user:
        assert denied(user.list, "jobs", other)
        bind(admin, name, "viewer", [other])
        assert names(user.list("jobs", other).items) == ["existing"]
        answer = user.can_i("list", "jobs")
        assert answer.allowed and answer.filtered


def test_custom_roles_grant_exactly_their_rules(server, admin, two_namespaces):
    own, other = two_namespaces
    role = pb.Role(metadata=pb.ObjectMeta(name=unique("jobs-reader")))
    role.spec.rules.add(resources=["jobs"], verbs=["get"], namespaces=[other])
    admin.create(role)
    name = unique("user")
    with client_for(server, new_user(admin, name=name)) as user:
        bind(admin, name, role.metadata.name)
        assert user.get("jobs", "existing", other).metadata.name == "existing"
        assert denied(user.list, "jobs", other)
        assert denied(user.get, "jobs", "existing", own)
        assert denied(user.get, "replicas", "existing", other)
