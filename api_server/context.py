"""What the registry and the watch cache need to know about the caller of the current request.

The gate (api_server/gate.py) sets a `RequestScope` for the RPC it lets through; the registry and
the watch cache read it through the functions below, each in one place: List and Watch keep only
the objects the caller may see, updates and deletes check the stored object the caller touches,
and lists are capped at the caller's bound. Without a scope (authentication disabled, or the
server's own work) nothing is filtered.
"""
from __future__ import annotations

import contextvars
import dataclasses
from typing import Callable, Optional

from google.protobuf.message import Message

from skyshift.api.kinds import Kind

#: Is this object visible to the caller? (None: everything is.)
Visibility = Callable[[Message], bool]


@dataclasses.dataclass(frozen=True)
class RequestScope:
    #: For List and Watch: the objects of the requested kind the caller may see.
    visible: Optional[Visibility] = None
    #: Raises PermissionDeniedError when the caller may not change this stored object (of
    #: this kind); called by updates and deletes with the object as stored, so the check and
    #: the compare-and-swap write concern the same revision.
    check_stored: Optional[Callable[[Kind, Message], None]] = None
    #: Most items one List may return when it sets no limit (0: the server's own bound).
    max_list_items: int = 0


_scope: contextvars.ContextVar[Optional[RequestScope]] = contextvars.ContextVar("skyshift_request_scope",
                                                                              default=None)


def enter(scope: RequestScope) -> contextvars.Token:
    return _scope.set(scope)


def leave(token: contextvars.Token) -> None:
    _scope.reset(token)


def visibility() -> Optional[Visibility]:
    scope = _scope.get()
    return scope.visible if scope is not None else None


def check_stored(kind: Kind, stored: Message) -> None:
    scope = _scope.get()
    if scope is not None and scope.check_stored is not None:
        scope.check_stored(kind, stored)


def max_list_items(server_bound: int) -> int:
    scope = _scope.get()
    if scope is None or not scope.max_list_items:
        return server_bound
    return min(server_bound, scope.max_list_items)
