"""Object operations on the store: admission (validation, defaults, metadata), optimistic
concurrency and graceful deletion. Servicers call this; nothing here knows about gRPC."""
from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
import uuid
from typing import Dict, List, Optional, Tuple

import structlog
from google.protobuf.message import Message

from skyshift.api import conditions, kinds, validation
from skyshift.api.wellknown import NAMESPACE_FINALIZER
from skyshift.api.errors import (AlreadyExistsError, ConflictError, GoneError, InvalidError, LimitError,
                                 NotFoundError, PreconditionError, SkyShiftError)
from skyshift.api.selectors import FieldSelector, LabelSelector
from skyshift.config import Settings
from skyshift.store.etcd import (Entry, FutureRevisionError, Store, kind_prefix, namespace_prefix, object_key,
                                 prefix_end)

from api_server import context as request_context

log = structlog.get_logger(__name__)

#: Namespaces the server creates on start.
BUILTIN_NAMESPACES = (kinds.DEFAULT_NAMESPACE, "skyshift-system")
#: Reads and conditional writes a Delete without preconditions tries while the object keeps changing.
_DELETE_ATTEMPTS = 5
#: Initial status phase of new objects, per kind.
INITIAL_PHASE = {"Namespace": "ACTIVE", "Cluster": "INIT", "Job": "PENDING", "Replica": "PENDING", "Link": "INIT"}


def _now(stamp) -> None:
    stamp.FromNanoseconds(time.time_ns())


def decode(kind: kinds.Kind, entry: Entry) -> Message:
    obj = kind.message.FromString(entry.value)
    obj.metadata.resource_version = entry.mod_revision
    return obj


def encode(obj: Message) -> bytes:
    """Serialized for storage: resource_version lives in etcd's mod_revision, not the value."""
    revision = obj.metadata.resource_version
    obj.metadata.resource_version = 0
    try:
        return obj.SerializeToString(deterministic=True)
    finally:
        obj.metadata.resource_version = revision


def _bind(replica: Message) -> None:
    """Setting a pending Replica's cluster (by the scheduler, or at creation for a pinned one)
    binds it: its status turns SCHEDULED in the same write, so a placement costs one write
    (like Kubernetes' pods/binding). Call it only when spec.cluster was empty before."""
    if not replica.spec.cluster or replica.status.phase not in ("", "PENDING"):
        return
    replica.status.phase = "SCHEDULED"
    where = f"cluster {replica.spec.cluster}" + (f", node {replica.spec.node}" if replica.spec.node else "")
    conditions.set_condition(replica.status.conditions, "Scheduled", conditions.TRUE, "Scheduled", f"bound to {where}",
                             replica.metadata.generation)


def describe(kind: kinds.Kind, namespace: str, name: str) -> str:
    where = f' in namespace "{namespace}"' if kind.namespaced else ""
    return f'{kind.name.lower()} "{name}"{where}'


def _store_namespace(kind: kinds.Kind, namespace: str) -> str:
    return namespace if kind.namespaced else kinds.CLUSTER_SCOPE


class Registry:
    def __init__(self, store: Store, settings: Settings):
        self.store = store
        self.settings = settings
        #: namespace -> the guard of its last successful check (see _namespace_guard).
        self._namespace_guards: Dict[str, Tuple[bytes, int]] = {}

    # ------------------------------------------------------------------ helpers

    def _request_namespace(self, kind: kinds.Kind, request_namespace: str, obj: Message) -> str:
        """Reconcile the request's namespace with the body's; fill the body's."""
        body = obj.metadata.namespace
        if not kind.namespaced:
            if request_namespace:
                raise InvalidError("namespace", f"{kind.name} is cluster-scoped and has no namespace")
            return ""
        if request_namespace and body and request_namespace != body:
            raise InvalidError("metadata.namespace",
                               f'"{body}" does not match the request\'s namespace "{request_namespace}"')
        namespace = body or request_namespace or kinds.DEFAULT_NAMESPACE
        obj.metadata.namespace = namespace
        return namespace

    def _check_size(self, data: bytes) -> None:
        limit = self.settings.api.max_object_bytes
        if len(data) > limit:
            raise LimitError(f"object is {len(data)} bytes, larger than the limit of {limit} bytes")

    def key(self, kind: kinds.Kind, namespace: str, name: str) -> bytes:
        return object_key(kind.plural, _store_namespace(kind, namespace), name)

    def _validate_address(self, kind: kinds.Kind, namespace: str, name: str) -> None:
        validation.check_name(name, "name")
        if kind.namespaced:
            validation.check_name(namespace, "namespace")
        elif namespace:
            raise InvalidError("namespace", f"{kind.name} is cluster-scoped and has no namespace")

    async def _read(self, kind: kinds.Kind, namespace: str, name: str) -> Tuple[Entry, Message]:
        entry = await self.store.get(self.key(kind, namespace, name))
        if entry is None:
            raise NotFoundError(f"{describe(kind, namespace, name)} not found")
        return entry, decode(kind, entry)

    async def _namespace_guard(self, namespace: str, fresh: bool) -> Tuple[bytes, int]:
        """(namespace key, mod_revision) of an existing namespace not being deleted. Unless
        `fresh`, the last one seen is reused (saving an etcd read per create): it is only the
        precondition of the write, so a stale one fails the write with ConflictError and the
        caller asks again with `fresh`."""
        guard = None if fresh else self._namespace_guards.get(namespace)
        if guard is not None:
            return guard
        self._namespace_guards.pop(namespace, None)
        ns_kind = kinds.resolve("namespaces")
        key = self.key(ns_kind, "", namespace)
        entry = await self.store.get(key)
        if entry is None:
            raise NotFoundError(f'namespace "{namespace}" not found (create it first)')
        if decode(ns_kind, entry).metadata.HasField("deletion_timestamp"):
            raise PreconditionError(f'namespace "{namespace}" is being deleted')
        guard = self._namespace_guards[namespace] = (key, entry.mod_revision)
        return guard

    # ------------------------------------------------------------------ create

    def admit_new(self, kind: kinds.Kind, obj: Message, request_namespace: str) -> Tuple[str, Message]:
        """Validate and default a new object; returns (namespace, object ready to store)."""
        namespace = self._request_namespace(kind, request_namespace, obj)
        validation.check_wire_values(obj)
        validation.validate_metadata(kind, obj)
        validation.validate_spec(kind, obj)
        meta = obj.metadata
        meta.uid = str(uuid.uuid4())
        meta.generation = 1
        meta.resource_version = 0
        _now(meta.creation_timestamp)
        meta.ClearField("deletion_timestamp")
        obj.ClearField("status")  # status is written only through UpdateStatus
        if kind.name in INITIAL_PHASE:
            obj.status.phase = INITIAL_PHASE[kind.name]
        if kind.name == "Replica":
            _bind(obj)
        if kind.name == "Namespace" and NAMESPACE_FINALIZER not in meta.finalizers:
            meta.finalizers.append(NAMESPACE_FINALIZER)
        return namespace, obj

    async def create(self, envelope, request_namespace: str) -> Message:
        kind, obj = kinds.unwrap(envelope)
        namespace, obj = self.admit_new(kind, obj, request_namespace)
        data = encode(obj)
        self._check_size(data)
        key = self.key(kind, namespace, obj.metadata.name)
        for attempt in range(3):
            guard = await self._namespace_guard(namespace, fresh=attempt > 0) if kind.namespaced else None
            try:
                obj.metadata.resource_version = await self.store.create(key, data, guard)
                return obj
            except AlreadyExistsError:
                raise AlreadyExistsError(f"{describe(kind, namespace, obj.metadata.name)} already exists") from None
            except ConflictError:
                continue  # the namespace changed since we last read it: check it again
        raise ConflictError(f'namespace "{namespace}" keeps changing; retry')

    async def ensure_namespaces(self) -> None:
        ns_kind = kinds.resolve("namespaces")
        for name in BUILTIN_NAMESPACES:
            namespace = ns_kind.new()
            namespace.metadata.name = name
            try:
                await self.create(kinds.wrap(namespace), "")
                log.info("namespace_created", namespace=name)
            except AlreadyExistsError:
                pass

    # ------------------------------------------------------------------ read

    async def get(self, kind_name: str, namespace: str, name: str, at_revision: int = 0) -> Message:
        kind = kinds.resolve(kind_name)
        self._validate_address(kind, namespace, name)
        if at_revision < 0:
            raise InvalidError("at_revision", "must not be negative")
        try:
            entry = await self.store.get(self.key(kind, namespace, name), at_revision)
        except FutureRevisionError:
            raise InvalidError("at_revision", f"{at_revision} is newer than the store's current revision") from None
        if entry is None:
            when = f" at revision {at_revision}" if at_revision else ""
            raise NotFoundError(f"{describe(kind, namespace, name)} not found{when}")
        return decode(kind, entry)

    async def history(self, kind_name: str, namespace: str, name: str, limit: int) -> List[Message]:
        """Past revisions of one object, newest first, as far back as etcd still has them."""
        kind = kinds.resolve(kind_name)
        self._validate_address(kind, namespace, name)
        if limit < 0:
            raise InvalidError("limit", "must not be negative")
        limit = limit or self.settings.api.history_default_limit
        key = self.key(kind, namespace, name)
        entry = await self.store.get(key)
        if entry is None:
            raise NotFoundError(f"{describe(kind, namespace, name)} not found")
        revisions = [decode(kind, entry)]
        while len(revisions) < limit and entry.version > 1:
            try:
                previous = await self.store.get(key, entry.mod_revision - 1)
            except GoneError:
                break  # older revisions are compacted
            if previous is None or previous.create_revision != entry.create_revision:
                break
            entry = previous
            revisions.append(decode(kind, entry))
        return revisions

    async def list(self, kind_name: str, namespace: str, label_selector: str, field_selector: str, limit: int,
                   continue_token: str) -> Tuple[List[Message], int, str]:
        """(items, revision, continue token) — every page of one listing is read at one revision."""
        kind = kinds.resolve(kind_name)
        if namespace:
            if not kind.namespaced:
                raise InvalidError("namespace", f"{kind.name} is cluster-scoped and has no namespace")
            validation.check_name(namespace, "namespace")
        if limit < 0:
            raise InvalidError("limit", "must not be negative")
        labels = LabelSelector.parse(label_selector)
        fields = FieldSelector.parse(field_selector, kind.message.DESCRIPTOR)
        prefix = namespace_prefix(kind.plural, namespace) if namespace else kind_prefix(kind.plural)
        end = prefix_end(prefix)
        revision, start = 0, prefix
        if continue_token:
            revision, start = self._decode_continue(continue_token, prefix)
        max_items = limit or request_context.max_list_items(self.settings.api.max_list_items)
        chunk = self.settings.etcd.list_chunk
        items: List[Message] = []
        last_key = b""
        more = False
        visible = request_context.visibility()  # None: the caller may see every object
        filtering = not labels.empty() or not fields.empty() or visible is not None
        while True:
            # Without filters we know exactly how many keys we still need (+1 to see if more exist).
            want = min(chunk, max_items - len(items) + 1) if not filtering else chunk
            try:
                page = await self.store.range(start, end, revision=revision, limit=want)
            except FutureRevisionError:  # only a forged token names a revision the store has not reached
                raise InvalidError("continue_token", "refers to a future revision (pass the token of the "
                                                     "previous page unchanged)") from None
            revision = revision or page.revision
            for entry in page.entries:
                obj = decode(kind, entry)
                if filtering and not (labels.matches(obj.metadata.labels) and fields.matches(obj)
                                      and (visible is None or visible(obj))):
                    last_key = entry.key
                    continue
                if len(items) == max_items:
                    more = True
                    break
                items.append(obj)
                last_key = entry.key
            if more or not page.more:
                break
            start = page.entries[-1].key + b"\0"
        if more and not limit:
            raise LimitError(f"more than {max_items} {kind.plural} match: list them in pages (set limit and follow "
                             "continue_token)")
        token = self._encode_continue(revision, last_key, prefix) if more else ""
        return items, revision, token

    @staticmethod
    def _encode_continue(revision: int, last_key: bytes, prefix: bytes) -> str:
        payload = {"rev": revision, "start": base64.b64encode(last_key + b"\0").decode(),
                   "prefix": base64.b64encode(prefix).decode()}
        return base64.urlsafe_b64encode(json.dumps(payload).encode()).decode()

    @staticmethod
    def _decode_continue(token: str, prefix: bytes) -> Tuple[int, bytes]:
        try:
            payload = json.loads(base64.urlsafe_b64decode(token.encode()))
            revision = int(payload["rev"])
            start = base64.b64decode(payload["start"])
            token_prefix = base64.b64decode(payload["prefix"])
        except (ValueError, KeyError, TypeError, binascii.Error):
            raise InvalidError("continue_token", "malformed (pass the token of the previous page unchanged)") from None
        if token_prefix != prefix or not start.startswith(prefix) or revision <= 0:
            raise InvalidError("continue_token", "belongs to a different listing (kind or namespace)")
        return revision, start

    # ------------------------------------------------------------------ update

    async def update(self, envelope, request_namespace: str, status: bool) -> Message:
        kind, obj = kinds.unwrap(envelope)
        namespace = self._request_namespace(kind, request_namespace, obj)
        validation.check_wire_values(obj)
        name = obj.metadata.name
        self._validate_address(kind, namespace, name)
        if obj.metadata.resource_version <= 0:
            raise InvalidError("metadata.resource_version", "required: get the object first and send it back "
                                                            "with its resource_version")
        entry, current = await self._read(kind, namespace, name)
        request_context.check_stored(kind, current)  # may the caller change it as stored?
        if entry.mod_revision != obj.metadata.resource_version:
            raise ConflictError(f"{describe(kind, namespace, name)} was modified (resource_version "
                                f"{entry.mod_revision}, request had {obj.metadata.resource_version}): re-read it "
                                "and retry")
        if obj.metadata.uid and obj.metadata.uid != current.metadata.uid:
            raise ConflictError(f"{describe(kind, namespace, name)} was deleted and re-created (uid "
                                f"{current.metadata.uid}, request had {obj.metadata.uid})")
        updated = self._status_update(kind, current, obj) if status else self._spec_update(kind, current, obj)
        if kind.name == "Namespace":
            await self._keep_namespace_finalizer(current, updated)
        if updated == current:
            return current  # nothing changed: no new revision
        meta = updated.metadata
        if meta.HasField("deletion_timestamp") and not meta.finalizers:
            await self.store.delete(self.key(kind, namespace, name), entry.mod_revision)
            return updated  # the last finalizer is gone: the object is deleted now
        data = encode(updated)
        self._check_size(data)
        meta.resource_version = await self.store.update(self.key(kind, namespace, name), data, entry.mod_revision)
        return updated

    @staticmethod
    def _spec_update(kind: kinds.Kind, current: Message, obj: Message) -> Message:
        validation.validate_metadata(kind, obj)
        validation.validate_spec(kind, obj)
        updated = type(current)()
        updated.CopyFrom(current)
        meta = updated.metadata
        if meta.HasField("deletion_timestamp"):
            added = set(obj.metadata.finalizers) - set(meta.finalizers)
            if added:
                raise PreconditionError(f"cannot add finalizers {sorted(added)} to an object being deleted")
        for field in ("labels", "annotations"):
            meta.ClearField(field)
            getattr(meta, field).update(getattr(obj.metadata, field))
        meta.ClearField("finalizers")
        meta.finalizers.extend(obj.metadata.finalizers)
        meta.ClearField("owner_references")
        meta.owner_references.extend(obj.metadata.owner_references)
        if updated.spec != obj.spec:
            updated.spec.CopyFrom(obj.spec)
            meta.generation += 1
        if kind.name == "Replica" and not current.spec.cluster:
            _bind(updated)
        return updated

    @staticmethod
    def _status_update(kind: kinds.Kind, current: Message, obj: Message) -> Message:
        validation.validate_status(kind, obj)
        updated = type(current)()
        updated.CopyFrom(current)
        updated.status.CopyFrom(obj.status)
        return updated

    # ------------------------------------------------------------------ delete

    async def delete(self, kind_name: str, namespace: str, name: str, resource_version: int, uid: str) -> Message:
        kind = kinds.resolve(kind_name)
        if kind.namespaced and not namespace:
            namespace = kinds.DEFAULT_NAMESPACE
        self._validate_address(kind, namespace, name)
        if kind.name == "Namespace":
            self._check_namespace_deletable(name)
        key = self.key(kind, namespace, name)
        for _ in range(_DELETE_ATTEMPTS):
            entry, current = await self._read(kind, namespace, name)
            request_context.check_stored(kind, current)  # may the caller change it as stored?
            if resource_version and resource_version != entry.mod_revision:
                raise ConflictError(f"{describe(kind, namespace, name)} was modified (resource_version "
                                    f"{entry.mod_revision}, precondition {resource_version})")
            if uid and uid != current.metadata.uid:
                raise ConflictError(f"{describe(kind, namespace, name)} has uid {current.metadata.uid}, "
                                    f"precondition {uid}")
            try:
                if not current.metadata.finalizers:
                    await self.store.delete(key, entry.mod_revision)
                elif not current.metadata.HasField("deletion_timestamp"):
                    _now(current.metadata.deletion_timestamp)
                    current.metadata.resource_version = await self.store.update(key, encode(current),
                                                                                entry.mod_revision)
                return current  # deleted, marked for deletion, or already marked
            except ConflictError:
                if resource_version:
                    raise
                # No precondition of the caller's: the object merely changed between our read
                # and our conditional write (e.g. a controller wrote its status). Read it again.
        raise ConflictError(f"{describe(kind, namespace, name)} keeps changing; retry the delete")

    async def _keep_namespace_finalizer(self, current: Message, updated: Message) -> None:
        """A Namespace keeps its finalizer until it is being deleted and empty (no object can be
        created in it then): no object outlives its namespace, whoever removes the finalizer."""
        finalizers = updated.metadata.finalizers
        if NAMESPACE_FINALIZER in finalizers:
            return
        if not updated.metadata.HasField("deletion_timestamp"):
            finalizers.append(NAMESPACE_FINALIZER)  # as on create: a client's update cannot drop it
            return
        name = current.metadata.name
        counts = await asyncio.gather(*(self.store.count(namespace_prefix(kind.plural, name))
                                        for kind in kinds.all_kinds() if kind.namespaced))
        remaining = sum(count for count, _ in counts)
        if remaining:
            raise PreconditionError(f'namespace "{name}" still holds {remaining} objects: its finalizer '
                                    f'{NAMESPACE_FINALIZER} goes once they are deleted')

    @staticmethod
    def _check_namespace_deletable(namespace: str) -> None:
        if namespace in BUILTIN_NAMESPACES:
            raise PreconditionError(f'namespace "{namespace}" is built in and cannot be deleted')

    # ------------------------------------------------------------------ batch

    async def batch(self, items, operation) -> List[Tuple[Optional[Message], Optional[SkyShiftError]]]:
        """Run `operation(item)` for every item, `batch_concurrency` at a time; each succeeds or
        fails on its own."""
        if len(items) > self.settings.api.max_batch_items:
            raise LimitError(f"{len(items)} items in one batch; the limit is {self.settings.api.max_batch_items}")
        semaphore = asyncio.Semaphore(self.settings.api.batch_concurrency)

        async def run(item):
            async with semaphore:
                try:
                    return await operation(item), None
                except SkyShiftError as error:
                    return None, error

        return list(await asyncio.gather(*(run(item) for item in items)))
