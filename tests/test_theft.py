"""Attacks on the worker's money, end to end through a real relay and a real Nutshell mint.

The attacker reads every public event at once (requests, their tags, nutzaps and their proofs),
publishes his own requests and nutzaps to the same relays, and wins every race: here his copy is
always handled before the victim's original. After each attack the attacker holds exactly what
he started with, and the victim has the job or the money back.
"""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from dvm_core.customer.client import JobFailed, result_json
from dvm_core.protocol.ecash import NUTZAP_INFO_KIND, build_nutzap, decode_payment_request, decode_token
from dvm_core.protocol.events import Keys, sign_event
from dvm_core.protocol.nip90 import JobInput

from .paying import FUNDS, PRICE, paid_worker, provider_balance

KIND = 5790
TEXT = [JobInput("pay me in ecash", "text")]


@pytest.fixture
async def victim(funded_customers):
    return await funded_customers()


@pytest.fixture
async def attacker(funded_customers):
    return await funded_customers()


def nutzap_of(sender, proofs: list[dict], mint_url: str, recipient: str, job_id: str) -> dict:
    kind, content, tags = build_nutzap(mint_url, proofs, recipient, zapped_event=job_id, zapped_kind=KIND)
    return sign_event(sender.keys, kind, content, tags)


async def error_of(customer, request: dict, timeout: float = 20.0) -> str:
    with pytest.raises(JobFailed) as caught:
        await customer.result(request, timeout=timeout)
    return caught.value.feedback.message


async def attacker_got_nothing(attacker) -> None:
    """Nothing came to the attacker, and his own wallet is as it was."""
    await asyncio.sleep(1.0)   # time for any nutzap the worker would (wrongly) send
    zaps = await attacker.nutzaps_received(timeout=2)
    assert sum(decode_token(z.token()).amount for z in zaps) == 0, zaps
    assert await attacker.wallet.total_balance() == FUNDS


async def asked_to_pay(customer, request: dict):
    updates = customer.updates(request, timeout=20)
    update = await anext(updates)
    assert update.status == "payment-required", update
    return update


# -- 1. a locked token copied into someone else's request -------------------------------------

@pytest.mark.parametrize("bid", [None, 0], ids=["cheap-job", "bid-0"])
async def test_a_locked_token_copied_into_the_attackers_public_request_pays_nothing(
        workers, mint, victim, attacker, bid):
    worker = await paid_worker(workers, mint)
    token = await victim.wallet.send(PRICE, mint=mint.url, lock_to=worker.cashier.p2pk_pubkey,
                                     refund_to=victim.keys.public_key)
    # The attacker's copy is handled first.
    stolen = await attacker.submit(KIND, TEXT, {}, provider=worker.keys.public_key, encrypt=None,
                                   cashu=token, bid_msats=bid)
    assert "not redeemed" in await error_of(attacker, stolen)
    assert worker.store.outgoing_for_job(stolen["id"], "result") is None
    # The victim's own request still gets the job.
    request = await victim.submit(KIND, TEXT, {}, provider=worker.keys.public_key, encrypt=None, cashu=token)
    assert result_json(await victim.result(request, timeout=30))["words"] == 4
    assert await provider_balance(worker) == PRICE
    await attacker_got_nothing(attacker)


async def test_a_locked_token_copied_into_the_attackers_encrypted_request_pays_nothing(
        workers, mint, victim, attacker):
    worker = await paid_worker(workers, mint)
    token = await victim.wallet.send(PRICE, mint=mint.url, lock_to=worker.cashier.p2pk_pubkey,
                                     refund_to=victim.keys.public_key)
    stolen = await attacker.submit(KIND, TEXT, {}, provider=worker.keys.public_key, cashu=token)
    assert "refund key is not a key of this request's author" in await error_of(attacker, stolen)
    request = await victim.submit(KIND, TEXT, {}, provider=worker.keys.public_key, encrypt=None, cashu=token)
    assert result_json(await victim.result(request, timeout=30))["words"] == 4
    await attacker_got_nothing(attacker)


async def test_a_lock_that_names_no_payer_is_refused_for_everyone_and_redeemed_by_no_one(
        workers, mint, victim, attacker):
    """A stock NIP-61 lock to the DVM's key says nothing about whose it is: nobody's job is paid
    with it and the DVM does not redeem it (so nobody can be paid back with it either)."""
    worker = await paid_worker(workers, mint)
    token = await victim.wallet.send(PRICE, mint=mint.url, lock_to=worker.cashier.p2pk_pubkey)
    stolen = await attacker.submit(KIND, TEXT, {}, provider=worker.keys.public_key, encrypt=None, cashu=token)
    assert "names no refund key of yours" in await error_of(attacker, stolen)
    assert await victim.wallet.check_spent(token) is False
    await attacker_got_nothing(attacker)
    assert await provider_balance(worker) == 0


# -- 1. proofs copied out of the victim's nutzap ------------------------------------------------

async def test_proofs_copied_out_of_a_nutzap_pay_only_the_job_they_were_made_for(
        workers, mint, victim, attacker):
    worker = await paid_worker(workers, mint)
    request = await victim.submit(KIND, TEXT, {}, provider=worker.keys.public_key)
    asked = await asked_to_pay(victim, request)
    theirs = await attacker.submit(KIND, [JobInput("mine", "text")], {}, provider=worker.keys.public_key)
    await asked_to_pay(attacker, theirs)
    # The victim's proofs, locked to the key of the victim's job as its payment request asks...
    lock = decode_payment_request(asked.content)["nut10"]["d"]
    proofs = list(decode_token(await victim.wallet.send(PRICE, mint=mint.url, lock_to=lock)).proofs)
    # ...copied by the attacker into his own nutzap for his own waiting job, before the original.
    await attacker.pool.publish(nutzap_of(attacker, proofs, mint.url, worker.keys.public_key, theirs["id"]))
    # They pay the job they were made for, not the attacker's.
    assert result_json(await victim.result(request, timeout=30))["words"] == 4
    await victim.pool.publish(nutzap_of(victim, proofs, mint.url, worker.keys.public_key, request["id"]))
    await asyncio.sleep(1.0)
    job = worker.store.get_job(theirs["id"])
    assert job.state == "payment-required" and worker.store.payment_for_job(theirs["id"]) is None
    assert await provider_balance(worker) == PRICE
    await attacker_got_nothing(attacker)


async def test_proofs_copied_into_a_nutzap_for_no_waiting_job_are_not_returned_to_the_copier(
        workers, mint, victim, attacker):
    worker = await paid_worker(workers, mint)
    token = await victim.wallet.send(PRICE, mint=mint.url, lock_to=worker.cashier.p2pk_pubkey,
                                     refund_to=victim.keys.public_key)
    proofs = list(decode_token(token).proofs)
    for job_id in (os.urandom(32).hex(), None):   # an unknown job, and a job paid already
        if job_id is None:
            paid = await victim.submit(KIND, TEXT, {}, provider=worker.keys.public_key,
                                       cashu=await victim.wallet.send(PRICE, mint=mint.url))
            await victim.result(paid, timeout=30)
            job_id = paid["id"]
        await attacker.pool.publish(nutzap_of(attacker, proofs, mint.url, worker.keys.public_key, job_id))
    await attacker_got_nothing(attacker)
    # The token is untouched: the victim's own request still spends it on a job.
    assert await victim.wallet.check_spent(token) is False
    request = await victim.submit(KIND, TEXT, {}, provider=worker.keys.public_key, encrypt=None, cashu=token)
    assert result_json(await victim.result(request, timeout=30))["words"] == 4


# -- 2. a stranger cannot end a customer's job -------------------------------------------------

async def test_a_strangers_bad_nutzap_does_not_end_a_job_that_waits_for_payment(
        workers, mint, victim, attacker):
    worker = await paid_worker(workers, mint)
    request = await victim.submit(KIND, TEXT, {}, provider=worker.keys.public_key)
    asked = await asked_to_pay(victim, request)
    junk = await attacker.wallet.send(1, mint=mint.url, lock_to=worker.cashier.p2pk_pubkey)
    await attacker.pool.publish(nutzap_of(attacker, list(decode_token(junk).proofs), mint.url,
                                          worker.keys.public_key, request["id"]))
    await asyncio.sleep(1.0)
    assert worker.store.get_job(request["id"]).state == "payment-required"
    await victim.pay_with_nutzap(request, asked, victim.wallet)
    assert result_json(await victim.result(request, timeout=30))["words"] == 4
    assert await provider_balance(worker) == PRICE


# -- 3. money goes back to a key the customer chose, not one a relay chose ---------------------

async def test_a_kind_10019_signed_by_someone_else_is_never_used_for_a_refund(tmp_path, mint):
    """A relay may answer a query for the victim's kind 10019 with anyone's event: only one
    signed by the victim counts."""
    from dvm_core.payments.cashier import Cashier
    from dvm_core.state.store import Store
    from dvm_core.payments.wallet import EcashWallet
    victim_keys, attacker_keys = Keys.generate(), Keys.generate()
    forged = sign_event(attacker_keys, NUTZAP_INFO_KIND, "", [["pubkey", "02" + attacker_keys.public_key]])
    forged_for_victim = dict(forged)
    forged_for_victim["pubkey"] = victim_keys.public_key   # a lying relay's answer

    async def lying_query(filters, timeout):
        return [forged, forged_for_victim]

    wallet = EcashWallet(tmp_path / "w", [mint.url], p2pk_private_key=Keys.generate().private_key)
    cashier = Cashier(wallet=wallet, store=Store(":memory:"), keys=Keys.generate(), mints=[mint.url],
                      unit="sat", sign=None, publish=None, query=lying_query, spawn=None,
                      mint_retry_seconds=1, payment_timeout=1)
    try:
        assert await cashier._customer_lock(victim_keys.public_key) == "02" + victim_keys.public_key
    finally:
        await wallet.close()


# -- 8. a request dated in the future ---------------------------------------------------------

async def test_a_request_dated_in_the_future_does_not_blind_the_worker(workers, mint, victim, attacker):
    worker = await paid_worker(workers, mint)
    kind, content, tags = 5790, "", [["i", "from the future", "text"], ["p", worker.keys.public_key]]
    future = sign_event(attacker.keys, kind, content, tags, created_at=int(time.time()) + 3600)
    await attacker.pool.publish(future)
    await asyncio.sleep(1.0)
    assert worker.store.get_job(future["id"]) is None
    now = time.time()
    assert worker.intake.request_filters()[0]["since"] <= now
    assert worker.intake.nutzap_filters()[0]["since"] <= now
    # The worker still sees requests of the present.
    request = await victim.submit(KIND, TEXT, {}, provider=worker.keys.public_key,
                                  cashu=await victim.wallet.send(PRICE, mint=mint.url))
    assert result_json(await victim.result(request, timeout=30))["words"] == 4


def test_nutzaps_for_requests_never_seen_are_kept_only_so_many(tmp_path, monkeypatch):
    """Anyone can make nutzaps locked to the key of a job id this DVM never saw (the proofs need
    not even be real: nothing is redeemed before the request comes). Only so many are kept, and
    those older than the payment time-out are forgotten at the next start."""
    import json as jsonlib
    from types import SimpleNamespace
    import os
    import time as timelib

    from dvm_core.payments import cashier as payments
    from dvm_core.payments.locks import job_lock_pubkey
    from dvm_core.payments.cashier import Cashier
    from dvm_core.state.store import Store
    from dvm_core.payments.wallet import EcashWallet
    monkeypatch.setattr(payments, "MAX_PENDING_FOR_UNKNOWN_JOBS", 3)
    dvm = Keys.generate()
    wallet = EcashWallet(tmp_path / "w", ["http://127.0.0.1:9"], p2pk_private_key=Keys.generate().private_key)
    store = Store(tmp_path / "dvm.sqlite3")
    cashier = Cashier(wallet=wallet, store=store, keys=dvm, mints=["http://127.0.0.1:9"], unit="sat",
                      sign=None, publish=None, query=None, spawn=lambda coro: coro.close(),
                      mint_retry_seconds=1, payment_timeout=60)
    spammer = Keys.generate()
    for _ in range(10):
        job_id = os.urandom(32).hex()
        secret = jsonlib.dumps(["P2PK", {"nonce": os.urandom(16).hex(),
                                         "data": job_lock_pubkey(wallet.p2pk_pubkey, job_id), "tags": []}])
        proof = {"id": "00" * 8, "amount": 1, "secret": secret, "C": "02" + "11" * 32}
        cashier.on_nutzap(nutzap_of(SimpleNamespace(keys=spammer), [proof], "http://127.0.0.1:9", dvm.public_key, job_id))
    assert store.count_pending_nutzaps(unknown_jobs=True) == 3
    store.db.execute("UPDATE nutzaps SET created = ?", (timelib.time() - 3600,))
    cashier.start()
    assert store.count_pending_nutzaps() == 0
    store.close()
