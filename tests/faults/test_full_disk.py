"""The state directory's disk fills up under a working, paid worker: it says so in its log,
stays up, loses no job and no ecash, and when there is room again the jobs that waited go on,
each with exactly one result, and new jobs run.

How the disk is filled, without root (no tmpfs, no loop device, no FUSE here): SQLite itself is
told the store may not grow, with `PRAGMA max_page_count` set to the store's current size on the
worker's own connection, and the free pages left inside the file are used up by a filler table.
From then on every write that needs a new page fails inside SQLite with a real SQLITE_FULL
("database or disk is full"), exactly as when the file system has no block left to give, and
the error takes the worker's real code paths (the store, its transactions, their rollbacks). To
make *which* write fails certain, the jobs carry large texts: a request, or a result, bigger
than a page (4 KiB) goes to overflow pages, which are always new pages, so recording the request
and storing the result are the writes that meet the full disk. Smaller writes that fit in a
page's free space still succeed, as they can on a real full disk.

The fault is limited to the job store (`dvm.sqlite3`), where the worker keeps every step of a
job; the Cashu wallet's own database beside it is left alone, so the payments in this test are
taken before the disk fills (job 1) or after room comes back (job 2): what is checked is that
the worker's record of them survives the full store.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time

import structlog

from dvm_core.customer.client import result_json
from dvm_core.protocol.nip90 import JobInput

from ..paying import PRICE, paid_worker, provider_balance

KIND = 5790
ROOM_AGAIN = 1073741823   # SQLite's default max_page_count


def fill_the_disk(store) -> int:
    """No new page for the store from now on: returns the page count it is held to."""
    db = store.db
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    assert db.execute(f"PRAGMA max_page_count = {pages}").fetchone()[0] == pages
    for size in (4000, 1000, 200, 20):   # use up the free pages (and the room left in them)
        try:
            db.execute("CREATE TABLE IF NOT EXISTS test_filler (b BLOB)")
            while True:
                db.execute("INSERT INTO test_filler VALUES (zeroblob(?))", (size,))
        except sqlite3.OperationalError as exc:
            assert exc.sqlite_errorname == "SQLITE_FULL", exc
    # A page left free that no row could use (it would need a second one to split a leaf) is
    # taken by a table of its own: a table's first page is one page.
    for n in range(db.execute("PRAGMA freelist_count").fetchone()[0]):
        db.execute(f"CREATE TABLE test_filler_{n} (b BLOB)")
    assert db.execute("PRAGMA freelist_count").fetchone()[0] == 0
    return pages


def make_room(store) -> None:
    store.db.execute(f"PRAGMA max_page_count = {ROOM_AGAIN}")


def big_text(tag: str, words: int = 150) -> str:
    """`words` different 30-letter words: the request, and a result listing 100 of them, are
    each larger than a 4 KiB page."""
    return " ".join(f"{tag}{n:04d}".ljust(30, "x") for n in range(words))


async def updates_until(customer, request, timeout: float) -> list:
    """What the customer hears about `request` within `timeout` seconds (ends early on a
    result or an error)."""
    seen = []
    try:
        async with asyncio.timeout(timeout):
            async for update in customer.updates(request, timeout=timeout + 1):
                seen.append(update)
    except TimeoutError:
        pass
    return seen


async def test_a_full_state_disk_loses_nothing_and_the_jobs_go_on_when_there_is_room(
        workers, mint, funded):
    worker = await paid_worker(workers, mint, max_concurrent_jobs=2)
    provider = worker.keys.public_key
    before = await funded.wallet.total_balance()
    with structlog.testing.capture_logs() as logs:
        # Job 1 is paid and running when the disk fills; its result cannot be stored.
        running = await funded.submit(KIND, [JobInput(big_text("running"), "text")],
                                      {"top": "100", "work_seconds": "1.5"}, provider=provider,
                                      cashu=await funded.wallet.send(PRICE, mint=mint.url))
        deadline = time.monotonic() + 20
        while (row := worker.store.get_job(running["id"])) is None or row.state != "running":
            assert time.monotonic() < deadline, "job 1 did not start"
            await asyncio.sleep(0.05)
        fill_the_disk(worker.store)
        full_since = time.monotonic()

        # Job 2 arrives on the full disk: its request cannot even be recorded.
        arriving = await funded.submit(KIND, [JobInput(big_text("arriving"), "text")], {"top": "3"},
                                       provider=provider,
                                       cashu=await funded.wallet.send(PRICE, mint=mint.url))
        heard_running = await updates_until(funded, running, 4.0)
        heard_arriving = await updates_until(funded, arriving, 0.5)
        full_for = time.monotonic() - full_since

        # While the disk is full: no result and no error for either (they wait), a clear word
        # in the log, the worker up, and the ecash where it was.
        assert [u.status for u in heard_running if hasattr(u, "status")].count("error") == 0
        assert not [u for u in heard_running + heard_arriving if not hasattr(u, "status")], \
            "a result went out that the store does not hold"
        assert not [u for u in heard_arriving if u.status == "error"], heard_arriving
        full_lines = [e for e in logs if "full" in e["event"] and e["log_level"] in ("error", "warning")]
        assert {(e.get("job_id"), e.get("step")) for e in full_lines} == {
            (running["id"], "storing the result"), (arriving["id"], "taking the request")}, \
            [(e["event"], e.get("step"), e.get("error")) for e in logs if e["log_level"] == "error"]
        assert not [e for e in logs if e["event"] in ("job failed in its plugin", "event handler failed")], \
            [e for e in logs if e["log_level"] == "error"]
        assert not worker._stopped.is_set()
        assert worker.store.get_job(running["id"]).state == "running"
        assert worker.store.payment_for_job(running["id"])["state"] == "redeemed"
        assert worker.store.get_job(arriving["id"]) is None
        assert await provider_balance(worker) == PRICE   # job 1's payment, job 2's token untouched
        assert any("disk" in u.message for u in heard_running), \
            "the customer was not told why the job waits: " + repr([u.message for u in heard_running])

        # Room again: both jobs go on to exactly one result each, and a new job runs.
        make_room(worker.store)
        first = await funded.result(running, timeout=40)
        assert len(result_json(first)["top_words"]) == 100
        assert result_json(await funded.result(arriving, timeout=40))["words"] == 150
        after = await funded.submit(KIND, [JobInput("room again", "text")], {}, provider=provider,
                                    cashu=await funded.wallet.send(PRICE, mint=mint.url))
        assert result_json(await funded.result(after, timeout=30))["words"] == 2

    # Everything stored went out, and only once.
    deadline = time.monotonic() + 15
    while worker.store.unpublished() and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert worker.store.unpublished() == []
    for request in (running, arriving, after):
        results = await worker.pool.query([{"kinds": [KIND + 1000], "#e": [request["id"]]}], timeout=5)
        assert len(results) == 1, (request["id"][:8], len(results))
        assert worker.store.get_job(request["id"]).state == "succeeded"
        assert worker.store.payment_for_job(request["id"])["state"] == "consumed"
    assert worker.store.get_job(running["id"]).attempts == 1   # its work was not redone
    assert await provider_balance(worker) == 3 * PRICE
    assert await funded.wallet.total_balance() == before - 3 * PRICE
    assert worker.counts["failed"] == 0 and worker.counts["rejected"] == 0
    print(f"disk full for {full_for:.1f} s; log lines about it: "
          f"{[(e['event'], e['step']) for e in full_lines]}")
