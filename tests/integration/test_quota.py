"""Namespace quotas (quota.skyshift.dev/* annotations) enforced when Jobs are admitted."""
from __future__ import annotations

import asyncio

import pytest

from skyshift.api.errors import InvalidError, LimitError
from skyshift.client import AsyncClient
from skyshift.v1 import objects_pb2 as pb

from tests.conftest import wait_for
from tests.integration.api_helpers import names
from tests.integration.auth_helpers import admin_token, auth_server, client_for, new_job, new_user, unique

Q = "quota.skyshift.dev/"


@pytest.fixture(scope="module")
def server(etcd, tmp_path_factory):
    with auth_server(etcd, tmp_path_factory.mktemp("quota-home")) as running:
        yield running


@pytest.fixture(scope="module")
def admin(server):
    with client_for(server, admin_token(server)) as client:
        yield client


def quota_namespace(admin, **quotas) -> str:
    namespace = pb.Namespace(metadata=pb.ObjectMeta(name=unique("ns")))
    namespace.metadata.annotations.update({Q + k: str(v) for k, v in quotas.items()})
    return admin.create(namespace).metadata.name


@pytest.fixture
def editor_of(server, admin):
    clients = []

    def make(namespace: str):
        client = client_for(server, new_user(admin, "editor", [namespace]))
        clients.append(client)
        return client
    yield make
    for client in clients:
        client.close()


def test_jobs_over_a_quota_are_refused_naming_it(admin, editor_of):
    namespace = quota_namespace(admin, cpus=4, memory=1024, gpus=1, replicas=4)
    editor = editor_of(namespace)
    editor.create(new_job("a", namespace, replicas=2, cpus=1, memory=256))
    with pytest.raises(LimitError, match=r"quota quota.skyshift.dev/cpus exceeded: the request needs 4, 2 of 4 in use"):
        editor.create(new_job("b", namespace, replicas=2, cpus=2))
    with pytest.raises(LimitError, match="quota.skyshift.dev/memory"):
        editor.create(new_job("c", namespace, memory=1000))
    with pytest.raises(LimitError, match="quota.skyshift.dev/gpus"):
        editor.create(new_job("d", namespace, replicas=2, V100=1))
    with pytest.raises(LimitError, match="quota.skyshift.dev/replicas"):
        editor.create(new_job("e", namespace, replicas=3))
    job = editor.get("jobs", "a", namespace)
    job.spec.replicas = 5
    with pytest.raises(LimitError, match="quota.skyshift.dev/cpus exceeded: the request needs 3, 2 of 4"):
        editor.update(job)  # 5 x 1 cpu, of which its own 2 are in use already
    job.spec.replicas = 4  # 4 replicas x 1 cpu: exactly the quota (its own 2 are replaced)
    editor.update(job)
    assert names(editor.list("jobs", namespace).items) == ["a"]


def test_jobs_are_admitted_again_when_usage_drops(admin, editor_of):
    namespace = quota_namespace(admin, cpus=2)
    editor = editor_of(namespace)
    editor.create(new_job("first", namespace, cpus=2))
    with pytest.raises(LimitError):
        editor.create(new_job("second", namespace, cpus=2))
    first = admin.get("jobs", "first", namespace)
    first.status.phase = "COMPLETED"  # a finished job holds nothing
    admin.update_status(first)
    editor.create(new_job("second", namespace, cpus=2))
    with pytest.raises(LimitError):
        editor.create(new_job("third", namespace, cpus=2))
    editor.delete("jobs", "second", namespace)
    editor.create(new_job("third", namespace, cpus=2))


def test_the_objects_quota_counts_jobs_services_and_policies(admin, editor_of):
    namespace = quota_namespace(admin, objects=2)
    editor = editor_of(namespace)
    editor.create(new_job("one", namespace))
    service = pb.Service(metadata=pb.ObjectMeta(name="svc", namespace=namespace))
    service.spec.selector["app"] = "x"
    service.spec.ports.add(port=80)
    editor.create(service)
    with pytest.raises(LimitError, match="quota.skyshift.dev/objects exceeded: the request needs 1, 2 of 2"):
        editor.create(new_job("two", namespace))
    editor.delete("services", "svc", namespace)
    editor.create(new_job("two", namespace))


def test_a_batch_over_quota_is_refused_whole(admin, editor_of):
    namespace = quota_namespace(admin, replicas=2)
    editor = editor_of(namespace)
    with pytest.raises(LimitError, match="needs 3, 0 of 2"):
        editor.batch_create([new_job(f"j{i}", namespace) for i in range(3)])
    assert editor.list("jobs", namespace).items == []
    assert all(item.error is None for item in editor.batch_create([new_job(f"j{i}", namespace) for i in range(2)]))


async def test_concurrent_creates_never_exceed_a_quota(server, admin):
    namespace = quota_namespace(admin, cpus=4)
    token = new_user(admin, "editor", [namespace])
    async with AsyncClient(endpoint=server.endpoint, settings=admin.settings, token=token) as editor:
        results = await asyncio.gather(*(editor.create(new_job(f"j{i}", namespace, cpus=1)) for i in range(12)),
                                       return_exceptions=True)
    created = [r for r in results if not isinstance(r, Exception)]
    assert len(created) == 4
    assert all(isinstance(r, LimitError) for r in results if isinstance(r, Exception))


def test_a_quota_set_later_applies_and_malformed_quotas_are_invalid(admin, editor_of):
    namespace = quota_namespace(admin)
    editor = editor_of(namespace)
    editor.create(new_job("before", namespace, cpus=3))
    stored = admin.get("namespaces", namespace)
    stored.metadata.annotations[Q + "cpus"] = "4"
    admin.update(stored)

    def refused() -> bool:
        try:
            editor.create(new_job(unique("probe"), namespace, cpus=2))
        except LimitError:
            return True
        return False
    wait_for(refused, timeout=5, message="the new quota to apply")
    stored = admin.get("namespaces", namespace)
    stored.metadata.annotations[Q + "cpus"] = "lots"
    with pytest.raises(InvalidError, match="quota.skyshift.dev/cpus"):
        admin.update(stored)
    stored.metadata.annotations.pop(Q + "cpus")
    stored.metadata.annotations[Q + "disks"] = "1"
    with pytest.raises(InvalidError, match="unknown quota"):
        admin.update(stored)
