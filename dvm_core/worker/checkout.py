"""Paying for a job: its price, the customer's bid, and the cashier's collection (a token in
the request, or a nutzap after `payment-required`), before the job is queued, or, when the
customer asked to pay on delivery, once its result is sealed and offered.

`Checkout.pay` returns what was paid (None for a free job, `Due` for one paid on delivery) or
raises `Refused`, which the worker answers; money already redeemed for a refused job (a job
resumed after a restart can be refused too) is refunded in the same transaction as the refusal.
`Checkout.collect_on_delivery` waits for the hash-locked ecash of a delivered job and, once it
is checked (by default: only our job key and the key K can spend it before its locktime, so the
swap may follow) or redeemed (`deliver_before_redeem = false`), stores and sends the result with
K; the swap, which shows K to the customer through the mint too, is then done in the background.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import structlog

from dvm_core.payments.cashier import Cashier, OnDelivery, Paid, PaymentRefused
from dvm_core.payments.crashpoints import crashpoint
from dvm_core.protocol.delivery import parse_offer
from dvm_core.protocol.ecash import HtlcTerms
from dvm_core.state.jobstate import JobState
from dvm_core.state.store import Store, disk_full

from .cancels import Cancels
from .config import Settings
from .intake import Job, Refused
from .offer import Offer
from .outbox import Reply

log = structlog.get_logger("dvm.worker")

REDEEM_MARGIN_SECONDS = 600   # stop waiting this long before the locktime (at most a quarter of it)


@dataclass(frozen=True)
class Due:
    """A job the customer pays on delivery: `price`, asked once the result is sealed."""

    price: int


def redeem_margin(lock_seconds: float) -> float:
    """How long before an HTLC's locktime the worker stops taking payments for it: time to
    redeem before the customer may take the ecash back."""
    return min(REDEEM_MARGIN_SECONDS, lock_seconds / 4)


class Checkout:
    def __init__(self, *, settings: Settings, offer: Offer, cashier: Cashier | None, cancels: Cancels,
                 store: Store):
        self.settings = settings
        self.store = store
        self.offer = offer
        self.cashier = cashier
        self.cancels = cancels
        self.unpaid: dict[str, str] = {}   # jobs waiting for payment -> their customer

    def price(self, job: Job) -> int:
        if self.cashier is None:
            return 0  # no mints configured: this DVM serves every job free, whatever plugins ask
        return self.offer.price(job.job_kind, job.request, job.parsed)

    async def pay(self, job: Job, reply: Reply) -> Paid | Due | None:
        request, scheme = job.request, job.scheme
        stored = self.store.payment_for_job(request.id) \
            if job.paid_already and self.cashier is not None and request.pay_on_delivery is None else None
        if stored is not None:
            # Resumed after a restart with its payment taken: at the price it was paid at (its
            # precheck, which may have priced it, is not run again), the bid checked back then.
            return await self._collect(job, reply, stored["price"], None)
        try:
            price = self.price(job)
        except Exception:
            log.exception("pricing failed", kind=request.kind)
            raise Refused("internal error while pricing the job; nothing was charged", scheme) from None
        if price == 0:
            return None
        unit = self.settings.unit
        if self.cashier is None:  # prices without mints are refused at start; be safe anyway
            raise Refused("this DVM cannot take payments right now", scheme)
        offered = self.cashier.token_in(request, job.private_tags)
        if request.bid_msats is not None and request.bid_msats < price * 1000:
            reason = (f"the price of this job is {price} {unit} ({price * 1000} msats); "
                      f"your bid was {request.bid_msats} msats")
            if offered is not None:
                returned = await self.cashier.give_back(request, offered[0], offered[1], reason)
                if returned:
                    reason += (f"; your token, locked to this DVM, was redeemed and its {returned} {unit} "
                               "sent back to you as a nutzap")
                elif returned is None:
                    reason += ("; your token, locked to this DVM, is sent back to you as a nutzap as "
                               "soon as its mint answers")
                else:
                    reason += "; your token was not redeemed"
            raise Refused(reason, scheme, amount_msats=price * 1000)
        if request.pay_on_delivery is not None:
            if offered is not None:
                reason = "you asked to pay on delivery and sent a token as well: pay one way"
                returned = await self.cashier.give_back(request, offered[0], offered[1], reason)
                if returned:
                    reason += "; your token, locked to this DVM, was sent back to you as a nutzap"
                elif returned is None:
                    reason += ("; your token, locked to this DVM, is sent back to you as a nutzap as "
                               "soon as its mint answers")
                raise Refused(reason, scheme)
            return Due(price)
        return await self._collect(job, reply, price, offered)

    async def _collect(self, job: Job, reply: Reply, price: int, offered: tuple[str, str] | None) -> Paid:
        request, scheme = job.request, job.scheme

        def say(status: str, message: str, content: str) -> None:
            if status == "payment-required":
                self.unpaid[request.id] = request.pubkey   # a kind-5 from them cancels the wait
                self.cancels.watch(request.id)
                reply.feedback(status, message, content=content, amount_msats=price * 1000)
            else:
                reply.feedback(status, message, content=content)

        limit = self.settings.time_limit(job.job_kind)
        try:
            paid = await self.cashier.collect(request, price, offered, limit, say)
            self.cashier.settle(request.id)   # nutzaps kept for it that did not pay go back
            return paid
        except PaymentRefused as exc:
            raise Refused(str(exc), scheme, private_detail=False) from None
        except Exception as exc:
            if disk_full(exc):
                raise   # the job waits for room (Worker._handle); what was paid is in the store
            log.exception("taking payment failed", job_id=request.id)
            raise Refused("internal error while taking payment", scheme) from None
        finally:
            if self.unpaid.pop(request.id, None) is not None:
                self.cancels.forget(request.id)

    async def collect_on_delivery(self, request, reply: Reply) -> tuple[JobState, str]:
        """Wait for the ecash that pays a delivered job (its offer is out), check it (or redeem
        it), then store and send the result; returns the job's end: (succeeded, "") or (failed, why). Unpaid by
        the offer's deadline the job fails with nothing to refund: the customer's ecash, if any
        came, is theirs to take back after the locktime."""
        row = self.store.delivery(request.id)
        offer = parse_offer(row["offer"])
        terms = HtlcTerms(row["hash"], self.cashier.wallet.job_lock_pubkey(request.id), row["locktime"],
                          row["refund_key"])
        deadline = row["locktime"] - redeem_margin(row["locktime"] - row["created"])
        due = OnDelivery(terms, bytes.fromhex(row["preimage"]), offer.payment_request, deadline,
                         release_first=self.settings.deliver_before_redeem)

        def say(status: str, message: str, content: str) -> None:
            reply.feedback(status, message, content=content)

        self.unpaid[request.id] = request.pubkey   # a kind-5 from them ends the wait
        self.cancels.watch(request.id)
        try:
            paid = await self.cashier.collect(request, row["price"], None, 0, say, delivery=due)
            self.cashier.settle(request.id)
        except PaymentRefused as exc:
            return JobState.FAILED, f"not paid on delivery: {exc}"
        except Exception:
            log.exception("taking payment on delivery failed", job_id=request.id)
            return JobState.FAILED, "internal error while taking payment on delivery"
        finally:
            if self.unpaid.pop(request.id, None) is not None:
                self.cancels.forget(request.id)
        event = reply.result(row["result"])
        with self.store.atomic():
            self.store.add_outgoing(event, "result", request.id)
            self.store.set_state(request.id, JobState.SUCCEEDED)
            self.cashier.consumed(request.id)
        crashpoint("delivery-result-stored")
        sent = reply.send_stored(event, "result")
        self.cashier.redeem_delivered(request.id, after=sent)   # checked, not swapped yet: swap it
        log.info("paid on delivery", job_id=request.id, amount=paid.amount, price=paid.price,
                 waited=round(time.time() - row["created"], 3))
        return JobState.SUCCEEDED, ""
