"""Authorization: may this identity perform this verb on this kind in this namespace? Default deny.

Users get their rights from Roles bound to them by RoleBindings (both cluster-scoped objects):
a Role's rules name resources (plural kinds or "*"), verbs (get, list, watch, create, update,
delete or "*") and namespaces (names or "*"; none means "*"); a binding with `namespaces`
narrows every rule of its role to those. A rule reaches a cluster-scoped kind only where it
holds in every namespace ("*") — except Namespace objects, which count as living in themselves,
so a binding limited to namespace `team-a` may read the Namespace `team-a` when its role lets
it read namespaces.

Built-in roles, created at start like the built-in namespaces (an admin may edit them):
* admin: everything.
* editor: every verb on every namespaced kind, and reading namespaces, clusters and links;
  meant to be bound with `namespaces` (namespace-scoped).
* viewer: get, list and watch on every kind but Users, Roles and RoleBindings.

How RPCs map to verbs: Create, BatchCreate -> create; Get, History -> get; List -> list;
Watch -> watch; Update, UpdateStatus, BatchUpdate -> update; Delete -> delete; Logs -> get on
replicas; Exec -> update on replicas. List and Watch across namespaces are allowed when the
caller may list (watch) somewhere, and return only what it may see.

SYSTEM POLICIES (no RoleBindings; see skyshift/tokens.py for how a User becomes one):
* skylet:C may get, list and watch the Replicas bound to C (spec.cluster == C) and update them
  (finalizers, status) — bound to C both as sent and as stored; update the status of Cluster C,
  and its annotations only (its gateway's mesh address); read Clusters, Services, Endpoints and
  Links, and update the status of Endpoints (its gateway's conditions). Nothing else: no other
  cluster's replicas, no jobs, no users, no deletes.
* manager may do everything on every kind but Users, Roles and RoleBindings; on Users it may
  get, list, watch, create and update skylet Users only (to issue skylet tokens).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Dict, FrozenSet, Iterable, List, Optional, Tuple, Union

from google.protobuf.message import Message

from skyshift import tokens
from skyshift.api import kinds
from skyshift.api.errors import AlreadyExistsError, PermissionDeniedError
from skyshift.v1 import objects_pb2 as pb

from api_server.auth import MANAGER, SKYLET, Identity
from api_server.context import Visibility
from api_server.object_cache import ObjectCache

READ_VERBS = ("get", "list", "watch")
VERBS = READ_VERBS + ("create", "update", "delete")
ACCESS_KINDS = frozenset({"users", "roles", "rolebindings"})
#: What a skylet reads besides its replicas: its gateway needs every cluster (the mesh addresses
#: of the others), the Services and their Endpoints, and the Links.
SKYLET_READABLE = frozenset({"clusters", "services", "endpoints", "links"})
#: "Everywhere": a grant that holds in every namespace (and for cluster-scoped kinds).
EVERYWHERE = "*"
Namespaces = Union[str, FrozenSet[str]]


def _rule(resources: Iterable[str], verbs: Iterable[str], namespaces: Iterable[str] = ("*",)) -> pb.PolicyRule:
    return pb.PolicyRule(resources=list(resources), verbs=list(verbs), namespaces=list(namespaces))


BUILTIN_ROLES: Dict[str, List[pb.PolicyRule]] = {
    "admin": [_rule(["*"], ["*"])],
    "editor": [_rule([k.plural for k in kinds.all_kinds() if k.namespaced], ["*"]),
               _rule(["namespaces", "clusters", "links"], READ_VERBS)],
    "viewer": [_rule([k.plural for k in kinds.all_kinds() if k.plural not in ACCESS_KINDS], READ_VERBS)],
}


async def ensure_builtin_roles(registry) -> None:
    for name, rules in BUILTIN_ROLES.items():
        role = pb.Role()
        role.metadata.name = name
        role.spec.rules.extend(rules)
        try:
            await registry.create(kinds.wrap(role), "")
        except AlreadyExistsError:
            pass


@dataclasses.dataclass(frozen=True)
class Action:
    """One thing a request does to one kind."""
    verb: str
    kind: kinds.Kind
    #: The namespace acted in; "" for cluster-scoped kinds and for List/Watch of every namespace.
    namespace: str = ""
    name: str = ""
    #: The object sent, for create and update.
    obj: Optional[Message] = None
    #: An update of status only.
    status: bool = False

    def describe(self) -> str:
        where = f' in namespace "{self.namespace}"' if self.namespace else ""
        target = f' "{self.name}"' if self.name else ""
        return f"{self.verb} {self.kind.plural}{target}{where}"


@dataclasses.dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str = ""
    #: Objects the caller may see (List, Watch, and a check of what Get returns); None: all.
    visible: Optional[Visibility] = None
    #: Check of the stored object an update or delete touches (context.RequestScope).
    check_stored: Optional[Callable[[kinds.Kind, Message], None]] = None


ALLOW = Decision(True)


def deny(identity: Identity, action: Action, why: str = "") -> Decision:
    return Decision(False, f"{identity} may not {action.describe()}{': ' + why if why else ''}")


# ---------------------------------------------------------------------------- users


class Grants:
    """What one user's bindings allow: (plural, verb) -> namespaces (a set, or EVERYWHERE)."""

    def __init__(self):
        self._grants: Dict[Tuple[str, str], Namespaces] = {}

    def add(self, plurals: Iterable[str], verbs: Iterable[str], namespaces: Namespaces) -> None:
        for plural in plurals:
            for verb in verbs:
                key = (plural, verb)
                current = self._grants.get(key, frozenset())
                if current == EVERYWHERE or namespaces == EVERYWHERE:
                    self._grants[key] = EVERYWHERE
                else:
                    self._grants[key] = current | namespaces

    def namespaces(self, plural: str, verb: str) -> Namespaces:
        return self._grants.get((plural, verb), frozenset())


def _expand(values: Iterable[str], everything: Iterable[str]) -> List[str]:
    values = list(values)
    return list(everything) if "*" in values else values


def _rule_namespaces(rule: pb.PolicyRule, binding: pb.RoleBinding) -> Namespaces:
    rule_ns: Namespaces = EVERYWHERE if not rule.namespaces or "*" in rule.namespaces else frozenset(rule.namespaces)
    if not binding.spec.namespaces or "*" in binding.spec.namespaces:
        return rule_ns
    bound = frozenset(binding.spec.namespaces)
    return bound if rule_ns == EVERYWHERE else rule_ns & bound


def _in_namespaces(allowed: FrozenSet[str]) -> Visibility:
    return lambda obj: obj.metadata.namespace in allowed


def _named(allowed: FrozenSet[str]) -> Visibility:
    return lambda obj: obj.metadata.name in allowed


def decide_for_user(identity: Identity, grants: Grants, action: Action) -> Decision:
    allowed = grants.namespaces(action.kind.plural, action.verb)
    if allowed == EVERYWHERE:
        return ALLOW
    if action.kind.namespaced:
        if action.namespace:
            return ALLOW if action.namespace in allowed else deny(identity, action)
        if allowed and action.verb in ("list", "watch"):
            return Decision(True, visible=_in_namespaces(allowed))
        return deny(identity, action)
    if action.kind.name == "Namespace":
        if action.name:
            return ALLOW if action.name in allowed else deny(identity, action)
        if allowed and action.verb in ("list", "watch"):
            return Decision(True, visible=_named(allowed))
    return deny(identity, action)


# ---------------------------------------------------------------------------- system identities


def _bound_to(cluster: str) -> Visibility:
    return lambda replica: replica.spec.cluster == cluster


def _is_cluster(cluster: str) -> Visibility:
    return lambda obj: obj.metadata.name == cluster


def _is_skylet_user(user: Message) -> bool:
    return user.metadata.labels.get(tokens.IDENTITY_LABEL) == tokens.SKYLET


def _stored_check(identity: Identity, kind_plural: str, allowed: Visibility, what: str):
    def check(kind: kinds.Kind, stored: Message) -> None:
        if kind.plural == kind_plural and not allowed(stored):
            raise PermissionDeniedError(f"{identity} may not change {kind.name.lower()} "
                                        f'"{stored.metadata.name}": {what}')
    return check


# One check per identity (not per request), so a batch's items share it.
@functools.lru_cache(maxsize=4096)
def _skylet_replica_check(identity: Identity):
    return _stored_check(identity, "replicas", _bound_to(identity.cluster),
                         f'it is not bound to cluster "{identity.cluster}"')


@functools.lru_cache(maxsize=16)
def _manager_user_check(identity: Identity):
    return _stored_check(identity, "users", _is_skylet_user, "it is not a skylet user")


def _only_annotations_change(identity: Identity, sent: Message):
    """A stored-object check: the update changes nothing but annotations."""
    def check(kind: kinds.Kind, stored: Message) -> None:
        if (stored.spec != sent.spec or dict(stored.metadata.labels) != dict(sent.metadata.labels)
                or list(stored.metadata.finalizers) != list(sent.metadata.finalizers)
                or list(stored.metadata.owner_references) != list(sent.metadata.owner_references)):
            raise PermissionDeniedError(f'{identity} may change only the annotations of {kind.name.lower()} '
                                        f'"{stored.metadata.name}"')
    return check


def decide_for_skylet(identity: Identity, action: Action) -> Decision:
    cluster = identity.cluster
    plural = action.kind.plural
    if plural in SKYLET_READABLE and action.verb in READ_VERBS:
        return ALLOW
    if plural == "clusters" and action.verb == "update" and action.name == cluster:
        if action.status:
            return ALLOW
        if action.obj is not None:  # its gateway publishes its mesh address as an annotation
            return Decision(True, check_stored=_only_annotations_change(identity, action.obj))
    if plural == "endpoints" and action.verb == "update" and action.status:
        return ALLOW  # its gateway reports whether it serves each Service (conditions)
    if plural == "replicas":
        bound = _bound_to(cluster)
        if action.verb in READ_VERBS:
            return Decision(True, visible=bound)
        if action.verb == "update":
            if action.obj is not None and not bound(action.obj):
                return deny(identity, action, f'the replica is not bound to cluster "{cluster}"')
            return Decision(True, check_stored=_skylet_replica_check(identity))
    return deny(identity, action, "a skylet may change only its cluster and the replicas bound to it")


def decide_for_manager(identity: Identity, action: Action) -> Decision:
    plural = action.kind.plural
    if plural not in ACCESS_KINDS:
        return ALLOW
    if plural == "users" and action.verb != "delete":
        if action.verb in READ_VERBS:
            return Decision(True, visible=_is_skylet_user)
        if action.obj is not None and not _is_skylet_user(action.obj):
            return deny(identity, action, "the manager may only create and update skylet users")
        return Decision(True, check_stored=_manager_user_check(identity))
    return deny(identity, action, "the manager has no access to users, roles and role bindings")


# ---------------------------------------------------------------------------- the authorizer


class Authorizer:
    def __init__(self, roles: ObjectCache, bindings: ObjectCache):
        self.roles = roles
        self.bindings = bindings
        self._grants: Dict[str, Grants] = {}
        self._stamp: Tuple[int, int] = (-1, -1)

    def grants(self, user: str) -> Grants:
        stamp = (self.roles.version, self.bindings.version)
        if stamp != self._stamp:
            self._grants, self._stamp = {}, stamp
        grants = self._grants.get(user)
        if grants is None:
            grants = self._grants[user] = self._collect(user)
        return grants

    def _collect(self, user: str) -> Grants:
        grants = Grants()
        all_plurals = [k.plural for k in kinds.all_kinds()]
        for binding in self.bindings.values():
            if user not in binding.spec.users:
                continue
            role = self.roles.get(binding.spec.role)
            if role is None:
                continue
            for rule in role.spec.rules:
                grants.add(_expand(rule.resources, all_plurals), _expand(rule.verbs, VERBS),
                           _rule_namespaces(rule, binding))
        return grants

    def decide(self, identity: Identity, action: Action) -> Decision:
        if identity.kind == SKYLET:
            return decide_for_skylet(identity, action)
        if identity.kind == MANAGER:
            return decide_for_manager(identity, action)
        return decide_for_user(identity, self.grants(identity.user), action)

    async def authorize(self, identity: Identity, action: Action) -> Decision:
        """The decision; a user denied is decided again once on fresh Roles and RoleBindings (a
        binding written a moment ago counts)."""
        decision = self.decide(identity, action)
        if not decision.allowed and not identity.system:
            await self.roles.refresh()
            await self.bindings.refresh()
            decision = self.decide(identity, action)
        return decision


def combine(decisions: List[Decision]) -> Decision:
    """One decision for the actions of one request (a batch): the first denial, else an
    allowance whose stored-object checks are all of theirs."""
    for decision in decisions:
        if not decision.allowed:
            return decision
    checks = [d.check_stored for d in decisions if d.check_stored is not None]
    if not checks:
        return decisions[0] if len(decisions) == 1 else ALLOW
    if len(checks) == 1 and len(decisions) == 1:
        return decisions[0]

    def check_all(kind: kinds.Kind, stored: Message) -> None:
        for check in dict.fromkeys(checks):
            check(kind, stored)
    return Decision(True, check_stored=check_all)
