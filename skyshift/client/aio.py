"""The asyncio client (grpc.aio), used by controllers, skylets and services."""
from __future__ import annotations

import asyncio
from typing import AsyncIterator, Dict, Iterable, List, Optional, Sequence

import grpc
from google.protobuf.message import Message

from skyshift import config
from skyshift.api.errors import GoneError, UnavailableError, from_rpc_error
from skyshift.client import base
from skyshift.v1 import api_pb2_grpc


class AsyncClient:
    def __init__(self, endpoint: Optional[str] = None, token: Optional[str] = None,
                 settings: Optional[config.Settings] = None):
        self.settings = settings or config.load()
        if token is not None:
            self.settings.client.token = token
        self.endpoint = endpoint or base.resolve_endpoint(self.settings)
        self._channel = base.open_channel(grpc.aio, self.endpoint, self.settings)
        self._stub = api_pb2_grpc.ObjectServiceStub(self._channel)
        self._metadata = base.metadata(self.settings)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _call(self, method: str, request):
        """One unary call, retried with backoff while the server is UNAVAILABLE. Writes are
        conditional, so a retried write that had applied fails visibly (ALREADY_EXISTS or
        ABORTED) rather than applying twice."""
        settings = self.settings.client
        delay = settings.retry_backoff_initial
        for attempt in range(settings.retry_attempts):
            try:
                return await getattr(self._stub, method)(request, timeout=settings.call_timeout,
                                                         metadata=self._metadata)
            except grpc.aio.AioRpcError as error:
                converted = from_rpc_error(error)
                if not isinstance(converted, UnavailableError) or attempt == settings.retry_attempts - 1:
                    raise converted from None
            await asyncio.sleep(delay)
            delay = min(delay * 2, settings.retry_backoff_max)
        raise AssertionError("unreachable")

    async def create(self, obj: Message) -> Message:
        return base.unwrap(await self._call("Create", base.create_request(obj)))

    async def get(self, kind: str, name: str, namespace: Optional[str] = None, at_revision: int = 0) -> Message:
        return base.unwrap(await self._call("Get", base.get_request(kind, name, namespace, at_revision)))

    async def list(self, kind: str, namespace: Optional[str] = None, label_selector: str = "",
                   field_selector: str = "", limit: int = 0, continue_token: str = "") -> base.ListResult:
        """One page (all of it when limit is 0 and it fits the server's max_list_items).
        namespace None or "": every namespace."""
        request = base.list_request(kind, namespace, label_selector, field_selector, limit, continue_token)
        return base.list_result(await self._call("List", request))

    async def list_all(self, kind: str, namespace: Optional[str] = None, label_selector: str = "",
                       field_selector: str = "", page_size: int = 0) -> base.ListResult:
        """Every matching object, page by page, all read at the first page's revision."""
        page_size = page_size or self.settings.client.list_page_size
        result = await self.list(kind, namespace, label_selector, field_selector, page_size)
        items = list(result.items)
        token = result.continue_token
        while token:
            page = await self.list(kind, namespace, label_selector, field_selector, page_size, token)
            items.extend(page.items)
            token = page.continue_token
        return base.ListResult(items, result.resource_version)

    async def update(self, obj: Message) -> Message:
        """Replace metadata and spec; fails with ConflictError if the object changed since
        `obj.metadata.resource_version`."""
        return base.unwrap(await self._call("Update", base.object_request(obj)[1]))

    async def update_status(self, obj: Message) -> Message:
        return base.unwrap(await self._call("UpdateStatus", base.object_request(obj)[1]))

    async def delete(self, kind: str, name: str, namespace: Optional[str] = None, resource_version: int = 0,
                     uid: str = "") -> Message:
        request = base.delete_request(kind, name, namespace, resource_version, uid)
        return base.unwrap(await self._call("Delete", request))

    async def batch_create(self, objects: Iterable[Message]) -> List[base.BatchItem]:
        return base.batch_items(await self._call("BatchCreate", base.batch_request(objects)))

    async def batch_update(self, objects: Iterable[Message], status: bool = False) -> List[base.BatchItem]:
        return base.batch_items(await self._call("BatchUpdate", base.batch_request(objects, status)))

    async def history(self, kind: str, name: str, namespace: Optional[str] = None, limit: int = 0) -> List[Message]:
        response = await self._call("History", base.history_request(kind, name, namespace, limit))
        return [base.unwrap(item) for item in response.revisions]

    async def watch(self, kind: str, namespace: Optional[str] = None, name: str = "", label_selector: str = "",
                    field_selector: str = "", resource_version: int = 0,
                    allow_bookmarks: bool = False) -> AsyncIterator[base.WatchEvent]:
        """Events after `resource_version`. A broken stream is resumed from the last revision
        seen; raises GoneError when that revision is no longer available (re-list, or use
        `list_watch`)."""
        settings = self.settings.client
        delay = settings.retry_backoff_initial
        revision = resource_version
        while True:
            request = base.watch_request(kind, namespace, name, label_selector, field_selector, revision,
                                         allow_bookmarks)
            call = self._stub.Watch(request, metadata=self._metadata)
            try:
                async for raw in call:
                    event = base.watch_event(raw)
                    revision = max(revision, event.resource_version)
                    delay = settings.retry_backoff_initial
                    yield event
                return
            except grpc.aio.AioRpcError as error:
                converted = from_rpc_error(error)
                if not isinstance(converted, UnavailableError):
                    raise converted from None
            finally:
                call.cancel()
            await asyncio.sleep(delay)
            delay = min(delay * 2, settings.retry_backoff_max)

    async def list_watch(self, kind: str, namespace: Optional[str] = None, label_selector: str = "",
                         field_selector: str = "", allow_bookmarks: bool = False) -> AsyncIterator[base.WatchEvent]:
        """ADDED for every current object, then every change; when the watch's revision is
        compacted, re-lists and emits the differences (ADDED, MODIFIED, DELETED) before
        watching on, so the caller's view never misses a change."""
        known: Dict[str, Message] = {}
        listed = await self.list_all(kind, namespace, label_selector, field_selector)
        for event in base.relist_events(known, listed.items, listed.resource_version):
            yield event
        revision = listed.resource_version
        while True:
            try:
                async for event in self.watch(kind, namespace, "", label_selector, field_selector, revision,
                                              allow_bookmarks):
                    base.track(known, event)
                    revision = max(revision, event.resource_version)
                    yield event
                return
            except GoneError:
                listed = await self.list_all(kind, namespace, label_selector, field_selector)
                for event in base.relist_events(known, listed.items, listed.resource_version):
                    yield event
                revision = listed.resource_version

    async def logs(self, job: str = "", namespace: Optional[str] = None, replica: str = "",
                   follow: bool = False) -> AsyncIterator[base.LogChunk]:
        """Output of a job's replicas (or one replica); see Client.logs."""
        call = self._stub.Logs(base.logs_request(job, namespace, replica, follow), metadata=self._metadata)
        try:
            async for chunk in call:
                yield base.LogChunk(chunk.replica, chunk.data)
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from None
        finally:
            call.cancel()

    async def can_i(self, verb: str, kind: str, namespace: Optional[str] = None, name: str = "") -> base.CanIResult:
        """See Client.can_i."""
        return base.can_i_result(await self._call("CanI", base.can_i_request(verb, kind, namespace, name)))

    async def exec(self, replica: str, command: Sequence[str], namespace: Optional[str] = None) -> base.ExecResult:
        """Run `command` beside a running replica; see Client.exec."""
        try:
            response = await self._stub.Exec(base.exec_request(replica, command, namespace),
                                             timeout=base.exec_timeout(self.settings), metadata=self._metadata)
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from None
        return base.ExecResult(response.exit_code, response.output)
