"""Bad input over a real relay: every malformed, misaddressed or hostile request is either
ignored (no feedback, nothing stored) or answered with one clear `error` feedback, and the worker
goes on serving good requests.

Every request here names its worker in a `p` tag: the session relay is shared, and a later
worker in the session must not pick up a request meant for this one."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from dvm_core import JobInputError, JobKind, JobResult, hookimpl
from dvm_core.customer.client import result_json
from dvm_core.protocol.encryption import decrypt, encrypt
from dvm_core.protocol.events import Keys, sign_event
from dvm_core.protocol.nip90 import FEEDBACK_KIND, JobInput, build_request, parse_feedback, parse_result
from dvm_core.worker.plugins import check, plugin_manager
from dvm_core.transport.relay import RelayConnection, RelayPool

KIND = 5790
TEXT = [JobInput("the cat and the hat", "text")]
QUIET_SECONDS = 1.5


class Probe:
    """A customer that publishes raw events and collects every feedback and result about them."""

    def __init__(self, relay_url: str, keys: Keys | None = None):
        self.keys = keys or Keys.generate()
        self.relay_url = relay_url
        self.pool = RelayPool([relay_url], self._on_event)
        self.replies: dict[str, list[dict]] = {}

    async def __aenter__(self) -> "Probe":
        await self.pool.start()
        await self.pool.wait_all_connected(10)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.pool.close()

    def _on_event(self, event: dict, relay: str) -> None:
        for t in event["tags"]:
            if len(t) >= 2 and t[0] == "e" and t[1] in self.replies:
                self.replies[t[1]].append(event)
                return

    def sign(self, tags: list[list[str]], content: str = "", kind: int = KIND) -> dict:
        return sign_event(self.keys, kind, content, tags)

    async def listen(self, event: dict) -> None:
        """Subscribe to feedback and results that refer to `event`."""
        self.replies.setdefault(event["id"], [])
        sub = f"probe-{event['id'][:16]}"
        await self.pool.subscribe(sub, [{"kinds": [FEEDBACK_KIND, event["kind"] + 1000],
                                         "#e": [event["id"]]}])
        assert await self.pool.wait_eose(sub)

    async def send(self, event: dict):
        """Listen for replies to `event`, then publish it; returns the relay's answers."""
        await self.listen(event)
        return await self.pool.publish(event)

    async def final(self, event: dict, timeout: float = 15.0) -> dict:
        """The first error feedback or result for `event`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for reply in self.replies[event["id"]]:
                if reply["kind"] != FEEDBACK_KIND or parse_feedback(reply).status == "error":
                    return reply
            await asyncio.sleep(0.02)
        raise AssertionError(f"no answer to {event['id'][:12]} within {timeout}s: {self.replies[event['id']]}")

    def read(self, reply: dict) -> str:
        if ["encrypted"] in reply["tags"] and reply["content"]:
            return decrypt(self.keys.private_key, reply["pubkey"], reply["content"])[0]
        return parse_feedback(reply).message

    async def error(self, event: dict) -> str:
        """Wait for the answer, check that it is an error feedback, return its message."""
        reply = await self.final(event)
        assert reply["kind"] == FEEDBACK_KIND, f"expected an error, got a result: {reply['content'][:200]}"
        feedback = parse_feedback(reply, lambda text: decrypt(self.keys.private_key, reply["pubkey"], text)[0])
        assert feedback.status == "error"
        assert feedback.request_id == event["id"]
        assert ["p", self.keys.public_key] in reply["tags"]
        # the error is the only answer: no `processing` went out before it
        assert [r for r in self.replies[event["id"]] if r is not reply] == []
        return feedback.message

    async def assert_quiet(self, event: dict, seconds: float = QUIET_SECONDS) -> None:
        await asyncio.sleep(seconds)
        assert self.replies[event["id"]] == [], "expected no answer at all"


@pytest.fixture
async def probe(relay):
    async with Probe(relay.url) as p:
        yield p


async def serves_a_good_job(probe: Probe, worker, kind: int = KIND) -> None:
    """The worker still answers a well-formed encrypted request."""
    enc = lambda text: encrypt("nip44", probe.keys.private_key, worker.keys.public_key, text)  # noqa: E731
    _, content, tags = build_request(kind, TEXT, {}, providers=[worker.keys.public_key], encrypt=enc)
    event = probe.sign(tags, content, kind=kind)
    await probe.send(event)
    reply = await probe.final(event)
    assert reply["kind"] == kind + 1000, probe.read(reply)
    result = parse_result(reply, lambda t: decrypt(probe.keys.private_key, reply["pubkey"], t)[0])
    assert json.loads(result.content)["words"] == 5
    assert worker.store.get_job(event["id"]).state == "succeeded"


def p_tag(worker) -> list[str]:
    return ["p", worker.keys.public_key]


def assert_nothing_recorded(worker) -> None:
    assert worker.store.jobs() == []
    assert worker.counts == {"received": 0, "rejected": 0, "succeeded": 0, "failed": 0, "cancelled": 0}


def assert_rejected(worker, event: dict, message: str) -> None:
    record = worker.store.get_job(event["id"])
    assert record is not None and record.state == "rejected"
    assert message in record.error
    assert worker.counts["received"] == 1 and worker.counts["rejected"] == 1


# signatures ----------------------------------------------------------------------------------

def _forge(event: dict) -> dict:
    """The same event with a signature that does not verify (one hex digit changed)."""
    sig = event["sig"]
    return {**event, "sig": sig[:-1] + ("0" if sig[-1] != "0" else "1")}


async def test_relay_refuses_a_bad_signature_and_the_worker_sees_nothing(workers, probe, relay):
    worker = await workers.start()
    forged = _forge(probe.sign([["i", "hello", "text"], p_tag(worker)]))
    await probe.listen(forged)
    # On a connection of its own: nostr-relay slows down a connection that sent a bad event.
    conn = RelayConnection(relay.url, lambda event, url, sub: None)
    conn.start()
    try:
        assert await conn.wait_connected(10)
        answer, _ = await asyncio.gather(conn.publish(forged), probe.assert_quiet(forged))
    finally:
        await conn.close()
    assert not answer.ok and "signature" in answer.message.lower()  # nostr-relay checks signatures
    assert worker.pool.invalid_events == 0
    assert_nothing_recorded(worker)
    await serves_a_good_job(probe, worker)


@pytest.mark.parametrize("tamper", ["sig", "content", "id"])
async def test_worker_drops_an_event_that_does_not_verify(workers, probe, relay, tamper):
    """A relay that does not check signatures (or lies) cannot feed the worker a forged request."""
    worker = await workers.start()
    genuine = probe.sign([["i", "the cat and the hat", "text"], p_tag(worker)])
    forged = {
        "sig": _forge(genuine),
        "content": {**genuine, "content": "changed after signing"},
        "id": {**genuine, "id": "0" * 64},
    }[tamper]
    worker.pool._deliver(forged, relay.url, "dvm-requests")
    worker.pool._deliver({**genuine, "tags": "not a list"}, relay.url, "dvm-requests")
    assert worker.pool.invalid_events == 2
    await asyncio.sleep(0.3)
    assert_nothing_recorded(worker)
    # The forged copy did not count as "seen": the genuine event with the same id is served.
    await probe.send(genuine)
    reply = await probe.final(genuine)
    assert result_json(parse_result(reply))["words"] == 5


# ignored requests ---------------------------------------------------------------------------

async def test_requests_that_are_not_for_this_worker_are_ignored(workers, probe):
    worker = await workers.start()
    other = Keys.generate()
    private = json.dumps([["i", "hello", "text"]])
    cases = {
        "a kind no plugin serves": probe.sign([["i", "hello", "text"], p_tag(worker)], kind=5791),
        "a clear request for another DVM": probe.sign([["i", "hello", "text"], ["p", other.public_key]]),
        "an encrypted request for another DVM": probe.sign(
            [["encrypted"], ["p", other.public_key]],
            encrypt("nip44", probe.keys.private_key, other.public_key, private)),
        "an encrypted request that names no DVM": probe.sign(
            [["encrypted"]], encrypt("nip44", probe.keys.private_key, worker.keys.public_key, private)),
        "a kind-1 note that mentions us": probe.sign([p_tag(worker)], "hello", kind=1),
    }
    for event in cases.values():
        await probe.send(event)
    await asyncio.sleep(QUIET_SECONDS)
    for case, event in cases.items():
        assert probe.replies[event["id"]] == [], f"{case} was answered"
    assert_nothing_recorded(worker)
    await serves_a_good_job(probe, worker)


# malformed requests: answered with a clear error -------------------------------------------------

@pytest.mark.parametrize("tags, message", [
    ([["i", "hello"]], 'an "i" tag needs data and a type: ["i", data, type, relay, marker]'),
    ([["i", "hello", "blob"]], "input type 'blob' is not one of url, event, job, text"),
    ([["i", "nope", "event"]], "an input of type 'event' must be a 64-hex event id"),
    ([["i", "www.example.com/a.txt", "url"]], "an input of type 'url' must be an absolute URL"),
    ([["i", "hi", "text"], ["param", "top"]], 'a "param" tag needs a name and a value: ["param", name, value]'),
    ([["i", "hi", "text"], ["param", "top", "1"], ["param", "top", "2"]], "param 'top' is given more than once"),
    ([["i", "hi", "text"], ["bid", "ten sats"]], 'the "bid" tag must be a whole number of millisats'),
    ([["i", "hi", "text"], ["p", "npub1notahexkey"]], 'a "p" tag must hold a 64-hex public key'),
    ([], "send the text to analyse as an input of type 'text'"),
    pytest.param([["i", "hi", "text"], ["bid", "²"]], 'the "bid" tag must be a whole number of millisats'),
], ids=["i-without-type", "unknown-input-type", "event-input-not-hex", "url-not-absolute",
        "param-without-value", "repeated-param", "bid-not-a-number", "bad-p-tag", "no-input",
        "bid-non-ascii-digit"])
async def test_malformed_tags_get_a_clear_error(workers, probe, tags, message):
    worker = await workers.start()
    event = probe.sign(tags + [p_tag(worker)])
    await probe.send(event)
    assert message in await probe.error(event)
    assert_rejected(worker, event, message)
    await serves_a_good_job(probe, worker)


@pytest.mark.parametrize("scheme", ["nip44", "nip04"])
@pytest.mark.parametrize("plaintext, message", [
    ("top=3, text=hello", "the decrypted content is not JSON: it must be a JSON array of i and param tags"),
    ('{"i": ["hello", "text"]}', "encrypted content must be a JSON array of tags (lists of strings)"),
    ('[["i", "hello", "text"], ["param", "top", 3]]', "encrypted content must be a JSON array of tags"),
], ids=["not-json", "object", "number-in-tag"])
async def test_undecodable_private_tags_get_an_encrypted_error(workers, probe, scheme, plaintext, message):
    worker = await workers.start()
    content = encrypt(scheme, probe.keys.private_key, worker.keys.public_key, plaintext)
    event = probe.sign([["encrypted"], p_tag(worker)], content)
    await probe.send(event)
    assert message in await probe.error(event)
    reply = probe.replies[event["id"]][0]
    # we could read the request, so the answer is private too, in the customer's scheme
    assert ["encrypted"] in reply["tags"] and ["status", "error"] in reply["tags"]
    assert "JSON" not in json.dumps(reply)
    assert ("?iv=" in reply["content"]) == (scheme == "nip04")
    await serves_a_good_job(probe, worker)


@pytest.mark.parametrize("content, message", [
    ("this is not ciphertext at all", "could not decrypt the content (nip44)"),
    ("", "could not decrypt the content (nip44): invalid payload length 0"),
    ("bm90IGEgcmVhbCBwYXlsb2Fk?iv=AAAAAAAAAAAAAAAAAAAAAA==", "could not decrypt the content (nip04)"),
    ("Zm9v?iv=bad base64!", "could not decrypt the content (nip04): invalid base64"),
], ids=["garbage", "empty", "nip04-garbage", "nip04-bad-base64"])
async def test_undecryptable_content_gets_an_error(workers, probe, content, message):
    worker = await workers.start()
    event = probe.sign([["encrypted"], p_tag(worker)], content)
    await probe.send(event)
    assert message in await probe.error(event)
    assert worker.store.get_job(event["id"]).state == "rejected"
    await serves_a_good_job(probe, worker)


@pytest.mark.parametrize("scheme", ["nip44", "nip04"])
async def test_content_encrypted_to_another_key_gets_an_error(workers, probe, scheme):
    worker = await workers.start()
    stranger = Keys.generate()
    content = encrypt(scheme, probe.keys.private_key, stranger.public_key, json.dumps([["i", "hi", "text"]]))
    event = probe.sign([["encrypted"], p_tag(worker)], content)
    await probe.send(event)
    text = await probe.error(event)
    if scheme == "nip44":
        assert text == "could not decrypt the content (nip44): invalid MAC"
    else:  # NIP-04 has no MAC: a wrong key shows as bad padding, bad UTF-8 or (rarely) junk
        assert text.startswith("could not decrypt the content (nip04)") or "not JSON" in text, text
    # the error cannot be encrypted in a scheme we could not read: it is in the clear
    assert ["encrypted"] not in probe.replies[event["id"]][0]["tags"]
    await serves_a_good_job(probe, worker)


async def test_oversized_request_gets_an_error_naming_the_size(workers, probe):
    worker = await workers.start(max_request_bytes=2000)
    event = probe.sign([["i", "word " * 1000, "text"], p_tag(worker)])
    size = len(json.dumps(event, ensure_ascii=False).encode())
    await probe.send(event)
    text = await probe.error(event)
    assert text == (f"the request is {size} bytes; this DVM accepts at most 2000: "
                    "send large inputs by URL")
    # Recorded, so it is answered once, but without its body (issue 19: floods of big events).
    row = worker.store.db.execute("SELECT length(request) FROM jobs WHERE id = ?", (event["id"],)).fetchone()
    assert row is not None and row[0] < 1000, row
    await serves_a_good_job(probe, worker)


async def test_oversized_encrypted_request_is_refused_before_decrypting(workers, probe):
    worker = await workers.start(max_request_bytes=2000)
    content = encrypt("nip44", probe.keys.private_key, worker.keys.public_key,
                      json.dumps([["i", "word " * 1000, "text"]]))
    event = probe.sign([["encrypted"], p_tag(worker)], content)
    await probe.send(event)
    assert "this DVM accepts at most 2000" in await probe.error(event)
    await serves_a_good_job(probe, worker)


@pytest.mark.parametrize("encrypted", [False, True], ids=["clear", "encrypted"])
async def test_unknown_param_gets_an_error_listing_the_accepted_ones(workers, probe, encrypted):
    worker = await workers.start()
    params = {"colour": "red", "top": "2", "Top": "1"}
    if encrypted:
        enc = lambda t: encrypt("nip44", probe.keys.private_key, worker.keys.public_key, t)  # noqa: E731
        _, content, tags = build_request(KIND, TEXT, params, providers=[worker.keys.public_key], encrypt=enc)
    else:
        _, content, tags = build_request(KIND, TEXT, params, providers=[worker.keys.public_key])
    event = probe.sign(tags, content)
    await probe.send(event)
    assert await probe.error(event) == (
        "unknown param(s) Top, colour for kind 5790 (text-stats); accepted: counts_file, top, work_seconds")
    await serves_a_good_job(probe, worker)


@pytest.mark.parametrize("params, message", [
    ({"top": "1000"}, "param top must be between 1 and 100"),
    ({"top": "0"}, "param top must be between 1 and 100"),
    ({"top": "three"}, "params top and work_seconds must be numbers"),
    ({"work_seconds": "-1"}, "param work_seconds must be between 0 and 600"),
])
async def test_plugin_validation_gets_its_message_through(workers, probe, params, message):
    worker = await workers.start()
    _, content, tags = build_request(KIND, TEXT, params, providers=[worker.keys.public_key])
    event = probe.sign(tags, content)
    await probe.send(event)
    assert await probe.error(event) == message
    assert_rejected(worker, event, message)
    await serves_a_good_job(probe, worker)


# plugins that fail ---------------------------------------------------------------------------

def _echo(ctx, text):
    return JobResult({"words": len(text.split())})


async def _async_echo(ctx, text):
    await ctx.sleep(0.01)
    return JobResult({"words": len(text.split())})


def _text(request):
    return " ".join(i.data for i in request.inputs)


def _parse_crash(request):
    raise KeyError("plugin bug while parsing")


def _run_crash(ctx, text):
    raise RuntimeError("disk on fire /secret/path")


async def _async_run_crash(ctx, text):
    await asyncio.sleep(0)
    raise ZeroDivisionError("async plugin bug")


def _run_input_error(ctx, text):
    raise JobInputError("the text has no training examples")


class FaultyPlugin:
    """An in-memory plugin with kinds that fail in every way a plugin can."""

    @hookimpl
    def register_job_kinds(self, register):
        def kind(number, name, run, parse=_text):
            register(JobKind(kind=number, name=name, description=name, run=run, parse=parse, params=None))
        kind(5850, "parse-crash", _echo, parse=_parse_crash)
        kind(5851, "run-crash", _run_crash)
        kind(5852, "async-run-crash", _async_run_crash)
        kind(5853, "run-input-error", _run_input_error)
        kind(5854, "echo", _echo)
        kind(5855, "async-echo", _async_echo)


@pytest.fixture
async def faulty_worker(workers):
    pm = plugin_manager(only=[])
    pm.register(FaultyPlugin(), name="faulty")
    check(pm)
    return await workers.start(pm=pm)


async def test_plugin_parse_crash_is_an_internal_error(faulty_worker, probe):
    event = probe.sign([["i", "hello", "text"], p_tag(faulty_worker)], kind=5850)
    await probe.send(event)
    assert await probe.error(event) == "internal error while reading the request"
    assert faulty_worker.store.get_job(event["id"]).state == "rejected"
    await serves_a_good_job(probe, faulty_worker, kind=5854)


@pytest.mark.parametrize("kind, message, state", [
    (5851, "internal error while running the job", "failed"),
    (5852, "internal error while running the job", "failed"),
    (5853, "the text has no training examples", "failed"),
], ids=["sync-crash", "async-crash", "job-input-error"])
async def test_plugin_run_failure_gets_an_error_and_the_worker_goes_on(faulty_worker, probe, kind, message, state):
    event = probe.sign([["i", "hello", "text"], p_tag(faulty_worker)], kind=kind)
    await probe.send(event)
    reply = await probe.final(event)
    assert probe.read(reply) == message
    statuses = [parse_feedback(r).status for r in probe.replies[event["id"]]]
    assert "processing" in statuses and statuses.count("error") == 1
    assert "disk on fire" not in json.dumps(probe.replies[event["id"]])  # no internals leak
    record = faulty_worker.store.get_job(event["id"])
    assert record.state == state and record.error == message
    assert faulty_worker.counts["failed"] == 1
    await serves_a_good_job(probe, faulty_worker, kind=5854)
    await serves_a_good_job(probe, faulty_worker, kind=5855)
    assert faulty_worker.counts["succeeded"] == 2


# duplicates --------------------------------------------------------------------------------------

async def test_a_duplicate_request_is_handled_once(workers, probe, relay):
    worker = await workers.start()
    event = probe.sign([["i", "the cat and the hat", "text"], ["param", "work_seconds", "1"], p_tag(worker)])
    await probe.send(event)
    while not probe.replies[event["id"]]:  # wait for `processing`: the job is running
        await asyncio.sleep(0.02)
    # the same event again, through the relay and straight into the worker (as if seen on a
    # relay the pool's in-memory de-duplication had forgotten)
    [again] = await probe.pool.publish(event)
    assert again.ok or "duplicate" in again.message
    worker.pool._seen.clear()
    worker.pool._deliver(event, relay.url, "dvm-requests")
    reply = await probe.final(event)
    assert result_json(parse_result(reply))["words"] == 5

    worker.pool._seen.clear()
    worker.pool._deliver(event, relay.url, "dvm-requests")  # and once more after it finished
    await asyncio.sleep(0.5)
    replies = probe.replies[event["id"]]
    assert len([r for r in replies if r["kind"] == KIND + 1000]) == 1
    assert len([r for r in replies if r["kind"] == FEEDBACK_KIND and not parse_feedback(r).progress]) == 1
    assert worker.counts["received"] == 1 and worker.counts["succeeded"] == 1
    assert worker.store.get_job(event["id"]).attempts == 1
