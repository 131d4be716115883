"""Replica records on disk, so that a new skylet finds everything the previous one started.

Layout under the driver's state path (``$SKYSHIFT_HOME/clusters/<cluster>/``)::

    replicas/<namespace>/<name>/            the replica's working directory (local driver)
    replicas/<namespace>/<name>/.skyshift/  the driver's own files: state.json, logs, pid...

The driver's files live in a hidden sub-directory so they never collide with the files a
replica's commands create in their working directory. `RecordedDriver` is the part of a driver
built on these records: the index of known replicas, lookups by handle, adopt().
"""
from __future__ import annotations

import abc
import dataclasses
import json
import os
import pathlib
import shutil
import tempfile
from typing import Any, Dict, List, Optional, Sequence, Tuple, Type, TypeVar

import structlog

from skyshift.api.errors import NotFoundError
from skyshift.config import Settings
from skyshift.drivers.base import Driver, Phase, ReplicaState, Resources, is_replica_key, replica_key
from skyshift.v1 import objects_pb2 as pb

log = structlog.get_logger(__name__)

RECORD_FILE = "state.json"
META_DIR = ".skyshift"

RecordT = TypeVar("RecordT", bound="ReplicaRecord")


@dataclasses.dataclass
class ReplicaRecord:
    """What a driver remembers about a replica it started (drivers extend it)."""

    key: str
    uid: str
    node: str
    resources: Dict[str, float]
    ports: List[int]
    start_time: float

    def to_json(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls: Type[RecordT], data: bytes) -> RecordT:
        values: Dict[str, Any] = json.loads(data)
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{name: value for name, value in values.items() if name in names})


def write_atomic(path: pathlib.Path, data: bytes, mode: int = 0o600) -> None:
    """Replace `path` with `data` so that readers see the old or the new content, never a part."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise


class StateDir:
    """Per-replica directories and records of one driver (one cluster)."""

    def __init__(self, root: pathlib.Path):
        self.root = pathlib.Path(root)
        self.replicas = self.root / "replicas"

    def replica_dir(self, key: str) -> pathlib.Path:
        namespace, name = key.split("/")
        return self.replicas / namespace / name

    def meta_dir(self, key: str) -> pathlib.Path:
        return self.replica_dir(key) / META_DIR

    def file(self, key: str, name: str) -> pathlib.Path:
        return self.meta_dir(key) / name

    def create(self, key: str) -> pathlib.Path:
        """Create the replica's directories; returns its meta directory (private to the user)."""
        meta = self.meta_dir(key)
        meta.mkdir(mode=0o700, parents=True, exist_ok=True)
        return meta

    def read(self, key: str, record_type: Type[RecordT]) -> Optional[RecordT]:
        try:
            data = self.file(key, RECORD_FILE).read_bytes()
        except FileNotFoundError:
            return None
        try:
            return record_type.from_json(data)
        except (ValueError, TypeError) as error:
            log.warning("replica_record_unreadable", key=key, path=str(self.file(key, RECORD_FILE)),
                        error=str(error))
            return None

    def write(self, record: ReplicaRecord) -> None:
        write_atomic(self.file(record.key, RECORD_FILE), record.to_json())

    def keys(self) -> List[str]:
        """Keys of every replica with a record, sorted."""
        found = []
        if not self.replicas.is_dir():
            return found
        for namespace_dir in sorted(self.replicas.iterdir()):
            if not namespace_dir.is_dir():
                continue
            for replica_dir in sorted(namespace_dir.iterdir()):
                if (replica_dir / META_DIR / RECORD_FILE).is_file():
                    found.append(f"{namespace_dir.name}/{replica_dir.name}")
        return found

    def remove(self, key: str) -> None:
        """Delete the replica's directory, and its namespace directory once empty."""
        replica_dir = self.replica_dir(key)
        shutil.rmtree(replica_dir, ignore_errors=True)
        try:
            replica_dir.parent.rmdir()
        except OSError:
            pass  # other replicas of the namespace remain (or it is already gone)


class RecordedDriver(Driver):
    """A driver whose replicas are records in a StateDir; a replica's handle is its key.

    It keeps an index of the records (loaded from disk on first use, so a new instance knows
    what an old one started), serialises the operations on each replica, and implements
    start/stop/remove/status/adopt on top of the subclass's `_launch`, `_stop_locked`,
    `_state`, `_track` and `_untrack`."""

    record_type: Type[ReplicaRecord] = ReplicaRecord

    def __init__(self, cluster: pb.Cluster, settings: Settings):
        super().__init__(cluster, settings)
        self.files = StateDir(self.state_path)
        self._records: Dict[str, ReplicaRecord] = {}
        self._loaded = False

    # -- to implement

    @abc.abstractmethod
    def _launch(self, key: str, replica: pb.Replica, replica_ips: Optional[Sequence[str]]) -> None:
        """Start a replica that has no record yet; record it and publish its state."""

    @abc.abstractmethod
    async def _stop_locked(self, key: str) -> None:
        """Stop the replica `key` (its record is in the index) unless it has finished."""

    @abc.abstractmethod
    def _state(self, record: ReplicaRecord) -> ReplicaState:
        """The current state of a recorded replica."""

    @abc.abstractmethod
    def _track(self, key: str) -> None:
        """Watch the replica so its state changes reach watch_status(); idempotent."""

    @abc.abstractmethod
    def _untrack(self, key: str) -> None:
        """Stop watching the replica (it is being forgotten, or the driver closes)."""

    # -- the contract, on records

    async def start(self, replica: pb.Replica, replica_ips: Optional[Sequence[str]] = None) -> str:
        key = replica_key(replica)
        async with self._lock_for(key):
            self._ensure_loaded()
            # The record on disk is the truth: another driver instance may have written it.
            existing = self.files.read(key, self.record_type)
            if existing is not None and existing.uid == replica.metadata.uid:
                if key not in self._records:
                    self._records[key] = existing
                    self._track(key)
                return key
            if existing is not None:
                # The old Replica object is gone and a new one took its name.
                log.info("replica_replaced", cluster=self.cluster_name, replica=key, old_uid=existing.uid,
                         uid=replica.metadata.uid)
                self._records[key] = existing
                await self._stop_locked(key)
                self._forget(key)
            self._launch(key, replica, replica_ips)
        return key

    async def status(self, handle: str) -> ReplicaState:
        return self._state(self._record(handle))

    async def stop(self, handle: str) -> None:
        if self._find(handle) is None:
            return
        async with self._lock_for(handle):
            if handle in self._records:
                await self._stop_locked(handle)

    async def remove(self, handle: str) -> None:
        if self._find(handle) is None:
            return
        async with self._lock_for(handle):
            if handle in self._records:
                await self._stop_locked(handle)
                self._forget(handle)

    async def adopt(self) -> List[Tuple[str, str, ReplicaState]]:
        self._load_from_disk()
        return [(key, key, self._state(record)) for key, record in sorted(self._records.items())]

    def running_usage(self) -> List[Tuple[str, Resources]]:
        self._ensure_loaded()
        return [(record.node, record.resources) for record in self._records.values()
                if self._state(record).phase == Phase.RUNNING]

    async def close(self) -> None:
        for key in list(self._records):
            self._untrack(key)
        await super().close()

    # -- helpers for subclasses

    def _load_from_disk(self) -> None:
        for key in self.files.keys():
            if key not in self._records:
                record = self.files.read(key, self.record_type)
                if record is not None:
                    self._records[key] = record
                    self._track(key)
        self._loaded = True

    def _ensure_loaded(self) -> None:
        if not self._loaded:
            self._load_from_disk()

    def _record(self, handle: str) -> ReplicaRecord:
        """The record behind a handle; NotFoundError if there is none."""
        record = self._find(handle)
        if record is None:
            raise NotFoundError(f"no replica {handle!r} on cluster {self.cluster_name}")
        return record

    def _find(self, handle: str) -> Optional[ReplicaRecord]:
        self._ensure_loaded()
        record = self._records.get(handle)
        if record is None and is_replica_key(handle):
            # Started by another driver instance on the same state path since we loaded.
            record = self.files.read(handle, self.record_type)
            if record is not None:
                self._records[handle] = record
                self._track(handle)
        return record

    def _forget(self, key: str) -> None:
        self._untrack(key)
        self._records.pop(key, None)
        self._forget_published(key)
        self.files.remove(key)
