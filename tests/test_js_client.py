"""Interop: a plain JavaScript NIP-90 client (npm nostr-tools + ws, tests/js/nip90_client.mjs)
uses the worker over a real relay, with a NIP-44 encrypted request and one in the clear.

Needs Node.js and `make js` (npm install in tests/js); without them these tests fail, they do
not skip, so a missing setup is never mistaken for a pass.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from collections import Counter

import pytest

from dvm_core.protocol.events import verify_event

from .conftest import REPO

JS_DIR = REPO / "tests" / "js"
CLIENT = JS_DIR / "nip90_client.mjs"
KIND = 5790
# Non-ASCII on purpose: event ids are hashes of JSON, which Python and JavaScript must write
# byte for byte alike (NIP-01), in the request (JS → Python) and in the result's "request" tag
# (Python → JS).
TEXT = "The cat and the hat — the café cat"
WORDS = ["the", "cat", "and", "the", "hat", "the", "café", "cat"]


def node_and_modules() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.fail("Node.js (`node`) is not on PATH: install Node.js 20.19 or later, then run `make js`")
    for package in ("nostr-tools", "ws"):
        if not (JS_DIR / "node_modules" / package / "package.json").is_file():
            pytest.fail(f"tests/js/node_modules/{package} is missing: run `make js` "
                        "(npm install in tests/js) before the tests")
    return node


def readable(word: str, text: str) -> bool:
    """Whether `word` stands in `text` as a word. Not a bare `in`: a ciphertext is base64, and
    "cat" turns up inside some random base64 by chance (CI saw it once in a feedback event)."""
    return re.search(rf"(?<![A-Za-z0-9+/=]){re.escape(word)}(?![A-Za-z0-9+/=])", text) is not None


async def run_client(node: str, *args: str, timeout: float = 60.0) -> tuple[int, str, str]:
    # Not subprocess.run: the worker lives in this event loop and must keep serving meanwhile.
    proc = await asyncio.create_subprocess_exec(
        node, str(CLIENT), *args, cwd=JS_DIR,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        pytest.fail(f"the JS client did not exit within {timeout:g} s")
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.parametrize("mode", ["nip44", "clear"])
async def test_js_nostr_tools_client_gets_feedback_and_result(workers, relay, mode):
    node = node_and_modules()
    worker = await workers.start()
    code, out, err = await run_client(
        node, "--relay", relay.url, "--dvm", worker.keys.public_key, "--mode", mode,
        "--text", TEXT, "--top", "2", "--timeout", "30")
    lines = out.strip().splitlines()
    assert code == 0, f"JS client exited {code}\nstdout: {out[-3000:]}\nstderr: {err[-3000:]}"
    assert len(lines) == 1, f"expected one JSON line on stdout, got:\n{out[-3000:]}"
    seen = json.loads(lines[0])
    encrypted = mode == "nip44"

    request = seen["request_event"]
    assert seen["request_id"] == request["id"]
    verify_event(request)  # nostr-tools' id and signature check out in Python too
    assert worker.store.get_job(request["id"]).state == "succeeded"
    assert worker.counts["received"] == 1 and worker.counts["rejected"] == 0

    # feedback: `processing` first, from the DVM, to the customer, encrypted like the request
    statuses = [f["status"] for f in seen["feedback"]]
    assert "processing" in statuses and "error" not in statuses, seen["feedback"]
    assert statuses[0] == "processing"
    assert any(f["message"] == "job accepted" for f in seen["feedback"]), seen["feedback"]
    assert all(f["p"] == seen["customer"] for f in seen["feedback"])
    assert seen["feedback_encrypted"] is encrypted
    for event in seen["feedback_events"]:
        assert event["pubkey"] == worker.keys.public_key
        status_tag = next(t for t in event["tags"] if t[0] == "status")
        if encrypted:
            assert status_tag == ["status", status_tag[1]] and event["content"]

    # the result: kind 6790 from the DVM, decrypted and parsed by the JS client
    result = seen["result"]
    assert seen["result_encrypted"] is encrypted
    assert result["words"] == len(WORDS) == 8
    assert result["unique_words"] == len(set(WORDS))
    assert result["characters"] == len(TEXT)
    assert result["lines"] == 1
    assert result["top_words"] == [list(kv) for kv in Counter(WORDS).most_common(2)] \
        == [["the", 3], ["cat", 2]]
    raw = seen["result_event"]
    assert raw["kind"] == KIND + 1000 and raw["pubkey"] == worker.keys.public_key
    verify_event(raw)
    tags = raw["tags"]
    assert ["p", seen["customer"]] in tags
    assert any(t[0] == "e" and t[1] == request["id"] for t in tags)
    assert json.loads(next(t[1] for t in tags if t[0] == "request"))["id"] == request["id"]
    if encrypted:
        # nothing of the input is readable on the relay: not the request, not the answers
        assert ["encrypted"] in tags and ["encrypted"] in request["tags"]
        assert not any(t[0] == "i" for t in tags)
        for word in ("cat", "café", "hat"):
            assert not readable(word, raw["content"])
            assert not readable(word, json.dumps(raw, ensure_ascii=False))
            assert not readable(word, json.dumps(request, ensure_ascii=False))
            assert not any(readable(word, json.dumps(e, ensure_ascii=False))
                           for e in seen["feedback_events"])
    else:
        assert ["i", TEXT, "text"] in tags and not any(t == ["encrypted"] for t in tags)
        assert json.loads(raw["content"]) == result

    # every event the relay sent passed nostr-tools' verifyEvent, and all were for this job
    assert seen["invalid_events"] == [], seen["invalid_events"]
    assert seen["ignored_events"] == [], seen["ignored_events"]


async def test_change_and_refunds_are_redeemed_by_a_stock_cashu_ts_wallet(workers, mint, relay, tmp_path):
    """A NIP-61 `proof` tag is a bare proof with the mint's full keyset id: cashu-ts 4.8
    `wallet.receive(proofs)` refuses a 16-hex short id ("Proof has unrecognised keyset")."""
    from dvm_core.customer.client import result_json
    from dvm_core.protocol.nip90 import JobInput

    from .paying import PRICE, close_customer, funded_customer, paid_worker
    node = node_and_modules()
    if not (JS_DIR / "node_modules" / "@cashu" / "cashu-ts" / "package.json").is_file():
        pytest.fail("tests/js/node_modules/@cashu/cashu-ts is missing: run `make js`")
    customer = await funded_customer(tmp_path, mint.url, relay.url)
    try:
        worker = await paid_worker(workers, mint)
        request = await customer.submit(KIND, [JobInput("change please", "text")], {},
                                        provider=worker.keys.public_key,
                                        cashu=await customer.wallet.send(PRICE + 3, mint=mint.url))
        assert result_json(await customer.result(request, timeout=30))["words"] == 2
        zaps = []
        for _ in range(60):
            zaps = await customer.nutzaps_received(timeout=2)
            if zaps:
                break
            await asyncio.sleep(0.25)
        assert len(zaps) == 1, zaps
        proofs = list(zaps[0].proofs)
        assert all(len(p["id"]) == 66 for p in proofs), [p["id"] for p in proofs]  # full keyset ids
        code, out, err = await asyncio.wait_for(_run_node(
            node, "cashu_receive.mjs", json.dumps({"mint": mint.url, "proofs": proofs,
                                                   "privkey": customer.keys.private_key})), 60)
        assert code == 0, err
        assert json.loads(out.strip().splitlines()[-1]) == {"ok": True, "amount": 3}
    finally:
        await close_customer(customer)


async def _run_node(node: str, script: str, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        node, str(JS_DIR / script), *args, cwd=JS_DIR,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    return proc.returncode, out.decode(), err.decode()
