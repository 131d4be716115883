"""The scheduling decision for a batch of replicas: filter, score, pick a node, hold capacity.

Pure: no I/O. The ledger is the only state it changes, holding what each placement takes, so
later replicas of the same batch see the capacity the earlier ones used.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Hashable, Iterable, List, Mapping, Optional, Sequence, Tuple

from skyshift.v1 import objects_pb2 as pb

from scheduler import plugins
from scheduler.capacity import NodePool
from scheduler.plugins import NodeFit, Request, State


@dataclasses.dataclass
class Decision:
    """Where one replica goes: (cluster, node), or why it goes nowhere."""

    request: Request
    cluster: str = ""
    node: str = ""
    #: (cluster, reason) for every cluster, when the replica was not placed.
    rejections: List[Tuple[str, str]] = dataclasses.field(default_factory=list)
    #: Why the replica was not placed, when it is not a per-cluster reason (e.g. its gang).
    note: str = ""

    @property
    def placed(self) -> bool:
        return bool(self.cluster)

    def message(self) -> str:
        """One line for a condition message: clusters with the same reason share an entry,
        e.g. "c1: NodeFit (insufficient cpus: need 4, max free on a node 2); c2, c3: ClusterNotReady"."""
        by_reason: Dict[str, List[str]] = {}
        for cluster, reason in self.rejections:
            by_reason.setdefault(reason, []).append(cluster)
        text = "; ".join(f"{', '.join(clusters)}: {reason}" for reason, clusters in by_reason.items())
        text = text or "no clusters"
        return f"{self.note}: {text}" if self.note else text


@dataclasses.dataclass
class _Candidate:
    """A cluster that passed the static filters for one request class, with what is known
    about it: scores that change with capacity are recomputed only when its pool changes."""

    cluster: pb.Cluster
    name: str
    pool: Optional[NodePool]
    static_score: float
    version: int = -1
    may_fit: bool = False
    capacity_score: float = 0.0


@dataclasses.dataclass
class _Candidates:
    feasible: List[_Candidate]
    rejected: List[Tuple[str, str]]


class Framework:
    """Runs static filters (once per request class), NodeFit and the scores over clusters."""

    def __init__(self, filters: Sequence, node_fit: NodeFit, scores: Sequence[Tuple[object, float]]):
        self.filters = list(filters)
        self.node_fit = node_fit
        self.cluster_scores = [(plugin, weight) for plugin, weight in scores if plugin.depends == "cluster"]
        self.capacity_scores = [(plugin, weight) for plugin, weight in scores if plugin.depends == "capacity"]
        self.job_scores = [(plugin, weight) for plugin, weight in scores if plugin.depends == "job"]

    def job_score(self, count: int) -> float:
        return sum(weight * plugin.score_count(count) for plugin, weight in self.job_scores)

    def schedule(self, requests: Sequence[Request], clusters: Iterable[pb.Cluster], state: State) -> List[Decision]:
        """A decision per request, in order. Placed replicas are held in `state.ledger` (the
        caller binds them, and forgets those it fails to bind). Requests with `gang` set are
        placed together with the other gang requests of their job in this batch, all or none."""
        cycle = _Cycle(self, sorted(clusters, key=lambda c: c.metadata.name), state)
        decisions: Dict[str, Decision] = {}
        for unit in _units(requests):
            for decision in cycle.place_all(unit):
                decisions[decision.request.key] = decision
        return [decisions[request.key] for request in requests]


def default_framework(weights: Mapping[str, float]) -> Framework:
    """The standard plugins; `weights` maps score plugin name -> weight."""
    return Framework(plugins.default_filters(), NodeFit(), plugins.default_scores(weights))


def _units(requests: Sequence[Request]) -> List[List[Request]]:
    """Single requests, and each job's gang requests as one unit (at its first member's place)."""
    units: List[List[Request]] = []
    gangs: Dict[str, List[Request]] = {}
    for request in requests:
        if not request.gang:
            units.append([request])
        elif request.job in gangs:
            gangs[request.job].append(request)
        else:
            gangs[request.job] = [request]
            units.append(gangs[request.job])
    return units


class _Cycle:
    """One batch: caches what does not change while it runs."""

    def __init__(self, framework: Framework, clusters: List[pb.Cluster], state: State):
        self.framework = framework
        self.clusters = clusters
        self.state = state
        self._candidates: Dict[Hashable, _Candidates] = {}

    def place_all(self, unit: List[Request]) -> List[Decision]:
        """Place every request of the unit, or (if one fails) none of them."""
        decisions = []
        for request in unit:
            decision = self.place(request)
            decisions.append(decision)
            if not decision.placed:
                break
        if decisions[-1].placed:
            return decisions
        failed = decisions[-1]
        for decision in decisions[:-1]:
            self.state.ledger.forget(decision.request.key)
        if len(unit) == 1:
            return decisions
        note = (f"gang {unit[0].job}: replica {failed.request.key} fits nowhere, "
                f"so none of the {len(unit)} pending replicas is placed")
        return [Decision(request, rejections=failed.rejections, note=note) for request in unit]

    def place(self, request: Request) -> Decision:
        """Place one request on the best-scoring cluster with a node that fits it."""
        framework, ledger = self.framework, self.state.ledger
        candidates = self.candidates(request)
        job_clusters = ledger.job_clusters(request.job)
        no_replicas_score = framework.job_score(0)
        while True:
            best, best_score = None, float("-inf")
            for candidate in candidates.feasible:
                if candidate.pool is None:
                    continue
                if candidate.version != candidate.pool.version:
                    self._refresh(request, candidate)
                if not candidate.may_fit:
                    continue
                score = candidate.static_score + candidate.capacity_score + (
                    framework.job_score(job_clusters[candidate.name]) if candidate.name in job_clusters
                    else no_replicas_score)
                if score > best_score:  # the first of equals wins: clusters are in name order
                    best, best_score = candidate, score
            if best is None:
                return Decision(request, rejections=self.rejections(request, candidates))
            node = best.pool.best_node(request.resources)
            if node is None:  # each resource is free somewhere, but not all on one node
                best.may_fit = False
                continue
            ledger.assume(request.key, request.uid, request.job, best.name, node, request.resources)
            return Decision(request, cluster=best.name, node=node)

    def _refresh(self, request: Request, candidate: _Candidate) -> None:
        candidate.version = candidate.pool.version
        candidate.may_fit = self.framework.node_fit.may_fit(request.resources, candidate.pool.max_free())
        candidate.capacity_score = sum(weight * plugin.score(request, candidate.cluster, self.state)
                                       for plugin, weight in self.framework.capacity_scores)

    def rejections(self, request: Request, candidates: _Candidates) -> List[Tuple[str, str]]:
        reasons = dict(candidates.rejected)
        for candidate in candidates.feasible:
            reasons[candidate.name] = (self.framework.node_fit.filter(request, candidate.cluster, self.state)
                                       or self.framework.node_fit.name)
        return [(cluster.metadata.name, reasons[cluster.metadata.name]) for cluster in self.clusters]

    def candidates(self, request: Request) -> _Candidates:
        """The static filters' and scores' verdicts, computed once per request class: requests
        alike in everything those look at, and in their resources."""
        key = (tuple(f.cache_key(request, self.state) for f in self.framework.filters),
               tuple(s.cache_key(request, self.state) for s, _ in self.framework.cluster_scores),
               tuple(sorted(request.resources.items())))
        cached = self._candidates.get(key)
        if cached is None:
            cached = self._candidates[key] = self._evaluate(request)
        return cached

    def _evaluate(self, request: Request) -> _Candidates:
        feasible, rejected = [], []
        for cluster in self.clusters:
            reason = self._first_rejection(request, cluster)
            if reason is not None:
                rejected.append((cluster.metadata.name, reason))
                continue
            score = sum(weight * plugin.score(request, cluster, self.state)
                        for plugin, weight in self.framework.cluster_scores)
            name = cluster.metadata.name
            feasible.append(_Candidate(cluster, name, self.state.ledger.pool(name), score))
        return _Candidates(feasible, rejected)

    def _first_rejection(self, request: Request, cluster: pb.Cluster) -> Optional[str]:
        for plugin in self.framework.filters:
            reason = plugin.filter(request, cluster, self.state)
            if reason is not None:
                return reason
        return None
