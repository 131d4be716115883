"""Optimistic concurrency as a user sees it: racing creates, stale updates, generation and
revisions, and the spec/status split."""
import asyncio

import pytest

from skyshift.api.errors import AlreadyExistsError, ConflictError, InvalidError
from skyshift.v1 import objects_pb2 as pb
from tests.integration.api_helpers import new_job, store_revision

ROUNDS = 20
WRITERS = 20


async def test_concurrent_creates_of_one_name_exactly_one_wins(aclient, namespace):
    for round_number in range(ROUNDS):
        name = f"race-{round_number}"
        results = await asyncio.gather(
            *(aclient.create(new_job(name, namespace, run=f"writer {writer}")) for writer in range(WRITERS)),
            return_exceptions=True)
        winners = [r for r in results if isinstance(r, pb.Job)]
        losers = [r for r in results if isinstance(r, AlreadyExistsError)]
        assert len(winners) == 1, f"round {round_number}: {len(winners)} creates succeeded"
        assert len(losers) == WRITERS - 1, [r for r in results if not isinstance(r, (pb.Job, AlreadyExistsError))]
        assert all(f'"{name}"' in loser.message and "already exists" in loser.message for loser in losers)
        stored = await aclient.get("jobs", name, namespace)
        assert stored.metadata.uid == winners[0].metadata.uid
        assert stored.spec.run == winners[0].spec.run
        history = await aclient.history("jobs", name, namespace)
        assert len(history) == 1  # the losers wrote nothing


async def test_concurrent_updates_from_one_read_exactly_one_wins(aclient, namespace):
    read = await aclient.create(new_job("contended", namespace))
    attempts = []
    for writer in range(WRITERS):
        attempt = pb.Job()
        attempt.CopyFrom(read)
        attempt.spec.run = f"writer {writer}"
        attempts.append(attempt)
    results = await asyncio.gather(*(aclient.update(a) for a in attempts), return_exceptions=True)
    winners = [r for r in results if isinstance(r, pb.Job)]
    assert len(winners) == 1
    assert all(isinstance(r, ConflictError) for r in results if r not in winners)
    stored = await aclient.get("jobs", "contended", namespace)
    assert stored.spec.run == winners[0].spec.run
    assert stored.metadata.generation == 2


def test_stale_update_is_rejected_and_changes_nothing(client, namespace):
    original = client.create(new_job("stale", namespace, run="v1"))
    newer = pb.Job()
    newer.CopyFrom(original)
    newer.spec.run = "v2"
    current = client.update(newer)
    assert current.metadata.resource_version > original.metadata.resource_version

    stale = pb.Job()
    stale.CopyFrom(original)
    stale.spec.run = "v3 from an old read"
    stale.metadata.labels["lost"] = "update"
    revision = store_revision(client)
    with pytest.raises(ConflictError) as caught:
        client.update(stale)
    assert caught.value.code.name == "ABORTED"
    assert str(current.metadata.resource_version) in caught.value.message
    assert str(original.metadata.resource_version) in caught.value.message
    stale.status.phase = "RUNNING"
    with pytest.raises(ConflictError):
        client.update_status(stale)
    with pytest.raises(ConflictError):
        client.delete("jobs", "stale", namespace, resource_version=original.metadata.resource_version)
    with pytest.raises(ConflictError):
        client.delete("jobs", "stale", namespace, uid="someone-else")
    assert store_revision(client) == revision
    assert client.get("jobs", "stale", namespace) == current
    assert len(client.history("jobs", "stale", namespace)) == 2


def test_update_needs_the_resource_version_it_read(client, namespace):
    created = client.create(new_job("blind", namespace))
    blind = new_job("blind", namespace, run="no read first")
    with pytest.raises(InvalidError) as caught:
        client.update(blind)
    assert caught.value.field == "metadata.resource_version"
    assert client.get("jobs", "blind", namespace) == created


def test_update_of_a_re_created_object_with_the_old_uid_conflicts(client, namespace):
    first = client.create(new_job("phoenix", namespace))
    client.delete("jobs", "phoenix", namespace)
    second = client.create(new_job("phoenix", namespace))
    old = pb.Job()
    old.CopyFrom(second)
    old.metadata.uid = first.metadata.uid
    old.spec.run = "meant for the first one"
    with pytest.raises(ConflictError) as caught:
        client.update(old)
    assert "re-created" in caught.value.message
    assert client.get("jobs", "phoenix", namespace) == second


def test_status_updates_keep_generation_spec_updates_bump_it(client, namespace):
    created = client.create(new_job("gen", namespace))
    assert created.metadata.generation == 1

    created.status.phase = "RUNNING"
    after_status = client.update_status(created)
    assert after_status.status.phase == "RUNNING"
    assert after_status.metadata.generation == 1
    assert after_status.metadata.resource_version > created.metadata.resource_version

    after_status.metadata.labels["team"] = "ml"
    after_labels = client.update(after_status)
    assert after_labels.metadata.labels == {"team": "ml"}
    assert after_labels.metadata.generation == 1  # metadata is not spec

    after_labels.spec.replicas = 3
    after_spec = client.update(after_labels)
    assert after_spec.metadata.generation == 2
    after_spec.spec.run = "again"
    assert client.update(after_spec).metadata.generation == 3
    assert client.get("jobs", "gen", namespace).metadata.generation == 3


def test_update_with_no_changes_creates_no_revision(client, namespace):
    created = client.create(new_job("same", namespace))
    revision = store_revision(client)
    assert client.update(created) == created
    assert client.update_status(created) == created
    assert store_revision(client) == revision
    assert client.history("jobs", "same", namespace) == [created]
    # The server's own fields sent back unchanged, or changed by the client, are no change either.
    tampered = pb.Job()
    tampered.CopyFrom(created)
    tampered.metadata.generation = 42
    tampered.metadata.creation_timestamp.FromSeconds(0)
    assert client.update(tampered) == created
    assert store_revision(client) == revision


def test_spec_update_ignores_status(client, namespace):
    created = client.create(new_job("spec-only", namespace))
    created.spec.run = "new command"
    created.status.phase = "COMPLETED"
    created.status.restarts = 7
    updated = client.update(created)
    assert updated.spec.run == "new command"
    assert updated.status.phase == "PENDING" and updated.status.restarts == 0
    assert client.get("jobs", "spec-only", namespace) == updated


def test_update_status_ignores_spec_and_metadata(client, namespace):
    created = client.create(new_job("status-only", namespace, labels={"a": "1"}))
    changed = pb.Job()
    changed.CopyFrom(created)
    changed.status.phase = "RUNNING"
    changed.status.restarts = 2
    changed.spec.run = "sneaky"
    changed.spec.replicas = 9
    changed.metadata.labels["a"] = "2"
    changed.metadata.finalizers.append("example.com/sneaky")
    updated = client.update_status(changed)
    assert updated.status.phase == "RUNNING" and updated.status.restarts == 2
    assert updated.spec == created.spec
    assert updated.metadata.labels == {"a": "1"} and not updated.metadata.finalizers
    assert updated.metadata.generation == 1
    assert client.get("jobs", "status-only", namespace) == updated


async def test_delete_without_preconditions_wins_over_concurrent_status_writes(aclient, namespace):
    """A plain delete must not fail because a controller keeps writing the object's status."""
    for attempt in range(10):
        job = await aclient.create(new_job(f"busy-{attempt}", namespace))
        stop = asyncio.Event()

        async def write_statuses(current=job):
            while not stop.is_set():
                current.status.phase = "RUNNING" if current.status.phase != "RUNNING" else "SCHEDULED"
                try:
                    current = await aclient.update_status(current)
                except ConflictError:
                    current = await aclient.get("jobs", current.metadata.name, namespace)
                except Exception:  # deleted under us: done
                    return

        writer = asyncio.ensure_future(write_statuses())
        await asyncio.sleep(0)  # let the writer start
        await aclient.delete("jobs", job.metadata.name, namespace)
        stop.set()
        await writer
