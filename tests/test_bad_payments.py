"""Bad payments for paid jobs, end to end through a real relay and a real Nutshell mint.

Each bad payment must get a clear `error` feedback, no work may be done for it, and no sat may
be lost on either side: the provider takes nothing it should not, and the customer can still
redeem (or gets back, as a nutzap) every token the worker refused.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time

import cbor2
import pytest

from dvm_core.customer.client import JobFailed, result_json
from dvm_core.protocol.ecash import NUTZAP_INFO_KIND, build_nutzap, decode_payment_request, decode_token
from dvm_core.protocol.events import Keys, sign_event
from dvm_core.devtools.localnet import start_mint
from dvm_core.protocol.nip90 import HANDLER_KIND, JobInput
from dvm_core.payments.wallet import EcashWallet

from .paying import (FUNDS, PRICE, claim_nutzaps, funded_customer, paid_worker,
                     provider_balance)

KIND = 5790
TEXT = [JobInput("pay me in ecash", "text")]
DEAD_MINT = "http://127.0.0.1:9"     # the discard port: nothing listens there


# -- fixtures and helpers ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def other_mint(tmp_path_factory):
    """A second, real mint that the workers of this module do not accept."""
    service = start_mint(tmp_path_factory.mktemp("other-mint"))
    yield service
    service.stop()


def decode_b(token: str) -> dict:
    raw = token[len("cashuB"):]
    return cbor2.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))


def encode_b(obj: dict) -> str:
    return "cashuB" + base64.urlsafe_b64encode(cbor2.dumps(obj)).decode().rstrip("=")


def encode_a(obj: dict) -> str:
    return "cashuA" + base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")


async def refused(customer, request: dict, *words: str, timeout: float = 30.0) -> list:
    """Wait for the request's `error` feedback; assert it says each of `words` and that no
    result came before it. Returns every feedback, the error last."""
    seen: list = []
    with pytest.raises(JobFailed) as caught:
        await customer.result(request, timeout=timeout, on_feedback=seen.append)
    error = caught.value.feedback
    assert error.status == "error"
    for word in words:
        assert word in error.message, error.message
    return seen + [error]


def no_work_done(worker, request: dict, state: str = "rejected") -> None:
    job = worker.store.get_job(request["id"])
    assert job is not None and job.state == state, job
    assert worker.store.outgoing_for_job(request["id"], "result") is None
    assert worker.counts["succeeded"] == 0


async def redeemed_back(customer, token: str, amount: int) -> None:
    """The refused token is still good: the customer takes it back."""
    assert await customer.wallet.check_spent(token) is False
    assert (await customer.wallet.receive(token, min_amount=amount)).amount == amount


def send_nutzap(customer, token: str, recipient: str, zapped_event: str) -> dict:
    decoded = decode_token(token)
    kind, content, tags = build_nutzap(decoded.mint, list(decoded.proofs), recipient, unit=decoded.unit,
                                       zapped_event=zapped_event, zapped_kind=KIND, comment="a nutzap")
    return sign_event(customer.keys, kind, content, tags)


async def wait_state(worker, job_id: str, state: str, timeout: float = 15.0) -> None:
    for _ in range(int(timeout / 0.05)):
        job = worker.store.get_job(job_id)
        if job is not None and job.state == state:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"job {job_id[:12]} never reached {state}: {worker.store.get_job(job_id)}")


# -- tokens that are not tokens ------------------------------------------------------------------

async def test_garbage_truncated_and_empty_tokens_are_refused(workers, mint, funded):
    worker = await paid_worker(workers, mint)
    token = await funded.wallet.send(PRICE, mint=mint.url)
    body = decode_b(token)
    bad = {
        "garbage": ("hello, here is my money", "not a Cashu token"),
        "garbage cashuB": ("cashuB!!!not-base64", "damaged or incomplete"),
        "truncated": (token[: len(token) // 2], "damaged or incomplete"),
        "cashuB without proofs": (encode_b({**body, "t": [{**body["t"][0], "p": []}]}), "no proofs"),
        "cashuA without proofs": (encode_a({"token": [{"mint": mint.url, "proofs": []}], "unit": "sat"}),
                                  "no proofs"),
    }
    requests = {}
    for name, (text, _) in bad.items():
        requests[name] = await funded.submit(KIND, TEXT, {}, provider=worker.keys.public_key, cashu=text)
    # the same garbage in a public tag
    public = await funded.submit(KIND, TEXT, {}, provider=worker.keys.public_key, encrypt=None,
                                 cashu="cashuBgarbage")
    for name, (_, words) in bad.items():
        await refused(funded, requests[name], words)
        no_work_done(worker, requests[name])
    await refused(funded, public, "damaged or incomplete")
    no_work_done(worker, public)
    assert await provider_balance(worker) == 0
    await redeemed_back(funded, token, PRICE)
    assert await funded.wallet.total_balance() == FUNDS


# -- mints ------------------------------------------------------------------------------------------

async def test_token_of_a_mint_not_accepted_is_refused(workers, mint, funded, other_mint, tmp_path):
    worker = await paid_worker(workers, mint)
    elsewhere = EcashWallet(tmp_path / "elsewhere", [other_mint.url], p2pk_private_key=funded.keys.private_key)
    try:
        await elsewhere.mint_from_lightning(10, other_mint.url)
        token = await elsewhere.send(PRICE, mint=other_mint.url)
        request = await funded.submit(KIND, TEXT, {}, provider=worker.keys.public_key, cashu=token)
        await refused(funded, request, "does not accept ecash from the mint", other_mint.url, mint.url)
        no_work_done(worker, request)
        assert await provider_balance(worker) == 0
        # the customer redeems it at its own mint
        assert await elsewhere.check_spent(token) is False
        assert (await elsewhere.receive(token, min_amount=PRICE)).amount == PRICE
        assert await elsewhere.total_balance() == 10
    finally:
        await elsewhere.close()


async def test_allow_listed_mint_that_is_unreachable(workers, mint, funded):
    worker = await paid_worker(workers, mint, mints=[mint.url, DEAD_MINT], mint_retry_seconds=2)
    token = await funded.wallet.send(PRICE, mint=mint.url)
    dead = encode_b({**decode_b(token), "m": DEAD_MINT})
    started = time.monotonic()
    request = await funded.submit(KIND, TEXT, {}, provider=worker.keys.public_key, cashu=dead)
    feedback = await refused(funded, request, "unreachable", DEAD_MINT, "not redeemed")
    assert time.monotonic() - started >= 2     # it waited for the mint before giving up
    waiting = [f for f in feedback if f.status == "processing"]
    assert waiting and "waits for the mint" in waiting[0].message and "kept" in waiting[0].message
    no_work_done(worker, request)
    assert await provider_balance(worker) == 0
    await redeemed_back(funded, token, PRICE)
    assert await funded.wallet.total_balance() == FUNDS


# -- what the token is worth -------------------------------------------------------------------

async def test_wrong_unit_is_refused(workers, mint, funded):
    worker = await paid_worker(workers, mint)
    token = await funded.wallet.send(PRICE, mint=mint.url)
    request = await funded.submit(KIND, TEXT, {}, provider=worker.keys.public_key,
                                  cashu=encode_b({**decode_b(token), "u": "usd"}))
    await refused(funded, request, "in usd", "paid in sat")
    no_work_done(worker, request)
    assert await provider_balance(worker) == 0
    await redeemed_back(funded, token, PRICE)
    assert await funded.wallet.total_balance() == FUNDS


async def test_underpayment_is_refused_and_not_redeemed(workers, mint, funded):
    worker = await paid_worker(workers, mint)
    token = await funded.wallet.send(3, mint=mint.url)
    request = await funded.submit(KIND, TEXT, {}, provider=worker.keys.public_key, cashu=token)
    await refused(funded, request, "worth 3 sat", f"price is {PRICE} sat", "not redeemed")
    no_work_done(worker, request)
    assert await provider_balance(worker) == 0
    await redeemed_back(funded, token, 3)
    assert await funded.wallet.total_balance() == FUNDS


async def test_missing_and_tampered_dleq_are_refused(workers, mint, funded):
    worker = await paid_worker(workers, mint)
    # Two tokens: the worker records a token (by its proofs' secrets) before it checks it.
    token = await funded.wallet.send(PRICE, mint=mint.url)     # 4 + 1: two proofs
    other = await funded.wallet.send(PRICE, mint=mint.url)
    stripped = decode_b(token)
    assert len(stripped["t"][0]["p"]) == 2
    for proof in stripped["t"][0]["p"]:
        del proof["d"]
    tampered = decode_b(other)
    e = bytearray(tampered["t"][0]["p"][-1]["d"]["e"])          # the last proof's
    e[-1] ^= 0x01
    tampered["t"][0]["p"][-1]["d"]["e"] = bytes(e)
    no_dleq = await funded.submit(KIND, TEXT, {}, provider=worker.keys.public_key, cashu=encode_b(stripped))
    bad_dleq = await funded.submit(KIND, [JobInput("forged", "text")], {}, provider=worker.keys.public_key,
                                   cashu=encode_b(tampered))
    await refused(funded, no_dleq, "no DLEQ proofs")
    await refused(funded, bad_dleq, "DLEQ proof does not verify")
    no_work_done(worker, no_dleq)
    no_work_done(worker, bad_dleq)
    assert await provider_balance(worker) == 0
    await redeemed_back(funded, token, PRICE)
    await redeemed_back(funded, other, PRICE)
    assert await funded.wallet.total_balance() == FUNDS


async def test_token_resent_with_its_dleq_proofs_as_asked_pays(workers, mint, funded):
    worker = await paid_worker(workers, mint)
    token = await funded.wallet.send(PRICE, mint=mint.url)
    stripped = decode_b(token)
    for proof in stripped["t"][0]["p"]:
        del proof["d"]
    first = await funded.submit(KIND, TEXT, {}, provider=worker.keys.public_key, cashu=encode_b(stripped))
    await refused(funded, first, "no DLEQ proofs", "send it with DLEQ proofs included")
    again = await funded.submit(KIND, [JobInput("with dleq", "text")], {}, provider=worker.keys.public_key,
                                cashu=token)
    assert result_json(await funded.result(again, timeout=30))["words"] == 2
    assert await provider_balance(worker) == PRICE


async def test_token_spent_before_it_arrives(workers, mint, funded):
    worker = await paid_worker(workers, mint)
    token = await funded.wallet.send(PRICE, mint=mint.url)
    assert (await funded.wallet.receive(token, min_amount=PRICE)).amount == PRICE   # spent it first
    request = await funded.submit(KIND, TEXT, {}, provider=worker.keys.public_key, cashu=token)
    await refused(funded, request, "already spent")
    no_work_done(worker, request)
    assert await provider_balance(worker) == 0
    assert await funded.wallet.total_balance() == FUNDS
    # The mint refused that swap before signing anything: its mark is forgotten (its secrets
    # go to the next swap), so no recovery can take someone else's swap for this one.
    payment = worker.store.payment_for_job(request["id"])
    assert (payment["state"], payment["swap"]) == ("rejected", None)


# -- locks ----------------------------------------------------------------------------------------

async def test_token_locked_to_someone_elses_key_in_a_public_request(workers, mint, funded, tmp_path):
    worker = await paid_worker(workers, mint)
    holder_keys = Keys.generate()
    holder = EcashWallet(tmp_path / "holder", [mint.url], p2pk_private_key=holder_keys.private_key)
    try:
        token = await funded.wallet.send(PRICE, mint=mint.url, lock_to=holder.p2pk_pubkey)
        request = await funded.submit(KIND, TEXT, {}, provider=worker.keys.public_key, encrypt=None, cashu=token)
        await refused(funded, request, "locked to another key", worker.cashier.p2pk_pubkey)
        no_work_done(worker, request)
        assert await provider_balance(worker) == 0
        # not swallowed: whoever holds the key redeems it
        assert await funded.wallet.check_spent(token) is False
        assert (await holder.receive(token, min_amount=PRICE, require_lock=True)).amount == PRICE
    finally:
        await holder.close()


async def test_lock_expiring_before_the_job_ends_is_refused_and_the_refund_key_takes_it_back(
        workers, mint, funded):
    worker = await paid_worker(workers, mint)
    locktime = int(time.time()) + 4
    token = await funded.wallet.send(PRICE, mint=mint.url, lock_to=worker.cashier.p2pk_pubkey,
                                     locktime=locktime, refund_to=funded.keys.public_key)
    request = await funded.submit(KIND, TEXT, {}, provider=worker.keys.public_key, encrypt=None, cashu=token)
    await refused(funded, request, f"lock expires at {locktime}", "Lock it for longer",
                  "sent back to you as a nutzap")
    no_work_done(worker, request)
    # only the worker could spend it before the locktime: it redeemed it and sent it back
    assert await claim_nutzaps(funded, PRICE) == PRICE
    assert await provider_balance(worker) == 0
    assert await funded.wallet.total_balance() == FUNDS


async def test_customer_wallet_reclaims_an_expired_lock_with_its_refund_key(mint, funded):
    other = EcashWallet(funded.wallet.directory.parent / "someone", [mint.url],
                        p2pk_private_key=Keys.generate().private_key)
    try:
        locktime = int(time.time()) + 1
        token = await funded.wallet.send(PRICE, mint=mint.url, lock_to=other.p2pk_pubkey,
                                         locktime=locktime, refund_to=funded.keys.public_key)
        await asyncio.sleep(max(0.0, locktime + 1.5 - time.time()))
        assert (await funded.wallet.receive(token, min_amount=PRICE)).amount == PRICE
        assert await funded.wallet.total_balance() == FUNDS
    finally:
        await other.close()


async def test_underpaying_token_locked_to_the_worker_is_sent_back(workers, mint, funded):
    worker = await paid_worker(workers, mint)
    token = await funded.wallet.send(3, mint=mint.url, lock_to=worker.cashier.p2pk_pubkey,
                                     refund_to=funded.keys.public_key)
    request = await funded.submit(KIND, TEXT, {}, provider=worker.keys.public_key, encrypt=None, cashu=token)
    await refused(funded, request, "worth 3 sat", f"price is {PRICE} sat", "sent back to you as a nutzap",
                  "send a new request")
    no_work_done(worker, request)
    # The customer cannot redeem it (locked to the worker): the worker must give it back.
    assert await claim_nutzaps(funded, 3, timeout=3) == 3
    assert await funded.wallet.total_balance() == FUNDS
    assert await provider_balance(worker) == 0


async def test_underpaying_nutzap_is_sent_back_and_the_job_still_waits(workers, mint, funded):
    worker = await paid_worker(workers, mint)
    request = await funded.submit(KIND, TEXT, {}, provider=worker.keys.public_key)
    updates = funded.updates(request, timeout=30)
    asked = await anext(updates)
    assert asked.status == "payment-required", asked
    lock = decode_payment_request(asked.content)["nut10"]["d"]
    token = await funded.wallet.send(3, mint=mint.url, lock_to=lock)
    await funded.pool.publish(send_nutzap(funded, token, worker.keys.public_key, request["id"]))
    told = await anext(updates)
    assert told.status == "payment-required" and "worth 3 sat" in told.message, told
    assert "Still waiting for payment" in told.message
    assert await claim_nutzaps(funded, 3, timeout=5) == 3
    assert await funded.wallet.total_balance() == FUNDS
    assert await provider_balance(worker) == 0
    # The job was not ended by a bad payment: a good one still pays it.
    await funded.pay_with_nutzap(request, asked, funded.wallet)
    assert result_json(await funded.result(request, timeout=30))["words"] == 4
    assert await provider_balance(worker) == PRICE


# -- nutzaps that pay for nothing ----------------------------------------------------------------

async def test_nutzap_for_a_job_that_does_not_exist_is_sent_back(workers, mint, funded):
    worker = await paid_worker(workers, mint)
    token = await funded.wallet.send(PRICE, mint=mint.url, lock_to=worker.cashier.p2pk_pubkey,
                                     refund_to=funded.keys.public_key)
    assert await funded.wallet.total_balance() == FUNDS - PRICE
    nobody = os.urandom(32).hex()
    await funded.pool.publish(send_nutzap(funded, token, worker.keys.public_key, nobody))
    assert await claim_nutzaps(funded, PRICE) == PRICE
    assert await funded.wallet.total_balance() == FUNDS
    assert await provider_balance(worker) == 0
    zap = (await funded.nutzaps_received(timeout=2))[0]
    assert zap.sender == worker.keys.public_key and zap.zapped_event == nobody
    assert "no job of this DVM is waiting for this payment" in zap.comment
    assert worker.store.get_job(nobody) is None and worker.counts["succeeded"] == 0


async def test_second_nutzap_for_a_paid_job_is_sent_back(workers, mint, funded):
    worker = await paid_worker(workers, mint)
    request = await funded.submit(KIND, TEXT, {}, provider=worker.keys.public_key,
                                  cashu=await funded.wallet.send(PRICE, mint=mint.url))
    assert result_json(await funded.result(request, timeout=30))["words"] == 4
    again = await funded.wallet.send(PRICE, mint=mint.url, lock_to=worker.cashier.p2pk_pubkey,
                                     refund_to=funded.keys.public_key)
    await funded.pool.publish(send_nutzap(funded, again, worker.keys.public_key, request["id"]))
    assert await claim_nutzaps(funded, PRICE) == PRICE
    assert await funded.wallet.total_balance() == FUNDS - PRICE     # the job was paid once
    assert await provider_balance(worker) == PRICE


# -- cancellation ------------------------------------------------------------------------------

async def test_paid_job_cancelled_before_it_starts_is_refunded(workers, mint, funded):
    worker = await paid_worker(workers, mint, max_concurrent_jobs=1)
    blocker = await funded.submit(KIND, TEXT, {"work_seconds": "3"}, provider=worker.keys.public_key,
                                  cashu=await funded.wallet.send(PRICE, mint=mint.url))
    await wait_state(worker, blocker["id"], "running")
    target = await funded.submit(KIND, [JobInput("never mind", "text")], {}, provider=worker.keys.public_key,
                                 cashu=await funded.wallet.send(PRICE, mint=mint.url))
    await wait_state(worker, target["id"], "queued")
    assert worker.store.payment_for_job(target["id"])["state"] == "redeemed"
    await funded.cancel(target, "changed my mind")
    await refused(funded, target, "cancelled by the customer", f"your {PRICE} sat were refunded")
    assert worker.store.outgoing_for_job(target["id"], "result") is None
    assert worker.store.get_job(target["id"]).state == "cancelled"
    assert worker.store.payment_for_job(target["id"])["state"] == "refunded"
    assert await claim_nutzaps(funded, PRICE) == PRICE
    assert result_json(await funded.result(blocker, timeout=30))["words"] == 4
    assert await funded.wallet.total_balance() == FUNDS - PRICE     # only the blocker was paid
    assert await provider_balance(worker) == PRICE


# -- the mint goes down -----------------------------------------------------------------------

@pytest.fixture
async def own_mint(tmp_path):
    """A mint of the test's own, to stop and start again (same port, same keys and database)."""
    class Own:
        def __init__(self):
            self.dir = tmp_path / "own-mint"
            self.service = start_mint(self.dir)
            self.url = self.service.url
            self.port = int(self.url.rsplit(":", 1)[1])

        def stop(self):
            self.service.stop()

        def start(self):
            self.service = start_mint(self.dir, port=self.port)

    own = Own()
    yield own
    own.stop()


async def test_mint_down_mid_payment_the_job_waits_and_completes(workers, own_mint, relay, tmp_path):
    customer = await funded_customer(tmp_path, own_mint.url, relay.url, amount=20)
    try:
        worker = await paid_worker(workers, own_mint, mints=[own_mint.url], mint_retry_seconds=60)
        token = await customer.wallet.send(PRICE, mint=own_mint.url)
        own_mint.stop()
        request = await customer.submit(KIND, TEXT, {}, provider=worker.keys.public_key, cashu=token)
        async for update in customer.updates(request, timeout=20):
            break
        assert update.status == "processing", update
        assert "unreachable" in update.message and "waits for the mint" in update.message
        assert "your token is kept" in update.message
        assert worker.store.payment_for_job(request["id"])["state"] == "redeeming"
        assert await provider_balance(worker) == 0
        own_mint.start()
        assert result_json(await customer.result(request, timeout=40))["words"] == 4
        assert await provider_balance(worker) == PRICE
        assert await customer.wallet.total_balance() == 20 - PRICE
        assert worker.store.payment_for_job(request["id"])["state"] == "consumed"
    finally:
        await customer.__aexit__(None, None, None)
        await customer.wallet.close()


async def test_token_refused_during_an_outage_pays_when_sent_again(workers, own_mint, relay, tmp_path):
    customer = await funded_customer(tmp_path, own_mint.url, relay.url, amount=20)
    try:
        worker = await paid_worker(workers, own_mint, mints=[own_mint.url], mint_retry_seconds=1)
        token = await customer.wallet.send(PRICE, mint=own_mint.url)
        own_mint.stop()
        first = await customer.submit(KIND, TEXT, {}, provider=worker.keys.public_key, cashu=token)
        await refused(customer, first, "unreachable", "tried again later", "not redeemed")
        own_mint.start()
        assert await customer.wallet.check_spent(token) is False
        again = await customer.submit(KIND, [JobInput("second try", "text")], {},
                                      provider=worker.keys.public_key, cashu=token)
        assert result_json(await customer.result(again, timeout=30))["words"] == 2
        assert await provider_balance(worker) == PRICE
    finally:
        await customer.__aexit__(None, None, None)
        await customer.wallet.close()


# -- what the worker publishes about payments --------------------------------------------------

async def test_nutzap_info_and_announcement_describe_how_to_pay(workers, mint, relay, customer):
    worker = await paid_worker(workers, mint)
    p2pk = worker.cashier.p2pk_pubkey
    assert len(p2pk) == 66 and p2pk != "02" + worker.keys.public_key
    info = announcement = None
    for _ in range(40):
        events = await customer.pool.query([
            {"kinds": [NUTZAP_INFO_KIND, HANDLER_KIND], "authors": [worker.keys.public_key]}], 3)
        info = next((e for e in events if e["kind"] == NUTZAP_INFO_KIND), None)
        announcement = next((e for e in events if e["kind"] == HANDLER_KIND), None)
        if info and announcement:
            break
        await asyncio.sleep(0.1)
    assert info is not None and announcement is not None
    assert ["mint", mint.url, "sat"] in info["tags"]
    assert ["relay", relay.url] in info["tags"]
    assert ["pubkey", p2pk] in info["tags"]
    payment = json.loads(announcement["content"])["payment"]
    assert payment["mints"] == [mint.url]
    assert payment["unit"] == "sat"
    assert payment["p2pk_pubkey"] == p2pk
    assert payment["prices"] == {"text-stats": PRICE}


async def test_jobs_waiting_for_payment_are_bounded(workers, mint, funded):
    """Each unpaid job holds a coroutine for up to payment_timeout: a flood of them is told busy."""
    worker = await paid_worker(workers, mint, max_unpaid_jobs=1)
    first = await funded.submit(KIND, TEXT, {}, provider=worker.keys.public_key)
    asked = await anext(funded.updates(first, timeout=20))
    assert asked.status == "payment-required"
    second = await funded.submit(KIND, [JobInput("one more", "text")], {}, provider=worker.keys.public_key)
    await refused(funded, second, "busy: 1 jobs are waiting for payment", "nothing was charged")
    await funded.pay_with_nutzap(first, asked, funded.wallet)     # the first one still runs
    assert result_json(await funded.result(first, timeout=30))["words"] == 4
