"""The informer's cache: watch events, re-list differences, secondary indexes."""
from __future__ import annotations

from skyshift.runtime.informer import Cache, key_of, object_key, split_key
from skyshift.v1 import objects_pb2 as pb


def replica(name: str, cluster: str = "", version: int = 1, namespace: str = "ns") -> pb.Replica:
    obj = pb.Replica()
    obj.metadata.name = name
    obj.metadata.namespace = namespace
    obj.metadata.resource_version = version
    obj.spec.cluster = cluster
    return obj


def by_cluster(obj):
    return [obj.spec.cluster] if obj.spec.cluster else []


def names(objects):
    return sorted(obj.metadata.name for obj in objects)


def test_keys_are_namespace_slash_name_or_name_when_cluster_scoped():
    cluster = pb.Cluster()
    cluster.metadata.name = "c1"
    assert object_key(cluster) == "c1" and split_key("c1") == ("", "c1")
    assert object_key(replica("r")) == "ns/r" == key_of("ns", "r")
    assert split_key("ns/r") == ("ns", "r")


def test_apply_returns_the_previous_version_and_keeps_indexes_current():
    cache = Cache()
    cache.add_index("cluster", by_cluster)
    assert cache.apply("ADDED", replica("a", "c1", 1)) is None
    cache.apply("ADDED", replica("b", "c1", 2))
    assert names(cache.by_index("cluster", "c1")) == ["a", "b"]

    old = cache.apply("MODIFIED", replica("a", "c2", 3))
    assert old.spec.cluster == "c1" and old.metadata.resource_version == 1
    assert names(cache.by_index("cluster", "c1")) == ["b"]
    assert names(cache.by_index("cluster", "c2")) == ["a"]

    removed = cache.apply("DELETED", replica("b", "c1", 4))
    assert removed.metadata.resource_version == 2
    assert cache.get("ns/b") is None
    assert cache.by_index("cluster", "c1") == []
    assert cache.index_values("cluster") == ["c2"]
    assert len(cache) == 1


def test_an_index_added_later_covers_existing_objects():
    cache = Cache()
    cache.apply("ADDED", replica("a", "c1"))
    cache.apply("ADDED", replica("b"))
    cache.add_index("cluster", by_cluster)
    assert names(cache.by_index("cluster", "c1")) == ["a"]
    assert cache.by_index("cluster", "") == []


def test_relist_emits_exactly_the_differences():
    cache = Cache()
    cache.add_index("cluster", by_cluster)
    for obj in (replica("same", "c1", 1), replica("changed", "c1", 2), replica("gone", "c1", 3)):
        cache.apply("ADDED", obj)

    fresh = [replica("same", "c1", 1), replica("changed", "c2", 7), replica("new", "c3", 8)]
    changes = cache.replace(fresh, revision=9)

    summary = sorted((event_type, obj.metadata.name, old.metadata.resource_version if old else None)
                     for event_type, obj, old in changes)
    assert summary == [("ADDED", "new", None), ("DELETED", "gone", None), ("MODIFIED", "changed", 2)]
    deleted = next(obj for event_type, obj, _ in changes if event_type == "DELETED")
    assert deleted.metadata.resource_version == 3, "DELETED carries the last known version"
    assert sorted(cache.keys()) == ["ns/changed", "ns/new", "ns/same"]
    assert names(cache.by_index("cluster", "c1")) == ["same"]
    assert names(cache.by_index("cluster", "c2")) == ["changed"]


def test_relist_of_an_empty_cache_adds_everything_and_of_nothing_deletes_everything():
    cache = Cache()
    changes = cache.replace([replica("a"), replica("b")], revision=5)
    assert sorted((t, o.metadata.name) for t, o, _ in changes) == [("ADDED", "a"), ("ADDED", "b")]
    changes = cache.replace([], revision=6)
    assert sorted((t, o.metadata.name) for t, o, _ in changes) == [("DELETED", "a"), ("DELETED", "b")]
    assert len(cache) == 0


def test_an_index_name_means_one_index_for_every_user_of_the_cache():
    cache = Cache()
    cache.apply("ADDED", replica("a", "c1"))
    cache.add_index("cluster", by_cluster)
    cache.add_index("cluster", lambda obj: ["something else"])  # a second controller sharing the informer
    assert names(cache.by_index("cluster", "c1")) == ["a"]
    assert cache.index_values("cluster") == ["c1"]
