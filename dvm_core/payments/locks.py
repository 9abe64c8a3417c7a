"""Whose money is this? The rules that bind an ecash payment to one job or one payer.

Every public event is read at once by whoever wants to: a token or a nutzap proof that is locked
to this DVM's key can be copied into a stranger's request or nutzap before the real one arrives.
A lock to the DVM says that only the DVM can spend the ecash, not whom it is for. So a payment is
taken for a job only when its lock names that job or its payer, never because of where it turned
up first:

- **job**: every proof is P2PK-locked (NUT-11), or HTLC-locked (NUT-14, pay on delivery) with
  one receiving key, to the key derived for one job
  (`job_lock_pubkey`, the key the `payment-required` request asks for). It pays that job and no
  other, whoever shows it; money going back goes to the token's refund key, else to the job's
  customer.
- **payer**: every proof is locked to the DVM's own key and names, as its NUT-11 `refund` key, a
  key of the request's author (their Nostr key, or the key of their own kind 10019). It pays only
  that author's jobs, and money going back goes to that refund key.
- **bearer**: no lock. Only inside an encrypted request, where nobody else could read it, is it
  the author's; in a public tag anyone could have taken it, so the DVM does not take it either.
- **unbound**: locked to the DVM's key without a refund key (a stock NIP-61 nutzap): nothing says
  whose it is, so it pays nothing and is not redeemed; the payer was told how to lock it.
- **foreign**: locked to a key that is not ours: we could not spend it anyway.

Pure code: no network, no store; the derivation is public so that any client can compute it.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from typing import Callable, Iterable, Literal

import coincurve

from dvm_core.protocol.ecash import lock_of

from .p2pk_keys import SECP256K1_ORDER, compressed_pubkey
TWEAK_TAG = b"nip90-dvm/job-lock/v1"

Kind = Literal["job", "payer", "bearer", "unbound", "foreign", "mixed"]


def _tweak(base_pubkey: str, job_id: str) -> bytes:
    """t = sha256(tag || base key (33 bytes) || job id (32 bytes)) mod n."""
    digest = hashlib.sha256(TWEAK_TAG + bytes.fromhex(base_pubkey) + bytes.fromhex(job_id)).digest()
    t = int.from_bytes(digest, "big") % SECP256K1_ORDER
    if t == 0:  # probability 2^-256; a key of 0 would not be a key
        raise ValueError("degenerate job-lock tweak")
    return t.to_bytes(32, "big")


@functools.lru_cache(maxsize=4096)   # asked for several times a payment; a point addition each
def job_lock_pubkey(base_pubkey: str, job_id: str) -> str:
    """The compressed key (66 hex) that ecash for `job_id` is locked to: P + t·G, where P is the
    DVM's P2PK key as it advertises it (compressed) and t is `_tweak(P, job_id)`."""
    base = compressed_pubkey(base_pubkey)
    point = coincurve.PublicKey(bytes.fromhex(base)).add(_tweak(base, job_id))
    return point.format().hex()


@functools.lru_cache(maxsize=4096)
def job_lock_secret(base_secret: str, job_id: str) -> str:
    """The private key of `job_lock_pubkey(pubkey of base_secret, job_id)`: d + t mod n."""
    key = coincurve.PrivateKey(bytes.fromhex(base_secret))
    base = key.public_key.format().hex()
    return key.add(_tweak(base, job_id)).to_hex()


def _x(key: str) -> str:
    key = key.strip().lower()
    return key[2:] if len(key) == 66 else key


@dataclass(frozen=True)
class Binding:
    """What a token's locks say about whose it is (see the module's docstring)."""

    kind: Kind
    job_id: str | None = None            # kind "job": the job it was made for
    refund_keys: tuple[str, ...] = ()    # the payer's keys named in the lock (compressed)
    lock_key: str | None = None          # the key every proof is locked to

    @property
    def refund_key(self) -> str | None:
        return self.refund_keys[0] if self.refund_keys else None


def bind(proofs: Iterable[dict], *, dvm_pubkey: str,
         job_for_key: Callable[[str], str | None]) -> Binding:
    """Read the binding of a token from its proofs (NUT-00 dicts).

    `dvm_pubkey`: the DVM's P2PK key. `job_for_key(compressed key)`: the job whose derived lock
    key that is, if this DVM ever asked for payment to it (else None).
    """
    kinds = set()
    locks, refunds = set(), set()
    for proof in proofs:
        data, _locktime, refund = lock_of(proof)   # P2PK, or an HTLC's one key
        if data is None:
            kinds.add("bearer")
            continue
        locks.add(data.lower())
        refunds.add(tuple(sorted(r.lower() for r in refund)))
        kinds.add("locked")
    if kinds == {"bearer"}:
        return Binding("bearer")
    if kinds != {"locked"} or len(locks) != 1 or len(refunds) != 1:
        return Binding("mixed")   # some proofs locked, some not, or to several keys: no one's
    lock = next(iter(locks))
    refund_keys = tuple(k for k in next(iter(refunds)) if len(k) == 66)
    if _x(lock) == _x(dvm_pubkey):
        return Binding("payer" if refund_keys else "unbound", refund_keys=refund_keys, lock_key=lock)
    try:
        job_id = job_for_key(compressed_pubkey(lock))
    except ValueError:
        job_id = None
    if job_id is not None:
        return Binding("job", job_id=job_id, refund_keys=refund_keys, lock_key=lock)
    return Binding("foreign", refund_keys=refund_keys, lock_key=lock)


def payer_named(binding: Binding, author_keys: Iterable[str]) -> bool:
    """True when a "payer" binding's refund key is one of `author_keys` (x-only or compressed):
    the author of the request is who made the payment."""
    wanted = {_x(k) for k in author_keys if k}
    return any(_x(k) in wanted for k in binding.refund_keys)
