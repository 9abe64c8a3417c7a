"""Getting paid in ecash for a job, and paying back: the worker's cashier.

A job is paid before any work starts, and the customer never loses a sat:
- a payment pays only the job its lock names, or the payer its refund key names (`locks`):
  copied into someone else's request or nutzap it pays nothing there, and money goes back only
  to the key the payer chose (its NUT-11 refund key) or to the job's customer;
- a token is recorded in the store before anything is done with it, so it pays once, across
  restarts; the swap at the mint happens before the job is queued, and a job killed during the
  swap finishes it after the restart;
- a mint that is down means "wait and retry", never "lost": the token is kept until redeemed;
- ecash owed back (change, refunds) is written down before it is made, and delivered by a
  retrying outbox: the nutzap is signed and stored with the proofs it carries.

Ways to pay (the `cashu` tag holds a token; NIP-90 itself never mentions ecash):
1. `["cashu", token]` (or `["param", "cashu", token]`) inside the encrypted params of a private
   request: a plain token, or one locked as in 2;
2. `["cashu", token]` in a public request, P2PK-locked (NUT-11) to the DVM's wallet key with a
   `refund` key of the request's author (a lock without one cannot be told from a copy);
3. nothing: the DVM answers `payment-required` with the amount and a NUT-18 request that asks for
   a lock to the key derived for this job alone, and the customer sends a kind-9321 nutzap that
   `e`-tags the job request.
4. pay on delivery (`collect(..., delivery=OnDelivery)`): nothing before the work; once the result
   is sealed and offered, a nutzap whose proofs are HTLC-locked (NUT-14) to the hash of the
   job's preimage and the job's key, redeemed with that preimage (which the mint then shows the
   customer).
A plain token in a public tag is refused and left alone: anyone reading the relay could take it.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

import structlog

from dvm_core.protocol.ecash import (NUTZAP_INFO_KIND, HtlcTerms, TokenFormatError, build_nutzap, build_nutzap_info,
                    decode_token, encode_payment_request, p2pk_lock, parse_nutzap, parse_nutzap_info)
from dvm_core.protocol.events import InvalidEvent, Keys, verify_event
from .crashpoints import crashpoint
from .locks import Binding, bind, payer_named
from .p2pk_keys import compressed_pubkey
from .wallet_types import PaymentError
from dvm_core.protocol.nip90 import JobRequest
from dvm_core.state.jobstate import AWAITING_PAYMENT, JobState
from dvm_core.state.store import Store

log = structlog.get_logger("dvm.payments")

LOCKTIME_MARGIN_SECONDS = 600
# A delivered job's swap waits for its result to reach a relay, at most this long.
AFTER_RESULT_SECONDS = 5.0
# Ecash owed back whose mint does not answer: tried again after this long, doubling up to the max.
RETURN_RETRY_SECONDS = 5.0
RETURN_RETRY_MAX_SECONDS = 600.0
MAX_PENDING_FOR_UNKNOWN_JOBS = 1000   # nutzaps kept for job requests this DVM has not seen (yet)


@dataclass
class _Received:
    amount: int


@dataclass(frozen=True)
class OnDelivery:
    """What pays for a job on delivery: ecash locked by `terms` (NUT-14), redeemed with
    `preimage`, asked for by `payment_request` until `deadline` (unix time)."""

    terms: HtlcTerms
    preimage: bytes
    payment_request: str
    deadline: float
    release_first: bool = True   # send the result once the ecash is checked, swap it afterwards


class PaymentRefused(Exception):
    """A payment that will not pay for the job; the message is for the customer."""


@dataclass
class Paid:
    token_id: str
    mint: str
    unit: str
    amount: int          # what arrived after fees
    price: int
    method: str
    warning: str = ""


NOT_BOUND = ("it is locked to this DVM's key but names no refund key of yours, so it cannot be "
             "told from a copy of someone else's payment")


class Cashier:
    def __init__(self, *, wallet, store: Store, keys: Keys, mints: list[str], unit: str,
                 sign: Callable[[int, str, list], dict],
                 publish: Callable[[dict, str, str | None], Awaitable[bool]],
                 query: Callable[[list[dict], float], Awaitable[list[dict]]],
                 spawn: Callable[[Awaitable], asyncio.Task],
                 mint_retry_seconds: float, payment_timeout: float):
        self.wallet = wallet
        self.store = store
        self.keys = keys
        self.mints = mints
        self.unit = unit
        self._sign = sign          # (kind, content, tags) -> a signed event
        self._publish = publish    # (event, role, job_id) -> published (retried while stored)
        self._query = query        # (filters, timeout) -> events
        self._spawn = spawn
        self.mint_retry_seconds = mint_retry_seconds
        self.payment_timeout = payment_timeout
        self._signals: dict[str, asyncio.Event] = {}   # jobs waiting for a nutzap
        self._cancelled: set[str] = set()              # ...whose customer cancelled the wait
        self._delivering: set[int] = set()
        self._returning: set[str] = set()              # tokens being given back (`_keep_returning`)
        # Making a payout's proofs and storing them with it, one payout at a time: a payout cut
        # off while they were made looks for them among ours, and must not take another's.
        self._payout_lock = asyncio.Lock()

    @property
    def p2pk_pubkey(self) -> str:
        return self.wallet.p2pk_pubkey

    def nutzap_info(self, relays: list[str]) -> tuple[int, str, list[list[str]]]:
        return build_nutzap_info(relays, self.mints, [self.unit], self.p2pk_pubkey)

    def start(self) -> None:
        """After a restart: deliver what is still owed, settle nutzaps whose job has ended, and
        forget those kept for a request that never came."""
        for row in self.store.open_payouts():
            self._spawn(self._deliver(row["id"]))
        stale = time.time() - self.payment_timeout
        for row in self.store.pending_nutzaps():
            if self.store.get_job(row["job_id"]) is None:
                if row["created"] < stale:
                    self.store.set_nutzap(row["event_id"], "expired")
            elif not self._waits_for_payment(row["job_id"]):
                self._spawn(self._return_stray(row))
        for row in self.store.delivered_unredeemed():
            self._spawn(self._redeem_delivered(row))
        for row in self.store.payments_to_return():
            if row["state"] != "returning":   # killed between recording it and marking it so
                self.store.set_payment(row["token_id"], "returning")
            self._keep_returning(row["token_id"])

    # whose payment is it? ------------------------------------------------------
    def token_in(self, request: JobRequest, private_tags: list | None) -> tuple[str, str] | None:
        """The token offered with a request and how it came: (token, method) or None."""
        for tag in private_tags or []:
            if len(tag) >= 2 and tag[0] == "cashu":
                return tag[1], "encrypted"
            if len(tag) >= 3 and tag[0] == "param" and tag[1] == "cashu":
                return tag[2], "encrypted"
        for tag in request.event.get("tags", []):
            if (len(tag) >= 2 and tag[0] == "cashu") or (len(tag) >= 3 and tag[:2] == ["param", "cashu"]):
                text = tag[1] if tag[0] == "cashu" else tag[2]
                try:
                    token = decode_token(text)
                except TokenFormatError:
                    return text, "public"
                locks = {p2pk_lock(p)[0] for p in token.proofs}
                return text, "p2pk" if locks != {None} else "public"
        return None

    def _binding(self, proofs, job_id: str | None) -> Binding:
        def job_for_key(key: str) -> str | None:
            if job_id is not None and key == self.wallet.job_lock_pubkey(job_id):
                return job_id
            return self.store.job_for_lock(key)
        return bind(proofs, dvm_pubkey=self.p2pk_pubkey, job_for_key=job_for_key)

    async def _owner(self, request: JobRequest, token: str, method: str, sender: str) -> str | None:
        """Check that `token` is this job's to take; returns the key money goes back to (None:
        the customer's). Raises PaymentRefused, before anything is redeemed."""
        try:
            proofs = self.wallet.inspect(token).proofs    # the wallet's checks, with its words
        except PaymentError as exc:
            raise PaymentRefused(exc.customer_message) from None
        binding = self._binding(proofs, request.id)
        if binding.kind == "bearer":
            if method == "encrypted":
                return None
            raise PaymentRefused(
                "The token is not locked and was in a public event, where anyone reading the relay "
                "can take it; this DVM did not redeem it. Move it back into your wallet now, then pay "
                "inside an encrypted request or as the payment request asks.")
        if binding.kind == "job":
            if binding.job_id == request.id:
                return binding.refund_key
            raise PaymentRefused(f"The ecash is locked for another job ({binding.job_id[:12]}…), not "
                                 "this one; it was not redeemed.")
        if binding.kind == "payer":
            if sender == request.pubkey:
                if payer_named(binding, [request.pubkey]):
                    return binding.refund_key
                wallet_key = await self._wallet_key_of(request.pubkey)
                if wallet_key and payer_named(binding, [wallet_key]):
                    return binding.refund_key
            raise PaymentRefused("The token's refund key is not a key of this request's author, so it "
                                 "is someone else's payment; it was not redeemed.")
        if binding.kind == "unbound":
            raise PaymentRefused(f"The token was not redeemed: {NOT_BOUND}. Lock it to the key this "
                                 "job's payment request names, or add your key as its NUT-11 refund key.")
        if binding.kind == "foreign":
            raise PaymentRefused(f"The token is locked to another key ({binding.lock_key}), not to this "
                                 f"DVM's key {self.p2pk_pubkey}; it was not redeemed.")
        raise PaymentRefused("The token mixes locked and unlocked proofs (or several locks); it was "
                             "not redeemed.")

    # paying for a job ----------------------------------------------------------
    async def collect(self, request: JobRequest, price: int, offered: tuple[str, str] | None,
                      time_limit: float, say: Callable[[str, str, str], None], *,
                      delivery: OnDelivery | None = None) -> Paid:
        """Take payment of `price` for `request`, waiting for a nutzap when nothing was offered.

        `say(status, message, content)` sends feedback. Raises PaymentRefused; by then nothing
        was taken from the customer (a token that was swapped and cannot pay is sent back).
        With `delivery` (pay on delivery, the result sealed and offered already), only a nutzap
        HTLC-locked as its terms say pays, until its deadline; redeeming it reveals the preimage.
        """
        min_locktime = int(time.time() + time_limit + LOCKTIME_MARGIN_SECONDS)
        done = self.store.payment_for_job(request.id)
        if done is not None and done["state"] in ("redeemed", "consumed"):
            # A restart between the swap and the job's start: run without asking again.
            return Paid(done["token_id"], done["mint"], done["unit"], done["received"], done["price"],
                        done["method"])
        if done is not None and done["state"] in ("received", "redeeming"):
            # Killed while redeeming: finish the swap with the token it had recorded.
            paid = await self._redeem(request, price, done["token"], done["method"], done["refund_to"],
                                      min_locktime, say, delivery)
            for row in self.store.pending_nutzaps(request.id):   # the nutzap that brought it
                if row["token"] == done["token"]:
                    self.store.set_nutzap(row["event_id"], "used")
            return paid
        if offered is not None and delivery is None:
            token, method = offered
            refund_to = await self._owner(request, token, method, request.pubkey)
            return await self._redeem(request, price, token, method, refund_to, min_locktime, say)
        return await self._await_nutzap(request, price, min_locktime, say, delivery)

    async def _await_nutzap(self, request: JobRequest, price: int, min_locktime: int, say,
                            delivery: OnDelivery | None = None) -> Paid:
        lock = self.wallet.job_lock_pubkey(request.id)
        if delivery is None:
            with self.store.atomic():
                self.store.add_job_lock(lock, request.id)
                self.store.set_state(request.id, JobState.PAYMENT_REQUIRED)
            crashpoint("payment-required")
            creq = encode_payment_request(
                payment_id=request.id[:16], amount=price, unit=self.unit, mints=self.mints,
                description=f"NIP-90 job {request.id}", nostr_target=self.keys.npub, lock_pubkey=lock)
            how = (f"pay {price} {self.unit}: a NIP-61 nutzap (kind 9321) tagging this job request, "
                   f"P2PK-locked to {lock} (this job's own key) on {', '.join(self.mints)}")
            timeout = self.payment_timeout
        else:   # the offer that asks for it is out already (stored with the sealed result)
            creq = delivery.payment_request
            how = (f"pay {price} {self.unit} on delivery: a NIP-61 nutzap (kind 9321) tagging this "
                   f"job request, HTLC-locked (NUT-14) as the offer's payment request asks")
            timeout = delivery.deadline - time.time()
        signal = self._signals.setdefault(request.id, asyncio.Event())
        if not self.store.pending_nutzaps(request.id) and delivery is None:
            say("payment-required", how, creq)
        deadline = time.monotonic() + timeout
        try:
            while True:
                for row in self.store.pending_nutzaps(request.id):
                    try:
                        refund_to = await self._owner(request, row["token"], "nutzap", row["sender"])
                        if delivery is not None and delivery.release_first:
                            paid = await self._accept_htlc(request, price, row["token"], refund_to, delivery)
                        else:
                            paid = await self._redeem(request, price, row["token"], "nutzap", refund_to,
                                                      min_locktime, say, delivery)
                    except PaymentRefused as exc:
                        self.store.set_nutzap(row["event_id"], "refused")
                        log.warning("a nutzap did not pay its job; still waiting", job_id=request.id,
                                    nutzap=row["event_id"], sender=row["sender"], reason=str(exc))
                        if row["sender"] == request.pubkey and delivery is None:
                            say("payment-required", f"{exc} Still waiting for payment; {how}", creq)
                        elif row["sender"] == request.pubkey:   # the offer stands as it was
                            say("processing", f"{exc} Still waiting for payment; {how}", "")
                        continue
                    self.store.set_nutzap(row["event_id"], "used")
                    return paid
                if request.id in self._cancelled:
                    self.settle(request.id)
                    raise PaymentRefused("cancelled by the customer before paying; nothing was charged")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self.settle(request.id)
                    raise PaymentRefused(f"no payment arrived within {timeout:g} s; the job "
                                         "was dropped")
                signal.clear()
                try:
                    await asyncio.wait_for(signal.wait(), remaining)
                except asyncio.TimeoutError:
                    pass
        finally:
            self._signals.pop(request.id, None)
            self._cancelled.discard(request.id)

    async def _accept_htlc(self, request: JobRequest, price: int, token: str, refund_to: str | None,
                           delivery: OnDelivery) -> Paid:
        """Pay on delivery, the result released before the swap: record the token, then check
        everything but the swap (`EcashWallet.check_htlc_payment`). Ecash that passes can be
        spent before its locktime only with the job's key and the preimage, both ours; the
        caller stores the result and hands the swap to `redeem_delivered`."""
        try:
            info = self.wallet.inspect(token)
        except PaymentError as exc:
            raise PaymentRefused(exc.customer_message) from None
        holder = self.store.record_payment(info.token_id, request.id, request.pubkey, "nutzap",
                                           info.mint, info.unit, info.amount, price, token, refund_to)
        if holder is not None and holder["job_id"] != request.id:
            raise PaymentRefused(f"this token already paid for job {holder['job_id']}; send a new one")
        crashpoint("payment-recorded")
        deadline = min(time.monotonic() + self.mint_retry_seconds,
                       time.monotonic() + delivery.deadline - time.time())
        delay = 1.0
        while True:
            try:
                amount = await self.wallet.check_htlc_payment(
                    token, min_amount=price, job_id=request.id, htlc=delivery.terms, preimage=delivery.preimage)
                crashpoint("htlc-checked")
                return Paid(info.token_id, info.mint, info.unit, amount, price, "nutzap")
            except PaymentError as exc:
                if exc.retryable and time.monotonic() + delay < deadline:   # the mint's keys, not fetched
                    log.warning("mint unreachable; retrying", mint=info.mint, error=str(exc))
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 30.0)
                    continue
                self.store.set_payment(info.token_id, "rejected", error=exc.customer_message)
                raise PaymentRefused(exc.customer_message) from None

    def redeem_delivered(self, job_id: str, after: asyncio.Future | None = None) -> None:
        """Swap, in the background, the ecash of a delivered job whose result went out once the
        ecash was checked (`_accept_htlc`); retried until its locktime. Also after a restart.
        `after`: the result's publishing; the swap waits for it (at most AFTER_RESULT_SECONDS),
        so that the result reaches the relays before the swap's work competes with it."""
        row = self.store.payment_for_job(job_id)
        if row is not None and row["state"] in ("received", "redeeming"):
            self._spawn(self._redeem_delivered(row, after))

    async def _redeem_delivered(self, row: dict, after: asyncio.Future | None = None) -> None:
        if after is not None:
            await asyncio.wait([after], timeout=AFTER_RESULT_SECONDS)
        if row["state"] == "redeemed":    # swapped and counted; a restart came before `consumed`
            self.consumed(row["job_id"])
            return
        job, delivery = self.store.get_job(row["job_id"]), self.store.delivery(row["job_id"])
        request = JobRequest(id=job.id, pubkey=job.customer, kind=job.kind, created_at=job.created_at)
        terms = HtlcTerms(delivery["hash"], self.wallet.job_lock_pubkey(job.id), delivery["locktime"],
                          delivery["refund_key"])
        due = OnDelivery(terms, bytes.fromhex(delivery["preimage"]), "", delivery["locktime"],
                         release_first=False)

        def say(status: str, message: str, content: str) -> None:   # the customer has its result
            log.info("redeeming a delivered job's ecash", job_id=job.id, status=status, note=message)

        retry_until = time.monotonic() + max(0.0, delivery["locktime"] - time.time())
        try:
            paid = await self._redeem(request, row["price"], row["token"], "nutzap", row["refund_to"],
                                      0, say, due, retry_until=retry_until)
        except PaymentRefused as exc:
            log.error("the ecash of a delivered job could not be redeemed: its result is out, the "
                      "payment is lost", job_id=job.id, amount=row["offered"], mint=row["mint"], reason=str(exc))
            return
        self.consumed(job.id)
        log.info("redeemed the ecash of a delivered job", job_id=job.id, amount=paid.amount, price=paid.price)

    async def _redeem(self, request: JobRequest, price: int, token: str, method: str,
                      refund_to: str | None, min_locktime: int, say,
                      delivery: OnDelivery | None = None, retry_until: float | None = None) -> Paid:
        try:
            info = self.wallet.inspect(token)
        except PaymentError as exc:
            raise PaymentRefused(exc.customer_message) from None
        holder = self.store.record_payment(info.token_id, request.id, request.pubkey, method,
                                           info.mint, info.unit, info.amount, price, token, refund_to)
        if holder is not None and holder["state"] == "returning":
            raise PaymentRefused("this token is being sent back to you (its mint did not answer "
                                 "in time); send a new one")
        if holder is not None and holder["job_id"] != request.id:
            if holder["state"] in ("received", "redeeming"):
                raise PaymentRefused(f"this token is being redeemed for job {holder['job_id']}; send a new one")
            raise PaymentRefused(f"this token already paid for job {holder['job_id']}; send a new one")
        self.store.set_payment(info.token_id, "redeeming")
        crashpoint("payment-recorded")
        deadline = retry_until if retry_until is not None else time.monotonic() + self.mint_retry_seconds
        delay, told = 1.0, False
        locked = method in ("p2pk", "nutzap") or info.locked
        while True:
            try:
                received = await self.wallet.receive(
                    token, min_amount=price, require_lock=method in ("p2pk", "nutzap"),
                    min_locktime=min_locktime, job_id=request.id,
                    **self._swap_notes(info.token_id),
                    **({"htlc": delivery.terms, "preimage": delivery.preimage} if delivery else {}))
                break
            except PaymentError as exc:
                if exc.retryable and time.monotonic() < deadline:
                    if not told:
                        say("processing", f"{exc.customer_message} The job waits for the mint; "
                                          "your token is kept, not lost.", "")
                        told = True
                    log.warning("mint unreachable; retrying", mint=info.mint, error=str(exc))
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 30.0)
                    continue
                marks = self._marks(info.token_id)
                if exc.code == "spent" and marks:
                    # Spent, and we had swapped it: the mint's answer (or we) got lost on the way.
                    # Its signatures are asked for again (NUT-09) and the job runs.
                    try:
                        recovered = await self._recovered(info, marks)
                    except PaymentError as recover_error:
                        if recover_error.retryable and time.monotonic() < deadline:
                            await asyncio.sleep(delay)
                            delay = min(delay * 2, 30.0)
                            continue
                        exc = recover_error   # the swap may have taken place: given back below
                    else:
                        if recovered is not None:
                            log.warning("the mint had swapped the token before its answer was lost; "
                                        "recovered the ecash", job_id=request.id, recovered=recovered)
                            received = _Received(recovered)
                            break
                self.store.set_payment(info.token_id, "rejected", error=exc.customer_message)
                message = exc.customer_message
                # Ecash only this DVM can spend, or that a lost swap may have taken, is not left
                # behind: it goes back to its payer, now or once the mint answers again.
                if (locked and not exc.retryable) or (delivery is None and (locked or marks)):
                    returned = await self._give_back(request, token, refund_to, message, swapped=bool(marks))
                    if returned:
                        message = (message.replace("; it was not redeemed.", ".").rstrip(".") +
                                   f". Only this DVM could spend it, so it redeemed it: it was sent back "
                                   f"to you as a nutzap ({returned} {info.unit}); send a new request "
                                   "or payment.")
                    elif returned is None:
                        message = (message.rstrip(".") + ". This DVM keeps your token and sends it "
                                   "back to you as a nutzap as soon as the mint answers; send a new "
                                   "request or payment.")
                elif exc.retryable:
                    message += " Your token was not redeemed."
                raise PaymentRefused(message) from None
        crashpoint("after-swap")
        paid = Paid(info.token_id, info.mint, info.unit, received.amount, price, method)
        # What arrived, and what of it is owed back, in one transaction.
        if received.amount < price:
            self._owe(request, info.token_id, info.mint, info.unit, refund_to, received.amount, "refund",
                      f"refund: after the mint's fees {received.amount} {info.unit} arrived",
                      payment_state="refunded", received=received.amount)
            raise PaymentRefused(f"after the mint's fees only {received.amount} {info.unit} arrived; the price "
                                 f"is {price} {info.unit}. It was sent back to you as a nutzap.")
        if received.amount > price:
            change = received.amount - price
            self._owe(request, info.token_id, info.mint, info.unit, refund_to, change, "change",
                      "change for your job", payment_state="redeemed", received=received.amount)
            paid.warning = f"{change} {info.unit} of change is on its way to you as a nutzap"
        else:
            self.store.set_payment(info.token_id, "redeemed", received=received.amount)
        crashpoint("payment-redeemed")
        return paid

    async def give_back(self, request: JobRequest, token: str, method: str, reason: str) -> int | None:
        """A token offered for a job that will not run: if it is this customer's and locked to
        us (so spendable by us alone), redeem it and send it back. Returns the amount sent back;
        None: its mint did not answer, and it is sent back once it does (`_give_back`)."""
        try:
            refund_to = await self._owner(request, token, method, request.pubkey)
        except PaymentRefused:
            return 0
        return await self._give_back(request, token, refund_to, reason)

    async def _give_back(self, request: JobRequest, token: str, refund_to: str | None, reason: str,
                         swapped: bool = False) -> int | None:
        """Send back a token that pays for nothing, when only we can spend it (locked to us) or
        a swap of ours whose answer was lost may have taken it (`swapped`). It is recorded as
        `returning` (its swaps' marks kept) before the mint is asked; returns the amount sent
        back, 0 when there is nothing to send back (spent by someone else, not ours to take),
        None when the mint did not answer: tried again in the background until it does, after
        a restart too."""
        try:
            info = self.wallet.inspect(token)
        except PaymentError:
            return 0
        if not info.locked and not swapped:
            return 0   # a plain token was never taken: it is still the customer's
        holder = self.store.record_payment(info.token_id, request.id, request.pubkey, "returned",
                                           info.mint, info.unit, info.amount, 0, token, refund_to)
        if holder is not None and holder["state"] == "returning":
            return None
        if holder is not None and holder["state"] not in ("rejected", "received"):
            return 0
        self.store.set_payment(info.token_id, "returning", error=reason)
        returned = await self._return_now(info.token_id)
        if returned is None:
            log.warning("the mint did not answer; the token is sent back once it does",
                        job_id=request.id, mint=info.mint, amount=info.amount)
            self._keep_returning(info.token_id)
        return returned

    async def _return_now(self, token_id: str) -> int | None:
        """One try at sending back a `returning` token: swapped (or the lost swap's ecash
        recovered), then owed to its payer in one transaction with its new state. Returns the
        amount, 0 if nothing is to be sent back, None if the mint did not answer."""
        row = self.store.payment(token_id)
        if row is None or row["state"] != "returning":
            return 0
        info = self.wallet.inspect(row["token"])
        job = self.store.get_job(row["job_id"])
        request = JobRequest(id=row["job_id"], pubkey=row["customer"], kind=job.kind if job else 0,
                             created_at=job.created_at if job else 0)
        try:
            received = await self.wallet.receive(
                row["token"], min_amount=1, require_lock=info.locked, job_id=row["job_id"],
                **self._swap_notes(token_id))
            amount = received.amount
        except PaymentError as exc:
            marks = self._marks(token_id)
            amount = None
            if exc.code == "spent" and marks:
                try:
                    amount = await self._recovered(info, marks)
                except PaymentError as recover_error:
                    exc = recover_error
            if amount is None and exc.code == "spent" and info.locked:
                # Some of its proofs were spent, by someone who copied them from the public
                # nutzap into one of theirs (given back to its payer): the rest goes back too.
                try:
                    rest = await self.wallet.unspent_part(row["token"])
                    if rest is not None:
                        amount = (await self.wallet.receive(
                            rest, min_amount=1, require_lock=True, job_id=row["job_id"],
                            **self._swap_notes(token_id))).amount
                except PaymentError as rest_error:
                    exc = rest_error
            if amount is None:
                if exc.retryable:
                    return None
                self.store.set_payment(token_id, "rejected", error=exc.customer_message)
                return 0  # not spendable (spent by another, fake, wrong mint): nothing to give back
        self._owe(request, token_id, info.mint, info.unit, row["refund_to"], amount, "refund",
                  f"refund: {row['error']}", payment_state="refunded", received=amount)
        return amount

    def _keep_returning(self, token_id: str) -> None:
        """Try `_return_now` again in the background, ever less often, until the mint answers."""
        if token_id in self._returning:
            return
        self._returning.add(token_id)

        async def go() -> None:
            delay = RETURN_RETRY_SECONDS
            try:
                while True:
                    await asyncio.sleep(delay)
                    try:
                        if await self._return_now(token_id) is not None:
                            return
                    except Exception:
                        log.exception("sending a token back failed; trying again", token_id=token_id)
                    delay = min(delay * 2, RETURN_RETRY_MAX_SECONDS)
            finally:
                self._returning.discard(token_id)

        self._spawn(go())

    def _swap_notes(self, token_id: str) -> dict:
        """`EcashWallet.receive`'s callbacks that note (and forget) a swap's mark on this token's row."""
        return {"before_swap": lambda mark: self.store.add_payment_swap(token_id, mark),
                "swap_refused": lambda mark: self.store.remove_payment_swap(token_id, mark)}

    def _marks(self, token_id: str) -> list[dict]:
        """Where the swaps of this token began (`EcashWallet.receive`'s before_swap)."""
        swap = (self.store.payment(token_id) or {}).get("swap")
        return json.loads(swap) if swap else []

    async def _recovered(self, info, marks: list[dict]) -> int | None:
        """The token is spent and swaps of ours may have spent it: what one of them brought
        (NUT-09), or None if none of them took place. Raises PaymentError (the mint)."""
        happened, recovered = await self.wallet.recover_swap(info.mint, marks)
        if not happened:
            return None
        return min(info.amount, recovered) if recovered else info.amount

    # nutzaps --------------------------------------------------------------------
    def _waits_for_payment(self, job_id: str) -> bool:
        job = self.store.get_job(job_id)
        if job is None or job.state not in AWAITING_PAYMENT:
            return False
        paid = self.store.payment_for_job(job_id)
        return paid is None or paid["state"] not in ("redeemed", "consumed", "refunded")

    def on_nutzap(self, event: dict) -> None:
        try:
            nutzap = parse_nutzap(event)
        except TokenFormatError as exc:
            log.warning("unreadable nutzap", event_id=event.get("id"), reason=str(exc))
            return
        if nutzap.recipient != self.keys.public_key:
            return
        binding = self._binding(nutzap.proofs, nutzap.zapped_event)
        job = self.store.get_job(nutzap.zapped_event) if nutzap.zapped_event else None
        job_id = None
        if binding.kind == "job":
            job_id = binding.job_id
        elif job is not None and job.customer == nutzap.sender:
            job_id = job.id   # the customer's own nutzap: it pays, or they hear why not
        elif binding.kind == "payer" and payer_named(binding, [nutzap.sender]):
            # The payer's own nutzap for no job of ours: theirs to get back.
            self._spawn(self._return_stray({"event_id": nutzap.event_id, "job_id": nutzap.zapped_event,
                                            "sender": nutzap.sender, "token": nutzap.token()},
                                           kind=nutzap.zapped_kind))
            return
        if job_id is None:
            log.info("a nutzap names no job of this DVM's that it could pay; left alone",
                     event_id=nutzap.event_id, sender=nutzap.sender, binding=binding.kind)
            return
        if self.store.get_job(job_id) is None and \
                self.store.count_pending_nutzaps(unknown_jobs=True) >= MAX_PENDING_FOR_UNKNOWN_JOBS:
            # Kept for a request not seen yet: anyone can make such nutzaps (the proofs need not
            # even be real), so only so many are kept.
            log.warning("too many nutzaps wait for requests not seen; this one is left alone",
                        event_id=nutzap.event_id, job_id=job_id)
            return
        if not self.store.add_nutzap(nutzap.event_id, job_id, nutzap.sender, nutzap.token()):
            return  # seen before
        crashpoint("nutzap-kept")
        signal = self._signals.get(job_id)
        if signal is not None:
            signal.set()
        elif not self._waits_for_payment(job_id) and self.store.get_job(job_id) is not None:
            self._spawn(self._return_stray({"event_id": nutzap.event_id, "job_id": job_id,
                                            "sender": nutzap.sender, "token": nutzap.token()}))
        # else: its job is being read (or was not seen yet): it takes the nutzap when it asks

    def cancel_waiting(self, job_id: str) -> None:
        """The customer cancelled a job that waits for payment: stop waiting (nutzaps that came
        for it go back)."""
        signal = self._signals.get(job_id)
        if signal is not None:
            self._cancelled.add(job_id)
            signal.set()

    def settle(self, job_id: str) -> None:
        """A job that will not be paid: nutzaps kept for it go back to their payers."""
        for row in self.store.pending_nutzaps(job_id):
            self._spawn(self._return_stray(row))

    async def _return_stray(self, row: dict, kind: int | None = None) -> None:
        """A nutzap for no job that waits for payment (paid already, ended, or unknown): if it is
        that job's customer's money (or the payer's own), locked to us, send it back to them."""
        paid = self.store.payment_for_job(row["job_id"]) if row["job_id"] else None
        if paid is not None and paid["token"] == row["token"] and paid["state"] in ("redeemed", "consumed"):
            # The nutzap that paid its job, redeemed just before a restart: used, not returned.
            self.store.set_nutzap(row["event_id"], "used")
            return
        job = self.store.get_job(row["job_id"]) if row["job_id"] else None
        if job is not None:
            request = JobRequest(id=job.id, pubkey=job.customer, kind=job.kind, created_at=job.created_at)
        else:
            request = JobRequest(id=row["job_id"] or row["event_id"], pubkey=row["sender"],
                                 kind=kind or 0, created_at=0)
        reason = ("no job of this DVM is waiting for this payment (unknown job, already paid, or "
                  "ended); it was sent back to you")
        try:
            refund_to = await self._owner(request, row["token"], "nutzap", row["sender"])
        except PaymentRefused as exc:
            self.store.set_nutzap(row["event_id"], "refused")
            log.info("a nutzap for no job that waits for payment; left alone",
                     job_id=request.id, reason=str(exc))
            return
        returned = await self._give_back(request, row["token"], refund_to, reason)
        self.store.set_nutzap(row["event_id"], "returned")
        log.info("returned a nutzap for no waiting job", job_id=request.id, amount=returned)

    # paying back -------------------------------------------------------------------
    def paid_for(self, job_id: str) -> bool:
        """Whether a payment for this job was taken (received, being redeemed, redeemed or used):
        a job resumed after a restart is not asked to pay again."""
        row = self.store.payment_for_job(job_id)
        return (row is not None and row["method"] != "returned"
                and row["state"] in ("received", "redeeming", "redeemed", "consumed"))

    def refundable(self, job_id: str) -> int:
        """What is still held of a job's payment: what would be refunded."""
        row = self.store.payment_for_job(job_id)
        if row is None or row["state"] != "redeemed":
            return 0
        return max(0, (row["received"] or 0) - row["change_sent"] - row["refund_sent"])

    def refund_job(self, request: JobRequest, reason: str, keep: int = 0) -> int:
        """Refund what is still held of a job's payment, less `keep` (a fee the provider
        announces). Returns the amount owed back (0: nothing to refund). Inside the caller's
        `store.atomic()`, the debt is written with whatever else the caller writes there."""
        amount = max(0, self.refundable(request.id) - keep)
        if amount:
            row = self.store.payment_for_job(request.id)
            self._owe(request, row["token_id"], row["mint"], row["unit"], row["refund_to"], amount,
                      "refund", f"refund: {reason}", payment_state="refunded")
        return amount

    def return_unfinished(self, job_id: str, reason: str) -> bool:
        """A job refused with its payment recorded but not redeemed (a restart cut the swap
        short, then the resumed job was refused before paying resumed): the token is sent back
        (`returning`, tried until the mint answers; a swap that did happen is recovered from its
        marks). Nothing else swaps it then: the job will not collect again. Returns whether one
        was. Inside the caller's `store.atomic()`; the retry starts after it."""
        row = self.store.payment_for_job(job_id)
        if row is None or row["method"] == "returned" or row["state"] not in ("received", "redeeming"):
            return False
        self.store.set_payment(row["token_id"], "returning", error=reason)
        self._keep_returning(row["token_id"])
        return True

    def consumed(self, job_id: str) -> None:
        row = self.store.payment_for_job(job_id)
        if row is not None and row["state"] == "redeemed":
            self.store.set_payment(row["token_id"], "consumed")

    def _owe(self, request: JobRequest, token_id: str | None, mint: str, unit: str,
             refund_to: str | None, amount: int, role: str, comment: str, *,
             payment_state: str | None = None, received: int | None = None) -> None:
        if amount <= 0:
            return
        payout = self.store.owe(job_id=request.id, token_id=token_id, role=role, customer=request.pubkey,
                                lock_to=refund_to, mint=mint, unit=unit, amount=amount, comment=comment,
                                zapped_kind=request.kind or None, payment_state=payment_state,
                                received=received)
        crashpoint("payout-owed")
        self._spawn(self._deliver(payout))   # starts after the caller's transaction, if any

    async def _deliver(self, payout_id: int) -> None:
        """Make the ecash of a payout and hand its nutzap to the outbox, retrying until done."""
        if payout_id in self._delivering:
            return
        self._delivering.add(payout_id)
        delay = 1.0
        try:
            while True:
                row = self.store.payout(payout_id)
                if row is None or row["state"] == "sent":
                    return
                try:
                    await self._deliver_once(row)
                    return
                except PaymentError as exc:
                    self.store.set_payout(payout_id, row["state"], error=exc.customer_message)
                    log.warning("could not send ecash back yet; retrying", job_id=row["job_id"],
                                amount=row["amount"], role=row["role"], error=exc.customer_message,
                                retry_in=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 300.0)
        finally:
            self._delivering.discard(payout_id)

    async def _deliver_once(self, row: dict) -> None:
        lock = row["lock_to"] or await self._customer_lock(row["customer"])
        proofs = []
        async with self._payout_lock:
            if row["state"] == "sending":
                # Killed while the mint was making them: they may be in our wallet already.
                found = await self.wallet.locked_proofs(row["mint"], lock, exclude=self.store.payout_secrets())
                if sum(p["amount"] for p in found) == row["amount"]:
                    proofs = found
            if not proofs:
                self.store.set_payout(row["id"], "sending", lock_to=lock, attempt=True)
                crashpoint("payout-sending")
                proofs = await self.wallet.send_proofs(row["amount"], row["mint"], lock_to=lock)
                crashpoint("payout-made")
            kind, content, tags = build_nutzap(row["mint"], proofs, row["customer"], unit=row["unit"],
                                               zapped_event=row["job_id"], zapped_kind=row["zapped_kind"],
                                               comment=row["comment"])
            event = self._sign(kind, content, tags)
            self.store.payout_sent(row["id"], proofs, event, row["role"], row["job_id"])
            crashpoint("payout-stored")
        log.info("ecash sent back", role=row["role"], job_id=row["job_id"], amount=row["amount"],
                 locked_to=lock[:10])
        await self._publish(event, row["role"], row["job_id"])

    async def _wallet_key_of(self, pubkey: str) -> str | None:
        """The P2PK key in `pubkey`'s own kind 10019 (NIP-61), if it publishes one. Only events
        signed by `pubkey` count: a relay can return anyone's."""
        try:
            events = await self._query([{"kinds": [NUTZAP_INFO_KIND], "authors": [pubkey], "limit": 1}], 2.0)
        except Exception:
            events = []
        for event in sorted(events, key=lambda e: e["created_at"], reverse=True):
            if event.get("pubkey") != pubkey or event.get("kind") != NUTZAP_INFO_KIND:
                continue
            try:
                verify_event(event)   # the pool checks too; a refund's key is worth checking twice
            except InvalidEvent:
                continue
            info = parse_nutzap_info(event)
            if info.p2pk_pubkey:
                try:
                    return compressed_pubkey(info.p2pk_pubkey)
                except ValueError:
                    continue
        return None

    async def _customer_lock(self, pubkey: str) -> str:
        """The key to lock ecash for a customer: their NIP-61 wallet key if they publish one,
        else their Nostr key (as NIP-61 says, prefixed 02)."""
        return await self._wallet_key_of(pubkey) or "02" + pubkey
