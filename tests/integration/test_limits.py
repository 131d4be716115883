"""Per-user limits: request rate, concurrent watches, list sizes (RESOURCE_EXHAUSTED + retry hint)."""
from __future__ import annotations

import asyncio

import pytest

from skyshift.api.errors import LimitError
from skyshift.client import AsyncClient

from tests.conftest import wait_for
from tests.integration.auth_helpers import admin_token, auth_server, client_for, new_job, new_namespace, new_user

RATE = 20


@pytest.fixture(scope="module")
def server(etcd, tmp_path_factory):
    with auth_server(etcd, tmp_path_factory.mktemp("limits-home"),
                     limits={"requests_per_second": float(RATE), "request_burst": RATE, "max_watches": 2,
                             "max_list_items": 5}) as running:
        yield running


@pytest.fixture(scope="module")
def admin(server):
    with client_for(server, admin_token(server)) as client:
        yield client


@pytest.fixture(scope="module")
def namespace(admin):
    namespace = new_namespace(admin)
    for index in range(6):
        admin.create(new_job(f"j{index}", namespace))
    return namespace


def limited_calls(client, namespace: str, calls: int) -> list:
    errors = []
    for _ in range(calls):
        try:
            client.get("namespaces", namespace)
        except LimitError as error:
            errors.append(error)
    return errors


def test_a_user_over_its_rate_is_told_when_to_retry(server, admin, namespace):
    with client_for(server, new_user(admin, "viewer")) as flooder, client_for(server, new_user(admin, "viewer")) as other:
        errors = limited_calls(flooder, namespace, 3 * RATE)
        assert errors, "a burst of three times the rate should be limited"
        assert "over the rate limit of 20 requests/s: retry after" in errors[0].message
        assert not limited_calls(other, namespace, RATE // 2)  # other users have their own bucket

        def admitted_again() -> bool:
            return not limited_calls(flooder, namespace, 1)
        wait_for(admitted_again, timeout=5, message="the bucket to refill")


def test_system_identities_are_not_rate_limited(server, admin, namespace):
    with client_for(server, server.settings.manager_token_file.read_text().strip()) as manager:
        assert not limited_calls(manager, namespace, 3 * RATE)


async def test_a_user_may_hold_a_bounded_number_of_watches(server, admin, namespace):
    token = new_user(admin, "viewer")
    async with AsyncClient(endpoint=server.endpoint, settings=admin.settings, token=token) as viewer:
        streams = [viewer.watch("jobs", namespace, allow_bookmarks=True) for _ in range(2)]
        tasks = [asyncio.ensure_future(stream.__anext__()) for stream in streams]

        def both_open() -> bool:
            return server.run(async_usage(server))[1] == 2
        await asyncio.to_thread(wait_for, both_open, 10, message="two watches to be open")
        with pytest.raises(LimitError, match="already has 2 watches open: retry after one of them ends"):
            await viewer.watch("jobs", namespace).__anext__()
        tasks[0].cancel()
        await asyncio.gather(tasks[0], return_exceptions=True)
        await streams[0].aclose()
        await asyncio.to_thread(wait_for, lambda: server.run(async_usage(server))[1] == 1, 10,
                                message="the closed watch to be released")
        start = (await viewer.list("jobs", namespace, limit=1)).resource_version
        third = viewer.watch("jobs", namespace, resource_version=start)
        await asyncio.to_thread(admin.create, new_job("after", namespace))
        event = await asyncio.wait_for(third.__anext__(), 10)
        assert event.object.metadata.name == "after"
        for task in tasks[1:]:
            task.cancel()
        await asyncio.gather(*tasks[1:], return_exceptions=True)
        await third.aclose()
        await streams[1].aclose()
    await asyncio.to_thread(admin.delete, "jobs", "after", namespace)


async def async_usage(server):
    return server.server.gate.limits.usage()


def test_lists_are_bounded_and_must_page(server, admin, namespace):
    with client_for(server, new_user(admin, "viewer")) as viewer:
        with pytest.raises(LimitError, match=r"limit 10 is above the most items one list may return \(5\)"):
            viewer.list("jobs", namespace, limit=10)
        with pytest.raises(LimitError, match="more than 5 jobs match: list them in pages"):
            viewer.list("jobs", namespace)
        assert len(viewer.list_all("jobs", namespace, page_size=5).items) == 6
