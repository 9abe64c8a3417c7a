"""SIGKILL the worker at each step of a paid job; after the restart nothing is lost.

A real `dvm run` child process, a real relay and a real Nutshell mint. The worker kills itself
(`DVM_CRASH_AT`, see dvm_core/payments/crashpoints.py) at one step of a paid job, in one way of paying,
and is started again. Then:
- the job has exactly one result (or, when it was meant to fail, exactly one refund),
- no token paid twice, and the job's payment is settled (consumed, or refunded),
- the customer's wallet (after claiming the nutzaps sent to it) plus the provider's wallet hold
  exactly what the customer minted: not a sat lost, not a sat made up.

`make test` runs each kill point once; `make test-all` runs every point in every way of paying.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time

import pytest

from dvm_core.customer.client import JobFailed, result_json
from dvm_core.protocol.events import Keys
from dvm_core.protocol.nip90 import JobInput
from dvm_core.payments.p2pk_keys import load_or_create_p2pk_key
from dvm_core.payments.wallet import EcashWallet

from ..conftest import WorkerProcess
from ..paying import FUNDS, PRICE, claim_nutzaps, close_customer, funded_customer

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

        # The worker dies at the point (some points are reached only on a path this case takes).
        deadline = time.monotonic() + 40
        while worker.proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert worker.proc.returncode == -9, f"never reached {point}:\n{worker.log.read_text()[-3000:]}"
        assert f"crash point {point}" in worker.log.read_text()
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
