"""The gRPC servicer: thin. It unpacks requests, calls the registry or the watch cache, and
maps errors to status codes in one place (`_errors`)."""
from __future__ import annotations

import functools
import inspect
import uuid

import structlog
from google.protobuf.message import DecodeError

from skyshift.api import kinds
from skyshift.api.errors import InternalError, InvalidError, SkyShiftError
from skyshift.v1 import api_pb2, objects_pb2

from api_server.agents import AgentRelay
from api_server.registry import Registry
from api_server.watch_cache import WatchCache

log = structlog.get_logger(__name__)


async def _abort(context, error: Exception, method: str):
    if isinstance(error, SkyShiftError):
        await context.abort(error.code, error.message)
    request_id = uuid.uuid4().hex[:12]
    log.exception("request_failed", method=method, request_id=request_id)
    await context.abort(InternalError.code, f"internal error (request id {request_id}); this is a bug")


class MalformedRequest:
    """A request body that does not decode. gRPC would answer UNKNOWN for a deserializer that
    raises; the servicer answers INVALID_ARGUMENT instead (see `decoder`)."""

    def __init__(self, request_class, error: DecodeError):
        self.error = InvalidError("request", f"not a valid {request_class.DESCRIPTOR.full_name} message: {error}")


def decoder(request_class):
    """The request deserializer for `request_class`."""
    def decode(data: bytes):
        try:
            return request_class.FromString(data)
        except DecodeError as error:
            return MalformedRequest(request_class, error)
    return decode


def _check_decoded(request) -> None:
    if isinstance(request, MalformedRequest):
        raise request.error


def _errors(method):
    """Map exceptions to gRPC status codes; anything unexpected is INTERNAL and logged."""
    if inspect.isasyncgenfunction(method):
        @functools.wraps(method)
        async def stream(self, request, context):
            try:
                _check_decoded(request)
                async for item in method(self, request, context):
                    yield item
            except Exception as error:  # noqa: BLE001 - mapped to a status
                await _abort(context, error, method.__name__)
        return stream

    @functools.wraps(method)
    async def unary(self, request, context):
        try:
            _check_decoded(request)
            return await method(self, request, context)
        except Exception as error:  # noqa: BLE001 - mapped to a status
            await _abort(context, error, method.__name__)
    return unary


def _envelope(obj) -> objects_pb2.Object:
    return kinds.wrap(obj)


class ObjectServicer:
    def __init__(self, registry: Registry, watch_cache: WatchCache, agents: AgentRelay):
        self.registry = registry
        self.watch_cache = watch_cache
        self.agents = agents

    @_errors
    async def Create(self, request: api_pb2.CreateRequest, context) -> objects_pb2.Object:
        return _envelope(await self.registry.create(request.object, request.namespace))

    @_errors
    async def Get(self, request: api_pb2.GetRequest, context) -> objects_pb2.Object:
        return _envelope(await self.registry.get(request.kind, request.namespace, request.name, request.at_revision))

    @_errors
    async def List(self, request: api_pb2.ListRequest, context) -> api_pb2.ListResponse:
        items, revision, token = await self.registry.list(request.kind, request.namespace, request.label_selector,
                                                          request.field_selector, request.limit,
                                                          request.continue_token)
        response = api_pb2.ListResponse(resource_version=revision, continue_token=token)
        field = kinds.resolve(request.kind).field
        for item in items:
            # One copy per object, straight into the response: building envelopes first and passing
            # them to ListResponse copies every object twice (measured: 76 ms -> 33 ms for 10,000 jobs).
            getattr(response.items.add(), field).CopyFrom(item)
        return response

    @_errors
    async def Update(self, request: api_pb2.UpdateRequest, context) -> objects_pb2.Object:
        return _envelope(await self.registry.update(request.object, request.namespace, status=False))

    @_errors
    async def UpdateStatus(self, request: api_pb2.UpdateRequest, context) -> objects_pb2.Object:
        return _envelope(await self.registry.update(request.object, request.namespace, status=True))

    @_errors
    async def Delete(self, request: api_pb2.DeleteRequest, context) -> objects_pb2.Object:
        return _envelope(await self.registry.delete(request.kind, request.namespace, request.name,
                                                    request.resource_version, request.uid))

    @_errors
    async def History(self, request: api_pb2.HistoryRequest, context) -> api_pb2.HistoryResponse:
        revisions = await self.registry.history(request.kind, request.namespace, request.name, request.limit)
        return api_pb2.HistoryResponse(revisions=[_envelope(r) for r in revisions])

    @_errors
    async def BatchCreate(self, request: api_pb2.BatchRequest, context) -> api_pb2.BatchResponse:
        results = await self.registry.batch(
            request.items, lambda item: self.registry.create(item.object, item.namespace))
        return self._batch_response(results)

    @_errors
    async def BatchUpdate(self, request: api_pb2.BatchRequest, context) -> api_pb2.BatchResponse:
        results = await self.registry.batch(
            request.items, lambda item: self.registry.update(item.object, item.namespace, status=request.status))
        return self._batch_response(results)

    @staticmethod
    def _batch_response(results) -> api_pb2.BatchResponse:
        response = api_pb2.BatchResponse()
        for obj, error in results:
            result = response.results.add()
            if error is not None:
                result.code = error.code.value[0]
                result.message = error.message
            else:
                result.object.CopyFrom(_envelope(obj))
        return response

    @_errors
    async def Watch(self, request: api_pb2.WatchRequest, context):
        """Yields serialized WatchEvents (shared between streams; see server.py)."""
        watcher = await self.watch_cache.watch(request)
        try:
            async for data in watcher.stream():
                yield data
        finally:
            watcher.cache.unsubscribe(watcher)

    @_errors
    async def Logs(self, request: api_pb2.LogsRequest, context):
        async for chunk in self.agents.logs(request):
            yield chunk

    @_errors
    async def Exec(self, request: api_pb2.ExecRequest, context) -> api_pb2.ExecResponse:
        return await self.agents.exec(request)
