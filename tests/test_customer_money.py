"""The customer's money: pay only the DVM you asked, only what it asks and announces, never more
than your cap. Through a real relay and a real Nutshell mint; the impostor signs with its own key
and publishes to the same relay, first.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from dvm_core.customer.client import PaymentDeclined, result_json
from dvm_core.protocol.ecash import encode_payment_request
from dvm_core.protocol.events import Keys, sign_event
from dvm_core.payments.locks import job_lock_pubkey
from dvm_core.protocol.nip90 import FEEDBACK_KIND, JobInput, parse_feedback

from .paying import FUNDS, PRICE, close_customer, funded_customer, paid_worker, provider_balance

KIND = 5790
TEXT = [JobInput("pay only who you asked", "text")]


def forged_feedback(keys: Keys, request: dict, status: str, message: str = "", content: str = "",
                    amount_msats: int | None = None) -> dict:
    tags = [["status", status, message], ["e", request["id"]], ["p", request["pubkey"]]]
    if amount_msats is not None:
        tags.append(["amount", str(amount_msats)])
    return sign_event(keys, FEEDBACK_KIND, content, tags)


async def pay_whatever_is_asked(customer, request, **kwargs):
    """A customer who pays the first payment-required it is shown, as `dvm job submit` does."""
    async for update in customer.updates(request, timeout=30):
        if getattr(update, "status", None) == "payment-required":
            await customer.pay_with_nutzap(request, update, customer.wallet, **kwargs)
        elif not hasattr(update, "status"):
            return update


async def test_an_impostors_payment_required_result_and_error_are_never_seen(tmp_path, relay, mint, funded,
                                                                              workers):
    thief = Keys.generate()
    dvm_keys = Keys.generate()
    request = await funded.submit(KIND, TEXT, {}, provider=dvm_keys.public_key)
    # Before the DVM even runs, the thief answers: a payment request for a lot, locked to him; a
    # result and an error for the same request.
    creq = encode_payment_request(payment_id="x", amount=90_000, unit="sat", mints=[mint.url],
                                  lock_pubkey="02" + thief.public_key)
    for event in (forged_feedback(thief, request, "payment-required", "pay me", creq, 90_000_000),
                  sign_event(thief, KIND + 1000, '{"words": 999}', [["e", request["id"]], ["p", request["pubkey"]]]),
                  forged_feedback(thief, request, "error", "your provider died")):
        await funded.pool.publish(event)
    worker = await paid_worker(workers, mint, keys=dvm_keys)
    result = await asyncio.wait_for(pay_whatever_is_asked(funded, request), 40)
    assert result_json(result)["words"] == 5 and result.provider == dvm_keys.public_key
    assert await funded.wallet.total_balance() == FUNDS - PRICE
    assert await provider_balance(worker) == PRICE


@pytest.mark.parametrize("flaw", ["lock-to-wallet-key", "lock-to-another-job", "amounts-disagree",
                                  "over-the-announced-price", "unannounced-mint", "over-my-cap"])
async def test_a_payment_request_from_the_right_dvm_is_checked_before_paying(workers, mint, funded, flaw):
    worker = await paid_worker(workers, mint)
    request = await funded.submit(KIND, TEXT, {}, provider=worker.keys.public_key)
    asked = await anext(funded.updates(request, timeout=20))
    assert asked.status == "payment-required"
    key = worker.cashier.p2pk_pubkey
    lock, amount, msats, mints, cap = job_lock_pubkey(key, request["id"]), PRICE, PRICE * 1000, [mint.url], None
    if flaw == "lock-to-wallet-key":
        lock = key
    elif flaw == "lock-to-another-job":
        lock = job_lock_pubkey(key, "ab" * 32)
    elif flaw == "amounts-disagree":
        amount = PRICE * 10
    elif flaw == "over-the-announced-price":
        amount, msats = PRICE + 1, (PRICE + 1) * 1000
    elif flaw == "unannounced-mint":
        mints = ["http://127.0.0.1:9"]
    else:
        cap = PRICE - 1
    creq = encode_payment_request(payment_id="x", amount=amount, unit="sat", mints=mints, lock_pubkey=lock)
    event = forged_feedback(worker.keys, request, "payment-required", "pay", creq, msats)
    before = await funded.wallet.total_balance()
    with pytest.raises(PaymentDeclined):
        await funded.pay_with_nutzap(request, parse_feedback(event), funded.wallet, max_price=cap)
    assert await funded.wallet.total_balance() == before
    # The DVM's own request passes the same checks.
    await funded.pay_with_nutzap(request, asked, funded.wallet, max_price=PRICE)
    assert result_json(await funded.result(request, timeout=30))["words"] == 5


# -- `dvm job submit`: the quote, the cap, the question, the JSON ------------------------------

async def cli_wallet(tmp_path, mint_url: str, amount: int = FUNDS):
    from dvm_core.payments.p2pk_keys import load_or_create_p2pk_key
    from dvm_core.payments.wallet import EcashWallet
    directory = tmp_path / "cli-wallet"
    wallet = EcashWallet(directory, [mint_url], p2pk_private_key=load_or_create_p2pk_key(directory / "p2pk.key"))
    await wallet.mint_from_lightning(amount, mint_url)
    return wallet


async def dvm_submit(relay, worker, wallet, *extra: str, timeout: float = 60) -> tuple[int, str, str]:
    import sys
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dvm_core.cli", "job", "submit", "--relay", relay.url,
        "--dvm", worker.keys.npub, "--kind", str(KIND), "--text", "what does it cost",
        "--wallet-dir", str(wallet.directory), "--mint", wallet.accepted_mints[0], *extra,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.parametrize("how", ["max-price-below", "dry-run", "not-confirmed"])
async def test_dvm_job_submit_pays_nothing_unless_it_may(workers, relay, mint, tmp_path, how):
    worker = await paid_worker(workers, mint)
    wallet = await cli_wallet(tmp_path, mint.url)
    await wallet.close()
    extra = {"max-price-below": ["--max-price", str(PRICE - 1)], "dry-run": ["--dry-run"],
             "not-confirmed": []}[how]
    code, out, err = await dvm_submit(relay, worker, wallet, *extra, "--json", "--out", str(tmp_path / "o"))
    report = json.loads(out.strip().splitlines()[-1])
    assert f"quote: {PRICE} sat" in err or how == "max-price-below", err
    assert report["paid_sat"] == 0 and report["balance_sat"] == FUNDS, report
    assert code == {"max-price-below": 3, "dry-run": 0, "not-confirmed": 4}[how], err
    assert await provider_balance(worker) == 0
    # The job was cancelled: the worker does not keep waiting for a payment that will not come.
    for _ in range(100):
        if worker.store.get_job(report["job_id"]).state != "payment-required":
            break
        await asyncio.sleep(0.05)
    assert worker.store.get_job(report["job_id"]).state != "payment-required"


async def test_dvm_job_submit_with_a_cap_pays_the_quote_and_reports_json(workers, relay, mint, tmp_path):
    worker = await paid_worker(workers, mint)
    wallet = await cli_wallet(tmp_path, mint.url)
    await wallet.close()
    code, out, err = await dvm_submit(relay, worker, wallet, "--max-price", str(PRICE), "--json",
                                      "--out", str(tmp_path / "o"))
    assert code == 0, err
    report = json.loads(out.strip().splitlines()[-1])
    assert report["status"] == "succeeded" and report["paid_sat"] == PRICE
    assert report["balance_sat"] == FUNDS - PRICE and report["job_id"]
    assert json.loads(report["result"])["words"] == 4
    assert f"quote: {PRICE} sat for this text-stats job ({PRICE} sat per job)" in err
    assert f"balance: {FUNDS - PRICE} sat" in err
    assert await provider_balance(worker) == PRICE


async def test_a_job_is_paid_once_however_often_the_dvm_asks(workers, relay, mint, tmp_path, funded):
    """The DVM asks a second time (restarted before it saw the nutzap, or just wanting more; here
    its own payment-required signed again, a second later): `dvm job submit --max-price` pays
    once, says so, and the job goes on; the library declines a second payment too."""
    from dvm_core.protocol.ecash import NUTZAP_KIND
    from dvm_core.transport.relay import RelayPool
    worker = await paid_worker(workers, mint)
    wallet = await cli_wallet(tmp_path, mint.url)
    await wallet.close()
    asked_again = asyncio.Event()

    async def ask_again(event, _relay):
        status = next((t for t in event["tags"] if t and t[0] == "status"), [None, None])
        if status[1] == "payment-required" and not asked_again.is_set():
            asked_again.set()
            await watcher.publish(sign_event(worker.keys, FEEDBACK_KIND, event["content"], event["tags"],
                                             created_at=event["created_at"] + 1))

    watcher = RelayPool([relay.url], ask_again)
    await watcher.start()
    await watcher.subscribe("asks", [{"kinds": [FEEDBACK_KIND], "authors": [worker.keys.public_key]}])
    try:
        code, out, err = await dvm_submit(relay, worker, wallet, "--max-price", str(PRICE), "--json",
                                          "--out", str(tmp_path / "o"))
        zaps = await watcher.query([{"kinds": [NUTZAP_KIND], "#p": [worker.keys.public_key]}], 3)
    finally:
        await watcher.close()
    assert code == 0 and asked_again.is_set(), err
    report = json.loads(out.strip().splitlines()[-1])
    assert report["status"] == "succeeded" and report["paid_sat"] == PRICE
    assert err.count(f"paid {PRICE} sat with a nutzap") == 1 and "is not paid twice" in err, err
    assert len([z for z in zaps if ["e", report["job_id"]] in [t[:2] for t in z["tags"]]]) == 1
    assert report["balance_sat"] == FUNDS - PRICE and await provider_balance(worker) == PRICE

    request = await funded.submit(KIND, TEXT, {}, provider=worker.keys.public_key)
    asked = await anext(funded.updates(request, timeout=20))
    await funded.pay_with_nutzap(request, asked, funded.wallet)
    with pytest.raises(PaymentDeclined, match="not paid twice"):
        await funded.pay_with_nutzap(request, asked, funded.wallet)
    assert await funded.wallet.total_balance() == FUNDS - PRICE


async def test_dvm_job_reclaim_sends_a_nutzap_payment_no_relay_took(workers, relay, mint, tmp_path):
    """A payment kept in OUT/payment.json whose nutzap no relay took: `dvm job reclaim` with
    --relay publishes it (signed by customer.nsec beside it), and the job is paid and runs;
    run again, it says the payment went out already."""
    import sys

    from dvm_core.customer.client import Customer, state_keeper
    from dvm_core.state.keyfiles import write_key_file
    worker = await paid_worker(workers, mint)
    wallet = await cli_wallet(tmp_path, mint.url)
    out = tmp_path / "o"
    out.mkdir()
    keys = Keys.generate()
    write_key_file(out / "customer.nsec", keys)
    try:
        async with Customer(keys, [relay.url]) as customer:
            await customer.pool.wait_all_connected(10)
            request = await customer.submit(KIND, TEXT, {}, provider=worker.keys.public_key)
            asked = await anext(customer.updates(request, timeout=20))
            publish = customer.pool.publish

            async def nobody_takes_it(event):
                return [] if event["kind"] == 9321 else await publish(event)
            customer.pool.publish = nobody_takes_it
            with pytest.raises(RuntimeError, match="no relay accepted"):
                await customer.pay_with_nutzap(request, asked, wallet, keep=state_keeper(out / "payment.json"))
    finally:
        await wallet.close()

    async def reclaim() -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "dvm_core.cli", "job", "reclaim", "--wallet-dir", str(wallet.directory),
            "--mint", mint.url, "--relay", relay.url, str(out / "payment.json"),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        text, _ = await asyncio.wait_for(proc.communicate(), 60)
        return proc.returncode, text.decode()

    code, text = await reclaim()
    assert code == 0 and f"sent the payment of {PRICE} sat for job {request['id']}" in text, text
    for _ in range(100):
        if worker.store.get_job(request["id"]).state == "succeeded":
            break
        await asyncio.sleep(0.1)
    assert worker.store.get_job(request["id"]).state == "succeeded"
    assert await provider_balance(worker) == PRICE
    code, text = await reclaim()
    assert code == 0 and "was sent already" in text, text


async def test_ctrl_c_on_a_paid_queued_job_cancels_and_refunds_it(workers, relay, mint, tmp_path):
    import signal
    import sys
    worker = await paid_worker(workers, mint, max_concurrent_jobs=1)
    blocker_customer = await funded_customer(tmp_path, mint.url, relay.url)
    try:
        blocker = await blocker_customer.submit(KIND, TEXT, {"work_seconds": "8"}, provider=worker.keys.public_key,
                                                cashu=await blocker_customer.wallet.send(PRICE, mint=mint.url))
        for _ in range(100):
            if (job := worker.store.get_job(blocker["id"])) and job.state == "running":
                break
            await asyncio.sleep(0.05)
        wallet = await cli_wallet(tmp_path, mint.url)
        await wallet.close()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "dvm_core.cli", "job", "submit", "--relay", relay.url,
            "--dvm", worker.keys.npub, "--kind", str(KIND), "--text", "stop me",
            "--wallet-dir", str(wallet.directory), "--mint", mint.url, "--yes", "--json",
            "--out", str(tmp_path / "o"), stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            # As from a terminal: a test run started in the background (`make test &`) ignores
            # SIGINT, and the CLI would inherit that and never see the Ctrl-C.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        err = b""
        while b"queued, position" not in err:   # wait until it has paid and the job is queued
            line = await asyncio.wait_for(proc.stderr.readline(), 30)
            assert line, err.decode()
            err += line
        await asyncio.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        out, rest = await asyncio.wait_for(proc.communicate(), 60)
        err += rest
        assert proc.returncode == 130, err.decode()
        report = json.loads(out.decode().strip().splitlines()[-1])
        assert report["status"] == "cancelled" and report["paid_sat"] == PRICE, report
        assert report["collected_sat"] == PRICE and report["balance_sat"] == FUNDS, (report, err.decode())
        assert worker.store.payment_for_job(report["job_id"])["state"] == "refunded"
    finally:
        await close_customer(blocker_customer)


async def test_the_text_stats_example_pays_when_asked(workers, relay, mint, tmp_path):
    import sys

    from .conftest import REPO
    worker = await paid_worker(workers, mint)
    wallet = await cli_wallet(tmp_path, mint.url)
    await wallet.close()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(REPO / "examples" / "customer" / "text_stats_job.py"), "count these four words",
        "--relay", relay.url, "--dvm", worker.keys.npub, "--wallet-dir", str(wallet.directory),
        "--mint", mint.url, "--max-price", str(PRICE),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, out.decode() + err.decode()
    assert f"paid {PRICE} sat with a nutzap" in out.decode() and '"words": 4' in out.decode()
    assert f"balance: {FUNDS - PRICE} sat" in out.decode()


async def test_our_nutzaps_carry_the_mints_full_keyset_ids(workers, mint, funded):
    """NIP-61 proof tags are bare proofs: a stock wallet (cashu-ts) refuses 16-hex short ids."""
    from dvm_core.protocol.ecash import NUTZAP_KIND, parse_nutzap
    worker = await paid_worker(workers, mint)
    request = await funded.submit(KIND, TEXT, {}, provider=worker.keys.public_key)
    asked = await anext(funded.updates(request, timeout=20))
    event = await funded.pay_with_nutzap(request, asked, funded.wallet)
    assert event["kind"] == NUTZAP_KIND
    assert all(len(p["id"]) == 66 for p in parse_nutzap(event).proofs), parse_nutzap(event).proofs
    assert result_json(await funded.result(request, timeout=30))["words"] == 5


async def test_dvm_wallet_collect_redeems_change_locked_to_the_nostr_key(workers, relay, mint, tmp_path):
    """A DVM that sees no kind 10019 of the customer's locks change and refunds to "02" + the
    customer's Nostr key (NIP-61's fallback). `dvm wallet collect --key` redeems them into a
    wallet whose own P2PK key (p2pk.key) is another: it signs those locks with the nsec."""
    import sys

    from dvm_core.customer.client import Customer
    from dvm_core.state.keyfiles import write_key_file
    worker = await paid_worker(workers, mint)
    wallet = await cli_wallet(tmp_path, mint.url)
    keys = Keys.generate()
    write_key_file(tmp_path / "customer.nsec", keys)
    assert wallet.p2pk_pubkey[2:] != keys.public_key
    try:
        async with Customer(keys, [relay.url]) as customer:
            await customer.pool.wait_all_connected(10)
            token = await wallet.send(PRICE + 3, mint=mint.url)
            request = await customer.submit(KIND, TEXT, {}, provider=worker.keys.public_key, cashu=token)
            assert result_json(await customer.result(request, timeout=30))["words"] == 5
    finally:
        await wallet.close()
    for _ in range(100):
        payouts = worker.store.payouts(request["id"])
        if payouts and payouts[0]["state"] == "sent":
            break
        await asyncio.sleep(0.1)
    assert [(p["role"], p["amount"], p["lock_to"], p["state"]) for p in payouts] == \
        [("change", 3, "02" + keys.public_key, "sent")]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dvm_core.cli", "wallet", "collect", "--wallet-dir", str(wallet.directory),
        "--mint", mint.url, "--relay", relay.url, "--key", str(tmp_path / "customer.nsec"),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    text, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0 and f"collected 3 sat; balance {FUNDS - PRICE} sat" in text.decode(), text
