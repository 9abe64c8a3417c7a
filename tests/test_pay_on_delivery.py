"""Pay on delivery: the provider is paid if and only if the customer gets the result.

The worker seals the result under a key derived from a fresh preimage K and offers it; the
customer pays with ecash HTLC-locked (NUT-14) to sha256(K) and this job's key; the only way
for the provider to redeem it is to show K to the mint, which shows it to the customer (NUT-07).
All through a real relay, a real Nutshell mint and a real Blossom server on loopback.
"""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import json
import time

import httpx
import pytest

from dvm_core.customer.client import (Delivery, PaymentDeclined, download_artifacts,
                                      open_delivery, result_json)
from dvm_core.devtools.blobserver import start_blob_server
from dvm_core.protocol.delivery import parse_offer
from dvm_core.protocol.ecash import build_nutzap, decode_token, htlc_hash
from dvm_core.protocol.events import sign_event
from dvm_core.protocol.nip90 import JobInput, Result

from .paying import FUNDS, PRICE, paid_worker, provider_balance, redeemed_balance

KIND = 5790
TEXT = "the quick brown fox jumps over the lazy dog the end"


@pytest.fixture
async def blobs(tmp_path):
    server = await start_blob_server(tmp_path / "blobs")
    yield server
    await server.stop()


async def delivery_worker(workers, mint, blobs, **settings):
    return await paid_worker(workers, mint, blob_servers=[blobs.url], allow_private_urls=True, **settings)


async def offered(customer, request, timeout: float = 30.0):
    """The pay-on-delivery offer (a payment-required feedback) for `request`."""
    async for update in customer.updates(request, timeout=timeout):
        if isinstance(update, Result):
            raise AssertionError("a result came before any offer")
        if update.status == "payment-required":
            return update
        assert update.status != "error", update.message
    raise AssertionError("no offer")


async def submit(customer, worker, encrypt="nip44"):
    params = {"counts_file": "yes", "pay_on_delivery": customer.wallet.p2pk_pubkey}
    return await customer.submit(KIND, [JobInput(TEXT, "text")], params,
                                 provider=worker.keys.public_key, encrypt=encrypt)


async def job_state(worker, job_id: str, want: str, timeout: float = 20.0) -> str:
    for _ in range(int(timeout / 0.1)):
        state = worker.store.get_job(job_id).state
        if state == want:
            return state
        await asyncio.sleep(0.1)
    return worker.store.get_job(job_id).state


async def public_events(customer, request) -> str:
    """Everything the relay holds about the job, as text."""
    events = await customer.pool.query([{"#e": [request["id"]]}], 3.0)
    return json.dumps(events)


@pytest.mark.parametrize("encrypt", ["nip44", None])
async def test_a_job_paid_on_delivery_end_to_end(workers, mint, blobs, funded, tmp_path, encrypt):
    worker = await delivery_worker(workers, mint, blobs)
    request = await submit(funded, worker, encrypt)
    offer_feedback = await offered(funded, request)
    # Nothing was paid before the work: the result is ready, sealed, and offered.
    assert await funded.wallet.total_balance() == FUNDS
    offer = parse_offer(offer_feedback.content)
    assert offer.amount == PRICE and offer_feedback.amount_msats == PRICE * 1000
    assert offer.public["words"] == 11 and len(offer.files) == 1
    async with httpx.AsyncClient() as http:
        stored = (await http.get(offer.files[0]["url"])).content
    assert b"word,count" not in stored            # the file at rest is sealed

    delivery = await funded.pay_on_delivery(request, offer_feedback, funded.wallet, max_price=PRICE)
    result = await funded.await_delivery(delivery, funded.wallet, timeout=30)
    stats = result_json(result)
    assert stats["words"] == 11
    saved = await download_artifacts(result, tmp_path / "out", allow_private=True)
    assert list(csv.reader(saved[0].open()))[1] == ["the", "3"]
    assert await job_state(worker, request["id"], "succeeded") == "succeeded"
    assert await funded.wallet.total_balance() == FUNDS - PRICE
    assert await redeemed_balance(worker, PRICE) == PRICE
    # The result event came too, with K inside (encrypted for a private job).
    _, _, final = await funded.recover(request["id"])
    preimage = bytes.fromhex(result_json(final)["pay_on_delivery"]["preimage"])
    assert htlc_hash(preimage) == offer.hash
    if encrypt:
        assert preimage.hex() not in await public_events(funded, request)


async def test_a_provider_that_redeems_and_goes_silent_still_delivers(workers, mint, blobs, funded, tmp_path):
    worker = await delivery_worker(workers, mint, blobs)
    sent = worker.outbox.send_stored
    worker.outbox.send_stored = lambda event, role, job_id: None if role == "result" else sent(event, role, job_id)
    request = await submit(funded, worker)
    delivery = await funded.pay_on_delivery(request, await offered(funded, request), funded.wallet)
    assert await job_state(worker, request["id"], "succeeded") == "succeeded"   # it took the money...
    assert '"kind": 6790' not in await public_events(funded, request)           # ...and said nothing
    assert await redeemed_balance(worker, PRICE) == PRICE   # swapped in the background, after "succeeded"
    # K from the mint alone (NUT-07: the witness a spent proof was spent with).
    preimage = await funded.wallet.htlc_preimage(delivery.token)
    assert preimage is not None and htlc_hash(preimage) == delivery.offer.hash
    result = await funded.await_delivery(delivery, funded.wallet, timeout=10)
    saved = await download_artifacts(result, tmp_path / "out", allow_private=True)
    assert saved[0].read_text().startswith("word,count")


async def test_a_provider_that_never_redeems_lets_the_customer_take_the_ecash_back(workers, mint, blobs,
                                                                                 funded):
    worker = await delivery_worker(workers, mint, blobs, delivery_lock_seconds=20)
    request = await submit(funded, worker)
    offer_feedback = await offered(funded, request)
    await worker.stop(grace=1.0)      # gone before the payment arrives, never back
    delivery = await funded.pay_on_delivery(request, offer_feedback, funded.wallet, min_lock_seconds=5)
    assert await funded.wallet.total_balance() == FUNDS - PRICE
    with pytest.raises(TimeoutError):
        await funded.await_delivery(delivery, funded.wallet, timeout=3)
    await asyncio.sleep(max(0.0, delivery.terms.locktime - time.time()) + 1.5)
    back = await funded.wallet.reclaim_htlc(delivery.token)
    assert back.amount == PRICE
    assert await funded.wallet.total_balance() == FUNDS


async def test_a_customer_who_never_pays_gets_nothing_decryptable(workers, mint, blobs, funded, tmp_path):
    worker = await delivery_worker(workers, mint, blobs, delivery_lock_seconds=20)
    request = await submit(funded, worker)
    offer = parse_offer((await offered(funded, request)).content)
    row = worker.store.delivery(request["id"])
    preimage = bytes.fromhex(row["preimage"])
    # The offer holds only ciphertext: without K neither the sealed result nor the file opens.
    wrong = Delivery(request, worker.keys.public_key, offer, "", None)
    with pytest.raises(ValueError):
        open_delivery(wrong, b"\x01" * 32, funded.keys)
    async with httpx.AsyncClient() as http:
        stored = (await http.get(offer.files[0]["url"])).content
    assert b"word" not in stored
    # Unpaid, the job fails at the offer's deadline (a quarter of the lock before its end) ...
    with pytest.raises(Exception, match="not paid on delivery"):
        await funded.result(request, timeout=30)
    assert worker.store.get_job(request["id"]).state == "failed"
    # ... and neither K nor the seal key was ever published.
    seen = await public_events(funded, request)
    key = json.loads(row["result"])["artifacts"][0]["key"]
    assert preimage.hex() not in seen and key not in seen and '"kind": 6790' not in seen
    assert await funded.wallet.total_balance() == FUNDS
    assert await provider_balance(worker) == 0


@pytest.mark.parametrize("flaw", ["wrong-hash", "wrong-key", "short-locktime", "too-little", "wrong-refund-key"])
async def test_ecash_that_does_not_match_the_offer_is_refused_before_any_redemption(
        workers, mint, blobs, funded, flaw):
    worker = await delivery_worker(workers, mint, blobs)
    request = await submit(funded, worker)
    offer_feedback = await offered(funded, request)
    offer, terms, creq = await funded.check_delivery(request, offer_feedback,
                                                     refund_key=funded.wallet.p2pk_pubkey)
    amount = PRICE
    if flaw == "wrong-hash":
        terms = dataclasses.replace(terms, hash=htlc_hash(b"\x02" * 32))
    elif flaw == "wrong-key":
        terms = dataclasses.replace(terms, pubkey=worker.cashier.p2pk_pubkey)   # the DVM's, not the job's
    elif flaw == "short-locktime":
        terms = dataclasses.replace(terms, locktime=terms.locktime - 60)
    elif flaw == "too-little":
        amount = PRICE - 1
    elif flaw == "wrong-refund-key":
        terms = dataclasses.replace(terms, refund_key=_other_key())
    token = await funded.wallet.send_htlc(amount, mint.url, terms)
    kind, content, tags = build_nutzap(mint.url, list(decode_token(token).proofs), worker.keys.public_key,
                                       zapped_event=request["id"], zapped_kind=KIND)
    await funded.pool.publish(sign_event(funded.keys, kind, content, tags))
    for _ in range(100):
        if worker.store.payment_for_job(request["id"]) is not None or \
                any(r["state"] != "pending" for r in _nutzaps(worker, request["id"])):
            break
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.5)
    # Nothing was redeemed: every proof is unspent, K is not on the mint, the job still waits.
    states = await _proof_states(funded.wallet, token)
    assert states == {"unspent"}
    assert await funded.wallet.htlc_preimage(token) is None
    assert worker.store.get_job(request["id"]).state == "delivered"
    assert await provider_balance(worker) == 0
    # The real payment still pays.
    delivery = await funded.pay_on_delivery(request, offer_feedback, funded.wallet)
    result = await funded.await_delivery(delivery, funded.wallet, timeout=30)
    assert result_json(result)["words"] == 11


async def test_the_customer_checks_the_offer_before_paying(workers, mint, blobs, funded):
    worker = await delivery_worker(workers, mint, blobs)
    request = await submit(funded, worker)
    offer_feedback = await offered(funded, request)
    with pytest.raises(PaymentDeclined, match="more than your limit"):
        await funded.check_delivery(request, offer_feedback, refund_key=funded.wallet.p2pk_pubkey,
                                    max_price=PRICE - 1)
    with pytest.raises(PaymentDeclined, match="refund key"):
        await funded.check_delivery(request, offer_feedback, refund_key=_other_key())
    with pytest.raises(PaymentDeclined, match="between"):
        await funded.check_delivery(request, offer_feedback, refund_key=funded.wallet.p2pk_pubkey,
                                    max_lock_seconds=60)
    assert await funded.wallet.total_balance() == FUNDS


def _other_key() -> str:
    from dvm_core.protocol.events import Keys
    return "02" + Keys.generate().public_key


def _nutzaps(worker, job_id):
    return [dict(r) for r in worker.store.db.execute("SELECT * FROM nutzaps WHERE job_id = ?", (job_id,))]


async def _proof_states(wallet, token: str) -> set[str]:
    from dvm_core.payments.wallet import _nutshell_proofs, read_token
    info = read_token(token)
    nutshell_wallet = await wallet._online(info.mint)
    states = await nutshell_wallet.check_proof_state(_nutshell_proofs(info))
    return {s.state.name for s in states.states}


async def test_dvm_job_submit_pays_on_delivery(workers, relay, mint, blobs, tmp_path):
    from .test_customer_money import cli_wallet, dvm_submit
    worker = await delivery_worker(workers, mint, blobs)
    wallet = await cli_wallet(tmp_path, mint.url)
    await wallet.close()
    out = tmp_path / "o"
    code, stdout, err = await dvm_submit(relay, worker, wallet, "--pay-on-delivery", "--max-price", str(PRICE),
                                         "--param", "counts_file=yes", "--allow-private", "--json",
                                         "--out", str(out))
    assert code == 0, err
    report = json.loads(stdout.strip().splitlines()[-1])
    assert report["status"] == "succeeded" and report["paid_sat"] == PRICE, report
    assert report["balance_sat"] == FUNDS - PRICE
    assert f"the result is ready: {PRICE} sat on delivery" in err and "1 sealed file(s)" in err
    assert f"paid {PRICE} sat on delivery; got the result and 1 file(s)" in err
    assert [open(f).read().splitlines()[0] for f in report["files"]] == ["word,count"]
    assert (out / "delivery.json").stat().st_mode & 0o777 == 0o600
    assert await redeemed_balance(worker, PRICE) == PRICE


async def test_dvm_job_reclaim_takes_back_what_the_dvm_did_not_redeem(workers, relay, mint, blobs, tmp_path):
    import sys

    from dvm_core.customer.client import Customer
    from dvm_core.protocol.events import Keys

    from .test_customer_money import cli_wallet
    worker = await delivery_worker(workers, mint, blobs, delivery_lock_seconds=20)
    async with Customer(Keys.generate(), [relay.url]) as customer:
        await customer.pool.wait_all_connected(10)
        customer.wallet = await cli_wallet(tmp_path, mint.url)   # its key is in the directory
        request = await submit(customer, worker)
        offer_feedback = await offered(customer, request)
        await worker.stop(grace=1.0)
        token_file = tmp_path / "delivery.json"
        delivery = await customer.pay_on_delivery(request, offer_feedback, customer.wallet, min_lock_seconds=5,
                                                  keep=lambda state: token_file.write_text(json.dumps(state)))
        await customer.wallet.close()
        await asyncio.sleep(max(0.0, delivery.terms.locktime - time.time()) + 1.5)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "dvm_core.cli", "job", "reclaim", str(token_file),
            "--wallet-dir", str(customer.wallet.directory), "--mint", mint.url,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        stdout, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
        assert f"took back {PRICE} sat; balance {FUNDS} sat" in stdout.decode()


async def announced_terms(customer, request, timeout: float = 30.0):
    """The `processing` feedback that accepts a job paid on delivery, with the offer's terms."""
    async for update in customer.updates(request, timeout=timeout):
        assert update.status not in ("error", "payment-required") and not isinstance(update, Result)
        if update.status == "processing" and update.content.startswith("creqA"):
            return update
    raise AssertionError("no terms announced")


@pytest.mark.parametrize("encrypt", ["nip44", None])
async def test_the_ecash_is_made_while_the_job_runs(workers, mint, blobs, funded, tmp_path, encrypt):
    """The acceptance announces the terms the offer will ask for (hash, this job's key, locktime,
    amount): the customer makes the HTLC ecash then (`prepare_delivery`), and once the offer
    comes it sends that ecash without a second swap; the offer's hash and locktime are the
    announced ones, and the result opens as always."""
    worker = await delivery_worker(workers, mint, blobs)
    request = await submit(funded, worker, encrypt)
    accepted = await announced_terms(funded, request)
    states: list[dict] = []
    prepared = await funded.prepare_delivery(request, accepted, funded.wallet, keep=states.append)
    assert prepared is not None and prepared.amount == PRICE
    assert [sorted(s) for s in states] == [["job_id", "prepared", "swap"], ["job_id", "prepared", "swap", "token"]]
    assert await funded.wallet.total_balance() == FUNDS - PRICE     # made, kept here, not sent
    offer_feedback = await offered(funded, request)
    offer = parse_offer(offer_feedback.content)
    assert (offer.hash, offer.locktime) == (prepared.terms.hash, prepared.terms.locktime)
    delivery = await funded.pay_on_delivery(request, offer_feedback, funded.wallet, prepared=prepared)
    assert delivery.token == prepared.token
    assert await funded.wallet.total_balance() == FUNDS - PRICE     # no second swap, nothing more spent
    result = await funded.await_delivery(delivery, funded.wallet, timeout=30)
    assert result_json(result)["words"] == 11
    saved = await download_artifacts(result, tmp_path / "out", allow_private=True)
    assert saved[0].read_text().startswith("word,count")
    assert await redeemed_balance(worker, PRICE) == PRICE
    assert worker.store.get_meta("delivery-lock:" + request["id"]) is None   # K lives in the delivery now


async def test_a_lost_early_swap_is_not_written_over_by_the_next_try(workers, mint, blobs, funded, tmp_path,
                                                                    monkeypatch):
    """The ecash made while the job runs, its mint's answer lost: the record of that swap's
    outputs is the only key to the money. The next try at paying (the offer, `dvm federate`, or
    `dvm job submit` run again with the same --out) writes its own state through the same
    `state_keeper`: the earlier record is moved beside, not written over, and gives the HTLC
    ecash back (NUT-09)."""
    import dvm_core.payments.wallet as wallet_module
    from dvm_core.customer.client import state_keeper
    from dvm_core.payments.wallet_types import PaymentError
    worker = await delivery_worker(workers, mint, blobs)
    request = await submit(funded, worker)
    accepted = await announced_terms(funded, request)
    path, moved = tmp_path / "delivery.json", []
    keep = state_keeper(path, moved.append)
    real = wallet_module._post_swap

    async def answer_lost(c, wallet, inputs, outputs):
        await real(c, wallet, inputs, outputs)
        raise httpx.ReadTimeout("the answer was lost")

    monkeypatch.setattr(wallet_module, "_post_swap", answer_lost)
    with pytest.raises(PaymentError):
        await funded.prepare_delivery(request, accepted, funded.wallet, keep=keep)
    monkeypatch.setattr(wallet_module, "_post_swap", real)
    first = json.loads(path.read_text())
    assert "swap" in first and "token" not in first and moved == []
    with pytest.raises(PaymentError):   # the coins that swap spent are spent: this try fails
        await funded.pay_on_delivery(request, await offered(funded, request), funded.wallet, keep=keep)
    assert moved == [tmp_path / "delivery-1.json"] and json.loads(moved[0].read_text()) == first
    assert json.loads(path.read_text())["swap"] != first["swap"]
    token = await funded.wallet.recover_htlc_send(first["swap"])
    assert decode_token(token).amount == PRICE and await provider_balance(worker) == 0
    # The failed try's own record is moved beside too; the same payment written again with
    # more (the token after its swap, then a mark) stays in place.
    keep({**first, "token": token})
    keep({**first, "token": token, "sent": True})
    assert len(moved) == 2 and json.loads(path.read_text())["sent"]


async def test_ecash_made_for_other_terms_is_kept_for_reclaim(workers, mint, blobs, funded):
    """Ecash made for terms the offer does not ask for (here another job's) is not sent: a new
    one is made, and the payment's state lists the first as unused, for `dvm job reclaim`."""
    worker = await delivery_worker(workers, mint, blobs)
    first, second = await submit(funded, worker), await submit(funded, worker)
    prepared = await funded.prepare_delivery(first, await announced_terms(funded, first), funded.wallet)
    states: list[dict] = []
    delivery = await funded.pay_on_delivery(second, await offered(funded, second), funded.wallet,
                                            prepared=prepared, keep=states.append)
    assert delivery.token != prepared.token
    assert states[-1]["unused_tokens"] == [prepared.token] and states[-1]["token"] == delivery.token
    assert await funded.wallet.total_balance() == FUNDS - 2 * PRICE
    assert result_json(await funded.await_delivery(delivery, funded.wallet, timeout=30))["words"] == 11
