"""Paying for a job before it is queued: its price, the customer's bid, and the cashier's
collection (a token in the request, or a nutzap after `payment-required`).

`Checkout.pay` returns what was paid (None for a free job) or raises `Refused`, which the
worker answers; money already redeemed for a refused job is refunded in the same transaction
as the refusal (`Refused.refund`).
"""

from __future__ import annotations

import structlog

from dvm_core.payments.cashier import Cashier, Paid, PaymentRefused

from .cancels import Cancels
from .config import Settings
from .intake import Job, Refused
from .offer import Offer
from .outbox import Reply

log = structlog.get_logger("dvm.worker")


class Checkout:
    def __init__(self, *, settings: Settings, offer: Offer, cashier: Cashier | None, cancels: Cancels):
        self.settings = settings
        self.offer = offer
        self.cashier = cashier
        self.cancels = cancels
        self.unpaid: dict[str, str] = {}   # jobs waiting for payment -> their customer

    def price(self, job: Job) -> int:
        if self.cashier is None:
            return 0  # no mints configured: this DVM serves every job free, whatever plugins ask
        return self.offer.price(job.job_kind, job.request, job.parsed)

    async def pay(self, job: Job, reply: Reply) -> Paid | None:
        request, scheme = job.request, job.scheme
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
                else:
                    reason += "; your token was not redeemed"
            raise Refused(reason, scheme, amount_msats=price * 1000)

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
        except Exception:
            log.exception("taking payment failed", job_id=request.id)
            raise Refused("internal error while taking payment", scheme, refund=True) from None
        finally:
            if self.unpaid.pop(request.id, None) is not None:
                self.cancels.forget(request.id)
