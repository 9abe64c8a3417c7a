"""The relay goes away under a working worker: restarted in the middle of jobs, or every
connection cut every few seconds. The worker comes back by itself, and every job gets exactly
one result: the customer sees one, the relay holds one, and the worker's outbox is empty after
(it does not publish again and again).

A real relay (PyPI `nostr-relay`) on loopback; the cuts come from a TCP proxy in front of it
(`proxy.CuttingProxy`) that aborts every connection without a close handshake.
"""

from __future__ import annotations

import asyncio
import time
from urllib.parse import urlsplit

import pytest

from dvm_core.customer.client import Customer, result_json
from dvm_core.devtools.localnet import start_relay
from dvm_core.protocol.events import Keys
from dvm_core.protocol.nip90 import FEEDBACK_KIND, JobInput, parse_feedback

from .proxy import CuttingProxy

KIND = 5790
RECONNECT_SECONDS = 5.0


async def results_on_relay(relay_url: str, request_ids: list[str]) -> dict[str, list[dict]]:
    """Every result event the relay holds for each request, asked of it afresh."""
    async with Customer(Keys.generate(), [relay_url]) as reader:
        assert await reader.pool.wait_all_connected(10)
        events = await reader.pool.query([{"kinds": [KIND + 1000], "#e": request_ids}], timeout=10)
    found: dict[str, list[dict]] = {i: [] for i in request_ids}
    for event in events:
        for tag in event["tags"]:
            if tag[0] == "e" and tag[1] in found:
                found[tag[1]].append(event)
    return found


async def outbox_drained(worker, timeout: float = 15.0) -> list:
    """What the worker still has to publish, once it had `timeout` seconds to do it."""
    deadline = time.monotonic() + timeout
    while (left := worker.store.unpublished()) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    return left


async def no_second_answer(customer: Customer, request: dict, wait: float = 1.0) -> None:
    """After its result, nothing more about `request` reaches the customer (no second result,
    no late error)."""
    await asyncio.sleep(wait)
    queue = customer._queues[request["id"]]
    late = [queue.get_nowait() for _ in range(queue.qsize())]
    assert not [e for e in late if e["kind"] == KIND + 1000], late
    statuses = [parse_feedback(e, customer._decrypter(request["id"], e)).status
                for e in late if e["kind"] == FEEDBACK_KIND]
    assert "error" not in statuses, statuses


async def test_a_relay_restarted_mid_job_is_reconnected_and_each_result_arrives_once(
        fresh_relay, workers):
    """Two jobs run while the relay restarts: one finishes while the relay is down (its result
    waits in the outbox), the other after it is back. The worker is connected again within
    5 s of the relay answering, and each job has exactly one result."""
    port = urlsplit(fresh_relay.url).port
    relay_dir = fresh_relay.log_path.parent
    worker = await workers.start(relay_url=fresh_relay.url, max_concurrent_jobs=2)
    restarted = None
    try:
        async with Customer(Keys.generate(), [fresh_relay.url]) as customer:
            assert await customer.pool.wait_all_connected(10)
            short = await customer.submit(KIND, [JobInput("done while the relay is down", "text")],
                                          {"work_seconds": "1.5"}, provider=worker.keys.public_key)
            long = await customer.submit(KIND, [JobInput("done after it is back", "text")],
                                         {"work_seconds": "6"}, provider=worker.keys.public_key)
            for request in (short, long):   # both running: each reported progress
                async for update in customer.updates(request, timeout=20):
                    if update.progress:
                        break

            fresh_relay.stop()
            # The short job ends while the relay is down: its result is stored, not yet published.
            deadline = time.monotonic() + 20
            while worker.store.outgoing_for_job(short["id"], "result") is None:
                assert time.monotonic() < deadline, "the short job did not finish"
                await asyncio.sleep(0.05)
            assert worker.store.unpublished(), "the result was published with no relay up"
            assert worker.store.get_job(long["id"]).state == "running"

            restarted = await asyncio.to_thread(start_relay, relay_dir, port)   # same port, same data
            back = time.monotonic()
            assert await worker.pool.relays[0].wait_connected(RECONNECT_SECONDS), \
                f"the worker did not reconnect within {RECONNECT_SECONDS:g} s of the relay's restart"
            reconnect_seconds = time.monotonic() - back

            assert result_json(await customer.result(short, timeout=30))["words"] == 6
            assert result_json(await customer.result(long, timeout=30))["words"] == 5
            await no_second_answer(customer, short)
            await no_second_answer(customer, long, wait=0)

        assert await outbox_drained(worker) == []
        found = await results_on_relay(restarted.url, [short["id"], long["id"]])
        assert {i: len(events) for i, events in found.items()} == {short["id"]: 1, long["id"]: 1}
        assert worker.counts["received"] == 2 and worker.counts["succeeded"] == 2
        assert worker.counts["failed"] == 0
        print(f"reconnected {reconnect_seconds:.2f} s after the relay was back")
    finally:
        if restarted is not None:
            restarted.stop()


async def test_a_relay_down_for_long_is_tried_often_enough_to_be_back_within_5_s(monkeypatch):
    """However long the relay was down, the next try comes less than 5 s after it is back:
    every wait between tries (jitter included) is under RECONNECT_SECONDS. The waits are
    recorded, not slept, with the jitter at its worst; the relay is a port that refuses."""
    import types

    from dvm_core.transport import relay as relay_module
    waits: list[float] = []
    connection = relay_module.RelayConnection("ws://127.0.0.1:9", lambda *a: None)

    async def no_sleep(seconds):
        waits.append(seconds)
        if len(waits) >= 40:       # 40 tries: past any exponential growth
            connection._closing = True
        await asyncio.sleep(0)
    monkeypatch.setattr(relay_module, "asyncio", types.SimpleNamespace(
        sleep=no_sleep, CancelledError=asyncio.CancelledError, create_task=asyncio.create_task))
    monkeypatch.setattr(relay_module.random, "random", lambda: 0.999999)
    await asyncio.wait_for(connection._run(), 60)
    assert len(waits) == 40
    assert max(waits) < RECONNECT_SECONDS - 0.25, waits   # room for the connection itself


async def _jobs_through_a_flapping_relay(relay, workers, *, seconds: float, cut_every: float,
                                         jobs: int) -> None:
    """`jobs` requests submitted evenly over `seconds` while every connection between the
    worker and the relay is cut every `cut_every` seconds: each gets exactly one result, the
    worker stays up and its outbox ends empty. The customer talks to the relay directly, so
    what is lost is lost by the worker."""
    proxy = await CuttingProxy(relay.url).start()
    try:
        worker = await workers.start(relay_url=proxy.url, max_concurrent_jobs=2)
        async with Customer(Keys.generate(), [relay.url]) as customer:
            assert await customer.pool.wait_all_connected(10)
            proxy.flap(cut_every)
            started = time.monotonic()
            requests = []
            for n in range(jobs):
                await asyncio.sleep(max(0.0, started + n * seconds / jobs - time.monotonic()))
                requests.append(await customer.submit(
                    KIND, [JobInput(f"job {n} " + "word " * n, "text")], {"work_seconds": "1"},
                    provider=worker.keys.public_key))
            await asyncio.sleep(max(0.0, started + seconds - time.monotonic()))
            await proxy.stop_flapping()
            assert proxy.cuts >= int(seconds / cut_every) - 1, proxy.cuts
            assert proxy.connections > proxy.cuts // 2   # the worker came back after the cuts

            for n, request in enumerate(requests):
                assert result_json(await customer.result(request, timeout=40))["words"] == 2 + n
            for request in requests:
                await no_second_answer(customer, request, wait=0)

        assert not worker._stopped.is_set()
        assert all(r._task is not None and not r._task.done() for r in worker.pool.relays)
        assert await worker.pool.wait_all_connected(RECONNECT_SECONDS)
        assert await outbox_drained(worker) == []
        found = await results_on_relay(relay.url, [r["id"] for r in requests])
        assert sorted(len(events) for events in found.values()) == [1] * jobs, \
            {i[:8]: len(e) for i, e in found.items()}
        assert worker.counts["received"] == jobs and worker.counts["succeeded"] == jobs
    finally:
        await proxy.close()


async def test_a_relay_cutting_every_connection_every_3_s_loses_no_job(relay, workers):
    """The representative run: 12 s of cuts every 3 s, a job every 2 s."""
    await _jobs_through_a_flapping_relay(relay, workers, seconds=12, cut_every=3, jobs=6)


@pytest.mark.slow
async def test_a_minute_of_connections_cut_every_3_s_loses_no_job(relay, workers):
    """The whole minute: 20 jobs, one every 3 s, while every connection dies every 3 s."""
    await _jobs_through_a_flapping_relay(relay, workers, seconds=60, cut_every=3, jobs=20)
