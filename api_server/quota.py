"""Per-namespace quotas, enforced when Jobs (and other user objects) are admitted.

There is no Quota kind: a quota is an annotation of the Namespace (an admin sets it with
`skyctl apply` or an update of the namespace):

    quota.skyshift.dev/cpus       most CPUs requested by the namespace's Jobs
    quota.skyshift.dev/memory     most memory (MiB)
    quota.skyshift.dev/gpus       most GPUs: `gpus` plus every accelerator resource (V100: 2...)
    quota.skyshift.dev/replicas   most replicas
    quota.skyshift.dev/objects    most Jobs + Services + FilterPolicies

A Job uses `replicas x resources` (per-replica resources times spec.replicas). Jobs that are
finished (COMPLETED, FAILED) or being deleted no longer count towards cpus, memory, gpus and
replicas; every existing object counts towards `objects`. A Create, BatchCreate or Update that
would take the namespace over a quota fails with RESOURCE_EXHAUSTED naming the quota, what the
request needs, what is in use and the limit; once usage drops (a job finishes or is deleted)
the same request is admitted. Lowering a quota below current usage refuses new work only.

How: usage is counted from the store (one consistent list of the namespace's Jobs) under a
per-namespace lock held until the write is done, so concurrent requests to one API server
cannot both squeeze under a quota. Several API server replicas do not share that lock: two
requests through different replicas at the same instant may together exceed a quota by one
request. Namespaces without quota annotations cost nothing. The scheduler does not look at
quotas (out of scope): a quota limits what may be asked for, not where it runs.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
from typing import AsyncContextManager, AsyncIterator, Dict, Iterable, List

from google.protobuf.message import Message

from skyshift.api.errors import InvalidError, LimitError

from api_server.object_cache import ObjectCache
from api_server.rbac import Action

PREFIX = "quota.skyshift.dev/"
RESOURCE_QUOTAS = ("cpus", "memory", "gpus", "replicas")
QUOTAS = RESOURCE_QUOTAS + ("objects",)
#: Kinds counted by quota.skyshift.dev/objects.
COUNTED_KINDS = ("jobs", "services", "filterpolicies")
#: Resource names that are not GPUs; every other name (an accelerator) counts as GPUs.
NOT_GPUS = frozenset({"cpus", "memory", "disk"})
FINISHED_PHASES = frozenset({"COMPLETED", "FAILED"})


def parse_quotas(annotations) -> Dict[str, float]:
    """The quotas among a namespace's annotations; InvalidError for a malformed one."""
    quotas = {}
    for key, value in annotations.items():
        if not key.startswith(PREFIX):
            continue
        name = key[len(PREFIX):]
        if name not in QUOTAS:
            raise InvalidError(f"metadata.annotations.{key}", f"unknown quota (known: {', '.join(QUOTAS)})")
        try:
            amount = float(value)
        except ValueError:
            amount = -1.0
        if amount < 0:
            raise InvalidError(f"metadata.annotations.{key}", f"{value!r} is not a non-negative number")
        quotas[name] = amount
    return quotas


def job_usage(job: Message) -> Dict[str, float]:
    """What one Job takes of the resource quotas."""
    spec = job.spec
    replicas = spec.replicas if spec.HasField("replicas") else 1
    resources = spec.resources
    return {
        "cpus": replicas * resources.get("cpus", 0.0),
        "memory": replicas * resources.get("memory", 0.0),
        "gpus": replicas * sum(amount for name, amount in resources.items() if name not in NOT_GPUS),
        "replicas": float(replicas),
    }


def _counts(job: Message) -> bool:
    return not job.metadata.HasField("deletion_timestamp") and job.status.phase not in FINISHED_PHASES


class QuotaAdmission:
    def __init__(self, registry, namespaces: ObjectCache):
        self.registry = registry
        self.namespaces = namespaces
        #: One per namespace with quotas (kept: a lock dropped while a request waits on it would
        #: let a third request in beside the second).
        self._locks: Dict[str, asyncio.Lock] = collections.defaultdict(asyncio.Lock)

    async def _quotas(self, namespace: str) -> Dict[str, float]:
        obj = self.namespaces.get(namespace)
        if obj is None:
            await self.namespaces.refresh()  # created a moment ago?
            obj = self.namespaces.get(namespace)
        if obj is None:
            return {}
        try:
            return parse_quotas(obj.metadata.annotations)
        except InvalidError:
            return {}  # written before quotas were checked; refused on its next update

    @staticmethod
    def validate(actions: Iterable[Action]) -> None:
        """Quota annotations on a Namespace being written must parse."""
        for action in actions:
            if action.kind.name == "Namespace" and action.obj is not None and action.verb in ("create", "update"):
                parse_quotas(action.obj.metadata.annotations)

    async def admit(self, actions: List[Action]) -> AsyncContextManager:
        """What to hold while the request runs: for writes in namespaces with quotas, a context
        that checks them and holds those namespaces' locks until the request is done (LimitError
        when one is exceeded); for anything else, nothing."""
        self.validate(actions)
        by_namespace: Dict[str, List[Action]] = collections.defaultdict(list)
        for action in actions:
            if (action.verb in ("create", "update") and not action.status and action.obj is not None
                    and action.kind.plural in COUNTED_KINDS and await self._quotas(action.namespace)):
                by_namespace[action.namespace].append(action)
        return self._checked(by_namespace) if by_namespace else contextlib.nullcontext()

    @contextlib.asynccontextmanager
    async def _checked(self, by_namespace: Dict[str, List[Action]]) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            for namespace in sorted(by_namespace):
                await stack.enter_async_context(self._locks[namespace])
                await self._check(namespace, by_namespace[namespace])
            yield

    async def _check(self, namespace: str, actions: List[Action]) -> None:
        quotas = await self._quotas(namespace)
        jobs, _, _ = await self.registry.list("jobs", namespace, "", "", 0, "")
        existing = {job.metadata.name: job for job in jobs}
        used = dict.fromkeys(QUOTAS, 0.0)
        for job in jobs:
            if _counts(job):
                for name, amount in job_usage(job).items():
                    used[name] += amount
        if "objects" in quotas:
            used["objects"] = float(len(jobs)) + sum([await self._count(plural, namespace)
                                                      for plural in COUNTED_KINDS if plural != "jobs"])
        requested = dict.fromkeys(QUOTAS, 0.0)
        for action in actions:
            if action.verb == "create":
                requested["objects"] += 1
            if action.kind.plural != "jobs":
                continue
            for name, amount in job_usage(action.obj).items():
                requested[name] += amount
            previous = existing.get(action.name) if action.verb == "update" else None
            if previous is not None and _counts(previous):
                for name, amount in job_usage(previous).items():
                    requested[name] -= amount  # an update replaces what the job took
        for name in (q for q in QUOTAS if q in quotas):  # a fixed order: the same request, the same message
            limit, need = quotas[name], requested[name]
            if need > 0 and used[name] + need > limit + 1e-9:
                raise LimitError(f'namespace "{namespace}": quota {PREFIX}{name} exceeded: the request needs '
                                 f"{need:g}, {used[name]:g} of {limit:g} in use")

    async def _count(self, plural: str, namespace: str) -> int:
        items, _, _ = await self.registry.list(plural, namespace, "", "", 0, "")
        return len(items)
