"""SIGKILL the worker at each step of a paid job; after the restart nothing is lost.

A real `dvm run` child process, a real relay and a real Nutshell mint. The worker kills itself
(`DVM_CRASH_AT`, see dvm_core/payments/crashpoints.py) at one step of a paid job, in one way of paying,
and is started again. Then:
- the job has exactly one result (or, when it was meant to fail, exactly one refund),
- no token paid twice, and the job's payment is settled (consumed, or refunded),
- the customer's wallet (after claiming the nutzaps sent to it) plus the provider's wallet hold
  exactly what the customer minted: not a sat lost, not a sat made up.

The same for a job paid on delivery (the result sealed and offered first, paid by an HTLC
nutzap whose redemption reveals the key): exactly one result, which the customer opens; one
payment, however often the offer comes; the provider gets the price, the customer keeps the
rest. And the customer's side dying between keeping its HTLC token and sending it.

`make test` runs each kill point once; `make test-all` runs every point in every way of paying.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import sqlite3
import time

import pytest

from dvm_core.customer.client import (Customer, Delivery, JobFailed, download_artifacts, open_delivery,
                                      result_json)
from dvm_core.devtools.blobserver import start_blob_server
from dvm_core.protocol.delivery import parse_offer
from dvm_core.protocol.ecash import build_nutzap, decode_token, htlc_hash
from dvm_core.protocol.events import Keys, sign_event
from dvm_core.protocol.nip90 import JobInput, Result
from dvm_core.payments.p2pk_keys import load_or_create_p2pk_key
from dvm_core.payments.wallet import EcashWallet

from ..conftest import WorkerProcess
from ..paying import FUNDS, PRICE, claim_nutzaps, close_customer, funded_customer, redeemed_balance

KIND = 5790
RESULT_KIND = KIND + 1000
MODES = ("encrypted", "p2pk", "nutzap")
JOB_POINTS = ("request-recorded", "payment-recorded", "before-swap", "after-swap", "payment-redeemed",
              "job-queued", "job-running", "result-stored")
NUTZAP_POINTS = ("payment-required", "nutzap-kept")
PAYOUT_POINTS = ("payout-owed", "payout-sending", "payout-made", "payout-stored")


def _cases():
    """(mode, point, outcome); the first of each point's cases is the representative one."""
    cases, seen = [], set()
    for i, point in enumerate(JOB_POINTS):
        for j in range(len(MODES)):
            cases.append((MODES[(i + j) % len(MODES)], point, "paid"))
    for point in NUTZAP_POINTS:
        cases.append(("nutzap", point, "paid"))
    for i, point in enumerate(PAYOUT_POINTS):
        for j, mode in enumerate(("encrypted", "p2pk")):
            cases.append(((mode, "p2pk", "encrypted")[(i + j) % 2], point, "change"))
        for j in range(len(MODES)):
            cases.append((MODES[(i + j) % len(MODES)], point, "refund"))
    params = []
    for mode, point, outcome in cases:
        first = (point, outcome) not in seen
        seen.add((point, outcome))
        marks = () if first else (pytest.mark.slow,)
        params.append(pytest.param(mode, point, outcome, marks=marks, id=f"{outcome}-{point}-{mode}"))
    return params


async def _follow(customer, request: dict, mode: str, outcome: str) -> tuple[list, object]:
    """Follow the job as a customer would, paying by nutzap when asked (once); returns the
    feedback seen and the result (or the JobFailed)."""
    seen, paid = [], False
    while True:
        try:
            async for update in customer.updates(request, timeout=60):
                if getattr(update, "status", None) == "payment-required" and not paid:
                    assert mode == "nutzap", update
                    await customer.pay_with_nutzap(request, update, customer.wallet)
                    paid = True
                if hasattr(update, "status"):
                    seen.append(update)
                    if update.status == "error":
                        return seen, JobFailed(update)
                else:
                    return seen, update
        except TimeoutError as exc:
            return seen, exc


@pytest.mark.parametrize("mode,point,outcome", _cases())
async def test_a_kill_at_any_step_loses_nothing(tmp_path, relay, mint, mode, point, outcome):
    keys = Keys.generate()
    settings = dict(mints=[mint.url], prices={"text-stats": PRICE}, mint_retry_seconds=30)
    if outcome == "refund":
        settings["job_time_limit"] = 1.0
    worker = WorkerProcess(tmp_path, relay.url, keys, **settings)
    customer = await funded_customer(tmp_path, mint.url, relay.url)
    try:
        worker.start(env={"DVM_CRASH_AT": point})
        worker.wait_log("worker ready")
        params = {"work_seconds": "3"} if outcome == "refund" else {}
        amount = PRICE + 3 if outcome == "change" else PRICE
        inputs = [JobInput("kill me softly", "text")]
        if mode == "encrypted":
            request = await customer.submit(KIND, inputs, params, provider=keys.public_key,
                                            cashu=await customer.wallet.send(amount, mint=mint.url))
        elif mode == "p2pk":
            wallet_key = await _wallet_key(customer, keys.public_key)
            token = await customer.wallet.send(amount, mint=mint.url, lock_to=wallet_key,
                                               refund_to=customer.keys.public_key)
            request = await customer.submit(KIND, inputs, params, provider=keys.public_key,
                                            encrypt=None, cashu=token)
        else:
            request = await customer.submit(KIND, inputs, params, provider=keys.public_key)
        follow = asyncio.create_task(_follow(customer, request, mode, outcome))

        await _killed_at(worker, point)
        worker.start()
        seen, end = await asyncio.wait_for(follow, 70)

        results = await customer.pool.query([{"kinds": [RESULT_KIND], "#e": [request["id"]]}], 3)
        if outcome == "refund":
            assert isinstance(end, JobFailed) and "time limit" in end.feedback.message, end
            assert "refunded as a nutzap" in end.feedback.message, end.feedback.message
            assert results == []
        else:
            assert not isinstance(end, Exception), f"{end!r}\n{worker.log.read_text()[-4000:]}"
            assert result_json(end)["words"] == 3
            assert len(results) == 1, results
        # Claim what came back (change, refund), then stop the worker and count every sat.
        back = {"paid": 0, "change": 3, "refund": amount}[outcome]
        assert await claim_nutzaps(customer, back, timeout=20) == back
        worker.terminate()
        store = sqlite3.connect(worker.dir / "state" / "dvm.sqlite3")
        store.row_factory = sqlite3.Row
        payments = [dict(r) for r in store.execute("SELECT * FROM payments WHERE job_id = ?", (request["id"],))]
        assert len(payments) == 1, payments
        assert payments[0]["state"] == ("refunded" if outcome == "refund" else "consumed"), payments
        open_payouts = store.execute("SELECT COUNT(*) FROM payouts WHERE state != 'sent'").fetchone()[0]
        assert open_payouts == 0
        store.close()
        provider = await _provider_balance(worker)
        customer_balance = await customer.wallet.total_balance()
        assert customer_balance + provider == FUNDS, (customer_balance, provider)
        assert provider == (0 if outcome == "refund" else PRICE)
    finally:
        worker.stop()
        await close_customer(customer)


async def _killed_at(worker: WorkerProcess, point: str, timeout: float = 40) -> None:
    """Wait for the worker to die at `point` (some points are reached only on a path the case takes)."""
    deadline = time.monotonic() + timeout
    while worker.proc.poll() is None and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert worker.proc.returncode == -9, f"never reached {point}:\n{worker.log.read_text()[-3000:]}"
    assert f"crash point {point}" in worker.log.read_text()


async def _payment_settled(worker: WorkerProcess, job_id: str, timeout: float = 30) -> None:
    """Wait until the job's payment is no longer on its way through the mint."""
    deadline, state = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        with contextlib.closing(sqlite3.connect(worker.dir / "state" / "dvm.sqlite3", timeout=5)) as db:
            row = db.execute("SELECT state FROM payments WHERE job_id = ?", (job_id,)).fetchone()
        state = row[0] if row else None
        if state not in (None, "received", "redeeming", "redeemed"):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"the payment stayed {state!r}:\n{worker.log.read_text()[-3000:]}")


async def _wallet_key(customer, provider: str) -> str:
    """The P2PK key the worker advertises in its kind 10019, signed by it."""
    from dvm_core.protocol.ecash import NUTZAP_INFO_KIND, parse_nutzap_info
    for _ in range(100):
        events = await customer.pool.query([{"kinds": [NUTZAP_INFO_KIND], "authors": [provider]}], 2)
        for event in events:
            if event["pubkey"] == provider and parse_nutzap_info(event).p2pk_pubkey:
                return parse_nutzap_info(event).p2pk_pubkey
        await asyncio.sleep(0.1)
    raise AssertionError("the worker published no kind 10019")


async def _provider_balance(worker: WorkerProcess) -> int:
    directory = worker.dir / "state" / "wallet"
    wallet = EcashWallet(directory, [worker_mint(worker)],
                         p2pk_private_key=load_or_create_p2pk_key(directory / "p2pk.key"))
    try:
        return await wallet.total_balance()
    finally:
        await wallet.close()


def worker_mint(worker: WorkerProcess) -> str:
    import tomllib
    return tomllib.loads(worker.config.read_text())["dvm"]["mints"][0]


async def test_a_job_that_takes_the_worker_down_twice_is_refunded_not_retried(tmp_path, relay, mint):
    """A job that kills its worker (out of memory, say) would kill it again at every restart:
    after the second time it is failed and refunded, and the worker stays up."""
    keys = Keys.generate()
    worker = WorkerProcess(tmp_path, relay.url, keys, mints=[mint.url], prices={"text-stats": PRICE})
    customer = await funded_customer(tmp_path, mint.url, relay.url)
    try:
        request = None
        for crash in (1, 2):
            worker.start(env={"DVM_CRASH_AT": "job-running"})   # dies as the job starts running
            worker.wait_log("worker ready")
            if request is None:
                request = await customer.submit(KIND, [JobInput("deadly", "text")], {}, provider=keys.public_key,
                                                cashu=await customer.wallet.send(PRICE, mint=mint.url))
            for _ in range(600):
                if worker.proc.poll() is not None:
                    break
                await asyncio.sleep(0.05)
            assert worker.proc.returncode == -9, f"crash {crash}:\n{worker.log.read_text()[-2000:]}"
        worker.start()
        with pytest.raises(JobFailed, match="stopped the worker 2 times.*refunded as a nutzap"):
            await customer.result(request, timeout=30)
        assert await claim_nutzaps(customer, PRICE, timeout=20) == PRICE
        assert worker.proc.poll() is None     # still up
        assert await customer.wallet.total_balance() == FUNDS
    finally:
        worker.stop()
        await close_customer(customer)


# pay on delivery ------------------------------------------------------------------------------
DELIVERY_POINTS = ("request-recorded", "job-running", "delivery-offered", "nutzap-kept", "payment-recorded",
                   "htlc-checked", "before-swap", "after-swap", "payment-redeemed", "delivery-result-stored")
DELIVERY_WAYS = ("nip44", "public", "files")     # an encrypted request, one in the clear, a result file
DELIVERY_TEXT = "the quick brown fox jumps over the lazy dog the end"   # 11 words, "the" 3 times


def _delivery_cases():
    """(way, point); the first of each point's cases is the representative one."""
    params = []
    for i, point in enumerate(DELIVERY_POINTS):
        for j in range(len(DELIVERY_WAYS)):
            way = DELIVERY_WAYS[(i + j) % len(DELIVERY_WAYS)]
            params.append(pytest.param(way, point, marks=() if j == 0 else (pytest.mark.slow,),
                                       id=f"delivery-{point}-{way}"))
    return params


async def _follow_delivery(customer, request: dict) -> tuple[list, Delivery | None, object]:
    """Follow a job paid on delivery as a customer would: pay the first offer, and only that one
    however often an offer comes (after a restart the worker publishes it again from its outbox),
    until the result or an error. Returns (the offers seen, the Delivery paid, the end)."""
    offers, delivery = [], None
    try:
        async for update in customer.updates(request, timeout=60):
            if isinstance(update, Result):
                return offers, delivery, update
            if update.status == "error":
                return offers, delivery, JobFailed(update)
            if update.status == "payment-required":
                offers.append(update)
                if delivery is None:
                    delivery = await customer.pay_on_delivery(request, update, customer.wallet, max_price=PRICE)
    except TimeoutError as exc:
        return offers, delivery, exc
    raise AssertionError("unreachable")


@pytest.mark.parametrize("way,point", _delivery_cases())
async def test_a_kill_at_any_step_of_a_job_paid_on_delivery_loses_nothing(tmp_path, relay, mint, way, point):
    keys = Keys.generate()
    settings = dict(mints=[mint.url], prices={"text-stats": PRICE}, mint_retry_seconds=30)
    blobs = None
    if way == "files":
        blobs = await start_blob_server(tmp_path / "blobs")
        settings |= dict(blob_servers=[blobs.url], allow_private_urls=True)
    worker = WorkerProcess(tmp_path, relay.url, keys, **settings)
    customer = await funded_customer(tmp_path, mint.url, relay.url)
    try:
        worker.start(env={"DVM_CRASH_AT": point})
        worker.wait_log("worker ready")
        params = {"pay_on_delivery": customer.wallet.p2pk_pubkey}
        if way == "files":
            params["counts_file"] = "yes"
        request = await customer.submit(KIND, [JobInput(DELIVERY_TEXT, "text")], params, provider=keys.public_key,
                                        encrypt=None if way == "public" else "nip44")
        follow = asyncio.create_task(_follow_delivery(customer, request))
        await _killed_at(worker, point)
        worker.start()
        offers, delivery, end = await asyncio.wait_for(follow, 70)
        assert isinstance(end, Result), f"{end!r}\n{worker.log.read_text()[-4000:]}"
        assert delivery is not None, "the result came without any offer"

        # One offer however often it came (seen live, or on the relay afterwards): one hash, one payment.
        _, feedback, _ = await customer.recover(request["id"])
        offered = offers + [f for f in feedback if f.status == "payment-required"]
        assert {parse_offer(f.content).hash for f in offered} == {delivery.offer.hash}
        # Exactly one result; K in it opens the sealed result, and so does K from the mint.
        results = await customer.pool.query([{"kinds": [RESULT_KIND], "#e": [request["id"]]}], 3)
        assert len(results) == 1, results
        preimage = bytes.fromhex(result_json(end)["pay_on_delivery"]["preimage"])
        assert htlc_hash(preimage) == delivery.offer.hash
        assert result_json(open_delivery(delivery, preimage, customer.keys))["words"] == 11
        result = await customer.await_delivery(delivery, customer.wallet, timeout=10)
        assert result_json(result)["words"] == 11
        if way == "files":
            saved = await download_artifacts(result, tmp_path / "out", allow_private=True)
            assert list(csv.reader(saved[0].open()))[1] == ["the", "3"]
        # Nothing owed back (no change, no refund), then stop the worker and count every sat.
        assert await claim_nutzaps(customer, 0, timeout=5) == 0
        # The swap may still be going on in the background (the result goes out once the ecash
        # is checked): wait until the worker has counted the payment, then stop it.
        await _payment_settled(worker, request["id"])
        worker.terminate()
        store = sqlite3.connect(worker.dir / "state" / "dvm.sqlite3")
        store.row_factory = sqlite3.Row
        job = store.execute("SELECT state, error FROM jobs WHERE id = ?", (request["id"],)).fetchone()
        assert job["state"] == "succeeded", dict(job)
        delivered = [dict(r) for r in store.execute("SELECT hash FROM deliveries WHERE job_id = ?",
                                                    (request["id"],))]
        assert delivered == [{"hash": delivery.offer.hash}]
        payments = [dict(r) for r in store.execute("SELECT * FROM payments WHERE job_id = ?", (request["id"],))]
        assert len(payments) == 1, payments
        assert payments[0]["state"] == "consumed" and payments[0]["received"] == PRICE, payments
        nutzaps = [r[0] for r in store.execute("SELECT state FROM nutzaps WHERE job_id = ?", (request["id"],))]
        assert "used" in nutzaps and "pending" not in nutzaps, nutzaps
        assert store.execute("SELECT COUNT(*) FROM payouts").fetchone()[0] == 0
        store.close()
        provider = await _provider_balance(worker)
        customer_balance = await customer.wallet.total_balance()
        assert customer_balance + provider == FUNDS, (customer_balance, provider)
        assert provider == PRICE
    finally:
        worker.stop()
        await close_customer(customer)
        if blobs is not None:
            await blobs.stop()


class _CustomerGone(Exception):
    """The customer's process dies here: nothing after it runs."""


@pytest.mark.parametrize("resume", ["nutzap-again", pytest.param("take-back", marks=pytest.mark.slow)])
async def test_a_customer_lost_after_keeping_its_payment_resumes_from_the_kept_token(
        tmp_path, relay, mint, workers, resume):
    """The customer's side dies after `pay_on_delivery` handed the HTLC token to `keep` (stored)
    and before the nutzap went out. Started again with the same keys and wallet directory, it
    reads the offer back from the relay and either sends the kept token again (and gets the
    result) or, never sending it, takes the ecash back after the locktime."""
    lock = 3600 if resume == "nutzap-again" else 20
    worker = await workers.start(mints=[mint.url], prices={"text-stats": PRICE}, delivery_lock_seconds=lock)
    customer = await funded_customer(tmp_path, mint.url, relay.url)
    wallet_dir, kept = customer.wallet.directory, tmp_path / "kept-token"
    request = await customer.submit(KIND, [JobInput(DELIVERY_TEXT, "text")],
                                    {"pay_on_delivery": customer.wallet.p2pk_pubkey}, provider=worker.keys.public_key)
    offer_feedback = await _offered(customer, request)

    def keep(state: dict) -> None:   # called before the swap (its outputs), then with the token
        if "token" in state:
            kept.write_text(state["token"])
            raise _CustomerGone()

    try:
        with pytest.raises(_CustomerGone):
            await customer.pay_on_delivery(request, offer_feedback, customer.wallet, keep=keep, min_lock_seconds=5)
    finally:
        await close_customer(customer)      # its process is gone: relays, wallet, what it held in memory
    await asyncio.sleep(0.5)
    assert not _job_nutzaps(worker, request["id"])                  # nothing reached the DVM...
    assert worker.store.get_job(request["id"]).state == "delivered"  # ...which still waits for it

    again = Customer(customer.keys, [relay.url])
    await again.__aenter__()
    again.wallet = EcashWallet(wallet_dir, [mint.url], p2pk_private_key=customer.keys.private_key)
    try:
        await again.pool.wait_all_connected(10)
        token = kept.read_text()
        # The ecash left the wallet (locked to the offer's hash), and is not spendable there twice.
        assert await again.wallet.total_balance() == FUNDS - PRICE
        request_again, feedback, result = await again.recover(request["id"])
        assert result is None
        offers = [f for f in feedback if f.status == "payment-required"]
        assert len(offers) == 1
        if resume == "nutzap-again":
            offer, terms, _ = await again.check_delivery(request_again, offers[0],
                                                         refund_key=again.wallet.p2pk_pubkey)
            # The nutzap `pay_on_delivery` would have sent, built from the kept token.
            kind, content, tags = build_nutzap(mint.url, list(decode_token(token).proofs), worker.keys.public_key,
                                               zapped_event=request["id"], zapped_kind=KIND,
                                               comment="payment on delivery")
            await again.pool.publish(sign_event(again.keys, kind, content, tags))
            delivery = Delivery(request_again, worker.keys.public_key, offer, token, terms)
            result = await again.await_delivery(delivery, again.wallet, timeout=30)
            assert result_json(result)["words"] == 11
            assert await _state_of(worker, request["id"], "succeeded") == "succeeded"
            assert await again.wallet.total_balance() == FUNDS - PRICE
            assert await redeemed_balance(worker, PRICE) == PRICE   # swapped in the background
        else:
            offer = parse_offer(offers[0].content)
            # Never sent: the job fails unpaid at the offer's deadline, and after the locktime the
            # kept token comes back to the wallet whole.
            assert await _state_of(worker, request["id"], "failed", timeout=30) == "failed"
            await asyncio.sleep(max(0.0, offer.locktime - time.time()) + 1.5)
            back = await again.wallet.reclaim_htlc(token)
            assert back.amount == PRICE
            assert await again.wallet.total_balance() == FUNDS
            assert await worker.cashier.wallet.total_balance() == 0
    finally:
        await again.__aexit__(None, None, None)
        await again.wallet.close()


async def _offered(customer, request: dict, timeout: float = 30.0):
    async for update in customer.updates(request, timeout=timeout):
        assert not isinstance(update, Result), "a result came before any offer"
        assert update.status != "error", update.message
        if update.status == "payment-required":
            return update
    raise AssertionError("no offer")


def _job_nutzaps(worker, job_id: str) -> list[dict]:
    return [dict(r) for r in worker.store.db.execute("SELECT * FROM nutzaps WHERE job_id = ?", (job_id,))]


async def _state_of(worker, job_id: str, want: str, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while worker.store.get_job(job_id).state != want and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    return worker.store.get_job(job_id).state
