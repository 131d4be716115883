"""Deleting a Namespace deletes everything in it (real API server, the namespace controller
in-process)."""
from __future__ import annotations

import asyncio
import uuid

import pytest

from controllers.namespace import FINALIZER, NamespaceController
from skyshift.api.errors import NotFoundError, PreconditionError
from skyshift.client import AsyncClient
from skyshift.v1 import objects_pb2 as pb
from tests.conftest import async_wait_for


@pytest.fixture
async def controller(aclient: AsyncClient):
    namespace_controller = NamespaceController(aclient)
    task = asyncio.ensure_future(namespace_controller.run())
    yield namespace_controller
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def _job(namespace: str, name: str, finalizer: str = "") -> pb.Job:
    job = pb.Job()
    job.metadata.name = name
    job.metadata.namespace = namespace
    if finalizer:
        job.metadata.finalizers.append(finalizer)
    job.spec.run = "true"
    return job


async def _gone(aclient: AsyncClient, kind: str, name: str, namespace: str = "") -> bool:
    try:
        await aclient.get(kind, name, namespace)
    except NotFoundError:
        return True
    return False


async def test_deleting_a_namespace_deletes_its_objects(aclient: AsyncClient, controller):
    name = f"doomed-{uuid.uuid4().hex[:8]}"
    namespace = pb.Namespace()
    namespace.metadata.name = name
    created = await aclient.create(namespace)
    assert FINALIZER in created.metadata.finalizers
    for index in range(5):
        await aclient.create(_job(name, f"job-{index}"))
    await aclient.create(_job(name, "held", finalizer="example.com/hold"))

    await aclient.delete("namespaces", name)
    # Terminating: new objects are refused while it drains.
    await async_wait_for(lambda: _phase(aclient, name), message="namespace TERMINATING")
    with pytest.raises(PreconditionError, match="being deleted"):
        await aclient.create(_job(name, "late"))
    await async_wait_for(lambda: _only_held_left(aclient, name), message="jobs without finalizers deleted")
    held = await aclient.get("jobs", "held", name)
    assert held.metadata.HasField("deletion_timestamp")
    assert not await _gone(aclient, "namespaces", name), "namespace must wait for the held job"

    held.metadata.ClearField("finalizers")
    await aclient.update(held)
    await async_wait_for(lambda: _gone(aclient, "namespaces", name), message="namespace deleted")


async def _phase(aclient: AsyncClient, name: str) -> bool:
    return (await aclient.get("namespaces", name)).status.phase == "TERMINATING"


async def _only_held_left(aclient: AsyncClient, name: str) -> bool:
    return [j.metadata.name for j in (await aclient.list("jobs", name)).items] == ["held"]


async def test_builtin_namespaces_cannot_be_deleted(aclient: AsyncClient):
    with pytest.raises(PreconditionError, match="built in"):
        await aclient.delete("namespaces", "default")
