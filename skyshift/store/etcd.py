"""The etcd store: key layout and conditional writes (DESIGN.md §3).

Keys are `/skyshift/registry/<plural>/<namespace>/<name>`, `_` as the namespace of
cluster-scoped kinds. Create is a transaction on `create_revision == 0`; update and delete
compare `mod_revision`. Nothing is ever written without a precondition.
"""
from __future__ import annotations

import asyncio
import dataclasses
from typing import AsyncIterator, List, Optional, Sequence, Tuple

import aetcd
import grpc
from aetcd import rpc

from skyshift.api.errors import (AlreadyExistsError, ConflictError, GoneError, InvalidError, NotFoundError,
                                 UnavailableError)
from skyshift.config import EtcdSettings

REGISTRY = b"/skyshift/registry/"
_TRANSIENT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


def prefix_end(prefix: bytes) -> bytes:
    """The smallest key after every key that starts with `prefix`."""
    data = bytearray(prefix)
    for index in reversed(range(len(data))):
        if data[index] < 0xFF:
            data[index] += 1
            return bytes(data[: index + 1])
    return b"\0"


def kind_prefix(plural: str) -> bytes:
    return REGISTRY + plural.encode() + b"/"


def namespace_prefix(plural: str, namespace: str) -> bytes:
    return kind_prefix(plural) + namespace.encode() + b"/"


def object_key(plural: str, namespace: str, name: str) -> bytes:
    return namespace_prefix(plural, namespace) + name.encode()


def split_key(key: bytes) -> Tuple[str, str, str]:
    """(plural, namespace, name) of an object key."""
    plural, namespace, name = key[len(REGISTRY):].decode().split("/", 2)
    return plural, namespace, name


class FutureRevisionError(InvalidError):
    """A read at a revision etcd has not reached: the caller's revision is wrong, not compacted."""

    def __init__(self, details: str):
        super().__init__("revision", f"is newer than the store's current revision ({details})")


@dataclasses.dataclass
class Entry:
    key: bytes
    value: bytes
    mod_revision: int
    create_revision: int
    version: int


@dataclasses.dataclass
class Page:
    entries: List[Entry]
    revision: int
    more: bool


@dataclasses.dataclass
class Change:
    """One etcd event: a put (value set) or a delete (value empty, prev_value the last state)."""

    key: bytes
    value: bytes
    prev_value: bytes
    mod_revision: int
    create_revision: int
    deleted: bool


def _entry(kv) -> Entry:
    return Entry(kv.key, kv.value, kv.mod_revision, kv.create_revision, kv.version)


def parse_endpoints(endpoints: str) -> Tuple[str, int]:
    """aetcd takes one host and port; several members become one multi-address gRPC target
    (`ipv4:h0:p0,h1:p1,h2` + port p2) so the channel fails over between them."""
    members = [m.strip() for m in endpoints.split(",") if m.strip()]
    if not members:
        raise ValueError("no etcd endpoint given")
    parsed = []
    for member in members:
        member = member.split("://", 1)[-1]
        host, _, port = member.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"etcd endpoint {member!r} is not host:port")
        parsed.append((host, int(port)))
    if len(parsed) == 1:
        return parsed[0]
    head = ",".join(f"{h}:{p}" for h, p in parsed[:-1])
    return f"ipv4:{head},{parsed[-1][0]}", parsed[-1][1]


class Store:
    """Async etcd access for the API server."""

    def __init__(self, settings: EtcdSettings, endpoints: str):
        self.settings = settings
        host, port = parse_endpoints(endpoints)
        options = {
            "grpc.max_receive_message_length": settings.max_receive_bytes,
            "grpc.max_send_message_length": settings.max_receive_bytes,
            "grpc.lb_policy_name": "round_robin" if "," in endpoints else "pick_first",
        }
        self._client = aetcd.Client(host=host, port=port, options=options)
        self._timeout = settings.request_timeout

    async def connect(self) -> None:
        await self._client.connect()
        self._kv = self._client.kvstub
        self._watch_stub = rpc.WatchStub(self._client.channel)
        self._maintenance = self._client.maintenancestub

    async def close(self) -> None:
        await self._client.close()

    async def _call(self, method, request):
        try:
            return await method(request, timeout=self._timeout)
        except grpc.aio.AioRpcError as error:
            if error.code() in _TRANSIENT:
                raise UnavailableError(f"etcd: {error.details()}") from error
            if "future revision" in (error.details() or ""):
                raise FutureRevisionError(error.details()) from error
            if error.code() == grpc.StatusCode.OUT_OF_RANGE or "compacted" in (error.details() or ""):
                raise GoneError(f"revision is compacted: {error.details()}") from error
            raise

    # ------------------------------------------------------------------ reads

    async def get(self, key: bytes, revision: int = 0) -> Optional[Entry]:
        response = await self._call(self._kv.Range, rpc.RangeRequest(key=key, revision=revision))
        return _entry(response.kvs[0]) if response.kvs else None

    async def range(self, start: bytes, end: bytes, revision: int = 0, limit: int = 0) -> Page:
        """Keys in [start, end) at `revision` (0: latest), at most `limit` of them."""
        request = rpc.RangeRequest(key=start, range_end=end, revision=revision, limit=limit)
        response = await self._call(self._kv.Range, request)
        return Page([_entry(kv) for kv in response.kvs], response.header.revision, response.more)

    async def count(self, prefix: bytes) -> Tuple[int, int]:
        """(number of keys under prefix, current revision)."""
        request = rpc.RangeRequest(key=prefix, range_end=prefix_end(prefix), count_only=True)
        response = await self._call(self._kv.Range, request)
        return response.count, response.header.revision

    async def revision(self) -> int:
        request = rpc.RangeRequest(key=REGISTRY, range_end=prefix_end(REGISTRY), count_only=True)
        return (await self._call(self._kv.Range, request)).header.revision

    # ------------------------------------------------------------------ writes

    async def create(self, key: bytes, value: bytes, guard: Optional[Tuple[bytes, int]] = None) -> int:
        """Put `key` only if it does not exist (and, with `guard=(other_key, mod_revision)`,
        only if that other key is unchanged); returns the new revision. Raises
        AlreadyExistsError, or ConflictError when the guard failed."""
        compares = [rpc.Compare(key=key, target=rpc.Compare.CREATE, result=rpc.Compare.EQUAL, create_revision=0)]
        if guard is not None:
            compares.append(rpc.Compare(key=guard[0], target=rpc.Compare.MOD, result=rpc.Compare.EQUAL,
                                        mod_revision=guard[1]))
        request = rpc.TxnRequest(
            compare=compares,
            success=[rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=value))],
            failure=[rpc.RequestOp(request_range=rpc.RangeRequest(key=key, keys_only=True))],
        )
        response = await self._call(self._kv.Txn, request)
        if not response.succeeded:
            if response.responses[0].response_range.kvs:
                raise AlreadyExistsError("already exists")
            raise ConflictError("the guarding object changed")
        return response.header.revision

    async def update(self, key: bytes, value: bytes, mod_revision: int) -> int:
        """Put `key` only if its mod_revision is unchanged; returns the new revision."""
        compare = rpc.Compare(key=key, target=rpc.Compare.MOD, result=rpc.Compare.EQUAL, mod_revision=mod_revision)
        request = rpc.TxnRequest(
            compare=[compare],
            success=[rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=value))],
            failure=[rpc.RequestOp(request_range=rpc.RangeRequest(key=key, keys_only=True))],
        )
        response = await self._call(self._kv.Txn, request)
        if not response.succeeded:
            self._raise_failed(response, mod_revision)
        return response.header.revision

    async def delete(self, key: bytes, mod_revision: int) -> int:
        """Delete `key` only if its mod_revision is unchanged; returns the new revision."""
        compare = rpc.Compare(key=key, target=rpc.Compare.MOD, result=rpc.Compare.EQUAL, mod_revision=mod_revision)
        request = rpc.TxnRequest(
            compare=[compare],
            success=[rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=key))],
            failure=[rpc.RequestOp(request_range=rpc.RangeRequest(key=key, keys_only=True))],
        )
        response = await self._call(self._kv.Txn, request)
        if not response.succeeded:
            self._raise_failed(response, mod_revision)
        return response.header.revision

    @staticmethod
    def _raise_failed(response, expected: int) -> None:
        kvs = response.responses[0].response_range.kvs if response.responses else []
        if not kvs:
            raise NotFoundError("not found")
        raise ConflictError(f"the object was modified (resource_version {kvs[0].mod_revision}, "
                            f"request had {expected}): re-read it and retry")

    async def compact(self, revision: int) -> None:
        await self._call(self._kv.Compact, rpc.CompactionRequest(revision=revision, physical=True))

    # ------------------------------------------------------------------ watch

    async def watch(self, prefix: bytes, start_revision: int,
                    progress_interval: float = 1.0) -> AsyncIterator[Tuple[int, Sequence[Change]]]:
        """Yield (revision, changes) for keys under `prefix` from `start_revision` on.

        `revision` is how far the stream has reached: the last change's revision, or for a
        batch with no changes (a progress notification, requested every `progress_interval`
        seconds) the store's revision, every change up to which has been delivered.
        Raises GoneError when `start_revision` is compacted (with `compact_revision` set),
        UnavailableError when the stream breaks.
        """
        call = self._watch_stub.Watch()
        create = rpc.WatchCreateRequest(key=prefix, range_end=prefix_end(prefix), start_revision=start_revision,
                                        prev_kv=True)

        async def request_progress() -> None:
            # At once (so a caller learns quickly that it has caught up), then periodically.
            # etcd answers only once the watch has replayed its history, so ask often at first.
            delay = min(0.02, progress_interval)
            while True:
                await call.write(rpc.WatchRequest(progress_request=rpc.WatchProgressRequest()))
                await asyncio.sleep(delay)
                delay = min(delay * 2, progress_interval)

        progress_task = None
        try:
            await call.write(rpc.WatchRequest(create_request=create))
            while True:
                response = await call.read()
                if response is grpc.aio.EOF:
                    raise UnavailableError("etcd watch stream ended")
                if response.compact_revision:
                    error = GoneError(f"revision {start_revision} is compacted (compacted up to "
                                      f"{response.compact_revision})")
                    error.compact_revision = response.compact_revision
                    raise error
                if response.canceled:
                    raise UnavailableError(f"etcd canceled the watch: {response.cancel_reason}")
                if response.created:
                    if progress_interval > 0:
                        progress_task = asyncio.create_task(request_progress())
                    if not response.events:
                        continue
                if not response.events:
                    yield response.header.revision, ()
                    continue
                changes = [
                    Change(ev.kv.key, ev.kv.value, ev.prev_kv.value, ev.kv.mod_revision, ev.kv.create_revision,
                           ev.type == ev.DELETE)
                    for ev in response.events
                ]
                yield changes[-1].mod_revision, changes
        except grpc.aio.AioRpcError as error:
            raise UnavailableError(f"etcd watch failed: {error.details()}") from error
        finally:
            if progress_task is not None:
                progress_task.cancel()
            call.cancel()
