"""The mint performs the swap and its answer is lost: the job runs once and nothing is lost.

A real Nutshell mint behind a loopback proxy that throws away the answer to the worker's swap.
The worker's retry is told "already spent"; it asks the mint for its outputs again (NUT-09
restore, the secrets come from its seed) and counts the payment as made.
"""

from __future__ import annotations

import json
import time

import pytest

from dvm_core.customer.client import result_json
from dvm_core.protocol.ecash import build_nutzap, decode_payment_request, decode_token
from dvm_core.protocol.events import sign_event
from dvm_core.protocol.nip90 import JobInput

from ..paying import PRICE, close_customer, funded_customer, paid_worker, provider_balance
from .proxy import DroppingProxy

KIND = 5790


@pytest.fixture
async def proxy(mint):
    proxy = await DroppingProxy(mint.url).start()
    yield proxy
    await proxy.close()


@pytest.mark.parametrize("mode", ["encrypted", "nutzap"])
async def test_a_swap_whose_answer_is_lost_pays_the_job_once(workers, proxy, relay, tmp_path, mode):
    customer = await funded_customer(tmp_path, proxy.url, relay.url)
    try:
        worker = await paid_worker(workers, proxy)   # the worker knows the mint by the proxy's URL
        before = await customer.wallet.total_balance()
        if mode == "encrypted":
            token = await customer.wallet.send(PRICE, mint=proxy.url)
            proxy.drop_answer_to(b"POST /v1/swap")
            request = await customer.submit(KIND, [JobInput("lost answer", "text")], {},
                                            provider=worker.keys.public_key, cashu=token)
        else:
            request = await customer.submit(KIND, [JobInput("lost answer", "text")], {},
                                            provider=worker.keys.public_key)
            asked = await anext(customer.updates(request, timeout=20))
            assert asked.status == "payment-required"
            creq = decode_payment_request(asked.content)
            token = decode_token(await customer.wallet.send(PRICE, mint=proxy.url, lock_to=creq["nut10"]["d"]))
            proxy.drop_answer_to(b"POST /v1/swap")
            kind, content, tags = build_nutzap(token.mint, list(token.proofs), worker.keys.public_key,
                                               zapped_event=request["id"], zapped_kind=KIND)
            await customer.pool.publish(sign_event(customer.keys, kind, content, tags))
        assert result_json(await customer.result(request, timeout=40))["words"] == 2
        assert proxy.dropped == 1
        assert worker.counts["succeeded"] == 1 and worker.counts["failed"] == 0
        assert worker.store.payment_for_job(request["id"])["state"] == "consumed"
        # The ecash the lost answer carried is back in the provider's wallet.
        assert await provider_balance(worker) == PRICE
        assert await customer.wallet.total_balance() == before - PRICE
    finally:
        await close_customer(customer)


async def test_an_htlc_payment_whose_swap_answer_is_lost_is_recovered(proxy, tmp_path):
    """The customer's side of pay on delivery: the outputs of the swap that locks the ecash have
    random secrets (the seed cannot give them back), so they are handed to `before_swap` before
    the mint is asked; with the mint's answer lost, `recover_htlc_send` gets the HTLC token and
    the change back from the mint (NUT-09). Nothing is lost, nothing is counted twice."""
    import secrets as random

    from dvm_core.payments.p2pk_keys import load_or_create_p2pk_key
    from dvm_core.payments.wallet import EcashWallet
    from dvm_core.payments.wallet_types import PaymentError
    from dvm_core.protocol.ecash import HtlcTerms, htlc_hash
    from dvm_core.protocol.events import Keys

    wallet = EcashWallet(tmp_path / "w", [proxy.url], p2pk_private_key=load_or_create_p2pk_key(tmp_path / "k"))
    try:
        await wallet.mint_from_lightning(100, proxy.url)
        terms = HtlcTerms(htlc_hash(random.token_bytes(32)), "02" + Keys.generate().public_key,
                          int(time.time()) + 3600, wallet.p2pk_pubkey)
        records = []
        proxy.drop_answer_to(b"POST /v1/swap")
        with pytest.raises(PaymentError):
            await wallet.send_htlc(21, proxy.url, terms, before_swap=records.append)
        assert proxy.dropped == 1 and len(records) == 1
        token = await wallet.recover_htlc_send(records[0])
        info = decode_token(token)
        assert info.amount == 21 and all('"HTLC"' in p["secret"] for p in info.proofs)
        assert await wallet.total_balance() == 100 - 21   # the change is back, the inputs are gone
        assert await wallet.recover_htlc_send(records[0]) is not None   # asking again is harmless
        assert await wallet.total_balance() == 100 - 21
        # Killed after noting, before the mint was asked: nothing to recover, the coins are ours.
        records.clear()

        def note_then_die(record):
            records.append(record)
            raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            await wallet.send_htlc(5, proxy.url, terms, before_swap=note_then_die)
        assert await wallet.recover_htlc_send(records[0]) is None
        assert await wallet.total_balance() == 100 - 21
    finally:
        await wallet.close()


async def seed_restore(wallet, mint_url: str, directory) -> int:
    """What a stock Nutshell wallet restores from `wallet`'s seed alone (NUT-13, its default
    batches of 25, stopping after two empty ones), in a database of its own."""
    from dvm_core.payments import nutshell
    c = nutshell.load()
    fresh = await c.Wallet.with_db(mint_url, str(directory), name="restored")
    try:
        await fresh.restore_wallet_from_mnemonic(wallet._wallets[mint_url].mnemonic)
        await fresh.load_proofs(reload=True)
        return sum(p.amount for p in fresh.proofs if not p.reserved)
    finally:
        if fresh.httpx is not None:
            await fresh.httpx.aclose()
        await fresh.db.engine.dispose()


async def test_lost_answers_and_spent_tokens_leave_no_gap_in_the_seed(proxy, mint, tmp_path):
    """Every sat the provider holds can be restored from its wallet's seed by a stock wallet.
    That scan stops at the first wide enough run of unused secrets, so neither a recovered lost
    answer (only that swap's own outputs are skipped) nor anyone's spent tokens (a refused swap's
    secrets are used by the next swap) may leave one."""
    from dvm_core.payments.wallet import COUNTER_BLOCK, EcashWallet
    from dvm_core.payments.wallet_types import PaymentError

    customer = EcashWallet(tmp_path / "customer", [proxy.url])
    provider = EcashWallet(tmp_path / "provider", [proxy.url])
    try:
        await customer.mint_from_lightning(200, proxy.url)
        marks: list[dict] = []
        for _ in range(3):   # three swaps whose answers are lost, each recovered
            token = await customer.send(7, mint=proxy.url)
            proxy.drop_answer_to(b"POST /v1/swap")
            with pytest.raises(PaymentError):
                await provider.receive(token, min_amount=7, before_swap=marks.append)
            with pytest.raises(PaymentError) as spent:
                await provider.receive(token, min_amount=7, before_swap=marks.append,
                                       swap_refused=marks.remove)
            assert spent.value.code == "spent"
            assert await provider.recover_swap(proxy.url, marks) == (True, 7)
            marks.clear()
        assert proxy.dropped == 3
        # A flood of spent tokens (anyone can send them): each swap is refused at the mint.
        spent_token = await customer.send(7, mint=proxy.url)
        await customer.receive(spent_token, min_amount=7)
        refused = []
        for _ in range(20):
            with pytest.raises(PaymentError):
                await provider.receive(spent_token, min_amount=7, before_swap=refused.append,
                                       swap_refused=lambda mark: refused.append(("forgotten", mark)))
        assert len(refused) == 40 and {m["counter"] for m in refused[::2]} == {refused[0]["counter"]}
        assert all(r == ("forgotten", m) for m, r in zip(refused[::2], refused[1::2]))
        # Without a way to forget its mark, a refused swap's secrets are never used again.
        with pytest.raises(PaymentError):
            await provider.receive(spent_token, min_amount=7, before_swap=refused.append)
        after = []
        await provider.receive(await customer.send(7, mint=proxy.url), min_amount=7,
                               before_swap=after.append)
        skipped = after[0]["counter"] - (refused[-1]["counter"] + refused[-1]["outputs"])
        assert 0 <= skipped < COUNTER_BLOCK   # at most the rest of a block of counters
        assert await provider.total_balance() == 28
        assert await seed_restore(provider, proxy.url, tmp_path / "restored") == 28
    finally:
        await customer.close()
        await provider.close()


@pytest.mark.parametrize("cut", ["mint-answer-lost", "no-relay-took-it"])
async def test_a_nutzap_payment_cut_short_is_sent_on_from_its_record(workers, proxy, relay, tmp_path, cut):
    """The customer's side: `pay_with_nutzap` keeps its state (the swap's outputs before the mint
    is asked, then the signed nutzap before it is published). Cut short by a lost answer from the
    mint, or by no relay taking the nutzap, the ecash, locked to the job's key, would be nobody's;
    `resend_payment` (what `dvm job reclaim OUT/payment.json` runs) makes or publishes the nutzap
    from the record, and the job is paid once and runs."""
    from dvm_core.customer.client import state_keeper
    from dvm_core.payments.wallet_types import PaymentError
    customer = await funded_customer(tmp_path, proxy.url, relay.url)
    try:
        worker = await paid_worker(workers, proxy)
        before = await customer.wallet.total_balance()
        request = await customer.submit(KIND, [JobInput("cut short", "text")], {}, provider=worker.keys.public_key)
        asked = await anext(customer.updates(request, timeout=20))
        assert asked.status == "payment-required"
        path = tmp_path / "payment.json"
        if cut == "mint-answer-lost":
            proxy.drop_answer_to(b"POST /v1/swap")
            with pytest.raises(PaymentError):
                await customer.pay_with_nutzap(request, asked, customer.wallet, keep=state_keeper(path))
            assert proxy.dropped == 1
        else:
            publish = customer.pool.publish

            async def nobody_takes_it(event):
                return [] if event["kind"] == 9321 else await publish(event)
            customer.pool.publish = nobody_takes_it
            with pytest.raises(RuntimeError, match="no relay accepted"):
                await customer.pay_with_nutzap(request, asked, customer.wallet, keep=state_keeper(path))
            customer.pool.publish = publish
        state = json.loads(path.read_text())
        assert "swap" in state and not state.get("published")
        assert ("event" in state) == (cut == "no-relay-took-it")
        assert worker.store.payment_for_job(request["id"]) is None   # the DVM has nothing yet
        event = await customer.resend_payment(state, customer.wallet, keep=state_keeper(path))
        assert event is not None and json.loads(path.read_text())["published"]
        assert result_json(await customer.result(request, timeout=30))["words"] == 2
        assert worker.store.payment_for_job(request["id"])["state"] == "consumed"
        assert await provider_balance(worker) == PRICE
        assert await customer.wallet.total_balance() == before - PRICE
    finally:
        await close_customer(customer)


async def test_a_bonus_whose_swap_answer_is_lost_is_sent_on_from_its_record(workers, proxy, relay, tmp_path):
    """`send_bonus` keeps its state like a job's payment: the swap's outputs before the mint is
    asked. The mint's answer lost, the locked share and the change (random secrets, which the
    seed cannot give back) come back from that record alone: `resend_payment` (`dvm job
    reclaim`) publishes the bonus, the provider's operator collects it, and the customer is
    down by the bonus and not a sat more."""
    from dvm_core.customer.client import Customer, state_keeper
    from dvm_core.payments.wallet_types import PaymentError
    customer = await funded_customer(tmp_path, proxy.url, relay.url)
    try:
        worker = await paid_worker(workers, proxy)
        before = await customer.wallet.total_balance()
        path = tmp_path / "bonus.json"
        proxy.drop_answer_to(b"POST /v1/swap")
        with pytest.raises(PaymentError):
            await customer.send_bonus(worker.keys.public_key, 7, customer.wallet, comment="bonus for round 1",
                                      keep=state_keeper(path))
        assert proxy.dropped == 1
        state = json.loads(path.read_text())
        assert state["bonus"] and "swap" in state and not state.get("published")
        event = await customer.resend_payment(state, customer.wallet, keep=state_keeper(path))
        assert event is not None and json.loads(path.read_text())["published"]
        assert not [t for t in event["tags"] if t[0] in ("e", "k")]   # a gift: it tags no job
        assert await customer.wallet.total_balance() == before - 7    # the change came back
        async with Customer(worker.keys, [relay.url]) as operator:
            assert await operator.collect_nutzaps(worker.cashier.wallet, expect=7) == 7
        assert await customer.resend_payment(json.loads(path.read_text()), customer.wallet) is not None
        assert await customer.wallet.total_balance() == before - 7    # sent again: the same proofs
    finally:
        await close_customer(customer)
