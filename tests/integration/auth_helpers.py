"""What the tests of authentication, authorization, audit, quotas and limits share: an API
server with auth on (its own, on the shared etcd) and ways to make users with roles.

Every auth server names its admin and manager Users uniquely, since all servers of a test
session share one etcd: a second server would otherwise find "admin" made by the first and
have no token for it.
"""
from __future__ import annotations

import contextlib
import uuid
from typing import Iterable, Iterator, Optional

from skyshift import config, tokens
from skyshift.client import Client
from skyshift.v1 import objects_pb2 as pb

from tests.conftest import ServerThread, make_settings


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def auth_server(etcd, home, **overrides) -> Iterator[ServerThread]:
    """An API server with authentication on; `overrides` are settings sections."""
    sections = {"auth": {"enabled": True, "admin_user": unique("admin"), "manager_user": unique("manager")}}
    for section, values in overrides.items():
        sections.setdefault(section, {}).update(values)
    server = ServerThread(make_settings(home, **sections), etcd.endpoint).start()
    try:
        yield server
    finally:
        server.stop()


def admin_token(server: ServerThread) -> str:
    """The admin token the server wrote to its home's config.yaml."""
    return config.load(server.settings.home_path, env={}).client.token


def client_for(server: ServerThread, token: str = "") -> Client:
    settings = config.load(server.settings.home_path, env={})
    settings.client.token = token
    return Client(endpoint=server.endpoint, settings=settings)


def issue_token(admin: Client, user: pb.User, ttl: float = 0.0) -> str:
    """Create `user` unless it exists and give it a new token (as `skyctl create user` does)."""
    try:
        current = admin.get("users", user.metadata.name)
    except Exception:  # noqa: BLE001 - not found
        current = admin.create(user)
    secret, _ = tokens.add_token(current, ttl)
    admin.update_status(current)
    return secret


def bind(admin: Client, user: str, role: str, namespaces: Iterable[str] = ()) -> pb.RoleBinding:
    binding = pb.RoleBinding()
    binding.metadata.name = unique(f"{role}-{user}"[:40])
    binding.spec.role = role
    binding.spec.users.append(user)
    binding.spec.namespaces.extend(namespaces)
    return admin.create(binding)


def new_user(admin: Client, role: Optional[str] = None, namespaces: Iterable[str] = (), name: str = "",
             ttl: float = 0.0) -> str:
    """A fresh user bound to `role` (in `namespaces`); its token."""
    name = name or unique("user")
    token = issue_token(admin, tokens.new_user(name), ttl)
    if role:
        bind(admin, name, role, namespaces)
    return token


def new_namespace(admin: Client, annotations=None) -> str:
    namespace = pb.Namespace()
    namespace.metadata.name = unique("ns")
    namespace.metadata.annotations.update(annotations or {})
    return admin.create(namespace).metadata.name


def new_job(name: str, namespace: str, replicas: int = 1, **resources) -> pb.Job:
    job = pb.Job()
    job.metadata.name = name
    job.metadata.namespace = namespace
    job.spec.run = "true"
    job.spec.replicas = replicas
    job.spec.resources.update({k: float(v) for k, v in resources.items()})
    return job
