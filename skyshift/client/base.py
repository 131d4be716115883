"""What the sync and async clients share: request building, results, endpoint lookup."""
from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from google.protobuf.message import Message

from skyshift import config
from skyshift.api import kinds
from skyshift.api.errors import SkyShiftError, UnavailableError, code_from_int, from_status
from skyshift.v1 import api_pb2

#: Event types as strings, as users see them.
EVENT_TYPES = {
    api_pb2.WatchEvent.ADDED: "ADDED",
    api_pb2.WatchEvent.MODIFIED: "MODIFIED",
    api_pb2.WatchEvent.DELETED: "DELETED",
    api_pb2.WatchEvent.BOOKMARK: "BOOKMARK",
}


@dataclasses.dataclass
class ListResult:
    items: List[Message]
    resource_version: int
    continue_token: str = ""


@dataclasses.dataclass
class WatchEvent:
    type: str                    # ADDED, MODIFIED, DELETED, BOOKMARK
    object: Optional[Message]    # None for BOOKMARK
    resource_version: int


@dataclasses.dataclass
class BatchItem:
    object: Optional[Message]
    error: Optional[SkyShiftError]


@dataclasses.dataclass
class LogChunk:
    replica: str   # the replica the output came from
    data: bytes


@dataclasses.dataclass
class CanIResult:
    allowed: bool
    filtered: bool       # allowed, but List/Watch return only part of the objects
    reason: str          # why not
    identity: str        # who the server took the caller for
    auth_enabled: bool   # False: the server lets everyone do everything


@dataclasses.dataclass
class ExecResult:
    exit_code: int
    output: bytes  # stdout and stderr together


def resolve_endpoint(settings: config.Settings) -> str:
    """The API server address: the configured one, else the one the local server recorded."""
    if settings.client.endpoint:
        return settings.client.endpoint
    try:
        return settings.api_endpoint_file.read_text().strip()
    except FileNotFoundError:
        raise UnavailableError(f"no API server configured and none running under {settings.home} "
                               "(start one with `skyctl api start`)") from None


def channel_options(settings: config.Settings) -> List[Tuple[str, int]]:
    size = settings.api.max_message_bytes
    return [("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size)]


def channel_credentials(settings: config.Settings):
    """TLS credentials when client.ca_file is set (with client.cert_file/key_file for mutual
    TLS); None: a plaintext channel."""
    import grpc

    client = settings.client
    if not client.ca_file:
        return None

    def read(path: str) -> Optional[bytes]:
        return pathlib.Path(os.path.expanduser(path)).read_bytes() if path else None

    return grpc.ssl_channel_credentials(root_certificates=read(client.ca_file), private_key=read(client.key_file),
                                        certificate_chain=read(client.cert_file))


def open_channel(channels, endpoint: str, settings: config.Settings):
    """A channel to the API server; `channels` is the grpc or the grpc.aio module."""
    credentials = channel_credentials(settings)
    if credentials is None:
        return channels.insecure_channel(endpoint, options=channel_options(settings))
    return channels.secure_channel(endpoint, credentials, options=channel_options(settings))


def metadata(settings: config.Settings) -> Tuple[Tuple[str, str], ...]:
    token = settings.client.token
    return (("authorization", f"Bearer {token}"),) if token else ()


def namespace_for(kind: kinds.Kind, namespace: Optional[str]) -> str:
    if not kind.namespaced:
        return ""
    return namespace or kinds.DEFAULT_NAMESPACE


def object_request(obj: Message) -> Tuple[kinds.Kind, api_pb2.UpdateRequest]:
    kind = kinds.kind_of(obj)
    request = api_pb2.UpdateRequest(namespace=obj.metadata.namespace)
    getattr(request.object, kind.field).CopyFrom(obj)
    return kind, request


def create_request(obj: Message) -> api_pb2.CreateRequest:
    kind = kinds.kind_of(obj)
    request = api_pb2.CreateRequest(namespace=obj.metadata.namespace)
    getattr(request.object, kind.field).CopyFrom(obj)
    return request


def get_request(kind: str, name: str, namespace: Optional[str], at_revision: int) -> api_pb2.GetRequest:
    resolved = kinds.resolve(kind)
    return api_pb2.GetRequest(kind=resolved.plural, name=name, namespace=namespace_for(resolved, namespace),
                              at_revision=at_revision)


def list_request(kind: str, namespace: Optional[str], label_selector: str, field_selector: str,
                 limit: int, continue_token: str) -> api_pb2.ListRequest:
    resolved = kinds.resolve(kind)
    return api_pb2.ListRequest(kind=resolved.plural, namespace=(namespace or "") if resolved.namespaced else "",
                               label_selector=label_selector, field_selector=field_selector, limit=limit,
                               continue_token=continue_token)


def delete_request(kind: str, name: str, namespace: Optional[str], resource_version: int,
                   uid: str) -> api_pb2.DeleteRequest:
    resolved = kinds.resolve(kind)
    return api_pb2.DeleteRequest(kind=resolved.plural, name=name, namespace=namespace_for(resolved, namespace),
                                 resource_version=resource_version, uid=uid)


def watch_request(kind: str, namespace: Optional[str], name: str, label_selector: str, field_selector: str,
                  resource_version: int, allow_bookmarks: bool) -> api_pb2.WatchRequest:
    resolved = kinds.resolve(kind)
    namespace = (namespace or "") if resolved.namespaced else ""
    if name and resolved.namespaced and not namespace:
        namespace = kinds.DEFAULT_NAMESPACE
    return api_pb2.WatchRequest(kind=resolved.plural, namespace=namespace, name=name,
                                label_selector=label_selector, field_selector=field_selector,
                                resource_version=resource_version, allow_bookmarks=allow_bookmarks)


def history_request(kind: str, name: str, namespace: Optional[str], limit: int) -> api_pb2.HistoryRequest:
    resolved = kinds.resolve(kind)
    return api_pb2.HistoryRequest(kind=resolved.plural, name=name, namespace=namespace_for(resolved, namespace),
                                  limit=limit)


def logs_request(job: str, namespace: Optional[str], replica: str, follow: bool) -> api_pb2.LogsRequest:
    return api_pb2.LogsRequest(namespace=namespace or kinds.DEFAULT_NAMESPACE, job=job, replica=replica,
                               follow=follow)


def exec_request(replica: str, command: Sequence[str], namespace: Optional[str]) -> api_pb2.ExecRequest:
    return api_pb2.ExecRequest(namespace=namespace or kinds.DEFAULT_NAMESPACE, replica=replica,
                               command=list(command))


def can_i_request(verb: str, kind: str, namespace: Optional[str], name: str) -> api_pb2.CanIRequest:
    return api_pb2.CanIRequest(verb=verb, kind=kind, namespace=namespace or "", name=name)


def can_i_result(response: api_pb2.CanIResponse) -> CanIResult:
    return CanIResult(response.allowed, response.filtered, response.reason, response.identity,
                      response.auth_enabled)


def exec_timeout(settings: config.Settings) -> float:
    """An exec call may last as long as the driver lets the command run, plus the usual margin."""
    return settings.drivers.exec_timeout + settings.client.call_timeout


def batch_request(objects: Iterable[Message], status: bool = False) -> api_pb2.BatchRequest:
    return api_pb2.BatchRequest(items=[object_request(obj)[1] for obj in objects], status=status)


def unwrap(envelope) -> Message:
    return kinds.unwrap(envelope)[1]


def list_result(response: api_pb2.ListResponse) -> ListResult:
    return ListResult([unwrap(item) for item in response.items], response.resource_version,
                      response.continue_token)


def watch_event(event: api_pb2.WatchEvent) -> WatchEvent:
    obj = unwrap(event.object) if event.object.WhichOneof("kind") else None
    return WatchEvent(EVENT_TYPES.get(event.type, "UNKNOWN"), obj, event.resource_version)


def batch_items(response: api_pb2.BatchResponse) -> List[BatchItem]:
    items = []
    for result in response.results:
        if result.code:
            items.append(BatchItem(None, from_status(code_from_int(result.code), result.message)))
        else:
            items.append(BatchItem(unwrap(result.object), None))
    return items


def object_key(obj: Message) -> str:
    meta = obj.metadata
    return f"{meta.namespace}/{meta.name}" if meta.namespace else meta.name


def relist_events(known: Dict[str, Message], fresh: Sequence[Message], revision: int) -> List[WatchEvent]:
    """The events that turn the `known` objects (key -> last seen object) into `fresh`, the
    result of a re-list at `revision`. Updates `known` in place."""
    events = []
    seen = set()
    for obj in fresh:
        key = object_key(obj)
        seen.add(key)
        previous = known.get(key)
        if previous is None:
            events.append(WatchEvent("ADDED", obj, obj.metadata.resource_version))
        elif previous.metadata.resource_version != obj.metadata.resource_version:
            events.append(WatchEvent("MODIFIED", obj, obj.metadata.resource_version))
        known[key] = obj
    for key in [k for k in known if k not in seen]:
        events.append(WatchEvent("DELETED", known.pop(key), revision))
    return events


def track(known: Dict[str, Message], event: WatchEvent) -> None:
    if event.object is None:
        return
    key = object_key(event.object)
    if event.type == "DELETED":
        known.pop(key, None)
    else:
        known[key] = event.object
