"""What the ecash wallet raises and returns: `PaymentError` (and `mint_error`, which turns a
failure at the mint into one), and the values `TokenInfo`, `SpendingCondition`, `Invoice` and
`Received`.

May import: the standard library, httpx (to tell an unreachable mint from its answer) and
`dvm_core.protocol.ecash`. Not Nutshell: these are read by callers that never touch it.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

import httpx

from dvm_core.protocol.ecash import Token


class PaymentError(Exception):
    """A payment that did not go through.

    `customer_message` is a sentence for the customer (job feedback). `retryable` is True when
    the mint could not be reached or was busy: the token may still be good, so the caller should
    keep it and try again later. False means the token itself is unacceptable.
    """

    def __init__(self, customer_message: str, *, retryable: bool = False, code: str = ""):
        super().__init__(customer_message)
        self.customer_message = customer_message
        self.retryable = retryable
        self.code = code          # "spent" when the mint says a proof is spent already


def mint_error(exc: BaseException, mint: str, subject: str = "this token") -> PaymentError:
    """Turn what Nutshell raised while talking to the mint into a PaymentError."""
    if isinstance(exc, PaymentError):
        return exc
    if isinstance(exc, httpx.TransportError):     # refused, reset, timed out, DNS
        return PaymentError(
            f"The mint {mint} is unreachable right now, so the payment could not be completed; "
            "it can be tried again later.", retryable=True)
    if isinstance(exc, httpx.HTTPStatusError):
        status = exc.response.status_code
        if status >= 500 or status == 429:
            return PaymentError(
                f"The mint {mint} is not working right now (HTTP {status}); "
                "the payment can be tried again later.", retryable=True)
        return PaymentError(f"The mint {mint} answered with an error (HTTP {status}).")
    text = str(exc)
    if "failed to acquire database locks" in text or "database is locked" in text:
        # Nutshell's own SQLite, busy with another payment: nothing reached the mint.
        return PaymentError("The provider's wallet is busy; the payment can be tried again in a "
                            "moment.", retryable=True)
    code_match = re.search(r"\(Code: (\d+)\)", text)
    code = int(code_match.group(1)) if code_match else None
    detail = re.sub(r"^Mint Error: |\s*\(Code: \d+\)$", "", text).strip().rstrip(".")
    if code == 11001:
        return PaymentError("This token was already spent; a Cashu token can be used only once.",
                            code="spent")
    if code == 11002:
        return PaymentError("The mint says this token is being spent in another payment right "
                            "now; it can be tried again later.", retryable=True)
    if code is not None:
        return PaymentError(f"The mint refused {subject}: {detail} (code {code}).")
    return PaymentError(f"The payment failed: {detail or type(exc).__name__}.")


@dataclass(frozen=True)
class SpendingCondition:
    """A NUT-10 spending condition of one proof (P2PK per NUT-11, HTLC per NUT-14)."""

    kind: str                     # "P2PK" or "HTLC"
    pubkeys: tuple[str, ...]      # keys that can sign now: the P2PK data key plus the `pubkeys` tag
    n_sigs: int                   # signatures needed from `pubkeys`
    locktime: int | None          # unix time after which the refund keys (or anyone) may spend
    refund: tuple[str, ...]       # keys that may spend after `locktime`
    sig_all: bool                 # SIG_ALL rather than SIG_INPUTS
    hash: str | None = None       # HTLC: the hash lock (sha256 of the preimage, hex)


@dataclass(frozen=True)
class TokenInfo(Token):
    """A token as the wallet reads it, without asking the mint: a `protocol.ecash.Token` (the one
    token model: normalised `mint`, `unit`, NUT-00 `proofs`, `memo`) with the spending condition
    of each proof."""

    conditions: tuple[SpendingCondition | None, ...] = ()   # per proof; None = plain bearer proof

    @property
    def proof_count(self) -> int:
        return len(self.proofs)

    @property
    def has_dleq(self) -> bool:
        """Every proof carries a DLEQ proof."""
        return all("dleq" in p for p in self.proofs)

    @property
    def keyset_ids(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(p["id"] for p in self.proofs))

    @property
    def token_id(self) -> str:
        """sha256 of the sorted proof secrets: the same token, the same id."""
        return hashlib.sha256(json.dumps(sorted(p["secret"] for p in self.proofs)).encode()).hexdigest()

    @property
    def locked(self) -> bool:
        return any(c is not None for c in self.conditions)


@dataclass(frozen=True)
class Invoice:
    """A Lightning invoice that, once paid, lets us mint `amount` of ecash (a NUT-04 quote)."""

    quote_id: str
    bolt11: str
    mint: str
    amount: int


@dataclass(frozen=True)
class Received:
    """A payment that arrived: `amount` is what we hold now, after the mint's `fee`."""

    amount: int
    fee: int
    mint: str
    unit: str
    token_id: str
