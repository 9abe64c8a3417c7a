"""Paying for jobs in ecash, end to end through a real relay and a real Nutshell mint.

Every test checks balances on both sides: the provider never works unpaid, the customer never
loses a sat.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from dvm_core.customer.client import JobFailed, result_json
from dvm_core.protocol.ecash import decode_payment_request
from dvm_core.protocol.events import Keys
from dvm_core.protocol.nip90 import JobInput

from .paying import PRICE, claim_nutzaps, paid_worker, provider_balance

KIND = 5790
TEXT = [JobInput("pay me in ecash", "text")]


async def test_token_in_encrypted_params_pays_for_the_job(workers, mint, funded):
    worker = await paid_worker(workers, mint)
    token = await funded.wallet.send(PRICE, mint=mint.url)
    before = await funded.wallet.total_balance()
    request = await funded.submit(KIND, TEXT, {}, provider=worker.keys.public_key, cashu=token)
    feedback = []
    result = await funded.result(request, timeout=30, on_feedback=feedback.append)
    assert result_json(result)["words"] == 4
    assert any(f"paid {PRICE} sat" in f.message for f in feedback)
    assert await provider_balance(worker) == PRICE
    assert await funded.wallet.total_balance() == before  # the token had left it already
    assert worker.store.payment_for_job(request["id"])["state"] == "consumed"


async def test_p2pk_locked_token_in_a_public_request(workers, mint, funded):
    """Locked to the DVM with the author's key as NUT-11 refund key: the lock says whose it is."""
    worker = await paid_worker(workers, mint)
    token = await funded.wallet.send(PRICE, mint=mint.url, lock_to=worker.cashier.p2pk_pubkey,
                                     refund_to=funded.keys.public_key)
    request = await funded.submit(KIND, TEXT, {}, provider=worker.keys.public_key, encrypt=None, cashu=token)
    feedback = []
    await funded.result(request, timeout=30, on_feedback=feedback.append)
    assert not any("warning" in f.message for f in feedback)
    assert await provider_balance(worker) == PRICE
    payment = worker.store.payment_for_job(request["id"])
    assert payment["method"] == "p2pk" and payment["refund_to"] == "02" + funded.keys.public_key


async def test_no_token_gets_payment_required_then_a_nutzap_pays(workers, mint, funded):
    worker = await paid_worker(workers, mint)
    start = await funded.wallet.total_balance()
    request = await funded.submit(KIND, TEXT, {}, provider=worker.keys.public_key)
    async for update in funded.updates(request, timeout=20):
        assert update.status == "payment-required", update
        break
    assert update.amount_msats == PRICE * 1000
    creq = decode_payment_request(update.content)
    # The lock asked for is this job's own key: derived from the wallet key and the job id, so
    # ecash made for this job can pay no other.
    from dvm_core.payments.locks import job_lock_pubkey
    assert creq["a"] == PRICE and creq["m"] == [mint.url]
    assert creq["nut10"]["d"] == job_lock_pubkey(worker.cashier.p2pk_pubkey, request["id"])
    assert creq["nut10"]["d"][2:] not in (worker.keys.public_key, worker.cashier.p2pk_pubkey[2:])
    await funded.pay_with_nutzap(request, update, funded.wallet)
    result = await funded.result(request, timeout=30)
    assert result_json(result)["words"] == 4
    assert await provider_balance(worker) == PRICE
    assert await funded.wallet.total_balance() == start - PRICE


async def test_unlocked_token_in_a_public_tag_is_refused_and_left_alone(workers, mint, funded):
    """Anyone reading the relay could take a plain token from a public tag: so the DVM does not."""
    worker = await paid_worker(workers, mint)
    token = await funded.wallet.send(PRICE, mint=mint.url)
    request = await funded.submit(KIND, TEXT, {}, provider=worker.keys.public_key, encrypt=None, cashu=token)
    with pytest.raises(JobFailed, match="anyone reading the relay can take it; this DVM did not redeem it"):
        await funded.result(request, timeout=30)
    assert await provider_balance(worker) == 0
    assert await funded.wallet.check_spent(token) is False


async def test_bid_below_the_price_is_refused_before_any_work(workers, mint, funded):
    worker = await paid_worker(workers, mint)
    token = await funded.wallet.send(PRICE, mint=mint.url)
    request = await funded.submit(KIND, TEXT, {}, provider=worker.keys.public_key, cashu=token,
                                  bid_msats=PRICE * 1000 - 1)
    with pytest.raises(JobFailed, match=f"price of this job is {PRICE} sat \\({PRICE * 1000} msats\\)"):
        await funded.result(request, timeout=20)
    assert await provider_balance(worker) == 0
    assert await funded.wallet.check_spent(token) is False


async def test_overpayment_comes_back_as_change(workers, mint, funded):
    worker = await paid_worker(workers, mint)
    before = await funded.wallet.total_balance()
    token = await funded.wallet.send(PRICE + 3, mint=mint.url)
    request = await funded.submit(KIND, TEXT, {}, provider=worker.keys.public_key, cashu=token)
    await funded.result(request, timeout=30)
    assert await claim_nutzaps(funded, 3) == 3
    assert await funded.wallet.total_balance() == before - PRICE
    assert await provider_balance(worker) == PRICE


async def test_same_token_twice_the_second_request_gets_a_clear_error(workers, mint, funded):
    worker = await paid_worker(workers, mint)
    token = await funded.wallet.send(PRICE, mint=mint.url)
    first = await funded.submit(KIND, TEXT, {}, provider=worker.keys.public_key, cashu=token)
    await funded.result(first, timeout=30)
    second = await funded.submit(KIND, [JobInput("again", "text")], {}, provider=worker.keys.public_key,
                                 cashu=token)
    with pytest.raises(JobFailed, match="already paid for job"):
        await funded.result(second, timeout=20)
    assert await provider_balance(worker) == PRICE


def _crashing_plugin():
    from dvm_core import JobKind, hookimpl

    class Crash:
        @hookimpl
        def register_job_kinds(self, register):
            def run(ctx, job):
                raise RuntimeError("boom")
            register(JobKind(kind=5791, name="crash", description="always fails", run=run))
    return Crash()


async def test_plugin_crash_after_payment_is_refunded(workers, mint, funded):
    from dvm_core.worker.plugins import plugin_manager
    pm = plugin_manager(only=[])
    pm.register(_crashing_plugin(), name="crash")
    worker = await workers.start(pm=pm, mints=[mint.url], prices={"crash": PRICE})
    before = await funded.wallet.total_balance()
    token = await funded.wallet.send(PRICE, mint=mint.url)
    request = await funded.submit(5791, TEXT, {}, provider=worker.keys.public_key, cashu=token)
    with pytest.raises(JobFailed, match="refunded"):
        await funded.result(request, timeout=30)
    assert await claim_nutzaps(funded, PRICE) == PRICE
    assert await funded.wallet.total_balance() == before
    assert await provider_balance(worker) == 0
    assert worker.store.payment_for_job(request["id"])["state"] == "refunded"


async def test_time_out_after_payment_is_refunded(workers, mint, funded):
    worker = await paid_worker(workers, mint, job_time_limit=1.0)
    before = await funded.wallet.total_balance()
    token = await funded.wallet.send(PRICE, mint=mint.url)
    request = await funded.submit(KIND, TEXT, {"work_seconds": "30"}, provider=worker.keys.public_key, cashu=token)
    with pytest.raises(JobFailed, match="time limit"):
        await funded.result(request, timeout=30)
    assert await claim_nutzaps(funded, PRICE) == PRICE
    assert await funded.wallet.total_balance() == before


async def test_restart_between_payment_and_start_runs_without_asking_again(workers, mint, funded):
    keys = Keys.generate()
    worker = await paid_worker(workers, mint, keys=keys, name="p")
    blocker = await funded.submit(KIND, TEXT, {"work_seconds": "3"}, provider=keys.public_key,
                                  cashu=await funded.wallet.send(PRICE, mint=mint.url))
    target = await funded.submit(KIND, [JobInput("queued behind", "text")], {}, provider=keys.public_key,
                                 cashu=await funded.wallet.send(PRICE, mint=mint.url))
    for _ in range(100):
        row = worker.store.get_job(target["id"])
        if row and row.state == "queued":
            break
        await asyncio.sleep(0.1)
    assert worker.store.payment_for_job(target["id"])["state"] == "redeemed"
    await worker.stop(grace=0.1)  # the paid, queued job goes back to the queue in the store
    workers.workers.remove(worker)
    again = await paid_worker(workers, mint, keys=keys, name="p")
    feedback = []
    result = await funded.result(target, timeout=30, on_feedback=feedback.append)
    assert result_json(result)["words"] == 2
    assert not any(f.status == "payment-required" for f in feedback)
    await funded.result(blocker, timeout=30)
    assert await provider_balance(again) == 2 * PRICE  # each job paid once


def _per_word_plugin(announce: bool):
    """A kind of its own (5792), priced one sat per word by a price_job hook; with `announce`
    its JobKind says so (JobKind.pricing), as the NIP-89 announcement then does."""
    from dvm_core import JobKind, hookimpl

    class PerWord:
        @hookimpl
        def register_job_kinds(self, register):
            register(JobKind(kind=5792, name="per-word", description="counts words, a sat each",
                             run=lambda ctx, job: {"words": len(job.inputs[0].data.split())},
                             pricing="1 sat per word" if announce else None))

        @hookimpl
        def price_job(self, job_kind, job):
            if job_kind.name == "per-word":
                return len(job.inputs[0].data.split())  # one sat per word
    return PerWord()


async def test_a_plugin_prices_by_work_through_the_price_job_hook(workers, mint, funded):
    from dvm_core.worker.plugins import plugin_manager
    pm = plugin_manager(only=["textstats"])
    pm.register(_per_word_plugin(announce=True), name="per-word")
    worker = await workers.start(pm=pm, mints=[mint.url], prices={"per-word": 1})
    request = await funded.submit(5792, TEXT, {}, provider=worker.keys.public_key)
    async for update in funded.updates(request, timeout=20):
        break
    assert update.status == "payment-required" and update.amount_msats == 4 * 1000
    await funded.pay_with_nutzap(request, update, funded.wallet)
    await funded.result(request, timeout=30)
    assert await provider_balance(worker) == 4


async def test_a_plugin_price_the_kind_does_not_announce_is_not_asked(workers, mint, funded):
    """The announcement says 1 sat per job: a hook's other price would make the customer pay
    what was not announced, so the announced price is asked."""
    from dvm_core.worker.plugins import plugin_manager
    pm = plugin_manager(only=["textstats"])
    pm.register(_per_word_plugin(announce=False), name="per-word")
    worker = await workers.start(pm=pm, mints=[mint.url], prices={"per-word": 1})
    request = await funded.submit(5792, TEXT, {}, provider=worker.keys.public_key)
    async for update in funded.updates(request, timeout=20):
        break
    assert update.status == "payment-required" and update.amount_msats == 1000
    await funded.pay_with_nutzap(request, update, funded.wallet)
    assert result_json(await funded.result(request, timeout=30))["words"] == 4


async def test_a_free_kind_asks_for_nothing(workers, mint, funded):
    worker = await workers.start(mints=[mint.url], prices={"text-stats": 0})
    request = await funded.submit(KIND, TEXT, {}, provider=worker.keys.public_key)
    feedback = []
    await funded.result(request, timeout=20, on_feedback=feedback.append)
    assert [f.status for f in feedback][:1] == ["processing"]
    assert worker.store.payment_for_job(request["id"]) is None


async def test_a_worker_without_mints_serves_plugin_priced_kinds_free(workers, customer):
    from dvm_core import hookimpl
    from dvm_core.worker.plugins import plugin_manager

    class AlwaysCharges:
        @hookimpl
        def price_job(self, job_kind):
            return 7

    pm = plugin_manager(only=["textstats"])
    pm.register(AlwaysCharges(), name="always-charges")
    worker = await workers.start(pm=pm)
    request = await customer.submit(KIND, TEXT, {}, provider=worker.keys.public_key)
    feedback = []
    result = await customer.result(request, timeout=20, on_feedback=feedback.append)
    assert result_json(result)["words"] == 4
    assert not any(f.status == "payment-required" for f in feedback)


async def test_a_token_as_param_cashu_in_the_encrypted_params_pays(workers, mint, funded):
    """What other clients send: ["param", "cashu", token] inside the encrypted params."""
    worker = await paid_worker(workers, mint)
    token = await funded.wallet.send(PRICE, mint=mint.url)
    request = await funded.submit(KIND, TEXT, {"cashu": token}, provider=worker.keys.public_key)
    assert result_json(await funded.result(request, timeout=30))["words"] == 4
    assert await provider_balance(worker) == PRICE
    assert worker.store.payment_for_job(request["id"])["method"] == "encrypted"


async def test_a_bid_below_the_price_gets_the_price_in_an_amount_tag(workers, mint, funded):
    worker = await paid_worker(workers, mint)
    request = await funded.submit(KIND, TEXT, {}, provider=worker.keys.public_key, bid_msats=1000)
    with pytest.raises(JobFailed) as caught:
        await funded.result(request, timeout=20)
    assert caught.value.feedback.amount_msats == PRICE * 1000


async def test_overpayment_says_the_change_is_on_its_way(workers, mint, funded):
    worker = await paid_worker(workers, mint)
    request = await funded.submit(KIND, TEXT, {}, provider=worker.keys.public_key,
                                  cashu=await funded.wallet.send(PRICE + 3, mint=mint.url))
    feedback = []
    await funded.result(request, timeout=30, on_feedback=feedback.append)
    assert any(f"paid {PRICE} sat" in f.message and "3 sat of change is on its way" in f.message
               for f in feedback), [f.message for f in feedback]


def test_every_kind_announces_how_it_is_priced(tmp_path):
    """The NIP-89 content names a pricing rule for every kind, those priced by work included."""
    from dvm_core.worker.config import load_config
    from dvm_core.worker.plugins import plugin_manager
    from dvm_core.worker.worker import Worker

    from .conftest import write_config
    config = load_config(write_config(tmp_path / "dvm.toml", "ws://127.0.0.1:9", mints=["http://127.0.0.1:9"],
                                      prices={"text-stats": 3}), env={})
    worker = Worker(config, Keys.generate(), plugin_manager())
    try:
        content = json.loads(worker.announcement()[1])
        pricing = content["payment"]["pricing"]
        assert set(pricing) == {k.name for k in worker.kinds.values()}, pricing
        assert pricing["text-stats"] == "3 sat per job"
        assert "per million tokens" in pricing["llm-finetune"]
        assert "per GB merged" in pricing["fedavg"]
        assert "per million sample-epochs" in pricing["image-classifier"]
    finally:
        worker.store.close()
