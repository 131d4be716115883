"""The gate every object-service RPC passes when authentication is on (settings.auth.enabled):
authenticate the bearer token, apply the caller's rate and concurrency limits, authorize each
thing the request does, check namespace quotas, then run the servicer method with the caller's
RequestScope (what List/Watch may return, which stored objects it may change), and audit every
write and every refusal. One place, wrapped around the servicer methods in server.py; the
servicer itself knows nothing of it.

Without authentication there is no gate: the server behaves as it always did (local
single-user mode, the tests of everything else). `OpenAccess` then answers CanI.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
from typing import Callable, Dict, List, Optional

import grpc
import structlog
from google.protobuf.message import Message

from skyshift import config
from skyshift.api import kinds
from skyshift.api.errors import (InternalError, InvalidError, PermissionDeniedError, SkyShiftError,
                                 code_from_int)
from skyshift.v1 import api_pb2

from api_server import auth, context, rbac
from api_server.audit import AuditLog
from api_server.limits import Limits
from api_server.object_cache import ObjectCache
from api_server.quota import QuotaAdmission

log = structlog.get_logger(__name__)

Action = rbac.Action
#: Methods whose success is audited (reads are audited only when refused).
WRITE_METHODS = frozenset({"Create", "Update", "UpdateStatus", "Delete", "BatchCreate", "BatchUpdate", "Exec"})
#: Methods that may run for a caller allowed to see only some objects: List and Watch filter
#: (context.visibility), Get and History check what they return. Any other method needs full
#: rights on what it names.
FILTERED_METHODS = frozenset({"List", "Watch"})
CHECKED_METHODS = frozenset({"Get", "History"})
#: Seconds to wait at start for the caches of users, roles, bindings and namespaces.
CACHE_START_TIMEOUT = 30.0


def _namespace(kind: kinds.Kind, namespace: str) -> str:
    return (namespace or kinds.DEFAULT_NAMESPACE) if kind.namespaced else ""


def _object_action(verb: str, request, status: bool = False) -> Action:
    kind, obj = kinds.unwrap(request.object)
    return Action(verb, kind, _namespace(kind, obj.metadata.namespace or request.namespace), obj.metadata.name, obj,
                  status)


def _named_action(verb: str, request) -> Action:
    kind = kinds.resolve(request.kind)
    return Action(verb, kind, _namespace(kind, request.namespace), request.name)


def _listing_action(verb: str, request) -> Action:
    kind = kinds.resolve(request.kind)
    return Action(verb, kind, request.namespace if kind.namespaced else "", getattr(request, "name", ""))


REPLICAS = kinds.resolve("replicas")

#: What each method does: request -> actions.
ACTIONS: Dict[str, Callable[[Message], List[Action]]] = {
    "Create": lambda r: [_object_action("create", r)],
    "Get": lambda r: [_named_action("get", r)],
    "History": lambda r: [_named_action("get", r)],
    "List": lambda r: [_listing_action("list", r)],
    "Watch": lambda r: [_listing_action("watch", r)],
    "Update": lambda r: [_object_action("update", r)],
    "UpdateStatus": lambda r: [_object_action("update", r, status=True)],
    "Delete": lambda r: [_named_action("delete", r)],
    "BatchCreate": lambda r: [_object_action("create", item) for item in r.items],
    "BatchUpdate": lambda r: [_object_action("update", item, status=r.status) for item in r.items],
    "Logs": lambda r: [Action("get", REPLICAS, _namespace(REPLICAS, r.namespace), r.replica)],
    "Exec": lambda r: [Action("update", REPLICAS, _namespace(REPLICAS, r.namespace), r.replica)],
}


class Call:
    """One request going through the gate: what the audit log says about it."""

    __slots__ = ("method", "request_id", "identity", "actions")

    def __init__(self, method: str):
        self.method = method
        self.request_id = os.urandom(8).hex()
        self.identity: Optional[auth.Identity] = None
        self.actions: List[Action] = []


class Gate:
    guarded_methods = frozenset(ACTIONS)

    def __init__(self, settings: config.Settings, registry, watch_cache):
        self.settings = settings
        self.registry = registry
        interval = settings.auth.refresh_min_interval
        self.caches = {plural: ObjectCache(registry, watch_cache, plural, interval)
                       for plural in ("users", "roles", "rolebindings", "namespaces")}
        self.authenticator = auth.Authenticator(self.caches["users"])
        self.authorizer = rbac.Authorizer(self.caches["roles"], self.caches["rolebindings"])
        self.quota = QuotaAdmission(registry, self.caches["namespaces"])
        self.limits = Limits(settings.limits) if settings.limits.enabled else None
        self.audit = AuditLog(settings.audit_log_file, settings.audit) if settings.audit.enabled else None

    async def start(self) -> None:
        await rbac.ensure_builtin_roles(self.registry)
        await auth.bootstrap_identities(self.registry, self.settings)
        for cache in self.caches.values():
            cache.start()
        await asyncio.wait_for(asyncio.gather(*(c.ready.wait() for c in self.caches.values())), CACHE_START_TIMEOUT)
        if self.audit is not None:
            self.audit.start()
        log.info("auth_enabled", audit=str(self.settings.audit_log_file) if self.audit else "off",
                 limits="on" if self.limits else "off")

    async def stop_caches(self) -> None:
        """Before the watch cache stops; requests still in flight use what the caches hold."""
        await asyncio.gather(*(cache.stop() for cache in self.caches.values()))

    async def stop(self) -> None:
        """After the last request: write what the audit log holds."""
        await self.stop_caches()
        if self.audit is not None:
            await self.audit.stop()

    # ------------------------------------------------------------------ checks

    async def _authenticate(self, call: Call, request, metadata) -> auth.Identity:
        """Who calls, and what the request would do (call.actions)."""
        invalid = None
        try:
            call.actions = ACTIONS[call.method](request)
        except InvalidError as error:  # reported once the caller is known (unknown callers learn nothing)
            invalid = error
        call.identity = await self.authenticator.authenticate(metadata)
        if invalid is not None:
            raise invalid
        return call.identity

    async def _throttle(self, call: Call) -> None:
        """Refuse a caller over its rate, after waiting out (part of) its retry hint: a client
        that loops on refusals then costs the server a timer per refusal, not a busy loop."""
        if self.limits is None:
            return
        wait = self.limits.admit(call.identity)
        if wait:
            await asyncio.sleep(min(wait, self.settings.limits.refusal_delay_max))
            raise self.limits.over_rate(call.identity, wait)

    async def _authorize(self, call: Call) -> rbac.Decision:
        """The decision for the request's actions; PermissionDeniedError when refused."""
        identity = call.identity
        decisions = [await self.authorizer.authorize(identity, action) for action in call.actions]
        decision = rbac.combine(decisions) if decisions else rbac.ALLOW
        if not decision.allowed:
            raise PermissionDeniedError(f"{decision.reason} (request id {call.request_id})")
        if decision.visible is not None and call.method not in FILTERED_METHODS | CHECKED_METHODS:
            raise PermissionDeniedError(f"{identity} may not {call.actions[0].describe()} "
                                        f"(request id {call.request_id})")
        return decision

    def _scope(self, call: Call, request, decision: rbac.Decision) -> context.RequestScope:
        max_items = 0
        if call.method == "List" and self.limits is not None:
            max_items = self.limits.check_list_limit(call.identity, request.limit)
        return context.RequestScope(decision.visible, decision.check_stored, max_items)

    @staticmethod
    def _check_returned(call: Call, decision: rbac.Decision, response) -> None:
        """Get and History for a caller who may see only some objects: refuse the others."""
        if decision.visible is None:
            return
        envelopes = response.revisions if call.method == "History" else [response]
        for envelope in envelopes:
            if not decision.visible(kinds.unwrap(envelope)[1]):
                raise PermissionDeniedError(f"{call.identity} may not {call.actions[0].describe()} "
                                            f"(request id {call.request_id})")

    # ------------------------------------------------------------------ audit

    def _audit(self, call: Call, code: str, message: str = "", results=None) -> None:
        if self.audit is None:
            return
        identity = call.identity
        user, acting_as = (identity.user, str(identity)) if identity is not None else ("", "")
        actions = call.actions or [None]
        for index, action in enumerate(actions):
            item_code, item_message = code, message
            if results is not None and index < len(results):
                result = results[index]
                item_code = code_from_int(result.code).name
                item_message = result.message
            self.audit.record(request_id=call.request_id, user=user, identity=acting_as, method=call.method,
                              verb=action.verb if action else "", kind=action.kind.plural if action else "",
                              namespace=action.namespace if action else "", name=action.name if action else "",
                              code=item_code, message=item_message)

    def _audit_refusal(self, call: Call, error: SkyShiftError) -> None:
        self._audit(call, error.code.name, error.message)

    def _audit_outcome(self, call: Call, context_, response=None, error: Optional[BaseException] = None) -> None:
        """A write that ran (successfully or not), or a request the servicer refused."""
        if error is None:  # the servicer answers every failure with an abort (an exception)
            if call.method in WRITE_METHODS:
                results = response.results if call.method in ("BatchCreate", "BatchUpdate") else None
                self._audit(call, "OK", results=results)
            return
        code = context_.code()
        if code is not None:
            code_name = code.name
        else:
            code_name = "CANCELLED" if isinstance(error, asyncio.CancelledError) else "UNKNOWN"
        if call.method in WRITE_METHODS or code_name in ("PERMISSION_DENIED", "UNAUTHENTICATED"):
            self._audit(call, code_name, context_.details() or "")

    # ------------------------------------------------------------------ wrappers

    def guard(self, method: str, behavior, streaming: bool):
        return self._guard_stream(method, behavior) if streaming else self._guard_unary(method, behavior)

    async def _refuse(self, call: Call, context_, error: Exception):
        if not isinstance(error, SkyShiftError):
            log.exception("gate_failed", method=call.method, request_id=call.request_id)
            error = InternalError(f"internal error (request id {call.request_id}); this is a bug")
        elif not isinstance(error, InvalidError) or call.method in WRITE_METHODS:
            self._audit_refusal(call, error)
        await context_.abort(error.code, error.message)

    def _guard_unary(self, method: str, behavior):
        async def guarded(request, context_):
            call = Call(method)
            if not hasattr(request, "DESCRIPTOR"):  # undecodable: the servicer answers INVALID_ARGUMENT
                try:
                    await self.authenticator.authenticate(context_.invocation_metadata())
                except SkyShiftError as error:
                    await self._refuse(call, context_, error)
                return await behavior(request, context_)
            try:
                identity = await self._authenticate(call, request, context_.invocation_metadata())
                with self.limits.in_flight(identity) if self.limits else contextlib.nullcontext():
                    await self._throttle(call)
                    decision = await self._authorize(call)
                    async with await self.quota.admit(call.actions):
                        token = context.enter(self._scope(call, request, decision))
                        try:
                            response = await behavior(request, context_)
                        except BaseException as error:
                            self._audit_outcome(call, context_, error=error)
                            raise
                        finally:
                            context.leave(token)
                if call.method in CHECKED_METHODS:
                    self._check_returned(call, decision, response)
            except grpc.aio.AbortError:
                raise  # the servicer's own answer, audited above
            except Exception as error:  # noqa: BLE001 - refusals become status codes
                await self._refuse(call, context_, error)
            self._audit_outcome(call, context_, response)
            return response
        return guarded

    def _guard_stream(self, method: str, behavior):
        async def guarded(request, context_):
            call = Call(method)
            try:
                await self._authenticate(call, request, context_.invocation_metadata())
                await self._throttle(call)
                decision = await self._authorize(call)
                slot = (self.limits.watch(call.identity) if self.limits and method == "Watch"
                        else contextlib.nullcontext())
                slot.__enter__()
            except Exception as error:  # noqa: BLE001 - see _guard_unary
                await self._refuse(call, context_, error)
                return
            try:
                # Set, never reset: the stream's task ends with it (and an async generator may be
                # finalized in another context, where a reset would fail).
                context.enter(context.RequestScope(decision.visible, decision.check_stored))
                async for item in behavior(request, context_):
                    yield item
            finally:
                slot.__exit__(None, None, None)
        return guarded

    # ------------------------------------------------------------------ CanI

    async def CanI(self, request: api_pb2.CanIRequest, context_) -> api_pb2.CanIResponse:
        call = Call("CanI")
        try:
            identity = await self.authenticator.authenticate(context_.invocation_metadata())
            if not hasattr(request, "DESCRIPTOR"):
                raise request.error  # undecodable (servicer.MalformedRequest)
            verb = request.verb.lower()
            if verb not in rbac.VERBS:
                raise InvalidError("verb", f"unknown verb {request.verb!r} (one of: {', '.join(rbac.VERBS)})")
            kind = kinds.resolve(request.kind)
            namespace = request.namespace if verb in ("list", "watch") else request.namespace or kinds.DEFAULT_NAMESPACE
            action = Action(verb, kind, namespace if kind.namespaced else "", request.name)
            decision = await self.authorizer.authorize(identity, action)
        except Exception as error:  # noqa: BLE001 - see _guard_unary
            await self._refuse(call, context_, error)
        return api_pb2.CanIResponse(allowed=decision.allowed, filtered=decision.visible is not None,
                                    reason=decision.reason, identity=str(identity), auth_enabled=True)


class OpenAccess:
    """CanI when authentication is off: everyone may do everything."""

    async def CanI(self, request: api_pb2.CanIRequest, context_) -> api_pb2.CanIResponse:
        return api_pb2.CanIResponse(allowed=True, reason="authentication is disabled on this server",
                                    auth_enabled=False)
