"""List with limit pages through 20,000 objects consistently, at one revision, while other
clients keep creating and deleting objects."""
import asyncio

from skyshift.api.errors import NotFoundError
from tests.conftest import async_wait_for
from tests.integration.api_helpers import new_job

TOTAL = 20_000
CHUNK = 1000
PAGE = 1000


def original(index: int) -> str:
    return f"job-{index:05d}"


async def test_paging_through_20000_objects_while_writes_continue(aclient, namespace):
    for start in range(0, TOTAL, CHUNK):
        results = await aclient.batch_create([new_job(original(i), namespace) for i in range(start, start + CHUNK)])
        assert [r.error for r in results if r.error is not None] == []

    writes = []  # (name, revision of the create, or 0 for a delete) in the order they happened
    stop = asyncio.Event()

    async def writer():
        number = 0
        while not stop.is_set():
            created = await aclient.create(new_job(f"new-{number:05d}", namespace))
            writes.append((created.metadata.name, created.metadata.resource_version))
            victim = original(number * 7919 % TOTAL)  # spread over every page
            try:
                await aclient.delete("jobs", victim, namespace)
                writes.append((victim, 0))
            except NotFoundError:
                pass
            number += 1

    task = asyncio.create_task(writer())
    try:
        await async_wait_for(lambda: len(writes) >= 20, message="writes to be under way")
        first = await aclient.list("jobs", namespace, limit=PAGE)
        revision = first.resource_version
        writes_at_first_page = len(writes)
        pages = [first]
        while pages[-1].continue_token:
            page = await aclient.list("jobs", namespace, limit=PAGE, continue_token=pages[-1].continue_token)
            assert page.resource_version == revision
            pages.append(page)
        writes_during_paging = len(writes) - writes_at_first_page
    finally:
        stop.set()
        await task
    assert writes_during_paging > 0, "no write happened while paging: the test proves nothing"
    assert any(rev > revision for _, rev in writes)

    listed = [item.metadata.name for page in pages for item in page.items]
    assert len(listed) == len(set(listed)), "an object appeared on two pages"
    assert all(len(page.items) == PAGE for page in pages[:-1])
    assert all(item.metadata.resource_version <= revision for page in pages for item in page.items)

    # What existed at the first page's revision, asked of the store itself.
    touched = sorted({name for name, _ in writes})

    async def existed(name: str) -> bool:
        try:
            await aclient.get("jobs", name, namespace, at_revision=revision)
            return True
        except NotFoundError:
            return False

    existence = await asyncio.gather(*(existed(name) for name in touched))
    expected = {original(i) for i in range(TOTAL)} - set(touched)
    expected |= {name for name, present in zip(touched, existence) if present}
    assert set(listed) == expected
    print(f"{len(pages)} pages, {len(listed)} objects at revision {revision}; {writes_during_paging} writes "
          f"while paging")
