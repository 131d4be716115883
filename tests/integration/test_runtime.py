"""The controller runtime against a real API server and etcd: informers, the reconciler base,
the event recorder and leader election."""
from __future__ import annotations

import asyncio
import dataclasses
from typing import List, Optional

import pytest

from skyshift.api.errors import ConflictError, NotFoundError
from skyshift.client import AsyncClient
from skyshift.runtime import Controller, EventRecorder, InformerFactory, LeaderElector, key_of
from skyshift.v1 import objects_pb2 as pb
from tests.conftest import async_wait_for


def job(name: str, namespace: str, **labels) -> pb.Job:
    obj = pb.Job()
    obj.metadata.name = name
    obj.metadata.namespace = namespace
    obj.metadata.labels.update(labels)
    obj.spec.run = "true"
    return obj


@dataclasses.dataclass
class Seen:
    type: str
    name: str
    version: int
    old_version: Optional[int]


def recorder(into: List[Seen]):
    def handler(event_type, obj, old):
        into.append(Seen(event_type, obj.metadata.name, obj.metadata.resource_version,
                         old.metadata.resource_version if old is not None else None))
    return handler


async def test_informer_lists_then_follows_changes(aclient: AsyncClient, namespace):
    for name, team in (("a", "x"), ("b", "x"), ("c", "y")):
        await aclient.create(job(name, namespace, team=team))
    informers = InformerFactory(aclient)
    jobs = informers.informer("jobs", namespace)
    jobs.add_index("team", lambda obj: [obj.metadata.labels.get("team", "")])
    seen: List[Seen] = []
    jobs.add_handler(recorder(seen))
    informers.start()
    try:
        await asyncio.wait_for(jobs.wait_synced(), 10)
        assert sorted(jobs.keys()) == [f"{namespace}/a", f"{namespace}/b", f"{namespace}/c"]
        assert sorted(s.name for s in seen if s.type == "ADDED") == ["a", "b", "c"]
        assert sorted(obj.metadata.name for obj in jobs.by_index("team", "x")) == ["a", "b"]

        a = await aclient.get("jobs", "a", namespace)
        before = a.metadata.resource_version
        a.metadata.labels["team"] = "y"
        a = await aclient.update(a)
        await aclient.delete("jobs", "b", namespace)
        await aclient.create(job("d", namespace, team="x"))

        await async_wait_for(lambda: jobs.get(f"{namespace}/d") is not None and jobs.get(f"{namespace}/b") is None,
                             message="the informer to see the changes")
        assert Seen("MODIFIED", "a", a.metadata.resource_version, before) in seen
        assert any(s.type == "DELETED" and s.name == "b" for s in seen)
        assert sorted(obj.metadata.name for obj in jobs.by_index("team", "x")) == ["d"]
        assert sorted(obj.metadata.name for obj in jobs.by_index("team", "y")) == ["a", "c"]

        # A handler added late first hears about everything already cached.
        late: List[Seen] = []
        jobs.add_handler(recorder(late))
        assert sorted(s.name for s in late) == ["a", "c", "d"]
    finally:
        await informers.stop()


async def test_informer_relists_after_compaction_and_emits_the_differences(api_server, etcd, namespace, tmp_path):
    """The informer's API server goes away; meanwhile objects change and etcd is compacted. When
    the server returns, the informer's revision is gone: it re-lists and reports what changed."""
    import aetcd

    from tests.conftest import ServerThread, make_settings

    first = ServerThread(make_settings(tmp_path / "a"), etcd.endpoint).start()
    endpoint = first.endpoint
    writer = AsyncClient(endpoint=api_server.endpoint, settings=api_server.settings)
    client = AsyncClient(endpoint=endpoint, settings=make_settings(tmp_path / "client"))
    informers = InformerFactory(client)
    jobs = informers.informer("jobs", namespace)
    seen: List[Seen] = []
    jobs.add_handler(recorder(seen))
    second = None
    try:
        for name in ("keep", "change", "remove"):
            await writer.create(job(name, namespace))
        informers.start()
        await asyncio.wait_for(jobs.wait_synced(), 10)
        await async_wait_for(lambda: len(jobs) == 3, message="the first list")

        first.stop()
        change = await writer.get("jobs", "change", namespace)
        change.metadata.labels["changed"] = "yes"
        change = await writer.update(change)
        await writer.delete("jobs", "remove", namespace)
        added = await writer.create(job("added", namespace))
        async with aetcd.Client(*etcd.endpoint.split(":")) as etcd_client:
            await etcd_client.compact(added.metadata.resource_version)

        # The same address again, as a restarted server would have.
        second = ServerThread(make_settings(tmp_path / "b", api={"listen": endpoint}), etcd.endpoint).start()
        await async_wait_for(lambda: jobs.get(f"{namespace}/added") is not None, timeout=20,
                             message="the informer to re-list")
        assert sorted(jobs.keys()) == [f"{namespace}/added", f"{namespace}/change", f"{namespace}/keep"]
        assert jobs.get(f"{namespace}/change").metadata.labels["changed"] == "yes"
        after_sync = [(s.type, s.name) for s in seen[3:]]
        assert sorted(after_sync) == [("ADDED", "added"), ("DELETED", "remove"), ("MODIFIED", "change")]
        assert jobs.resource_version >= added.metadata.resource_version

        # And it watches on from the re-list.
        await writer.create(job("later", namespace))
        await async_wait_for(lambda: jobs.get(f"{namespace}/later") is not None, message="a change after re-list")
    finally:
        await informers.stop()
        await client.close()
        await writer.close()
        if second is not None:
            second.stop()


class CountingController(Controller):
    """Reconciles jobs; fails the first attempt at `fail_once` and conflicts once at `conflict_once`."""

    name = "counting"

    def __init__(self, client, informers=None, settings=None, fail_once="", conflict_once=""):
        super().__init__(client, informers, settings)
        self.jobs = self.informer("jobs")
        self.enqueue_on_change(self.jobs)
        self.cache_size_at_first_reconcile: Optional[int] = None
        self.reconciled: List[str] = []
        self.attempts: dict = {}
        self.fail_once, self.conflict_once = fail_once, conflict_once

    async def reconcile(self, key: str) -> Optional[float]:
        if self.cache_size_at_first_reconcile is None:
            self.cache_size_at_first_reconcile = len(self.jobs)
        self.attempts[key] = self.attempts.get(key, 0) + 1
        if key.endswith("/" + self.fail_once) and self.attempts[key] == 1:
            raise RuntimeError("boom")
        if key.endswith("/" + self.conflict_once) and self.attempts[key] == 1:
            raise ConflictError("changed under us")
        self.reconciled.append(key)
        return None


async def test_controller_starts_after_sync_and_retries_failures(aclient: AsyncClient, namespace):
    for name in ("one", "two", "bad", "busy"):
        await aclient.create(job(name, namespace))
    controller = CountingController(aclient, fail_once="bad", conflict_once="busy")
    task = asyncio.ensure_future(controller.run())
    try:
        keys = {key_of(namespace, name) for name in ("one", "two", "bad", "busy")}
        await async_wait_for(lambda: keys <= set(controller.reconciled), message="every job reconciled")
        assert controller.cache_size_at_first_reconcile >= 4, "workers must wait for the cache to sync"
        assert controller.attempts[key_of(namespace, "bad")] == 2
        assert controller.attempts[key_of(namespace, "busy")] == 2
        assert controller.queue.num_requeues(key_of(namespace, "bad")) == 0, "success resets the backoff"

        await aclient.create(job("three", namespace))
        await async_wait_for(lambda: key_of(namespace, "three") in controller.reconciled, message="a new job")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert controller.queue.shutting_down


async def test_event_recorder_counts_repeats_on_one_event(aclient: AsyncClient, namespace):
    target = await aclient.create(job("subject", namespace))
    events = EventRecorder(aclient, source="test")
    events.record(target, "Normal", "Started", "it started")
    events.record(target, "Normal", "Started", "it started")
    events.record(target, "Warning", "Failed", "it failed")
    await events.close()
    listed = (await aclient.list("events", namespace)).items
    summary = sorted((e.spec.reason, e.spec.type, e.spec.count, e.spec.involved_name, e.spec.involved_kind,
                      e.spec.source) for e in listed)
    assert summary == [("Failed", "Warning", 1, "subject", "Job", "test"),
                       ("Started", "Normal", 2, "subject", "Job", "test")]
    started = next(e for e in listed if e.spec.reason == "Started")
    assert started.spec.involved_uid == target.metadata.uid
    assert started.spec.last_time.ToNanoseconds() >= started.spec.first_time.ToNanoseconds()


def fast_election(settings, **changes):
    return dataclasses.replace(settings.controllers, lease_duration=2.0, renew_deadline=1.5, retry_period=0.1,
                               **changes)


async def test_leader_election_hands_over_on_release_and_a_deposed_leader_stops(aclient: AsyncClient, namespace):
    # A namespace that does not exist yet: the first candidate creates it.
    runtime = fast_election(aclient.settings, lease_namespace=f"{namespace}-leases")
    leading = {"a": asyncio.Event(), "b": asyncio.Event()}
    stopped = {"a": asyncio.Event(), "b": asyncio.Event()}

    def lead_as(name):
        async def lead():
            leading[name].set()
            try:
                await asyncio.Event().wait()
            finally:
                stopped[name].set()
        return lead

    first = LeaderElector(aclient, "a", runtime)
    second = LeaderElector(aclient, "b", runtime)
    first_task = asyncio.ensure_future(first.run(lead_as("a")))
    await asyncio.wait_for(leading["a"].wait(), 5)
    second_task = asyncio.ensure_future(second.run(lead_as("b")))
    try:
        await asyncio.sleep(0.5)  # several of b's attempts: it must stay standby while a renews
        assert not leading["b"].is_set() and first.is_leader and not second.is_leader
        lease = await aclient.get("leases", runtime.lease_name, runtime.lease_namespace)
        assert lease.spec.holder_identity == "a"

        # Shutdown releases the lease: b takes over without waiting for it to expire.
        first_task.cancel()
        await asyncio.gather(first_task, return_exceptions=True)
        assert stopped["a"].is_set()
        await asyncio.wait_for(leading["b"].wait(), 1.0)
        lease = await aclient.get("leases", runtime.lease_name, runtime.lease_namespace)
        assert lease.spec.holder_identity == "b" and lease.spec.lease_transitions == 1

        # Someone else takes the lease from b: b must stop acting.
        lease.spec.holder_identity = "intruder"
        await aclient.update(lease)
        await asyncio.wait_for(stopped["b"].wait(), runtime.renew_deadline + 1)
        assert not second.is_leader
    finally:
        second_task.cancel()
        await asyncio.gather(first_task, second_task, return_exceptions=True)


def test_leader_election_rejects_timings_that_cannot_be_safe():
    from skyshift import config

    settings = config.ControllerSettings(lease_duration=2, renew_deadline=3, retry_period=0.5)
    with pytest.raises(ValueError, match="renew_deadline"):
        LeaderElector(None, "x", settings)


async def test_a_deleted_lease_is_created_again(aclient: AsyncClient, namespace):
    runtime = fast_election(aclient.settings, lease_namespace=namespace)
    elector = LeaderElector(aclient, "solo", runtime)
    leading = asyncio.Event()

    async def lead():
        leading.set()
        await asyncio.Event().wait()

    task = asyncio.ensure_future(elector.run(lead))
    try:
        await asyncio.wait_for(leading.wait(), 5)
        await aclient.delete("leases", runtime.lease_name, namespace)

        async def recreated():
            try:
                lease = await aclient.get("leases", runtime.lease_name, namespace)
            except NotFoundError:
                return False
            return lease.spec.holder_identity == "solo"
        await async_wait_for(recreated, 5, message="the lease to be created again")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
