"""The controller manager: while this process holds the leader Lease, run the chosen controllers
as asyncio tasks sharing one set of informers; stop them all when leadership is lost.

Controllers are given by factories `factory(client, informers, settings)` returning an object
whose `async run()` works until cancelled (every `skyshift.runtime.Controller` qualifies). The
registry of names -> factories lives in the entry point (launch_manager.py), since roles never
import each other.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any, Callable, Dict, Optional

import structlog

from skyshift import config
from skyshift.api.errors import UnavailableError
from skyshift.client import AsyncClient
from skyshift.runtime import InformerFactory, LeaderElector

log = structlog.get_logger(__name__)

ControllerFactory = Callable[[AsyncClient, InformerFactory, config.Settings], Any]


async def connect(settings: config.Settings) -> AsyncClient:
    """A client of the API server, once it answers; waits up to settings.controllers.api_wait_timeout
    (0: forever) for it to come up, e.g. while it is started alongside the manager."""
    timeout = settings.controllers.api_wait_timeout
    deadline = time.monotonic() + timeout if timeout > 0 else None
    delay = settings.client.retry_backoff_initial
    while True:
        client = None
        try:
            client = AsyncClient(settings=settings)
            await client.list("namespaces", limit=1)
            log.info("api_server_connected", endpoint=client.endpoint)
            return client
        except UnavailableError as error:
            if client is not None:
                await client.close()
            if deadline is not None and time.monotonic() > deadline:
                raise
            log.info("api_server_waiting", error=error.message, retry_in=delay)
        await asyncio.sleep(delay)
        delay = min(delay * 2, settings.client.retry_backoff_max)


class ControllerManager:
    def __init__(self, client: AsyncClient, factories: Dict[str, ControllerFactory], identity: str,
                 settings: Optional[config.Settings] = None):
        self.client = client
        self.factories = factories
        self.identity = identity
        self.settings = settings or client.settings
        self.elector = LeaderElector(client, identity, self.settings.controllers)

    async def run(self) -> None:
        """Compete for leadership and lead whenever elected; until cancelled (which releases the
        lease) or a controller fails (which releases it too, then raises)."""
        await self.elector.run(self._lead)

    async def _lead(self) -> None:
        informers = InformerFactory(self.client, self.settings.controllers)
        tasks = []
        for name, factory in self.factories.items():
            controller = factory(self.client, informers, self.settings)
            tasks.append(asyncio.get_running_loop().create_task(controller.run(), name=f"controller-{name}"))
        log.info("controllers_started", controllers=sorted(self.factories), identity=self.identity)
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # a controller only ends by failing: raise its error
            raise RuntimeError(f"controller task {next(iter(done)).get_name()} ended")
        finally:
            for task in tasks:
                task.cancel()
            _, pending = await asyncio.wait(tasks, timeout=self.settings.controllers.shutdown_grace)
            if pending:
                log.warning("controllers_not_stopped", controllers=[task.get_name() for task in pending])
            await informers.stop()
            log.info("controllers_stopped", identity=self.identity)
