"""Watches as a user sees them: resuming, compaction and re-listing, fan-out of many streams
over one etcd watch per kind, and slow clients."""
import asyncio
import queue
import threading
import urllib.request

import grpc
import pytest

from skyshift.api import kinds
from skyshift.api.errors import GoneError, NotFoundError, SkyShiftError
from skyshift.client import AsyncClient, Client
from skyshift.config import EtcdSettings
from skyshift.store.etcd import Store
from skyshift.v1 import api_pb2, api_pb2_grpc
from tests.conftest import ServerThread, async_wait_for, make_settings, wait_for
from tests.integration.api_helpers import (async_server_state, events_until, new_job, new_namespace, next_event,
                                          server_state, watcher_count)

SMALL_CACHE = 50


# ---------------------------------------------------------------- helpers


def job_watchers(server: ServerThread) -> list:
    return server_state(server, lambda s: list(s.watch_cache.caches["jobs"].watchers()))


def etcd_watch_streams(etcd) -> int:
    """Watch streams open on the etcd server, from its own metrics."""
    with urllib.request.urlopen(f"http://{etcd.endpoint}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("etcd_debugging_mvcc_watch_stream_total "):
                return int(float(line.split()[1]))
    raise AssertionError("etcd does not report etcd_debugging_mvcc_watch_stream_total")


async def compact_store(etcd) -> int:
    """Compact etcd's history up to its current revision; returns that revision."""
    store = Store(EtcdSettings(), etcd.endpoint)
    await store.connect()
    try:
        revision = await store.revision()
        await store.compact(revision)
        return revision
    finally:
        await store.close()


def touch(client: Client, job, times: int):
    """`times` spec updates of `job`; returns the last version."""
    for number in range(times):
        job.spec.run = f"update {number}"
        job = client.update(job)
    return job


@pytest.fixture
def server_factory(etcd, tmp_path):
    """Dedicated API servers on the session etcd, stopped at the end of the test."""
    servers = []

    def start(name: str = "server", **overrides) -> ServerThread:
        server = ServerThread(make_settings(tmp_path / name, **overrides), etcd.endpoint).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        if server.thread.is_alive():  # not already stopped by the test
            server.stop()


def client_for(server: ServerThread) -> Client:
    return Client(endpoint=server.endpoint, settings=server.settings)


# ---------------------------------------------------------------- resume


async def test_resumed_watch_misses_nothing_and_repeats_nothing(aclient, client, namespace):
    start = client.list("jobs", namespace).resource_version
    reference = aclient.watch("jobs", namespace, resource_version=start)
    written = []          # (type, name) of every write, in order
    resumed = []          # what a client that keeps breaking its stream sees
    resume_from = start
    for chunk in range(8):
        for index in range(6):
            name = f"j{(chunk + index) % 5}"
            try:
                job = client.get("jobs", name, namespace)
            except NotFoundError:
                client.create(new_job(name, namespace))
                written.append(("ADDED", name))
                continue
            if index % 3 == 2:
                client.delete("jobs", name, namespace)
                written.append(("DELETED", name))
            else:
                job.metadata.labels["chunk"] = str(chunk)
                client.update(job)
                written.append(("MODIFIED", name))
        # Read part of what is new, then break the stream and resume later from the last revision.
        stream = aclient.watch("jobs", namespace, resource_version=resume_from)
        for _ in range(chunk % 4 + 1):
            event = await next_event(stream)
            resumed.append(event)
            resume_from = event.resource_version
        await stream.aclose()
    client.create(new_job("sentinel", namespace))
    written.append(("ADDED", "sentinel"))
    stream = aclient.watch("jobs", namespace, resource_version=resume_from)
    resumed += await events_until(stream, lambda e: e.object.metadata.name == "sentinel")
    await stream.aclose()

    full = await events_until(reference, lambda e: e.object.metadata.name == "sentinel")
    await reference.aclose()
    assert [(e.type, e.object.metadata.name) for e in full] == written
    assert [(e.type, e.resource_version, e.object) for e in resumed] == \
        [(e.type, e.resource_version, e.object) for e in full]
    revisions = [e.resource_version for e in resumed]
    assert revisions == sorted(set(revisions))


# ---------------------------------------------------------------- compaction


def test_watch_from_a_compacted_revision_is_out_of_range(server_factory, client, namespace, etcd):
    early = client.create(new_job("early", namespace))
    latest = touch(client, early, SMALL_CACHE + 10)
    compacted_at = asyncio.run(compact_store(etcd))
    assert compacted_at >= latest.metadata.resource_version
    server = server_factory("small-cache", watch={"cache_events_per_kind": SMALL_CACHE})

    with client_for(server) as sdk:
        with pytest.raises(GoneError) as caught:
            next(iter(sdk.watch("jobs", namespace, resource_version=early.metadata.resource_version)))
        assert caught.value.code == grpc.StatusCode.OUT_OF_RANGE
        assert "re-list" in caught.value.message
        # A watch from the current revision still works.
        stream = sdk.watch("jobs", namespace, resource_version=latest.metadata.resource_version)
        client.create(new_job("later", namespace))
        event = next(iter(stream))
        assert (event.type, event.object.metadata.name) == ("ADDED", "later")
        stream.close()

    channel = grpc.insecure_channel(server.endpoint)
    try:
        stub = api_pb2_grpc.ObjectServiceStub(channel)
        raw = stub.Watch(api_pb2.WatchRequest(kind="jobs", namespace=namespace,
                                              resource_version=early.metadata.resource_version), timeout=10)
        with pytest.raises(grpc.RpcError) as raw_error:
            next(raw)
        assert raw_error.value.code() == grpc.StatusCode.OUT_OF_RANGE
    finally:
        channel.close()

    # Reads of compacted revisions are OUT_OF_RANGE too, and history stops at the compaction.
    with pytest.raises(GoneError):
        client.get("jobs", "early", namespace, at_revision=early.metadata.resource_version)
    assert client.get("jobs", "early", namespace, at_revision=latest.metadata.resource_version) == latest
    assert client.history("jobs", "early", namespace) == [latest]


def test_list_watch_re_lists_after_compaction_and_continues(server_factory, client, namespace, etcd):
    for name in ("keep", "gone", "changed"):
        client.create(new_job(name, namespace))
    first = server_factory("first", watch={"cache_events_per_kind": SMALL_CACHE})
    port = first.endpoint.rpartition(":")[2]
    events: "queue.Queue" = queue.Queue()
    sdk = client_for(first)

    def consume():
        try:
            for event in sdk.list_watch("jobs", namespace):
                events.put(event)
        except SkyShiftError as error:  # the channel closed at the end of the test
            events.put(error)

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()

    def take(count):
        return [(e.type, e.object.metadata.name) for e in (events.get(timeout=20) for _ in range(count))]

    try:
        assert sorted(take(3)) == [("ADDED", "changed"), ("ADDED", "gone"), ("ADDED", "keep")]
        client.create(new_job("live", namespace))
        assert take(1) == [("ADDED", "live")]
        last_seen = client.get("jobs", "live", namespace).metadata.resource_version

        first.stop()  # the client is disconnected and keeps retrying
        client.create(new_job("born", namespace))
        client.delete("jobs", "gone", namespace)
        touch(client, client.get("jobs", "changed", namespace), 1)
        client.create(new_namespace(f"{namespace}-fill"))
        filler = client.create(new_job("filler", f"{namespace}-fill"))
        touch(client, filler, SMALL_CACHE + 10)  # pushes the revision the client knows out of any cache
        asyncio.run(compact_store(etcd))

        second = server_factory("second", api={"listen": f"127.0.0.1:{port}"},
                                watch={"cache_events_per_kind": SMALL_CACHE})
        with client_for(second) as probe:
            with pytest.raises(GoneError):  # so the client cannot simply resume: it must re-list
                next(iter(probe.watch("jobs", namespace, resource_version=last_seen)))
        assert sorted(take(3)) == [("ADDED", "born"), ("DELETED", "gone"), ("MODIFIED", "changed")]
        client.create(new_job("after", namespace))
        assert take(1) == [("ADDED", "after")]
        assert events.empty()
    finally:
        sdk.close()
        consumer.join(10)


# ---------------------------------------------------------------- fan-out


async def test_many_watch_streams_share_one_etcd_watch_per_kind_and_leave_nothing(server_factory, client,
                                                                                   namespace, etcd):
    streams_count = 200
    server = await asyncio.to_thread(server_factory, "fan-out")
    kind_count = len(list(kinds.all_kinds()))
    await asyncio.to_thread(wait_for, lambda: server_state(server, lambda s: s.watch_cache.etcd_watch_count)
                            == kind_count)
    # Every cache has heard from its etcd watch, so etcd's count below includes them.
    await asyncio.to_thread(wait_for, lambda: server_state(
        server, lambda s: all(c.ready.is_set() for c in s.watch_cache.caches.values())))
    etcd_streams = etcd_watch_streams(etcd)
    tasks_before = await async_server_state(server, lambda s: len(asyncio.all_tasks()))
    threads_before = threading.active_count()
    start = client.list("jobs", namespace).resource_version

    # Half the streams share one channel and are closed one by one; the others are on a second
    # channel that is closed abruptly.
    polite = AsyncClient(endpoint=server.endpoint, settings=server.settings)
    abrupt = AsyncClient(endpoint=server.endpoint, settings=server.settings)
    streams = [(polite if i % 2 else abrupt).watch("jobs", namespace, resource_version=start)
               for i in range(streams_count)]
    client.create(new_job("ping", namespace))
    firsts = await asyncio.gather(*(next_event(s, 30) for s in streams))
    assert {(e.type, e.object.metadata.name) for e in firsts} == {("ADDED", "ping")}

    assert await async_server_state(server, lambda s: s.watch_cache.watcher_count) == streams_count
    assert await async_server_state(server, lambda s: s.watch_cache.etcd_watch_count) == kind_count
    assert etcd_watch_streams(etcd) == etcd_streams
    client.create(new_job("pong", namespace))  # a live event reaches every stream
    seconds = await asyncio.gather(*(next_event(s, 30) for s in streams))
    assert {(e.type, e.object.metadata.name) for e in seconds} == {("ADDED", "pong")}

    for stream in streams[1::2]:
        await stream.aclose()
    await abrupt.close()
    await polite.close()

    async def nothing_left():
        watchers, tasks = await async_server_state(server, lambda s: (s.watch_cache.watcher_count,
                                                                      len(asyncio.all_tasks())))
        return watchers == 0 and tasks <= tasks_before
    await async_wait_for(nothing_left, timeout=20, message="the server to drop every stream and its tasks")
    assert await async_server_state(server, lambda s: s.watch_cache.etcd_watch_count) == kind_count
    assert etcd_watch_streams(etcd) == etcd_streams
    assert threading.active_count() <= threads_before


# ---------------------------------------------------------------- slow clients


def big_job(name, namespace):
    return new_job(name, namespace, run="x" * 64_000)


def flood_until_cut_off(client: Client, server: ServerThread, job, limit: int = 2000):
    """Update `job` (large, so transport buffers fill quickly) until the server has cut off
    every watcher. Returns the revisions written."""
    revisions = []
    for number in range(limit):
        job.spec.run = f"{number} " + "x" * 64_000
        job = client.update(job)
        revisions.append(job.metadata.resource_version)
        if watcher_count(server) == 0:
            return revisions
    raise AssertionError(f"the server did not cut off a client that read nothing for {limit} events")


def test_slow_client_is_cut_off_with_unavailable(server_factory, client, namespace):
    server = server_factory("slow", watch={"client_queue_events": 8})
    job = client.create(big_job("flood", namespace))
    channel = grpc.insecure_channel(server.endpoint)
    try:
        stream = api_pb2_grpc.ObjectServiceStub(channel).Watch(
            api_pb2.WatchRequest(kind="jobs", namespace=namespace, resource_version=job.metadata.resource_version))
        wait_for(lambda: watcher_count(server) == 1, message="the stream to subscribe")
        written = flood_until_cut_off(client, server, job)
        received = []
        with pytest.raises(grpc.RpcError) as caught:
            for event in stream:
                received.append(event.resource_version)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "resume from your last resource_version" in caught.value.details()
        # What arrived before the cut is an unbroken prefix of what was written.
        assert received and received == written[:len(received)]
    finally:
        channel.close()


def test_sdk_watch_resumes_after_being_cut_off_without_gaps_or_repeats(server_factory, client, namespace):
    server = server_factory("slow-sdk", watch={"client_queue_events": 8})
    job = client.create(big_job("flood", namespace))
    with client_for(server) as sdk:
        events = sdk.watch("jobs", namespace, resource_version=job.metadata.resource_version)
        job.spec.run = "first"
        job = client.update(job)
        first = next(events)
        assert first.resource_version == job.metadata.resource_version
        [cut_off] = job_watchers(server)
        written = flood_until_cut_off(client, server, job)
        received = []
        while not received or received[-1] < written[-1]:
            received.append(next(events).resource_version)
        assert received == written
        [resumed] = job_watchers(server)
        assert resumed is not cut_off  # the SDK opened a new stream
        events.close()
    wait_for(lambda: watcher_count(server) == 0, message="the resumed stream to go away")


def test_watch_resuming_further_behind_than_its_queue_catches_up(server_factory, client, namespace):
    """A stream that starts from history longer than the live queue must still deliver all of
    it: being cut off before it starts would make the SDK resume from the same revision forever."""
    server = server_factory("catch-up", watch={"client_queue_events": 8})
    start = client.create(big_job("history", namespace)).metadata.resource_version
    written = [job.metadata.resource_version for job in
               (client.create(new_job(f"h-{index}", namespace)) for index in range(100))]
    with client_for(server) as sdk:
        events = sdk.watch("jobs", namespace, resource_version=start)
        received = [next(events).resource_version for _ in written]
        events.close()
    assert received == written
