"""What this DVM offers and for how much: the NIP-89 announcement (kinds, params, load,
payment terms) and the price of one job.

A kind is priced by its plugin (`JobKind.price`, announced by its `pricing` text), else by the
`price_job` hook for kinds that announce a `pricing`, else at the fixed price of the config's
``[prices]`` (or ``default_price``), which the announcement shows: a customer pays only what
was announced.
"""

from __future__ import annotations

import time
from typing import Any

import pluggy
import structlog

from dvm_core.jobs import JobKind
from dvm_core.protocol.nip90 import JobRequest, KindDescription, build_handler_announcement

from .config import Settings

log = structlog.get_logger("dvm.worker")


class Offer:
    def __init__(self, *, settings: Settings, config: dict, kinds: dict[int, JobKind],
                 pm: pluggy.PluginManager, public_key: str):
        self.settings = settings
        self.config = config
        self.kinds = kinds
        self.pm = pm
        self.public_key = public_key
        self.prices = dict(config.get("prices") or {})
        for name in ignored_prices(kinds.values(), self.prices):
            log.warning("a [prices] entry is not charged: its plugin prices this kind by work", kind=name,
                        pricing=next(k.pricing for k in kinds.values() if k.name == name))

    def fixed_price(self, job_kind: JobKind) -> int:
        return self.prices.get(job_kind.name, self.settings.default_price)

    def price(self, job_kind: JobKind, request: JobRequest, parsed: Any) -> int:
        """The price of one job; ValueError for a price that is not a whole number ≥ 0."""
        fixed = self.fixed_price(job_kind)
        if job_kind.price is not None:
            price = job_kind.price(parsed)
        else:
            price = self.pm.hook.price_job(job_kind=job_kind, request=request, job=parsed, config=self.config)
        if price is None:
            price = fixed
        elif not job_kind.pricing and price != fixed:
            # The announcement says this kind costs `fixed`: a customer pays only what was
            # announced, so a price the kind does not announce (JobKind.pricing) is not asked.
            log.warning("a plugin priced a kind that announces a fixed price; asking the fixed price",
                        kind=job_kind.name, plugin_price=price, announced=fixed)
            price = fixed
        if isinstance(price, bool) or not isinstance(price, int) or price < 0:
            raise ValueError(f"price of {job_kind.name!r} must be a whole number ≥ 0, got {price!r}")
        return price

    def announcement(self, *, queued: int, running: int, payment: dict | None) -> tuple[int, str, list[list[str]]]:
        """The NIP-89 handler announcement; `payment` is the cashier's terms (None: free)."""
        kinds = [KindDescription(k.kind, k.name, k.description, k.params or {}, k.params_schema)
                 for k in sorted(self.kinds.values(), key=lambda k: k.kind)]
        extra = {"status": {"queued": queued, "running": running,
                            "slots": self.settings.max_concurrent_jobs, "updated": int(time.time())}}
        if payment is not None:
            unit = self.settings.unit
            extra["payment"] = {
                "unit": unit, "mints": self.settings.mints, **payment,
                "prices": {k.name: self.fixed_price(k) for k in self.kinds.values() if not k.pricing},
                # Every kind says how it is priced, in words: a rule for kinds priced by work.
                "input_error_fee": self.settings.input_error_fee,
                "pricing": {k.name: k.pricing or _fixed_pricing(self.fixed_price(k), unit)
                            for k in self.kinds.values()},
                "methods": ["cashu tag (or param cashu) in encrypted params",
                            "cashu tag P2PK-locked to p2pk_pubkey with a NUT-11 refund key of the author",
                            "NIP-61 nutzap after payment-required, locked to the key it names",
                            "pay on delivery: param pay_on_delivery = your refund key; a NIP-61 nutzap "
                            "HTLC-locked (NUT-14) as the offer that comes with the sealed result asks"],
                "modes": ["upfront", "on-delivery"],
                "on_delivery": {"param": "pay_on_delivery", "deposit": 0,
                                "lock_seconds": self.settings.delivery_lock_seconds},
            }
        return build_handler_announcement(
            identifier=f"dvm-{self.public_key[:16]}", name=self.settings.name,
            about=self.settings.about, kinds=kinds, extra_content=extra)


def _fixed_pricing(price: int, unit: str) -> str:
    return f"{price} {unit} per job" if price else "free"


def ignored_prices(kinds, prices: dict) -> list[str]:
    """The `[prices]` entries of kinds their plugin prices by work (`JobKind.price`), which are
    not what a job of them costs (the worker logs them and `dvm doctor` warns)."""
    return sorted(k.name for k in kinds if k.price is not None and k.name in prices)
