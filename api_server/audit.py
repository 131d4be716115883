"""The audit log: one JSON line per write and per denied request, appended to a file
(settings.audit.path, default $SKYSHIFT_HOME/audit/audit.log, mode 0600).

A line: {"time", "request_id", "user", "identity", "method", "verb", "kind", "namespace",
"name", "code", "message"} — `user` is the User's name, `identity` what it acts as (a user
name, skylet:CLUSTER or manager), `code` the gRPC status name (OK for a write that succeeded),
`message` why a request failed or was denied (empty on success).

Requests only append a tuple to an in-memory buffer; a writer task formats the buffer and
appends it to the file every `flush_interval` seconds (or sooner once `flush_lines` are
waiting), in a worker thread, so no request waits for the disk or pays for the JSON. `stop()` writes what is left. The file is opened with O_APPEND and
never truncated or rewritten.
"""
from __future__ import annotations

import asyncio
import datetime
import json
import os
import pathlib
import time
from typing import List, Optional, Tuple

import structlog

from skyshift.config import AuditSettings

log = structlog.get_logger(__name__)


FIELDS = ("time", "request_id", "user", "identity", "method", "verb", "kind", "namespace", "name", "code", "message")


def _iso(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).isoformat(timespec="milliseconds")


def format_line(record: Tuple) -> str:
    return json.dumps(dict(zip(FIELDS, (_iso(record[0]),) + record[1:])), separators=(",", ":")) + "\n"


class AuditLog:
    def __init__(self, path: pathlib.Path, settings: AuditSettings):
        self.path = path
        self.settings = settings
        self._pending: List[Tuple] = []
        self._dropped = 0
        self._wake: Optional[asyncio.Event] = None
        self._task: Optional[asyncio.Task] = None
        self._fd: Optional[int] = None

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="audit-writer")

    def record(self, *, request_id: str, user: str, identity: str, method: str, verb: str, kind: str,
               namespace: str, name: str, code: str, message: str = "") -> None:
        if len(self._pending) >= self.settings.max_pending_lines:
            self._dropped += 1
            return
        self._pending.append((time.time(), request_id, user, identity, method, verb, kind, namespace, name, code,
                              message))
        if len(self._pending) >= self.settings.flush_lines and self._wake is not None:
            self._wake.set()

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.settings.flush_interval)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.flush()
            except OSError as error:  # a full disk must not stop the server; the lines stay pending
                log.error("audit_write_failed", path=str(self.path), error=str(error))

    def _take(self) -> Tuple[List[Tuple], int]:
        records, self._pending = self._pending, []
        dropped, self._dropped = self._dropped, 0
        if dropped:
            log.error("audit_lines_dropped", count=dropped)
        return records, dropped

    def _write(self, records: List[Tuple], dropped: int) -> None:
        text = "".join(map(format_line, records))
        if dropped:
            text += json.dumps({"time": _iso(time.time()), "event": "audit_lines_dropped", "count": dropped}) + "\n"
        payload = text.encode()
        while payload:
            written = os.write(self._fd, payload)
            payload = payload[written:]

    async def flush(self) -> None:
        records, dropped = self._take()
        if records or dropped:
            try:
                await asyncio.to_thread(self._write, records, dropped)
            except OSError:
                self._pending[:0] = records
                self._dropped += dropped
                raise

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._fd is not None:
            self._write(*self._take())
            os.close(self._fd)
            self._fd = None
