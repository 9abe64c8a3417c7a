"""Getting paid in ecash for a job, and paying back: the worker's cashier.

A job is paid before any work starts, and the customer never loses a sat:
- a token is recorded in the store before anything is done with it, so it pays once, across
  restarts; the swap at the mint happens before the job is queued;
- a mint that is down means "wait and retry", never "lost": the token is kept until redeemed;
- over-payment comes back as change, and a job that fails for a reason that is not the
  customer's is refunded, both as NIP-61 nutzaps P2PK-locked to the customer.

Ways to pay (the `cashu` tag holds a token; NIP-90 itself never mentions ecash):
1. `["cashu", token]` inside the encrypted params of a private request;
2. `["cashu", token]` in a public request, P2PK-locked (NUT-11) to the DVM's wallet key;
3. nothing: the DVM answers `payment-required` with the amount and a NUT-18 request, and the
   customer sends a kind-9321 nutzap that `e`-tags the job request;
4. an unlocked token in a public tag: accepted, with a warning that anyone could have taken it.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

import structlog

from .ecash import (NUTZAP_INFO_KIND, Nutzap, TokenFormatError, build_nutzap, build_nutzap_info,
                    decode_token, encode_payment_request, p2pk_lock, parse_nutzap, parse_nutzap_info)
from .events import Keys
from .nip90 import JobRequest
from .store import Store

log = structlog.get_logger("dvm.payments")

LOCKTIME_MARGIN_SECONDS = 600


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


class Cashier:
    def __init__(self, *, wallet, store: Store, keys: Keys, mints: list[str], unit: str,
                 publish: Callable[[int, str, list, str, str | None], Awaitable[None]],
                 query: Callable[[list[dict], float], Awaitable[list[dict]]],
                 mint_retry_seconds: float, payment_timeout: float):
        self.wallet = wallet
        self.store = store
        self.keys = keys
        self.mints = mints
        self.unit = unit
        self._publish = publish    # (kind, content, tags, role, job_id) -> signs, stores, publishes
        self._query = query        # (filters, timeout) -> events
        self.mint_retry_seconds = mint_retry_seconds
        self.payment_timeout = payment_timeout
        self._awaiting: dict[str, asyncio.Future] = {}
        self._early: dict[str, Nutzap] = {}  # nutzaps that came before their job asked (a replay)
        self._stray: set[str] = set()

    @property
    def p2pk_pubkey(self) -> str:
        return self.wallet.p2pk_pubkey

    def nutzap_info(self, relays: list[str]) -> tuple[int, str, list[list[str]]]:
        return build_nutzap_info(relays, self.mints, [self.unit], self.p2pk_pubkey)

    # paying for a job ----------------------------------------------------------
    def token_in(self, request: JobRequest, private_tags: list | None) -> tuple[str, str] | None:
        """The token offered with a request and how it came: (token, method) or None."""
        for tag in private_tags or []:
            if len(tag) >= 2 and tag[0] == "cashu":
                return tag[1], "encrypted"
        for tag in request.event.get("tags", []):
            if len(tag) >= 2 and tag[0] == "cashu":
                try:
                    token = decode_token(tag[1])
                except TokenFormatError:
                    return tag[1], "public"
                locks = {p2pk_lock(p)[0] for p in token.proofs}
                return tag[1], "p2pk" if locks != {None} else "public"
        return None

    async def collect(self, request: JobRequest, price: int, offered: tuple[str, str] | None,
                      time_limit: float, say: Callable[[str, str, str], None]) -> Paid:
        """Take payment of `price` for `request`, waiting for a nutzap when nothing was offered.

        `say(status, message, content)` sends feedback. Raises PaymentRefused; by then nothing
        was taken from the customer (a token that was swapped and cannot pay is refunded).
        """
        done = self.store.payment_for_job(request.id)
        if done is not None and done["state"] in ("redeemed", "consumed"):
            # A restart between the swap and the job's start: run without asking again.
            return Paid(done["token_id"], done["mint"], done["unit"], done["received"], done["price"], done["method"])
        if done is not None and done["state"] in ("received", "redeeming"):
            offered = (done["token"], done["method"])
        if offered is None:
            offered = await self._ask_for_payment(request, price, say)
        token, method = offered
        min_locktime = int(time.time() + time_limit + LOCKTIME_MARGIN_SECONDS)
        return await self._redeem(request, price, token, method, min_locktime, say)

    async def _ask_for_payment(self, request: JobRequest, price: int, say) -> tuple[str, str]:
        early = self._early.pop(request.id, None)
        if early is not None:
            return early.token(), "nutzap"
        future = asyncio.get_running_loop().create_future()
        self._awaiting[request.id] = future
        self.store.set_state(request.id, "payment-required")
        creq = encode_payment_request(
            payment_id=request.id[:16], amount=price, unit=self.unit, mints=self.mints,
            description=f"NIP-90 job {request.id}", nostr_target=self.keys.npub,
            lock_pubkey=self.p2pk_pubkey)
        say("payment-required",
            f"pay {price} {self.unit}: a NIP-61 nutzap (kind 9321) tagging this job request, P2PK-locked "
            f"to {self.p2pk_pubkey} on {', '.join(self.mints)}; or resend the request with a token",
            creq)
        try:
            nutzap: Nutzap = await asyncio.wait_for(future, self.payment_timeout)
        except asyncio.TimeoutError:
            raise PaymentRefused(f"no payment arrived within {self.payment_timeout:g} s; the job was dropped") from None
        finally:
            self._awaiting.pop(request.id, None)
        return nutzap.token(), "nutzap"

    async def _redeem(self, request: JobRequest, price: int, token: str, method: str,
                      min_locktime: int, say) -> Paid:
        from .wallet import PaymentError  # the only door to Nutshell
        try:
            info = self.wallet.inspect(token)
        except PaymentError as exc:
            raise PaymentRefused(exc.customer_message) from None
        holder = self.store.record_payment(info.token_id, request.id, request.pubkey, method,
                                           info.mint, info.unit, info.amount, price, token)
        if holder is not None and holder["job_id"] != request.id:
            if holder["state"] in ("received", "redeeming"):
                raise PaymentRefused(f"this token is being redeemed for job {holder['job_id']}; send a new one")
            raise PaymentRefused(f"this token already paid for job {holder['job_id']}; send a new one")
        retrying = holder is not None  # the same job again, after a restart
        self.store.set_payment(info.token_id, "redeeming")
        deadline = time.monotonic() + self.mint_retry_seconds
        delay, told = 1.0, False
        while True:
            try:
                received = await self.wallet.receive(
                    token, min_amount=price, require_lock=method in ("p2pk", "nutzap"),
                    min_locktime=min_locktime)
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
                if "already spent" in exc.customer_message and retrying:
                    # Our own swap went through before a crash: the ecash is ours already.
                    log.warning("token spent during an earlier attempt; counting it as paid", job_id=request.id)
                    self.store.set_payment(info.token_id, "redeemed", received=info.amount)
                    return Paid(info.token_id, info.mint, info.unit, info.amount, price, method)
                self.store.set_payment(info.token_id, "rejected", error=exc.customer_message)
                suffix = " Your token was not redeemed." if exc.retryable else ""
                if not exc.retryable and await self.give_back_locked(request, token, exc.customer_message):
                    suffix = " Only this DVM could spend it, so it was sent back to you as a nutzap."
                raise PaymentRefused(exc.customer_message + suffix) from None
        self.store.set_payment(info.token_id, "redeemed", received=received.amount)
        paid = Paid(info.token_id, info.mint, info.unit, received.amount, price, method)
        if received.amount < price:
            await self.refund(request, paid, f"after the mint's fees {received.amount} {info.unit} arrived")
            raise PaymentRefused(f"after the mint's fees only {received.amount} {info.unit} arrived; the price "
                                 f"is {price} {info.unit}. It was sent back to you as a nutzap.")
        if method == "public":
            paid.warning = ("warning: your token was in a public tag, where anyone reading the relay could "
                            f"have taken it first; encrypt the request or P2PK-lock the token to {self.p2pk_pubkey}")
        if received.amount > price:
            await self._send_back(request, paid, received.amount - price, "change", "change for your job")
        return paid

    async def give_back_locked(self, request: JobRequest, token: str, reason: str) -> bool:
        """A refused token P2PK-locked to our key is spendable by us alone: refusing it would
        burn it. Redeem it and send it back to the customer. True if it was sent back."""
        from .wallet import PaymentError
        try:
            info = self.wallet.inspect(token)
        except PaymentError:
            return False
        ours = self.p2pk_pubkey[2:]
        if not info.conditions or not all(c is not None and ours in {k[2:] for k in c.pubkeys}
                                          for c in info.conditions):
            return False
        holder = self.store.record_payment(info.token_id, request.id, request.pubkey, "returned",
                                           info.mint, info.unit, info.amount, 0, token)
        if holder is not None and holder["job_id"] != request.id:
            return False
        try:
            received = await self.wallet.receive(token, min_amount=1, require_lock=True)
        except PaymentError as exc:
            self.store.set_payment(info.token_id, "rejected", error=exc.customer_message)
            return False  # not spendable (spent, fake, wrong mint): nothing to give back
        self.store.set_payment(info.token_id, "redeemed", received=received.amount)
        paid = Paid(info.token_id, info.mint, info.unit, received.amount, 0, "returned")
        await self._send_back(request, paid, received.amount, "refund", f"refund: {reason}")
        return True

    # nutzaps --------------------------------------------------------------------
    def on_nutzap(self, event: dict, spawn: Callable) -> None:
        try:
            nutzap = parse_nutzap(event)
        except TokenFormatError as exc:
            log.warning("unreadable nutzap", event_id=event.get("id"), reason=str(exc))
            return
        if nutzap.recipient != self.keys.public_key:
            return
        future = self._awaiting.get(nutzap.zapped_event or "")
        if future is not None and not future.done():
            future.set_result(nutzap)
            return
        job = self.store.get_job(nutzap.zapped_event) if nutzap.zapped_event else None
        if job is not None and job.state in ("received", "payment-required") and \
                self.store.payment_for_job(job.id) is None:
            self._early[job.id] = nutzap  # its job is being read (or resumed) right now
            return
        if nutzap.event_id not in self._stray:
            self._stray.add(nutzap.event_id)
            spawn(self._return_stray(nutzap))

    async def _return_stray(self, nutzap: Nutzap) -> None:
        """A nutzap for no job waiting for payment: it is locked to our key, so only we can
        give it back. Redeem it and send it back to its sender."""
        from .wallet import PaymentError
        token = nutzap.token()
        try:
            info = self.wallet.inspect(token)
        except PaymentError:
            return
        job_id = nutzap.zapped_event or nutzap.event_id
        if self.store.record_payment(info.token_id, job_id, nutzap.sender, "nutzap", info.mint, info.unit,
                                     info.amount, 0, token) is not None:
            return  # seen before
        try:
            received = await self.wallet.receive(token, min_amount=1, require_lock=True)
        except PaymentError as exc:
            self.store.set_payment(info.token_id, "rejected", error=exc.customer_message)
            return
        self.store.set_payment(info.token_id, "redeemed", received=received.amount)
        request = JobRequest(id=job_id, pubkey=nutzap.sender, kind=nutzap.zapped_kind or 0, created_at=0)
        paid = Paid(info.token_id, info.mint, info.unit, received.amount, 0, "nutzap")
        reason = ("no job of this DVM is waiting for this payment (unknown job, or already paid); "
                  "it was sent back to you")
        await self._send_back(request, paid, received.amount, "refund", reason)
        log.info("returned a nutzap for no waiting job", job_id=job_id, amount=received.amount)

    # paying back -------------------------------------------------------------------
    async def refund(self, request: JobRequest, paid: Paid, reason: str) -> None:
        await self._send_back(request, paid, paid.amount, "refund", f"refund: {reason}")

    async def refund_job(self, request: JobRequest, reason: str) -> bool:
        """Refund the payment of a job that failed through no fault of the customer's."""
        row = self.store.payment_for_job(request.id)
        if row is None or row["state"] != "redeemed" or row["refund_sent"]:
            return False
        paid = Paid(row["token_id"], row["mint"], row["unit"], row["received"], row["price"], row["method"])
        await self._send_back(request, paid, min(paid.amount, paid.price), "refund", f"refund: {reason}")
        return True

    def consumed(self, job_id: str) -> None:
        row = self.store.payment_for_job(job_id)
        if row is not None and row["state"] == "redeemed":
            self.store.set_payment(row["token_id"], "consumed")

    async def _send_back(self, request: JobRequest, paid: Paid, amount: int, role: str, comment: str) -> None:
        if amount <= 0:
            return
        lock = await self._customer_lock(request.pubkey)
        token = await self.wallet.send(amount, mint=paid.mint, lock_to=lock)
        decoded = decode_token(token)
        if role == "refund":
            self.store.set_payment(paid.token_id, "refunded", refund_sent=amount)
        else:
            self.store.set_payment(paid.token_id, "redeemed", change_sent=amount)
        kind, content, tags = build_nutzap(decoded.mint, list(decoded.proofs), request.pubkey,
                                           unit=decoded.unit, zapped_event=request.id,
                                           zapped_kind=request.kind or None, comment=comment)
        await self._publish(kind, content, tags, role, request.id)
        log.info("ecash sent back", role=role, job_id=request.id, amount=amount, locked_to=lock[:10])

    async def _customer_lock(self, pubkey: str) -> str:
        """The key to lock ecash for a customer: their NIP-61 wallet key if they publish one,
        else their Nostr key (as NIP-61 says, prefixed 02)."""
        try:
            events = await self._query([{"kinds": [NUTZAP_INFO_KIND], "authors": [pubkey], "limit": 1}], 2.0)
        except Exception:
            events = []
        for event in sorted(events, key=lambda e: e["created_at"], reverse=True):
            info = parse_nutzap_info(event)
            if info.p2pk_pubkey:
                key = info.p2pk_pubkey
                return key if len(key) == 66 else "02" + key
        return "02" + pubkey
