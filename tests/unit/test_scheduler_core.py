"""The pure scheduling core: capacity ledger, plugins and the batch framework."""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence

import pytest

from skyshift.v1 import objects_pb2 as pb

from scheduler.capacity import CapacityLedger
from scheduler.framework import default_framework
from scheduler.plugins import (ClusterReady, DriverCapabilities, FilterPolicies, LeastAllocated, NodeFit,
                               PlacementFilters, PolicyMatcher, Preferences, Request, Spread, State)

WEIGHTS = {"Preferences": 3, "Spread": 2, "LeastAllocated": 1}


def cluster(name: str, nodes: Optional[Mapping[str, Mapping[str, float]]] = None, phase: str = "READY",
            labels: Optional[Mapping[str, str]] = None, capabilities: Sequence[str] = (),
            revision: int = 1, heartbeat: int = 0) -> pb.Cluster:
    nodes = {"n1": {"cpus": 8, "memory": 8192}} if nodes is None else nodes
    obj = pb.Cluster(metadata=pb.ObjectMeta(name=name, labels=labels or {}, resource_version=revision))
    obj.status.phase = phase
    obj.status.capabilities.extend(capabilities)
    obj.status.heartbeat_time.seconds = heartbeat
    for node, resources in nodes.items():
        obj.status.capacity[node].resources.update(resources)
        obj.status.allocatable[node].resources.update(resources)
    return obj


def replica(name: str, resources: Optional[Mapping[str, float]] = None, job: str = "", namespace: str = "ns",
            labels: Optional[Mapping[str, str]] = None, gang: bool = False, replicas: int = 1, image: str = "",
            placement: Optional[pb.Placement] = None, cluster_name: str = "", node: str = "", phase: str = "",
            revision: int = 1, uid: str = "") -> pb.Replica:
    obj = pb.Replica(metadata=pb.ObjectMeta(name=name, namespace=namespace, labels=labels or {},
                                            uid=uid or f"uid-{name}", resource_version=revision))
    spec = obj.spec
    spec.job_name = job or name
    spec.template.resources.update(resources if resources is not None else {"cpus": 1})
    spec.template.gang = gang
    spec.template.replicas = replicas
    spec.template.image = image
    if placement is not None:
        spec.template.placement.CopyFrom(placement)
    spec.cluster, spec.node = cluster_name, node
    obj.status.phase = phase
    return obj


def request(*args, **kwargs) -> Request:
    return Request.from_replica(replica(*args, **kwargs))


def term(name: str = "", match_labels: Optional[Dict[str, str]] = None, expressions=(), weight: int = 0):
    return pb.PlacementTerm(name=name, match_labels=match_labels or {}, weight=weight,
                            match_expressions=[pb.MatchExpression(key=k, operator=op, values=v)
                                               for k, op, v in expressions])


def policy(name: str, selector: Optional[Dict[str, str]] = None, include=(), exclude=()) -> PolicyMatcher:
    obj = pb.FilterPolicy(metadata=pb.ObjectMeta(name=name, namespace="ns", uid=f"uid-{name}"))
    obj.spec.labels_selector.update(selector or {})
    obj.spec.cluster_filter.include.extend(include)
    obj.spec.cluster_filter.exclude.extend(exclude)
    return PolicyMatcher.of(obj)


def state_with(*clusters: pb.Cluster, policies=()) -> State:
    ledger = CapacityLedger()
    for obj in clusters:
        ledger.update_cluster(obj)
    return State(ledger, {"ns": list(policies)})


def schedule(clusters, requests, state: Optional[State] = None):
    state = state or state_with(*clusters)
    return default_framework(WEIGHTS).schedule(requests, clusters, state), state


def free(state: State, cluster_name: str, node: str = "n1") -> Dict[str, float]:
    return state.ledger.pool(cluster_name).free()[node]


# ---------------------------------------------------------------------------- capacity ledger


def test_assume_holds_capacity_and_forget_returns_it():
    state = state_with(cluster("c1"))
    state.ledger.assume("ns/r", "u", "ns/j", "c1", "n1", {"cpus": 3})
    assert free(state, "c1")["cpus"] == 5
    state.ledger.forget("ns/r")
    assert free(state, "c1")["cpus"] == 8


def test_started_replica_is_held_until_two_reports_after_it_started():
    state = state_with(cluster("c1", revision=10))
    ledger = state.ledger
    ledger.observe(replica("r", {"cpus": 2}, cluster_name="c1", node="n1", phase="SCHEDULED", revision=11))
    assert free(state, "c1")["cpus"] == 6
    ledger.observe(replica("r", {"cpus": 2}, cluster_name="c1", node="n1", phase="RUNNING", revision=12))
    assert free(state, "c1")["cpus"] == 6, "no report since it started: still held"
    # The same report again (nothing changed) is no fresh report.
    assert not ledger.update_cluster(cluster("c1", revision=10))
    # The first report written after the start may have been measured before it: still held
    # (counted twice for now, in the ledger and in the report).
    ledger.update_cluster(cluster("c1", {"n1": {"cpus": 6, "memory": 8192}}, revision=13, heartbeat=5))
    assert free(state, "c1")["cpus"] == 4
    # The next report was measured after that one was written, so after the start: released.
    assert ledger.update_cluster(cluster("c1", {"n1": {"cpus": 6, "memory": 8192}}, revision=15, heartbeat=6))
    assert free(state, "c1")["cpus"] == 6
    # Later updates of the running replica do not hold it again.
    ledger.observe(replica("r", {"cpus": 2}, cluster_name="c1", node="n1", phase="RUNNING", revision=16))
    assert free(state, "c1")["cpus"] == 6
    assert ledger.job_count("c1", "ns/r") == 1


def test_replica_running_before_the_scheduler_started_is_released_by_the_next_report():
    state = state_with(cluster("c1", {"n1": {"cpus": 6}}, revision=20))
    state.ledger.observe(replica("r", {"cpus": 2}, cluster_name="c1", node="n1", phase="RUNNING", revision=15))
    assert free(state, "c1")["cpus"] == 4, "one report known: it may predate the start"
    state.ledger.update_cluster(cluster("c1", {"n1": {"cpus": 6}}, revision=25, heartbeat=1))
    assert free(state, "c1")["cpus"] == 6


def test_finished_or_deleted_replicas_release_capacity():
    state = state_with(cluster("c1"))
    ledger = state.ledger
    ledger.observe(replica("a", {"cpus": 2}, cluster_name="c1", node="n1", phase="SCHEDULED", revision=5))
    ledger.observe(replica("b", {"cpus": 2}, cluster_name="c1", node="n1", phase="PENDING", revision=5))
    assert free(state, "c1")["cpus"] == 4
    ledger.observe(replica("a", {"cpus": 2}, cluster_name="c1", node="n1", phase="FAILED", revision=6))
    ledger.observe_deleted(replica("b", {"cpus": 2}, cluster_name="c1", node="n1", phase="PENDING", revision=6))
    assert free(state, "c1")["cpus"] == 8
    assert ledger.job_count("c1", "ns/a") == 0


def test_a_stale_pending_event_does_not_undo_a_bind_in_flight():
    state = state_with(cluster("c1"))
    ledger = state.ledger
    ledger.assume("ns/r", "uid-r", "ns/r", "c1", "n1", {"cpus": 1})
    ledger.observe(replica("r", revision=7))  # the informer still shows it unbound
    ledger.observe_deleted(replica("r", revision=7))
    assert free(state, "c1")["cpus"] == 7
    ledger.bound("ns/r", 9)
    ledger.observe(replica("r", revision=7))  # older than the bind
    assert free(state, "c1")["cpus"] == 7
    ledger.observe(replica("r", cluster_name="c1", node="n1", phase="SCHEDULED", revision=9))
    assert free(state, "c1")["cpus"] == 7


def test_replica_bound_without_a_node_is_charged_to_a_node_where_it_fits():
    nodes = {"n1": {"cpus": 1}, "n2": {"cpus": 4}}
    state = state_with(cluster("c1", nodes))
    state.ledger.observe(replica("r", {"cpus": 3}, cluster_name="c1", phase="SCHEDULED", revision=3))
    assert state.ledger.pool("c1").free() == {"n1": {"cpus": 1}, "n2": {"cpus": 1}}


def test_a_new_report_keeps_promises_of_replicas_not_yet_started():
    state = state_with(cluster("c1"))
    state.ledger.assume("ns/r", "u", "ns/r", "c1", "n1", {"cpus": 3})
    state.ledger.update_cluster(cluster("c1", {"n1": {"cpus": 16, "memory": 8192}}, revision=5, heartbeat=1))
    assert free(state, "c1")["cpus"] == 13


# ---------------------------------------------------------------------------- filters


def test_cluster_ready_filter():
    state = state_with()
    assert ClusterReady().filter(request("r"), cluster("c"), state) is None
    assert ClusterReady().filter(request("r"), cluster("c", phase="INIT"), state) == "ClusterNotReady (phase INIT)"
    assert ClusterReady().filter(request("r"), cluster("c", phase=""), state) == "ClusterNotReady"
    deleting = cluster("c")
    deleting.metadata.deletion_timestamp.GetCurrentTime()
    assert ClusterReady().filter(request("r"), deleting, state) == "ClusterNotReady (being deleted)"


@pytest.mark.parametrize("filters, labels, feasible", [
    ([term("zone", {"zone": "eu"})], {"zone": "eu"}, True),
    ([term("zone", {"zone": "eu"})], {"zone": "us"}, False),
    ([term("in", expressions=[("gpu", "In", ["a100", "h100"])])], {"gpu": "h100"}, True),
    ([term("in", expressions=[("gpu", "In", ["a100"])])], {}, False),
    ([term("notin", expressions=[("tier", "NotIn", ["spot"])])], {"tier": "spot"}, False),
    ([term("notin", expressions=[("tier", "NotIn", ["spot"])])], {}, True),
    ([term("exists", expressions=[("gpu", "Exists", [])])], {"gpu": "x"}, True),
    ([term("exists", expressions=[("gpu", "Exists", [])])], {}, False),
    ([term("absent", expressions=[("gpu", "DoesNotExist", [])])], {"gpu": "x"}, False),
    ([term("a", {"zone": "eu"}), term("b", expressions=[("gpu", "Exists", [])])], {"zone": "eu"}, False),
])
def test_placement_filters(filters, labels, feasible):
    req = request("r", placement=pb.Placement(filters=filters))
    reason = PlacementFilters().filter(req, cluster("c", labels=labels), state_with())
    assert (reason is None) == feasible
    if not feasible:
        assert reason.startswith("PlacementFilters (labels do not match filter ")


def test_filter_policies_include_and_exclude_by_labels():
    policies = [policy("only-eu", {"team": "a"}, include=["eu1", "eu2"]),
                policy("no-eu2", {"team": "a"}, exclude=["eu2"]),
                policy("other-team", {"team": "b"}, exclude=["eu1"])]
    state = state_with(policies=policies)
    plugin = FilterPolicies()
    team_a = request("r", labels={"team": "a"})
    assert plugin.filter(team_a, cluster("eu1"), state) is None
    assert plugin.filter(team_a, cluster("eu2"), state) == "FilterPolicy 'no-eu2' (excluded)"
    assert plugin.filter(team_a, cluster("us1"), state) == "FilterPolicy 'only-eu' (not included)"
    unlabelled = request("r")
    assert plugin.filter(unlabelled, cluster("us1"), state) is None
    elsewhere = Request.from_replica(replica("r", labels={"team": "a"}, namespace="other"))
    assert plugin.filter(elsewhere, cluster("us1"), state) is None


def test_filter_policy_with_empty_selector_applies_to_every_replica_of_its_namespace():
    state = state_with(policies=[policy("all", exclude=["c1"])])
    assert FilterPolicies().filter(request("r"), cluster("c1"), state) == "FilterPolicy 'all' (excluded)"


def test_filter_policy_labels_come_from_the_job_too():
    job = pb.Job(metadata=pb.ObjectMeta(name="j", namespace="ns", labels={"team": "a"}))
    job.spec.replicas = 1
    req = Request.from_replica(replica("r", job="j"), job)
    state = state_with(policies=[policy("p", {"team": "a"}, exclude=["c1"])])
    assert FilterPolicies().filter(req, cluster("c1"), state) == "FilterPolicy 'p' (excluded)"


def test_driver_capabilities():
    state = state_with()
    with_image = request("r", image="ubuntu:22.04")
    assert DriverCapabilities().filter(with_image, cluster("c", capabilities=["images", "logs"]), state) is None
    assert (DriverCapabilities().filter(with_image, cluster("c", capabilities=["logs"]), state)
            == "DriverCapabilities (cannot run container images)")
    assert DriverCapabilities().filter(request("r"), cluster("c"), state) is None


def test_node_fit_reports_the_largest_free_amount_on_one_node():
    c1 = cluster("c1", {"n1": {"cpus": 2, "memory": 4096}, "n2": {"cpus": 1, "memory": 4096}})
    state = state_with(c1)
    assert (NodeFit().filter(request("r", {"cpus": 4}), c1, state)
            == "NodeFit (insufficient cpus: need 4, max free on a node 2)")
    assert NodeFit().filter(request("r", {"cpus": 2, "memory": 1024}), c1, state) is None


def test_node_fit_needs_every_resource_on_the_same_node():
    c1 = cluster("c1", {"n1": {"cpus": 4, "memory": 512}, "n2": {"cpus": 1, "memory": 4096}})
    state = state_with(c1)
    assert (NodeFit().filter(request("r", {"cpus": 2, "memory": 1024}), c1, state)
            == "NodeFit (no single node has cpus 2, memory 1024 free)")


@pytest.mark.parametrize("need, feasible", [
    ({"gpus": 1}, True), ({"gpus": 3}, False), ({"A100": 2}, True), ({"A100": 5}, False),
    ({"H100": 1}, False), ({"disk": 100_000}, True), ({"disk": 300_000}, False), ({"cpus": 0.5}, True),
    ({}, True),
])
def test_node_fit_over_gpus_accelerators_and_disk(need, feasible):
    c1 = cluster("c1", {"n1": {"cpus": 8, "memory": 8192, "gpus": 2, "A100": 4, "disk": 200_000}})
    reason = NodeFit().filter(request("r", need), c1, state_with(c1))
    assert (reason is None) == feasible, reason


def test_node_fit_subtracts_what_is_promised():
    c1 = cluster("c1", {"n1": {"cpus": 4}})
    state = state_with(c1)
    state.ledger.assume("ns/x", "u", "ns/x", "c1", "n1", {"cpus": 3})
    assert NodeFit().filter(request("r", {"cpus": 2}), c1, state) == (
        "NodeFit (insufficient cpus: need 2, max free on a node 1)")


def test_node_fit_without_reported_nodes():
    c1 = cluster("c1", {})
    assert NodeFit().filter(request("r"), c1, state_with(c1)) == "NodeFit (no nodes reported)"


# ---------------------------------------------------------------------------- scores


def test_preferences_score_is_the_share_of_matching_weights():
    placement = pb.Placement(preferences=[term("gpu", {"gpu": "yes"}, weight=30),
                                          term("eu", expressions=[("zone", "In", ["eu"])], weight=10)])
    req = request("r", placement=placement)
    state = state_with()
    assert Preferences().score(req, cluster("c", labels={"gpu": "yes", "zone": "eu"}), state) == 100
    assert Preferences().score(req, cluster("c", labels={"gpu": "yes"}), state) == 75
    assert Preferences().score(req, cluster("c"), state) == 0
    assert Preferences().score(request("r"), cluster("c"), state) == 0


def test_spread_score_drops_with_replicas_of_the_same_job():
    state = state_with(cluster("c1"))
    req = request("r", job="j")
    assert Spread().score(req, cluster("c1"), state) == 100
    state.ledger.assume("ns/j-0", "u", "ns/j", "c1", "n1", {})
    assert Spread().score(req, cluster("c1"), state) == 50
    assert Spread().score(request("r", job="other"), cluster("c1"), state) == 100


def test_least_allocated_prefers_free_capacity():
    c1, c2 = cluster("c1", {"n1": {"cpus": 10, "memory": 1000}}), cluster("c2", {"n1": {"cpus": 10, "memory": 1000}})
    state = state_with(c1, c2)
    state.ledger.assume("ns/x", "u", "ns/x", "c1", "n1", {"cpus": 5, "memory": 500})
    req = request("r", {"cpus": 1})
    assert LeastAllocated().score(req, c2, state) == pytest.approx(95)
    assert LeastAllocated().score(req, c1, state) == pytest.approx(45)


# ---------------------------------------------------------------------------- framework


def test_one_thousand_one_cpu_replicas_never_overcommit_a_128_cpu_cluster():
    c1 = cluster("c1", {f"n{i}": {"cpus": 8, "memory": 65536} for i in range(16)})
    decisions, state = schedule([c1], [request(f"r{i}") for i in range(1000)])
    placed = [d for d in decisions if d.placed]
    assert len(placed) == 128
    per_node: Dict[str, int] = {}
    for decision in placed:
        per_node[decision.node] = per_node.get(decision.node, 0) + 1
    assert per_node == {f"n{i}": 8 for i in range(16)}
    assert decisions[-1].message() == "c1: NodeFit (insufficient cpus: need 1, max free on a node 0)"


def test_unschedulable_message_lists_each_clusters_reason():
    c1 = cluster("c1", {"n1": {"cpus": 2}})
    c2 = cluster("c2", phase="PROVISIONING")
    c3 = cluster("c3", phase="PROVISIONING")
    decisions, _ = schedule([c1, c2, c3], [request("r", {"cpus": 4})])
    assert not decisions[0].placed
    assert decisions[0].rejections == [("c1", "NodeFit (insufficient cpus: need 4, max free on a node 2)"),
                                       ("c2", "ClusterNotReady (phase PROVISIONING)"),
                                       ("c3", "ClusterNotReady (phase PROVISIONING)")]
    assert decisions[0].message() == ("c1: NodeFit (insufficient cpus: need 4, max free on a node 2); "
                                      "c2, c3: ClusterNotReady (phase PROVISIONING)")


def test_no_clusters_at_all():
    decisions, _ = schedule([], [request("r")])
    assert decisions[0].message() == "no clusters"


def test_replicas_of_one_job_spread_over_clusters():
    clusters = [cluster(f"c{i}", {"n1": {"cpus": 64, "memory": 65536}}) for i in range(3)]
    decisions, _ = schedule(clusters, [request(f"j-{i}", job="j") for i in range(6)])
    counts: Dict[str, int] = {}
    for decision in decisions:
        counts[decision.cluster] = counts.get(decision.cluster, 0) + 1
    assert counts == {"c0": 2, "c1": 2, "c2": 2}


def test_independent_jobs_spread_by_free_capacity():
    clusters = [cluster(f"c{i}", {"n1": {"cpus": 16, "memory": 16384}}) for i in range(4)]
    decisions, _ = schedule(clusters, [request(f"r{i}") for i in range(40)])
    counts: Dict[str, int] = {}
    for decision in decisions:
        counts[decision.cluster] = counts.get(decision.cluster, 0) + 1
    assert counts == {"c0": 10, "c1": 10, "c2": 10, "c3": 10}


def test_preferred_cluster_wins_while_it_has_room():
    clusters = [cluster("cheap", {"n1": {"cpus": 4}}, labels={"tier": "spot"}),
                cluster("big", {"n1": {"cpus": 64}})]
    placement = pb.Placement(preferences=[term("spot", {"tier": "spot"}, weight=50)])
    decisions, _ = schedule(clusters, [request(f"r{i}", placement=placement) for i in range(6)])
    assert [d.cluster for d in decisions] == ["cheap"] * 4 + ["big"] * 2


def test_node_choice_within_a_cluster_is_least_allocated():
    c1 = cluster("c1", {"n1": {"cpus": 4}, "n2": {"cpus": 4}})
    decisions, _ = schedule([c1], [request(f"r{i}") for i in range(4)])
    assert sorted(d.node for d in decisions) == ["n1", "n1", "n2", "n2"]


def test_gang_places_all_replicas_or_none():
    c1 = cluster("c1", {"n1": {"cpus": 4}})
    c2 = cluster("c2", {"n1": {"cpus": 4}})
    gang = [request(f"g-{i}", {"cpus": 3}, job="g", gang=True, replicas=3) for i in range(3)]
    decisions, state = schedule([c1, c2], gang)
    assert not any(d.placed for d in decisions)
    assert all(d.message().startswith("gang ns/g: replica ns/g-2 fits nowhere, so none of the 3 pending "
                                      "replicas is placed: c1, c2: NodeFit") for d in decisions)
    assert free(state, "c1")["cpus"] == 4 and free(state, "c2")["cpus"] == 4, "tentative places rolled back"
    # A gang that fits is placed whole, and the replicas after it still see the right capacity.
    smaller = [request(f"h-{i}", {"cpus": 3}, job="h", gang=True, replicas=2) for i in range(2)]
    decisions, state = schedule([c1, c2], smaller + [request("after", {"cpus": 2})], state)
    assert sorted(d.cluster for d in decisions[:2]) == ["c1", "c2"]
    assert not decisions[2].placed


def test_gang_members_are_placed_together_even_when_interleaved():
    c1 = cluster("c1", {"n1": {"cpus": 4}})
    requests = [request("g-0", {"cpus": 2}, job="g", gang=True, replicas=2), request("solo", {"cpus": 3}),
                request("g-1", {"cpus": 2}, job="g", gang=True, replicas=2)]
    decisions, _ = schedule([c1], requests)
    assert [d.placed for d in decisions] == [True, False, True]


def test_static_filters_and_capacity_combine():
    clusters = [cluster("c1", {"n1": {"cpus": 64}}, labels={"zone": "eu"}),
                cluster("c2", {"n1": {"cpus": 64}}, labels={"zone": "us"}),
                cluster("c3", {"n1": {"cpus": 64}}, labels={"zone": "eu"}, phase="ERROR")]
    placement = pb.Placement(filters=[term("eu", {"zone": "eu"})])
    decisions, _ = schedule(clusters, [request(f"r{i}", {"cpus": 16}, placement=placement) for i in range(5)])
    assert [d.cluster for d in decisions[:4]] == ["c1"] * 4
    assert decisions[4].message() == ("c1: NodeFit (insufficient cpus: need 16, max free on a node 0); "
                                      "c2: PlacementFilters (labels do not match filter 'eu'); "
                                      "c3: ClusterNotReady (phase ERROR)")
