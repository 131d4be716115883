"""Namespaces and names whose one is a prefix of the other never see each other's objects
(the original SkyShift listed `pfx2`'s jobs in `pfx`)."""
import pytest

from skyshift.api.errors import AlreadyExistsError, NotFoundError
from tests.integration.api_helpers import events_until, names, new_job, new_namespace, next_event

PFX, PFX2 = "pfx", "pfx2"


@pytest.fixture
def prefix_namespaces(client):
    for name in (PFX, PFX2):
        try:
            client.create(new_namespace(name))
        except AlreadyExistsError:
            pass
    yield PFX, PFX2
    for name in (PFX, PFX2):
        for job in client.list_all("jobs", name).items:
            client.delete("jobs", job.metadata.name, name)


def test_list_and_get_stay_in_their_namespace(client, prefix_namespaces):
    for namespace in (PFX, PFX2):
        client.create(new_job("web", namespace, labels={"app": "web"}))
        client.create(new_job(f"only-in-{namespace}", namespace, labels={"app": "web"}))
    assert names(client.list("jobs", PFX).items) == ["only-in-pfx", "web"]
    assert names(client.list("jobs", PFX2).items) == ["only-in-pfx2", "web"]
    assert names(client.list("jobs", PFX, label_selector="app=web").items) == ["only-in-pfx", "web"]
    assert names(client.list("jobs", PFX, field_selector="metadata.name=only-in-pfx2").items) == []
    # Paged lists stay inside the namespace too.
    assert names(client.list_all("jobs", PFX, page_size=1).items) == ["only-in-pfx", "web"]
    assert client.get("jobs", "web", PFX).metadata.uid != client.get("jobs", "web", PFX2).metadata.uid
    with pytest.raises(NotFoundError):
        client.get("jobs", "only-in-pfx2", PFX)
    # Deleting in one namespace leaves the other's object alone.
    client.delete("jobs", "web", PFX2)
    assert client.get("jobs", "web", PFX).metadata.namespace == PFX
    everywhere = client.list("jobs", "").items
    assert {(j.metadata.namespace, j.metadata.name) for j in everywhere} >= {
        (PFX, "web"), (PFX, "only-in-pfx"), (PFX2, "only-in-pfx2")}


async def live_watch(aclient, client, opener, **selection):
    """A watch stream that is known to be subscribed: it has delivered the ADDED of `opener`,
    created after the stream's start revision. Returns (stream, start revision)."""
    start = client.list("jobs", opener.metadata.namespace).resource_version
    client.create(opener)
    stream = aclient.watch("jobs", resource_version=start, **selection)
    first = await next_event(stream)
    assert (first.type, first.object.metadata.name) == ("ADDED", opener.metadata.name)
    return stream, start


def summary(events):
    return [(e.type, e.object.metadata.namespace, e.object.metadata.name) for e in events]


async def test_namespace_watch_never_sees_the_other_namespace(aclient, client, prefix_namespaces):
    live, start = await live_watch(aclient, client, new_job("opener", PFX), namespace=PFX)
    for namespace in (PFX2, PFX):
        created = client.create(new_job("w", namespace))
        created.spec.run = "changed"
        client.update(created)
        client.delete("jobs", "w", namespace)
    client.create(new_job("sentinel", PFX))
    expected = [("ADDED", PFX, "w"), ("MODIFIED", PFX, "w"), ("DELETED", PFX, "w"), ("ADDED", PFX, "sentinel")]
    is_sentinel = lambda e: e.object.metadata.name == "sentinel"  # noqa: E731
    assert summary(await events_until(live, is_sentinel)) == expected
    # The same history replayed to a watch that starts later.
    replay = aclient.watch("jobs", PFX, resource_version=start)
    assert summary(await events_until(replay, is_sentinel)) == [("ADDED", PFX, "opener")] + expected
    await live.aclose()
    await replay.aclose()


async def test_watch_on_one_object_never_receives_another_objects_events(aclient, client, prefix_namespaces):
    live, start = await live_watch(aclient, client, new_job("app", PFX), namespace=PFX, name="app")
    # Names sharing a prefix with "app" and the same name in the other namespace, then "app" itself.
    for namespace, name in ((PFX, "app2"), (PFX, "ap"), (PFX, "app-1"), (PFX2, "app")):
        created = client.create(new_job(name, namespace))
        created.metadata.labels["touched"] = "yes"
        client.update(created)
    for namespace, name in ((PFX, "app2"), (PFX2, "app"), (PFX, "app")):
        client.delete("jobs", name, namespace)
    expected = [("DELETED", PFX, "app")]
    assert summary(await events_until(live, lambda e: e.type == "DELETED")) == expected
    replay = aclient.watch("jobs", PFX, name="app", resource_version=start)
    assert summary(await events_until(replay, lambda e: e.type == "DELETED")) == [("ADDED", PFX, "app")] + expected
    await live.aclose()
    await replay.aclose()
