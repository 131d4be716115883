"""The blocking client (grpc sync stubs), used by skyctl and scripts."""
from __future__ import annotations

import time
from typing import Dict, Iterable, Iterator, List, Optional, Sequence

import grpc
from google.protobuf.message import Message

from skyshift import config
from skyshift.api.errors import GoneError, UnavailableError, from_rpc_error
from skyshift.client import base
from skyshift.v1 import api_pb2_grpc


class Client:
    def __init__(self, endpoint: Optional[str] = None, token: Optional[str] = None,
                 settings: Optional[config.Settings] = None):
        self.settings = settings or config.load()
        if token is not None:
            self.settings.client.token = token
        self.endpoint = endpoint or base.resolve_endpoint(self.settings)
        self._channel = base.open_channel(grpc, self.endpoint, self.settings)
        self._stub = api_pb2_grpc.ObjectServiceStub(self._channel)
        self._metadata = base.metadata(self.settings)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method: str, request, timeout: Optional[float] = None):
        """One unary call, retried with backoff while the server is UNAVAILABLE (see AsyncClient._call)."""
        settings = self.settings.client
        delay = settings.retry_backoff_initial
        for attempt in range(settings.retry_attempts):
            try:
                return getattr(self._stub, method)(request, timeout=timeout or settings.call_timeout,
                                                   metadata=self._metadata)
            except grpc.RpcError as error:
                converted = from_rpc_error(error)
                if not isinstance(converted, UnavailableError) or attempt == settings.retry_attempts - 1:
                    raise converted from None
            time.sleep(delay)
            delay = min(delay * 2, settings.retry_backoff_max)
        raise AssertionError("unreachable")

    def ping(self, timeout: float = 1.0) -> bool:
        """True when an API server answers at the endpoint within `timeout` seconds."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
            return True
        except grpc.FutureTimeoutError:
            return False

    def create(self, obj: Message) -> Message:
        return base.unwrap(self._call("Create", base.create_request(obj)))

    def get(self, kind: str, name: str, namespace: Optional[str] = None, at_revision: int = 0) -> Message:
        return base.unwrap(self._call("Get", base.get_request(kind, name, namespace, at_revision)))

    def list(self, kind: str, namespace: Optional[str] = None, label_selector: str = "", field_selector: str = "",
             limit: int = 0, continue_token: str = "") -> base.ListResult:
        request = base.list_request(kind, namespace, label_selector, field_selector, limit, continue_token)
        return base.list_result(self._call("List", request))

    def list_all(self, kind: str, namespace: Optional[str] = None, label_selector: str = "",
                 field_selector: str = "", page_size: int = 0) -> base.ListResult:
        page_size = page_size or self.settings.client.list_page_size
        result = self.list(kind, namespace, label_selector, field_selector, page_size)
        items = list(result.items)
        token = result.continue_token
        while token:
            page = self.list(kind, namespace, label_selector, field_selector, page_size, token)
            items.extend(page.items)
            token = page.continue_token
        return base.ListResult(items, result.resource_version)

    def update(self, obj: Message) -> Message:
        return base.unwrap(self._call("Update", base.object_request(obj)[1]))

    def update_status(self, obj: Message) -> Message:
        return base.unwrap(self._call("UpdateStatus", base.object_request(obj)[1]))

    def delete(self, kind: str, name: str, namespace: Optional[str] = None, resource_version: int = 0,
               uid: str = "") -> Message:
        return base.unwrap(self._call("Delete", base.delete_request(kind, name, namespace, resource_version, uid)))

    def batch_create(self, objects: Iterable[Message]) -> List[base.BatchItem]:
        return base.batch_items(self._call("BatchCreate", base.batch_request(objects)))

    def batch_update(self, objects: Iterable[Message], status: bool = False) -> List[base.BatchItem]:
        return base.batch_items(self._call("BatchUpdate", base.batch_request(objects, status)))

    def history(self, kind: str, name: str, namespace: Optional[str] = None, limit: int = 0) -> List[Message]:
        response = self._call("History", base.history_request(kind, name, namespace, limit))
        return [base.unwrap(item) for item in response.revisions]

    def watch(self, kind: str, namespace: Optional[str] = None, name: str = "", label_selector: str = "",
              field_selector: str = "", resource_version: int = 0,
              allow_bookmarks: bool = False) -> Iterator[base.WatchEvent]:
        """Events after `resource_version`, resumed from the last revision when the stream
        breaks; raises GoneError when that revision is gone (re-list, or use list_watch)."""
        settings = self.settings.client
        delay = settings.retry_backoff_initial
        revision = resource_version
        while True:
            request = base.watch_request(kind, namespace, name, label_selector, field_selector, revision,
                                         allow_bookmarks)
            call = self._stub.Watch(request, metadata=self._metadata)
            try:
                for raw in call:
                    event = base.watch_event(raw)
                    revision = max(revision, event.resource_version)
                    delay = settings.retry_backoff_initial
                    yield event
                return
            except grpc.RpcError as error:
                converted = from_rpc_error(error)
                if not isinstance(converted, UnavailableError):
                    raise converted from None
            finally:
                call.cancel()
            time.sleep(delay)
            delay = min(delay * 2, settings.retry_backoff_max)

    def list_watch(self, kind: str, namespace: Optional[str] = None, label_selector: str = "",
                   field_selector: str = "", allow_bookmarks: bool = False) -> Iterator[base.WatchEvent]:
        """ADDED for every current object, then every change, re-listing on compaction (see
        AsyncClient.list_watch)."""
        known: Dict[str, Message] = {}
        listed = self.list_all(kind, namespace, label_selector, field_selector)
        yield from base.relist_events(known, listed.items, listed.resource_version)
        revision = listed.resource_version
        while True:
            try:
                for event in self.watch(kind, namespace, "", label_selector, field_selector, revision,
                                        allow_bookmarks):
                    base.track(known, event)
                    revision = max(revision, event.resource_version)
                    yield event
                return
            except GoneError:
                listed = self.list_all(kind, namespace, label_selector, field_selector)
                yield from base.relist_events(known, listed.items, listed.resource_version)
                revision = listed.resource_version

    def logs(self, job: str = "", namespace: Optional[str] = None, replica: str = "",
             follow: bool = False) -> Iterator[base.LogChunk]:
        """Output of a job's replicas (or of one replica), as the API server relays it from the
        skylets, interleaved as it arrives. With `follow`, streams until the replicas finish.
        Not resumed when the stream breaks (the caller decides whether to read again)."""
        call = self._stub.Logs(base.logs_request(job, namespace, replica, follow), metadata=self._metadata)
        try:
            for chunk in call:
                yield base.LogChunk(chunk.replica, chunk.data)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        finally:
            call.cancel()

    def can_i(self, verb: str, kind: str, namespace: Optional[str] = None, name: str = "") -> base.CanIResult:
        """May this client's identity do `verb` on `kind` (in `namespace`, to `name`)?"""
        return base.can_i_result(self._call("CanI", base.can_i_request(verb, kind, namespace, name)))

    def exec(self, replica: str, command: Sequence[str], namespace: Optional[str] = None) -> base.ExecResult:
        """Run `command` (argv) beside a running replica, where its cluster's driver can. Never
        retried: the command may have side effects."""
        try:
            response = self._stub.Exec(base.exec_request(replica, command, namespace),
                                       timeout=base.exec_timeout(self.settings), metadata=self._metadata)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        return base.ExecResult(response.exit_code, response.output)
