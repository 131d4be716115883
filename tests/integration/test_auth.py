"""Authentication: bearer tokens of Users, bootstrap of the admin and manager identities."""
from __future__ import annotations

import stat

import pytest

from skyshift import tokens
from skyshift.api.errors import PermissionDeniedError, UnauthenticatedError
from skyshift.client import Client
from skyshift.v1 import objects_pb2 as pb

from tests.conftest import wait_for
from tests.integration.auth_helpers import (admin_token, auth_server, client_for, issue_token, new_namespace,
                                            new_user, unique)


@pytest.fixture(scope="module")
def server(etcd, tmp_path_factory):
    with auth_server(etcd, tmp_path_factory.mktemp("auth-home")) as running:
        yield running


@pytest.fixture(scope="module")
def admin(server):
    with client_for(server, admin_token(server)) as client:
        yield client


def rejected(client: Client) -> bool:
    try:
        client.list("namespaces", limit=1)
    except UnauthenticatedError:
        return True
    return False


def test_calls_without_a_valid_token_are_unauthenticated(server):
    for token in ("", "not-a-token", tokens.new_secret()):
        with client_for(server, token) as client:
            with pytest.raises(UnauthenticatedError):
                client.list("namespaces")
            with pytest.raises(UnauthenticatedError):
                client.get("namespaces", "default")
            with pytest.raises(UnauthenticatedError):
                list(zip(range(1), client.watch("jobs", namespace="default")))


def test_first_start_makes_an_admin_whose_token_is_in_the_local_config(server, admin):
    config_file = server.settings.config_file
    assert stat.S_IMODE(config_file.stat().st_mode) == 0o600
    assert admin.can_i("delete", "users").allowed
    assert admin.can_i("create", "jobs", "any-namespace").identity == server.settings.auth.admin_user
    stored = admin.get("users", server.settings.auth.admin_user)
    secret = admin_token(server)
    assert len(secret) >= 43  # 256 bits, url-safe base64
    assert [t.hash for t in stored.status.tokens] == [tokens.hash_token(secret)]
    assert secret not in stored.SerializeToString().decode(errors="replace")


def test_the_manager_gets_its_own_token_file(server, admin):
    token_file = server.settings.manager_token_file
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    with client_for(server, token_file.read_text().strip()) as manager:
        answer = manager.can_i("update", "replicas", "default")
        assert answer.allowed and answer.identity == "manager"
        assert not manager.can_i("create", "rolebindings").allowed


def test_no_token_is_written_anywhere_else_under_the_home(server, admin):
    admin.create(pb.Namespace(metadata=pb.ObjectMeta(name=unique("ns"))))  # something in the logs/audit
    secrets = {admin_token(server), server.settings.manager_token_file.read_text().strip()}
    allowed = {server.settings.config_file, server.settings.manager_token_file}
    for path in server.settings.home_path.rglob("*"):
        if path.is_file() and path not in allowed:
            text = path.read_bytes().decode(errors="replace")
            assert not any(secret in text for secret in secrets), path


def test_a_new_user_token_works_at_once(server, admin):
    namespace = new_namespace(admin)
    token = new_user(admin, "editor", [namespace])
    with client_for(server, token) as user:
        job = pb.Job(metadata=pb.ObjectMeta(name="first", namespace=namespace), spec=pb.JobSpec(run="true"))
        assert user.create(job).metadata.name == "first"


def test_a_revoked_token_is_rejected(server, admin):
    name = unique("user")
    token = new_user(admin, "viewer", name=name)
    other = issue_token(admin, admin.get("users", name))
    with client_for(server, token) as user, client_for(server, other) as same_user:
        assert not rejected(user)
        stored = admin.get("users", name)
        for record in stored.status.tokens:
            if record.hash == tokens.hash_token(token):
                record.revoked = True
        admin.update_status(stored)
        wait_for(lambda: rejected(user), timeout=5, message="the revoked token to be refused")
        with pytest.raises(UnauthenticatedError, match="revoked"):
            user.list("namespaces")
        assert not rejected(same_user)  # the user's other token still works


def test_an_expired_token_is_rejected(server, admin):
    token = new_user(admin, "viewer", ttl=1.0)
    with client_for(server, token) as user:
        assert not rejected(user)
        wait_for(lambda: rejected(user), timeout=5, message="the token to expire")
        with pytest.raises(UnauthenticatedError, match="expired"):
            user.list("namespaces")


def test_a_user_without_bindings_may_do_nothing(server, admin):
    with client_for(server, new_user(admin)) as nobody:
        with pytest.raises(PermissionDeniedError):
            nobody.list("namespaces")
        with pytest.raises(PermissionDeniedError):
            nobody.get("namespaces", "default")
        answer = nobody.can_i("get", "jobs")
        assert not answer.allowed and "may not get jobs" in answer.reason


def test_a_restart_keeps_the_admin_and_manager_tokens(etcd, tmp_path):
    with auth_server(etcd, tmp_path) as first:
        admin_secret = admin_token(first)
        manager_secret = first.settings.manager_token_file.read_text()
        names = first.settings.auth
    with auth_server(etcd, tmp_path, auth={"admin_user": names.admin_user,
                                           "manager_user": names.manager_user}) as second:
        assert admin_token(second) == admin_secret
        assert second.settings.manager_token_file.read_text() == manager_secret
        with client_for(second, admin_secret) as admin:
            assert admin.can_i("delete", "namespaces").allowed
            assert len(admin.get("users", names.admin_user).status.tokens) == 1


def test_without_auth_everything_is_open(client):
    """The shared api_server fixture runs without auth, as local mode does."""
    answer = client.can_i("delete", "users")
    assert answer.allowed and not answer.auth_enabled
    with Client(endpoint=client.endpoint, settings=client.settings, token="") as anonymous:
        assert anonymous.get("namespaces", "default").metadata.name == "default"


def test_undecodable_requests_are_refused_for_strangers_and_invalid_for_users(server):
    import grpc

    def call(method: str, metadata):
        with grpc.insecure_channel(server.endpoint) as channel:
            try:
                channel.unary_unary(f"/skyshift.v1.ObjectService/{method}")(b"\xff\xff\xff", metadata=metadata,
                                                                             timeout=10)
            except grpc.RpcError as error:
                return error.code()
        return grpc.StatusCode.OK

    admin = (("authorization", f"Bearer {admin_token(server)}"),)
    for method in ("Create", "Get", "CanI"):
        assert call(method, ()) == grpc.StatusCode.UNAUTHENTICATED
        assert call(method, admin) == grpc.StatusCode.INVALID_ARGUMENT
