"""The worker without a relay: it takes its transport from outside, so the intake, the replies
and the job states can be checked in milliseconds against an in-memory pool (the end-to-end
tests against a real relay are in test_worker.py and the payment suites)."""

from __future__ import annotations

import asyncio
import json
from collections import Counter

import pytest

from dvm_core.protocol.events import Keys, sign_event
from dvm_core.protocol.encryption import decrypt, encrypter
from dvm_core.protocol.nip90 import FEEDBACK_KIND, JobInput, build_request, parse_feedback, parse_result
from dvm_core.transport.relay import PublishResult
from dvm_core.worker.config import load_config
from dvm_core.worker.plugins import plugin_manager
from dvm_core.worker.worker import Worker

from .conftest import write_config

pytestmark = pytest.mark.timeout(30)
KIND = 5790


class MemoryPool:
    """What the worker needs of a relay pool, in memory: events in by `deliver`, out in `published`."""

    def __init__(self):
        self.handler = None
        self.published: list[dict] = []
        self.subscriptions: dict[str, object] = {}
        self.changed = asyncio.Event()

    def set_handler(self, handler) -> None:
        self.handler = handler

    async def start(self, wait=None) -> bool:
        return True

    async def subscribe(self, sub_id, filters) -> None:
        self.subscriptions[sub_id] = filters

    async def unsubscribe(self, sub_id) -> None:
        self.subscriptions.pop(sub_id, None)

    async def publish(self, event: dict) -> list[PublishResult]:
        self.published.append(event)
        self.changed.set()
        return [PublishResult("memory", True, "")]

    async def query(self, filters, timeout=5.0) -> list[dict]:
        return []

    async def close(self) -> None:
        pass

    def deliver(self, event: dict) -> None:
        self.handler(event, "memory")

    async def replies(self, request: dict, count: int, timeout: float = 10.0) -> list[dict]:
        """The first `count` events that answer `request`."""
        async def enough():
            while True:
                found = [e for e in self.published if ["e", request["id"], "memory"] in e["tags"]
                         or any(t[:2] == ["e", request["id"]] for t in e["tags"])]
                if len(found) >= count:
                    return found
                self.changed.clear()
                await self.changed.wait()
        return await asyncio.wait_for(enough(), timeout)


@pytest.fixture
async def worker(tmp_path):
    pool = MemoryPool()
    config = load_config(write_config(tmp_path / "dvm.toml", "ws://memory.invalid"), env={})
    w = Worker(config, Keys.generate(), plugin_manager(only=["textstats"]), pool=pool)
    await w.start()
    yield w
    await w.stop(grace=1.0)


def request(customer: Keys, worker: Worker, text: str = "one two three", params=None, encrypted=False,
            provider: str | None = None) -> dict:
    provider = provider or worker.keys.public_key
    encrypt = encrypter("nip44", customer.private_key, provider) if encrypted else None
    kind, content, tags = build_request(KIND, inputs=[JobInput(text, "text")], params=params or {},
                                        providers=[provider], encrypt=encrypt)
    return sign_event(customer, kind, content, tags)


async def test_a_request_gets_processing_then_its_result(worker):
    customer = Keys.generate()
    event = request(customer, worker)
    worker.pool.deliver(event)
    feedback, result = await worker.pool.replies(event, 2)
    assert parse_feedback(feedback).status == "processing"
    assert json.loads(parse_result(result).content)["words"] == 3
    assert worker.store.get_job(event["id"]).state == "succeeded"


async def test_the_same_request_twice_is_answered_once(worker):
    event = request(Keys.generate(), worker)
    worker.pool.deliver(event)
    worker.pool.deliver(event)
    await worker.pool.replies(event, 2)
    await asyncio.sleep(0.2)
    assert len([e for e in worker.pool.published if e["kind"] == KIND + 1000]) == 1
    assert worker.counts["received"] == 1


async def test_an_unknown_param_is_refused_with_the_reason(worker):
    event = request(Keys.generate(), worker, params={"colour": "blue"})
    worker.pool.deliver(event)
    [feedback] = await worker.pool.replies(event, 1)
    parsed = parse_feedback(feedback)
    assert parsed.status == "error" and "unknown param(s) colour" in parsed.message
    assert worker.store.get_job(event["id"]).state == "rejected"


async def test_a_private_request_is_answered_encrypted(worker):
    customer = Keys.generate()
    event = request(customer, worker, encrypted=True)
    worker.pool.deliver(event)
    feedback, result = await worker.pool.replies(event, 2)
    assert ["encrypted"] in result["tags"] and "three" not in result["content"]
    assert json.loads(parse_result(result, lambda text: decrypt(customer.private_key, worker.keys.public_key,
                                                                   text)[0]).content)["words"] == 3


async def test_a_request_for_another_dvm_is_left_alone(worker):
    event = request(Keys.generate(), worker, provider=Keys.generate().public_key)
    worker.pool.deliver(event)
    await asyncio.sleep(0.2)
    assert worker.store.get_job(event["id"]) is None
    assert not [e for e in worker.pool.published if e["kind"] in (FEEDBACK_KIND, KIND + 1000)]


async def test_the_worker_subscribes_to_requests_of_its_kinds(worker):
    filters = worker.pool.subscriptions["dvm-requests"]()
    assert filters[0]["kinds"] == [KIND]


class SlowPool(MemoryPool):
    """A relay that takes events only while `open` is set (one in a flood, slower than the
    worker): counts the publishes waiting for its OK at once."""

    def __init__(self):
        super().__init__()
        self.open = asyncio.Event()
        self.waiting = self.most_waiting = 0

    async def publish(self, event: dict) -> list[PublishResult]:
        self.waiting += 1
        self.most_waiting = max(self.most_waiting, self.waiting)
        try:
            await self.open.wait()
        finally:
            self.waiting -= 1
        return await super().publish(event)


async def test_a_slow_relay_holds_at_most_max_in_flight_publishes(tmp_path):
    """Issue 19's flood: answers beyond `max_in_flight` wait in the store (stored ones) or in a
    bounded queue (those that may be lost), not each in a task of its own; all stored ones
    still go out, once each, oldest first."""
    from dvm_core.state.store import Store
    from dvm_core.worker.outbox import Outbox
    pool, store, keys = SlowPool(), Store(tmp_path / "state.db"), Keys.generate()
    tasks: set[asyncio.Task] = set()

    def spawn(coro):
        task = asyncio.create_task(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return task

    outbox = Outbox(pool=pool, store=store, keys=keys, relay_hint="memory", spawn=spawn,
                    max_in_flight=4, max_waiting=3)
    stored = [outbox.sign(KIND + 1000, f"result {i}", []) for i in range(20)]
    for i, event in enumerate(stored):
        outbox.store_and_send(event, "result", f"job{i}")
    for i in range(10):
        outbox.send(outbox.sign(FEEDBACK_KIND, f"progress {i}", []))
    await asyncio.sleep(0.05)
    assert pool.most_waiting == 4 and len(tasks) == 4
    assert outbox.congested and outbox.dropped == 7
    outbox.send_stored(stored[0], "result", "job0")   # already going out: not twice
    pool.open.set()
    deadline = asyncio.get_running_loop().time() + 5
    while (tasks or store.unpublished()) and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.01)
    assert store.unpublished() == [] and not outbox.congested and outbox.in_flight == 0
    published = [e["content"] for e in pool.published]
    assert [c for c in published if c.startswith("result")] == [e["content"] for e in stored]
    assert [c for c in published if c.startswith("progress")] == ["progress 7", "progress 8", "progress 9"]
    assert pool.most_waiting == 4
    store.close()


async def test_a_flood_waits_in_the_store_not_in_tasks(tmp_path):
    """Issue 19's flood: while the outbox is congested (or `max_handling` requests have a task
    each), new requests are recorded and wait in the store; they are taken up, oldest first,
    as room frees, and each is answered once."""
    pool = SlowPool()
    config = load_config(write_config(tmp_path / "dvm.toml", "ws://memory.invalid"), env={})
    w = Worker(config, Keys.generate(), plugin_manager(only=["textstats"]), pool=pool)
    w.outbox.max_in_flight, w.max_handling = 4, 6
    await w.start()
    try:
        customer = Keys.generate()
        events = [request(customer, w, text=f"word {i}") for i in range(40)]
        most_tasks = 0
        for event in events:
            pool.deliver(event)
            most_tasks = max(most_tasks, len(w._requests))
            await asyncio.sleep(0)
        await asyncio.sleep(0.2)
        most_tasks = max(most_tasks, len(w._requests))
        assert most_tasks <= 6 and pool.most_waiting <= 4
        assert len(w.store.jobs(("received",))) >= 30   # waiting in the store
        pool.open.set()
        deadline = asyncio.get_running_loop().time() + 20
        while asyncio.get_running_loop().time() < deadline:
            results = [e for e in pool.published if e["kind"] == KIND + 1000]
            if len(results) >= 40:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
        answered = Counter(next(t[1] for t in e["tags"] if t[0] == "e")
                           for e in pool.published if e["kind"] == KIND + 1000)
        assert answered == Counter({e["id"]: 1 for e in events})
        assert all(w.store.get_job(e["id"]).state == "succeeded" for e in events)
        assert w.counts["received"] == 40 and w.outbox.dropped == 0 and w._deferred_after is None
    finally:
        pool.open.set()
        await w.stop(grace=1.0)


async def test_a_restart_resumes_every_unfinished_request_a_page_at_a_time(tmp_path):
    """Stopped in a flood with 30 requests recorded and unanswered, a worker that keeps at most
    6 in hand resumes them all after its restart: the first 6 at once, the rest a page at a
    time as room frees (`Worker._resume_rest`), never more than 6 tasks; each answered once."""
    config = load_config(write_config(tmp_path / "dvm.toml", "ws://memory.invalid"), env={})
    keys, customer = Keys.generate(), Keys.generate()
    first_pool = SlowPool()   # never opens: nothing is answered before the stop
    first = Worker(config, keys, plugin_manager(only=["textstats"]), pool=first_pool)
    first.outbox.max_in_flight, first.max_handling = 4, 6
    await first.start()
    events = [request(customer, first, text=f"word {i}") for i in range(30)]
    for event in events:
        first_pool.deliver(event)
        await asyncio.sleep(0)
    await asyncio.sleep(0.2)
    first_pool.open.set()   # let the stop's own publishes go
    await first.stop(grace=0.5)

    pool = MemoryPool()
    second = Worker(config, keys, plugin_manager(only=["textstats"]), pool=pool)
    second.max_handling = 6
    unanswered = [e["id"] for e in events if second.store.get_job(e["id"]).state != "succeeded"]
    assert len(unanswered) > 12, len(unanswered)   # more than two pages wait for the restart
    most = 0
    await second.start()
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while loop.time() < deadline and any(second.store.get_job(i).state != "succeeded" for i in unanswered):
            most = max(most, len(second._requests))
            await asyncio.sleep(0.01)
        answered = Counter(next(t[1] for t in e["tags"] if t[0] == "e")
                           for e in pool.published if e["kind"] == KIND + 1000)
        assert all(answered[i] == 1 for i in unanswered), answered
        assert most <= 6
    finally:
        await second.stop(grace=1.0)
