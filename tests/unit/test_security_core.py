"""The pure parts of security: tokens, identities, RBAC decisions, quotas, token buckets, certificates."""
from __future__ import annotations

import time

import pytest
from cryptography import x509

from api_server import auth, rbac, tls
from api_server.limits import TokenBucket
from api_server.quota import job_usage, parse_quotas
from skyshift import tokens
from skyshift.api import kinds
from skyshift.api.errors import InvalidError, PermissionDeniedError
from skyshift.v1 import objects_pb2 as pb

JOBS, REPLICAS, CLUSTERS, NAMESPACES = (kinds.resolve(k) for k in ("jobs", "replicas", "clusters", "namespaces"))


class FakeCache:
    """What the Authorizer reads of an ObjectCache."""

    def __init__(self, *objects):
        self.objects = {o.metadata.name: o for o in objects}
        self.version = 1

    def get(self, name):
        return self.objects.get(name)

    def values(self):
        return self.objects.values()


def role(name, *rules):
    result = pb.Role(metadata=pb.ObjectMeta(name=name))
    for resources, verbs, namespaces in rules:
        result.spec.rules.add(resources=resources, verbs=verbs, namespaces=namespaces)
    return result


def binding(name, role_name, users, namespaces=()):
    return pb.RoleBinding(metadata=pb.ObjectMeta(name=name),
                          spec=pb.RoleBindingSpec(role=role_name, users=users, namespaces=list(namespaces)))


def authorizer(*bindings):
    roles = [role(name, *[(list(r.resources), list(r.verbs), list(r.namespaces)) for r in rules])
             for name, rules in rbac.BUILTIN_ROLES.items()]
    roles.append(role("reader", (["jobs"], ["get"], ["a"])))
    return rbac.Authorizer(FakeCache(*roles), FakeCache(*bindings))


ALICE = auth.Identity("alice", auth.USER)


# ---------------------------------------------------------------------------- tokens


def test_tokens_are_random_hashed_and_pruned():
    user = tokens.new_user("u")
    secrets = [tokens.add_token(user, keep=3)[0] for _ in range(5)]
    assert len(set(secrets)) == 5 and all(len(s) >= 43 for s in secrets)
    assert [t.hash for t in user.status.tokens] == [tokens.hash_token(s) for s in secrets[-3:]]
    assert not tokens.has_token(user, secrets[0]) and tokens.has_token(user, secrets[-1])
    user.status.tokens[-1].revoked = True
    assert not tokens.has_token(user, secrets[-1])


def test_tokens_expire():
    user = tokens.new_user("u")
    secret, record = tokens.add_token(user, ttl=60)
    assert tokens.is_valid(record) and not tokens.is_valid(record, time.time() + 61)


def test_skylet_users_have_valid_names_for_any_cluster():
    assert tokens.skylet_user("local").metadata.name == "skylet-local"
    long = tokens.skylet_user("c" * 63)
    assert len(long.metadata.name) <= 63 and long.metadata.labels[tokens.CLUSTER_LABEL] == "c" * 63


def test_identities_come_from_labels():
    assert auth.identity_of(tokens.new_user("bob")) == auth.Identity("bob", auth.USER)
    assert str(auth.identity_of(tokens.skylet_user("c1"))) == "skylet:c1"
    manager = tokens.new_user("m", {tokens.IDENTITY_LABEL: tokens.MANAGER})
    assert str(auth.identity_of(manager)) == "manager"
    assert auth.identity_of(tokens.new_user("x", {tokens.IDENTITY_LABEL: "root"})) is None
    assert auth.identity_of(tokens.new_user("x", {tokens.IDENTITY_LABEL: tokens.SKYLET})) is None  # no cluster


def test_bearer_tokens_are_read_from_metadata():
    assert auth.bearer_token((("x", "1"), ("authorization", "Bearer abc "))) == "abc"
    assert auth.bearer_token((("authorization", "bearer abc"),)) == "abc"
    assert auth.bearer_token((("authorization", "Basic abc"),)) == ""
    assert auth.bearer_token(()) == ""


# ---------------------------------------------------------------------------- rbac


def test_namespace_scoped_bindings_reach_only_their_namespaces():
    rules = authorizer(binding("b", "editor", ["alice"], ["a"]))
    assert rules.decide(ALICE, rbac.Action("delete", JOBS, "a", "j")).allowed
    assert not rules.decide(ALICE, rbac.Action("get", JOBS, "b", "j")).allowed
    listing = rules.decide(ALICE, rbac.Action("list", JOBS, ""))
    assert listing.allowed and listing.visible(pb.Job(metadata=pb.ObjectMeta(namespace="a")))
    assert not listing.visible(pb.Job(metadata=pb.ObjectMeta(namespace="b")))
    assert not rules.decide(ALICE, rbac.Action("get", CLUSTERS, "", "c")).allowed
    assert rules.decide(ALICE, rbac.Action("get", NAMESPACES, "", "a")).allowed
    assert not rules.decide(ALICE, rbac.Action("get", NAMESPACES, "", "b")).allowed
    assert not rules.decide(ALICE, rbac.Action("delete", NAMESPACES, "", "a")).allowed


def test_unbound_users_and_missing_roles_get_nothing():
    rules = authorizer(binding("b", "no-such-role", ["alice"]))
    for verb in rbac.VERBS:
        assert not rules.decide(ALICE, rbac.Action(verb, JOBS, "a")).allowed


def test_rules_narrowed_by_rule_and_binding_namespaces():
    rules = authorizer(binding("b", "reader", ["alice"]), binding("v", "viewer", ["alice"], ["c"]))
    assert rules.decide(ALICE, rbac.Action("get", JOBS, "a", "j")).allowed
    assert not rules.decide(ALICE, rbac.Action("list", JOBS, "a")).allowed
    assert rules.decide(ALICE, rbac.Action("list", JOBS, "c")).allowed
    assert not rules.decide(ALICE, rbac.Action("list", kinds.resolve("users"), "")).allowed


def test_skylets_touch_only_their_cluster():
    skylet = auth.Identity("skylet-c1", auth.SKYLET, "c1")
    rules = authorizer()
    mine = pb.Replica(spec=pb.ReplicaSpec(cluster="c1"))
    theirs = pb.Replica(spec=pb.ReplicaSpec(cluster="c2"))
    update = rules.decide(skylet, rbac.Action("update", REPLICAS, "ns", "r", mine, status=True))
    assert update.allowed
    update.check_stored(REPLICAS, mine)
    with pytest.raises(PermissionDeniedError, match='not bound to cluster "c1"'):
        update.check_stored(REPLICAS, theirs)
    assert not rules.decide(skylet, rbac.Action("update", REPLICAS, "ns", "r", theirs)).allowed
    assert not rules.decide(skylet, rbac.Action("delete", REPLICAS, "ns", "r")).allowed
    assert not rules.decide(skylet, rbac.Action("update", CLUSTERS, "", "c2", status=True)).allowed
    assert rules.decide(skylet, rbac.Action("update", CLUSTERS, "", "c1", status=True)).allowed
    assert not rules.decide(skylet, rbac.Action("create", JOBS, "ns", "j")).allowed


def test_combined_decisions_share_one_stored_check():
    skylet = auth.Identity("skylet-c1", auth.SKYLET, "c1")
    replica = pb.Replica(spec=pb.ReplicaSpec(cluster="c1"))
    decisions = [rbac.decide_for_skylet(skylet, rbac.Action("update", REPLICAS, "ns", f"r{i}", replica, True))
                 for i in range(3)]
    assert len({d.check_stored for d in decisions}) == 1
    assert rbac.combine(decisions).allowed
    assert not rbac.combine(decisions + [rbac.deny(skylet, rbac.Action("delete", JOBS))]).allowed


# ---------------------------------------------------------------------------- quotas, limits, tls


def test_quota_annotations_parse_and_jobs_use_replicas_times_resources():
    assert parse_quotas({"quota.skyshift.dev/cpus": "4", "other": "x"}) == {"cpus": 4.0}
    for bad in ({"quota.skyshift.dev/cpus": "-1"}, {"quota.skyshift.dev/cpus": "many"},
                {"quota.skyshift.dev/disks": "1"}):
        with pytest.raises(InvalidError):
            parse_quotas(bad)
    job = pb.Job(spec=pb.JobSpec(replicas=3, resources={"cpus": 2, "memory": 100, "gpus": 1, "V100": 2, "disk": 9}))
    assert job_usage(job) == {"cpus": 6, "memory": 300, "gpus": 9, "replicas": 3}


def test_token_buckets_admit_the_rate_and_push_back_floods():
    bucket = TokenBucket(rate=10, burst=5, now=0.0)
    assert [bucket.take(0.0) for _ in range(5)] == [0.0] * 5
    waits = [bucket.take(0.0) for _ in range(20)]
    assert all(w > 0 for w in waits) and waits == sorted(waits)  # the more it insists, the longer it waits
    assert waits[-1] <= 1.0 + 1 / 10  # at most one second's worth of debt
    assert bucket.take(5.0) == 0.0  # after backing off it is admitted again


def test_generated_certificates_name_their_hosts():
    ca_cert, ca_key = tls.make_ca("test", 1)
    cert_pem, _ = tls.issue_certificate(ca_cert, ca_key, "server", ["127.0.0.1", "localhost"])
    cert = x509.load_pem_x509_certificate(cert_pem)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(n.value) for n in names] == ["127.0.0.1", "localhost"]
    assert cert.issuer == x509.load_pem_x509_certificate(ca_cert).subject
