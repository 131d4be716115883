"""The reconciler base: informers in, a work queue of keys, N workers calling `reconcile(key)`.

    class JobController(Controller):
        name = "job"

        def __init__(self, client, informers=None, settings=None):
            super().__init__(client, informers, settings)
            self.jobs = self.informer("jobs")
            self.enqueue_on_change(self.jobs)                       # a job's own key
            self.replicas = self.informer("replicas")
            self.enqueue_on_change(self.replicas, indexes.replica_job)  # the job of a changed replica

        async def reconcile(self, key: str) -> Optional[float]:
            job = self.jobs.get(key)       # None: it was deleted
            ...
            return None                     # or seconds after which to reconcile the key again

    await JobController(client).run()     # until cancelled

Contract:
* `run()` starts the informers, waits until every informer the controller asked for has
  synced, then starts the workers; it returns only by cancellation (cancel its task to stop).
  A stopped controller is not restarted: make a new one.
* Reconcile is level-triggered: read the cache, compare desired with observed, act. An object
  missing from the cache has been deleted. Cached objects are read-only: `clone()` before
  changing one.
* Errors: ConflictError (the object changed under us) re-queues the key quietly with backoff;
  any other exception is logged as `reconcile_failed` with the key and re-queues it with the
  key's exponential backoff. A successful reconcile resets that backoff; a returned number
  re-queues the key after that many seconds.
* All controllers of a process share informers through one InformerFactory when the manager
  passes one; a controller made without one owns a private factory.
"""
from __future__ import annotations

import asyncio
from typing import Callable, Iterable, List, Optional

import structlog
from google.protobuf.message import Message

from skyshift import config
from skyshift.api.errors import ConflictError
from skyshift.client import AsyncClient
from skyshift.runtime.informer import Informer, InformerFactory, object_key
from skyshift.runtime.workqueue import WorkQueue

log = structlog.get_logger(__name__)

KeysOf = Callable[[Message], Iterable[str]]


class Controller:
    #: Name used in logs, in the manager's --controllers flag and in settings.controllers.workers.
    name = "controller"

    def __init__(self, client: AsyncClient, informers: Optional[InformerFactory] = None,
                 settings: Optional[config.Settings] = None):
        self.client = client
        self.settings = settings or client.settings
        runtime = self.settings.controllers
        self.informers = informers or InformerFactory(client, runtime)
        self._owns_informers = informers is None
        self.queue = WorkQueue(self.name, runtime.queue_backoff_initial, runtime.queue_backoff_max,
                               runtime.queue_rate_limit, runtime.queue_rate_burst)
        self.workers = runtime.workers_for(self.name)
        self._needed: List[Informer] = []

    # ------------------------------------------------------------------ wiring

    def informer(self, kind: str, namespace: Optional[str] = None, label_selector: str = "",
                 field_selector: str = "") -> Informer:
        """The (shared) informer of `kind`; workers start only once it has synced."""
        informer = self.informers.informer(kind, namespace, label_selector, field_selector)
        if informer not in self._needed:
            self._needed.append(informer)
        return informer

    def enqueue_on_change(self, informer: Informer, keys_of: Optional[KeysOf] = None) -> None:
        """On every change of an object of `informer`, queue the keys `keys_of(obj)` returns
        (default: the object's own key), for both the new and the previous version."""
        keys_of = keys_of or (lambda obj: (object_key(obj),))

        def handler(event_type: str, obj: Message, old: Optional[Message]) -> None:
            for key in keys_of(obj):
                self.queue.add(key)
            if old is not None and old is not obj:
                for key in keys_of(old):
                    self.queue.add(key)

        informer.add_handler(handler)

    # ------------------------------------------------------------------ reconciling

    async def reconcile(self, key: str) -> Optional[float]:
        """Make the world match the object `key` wants; return seconds to re-check, or None."""
        raise NotImplementedError

    async def run(self) -> None:
        self.informers.start()
        try:
            await asyncio.gather(*(informer.wait_synced() for informer in self._needed))
            log.info("controller_started", controller=self.name, workers=self.workers)
            await asyncio.gather(*(self._work() for _ in range(self.workers)))
        finally:
            self.queue.shutdown()
            if self._owns_informers:
                await self.informers.stop()
            log.info("controller_stopped", controller=self.name)

    async def _work(self) -> None:
        while (key := await self.queue.get()) is not None:
            with structlog.contextvars.bound_contextvars(controller=self.name, key=key):
                try:
                    requeue_after = await self.reconcile(key)
                except ConflictError as error:
                    log.debug("reconcile_conflict", error=error.message)
                    self.queue.add_rate_limited(key)
                except Exception as error:  # any bug or outage: retry the key later, keep the others going
                    log.error("reconcile_failed", error=str(error), error_type=type(error).__name__,
                              requeues=self.queue.num_requeues(key), exc_info=True)
                    self.queue.add_rate_limited(key)
                else:
                    self.queue.forget(key)
                    if requeue_after is not None:
                        self.queue.add_after(key, requeue_after)
                finally:
                    self.queue.done(key)
