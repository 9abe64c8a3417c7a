"""Benchmark of paid jobs over a real relay and a real Nutshell mint: request→`processing`
latency of a job paid with a Cashu token, against a bare redeem of a same-sized token on the same
mint, and a burst of concurrent paid jobs with the books checked afterwards.

    .venv/bin/python tests/benchmarks/bench_payment.py [--n 40] [--warmup 5] [--concurrent 30] ...

Prints one JSON object on stdout; progress goes to stderr. Not a pytest module (no test_
functions, and the file name does not match test_*.py).

Fresh for each run, in a temporary directory: a relay (`nostr-relay`) and a mint (Nutshell,
FakeWallet backend, no fees), each a child process on 127.0.0.1. In this process, on one event
loop: the worker (textstats plugin only, `mints = [mint]`, `[prices] "text-stats" = price`), a
`dvm_core.customer.client.Customer` with a funded customer wallet, two bare receiving wallets on the
same mint, and a bare echo responder.

Every token is made before any timing (`EcashWallet.send(price)` on the funded customer
wallet), so all tokens are the same size (`price` sat, DLEQ included); they hold 2 to 4 proofs,
dealt so that each kind gets the same mix (`token_proofs`).

- paid: `Customer.submit(5790, ..., cashu=token)`: the token inside the NIP-44-encrypted
  params. Timed (perf_counter, customer side) from the request's publish (the customer's
  `pool.publish` is wrapped to stamp it; `submit` sends its REQ first) until the first kind-7000
  feedback for it arrives, which must be `processing` with "paid <price> sat": the worker sends
  it after the swap at the mint. The result is awaited before the next step.
- raw_redeem: `EcashWallet.receive(token, min_amount=price)` on a wallet of its own (fresh
  directory, same mint): our wrapper, i.e. parse + offline checks + DLEQ checks + the swap
  (`EcashWallet._swap_in`: Nutshell's redeem less its second DLEQ check, its per-swap counter
  transaction, its used-secrets query and its history writes, on a kept HTTP connection).
  Keysets are loaded once during the warm-up, as the worker's wallet keeps them.
- nutshell_redeem: Nutshell's own `Wallet.redeem(proofs)` on a third wallet (opened with
  `Wallet.with_db` + `load_mint()` once, as a bare script keeping its wallet would); the token
  is parsed (`deserialize_token_from_string`, `_expand_short_keyset_ids`) outside the timing.
  This redeem verifies DLEQ itself and swaps (POST /v1/swap): what a bare script pays.
- delivery: the same job (kind 5790, the same plain text, no files) paid on delivery, as
  tests/test_pay_on_delivery.py does it: `submit` with param `pay_on_delivery` = the refund key
  of a second customer wallet (its P2PK key is the customer's Nostr key; funded apart, so the
  books of the paid tokens stay as they were), the offer (`payment-required` feedback) awaited,
  `Customer.pay_on_delivery` (check the offer, `send_htlc`: a swap at the mint that makes the
  HTLC-locked proofs, then the nutzap published), `Customer.await_delivery` (`--poll-seconds`).
  Timed from the request's publish until `await_delivery` returns the opened Result, i.e. the
  decrypted result; the paid job is timed the same way, until `Customer.result` returns it
  decrypted (`paid_result_p50_ms`). The worker announces the offer's terms (hash, job key,
  locktime, amount) in the `processing` feedback that accepts the job, and the customer makes
  the HTLC token then (`Customer.prepare_delivery`), while the job runs, and sends it once the
  offer comes (`pay_on_delivery(prepared=...)`): the swap is inside the timing but overlaps the
  job, the seal and the offer. The worker answers once that ecash is checked
  (`deliver_before_redeem`, the default) and swaps it afterwards, so the path holds one swap at
  the mint, the customer's, as the paid path holds one, the worker's.
- relay round trip (context): a ping (kind 1) to the responder and its reply, as bench_core.
  Both the paid path and the ping cross the relay twice; the delivery path crosses it four times
  (request, offer, nutzap, result), i.e. one ping's round trip more than the paid path.

The five are interleaved, one at a time, in an order that rotates each step, so they all see the
same conditions; after a delivery the worker's swap of its ecash, which follows the result, is
waited for (untimed) before the next step. `ratio` = paid_p50_ms / nutshell_redeem_p50_ms (see `ratio_note`).
`delivery_ratio` = delivery_p50_ms / paid_result_p50_ms, against the goal
`delivery_ratio_goal` = 1.2 + relay_rtt_s / paid_result_median (1.2 plus one relay round trip);
`delivery_phases_p50_ms` says where the delivery path's time goes (see `delivery_note`).

- concurrent: `--concurrent` paid jobs submitted at once (asyncio.gather) to the worker
  (`--max-concurrent-jobs`); counts results, then checks the books: the provider's wallet grew
  by exactly concurrent × price, the customer's shrank by exactly that when the tokens were
  made and nothing came back (no nutzaps), every token is spent at the mint (NUT-07), every
  payment row of the worker's store is `consumed` with received = price and no change or refund,
  one row per token, and the provider's own proofs are all unspent at the mint.

`--trace` adds a hop-by-hop breakdown of the paid path, of the worker's side of the delivery
path (`delivery_hops_p50_ms`), and the time each wallet spends in the HTTP swap (it wraps a few
methods, so leave it off for the headline numbers); `--profile` runs cProfile over the
sequential phase or the concurrent one.

Experiments (off by default): `--alt-poll-seconds S`, `--alt-lazy-first-check` and/or
`--alt-no-prepare` add a second delivery path, `delivery_alt`, interleaved with the first, that
passes `await_delivery` another poll_seconds, or a wallet whose first checkstate answers "not
yet" without asking the mint (`LazyFirstCheck`: what `await_delivery` now does itself, since the
experiment showed the checkstate on the critical path), or makes the HTLC token only when the
offer comes (as before the terms were announced at acceptance). dvm_core is not changed by any.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import io
import json
import os
import platform
import pstats
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

try:
    import psutil
except ImportError:  # CPU accounting is left out without it
    psutil = None

from dvm_core.customer.client import Customer, JobFailed, result_json
from dvm_core.protocol.ecash import NUTZAP_KIND
from dvm_core.protocol.nip90 import Result
from dvm_core.worker.config import load_config
from dvm_core.protocol.events import Keys, sign_event
from dvm_core.devtools.localnet import start_mint, start_relay
from dvm_core.cli.logs import configure_logging
from dvm_core.protocol.nip90 import FEEDBACK_KIND, JobInput
from dvm_core.worker.plugins import plugin_manager
from dvm_core.transport.relay import RelayPool
from dvm_core.payments import nutshell
from dvm_core.payments.wallet import EcashWallet
from dvm_core.worker.worker import Worker
from benchlib import CpuMeter, eprint, loadavg, ms, percentile, reply_to  # noqa: E402

TEXT_STATS_KIND = 5790
RESULT_KIND = TEXT_STATS_KIND + 1000
PING_KIND = 1


def write_config(path: Path, relay_url: str, prices: dict | None = None, **settings) -> Path:
    """As tests/conftest.py writes it: a [dvm] table of JSON-encoded values, then [prices]."""
    values = {"relays": [relay_url], "state_dir": str(path.parent / "state"),
              "log_format": "json", **settings}
    lines = ["[dvm]"] + [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    if prices:
        lines += ["[prices]"] + [f"{json.dumps(k)} = {v}" for k, v in prices.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


class TimedCustomer(Customer):
    """`Customer`, stamping when each request is published and when its first feedback (and
    the pong of each ping) arrives. The stamps are taken before anything else is done with the
    event: the feedback is decrypted and checked later, by `Customer.result`."""

    def __init__(self, keys: Keys, relays: list[str]):
        super().__init__(keys, relays)
        self.sent: dict[str, float] = {}
        self.first_feedback: dict[str, float] = {}
        self.result_at: dict[str, float] = {}
        self.done_at: dict[str, float] = {}        # the decrypted result in hand (set by the jobs)
        self.nutzap_sent: dict[str, float] = {}    # request id -> its nutzap's publish
        self.pong: dict[str, float] = {}
        self._pong_waiters: dict[str, asyncio.Future] = {}
        publish = self.pool.publish

        async def stamped_publish(event, *a, **kw):
            now = time.perf_counter()
            self.sent.setdefault(event["id"], now)
            if event["kind"] == NUTZAP_KIND:
                ref = reply_to(event)
                if ref is not None:
                    self.nutzap_sent.setdefault(ref, now)
            return await publish(event, *a, **kw)
        self.pool.publish = stamped_publish

    def _on_event(self, event: dict, relay: str) -> None:
        now = time.perf_counter()
        ref = reply_to(event)
        if ref is not None:
            if event["kind"] == FEEDBACK_KIND:
                self.first_feedback.setdefault(ref, now)
            elif event["kind"] == RESULT_KIND:
                self.result_at.setdefault(ref, now)
            elif event["kind"] == PING_KIND:
                self.pong.setdefault(ref, now)
                fut = self._pong_waiters.pop(ref, None)
                if fut is not None and not fut.done():
                    fut.set_result(None)
                return
        super()._on_event(event, relay)

    def wait_pong(self, ping_id: str) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        self._pong_waiters[ping_id] = fut
        return fut


class Responder:
    """A bare echo: on a ping, sign a reply tagging it and publish it, nothing else."""

    def __init__(self, relay_url: str):
        self.keys = Keys.generate()
        self.seen: dict[str, float] = {}
        self.pool = RelayPool([relay_url], self.on_event)

    def on_event(self, event: dict, relay: str):
        self.seen.setdefault(event["id"], time.perf_counter())
        reply = sign_event(self.keys, PING_KIND, "pong", [["e", event["id"]], ["p", event["pubkey"]]])
        return self.pool.publish(reply)


class BareNutshell:
    """Nutshell's own wallet, as a bare script keeps one: opened once, mint loaded once."""

    def __init__(self, directory: Path, mint_url: str):
        self.directory = directory
        self.mint_url = mint_url
        self.wallet = None
        self.c = nutshell.load()  # import Nutshell with its side effects contained

    async def open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.redirect_stdout(io.StringIO()):  # the "new mnemonic" notice
            self.wallet = await self.c.Wallet.with_db(self.mint_url, str(self.directory), name="bare")
        await self.wallet.load_mint()
        if not self.wallet.keysets:
            raise RuntimeError(f"Nutshell could not load the keysets of {self.mint_url}")
        await self.wallet.load_proofs(reload=True)

    async def proofs_of(self, token: str) -> list:
        from cashu.wallet.helpers import deserialize_token_from_string  # imported already, by load()
        proofs = deserialize_token_from_string(token).proofs  # a new list on each access
        await self.wallet._expand_short_keyset_ids(proofs)
        return proofs

    async def redeem(self, proofs: list) -> int:
        kept, _ = await self.wallet.redeem(proofs)
        return sum(p.amount for p in kept)

    def balance(self) -> int:
        return sum(p.amount for p in self.wallet.proofs if not p.reserved)

    async def close(self) -> None:
        if self.wallet is not None:
            client = getattr(self.wallet, "httpx", None)
            if client is not None:
                await client.aclose()
            await self.wallet.db.engine.dispose()


class PayTracer:
    """With --trace: where a paid request's time goes, on the same clock as the customer's stamps.

    Wraps the worker's `_accept` (the request delivered, verified, by the pool), its wallet's
    `receive` (start and end, keyed back to the request by the token), its `_publish` (the
    feedback signed and handed to a task), and, class-wide, Nutshell's `LedgerAPI.split` (the
    POST /v1/swap itself, timed per wallet).
    """

    def __init__(self):
        self.accept: dict[str, float] = {}
        self.recv_start: dict[str, float] = {}
        self.recv_end: dict[str, float] = {}
        self.fb_queued: dict[str, float] = {}
        self.job_token: dict[str, str] = {}
        # The delivery path's worker side, keyed by request id (`receive` gets job_id=...).
        self.nutzap_in: dict[str, float] = {}
        self.job_recv_start: dict[str, float] = {}
        self.job_recv_end: dict[str, float] = {}
        self.result_queued: dict[str, float] = {}
        self.recording = False
        self.swap_http: dict[str, list[float]] = {}
        self.wallet_names: dict[int, str] = {}
        self._restore = None

    def install(self, worker: Worker) -> None:
        accept = worker._handle

        def _accept(event, *a, **kw):
            self.accept.setdefault(event["id"], time.perf_counter())
            return accept(event, *a, **kw)
        worker._handle = _accept

        wallet = worker.cashier.wallet
        receive = wallet.receive

        async def timed_receive(token, *a, **kw):
            # Keyed by the token: the request id is known to the customer only once `submit`
            # returns, and the worker may be redeeming by then.
            t = time.perf_counter()
            self.recv_start.setdefault(token, t)
            job_id = kw.get("job_id")
            if job_id is not None:
                self.job_recv_start.setdefault(job_id, t)
            try:
                return await receive(token, *a, **kw)
            finally:
                t = time.perf_counter()
                self.recv_end.setdefault(token, t)
                if job_id is not None:
                    self.job_recv_end.setdefault(job_id, t)
        wallet.receive = timed_receive

        check = wallet.check_htlc_payment

        async def timed_check(token, *a, **kw):
            # Pay on delivery: the worker answers once the ecash is checked (the swap follows).
            t = time.perf_counter()
            self.job_recv_start.setdefault(kw["job_id"], t)
            try:
                return await check(token, *a, **kw)
            finally:
                self.job_recv_end.setdefault(kw["job_id"], time.perf_counter())
        wallet.check_htlc_payment = timed_check

        on_nutzap = worker.cashier.on_nutzap

        def _on_nutzap(event, *a, **kw):
            ref = reply_to(event)
            if ref is not None:
                self.nutzap_in.setdefault(ref, time.perf_counter())
            return on_nutzap(event, *a, **kw)
        worker.cashier.on_nutzap = _on_nutzap

        publish = worker.outbox.publish

        def _publish(event, *a, **kw):
            if event["kind"] in (FEEDBACK_KIND, RESULT_KIND):
                ref = reply_to(event)
                if ref is not None:
                    queued = self.fb_queued if event["kind"] == FEEDBACK_KIND else self.result_queued
                    queued.setdefault(ref, time.perf_counter())
            return publish(event, *a, **kw)
        worker.outbox.publish = _publish

        from cashu.wallet.v1_api import LedgerAPI  # imported already, by nutshell.load()
        split = LedgerAPI.split
        names = self.wallet_names
        swap_http = self.swap_http

        async def timed_split(api, proofs, *a, **kw):
            t = time.perf_counter()
            try:
                return await split(api, proofs, *a, **kw)
            finally:
                if self.recording:
                    name = names.get(id(api), "other")
                    if any(str(p.secret).startswith('["HTLC"') for p in proofs):
                        name += "_htlc_redeem"    # the worker redeeming a delivery's HTLC proofs
                    swap_http.setdefault(name, []).append(time.perf_counter() - t)
        LedgerAPI.split = timed_split
        self._restore = lambda: setattr(LedgerAPI, "split", split)

    def name_wallet(self, nutshell_wallet, name: str) -> None:
        self.wallet_names[id(nutshell_wallet)] = name

    def uninstall(self) -> None:
        if self._restore:
            self._restore()

    def hops(self, ids: list[str], sent: dict, back: dict) -> dict:
        legs: dict[str, list[float]] = {"relay_in": [], "accept_to_receive": [], "receive": [],
                                        "receive_to_feedback_queued": [], "feedback_out": []}
        for i in ids:
            token = self.job_token.get(i)
            stamps = [sent.get(i), self.accept.get(i), self.recv_start.get(token),
                      self.recv_end.get(token), self.fb_queued.get(i), back.get(i)]
            if any(x is None for x in stamps):
                continue
            t0, t1, t2, t3, t4, t5 = stamps
            legs["relay_in"].append(t1 - t0)
            legs["accept_to_receive"].append(t2 - t1)
            legs["receive"].append(t3 - t2)
            legs["receive_to_feedback_queued"].append(t4 - t3)
            legs["feedback_out"].append(t5 - t4)
        return {k: ms(percentile(v, 50)) for k, v in legs.items()}

    def delivery_hops(self, ids: list[str], customer: "TimedCustomer") -> dict:
        """The delivery path from the customer's nutzap to its result event, worker side: `check`
        is `check_htlc_payment` (the swap comes after the result), or `receive` where the worker
        swaps first (`deliver_before_redeem = false`)."""
        legs: dict[str, list[float]] = {"nutzap_relay_in": [], "nutzap_to_check": [], "check": [],
                                        "check_to_result_queued": [], "result_out": []}
        for i in ids:
            stamps = [customer.nutzap_sent.get(i), self.nutzap_in.get(i), self.job_recv_start.get(i),
                      self.job_recv_end.get(i), self.result_queued.get(i), customer.result_at.get(i)]
            if any(x is None for x in stamps):
                continue
            t0, t1, t2, t3, t4, t5 = stamps
            legs["nutzap_relay_in"].append(t1 - t0)
            legs["nutzap_to_check"].append(t2 - t1)
            legs["check"].append(t3 - t2)
            legs["check_to_result_queued"].append(t4 - t3)
            legs["result_out"].append(t5 - t4)
        return {k: ms(percentile(v, 50)) for k, v in legs.items()}

    def swap_report(self) -> dict:
        return {name: ms(percentile(v, 50)) for name, v in sorted(self.swap_http.items())}


async def paid_job(customer: TimedCustomer, worker_pk: str, token: str, text: str, price: int,
                   timeout: float, tracer: PayTracer | None) -> tuple[str, str | None]:
    """Submit one paid request and wait for its result. Returns (request id, problem or None)."""
    feedback = []
    request = await customer.submit(TEXT_STATS_KIND, [JobInput(text, "text")], {},
                                    provider=worker_pk, cashu=token)
    if tracer is not None:
        tracer.job_token[request["id"]] = token
    try:
        result = await customer.result(request, timeout, on_feedback=feedback.append)
        customer.done_at[request["id"]] = time.perf_counter()   # decrypted, parsed
        words = result_json(result).get("words")
        problem = None if words == len(text.split()) else f"unexpected result {result.content[:80]!r}"
    except JobFailed as exc:
        problem = f"error feedback: {exc}"
    except (TimeoutError, asyncio.TimeoutError) as exc:
        problem = f"timeout: {exc}"
    if problem is None:
        first = feedback[0] if feedback else None
        if first is None or first.status != "processing" or f"paid {price} " not in (first.message or ""):
            problem = f"first feedback was not 'processing … paid {price}': {first}"
    await customer.pool.unsubscribe(f"job-{request['id'][:16]}")
    return request["id"], problem


@dataclass
class DeliveryPath:
    """A way of paying on delivery: the headline one (`delivery`) and, with --alt-*, one more,
    interleaved with it, that differs only in what the benchmark passes to `await_delivery`."""

    name: str
    poll_seconds: float
    lazy_first_check: bool = False   # await_delivery gets a wallet whose first checkstate is skipped
    prepare: bool = True   # make the HTLC ecash when the acceptance announces the terms (prepare_delivery)
    times: list = field(default_factory=list)
    ids: list = field(default_factory=list)
    stamps: dict = field(default_factory=dict)
    problems: list = field(default_factory=list)


async def sequential(customer: TimedCustomer, worker: Worker, responder: Responder,
                     raw: EcashWallet, bare: BareNutshell, tokens: dict[str, list[str]],
                     n: int, warmup: int, price: int, text: str, timeout: float,
                     tracer: PayTracer | None, dw: TimedDeliveryWallet | None = None,
                     paths: list[DeliveryPath] = ()) -> dict:
    """Interleave the measurements one at a time, rotating their order each step."""
    paid, wrapper, nutshell, nutshell_prep, rtt = [], [], [], [], []
    paid_result, pairs = [], []
    paid_ids: list[str] = []
    problems: list[str] = []
    steps = ["paid", "raw_redeem", "nutshell_redeem", "ping"]
    by_name = {path.name: path for path in paths}
    for k, path in enumerate(paths):
        steps.insert(1 + k, path.name)
    worker_pk = worker.keys.public_key
    for i in range(warmup + n):
        measured = i >= warmup
        if tracer is not None:
            tracer.recording = measured
        order = steps[i % len(steps):] + steps[:i % len(steps)]
        step_paid = step_delivery = None
        for step in order:
            if step == "paid":
                req_id, problem = await paid_job(customer, worker_pk, tokens["paid"][i], f"{text} {i}",
                                                 price, timeout, tracer)
                if problem is not None:
                    problems.append(f"request {i}: {problem}")
                    eprint(f"  paid request {i}: {problem}")
                elif measured:
                    paid.append(customer.first_feedback[req_id] - customer.sent[req_id])
                    step_paid = customer.done_at[req_id] - customer.sent[req_id]
                    paid_result.append(step_paid)
                    paid_ids.append(req_id)
            elif step in by_name:
                path = by_name[step]
                req_id, problem, stamps = await delivery_job(customer, worker_pk, dw, f"{text} {i}",
                                                             price, timeout, path)
                if problem is not None:
                    path.problems.append(f"request {i}: {problem}")
                    eprint(f"  {path.name} request {i}: {problem}")
                elif measured:
                    took = stamps["done"] - customer.sent[req_id]
                    if step == "delivery":
                        step_delivery = took
                    path.times.append(took)
                    path.ids.append(req_id)
                    path.stamps[req_id] = stamps
                if req_id is not None:
                    # The worker swaps the delivered job's ecash after the result: let it finish
                    # before the next step, which it would otherwise slow down.
                    await settle(worker, [req_id])
            elif step == "raw_redeem":
                t0 = time.perf_counter()
                got = await raw.receive(tokens["raw"][i], min_amount=price)
                dt = time.perf_counter() - t0
                if got.amount != price:
                    raise RuntimeError(f"raw receive {i}: {got.amount} sat arrived, not {price}")
                if measured:
                    wrapper.append(dt)
            elif step == "nutshell_redeem":
                t0 = time.perf_counter()
                proofs = await bare.proofs_of(tokens["nutshell"][i])
                t1 = time.perf_counter()
                amount = await bare.redeem(proofs)
                t2 = time.perf_counter()
                if amount != price:
                    raise RuntimeError(f"Nutshell redeem {i}: {amount} sat kept, not {price}")
                if measured:
                    nutshell_prep.append(t1 - t0)
                    nutshell.append(t2 - t1)
            else:
                ping = sign_event(customer.keys, PING_KIND, f"ping {i}", [["p", responder.keys.public_key]])
                pong = customer.wait_pong(ping["id"])
                t0 = time.perf_counter()
                published = await customer.pool.publish(ping)
                if not any(r.ok for r in published):
                    raise RuntimeError(f"relay refused ping {i}: {published}")
                await asyncio.wait_for(pong, timeout)
                if measured:
                    rtt.append(customer.pong[ping["id"]] - t0)
        if step_paid is not None and step_delivery is not None:
            pairs.append(step_delivery / step_paid)
        if i == 0 and tracer is not None:  # the wallets exist now: name them for the swap timings
            for w in worker.cashier.wallet._wallets.values():
                tracer.name_wallet(w, "worker")
            for w in raw._wallets.values():
                tracer.name_wallet(w, "raw_redeem")
            tracer.name_wallet(bare.wallet, "nutshell_redeem")
            if dw is not None:
                for w in dw.wallet._wallets.values():
                    tracer.name_wallet(w, "delivery_send_htlc")
        if (i + 1) % 10 == 0:
            eprint(f"  sequential {i + 1}/{warmup + n}")
    return {"paid": paid, "raw": wrapper, "nutshell": nutshell, "nutshell_prep": nutshell_prep,
            "rtt": rtt, "paid_ids": paid_ids, "problems": problems, "paid_result": paid_result,
            "pairs": pairs}


class TimedDeliveryWallet:
    """Stamps on the delivery wallet's two mint calls of the pay-on-delivery path, keyed by the
    HTLC token: `send_htlc` (the swap that makes the locked proofs) and each `htlc_preimage`
    (NUT-07 checkstate, which `await_delivery` calls only after poll_seconds without the
    result event, and once before giving up)."""

    def __init__(self, wallet: EcashWallet):
        self.wallet = wallet
        self.htlc: dict[str, tuple[float, float]] = {}        # request id -> (start, end)
        self.checks: dict[str, list[tuple[float, float, bool]]] = {}   # token -> (start, end, found)
        self.current: str | None = None                       # the request being paid
        send_htlc, htlc_preimage = wallet.send_htlc, wallet.htlc_preimage

        async def timed_send_htlc(*a, **kw):
            t = time.perf_counter()
            token = await send_htlc(*a, **kw)
            self.htlc[self.current] = (t, time.perf_counter())
            return token

        async def timed_htlc_preimage(token, *a, **kw):
            t = time.perf_counter()
            found = await htlc_preimage(token, *a, **kw)
            self.checks.setdefault(token, []).append((t, time.perf_counter(), found is not None))
            return found
        wallet.send_htlc = timed_send_htlc
        wallet.htlc_preimage = timed_htlc_preimage


class LazyFirstCheck:
    """The delivery wallet as `await_delivery` sees it in the lazy-first-check experiment: the
    first `htlc_preimage` of each token answers None without asking the mint, so the customer
    waits for the result event (up to poll_seconds) before its first NUT-07 checkstate."""

    def __init__(self, wallet: EcashWallet):
        self._wallet = wallet
        self._asked: set[str] = set()

    def __getattr__(self, name):
        return getattr(self._wallet, name)

    async def htlc_preimage(self, token: str) -> bytes | None:
        if token not in self._asked:
            self._asked.add(token)
            return None
        return await self._wallet.htlc_preimage(token)


async def delivery_job(customer: TimedCustomer, worker_pk: str, dw: TimedDeliveryWallet, text: str,
                       price: int, timeout: float, path: DeliveryPath) -> tuple[str, str | None, dict]:
    """One job paid on delivery, as tests/test_pay_on_delivery.py does it, without files.
    Returns (request id, problem or None, the customer-side stamps)."""
    wallet = dw.wallet
    request = await customer.submit(TEXT_STATS_KIND, [JobInput(text, "text")],
                                    {"pay_on_delivery": wallet.p2pk_pubkey}, provider=worker_pk)
    rid = request["id"]
    dw.current = rid
    stamps: dict = {}
    problem = None
    preparing = None
    try:
        offer = None
        async with contextlib.aclosing(customer.updates(request, timeout)) as updates:
            async for update in updates:
                if isinstance(update, Result):
                    problem = "a result came before any offer"
                    break
                if update.status == "payment-required":
                    offer = update
                    break
                if update.status == "error":
                    problem = f"error feedback: {update.message}"
                    break
                if path.prepare and preparing is None and update.status == "processing" \
                        and update.content.startswith("creqA"):   # the terms, at acceptance
                    stamps["terms"] = time.perf_counter()
                    preparing = asyncio.ensure_future(customer.prepare_delivery(request, update, wallet,
                                                                                max_price=price))
        if offer is not None:
            stamps["offer"] = time.perf_counter()
            prepared = await preparing if preparing is not None else None
            stamps["prepared"] = time.perf_counter()
            delivery = await customer.pay_on_delivery(request, offer, wallet, max_price=price, prepared=prepared)
            stamps["prepared_used"] = prepared is not None and delivery.token == prepared.token
            stamps["paid"] = time.perf_counter()
            result = await customer.await_delivery(
                delivery, LazyFirstCheck(wallet) if path.lazy_first_check else wallet,
                timeout=timeout, poll_seconds=path.poll_seconds)
            stamps["done"] = customer.done_at[rid] = time.perf_counter()
            words = result_json(result).get("words")
            if words != len(text.split()):
                problem = f"unexpected result {result.content[:80]!r}"
            checks = dw.checks.get(delivery.token, [])
            stamps["checks"] = checks
            stamps["key_from"] = "mint" if checks and checks[-1][2] else "result_event"
    except JobFailed as exc:
        problem = f"error feedback: {exc}"
    except (TimeoutError, asyncio.TimeoutError) as exc:
        problem = f"timeout: {exc}"
    except Exception as exc:  # PaymentDeclined, a mint error: report it, do not stop the run
        problem = f"{type(exc).__name__}: {exc}"
    await customer.pool.unsubscribe(f"job-{rid[:16]}")
    return rid, problem, stamps


def delivery_phases(path: DeliveryPath, customer: TimedCustomer, dw: TimedDeliveryWallet) -> dict:
    """Where a delivery's time goes, customer side, as medians over the measured jobs."""
    legs: dict[str, list[float]] = {
        "request_to_offer": [],         # relay in, the job, seal, offer stored, relay out, decrypt
        "check_offer": [],              # check_delivery (wallet_info cached after the first)
        "htlc_swap": [],                # send_htlc: POST /v1/swap making the locked proofs
        "sign_nutzap": [],              # build + sign the nutzap
        "nutzap_publish_ok": [],        # the relay's OK (the worker may be redeeming already)
        "nutzap_to_result_event": [],   # relay in, the worker's check of the ecash, result out
        "result_event_to_result": [],   # await_delivery picks it up (a checkstate may be in flight)
        "paid_to_result": [],           # pay_on_delivery returned -> await_delivery returned
    }
    checks_per_job, check_s = [], []
    key_from = Counter()
    for i in path.ids:
        st = path.stamps[i]
        sent, htlc, nz = customer.sent[i], dw.htlc[i], customer.nutzap_sent[i]
        legs["request_to_offer"].append(st["offer"] - sent)
        legs["check_offer"].append(htlc[0] - st["offer"])
        legs["htlc_swap"].append(htlc[1] - htlc[0])
        legs["sign_nutzap"].append(nz - htlc[1])
        legs["nutzap_publish_ok"].append(st["paid"] - nz)
        legs["paid_to_result"].append(st["done"] - st["paid"])
        res = customer.result_at.get(i)   # none when the key came from the mint first
        if res is not None and res <= st["done"]:
            legs["nutzap_to_result_event"].append(res - nz)
            legs["result_event_to_result"].append(st["done"] - res)
        checks_per_job.append(len(st["checks"]))
        check_s += [end - start for start, end, _ in st["checks"]]
        key_from[st["key_from"]] += 1
    return {"phases": {k: ms(percentile(v, 50)) for k, v in legs.items()},
            "checkstate": {"calls_per_job_p50": percentile(checks_per_job, 50),
                           "calls_per_job_max": max(checks_per_job, default=None),
                           "p50_ms": ms(percentile(check_s, 50)),
                           "key_from": dict(key_from)}}


def paid_phases(ids: list[str], customer: TimedCustomer) -> dict:
    """The paid path to its decrypted result, customer side."""
    legs: dict[str, list[float]] = {"request_to_processing": [], "processing_to_result_event": [],
                                    "result_event_to_result": []}
    for i in ids:
        stamps = [customer.sent.get(i), customer.first_feedback.get(i), customer.result_at.get(i),
                  customer.done_at.get(i)]
        if any(x is None for x in stamps):
            continue
        t0, t1, t2, t3 = stamps
        legs["request_to_processing"].append(t1 - t0)
        legs["processing_to_result_event"].append(t2 - t1)
        legs["result_event_to_result"].append(t3 - t2)
    return {k: ms(percentile(v, 50)) for k, v in legs.items()}


async def concurrent(customer: TimedCustomer, worker: Worker, tokens: list[str], price: int,
                     text: str, timeout: float, tracer: PayTracer | None) -> dict:
    worker_pk = worker.keys.public_key
    t0 = time.perf_counter()
    outcomes = await asyncio.gather(
        *(paid_job(customer, worker_pk, tok, f"{text} #{i}", price, timeout, tracer)
          for i, tok in enumerate(tokens)),
        return_exceptions=True)
    seconds = time.perf_counter() - t0
    ids, problems = [], []
    for i, outcome in enumerate(outcomes):
        if isinstance(outcome, BaseException):
            problems.append(f"job {i}: {outcome!r}")
            continue
        req_id, problem = outcome
        ids.append(req_id)
        if problem is not None:
            problems.append(f"job {i}: {problem}")
    ok = len(tokens) - len(problems)
    fb = [customer.first_feedback[i] - customer.sent[i] for i in ids
          if i in customer.first_feedback and i in customer.sent]
    res = [customer.result_at[i] - customer.sent[i] for i in ids
           if i in customer.result_at and i in customer.sent]
    return {"ids": ids, "ok": ok, "problems": problems, "seconds": seconds,
            "feedback_latency": fb, "result_latency": res}


async def provider_proofs_unspent(wallet: EcashWallet, mint_url: str) -> bool | None:
    """NUT-07 on every proof the provider's wallet holds: none may be spent already (a proof
    counted in the balance but spent at the mint would be money that is not there)."""
    try:
        nut = await wallet._online(mint_url)
        proofs = list(nut.proofs)
        if not proofs:
            return True
        states = await nut.check_proof_state(proofs)
        return all(s.unspent for s in states.states)
    except Exception as exc:  # private API: report, do not fail the run
        eprint(f"  could not check the provider's proofs: {exc!r}")
        return None


async def settle(worker: Worker, job_ids: list[str], timeout: float = 10.0) -> None:
    """Wait until the worker has marked each job's payment consumed (it does so right after the
    result is handed to the relay, which may be a moment after the customer sees it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = [worker.store.payment_for_job(i) for i in job_ids]
        if all(r is not None and r["state"] == "consumed" for r in rows):
            return
        await asyncio.sleep(0.05)


async def main_async(args) -> dict:
    configure_logging("json", "warning")
    tmp = Path(tempfile.mkdtemp(prefix="dvm-bench-pay-"))
    eprint(f"workdir {tmp}")
    relay = start_relay(tmp / "relay")
    mint = None
    worker = customer = responder = raw = bare = customer_wallet = delivery_wallet = None
    tracer = dw = None
    try:
        mint = start_mint(tmp / "mint")
        eprint(f"relay {relay.url} (pid {relay.process.pid}), mint {mint.url} (pid {mint.process.pid})")
        price = args.price
        (tmp / "worker").mkdir()
        config = load_config(write_config(tmp / "worker" / "dvm.toml", relay.url,
                                          prices={"text-stats": price}, mints=[mint.url],
                                          max_concurrent_jobs=args.max_concurrent_jobs,
                                          announce=False, log_level="warning"), env={})
        worker = Worker(config, Keys.generate(), plugin_manager(only=["textstats"]))
        await worker.start()
        assert await worker.pool.wait_all_connected(10), "worker did not connect"

        # Every token before any timing: paid, raw (wrapper), nutshell (bare), concurrent.
        steps = args.warmup + args.n
        customer_wallet = EcashWallet(directory=tmp / "customer-wallet", accepted_mints=[mint.url])
        funding = price * (3 * steps + args.concurrent)
        t = time.perf_counter()
        minted = await customer_wallet.mint_from_lightning(funding, mint.url)
        assert minted == funding, (minted, funding)
        # The wallet's coin selection gives tokens of 2, 3 or 4 proofs (4+1, 2+2+1, ...). So that
        # each kind gets the same mix, the tokens are sorted by proof count and dealt out in
        # triples, one triple per step (in a shuffled order, the same each run).
        pool = [await customer_wallet.send(price, mint=mint.url) for _ in range(3 * steps)]
        pool.sort(key=lambda tok: customer_wallet.inspect(tok).proof_count)
        triples = [pool[k:k + 3] for k in range(0, len(pool), 3)]
        random.Random(90).shuffle(triples)
        tokens = {"paid": [], "raw": [], "nutshell": []}
        for i, triple in enumerate(triples):
            triple = triple[i % 3:] + triple[:i % 3]  # a mixed triple favours no kind
            for group, tok in zip(tokens.values(), triple):
                group.append(tok)
        customer_before_conc = await customer_wallet.total_balance()
        tokens["concurrent"] = [await customer_wallet.send(price, mint=mint.url) for _ in range(args.concurrent)]
        customer_after_conc = await customer_wallet.total_balance()
        infos = [customer_wallet.inspect(tok) for group in tokens.values() for tok in group]
        proof_counts = {name: dict(sorted(Counter(str(customer_wallet.inspect(tok).proof_count)
                                                  for tok in group).items()))
                        for name, group in tokens.items()}
        assert all(i.amount == price and i.has_dleq for i in infos)
        assert len({i.token_id for i in infos}) == len(infos), "two tokens share proofs"
        eprint(f"minted {funding} sat, made {len(infos)} tokens of {price} sat in "
               f"{time.perf_counter() - t:.1f}s (proofs per token: {proof_counts})")

        customer_keys = Keys.generate()
        paths: list[DeliveryPath] = []
        if not args.no_delivery:
            paths.append(DeliveryPath("delivery", args.poll_seconds))
            if args.alt_poll_seconds is not None or args.alt_lazy_first_check or args.alt_no_prepare:
                alt_poll = args.poll_seconds if args.alt_poll_seconds is None else args.alt_poll_seconds
                paths.append(DeliveryPath("delivery_alt", alt_poll,
                                          lazy_first_check=args.alt_lazy_first_check,
                                          prepare=not args.alt_no_prepare))
            # Pay on delivery from a wallet of its own, funded apart (the HTLC tokens are made
            # during the timing: their hash comes in the offer); its P2PK key, the refund key,
            # is the customer's Nostr key, as in tests/paying.py.
            delivery_wallet = EcashWallet(directory=tmp / "delivery-wallet", accepted_mints=[mint.url],
                                          p2pk_private_key=customer_keys.private_key)
            funding = price * steps * len(paths)
            minted = await delivery_wallet.mint_from_lightning(funding, mint.url)
            assert minted == funding, (minted, funding)
            delivery_before = await delivery_wallet.total_balance()
            dw = TimedDeliveryWallet(delivery_wallet)

        raw = EcashWallet(directory=tmp / "raw-wallet", accepted_mints=[mint.url])
        bare = BareNutshell(tmp / "bare-nutshell", mint.url)
        await bare.open()
        responder = Responder(relay.url)
        await responder.pool.start()
        await responder.pool.subscribe("pings", [{"kinds": [PING_KIND], "#p": [responder.keys.public_key],
                                                  "since": int(time.time()) - 5}])
        customer = TimedCustomer(customer_keys, [relay.url])
        await customer.pool.start()
        assert await customer.pool.wait_all_connected(10), "customer did not connect"
        await customer.pool.subscribe("pongs", [{"kinds": [PING_KIND], "#p": [customer.keys.public_key],
                                                 "since": int(time.time()) - 5}])
        assert await customer.pool.wait_eose("pongs") and await responder.pool.wait_eose("pings")

        if args.trace:
            tracer = PayTracer()
            tracer.install(worker)
        cpu = CpuMeter(relay=relay.process.pid, mint=mint.process.pid)
        profiler = cProfile.Profile() if args.profile else None
        out: dict = {"loadavg_1m_before": loadavg()}

        eprint(f"sequential: {args.warmup} warm-up + {args.n} measured, each step: paid request, "
               + "".join(f"paid-on-delivery request ({p.name}: poll_seconds={p.poll_seconds:g}"
                         f"{', lazy first check' if p.lazy_first_check else ''}), " for p in paths)
               + "raw redeem, Nutshell redeem, relay ping (order rotating)")
        if profiler and args.profile == "latency":
            profiler.enable()
        cpu.begin()
        seq = await sequential(customer, worker, responder, raw, bare, tokens, args.n, args.warmup,
                               price, args.text, args.timeout, tracer, dw, paths)
        cpu_seq = cpu.end()
        if profiler and args.profile == "latency":
            profiler.disable()
        paid, raw_l, nut = seq["paid"], seq["raw"], seq["nutshell"]
        out.update({
            "paid_p50_ms": ms(percentile(paid, 50)),
            "paid_p90_ms": ms(percentile(paid, 90)),
            "paid_p99_ms": ms(percentile(paid, 99)),
            "raw_redeem_p50_ms": ms(percentile(raw_l, 50)),
            "raw_redeem_p90_ms": ms(percentile(raw_l, 90)),
            "nutshell_redeem_p50_ms": ms(percentile(nut, 50)),
            "nutshell_redeem_p90_ms": ms(percentile(nut, 90)),
            "nutshell_parse_p50_ms": ms(percentile(seq["nutshell_prep"], 50)),
            "relay_rtt_p50_ms": ms(percentile(seq["rtt"], 50)),
            "ratio": round(percentile(paid, 50) / percentile(nut, 50), 3),
            "ratio_vs_wrapper_receive": round(percentile(paid, 50) / percentile(raw_l, 50), 3),
            "ratio_note": ("ratio = paid_p50_ms / nutshell_redeem_p50_ms: Nutshell's own "
                           "Wallet.redeem(proofs) on a wallet with the mint already loaded, which is "
                           "what a bare script does (DLEQ check + POST /v1/swap + unblind + store); "
                           "ratio_vs_wrapper_receive divides by raw_redeem_p50_ms, our "
                           "EcashWallet.receive (parse + checks + DLEQ + our leaner swap). The paid "
                           "path also crosses the relay twice (relay_rtt_p50_ms) and decrypts NIP-44."),
            "n": len(paid),
            "warmup": args.warmup,
            "price_sat": price,
            "paid_problems": seq["problems"][:10],
            "sequential_cpu": cpu_seq,
        })
        if paths:
            paid_med = percentile(seq["paid_result"], 50)
            rtt_s = percentile(seq["rtt"], 50)
            goal = 1.2 + rtt_s / paid_med
            out.update({
                "paid_result_p50_ms": ms(paid_med),
                "paid_result_p90_ms": ms(percentile(seq["paid_result"], 90)),
                "paid_result_phases_p50_ms": paid_phases(seq["paid_ids"], customer),
                "relay_rtt_s": round(rtt_s, 4),
                "delivery_ratio_goal": round(goal, 3),
            })
            for path in paths:
                med = percentile(path.times, 50)
                found = delivery_phases(path, customer, dw)
                out.update({
                    f"{path.name}_p50_ms": ms(med),
                    f"{path.name}_p90_ms": ms(percentile(path.times, 90)),
                    f"{path.name}_ratio": round(med / paid_med, 3),
                    f"{path.name}_within_goal": med / paid_med <= goal,
                    f"{path.name}_n": len(path.times),
                    f"{path.name}_poll_seconds": path.poll_seconds,
                    f"{path.name}_problems": path.problems[:10],
                    f"{path.name}_phases_p50_ms": found["phases"],
                    f"{path.name}_checkstate": found["checkstate"],
                })
                if path.lazy_first_check:
                    out[f"{path.name}_lazy_first_check"] = True
            out["delivery_ratio_paired_p50"] = round(percentile(seq["pairs"], 50), 3)
            out["delivery_note"] = (
                "delivery_ratio = delivery_p50_ms / paid_result_p50_ms: request -> decrypted "
                "result, the same text-stats job paid on delivery (offer, check, HTLC swap at the "
                "mint, nutzap, the worker's check of the HTLC ecash, result; the worker's swap of "
                "that ecash follows the result, off this path; await_delivery's opened Result) "
                "over paid before (token in the request; Customer.result's decrypted Result), "
                "interleaved, medians. delivery_ratio_paired_p50: the median of the per-step "
                "ratios. relay_rtt_s: the median ping->pong (customer -> relay -> responder -> "
                "relay -> customer). delivery_ratio_goal = 1.2 + relay_rtt_s / paid_result median. "
                "Phases are medians of each leg, so they need not add up."
                + (" delivery_alt: the same path, interleaved, with what --alt-* passes to "
                   "await_delivery instead (an experiment)." if len(paths) > 1 else ""))
        if tracer is not None:
            out["paid_hops_p50_ms"] = tracer.hops(seq["paid_ids"], customer.sent, customer.first_feedback)
            for path in paths:
                out[f"{path.name}_hops_p50_ms"] = tracer.delivery_hops(path.ids, customer)
            out["swap_http_p50_ms"] = tracer.swap_report()
            tracer.recording = False

        if args.concurrent:
            # The delivery jobs' ecash is swapped after their results (deliver_before_redeem):
            # let the last of those swaps land before the books of this phase are opened.
            await settle(worker, [i for path in paths for i in path.ids])
            provider_before = await worker.cashier.wallet.total_balance()
            eprint(f"concurrent: {args.concurrent} paid jobs at once, "
                   f"max_concurrent_jobs={args.max_concurrent_jobs}")
            if profiler and args.profile == "concurrent":
                profiler.enable()
            cpu.begin()
            conc = await concurrent(customer, worker, tokens["concurrent"], price, args.text,
                                    args.concurrent_timeout, tracer)
            cpu_conc = cpu.end()
            if profiler and args.profile == "concurrent":
                profiler.disable()
            await settle(worker, conc["ids"])
            provider_after = await worker.cashier.wallet.total_balance()
            expected = args.concurrent * price

            # The worker's books: one row per token, each consumed, received = price.
            token_ids = {customer_wallet.inspect(tok).token_id for tok in tokens["concurrent"]}
            rows = [r for r in worker.store.payments(limit=100_000) if r["token_id"] in token_ids]
            all_rows = worker.store.payments(limit=100_000)
            rows_ok = (len(rows) == args.concurrent
                       and {r["job_id"] for r in rows} == set(conc["ids"])
                       and all(r["state"] == "consumed" and r["received"] == price and r["offered"] == price
                               and r["change_sent"] == 0 and r["refund_sent"] == 0 for r in rows))
            spent = [await customer_wallet.check_spent(tok) for tok in tokens["concurrent"]]
            nutzaps = await customer.nutzaps_received(timeout=2)
            customer_final = await customer_wallet.total_balance()
            unspent_ok = await provider_proofs_unspent(worker.cashier.wallet, mint.url)
            provider_delta = provider_after - provider_before
            customer_delta = customer_before_conc - customer_after_conc
            checks = {
                "provider_delta": provider_delta,
                "customer_delta": customer_delta,
                # Whatever left the customer is either with the provider or still an unspent
                # token the customer can take back: no sat vanished or was counted twice.
                "value_conserved": provider_delta + price * spent.count(False) == customer_delta,
                "customer_unchanged_since": customer_final == customer_after_conc,
                "tokens_spent_at_mint": sum(spent),
                "nutzaps_to_customer": len(nutzaps),
                "store_rows_ok": rows_ok,
                "store_rows": len(rows),
                "provider_proofs_unspent": unspent_ok,
            }
            balance_ok = (provider_delta == expected and customer_delta == expected
                          and checks["customer_unchanged_since"] and all(spent)
                          and not nutzaps and rows_ok and unspent_ok is not False)
            out.update({
                "concurrent_jobs": args.concurrent,
                "concurrent_ok": conc["ok"],
                "balance_ok": balance_ok,
                "balance_checks": checks,
                "concurrent_seconds": round(conc["seconds"], 3),
                "concurrent_feedback_p50_ms": ms(percentile(conc["feedback_latency"], 50)),
                "concurrent_result_p50_ms": ms(percentile(conc["result_latency"], 50)),
                "concurrent_result_max_ms": ms(max(conc["result_latency"], default=float("nan"))),
                "concurrent_problems": conc["problems"][:10],
                "concurrent_cpu": cpu_conc,
            })
        else:
            all_rows = worker.store.payments(limit=100_000)

        # The whole run's books: every paid job once, nothing left half-way.
        total_jobs = len(tokens["paid"]) + args.concurrent
        states = Counter(r["state"] for r in all_rows)
        out["payment_states"] = dict(states)
        out["provider_balance_sat"] = await worker.cashier.wallet.total_balance()
        delivered = 0
        if dw is not None:
            delivered = sum(args.warmup + args.n - len(path.problems) for path in paths)
            spent_on_delivery = delivery_before - await delivery_wallet.total_balance()
            out["delivery_books"] = {"customer_spent_sat": spent_on_delivery,
                                     "expected_sat": delivered * price,
                                     "ok": spent_on_delivery == delivered * price}
        out["provider_balance_expected_sat"] = (total_jobs - len(seq["problems"]) + delivered) * price
        out["raw_wallet_balance_sat"] = await raw.total_balance()
        out["nutshell_wallet_balance_sat"] = bare.balance()
        out["token_proofs"] = proof_counts
        out["worker_counts"] = dict(worker.counts)
        out["loadavg_1m_after"] = loadavg()
        out["cpus"] = os.cpu_count()
        out.update({
            "max_concurrent_jobs": args.max_concurrent_jobs,
            "python": platform.python_version(),
            "mint": "Nutshell 0.21 FakeWallet on 127.0.0.1",
            "relay": "nostr-relay 1.14 on 127.0.0.1",
        })
        if profiler:
            stats = pstats.Stats(profiler, stream=sys.stderr)
            if args.profile_out:
                stats.dump_stats(args.profile_out)
            stats.sort_stats("cumulative").print_stats(50)
            stats.sort_stats("tottime").print_stats(30)
        return out
    finally:
        if tracer is not None:
            tracer.uninstall()
        for obj in (customer and customer.pool, responder and responder.pool):
            if obj is not None:
                await obj.close()
        for w in (raw, customer_wallet, delivery_wallet):
            if w is not None:
                await w.close()
        if bare is not None:
            await bare.close()
        if worker is not None:
            await worker.stop(grace=2.0)
        relay.stop()
        if mint is not None:
            mint.stop()
        if args.keep:
            eprint(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=40, help="measured sequential steps")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--concurrent", type=int, default=30, help="paid jobs submitted at once (0: skip)")
    ap.add_argument("--price", type=int, default=5, help="sat per text-stats job; tokens are this size")
    ap.add_argument("--max-concurrent-jobs", type=int, default=8)
    ap.add_argument("--timeout", type=float, default=30.0, help="per sequential request")
    ap.add_argument("--concurrent-timeout", type=float, default=120.0)
    ap.add_argument("--text", default="some text")
    ap.add_argument("--no-delivery", action="store_true", help="leave out the pay-on-delivery path")
    ap.add_argument("--poll-seconds", type=float, default=2.0,
                    help="Customer.await_delivery's poll_seconds on the delivery path (its default: 2.0)")
    ap.add_argument("--alt-poll-seconds", type=float, default=None,
                    help="experiment: add a second delivery path, interleaved, with this poll_seconds")
    ap.add_argument("--alt-no-prepare", action="store_true",
                    help="delivery_alt makes the HTLC ecash only when the offer comes (as before the "
                         "terms were announced at acceptance)")
    ap.add_argument("--alt-lazy-first-check", action="store_true",
                    help="experiment: add a second delivery path, interleaved, whose await_delivery "
                         "waits for the result event before its first checkstate (LazyFirstCheck)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, stores)")
    ap.add_argument("--trace", action="store_true",
                    help="add paid_hops_p50_ms and swap_http_p50_ms (wraps a few methods)")
    ap.add_argument("--profile", choices=["latency", "concurrent"], default=None,
                    help="cProfile this process during that phase (printed to stderr)")
    ap.add_argument("--profile-out", default=None, help="also dump the pstats to this file")
    args = ap.parse_args()
    result = asyncio.run(main_async(args))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
