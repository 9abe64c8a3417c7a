"""Ecash the worker owes back, under lost answers, mint outages and restarts: it gets back.

A real Nutshell mint (behind a loopback proxy that can lose an answer or refuse connections), a
real relay, an in-process worker. Each case once lost the customer's money:
- a token given back (bid below the price) whose swap answer was lost: no mark, no retry;
- a nutzap locked to the job's key that arrived while the mint was down for longer than the
  worker waits for it: refused, never tried again, spendable by the DVM alone;
- a give-back cut off by a restart: the row stayed `redeeming` and nothing picked it up;
- a paid job resumed after a restart, priced again without its precheck and refused for its
  bid, without a refund;
- two payouts to one key cut off while their proofs were being made: both took the same proofs.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from dvm_core.customer.client import JobFailed, result_json
from dvm_core.payments import cashier as cashier_module
from dvm_core.protocol.ecash import build_nutzap, decode_payment_request
from dvm_core.protocol.events import Keys, sign_event
from dvm_core.protocol.nip90 import JobInput

from ..paying import PRICE, claim_nutzaps, close_customer, funded_customer, paid_worker, provider_balance
from .proxy import DroppingProxy

KIND = 5790


class SwitchProxy(DroppingProxy):
    """A DroppingProxy that can also refuse every connection: the mint is down."""

    down = False

    async def _client(self, reader, writer):
        if self.down:
            writer.transport.abort()
            return
        await super()._client(reader, writer)


@pytest.fixture
async def proxy(mint):
    proxy = await SwitchProxy(mint.url).start()
    yield proxy
    await proxy.close()


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    monkeypatch.setattr(cashier_module, "RETURN_RETRY_SECONDS", 0.5)


async def settled(worker, job_id: str, state: str, timeout: float = 20.0) -> dict:
    for _ in range(int(timeout / 0.1)):
        rows = [dict(r) for r in worker.store.db.execute(
            "SELECT * FROM payments WHERE job_id = ? ORDER BY updated DESC", (job_id,))]
        if rows and rows[0]["state"] == state:
            return rows[0]
        await asyncio.sleep(0.1)
    raise AssertionError(f"payment of {job_id[:12]} not {state}: {rows}")


async def test_a_token_given_back_whose_swap_answer_is_lost_still_goes_back(workers, proxy, relay, tmp_path):
    customer = await funded_customer(tmp_path, proxy.url, relay.url)
    try:
        worker = await paid_worker(workers, proxy)
        before = await customer.wallet.total_balance()
        token = await customer.wallet.send(PRICE, mint=proxy.url, lock_to=worker.cashier.p2pk_pubkey,
                                           refund_to=customer.keys.public_key)
        proxy.drop_answer_to(b"POST /v1/swap")
        request = await customer.submit(KIND, [JobInput("a b", "text")], {}, provider=worker.keys.public_key,
                                        encrypt=None, cashu=token, bid_msats=1000)   # below the price
        with pytest.raises(JobFailed) as failed:
            await customer.result(request, timeout=30)
        assert "your bid was 1000 msats" in failed.value.feedback.message
        assert "sent back to you as a nutzap as soon as its mint answers" in failed.value.feedback.message
        assert proxy.dropped == 1 and await customer.wallet.check_spent(token)
        # The swap had taken place: the retry finds it spent, recovers its outputs (NUT-09) and
        # sends them back.
        row = await settled(worker, request["id"], "refunded")
        assert row["method"] == "returned" and row["received"] == PRICE
        assert await claim_nutzaps(customer, PRICE, timeout=20) == PRICE
        assert await customer.wallet.total_balance() == before
        assert await provider_balance(worker) == 0
    finally:
        await close_customer(customer)


async def test_a_nutzap_paid_while_the_mint_is_down_goes_back_when_it_returns(workers, proxy, relay, tmp_path):
    customer = await funded_customer(tmp_path, proxy.url, relay.url)
    try:
        worker = await paid_worker(workers, proxy, mint_retry_seconds=1.0, payment_timeout=10.0)
        before = await customer.wallet.total_balance()
        request = await customer.submit(KIND, [JobInput("a b", "text")], {}, provider=worker.keys.public_key)
        asked = await anext(customer.updates(request, timeout=20))
        assert asked.status == "payment-required"
        lock = decode_payment_request(asked.content)["nut10"]["d"]   # the job's key: the DVM's alone
        proofs = await customer.wallet.send_proofs(PRICE, proxy.url, lock_to=lock)
        proxy.down = True
        kind, content, tags = build_nutzap(proxy.url, proofs, worker.keys.public_key,
                                           zapped_event=request["id"], zapped_kind=KIND)
        await customer.pool.publish(sign_event(customer.keys, kind, content, tags))
        row = await settled(worker, request["id"], "returning")   # gave up waiting for the mint
        async for update in customer.updates(request, timeout=10):
            if "sends it back to you as a nutzap as soon as the mint answers" in update.message:
                break
        assert await provider_balance(worker) == 0
        proxy.down = False
        row = await settled(worker, request["id"], "refunded")
        assert row["received"] == PRICE
        assert await claim_nutzaps(customer, PRICE, timeout=20) == PRICE
        assert await customer.wallet.total_balance() == before
        with pytest.raises(JobFailed):   # unpaid by its payment timeout: no work done
            await customer.result(request, timeout=30)
        assert await provider_balance(worker) == 0
    finally:
        await close_customer(customer)


async def test_a_give_back_cut_off_by_a_restart_is_finished_after_it(workers, mint, relay, tmp_path):
    """Killed after the token was recorded for giving back, before the mint was asked (the row
    a kill leaves there, written by hand): the restarted worker sends it back."""
    customer = await funded_customer(tmp_path, mint.url, relay.url)
    try:
        keys = Keys.generate()
        worker = await paid_worker(workers, mint, keys=keys, name="w")
        token = await customer.wallet.send(PRICE, mint=mint.url, lock_to=worker.cashier.p2pk_pubkey,
                                           refund_to=customer.keys.public_key)
        info = worker.cashier.wallet.inspect(token)
        job_id = "ab" * 32
        worker.store.record_payment(info.token_id, job_id, customer.keys.public_key, "returned", mint.url,
                                    "sat", PRICE, 0, token, None)
        worker.store.set_payment(info.token_id, "redeeming")
        await worker.stop(grace=0.5)
        before = await customer.wallet.total_balance()
        again = await paid_worker(workers, mint, keys=keys, name="w")
        row = await settled(again, job_id, "refunded")
        assert row["received"] == PRICE
        assert await claim_nutzaps(customer, PRICE, timeout=20) == PRICE
        assert await customer.wallet.total_balance() == before + PRICE
        assert await provider_balance(again) == 0
    finally:
        await close_customer(customer)


def _sized_plugin(refuse: bool = False):
    """Kind 5794, priced by its precheck (2 sat; 10 without it), running for 3 s. `refuse`: the
    plugin as updated while the worker was down, refusing the job's input."""
    from dvm_core import JobInputError, JobKind, hookimpl
    from dvm_core.worker.plugins import plugin_manager

    class Sized:
        @hookimpl
        def register_job_kinds(self, register):
            async def run(ctx, job):
                await asyncio.sleep(3)
                return {"done": True}

            def parse(request):
                if refuse:
                    raise JobInputError("this input is no longer accepted")
                return {"size": None}

            register(JobKind(kind=5794, name="sized", description="priced by its real size", run=run,
                             parse=parse, precheck=lambda ctx, job: dict(job, size=2),
                             price=lambda job: job["size"] if job["size"] is not None else 10,
                             pricing="1 sat per unit of size, at most 10"))

    pm = plugin_manager(only=[])
    pm.register(Sized(), name="sized")
    return pm


@pytest.mark.parametrize("after", ["runs", "refused", "refused-mid-swap"])
async def test_a_paid_job_resumed_after_a_restart_runs_at_its_price_or_is_refunded(
        workers, mint, funded, after):
    """`refused-mid-swap`: the kill came after the swap reached the mint and before the payment
    was marked redeemed (the row left `redeeming`, its swap's mark noted): refused on resume, the
    payment is recovered from its mark and sent back."""
    keys = Keys.generate()
    worker = await workers.start(keys=keys, pm=_sized_plugin(), mints=[mint.url], name="w")
    before = await funded.wallet.total_balance()
    token = await funded.wallet.send(2, mint=mint.url)
    request = await funded.submit(5794, [JobInput("x", "text")], {}, provider=keys.public_key,
                                  cashu=token, bid_msats=2000)
    for _ in range(200):
        job = worker.store.get_job(request["id"])
        if job is not None and job.state == "running":
            break
        await asyncio.sleep(0.05)
    payment = worker.store.payment_for_job(request["id"])
    assert payment["state"] == "redeemed" and payment["swap"]
    if after == "refused-mid-swap":
        worker.store.set_payment(payment["token_id"], "redeeming")
    await worker.stop(grace=0.2)   # an ordinary restart: the running job is queued again
    again = await workers.start(keys=keys, pm=_sized_plugin(refuse=after != "runs"),
                                mints=[mint.url], name="w")
    if after == "runs":   # at the price paid (2), not the unprechecked 10 over the bid
        assert result_json(await funded.result(request, timeout=30)) == {"done": True}
        assert await funded.wallet.total_balance() == before - 2
        assert await provider_balance(again) == 2
    else:
        with pytest.raises(JobFailed) as failed:
            await funded.result(request, timeout=30)
        assert "no longer accepted" in failed.value.feedback.message
        assert ("refunded as a nutzap" if after == "refused" else "is sent back as a nutzap") \
            in failed.value.feedback.message
        assert await claim_nutzaps(funded, 2, timeout=20) == 2
        assert await funded.wallet.total_balance() == before
        assert await provider_balance(again) == 0


async def test_payouts_cut_off_together_never_share_proofs(mint, tmp_path):
    """Two payouts of 3 sat to one key, both `sending` when the worker was killed, the mint had
    made the first's proofs: after the restart they are delivered at once, and each nutzap
    carries proofs of its own (and the wallet's list in memory has no duplicates)."""
    from dvm_core.payments.cashier import Cashier
    from dvm_core.payments.p2pk_keys import load_or_create_p2pk_key
    from dvm_core.payments.wallet import EcashWallet
    from dvm_core.state.store import Store

    provider_keys, customer = Keys.generate(), Keys.generate()
    lock = "02" + customer.public_key
    key = load_or_create_p2pk_key(tmp_path / "p2pk.key")
    store = Store(tmp_path / "store.sqlite3")
    wallet = EcashWallet(tmp_path / "wallet", [mint.url], p2pk_private_key=key)
    await wallet.mint_from_lightning(20, mint.url)
    ids = [store.owe(job_id=job, token_id=None, role="refund", customer=customer.public_key, lock_to=lock,
                     mint=mint.url, unit="sat", amount=3, comment="refund", zapped_kind=KIND)
           for job in ("a" * 64, "b" * 64)]
    for payout_id in ids:
        store.set_payout(payout_id, "sending", lock_to=lock, attempt=True)
    made = await wallet.send_proofs(3, mint.url, lock_to=lock)
    await wallet.close()

    wallet = EcashWallet(tmp_path / "wallet", [mint.url], p2pk_private_key=key)   # the restart
    tasks: list[asyncio.Task] = []

    async def publish(event, role, job_id):
        return True

    async def query(filters, timeout):
        return []

    cashier = Cashier(wallet=wallet, store=store, keys=provider_keys, mints=[mint.url], unit="sat",
                      sign=lambda k, c, t: sign_event(provider_keys, k, c, t), publish=publish, query=query,
                      spawn=lambda coro: tasks.append(asyncio.ensure_future(coro)) or tasks[-1],
                      mint_retry_seconds=5, payment_timeout=5)
    try:
        cashier.start()
        await asyncio.gather(*tasks)
        secrets = [{p["secret"] for p in json.loads(store.payout(i)["proofs"])} for i in ids]
        assert [store.payout(i)["state"] for i in ids] == ["sent", "sent"]
        assert not secrets[0] & secrets[1]
        assert {p["secret"] for p in made} in secrets   # the proofs made before the kill: used
        proofs = wallet._wallets[mint.url].proofs
        assert len(proofs) == len({p.secret for p in proofs})
        assert await wallet.total_balance() == 20 - 6
    finally:
        await wallet.close()
        store.close()


def test_the_payment_of_a_job_is_never_a_token_being_sent_back(tmp_path):
    """A token given back (method `returned`) can be refunded by its retries long after a later
    payment for the same job began: the job's payment is the later one, whatever the times."""
    from dvm_core.state.store import Store
    store = Store(tmp_path / "store.sqlite3")
    try:
        job = "cd" * 32
        store.record_payment("t1", job, "customer", "returned", "http://mint", "sat", 5, 0, "token-1")
        store.set_payment("t1", "returning")
        store.record_payment("t2", job, "customer", "nutzap", "http://mint", "sat", 5, 5, "token-2")
        store.set_payment("t2", "redeeming")
        store.set_payment("t1", "refunded", received=5)   # the retry ends after t2 began
        assert store.payment_for_job(job)["token_id"] == "t2"
        assert [r["token_id"] for r in store.payments_to_return()] == []
        store.set_payment("t2", "rejected")
        assert store.payment_for_job(job)["token_id"] == "t2"
        assert store.payment_for_job("ef" * 32) is None
        only = "ab" * 32
        store.record_payment("t3", only, "customer", "returned", "http://mint", "sat", 5, 0, "token-3")
        assert store.payment_for_job(only)["token_id"] == "t3"   # nothing else: that one
        assert [r["token_id"] for r in store.payments_to_return()] == ["t3"]
    finally:
        store.close()


async def test_proofs_copied_out_of_a_nutzap_leave_the_rest_to_go_back(workers, mint, relay, tmp_path):
    """Someone copies one proof of a customer's nutzap (public, locked to the job's key) into a
    nutzap of his own for that job and gets it to the DVM first: too little to pay, it goes
    back to the job's customer. The customer's nutzap is then spent in part: the rest, still
    unspent (NUT-07), goes back as well. Nothing to the copier, nothing left stranded."""
    customer = await funded_customer(tmp_path, mint.url, relay.url)
    try:
        worker = await paid_worker(workers, mint, payment_timeout=6.0)
        before = await customer.wallet.total_balance()
        request = await customer.submit(KIND, [JobInput("a b", "text")], {}, provider=worker.keys.public_key)
        asked = await anext(customer.updates(request, timeout=20))
        lock = decode_payment_request(asked.content)["nut10"]["d"]
        proofs = await customer.wallet.send_proofs(PRICE, mint.url, lock_to=lock)
        assert len(proofs) >= 2
        copier = Keys.generate()
        kind, content, tags = build_nutzap(mint.url, proofs[:1], worker.keys.public_key,
                                           zapped_event=request["id"], zapped_kind=KIND)
        await customer.pool.publish(sign_event(copier, kind, content, tags))
        for _ in range(100):
            rows = list(worker.store.db.execute("SELECT state FROM payments WHERE job_id = ?", (request["id"],)))
            if rows and rows[0][0] == "refunded":
                break
            await asyncio.sleep(0.1)
        kind, content, tags = build_nutzap(mint.url, proofs, worker.keys.public_key,
                                           zapped_event=request["id"], zapped_kind=KIND)
        await customer.pool.publish(sign_event(customer.keys, kind, content, tags))
        with pytest.raises(JobFailed):   # never paid in full: no work
            await customer.result(request, timeout=30)
        assert await claim_nutzaps(customer, PRICE, timeout=20) == PRICE
        assert await customer.wallet.total_balance() == before
        assert await provider_balance(worker) == 0
        states = [r[0] for r in worker.store.db.execute(
            "SELECT state FROM payments WHERE job_id = ?", (request["id"],))]
        assert sorted(states) == ["refunded", "refunded"], states
    finally:
        await close_customer(customer)
