"""Graceful deletion: an object with finalizers is only marked until they are removed."""
import pytest

from skyshift.api.errors import NotFoundError, PreconditionError
from tests.integration.api_helpers import events_until, new_job, next_event

KEEP = "example.com/keep"
NAMESPACE_FINALIZER = "skyshift.dev/namespace"
AUDIT = "example.com/audit"


async def test_delete_with_finalizers_marks_until_they_are_removed(aclient, namespace):
    created = await aclient.create(new_job("guarded", namespace, finalizers=[KEEP, AUDIT]))
    events = aclient.watch("jobs", namespace, name="guarded", resource_version=created.metadata.resource_version)

    marked = await aclient.delete("jobs", "guarded", namespace)
    assert marked.metadata.HasField("deletion_timestamp")
    still_there = await aclient.get("jobs", "guarded", namespace)
    assert still_there.metadata.HasField("deletion_timestamp")
    assert list(still_there.metadata.finalizers) == [KEEP, AUDIT]
    assert [j.metadata.name for j in (await aclient.list("jobs", namespace)).items] == ["guarded"]
    event = await next_event(events)
    assert event.type == "MODIFIED" and event.object.metadata.HasField("deletion_timestamp")

    # Deleting again changes nothing; the mark stays as it was.
    again = await aclient.delete("jobs", "guarded", namespace)
    assert again.metadata.deletion_timestamp == still_there.metadata.deletion_timestamp
    assert again.metadata.resource_version == still_there.metadata.resource_version

    # A controller finishes its clean-up and removes its finalizer: still there.
    still_there.metadata.finalizers.remove(AUDIT)
    one_left = await aclient.update(still_there)
    assert list(one_left.metadata.finalizers) == [KEEP]
    assert (await aclient.get("jobs", "guarded", namespace)).metadata.HasField("deletion_timestamp")
    event = await next_event(events)
    assert event.type == "MODIFIED" and list(event.object.metadata.finalizers) == [KEEP]

    # The last one goes: the object is gone and watchers see it deleted.
    one_left.metadata.ClearField("finalizers")
    await aclient.update(one_left)
    with pytest.raises(NotFoundError):
        await aclient.get("jobs", "guarded", namespace)
    assert (await aclient.list("jobs", namespace)).items == []
    event = await next_event(events)
    assert event.type == "DELETED" and event.object.metadata.uid == created.metadata.uid
    await events.aclose()


async def test_no_new_finalizers_on_an_object_being_deleted(aclient, namespace):
    await aclient.create(new_job("closing", namespace, finalizers=[KEEP]))
    marked = await aclient.delete("jobs", "closing", namespace)
    marked.metadata.finalizers.append(AUDIT)
    with pytest.raises(PreconditionError) as caught:
        await aclient.update(marked)
    assert AUDIT in caught.value.message
    stored = await aclient.get("jobs", "closing", namespace)
    assert list(stored.metadata.finalizers) == [KEEP]


async def test_a_marked_object_cannot_be_unmarked_by_an_update(aclient, namespace):
    await aclient.create(new_job("sticky", namespace, finalizers=[KEEP]))
    marked = await aclient.delete("jobs", "sticky", namespace)
    marked.metadata.ClearField("deletion_timestamp")
    marked.metadata.labels["still"] = "here"
    updated = await aclient.update(marked)
    assert updated.metadata.HasField("deletion_timestamp")
    assert (await aclient.get("jobs", "sticky", namespace)).metadata.HasField("deletion_timestamp")


async def test_delete_without_finalizers_is_immediate(aclient, namespace):
    created = await aclient.create(new_job("plain", namespace))
    events = aclient.watch("jobs", namespace, name="plain", resource_version=created.metadata.resource_version)
    deleted = await aclient.delete("jobs", "plain", namespace)
    assert deleted.metadata.uid == created.metadata.uid
    with pytest.raises(NotFoundError):
        await aclient.get("jobs", "plain", namespace)
    seen = await events_until(events, lambda e: e.type == "DELETED")
    assert [e.type for e in seen] == ["DELETED"]
    await events.aclose()


def test_a_namespace_being_deleted_keeps_its_objects_and_refuses_new_ones(client, namespace):
    tenant = client.create(new_job("tenant", namespace))
    marked = client.delete("namespaces", namespace)
    assert marked.metadata.HasField("deletion_timestamp")  # the namespace controller empties it, then it goes
    assert client.get("namespaces", namespace).metadata.HasField("deletion_timestamp")
    assert client.get("jobs", "tenant", namespace) == tenant
    with pytest.raises(PreconditionError) as caught:
        client.create(new_job("latecomer", namespace))
    assert f'namespace "{namespace}"' in caught.value.message
    assert [j.metadata.name for j in client.list("jobs", namespace).items] == ["tenant"]


def test_no_object_outlives_its_namespace(client, namespace):
    tenant = client.create(new_job("tenant", namespace))
    # An update that leaves out the namespace finalizer (e.g. applying a manifest) keeps it.
    stored = client.get("namespaces", namespace)
    stored.metadata.ClearField("finalizers")
    assert list(client.update(stored).metadata.finalizers) == [NAMESPACE_FINALIZER]
    # Being deleted, it cannot lose the finalizer while it still holds objects...
    marked = client.delete("namespaces", namespace)
    marked.metadata.ClearField("finalizers")
    with pytest.raises(PreconditionError) as caught:
        client.update(marked)
    assert "1 objects" in caught.value.message
    assert client.get("jobs", "tenant", namespace) == tenant
    assert NAMESPACE_FINALIZER in client.get("namespaces", namespace).metadata.finalizers
    # ...and once it is empty, removing the finalizer lets it go.
    client.delete("jobs", "tenant", namespace)
    emptied = client.get("namespaces", namespace)
    emptied.metadata.finalizers.remove(NAMESPACE_FINALIZER)
    client.update(emptied)
    with pytest.raises(NotFoundError):
        client.get("namespaces", namespace)
