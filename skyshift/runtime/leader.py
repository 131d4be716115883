"""Leader election on a Lease object, through the API (client-go's leaderelection).

    elector = LeaderElector(client, identity=default_identity())
    await elector.run(lead)     # `lead()` is a coroutine function: run the controllers until cancelled

`run` waits until it holds the lease, runs `lead()` as a task, renews the lease every
retry_period, and cancels the task when it could not renew for renew_deadline seconds, which is
shorter than the lease duration, so the old leader has stopped acting before a standby may
take over. It then competes again. When `lead()` returns, or `run` is cancelled (shutdown), the
lease is released (holder cleared, renew time in the past) so a standby takes over at once.

A lease is free when it has no holder or when renew_time + lease_duration_seconds is past by
this machine's wall clock; every write is a compare-and-swap on the Lease's resource_version,
so two candidates can never both acquire it. Clocks of the candidates' hosts must agree to
well within the lease duration (renew_time is wall-clock time).
"""
from __future__ import annotations

import asyncio
import math
import os
import secrets
import socket
import time
from typing import Awaitable, Callable, Optional

import structlog
from google.protobuf import timestamp_pb2

from skyshift import config
from skyshift.api.errors import AlreadyExistsError, ConflictError, NotFoundError, SkyShiftError
from skyshift.client import AsyncClient
from skyshift.runtime.informer import clone
from skyshift.v1 import objects_pb2 as pb

log = structlog.get_logger(__name__)


def default_identity() -> str:
    """hostname-pid-random: unique even when a pid is reused after a restart."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


def _timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def lease_expired(lease: pb.Lease, wall_now: float) -> bool:
    spec = lease.spec
    if not spec.holder_identity:
        return True
    renewed = spec.renew_time.ToNanoseconds() / 1e9
    return renewed + spec.lease_duration_seconds < wall_now


async def ensure_namespace(client: AsyncClient, name: str) -> None:
    namespace = pb.Namespace()
    namespace.metadata.name = name
    try:
        await client.create(namespace)
    except AlreadyExistsError:
        pass


class LeaderElector:
    def __init__(self, client: AsyncClient, identity: str, settings: Optional[config.ControllerSettings] = None,
                 namespace: Optional[str] = None, name: Optional[str] = None):
        self.client = client
        self.identity = identity
        self.settings = settings or client.settings.controllers
        self.namespace = namespace or self.settings.lease_namespace
        self.name = name or self.settings.lease_name
        if not 0 < self.settings.retry_period < self.settings.renew_deadline < self.settings.lease_duration:
            raise ValueError("leader election needs 0 < retry_period < renew_deadline < lease_duration "
                             f"(got {self.settings.retry_period}, {self.settings.renew_deadline}, "
                             f"{self.settings.lease_duration})")
        self.is_leader = False
        self._record: Optional[pb.Lease] = None   # the lease as we last wrote or read it
        self._renewed_at = 0.0                    # monotonic time of the last successful renewal

    async def run(self, lead: Callable[[], Awaitable[None]]) -> None:
        try:
            while True:
                await self._acquire()
                task = asyncio.get_running_loop().create_task(lead(), name="leading")
                try:
                    lost = await self._hold(task)
                finally:
                    self.is_leader = False
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
                if not lost:
                    task.result()  # lead() ended by itself: re-raise its error, if any
                    return
                log.warning("leader_lost", identity=self.identity, lease=self.name)
        finally:
            await self._release()

    async def _acquire(self) -> None:
        log.info("leader_election_waiting", identity=self.identity, lease=f"{self.namespace}/{self.name}")
        while True:
            started = time.monotonic()
            if await self._attempt():
                self._renewed_at = started
                self.is_leader = True
                log.info("leader_elected", identity=self.identity, lease=f"{self.namespace}/{self.name}",
                         transitions=self._record.spec.lease_transitions)
                return
            await asyncio.sleep(self.settings.retry_period)

    async def _hold(self, task: asyncio.Task) -> bool:
        """Renew until the lease is lost (True) or `task` ends (False)."""
        while True:
            done, _ = await asyncio.wait({task}, timeout=self.settings.retry_period)
            if done:
                return False
            if not await self._renew():
                return True

    async def _renew(self) -> bool:
        """Retry renewing until renew_deadline after the last success; False once that passed
        or someone else holds the lease."""
        deadline = self._renewed_at + self.settings.renew_deadline
        while (remaining := deadline - time.monotonic()) > 0:
            started = time.monotonic()
            try:
                renewed = await asyncio.wait_for(self._attempt(), remaining)
            except asyncio.TimeoutError:
                return False
            if renewed:
                self._renewed_at = started
                return True
            if self._record is not None and self._record.spec.holder_identity != self.identity:
                return False
            await asyncio.sleep(min(self.settings.retry_period, max(0.0, deadline - time.monotonic())))
        return False

    async def _attempt(self) -> bool:
        """One try to acquire or renew the lease; True if we hold it afterwards."""
        try:
            return await self._try_acquire_or_renew()
        except (ConflictError, AlreadyExistsError):
            self._record = None  # someone else wrote it first: re-read next time
            return False
        except SkyShiftError as error:
            log.warning("lease_write_failed", identity=self.identity, error=error.message)
            self._record = None  # e.g. the Lease was deleted: re-read next time
            return False

    async def _try_acquire_or_renew(self) -> bool:
        now = time.time()
        if self._record is None or self._record.spec.holder_identity != self.identity:
            try:
                self._record = await self.client.get("leases", self.name, self.namespace)
            except NotFoundError:
                await ensure_namespace(self.client, self.namespace)
                self._record = await self.client.create(self._new_lease(now))
                return True
            if self._record.spec.holder_identity != self.identity and not lease_expired(self._record, now):
                return False
        lease = clone(self._record)
        spec = lease.spec
        if spec.holder_identity != self.identity:
            spec.holder_identity = self.identity
            spec.acquire_time.CopyFrom(_timestamp(now))
            spec.lease_transitions += 1
        spec.lease_duration_seconds = math.ceil(self.settings.lease_duration)
        spec.renew_time.CopyFrom(_timestamp(now))
        self._record = await self.client.update(lease)
        return True

    def _new_lease(self, now: float) -> pb.Lease:
        lease = pb.Lease()
        lease.metadata.namespace = self.namespace
        lease.metadata.name = self.name
        lease.spec.holder_identity = self.identity
        lease.spec.lease_duration_seconds = math.ceil(self.settings.lease_duration)
        lease.spec.acquire_time.CopyFrom(_timestamp(now))
        lease.spec.renew_time.CopyFrom(_timestamp(now))
        return lease

    async def _release(self) -> None:
        """Give the lease up if we hold it, so a standby need not wait for it to expire. Reads it
        afresh: a renewal cancelled by the shutdown may have been applied all the same."""
        try:
            await asyncio.wait_for(self._clear_holder(), self.settings.renew_deadline)
        except (SkyShiftError, asyncio.TimeoutError) as error:
            log.warning("leader_release_failed", identity=self.identity, error=str(error))
        self._record = None

    async def _clear_holder(self) -> None:
        while True:
            try:
                lease = await self.client.get("leases", self.name, self.namespace)
            except NotFoundError:
                return
            if lease.spec.holder_identity != self.identity:
                return
            lease.spec.holder_identity = ""
            lease.spec.renew_time.CopyFrom(_timestamp(time.time() - lease.spec.lease_duration_seconds - 1))
            try:
                await self.client.update(lease)
            except ConflictError:
                continue
            log.info("leader_released", identity=self.identity, lease=f"{self.namespace}/{self.name}")
            return
