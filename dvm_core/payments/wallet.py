"""The ecash wallet (`EcashWallet`) of the worker and of its customers, on Nutshell's `Wallet`.

`EcashWallet.receive` is the safe way to take a payment: everything that can be checked without
the mint (allow-list, unit, amount, DLEQ present, P2PK or HTLC lock, locktime) is checked before
any request leaves the process, the DLEQ proofs are verified against the mint's keys, and the token
is swapped for fresh proofs before the caller does any work. Errors are `PaymentError`s whose
`customer_message` can go into a job's feedback as it is.

Pay on delivery (NUT-14 HTLC, docs/design/pay-on-delivery.md): the customer locks a payment with
`send_htlc` to the hash of a key K that only the provider knows; the provider takes it with
`receive(htlc=..., preimage=K)`, which reveals K to the mint, and the customer then reads K back
from the mint alone (`htlc_preimage`), or takes the ecash back after the locktime
(`reclaim_htlc`).

Tokens are read with `protocol.ecash.decode_token`, the one token parser, into its NUT-00 proof
dicts; Nutshell's `Proof` objects are made from those only where proofs go to Nutshell (the swap,
the spent check). Spending conditions are read with Nutshell's NUT-10 parser (see
`read_token`).

May import: the standard library, `dvm_core.protocol.ecash`, and the other modules of this
package: `nutshell` (its only way to Nutshell), `p2pk_keys`, `wallet_types`, `locks`,
`crashpoints`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import io
import re
import time
import uuid
from pathlib import Path
from typing import Callable

from dvm_core.protocol.ecash import (HtlcTerms, TokenFormatError, decode_token, encode_token_a,
                                     htlc_hash, normalize_mint_url, p2pk_lock)

from . import nutshell
from .crashpoints import crashpoint
from .p2pk_keys import compressed_pubkey, create_private_file, even_y_secret, xonly_pubkey
from .wallet_types import (Invoice, PaymentError, Received, SpendingCondition, TokenInfo,
                           mint_error)

# Mint keysets (fees, active flag) are read again after this long, or at once when a token
# names a keyset we have not seen.
KEYSET_REFRESH_SECONDS = 600.0
MINT_QUOTE_TIMEOUT = 60.0
# Outputs asked for again after a swap whose answer was lost, for a mark noted before marks
# carried their swap's output count ("outputs"): more than one swap makes.
RESTORE_WINDOW = 64
# Secret counters advanced at a time for our swaps (`_take_counters`).
COUNTER_BLOCK = 16


def _inputs_refused(exc: BaseException) -> bool:
    """The mint answered a swap with "spent" (11001) or "pending" (11002): it checks the inputs
    before it signs any output (NUT-03), so none of the swap's outputs was signed. (A lost
    answer, a timeout or any other error proves nothing of the kind.)"""
    return bool(re.search(r"\(Code: 1100[12]\)", str(exc)))


def _runs(numbers: list[int]) -> list[list[int]]:
    """Sorted distinct integers cut into runs of consecutive ones."""
    runs: list[list[int]] = []
    for n in numbers:
        if runs and runs[-1][-1] == n - 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    return runs


def read_token(token: str) -> TokenInfo:
    """Read a cashuA/cashuB token without any network access; raises PaymentError.

    The token itself is decoded by `protocol.ecash.decode_token`, as everywhere in dvm_core. The
    spending conditions of its proofs are read with Nutshell's NUT-10 parser, not a pure one: it
    is the parser of the Nutshell code that signs our P2PK proofs, so a lock is judged here by the
    same rules (duplicate keys, tag shapes, n_sigs, locktime, SIG_ALL) as it is signed by.
    """
    try:
        decoded = decode_token(token)
    except TokenFormatError as exc:
        raise PaymentError(str(exc)) from None
    c = nutshell.load()
    conditions = []
    for proof in decoded.proofs:
        try:
            cond = c.nut10.parse_spending_condition(proof["secret"])
        except Exception as exc:
            raise PaymentError(f"The Cashu token has a malformed spending condition ({exc}).") from None
        if cond is None:
            conditions.append(None)
            continue
        signers = ([cond.data] if cond.kind == "P2PK" else []) + cond.tags.get_tag_all("pubkeys")
        conditions.append(SpendingCondition(
            kind=cond.kind,
            pubkeys=tuple(k.lower() for k in signers),
            n_sigs=cond.n_sigs or 1,
            locktime=cond.locktime,
            refund=tuple(k.lower() for k in cond.tags.get_tag_all("refund")),
            sig_all=cond.sigflag == c.SigFlags.SIG_ALL,
            hash=cond.data if cond.kind == "HTLC" else None,
        ))
    return TokenInfo(decoded.mint, decoded.unit, decoded.proofs, decoded.memo, tuple(conditions))


def _nutshell_proofs(info: TokenInfo) -> list:
    """Nutshell `Proof` objects for the proofs of a token read by `read_token` (new ones on each
    call: Nutshell changes them as it works on them)."""
    c = nutshell.load()
    return [c.Proof.from_dict(dict(p)) for p in info.proofs]


@contextlib.contextmanager
def _outputs_noted(wallet, mint: str, note: Callable[[dict], None] | None):
    """While inside, every output `wallet` makes for a swap (amount, secret, blinding factor) is
    handed to `note` before the mint sees it: the outputs of a locked swap have random secrets,
    which the seed cannot give back (NUT-09 needs them)."""
    if note is None:
        yield
        return
    construct = wallet._construct_outputs

    def noting(amounts, secrets, rs=(), keyset_id=None):
        outputs, blinding = construct(amounts, secrets, list(rs), keyset_id)
        note({"mint": mint, "outputs": [{"amount": o.amount, "id": o.id, "B_": o.B_, "secret": secret,
                                         "r": r.to_hex()} for o, secret, r in zip(outputs, secrets, blinding)]})
        crashpoint("htlc-outputs-noted")
        return outputs, blinding
    wallet._construct_outputs = noting
    try:
        yield
    finally:
        del wallet._construct_outputs   # the class's method again


async def _post_swap(c, wallet, inputs: list, outputs: list) -> list:
    """POST /v1/swap with the outputs sorted by amount, as Nutshell sends them; the mint's
    signatures come back in the outputs' own order."""
    order = sorted(range(len(outputs)), key=lambda i: outputs[i].amount)
    signed = await c.LedgerAPI.split(wallet, inputs, [outputs[i] for i in order])
    return [promise for _, promise in sorted(zip(order, signed))]


def _unblind(c, wallet, promises: list, secrets: list[str], rs: list, paths: list[str]) -> list:
    """The proofs the mint's signatures make (Nutshell's `_construct_proofs` without storing
    them, `_keep_swapped` does): unblinded, with their DLEQ proofs, checked (NUT-12)."""
    proofs = []
    for promise, secret, r, path in zip(promises, secrets, rs, paths):
        key = wallet.keysets[promise.id].public_keys[promise.amount]   # our outputs' keyset
        C = c.b_dhke.step3_alice(c.PublicKey(bytes.fromhex(promise.C_)), r, key)
        proof = c.Proof(id=promise.id, amount=promise.amount, C=C.format().hex(), secret=secret,
                        derivation_path=path)
        if promise.dleq:
            proof.dleq = c.DLEQWallet(e=promise.dleq.e, s=promise.dleq.s, r=r.to_hex())
        proofs.append(proof)
    wallet.verify_proofs_dleq(proofs)
    return proofs


async def _keep_swapped(c, wallet, made: list, spent: list = (), sent: list = ()) -> None:
    """After a swap, in one transaction: the new proofs (`made`) stored, those of them we are
    sending (`sent`) reserved, and our own inputs (`spent`) moved to Nutshell's history; the
    wallet's list in memory likewise."""
    async with wallet.db.connect() as conn:
        for proof in made:
            await c.store_proof(proof, db=wallet.db, conn=conn)
        if sent:
            send_id = str(uuid.uuid1())
            for proof in sent:
                proof.reserved = True
                await c.update_proof(proof, reserved=True, send_id=send_id, conn=conn)
        for proof in spent:
            await c.invalidate_proof(proof, db=wallet.db, conn=conn)
    if spent:
        gone = {p.secret for p in spent}
        wallet.proofs = [p for p in wallet.proofs if p.secret not in gone]
    wallet.proofs += made


def _wallet_name(mint: str, unit: str) -> str:
    readable = re.sub(r"[^a-z0-9]+", "_", mint.split("://", 1)[1]).strip("_")[:40]
    return f"{readable}-{unit}-{hashlib.sha256(f'{mint} {unit}'.encode()).hexdigest()[:8]}"


def _has_key(keys: tuple[str, ...], key: str) -> bool:
    """`key` is among `keys`, compared on x: signatures are checked against the x-coordinate,
    so a lock to "03"+x is a lock to "02"+x too."""
    return key[-64:] in {k[-64:] for k in keys}


def _expired(cond: SpendingCondition) -> bool:
    """Past its locktime: the refund path is open. The mint asks `locktime < now` of its own clock."""
    return cond.locktime is not None and cond.locktime < time.time()


def _plain(proof) -> bool:
    """A proof with a plain secret: ours to spend. A locked one in our database was made for
    someone else (a payout whose send a crash interrupted) and is never counted as ours."""
    return not proof.secret.startswith("[")


# -- the wallet ------------------------------------------------------------------------------

class EcashWallet:
    """Ecash wallets of one party, one Nutshell `Wallet` per (mint, unit), in one directory.

    The worker uses it to take payments (`receive`), give change and refunds (`send`) and cash
    out (`melt`); customers, tests and the demo use the same class to fund themselves
    (`mint_from_lightning`) and pay (`send`). Mints outside `accepted_mints` are never contacted.

    `p2pk_private_key` (64 hex) is a key kept for receiving P2PK-locked ecash (NUT-11, NIP-61
    nutzaps) — not the Nostr identity key. Its public key is `p2pk_pubkey`.
    """

    def __init__(self, directory: str | Path, accepted_mints: list[str], unit: str = "sat",
                 p2pk_private_key: str | None = None):
        self.directory = Path(directory)
        self.accepted_mints = list(dict.fromkeys(normalize_mint_url(m) for m in accepted_mints))
        self.unit = unit
        self._p2pk_secret = even_y_secret(p2pk_private_key) if p2pk_private_key else None
        self._wallets: dict[str, object] = {}
        self._keysets_loaded_at: dict[str, float] = {}
        self._keyset_lock = asyncio.Lock()
        self._spend_locks: dict[str, asyncio.Lock] = {}
        self._counter_blocks: dict[tuple[str, str], tuple[int, int]] = {}  # (mint, keyset) -> (next, end)
        self._open_lock = asyncio.Lock()
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.directory.chmod(0o700)

    # -- keys -------------------------------------------------------------------------------
    @property
    def p2pk_pubkey(self) -> str:
        """The compressed public key ("02" + x) to advertise for P2PK payments (kind 10019)."""
        if self._p2pk_secret is None:
            raise RuntimeError("this wallet has no P2PK key")
        return "02" + xonly_pubkey(self._p2pk_secret)

    # -- reading tokens ---------------------------------------------------------------------
    def inspect(self, token: str) -> TokenInfo:
        """Read a cashuA/cashuB token without any network access (`read_token`)."""
        return read_token(token)

    # -- receiving --------------------------------------------------------------------------
    async def receive(self, token: str, *, min_amount: int, require_lock: bool = False,
                      min_locktime: int | None = None, job_id: str | None = None,
                      before_swap: Callable[[dict], None] | None = None,
                      swap_refused: Callable[[dict], None] | None = None,
                      htlc: HtlcTerms | None = None, preimage: bytes | None = None,
                      also_key: str | None = None) -> Received:
        """Take a payment: check the token, swap it at the mint for our own proofs, and report
        what arrived after the mint's fee.

        `require_lock`: every proof must be P2PK-locked to `p2pk_pubkey`. `min_locktime` (unix
        time): refuse locks whose locktime comes earlier, since the sender could reclaim the
        token from then on. `job_id`: the key derived for this job (`locks.job_lock_pubkey`) is
        ours too. `before_swap(mark)` is called just before the swap with where its outputs'
        secrets start: store it, and `recover_swap(mint, mark)` gets them back if the mint's answer
        is lost. If the mint refuses the swap because the token is spent or pending (it checks
        that before it signs anything), `swap_refused(mark)` is called: forget the mark, and its
        secrets are used for the next swap instead of being skipped (a seed restore stops at a
        wide enough gap, and anyone can send spent tokens). Without `swap_refused`, a noted mark's
        secrets are never used again. Raises PaymentError; if it is `retryable`, keep the token
        and try again later.

        `also_key` (64 hex): one more secret key whose locks are ours for this token alone. A
        customer collecting refunds passes its Nostr key: a DVM that saw no kind 10019 of theirs
        locks to "02" + their Nostr key (NIP-61), not to this wallet's key.

        `htlc` with `preimage` (pay on delivery): every proof must be HTLC-locked exactly as
        `htlc` says (its hash, its one key, which must be the key of `job_id`, its refund key,
        SIG_INPUTS), with a locktime no earlier than `htlc.locktime`; anything else is refused
        before the mint is asked, because the swap reveals `preimage` to the mint and so to the
        customer. The swap's witness holds the preimage and the job key's signature.
        """
        if also_key is not None and (job_id is not None or htlc is not None):
            raise ValueError("also_key is for plain P2PK locks, not with job_id or htlc")
        info = read_token(token)
        self._check_offline(info, min_amount)
        job_secret = self._job_secret(job_id) if also_key is None else even_y_secret(also_key)
        if htlc is None:
            self._check_conditions(info, require_lock, min_locktime, job_secret)
        else:
            self._check_htlc(info, htlc, preimage, job_secret)
        return await self._redeem(info, min_amount, job_secret, before_swap, preimage,
                                  swap_refused=swap_refused)

    async def check_htlc_payment(self, token: str, *, min_amount: int, job_id: str,
                                 htlc: HtlcTerms, preimage: bytes) -> int:
        """Every check of `receive(htlc=..., preimage=...)` but the swap: the lock (hash, the
        job's key alone, one signature, SIG_INPUTS, locktime, refund key), the mint's signatures
        (DLEQ, against its keys) and its fee. Returns what the swap will bring after the fee.

        Tokens that pass can be spent before their locktime by the holder of the job's key and
        the preimage alone, i.e. by us: the worker may hand the preimage over at once and swap
        afterwards (`receive`), as long as it does so before the locktime. Raises PaymentError
        (`retryable` when the mint's keys could not be fetched)."""
        info = read_token(token)
        self._check_offline(info, min_amount)
        self._check_htlc(info, htlc, preimage, self._job_secret(job_id))
        _, _, fee = await self._verified(info, min_amount)
        return info.amount - fee

    def _check_offline(self, info: TokenInfo, min_amount: int) -> None:
        """What can be refused without the mint: a mint we do not accept must not even make us
        connect; the wrong unit, too little, no DLEQ proofs."""
        if info.mint not in self.accepted_mints:
            raise PaymentError(f"This worker does not accept ecash from the mint {info.mint}; "
                               f"it accepts: {', '.join(self.accepted_mints)}.")
        if info.unit != self.unit:
            raise PaymentError(f"The token is in {info.unit}, but this worker is paid in {self.unit}.")
        if info.amount < min_amount:
            raise PaymentError(f"The token is worth {info.amount} {self.unit}, but the price is "
                               f"{min_amount} {self.unit}; it was not redeemed.")
        if not info.has_dleq:
            # Without DLEQ proofs we could not tell a forged token from a real one before the swap.
            raise PaymentError("The token carries no DLEQ proofs, so its signatures cannot be "
                               "checked; please send it with DLEQ proofs included.")

    async def _redeem(self, info: TokenInfo, min_amount: int, job_secret: str | None,
                      before_swap: Callable[[dict], None] | None,
                      preimage: bytes | None = None, ours: bool = False,
                      swap_refused: Callable[[dict], None] | None = None) -> Received:
        """The mint's part of `receive` (and `reclaim_htlc`, `ours`: ecash this wallet sent),
        once the offline checks passed: DLEQ against the mint's keys, the fee, our signatures,
        then the swap."""
        wallet, proofs, _ = await self._verified(info, min_amount)
        self._sign_own_locks(proofs, info.conditions, job_secret, preimage)
        try:
            # One swap per mint at a time: Nutshell advances its secret counter under an SQLite
            # lock that concurrent swaps would fight over (and time out on under load).
            async with self._spend_lock(info.mint):
                kept = await self._swap_in(wallet, info.mint, proofs, before_swap, ours, swap_refused)
        except Exception as exc:
            raise mint_error(exc, info.mint) from exc
        amount = sum(p.amount for p in kept)
        return Received(amount=amount, fee=info.amount - amount, mint=info.mint, unit=self.unit,
                        token_id=info.token_id)

    async def _swap_in(self, wallet, mint: str, proofs: list,
                       before_swap: Callable[[dict], None] | None, ours: bool = False,
                       swap_refused: Callable[[dict], None] | None = None) -> list:
        """Swap `proofs` (checked, signed where locked) for new proofs of our own: the steps of
        Nutshell's `Wallet.redeem`, less what a receiver that already checked the token does not
        need before the mint's answer is kept (about a fifth of a redeem's time on loopback):

        - the DLEQ check of the inputs (`_verified` did it, for every proof);
        - a counter transaction per swap: the outputs' secrets are derived from counters taken
          from a block advanced in the wallet's database beforehand (`_take_counters`), and
          `before_swap` is given the first (and their number); a swap the mint refused for its
          inputs gives them back (`_give_back_counters`);
        - the used-secrets query: secrets derived from a freshly advanced counter are new (and a
          mint refuses outputs it already signed, before it spends any input);
        - a transaction per input to move it to Nutshell's history table (`proofs_used`, which
          Nutshell 0.21 only ever writes) when it is someone else's: it never was among our
          proofs. Proofs of ours (`ours`: a reclaim) leave the wallet in the transaction that
          stores the new ones (`_keep_swapped`).

        Our outputs are made, unblinded and DLEQ-checked as Nutshell does it; the caller holds
        the mint's spend lock."""
        c = nutshell.load()
        keyset = wallet.keyset_id
        amounts, _ = wallet.determine_output_amounts(proofs, 0, keyset_id_outputs=keyset)
        start = await self._take_counters(wallet, mint, len(amounts))
        mark = {"keyset": keyset, "counter": start, "outputs": len(amounts)}
        if before_swap is not None:
            before_swap(mark)
            crashpoint("before-swap")
        derived = [await wallet.generate_determinstic_secret(i, keyset)
                   for i in range(start, start + len(amounts))]
        secrets = [secret.hex() for secret, _, _ in derived]
        outputs, rs = wallet._construct_outputs(amounts, secrets, [c.PrivateKey(r) for _, r, _ in derived],
                                                keyset)
        proofs = wallet.sign_proofs_inplace_swap(proofs, outputs)
        try:
            promises = await _post_swap(c, wallet, proofs, outputs)
        except Exception as exc:
            if _inputs_refused(exc) and (before_swap is None or swap_refused is not None):
                if swap_refused is not None:
                    swap_refused(mark)   # the mark is forgotten before its secrets are reused
                self._give_back_counters(mint, keyset, start, len(amounts))
            raise
        kept = _unblind(c, wallet, promises, secrets, rs, [path for _, _, path in derived])
        await _keep_swapped(c, wallet, kept, spent=proofs if ours else ())
        return kept

    async def _take_counters(self, wallet, mint: str, n: int) -> int:
        """The first of `n` unused secret counters (NUT-13) of the wallet's keyset. They come from
        a block of at least COUNTER_BLOCK advanced in the database in one transaction, so that
        neither Nutshell's own swaps nor a restart hand them out again; a block's rest is skipped
        after a restart (fewer than a seed restore's batch of 25). The caller holds the spend lock."""
        keyset = wallet.keyset_id
        first, end = self._counter_blocks.get((mint, keyset), (0, 0))
        if end - first < n:
            c = nutshell.load()
            size = max(n, COUNTER_BLOCK)
            async with wallet.db.get_connection(locks=[c.LockOptions(table="keysets")]) as conn:
                first = await c.bump_secret_derivation(db=wallet.db, keyset_id=keyset, by=size,
                                                       conn=conn)
            end = first + size
        self._counter_blocks[(mint, keyset)] = (first + n, end)
        return first

    def _give_back_counters(self, mint: str, keyset: str, start: int, n: int) -> None:
        """The `n` counters from `start` that `_take_counters` just handed out are unused (the
        mint refused that swap): the next swap takes them again. The caller holds the spend lock,
        so no other swap took counters in between."""
        first, end = self._counter_blocks.get((mint, keyset), (0, 0))
        if first == start + n:
            self._counter_blocks[(mint, keyset)] = (start, end)

    async def _verified(self, info: TokenInfo, min_amount: int) -> tuple[object, list, int]:
        """The checks that need the mint's keys (fetched once, then kept): every proof's keyset
        is the mint's and its DLEQ proof verifies, and the amount covers the price after the
        mint's fee. Returns (the Nutshell wallet, the proofs, the fee)."""
        wallet = await self._online(info.mint)
        proofs = _nutshell_proofs(info)
        await self._resolve_keysets(wallet, info.mint, proofs)
        for proof in proofs:
            if not self._dleq_valid(wallet.keysets[proof.id], proof):
                raise PaymentError("The token's DLEQ proof does not verify: it was not signed by "
                                   f"the mint {info.mint}, or it was altered.")
        fee = wallet.get_fees_for_proofs(proofs)
        if info.amount - fee < min_amount:
            raise PaymentError(f"The token is worth {info.amount} {self.unit}, but after the mint's "
                               f"fee of {fee} {self.unit} that is less than the price of "
                               f"{min_amount} {self.unit}; it was not redeemed.")
        return wallet, proofs, fee

    async def recover_swap(self, mint: str, marks: list[dict]) -> tuple[bool, int]:
        """NUT-09: ask the mint again for the signatures of swaps whose answer was lost (each of
        `marks` says where a swap's output secrets start, derived from our seed, and how many it
        had), and keep those that are still unspent and not already ours. Returns (whether one of
        those swaps took place at the mint, the amount recovered).

        Only the swaps' own outputs are asked for, and the counter skips nothing past them: a
        seed restore (NUT-13) scans in batches and stops at the first empty ones (Nutshell's:
        two batches of 25), so a wide skip after each recovery would hide all later ecash from
        it. (A mark without "outputs", noted by an older version, gets RESTORE_WINDOW.)"""
        c = nutshell.load()
        wallet = await self._online(self._accepted(mint))
        recovered, happened = 0, False
        async with self._spend_lock(mint):
            for keyset in dict.fromkeys(str(m["keyset"]) for m in marks):
                spans = sorted({(int(m["counter"]), int(m.get("outputs") or RESTORE_WINDOW))
                                for m in marks if str(m["keyset"]) == keyset})
                # Each counter once (old marks' windows may overlap), in contiguous runs.
                counters = sorted({i for start, n in spans for i in range(start, start + n)})
                secrets, rs, paths = [], [], []
                for run in _runs(counters):
                    more = await wallet.generate_secrets_from_to(run[0], run[-1], keyset_id=keyset)
                    for into, items in zip((secrets, rs, paths), more):
                        into.extend(items)
                outputs, _ = wallet._construct_outputs([1] * len(secrets), secrets, rs, keyset_id=keyset)
                try:
                    restored, promises = await c.LedgerAPI.restore_promises(wallet, outputs)
                except Exception as exc:
                    raise mint_error(exc, mint) from exc
                await wallet.load_proofs(reload=True)
                known = {p.secret for p in wallet.proofs}
                where = {o.B_: i for i, o in enumerate(outputs)}
                signed = {counters[where[o.B_]] for o in restored if o.B_ in where}
                happened |= any(start in signed for start, _ in spans)   # a swap's first output
                found = [(promise, where[o.B_]) for o, promise in zip(restored, promises)
                         if o.B_ in where and secrets[where[o.B_]] not in known]
                if found:
                    proofs = await wallet._construct_proofs(
                        [p for p, _ in found], [secrets[i] for _, i in found], [rs[i] for _, i in found],
                        [paths[i] for _, i in found])
                    try:
                        spendable = await wallet.invalidate(proofs, check_spendable=True)
                    except Exception as exc:
                        raise mint_error(exc, mint) from exc
                    recovered += sum(p.amount for p in spendable)
                last = counters[-1]
                counter = await c.bump_secret_derivation(db=wallet.db, keyset_id=keyset, by=0)
                if counter <= last:   # never hand out a secret of these swaps again
                    await c.bump_secret_derivation(db=wallet.db, keyset_id=keyset, by=last + 1 - counter)
                    self._counter_blocks.pop((mint, keyset), None)   # from the database again
        return happened, recovered

    def _job_secret(self, job_id: str | None) -> str | None:
        if job_id is None or self._p2pk_secret is None:
            return None
        from .locks import job_lock_secret
        return job_lock_secret(self._p2pk_secret, job_id)

    def job_lock_pubkey(self, job_id: str) -> str:
        """The key a payment for `job_id` is locked to (see `locks`)."""
        from .locks import job_lock_pubkey
        return job_lock_pubkey(self.p2pk_pubkey, job_id)

    def _check_conditions(self, info: TokenInfo, require_lock: bool, min_locktime: int | None,
                          job_secret: str | None = None) -> None:
        ours = self._p2pk_secret and self.p2pk_pubkey
        if job_secret is not None:
            job_x = xonly_pubkey(job_secret)
            if any(c is not None and job_x in {k[2:] for k in c.pubkeys} for c in info.conditions):
                ours = "02" + job_x   # the lock names the job's key: check against that one
        for cond in info.conditions:
            if cond is None:
                if require_lock:
                    raise PaymentError("This payment must be P2PK-locked to the worker's key "
                                       f"{ours or '(none configured)'}; the token is not locked.")
                continue
            # Past its locktime, a lock whose refund key is ours (or that names none: anyone's)
            # is ours to take back, P2PK or HTLC (`reclaim_htlc`).
            refundable = _expired(cond) and (not cond.refund or (ours and _has_key(cond.refund, ours)))
            if cond.kind != "P2PK" and not refundable:
                raise PaymentError(f"The token is locked with a {cond.kind} condition, which this "
                                   "worker cannot unlock.")
            # A lock to "03"+x is ours too: P2PK signatures are checked against the x-coordinate.
            if not ours or not _has_key(cond.pubkeys, ours):
                if refundable:
                    continue
                raise PaymentError("The token is locked to another key, not to this wallet's key "
                                   f"{ours or '(none configured)'}.")
            if cond.kind != "P2PK":
                continue   # an HTLC naming our key, taken back by the refund path
            if cond.n_sigs > 1:
                raise PaymentError(f"The token needs {cond.n_sigs} signatures to be spent; this "
                                   "worker can give only its own.")
            if cond.sig_all and not (self._p2pk_secret and self.p2pk_pubkey in cond.pubkeys):
                # Nutshell signs SIG_ALL for the wallet's own key only; ours for other keys
                # (a job's, also_key) sign each input, which the mint refuses for SIG_ALL.
                raise PaymentError(f"The token is locked (SIG_ALL) to {cond.pubkeys[0]}; this worker "
                                   "takes SIG_ALL locks to its own wallet key only, SIG_INPUTS otherwise.")
            if min_locktime is not None and cond.locktime is not None and cond.locktime < min_locktime:
                raise PaymentError(
                    f"The token's lock expires at {cond.locktime} (unix time), before {min_locktime}: "
                    "the sender could take it back while the job runs. Lock it for longer.")

    def _check_htlc(self, info: TokenInfo, terms: HtlcTerms, preimage: bytes | None,
                    job_secret: str | None) -> None:
        """Pay on delivery, the provider's side: refuse, before the swap reveals the preimage,
        every proof that is not locked exactly as `terms` asked. ValueError for a caller's
        mistake (no preimage, or not the one of the hash; terms not for this job's key)."""
        if preimage is None or htlc_hash(preimage) != terms.hash:
            raise ValueError("receiving an HTLC payment needs the preimage of its hash")
        if job_secret is None or xonly_pubkey(job_secret) != terms.pubkey[2:]:
            raise ValueError("an HTLC payment is locked to a job's key: pass that job_id")
        for cond in info.conditions:
            if cond is None or cond.kind != "HTLC":
                raise PaymentError("This payment must be HTLC-locked (NUT-14) as the payment "
                                   "request says; the token is not.")
            if cond.hash != terms.hash:
                raise PaymentError("The token is locked to another hash than the one of this "
                                   f"job's result ({terms.hash}); it was not redeemed.")
            if {k[2:] for k in cond.pubkeys} != {terms.pubkey[2:]}:
                raise PaymentError("The token must be locked to this job's key "
                                   f"{terms.pubkey} alone; it names {', '.join(cond.pubkeys)}.")
            if cond.n_sigs != 1:
                raise PaymentError(f"The token needs {cond.n_sigs} signatures to be spent; a "
                                   "pay-on-delivery lock needs the job key's one signature.")
            if cond.sig_all:
                raise PaymentError("The token is locked with SIG_ALL; pay-on-delivery ecash must "
                                   "be SIG_INPUTS, so that every proof shows the preimage.")
            if cond.locktime is None or cond.locktime < terms.locktime:
                raise PaymentError(
                    f"The token's lock expires at {cond.locktime} (unix time), before "
                    f"{terms.locktime}: the sender could take it back before the worker can "
                    "redeem it. Lock it until the time the payment request asks for.")
            if {k[2:] for k in cond.refund} != {terms.refund_key[2:]}:
                raise PaymentError("The token's refund key must be the one the payment request "
                                   f"names ({terms.refund_key}); it names "
                                   f"{', '.join(cond.refund) or 'none'}.")

    def _sign_own_locks(self, proofs: list, conditions: tuple[SpendingCondition | None, ...],
                        job_secret: str | None = None, preimage: bytes | None = None) -> None:
        """Sign the proofs Nutshell would not: those locked to "03"+x of our key (Nutshell signs
        only for "02"+x) and those locked to the key derived for a job; and give HTLC proofs
        the `preimage` with the signature (Nutshell would sign them without it). `conditions`:
        the proofs' spending conditions, from `read_token`."""
        secrets = [s for s in (self._p2pk_secret, job_secret) if s]
        if not secrets:
            return
        c = nutshell.load()
        signers = {xonly_pubkey(secret): c.PrivateKey(bytes.fromhex(secret)) for secret in secrets}
        ours = self.p2pk_pubkey if self._p2pk_secret else None
        for proof, cond in zip(proofs, conditions):
            if cond is None:
                continue
            hash_path = cond.kind == "HTLC" and preimage is not None
            keys = set(cond.pubkeys) | (set() if hash_path else set(cond.refund))
            if ours in keys and not hash_path:
                continue   # Nutshell signs this one itself
            key = next((signers[k[2:]] for k in keys if k[2:] in signers), None)
            if key is None:
                continue
            signature = c.schnorr_sign(proof.secret.encode(), key).hex()
            if cond.kind == "HTLC":
                # Nutshell adds its own signature to this witness, if our key is named, and
                # keeps the preimage: an extra signature does not hurt.
                proof.witness = c.HTLCWitness(preimage=preimage.hex() if hash_path else None,
                                              signatures=[signature]).model_dump_json()
            else:
                proof.witness = c.P2PKWitness(signatures=[signature]).model_dump_json()

    async def _resolve_keysets(self, wallet, mint: str, proofs: list) -> None:
        """Give each proof its full keyset id (cashu-ts sends 16-hex short ids) and make sure the
        keyset is one the mint lists for our unit; refresh the keysets once if not."""
        for attempt in (1, 2):
            try:
                await wallet._expand_short_keyset_ids(proofs)
                unknown = [p.id for p in proofs if p.id not in wallet.keysets]
            except (KeyError, ValueError):
                unknown = ["?"]
            if not unknown:
                return
            if attempt == 1:
                wallet = await self._online(mint, refresh=True)
        raise PaymentError(f"The token was issued under a keyset ({unknown[0]}) that the mint "
                           f"{mint} does not list for {self.unit}; it may be forged.")

    @staticmethod
    def _dleq_valid(keyset, proof) -> bool:
        """NUT-12 check by the receiver: the mint's key for this amount signed this secret.

        Nutshell's own `verify_proofs_dleq` returns early (accepting) at the first proof without
        DLEQ, so every proof is checked here.
        """
        c = nutshell.load()
        try:
            return bool(c.b_dhke.carol_verify_dleq(
                secret_msg=proof.secret,
                C=c.PublicKey(bytes.fromhex(proof.C)),
                r=c.PrivateKey(bytes.fromhex(proof.dleq.r)),
                e=c.PrivateKey(bytes.fromhex(proof.dleq.e)),
                s=c.PrivateKey(bytes.fromhex(proof.dleq.s)),
                A=keyset.public_keys[proof.amount],
            ))
        except Exception:               # malformed hex, a point off the curve, unknown amount
            return False

    # -- sending and paying -----------------------------------------------------------------
    async def send_proofs(self, amount: int, mint: str, lock_to: str | None = None, *,
                          before_swap: Callable[[dict], None] | None = None) -> list[dict]:
        """Like `send`, but the proofs themselves (NUT-00 dicts with DLEQ and the mint's full
        keyset id), as a NIP-61 nutzap carries them. `before_swap` as for `send_htlc`: the
        locked outputs have random secrets, so if the mint's answer is lost only that record
        gets them back (`recover_locked_send`)."""
        mint = self._accepted(mint)
        c = nutshell.load()
        wallet = await self._online(mint)
        lock = await self._nut11_lock(c, wallet, lock_to, None, None)
        async with self._spend_lock(mint):
            with _outputs_noted(wallet, mint, before_swap):
                chosen = await self._choose_to_send(c, wallet, mint, amount, lock)
        return [p.to_dict(include_dleq=True) for p in chosen]

    async def locked_proofs(self, mint: str, lock_to: str, exclude: set[str] = frozenset()) -> list[dict]:
        """Proofs in our wallet's database that are locked to `lock_to` (made for someone else by
        a send whose answer a crash cut off), leaving out the secrets in `exclude`."""
        mint = self._accepted(mint)
        wallet = await self._open(mint)
        want = compressed_pubkey(lock_to)
        found = []
        # Under the spend lock: Nutshell's reload empties the list in memory, awaits, then fills
        # it, so two at once (payouts delivered together after a restart) would double it.
        async with self._spend_lock(mint):
            await wallet.load_proofs(reload=True)
            for p in wallet.proofs:
                if p.secret in exclude or p.dleq is None:
                    continue
                data, _, _ = p2pk_lock({"secret": p.secret})
                if data is not None and data.lower() == want:
                    found.append(p)
            if found:
                await wallet.set_reserved_for_send(found, reserved=True)   # never ours to spend
        return [p.to_dict(include_dleq=True) for p in found]

    async def send(self, amount: int, mint: str | None = None, lock_to: str | None = None, *,
                   locktime: int | None = None, refund_to: str | None = None) -> str:
        """A cashuB token worth exactly `amount`, with DLEQ proofs, for change and refunds.

        `lock_to`: P2PK-lock it to this key (66-hex compressed, or 64-hex x-only Nostr key taken
        as "02" + x). `locktime` (unix time) and `refund_to` add NUT-11 locktime and refund keys.
        The proofs are reserved in our wallet, so they are never sent twice; the receiver pays
        the mint's fee when redeeming.
        """
        if amount <= 0:
            raise ValueError("amount must be positive")
        mint = self._accepted(mint) if mint else await self._mint_with_balance(amount)
        c = nutshell.load()
        wallet = await self._online(mint)
        lock = await self._nut11_lock(c, wallet, lock_to, locktime, refund_to)
        async with self._spend_lock(mint):  # choosing and reserving coins must not interleave
            chosen = await self._choose_to_send(c, wallet, mint, amount, lock)
            return await wallet.serialize_proofs(chosen, include_dleq=True)

    @staticmethod
    async def _nut11_lock(c, wallet, lock_to, locktime, refund_to):
        """The NUT-11 secret to lock sent proofs with (a fresh nonce per proof), or None."""
        if lock_to is None:
            return None
        tags = c.Tags()
        if locktime is not None:
            tags["locktime"] = str(int(locktime))
        if refund_to is not None:
            tags["refund"] = [compressed_pubkey(refund_to)]
        return await wallet.create_p2pk_lock(compressed_pubkey(lock_to), tags=tags)

    async def _choose_to_send(self, c, wallet, mint, amount, lock) -> list:
        """Reserve proofs worth exactly `amount`, locked with the NUT-10 secret `lock` if any
        (a swap makes them), else our own plain coins where they add up."""
        proofs = [p for p in wallet.active_proofs(wallet.proofs) if _plain(p)]  # unreserved, of our unit
        try:
            if lock is None:
                chosen = wallet.coinselect(proofs, amount)
                if sum(p.amount for p in chosen) == amount:
                    await wallet.set_reserved_for_send(chosen, reserved=True)
                else:   # no exact coins: swap for them (the swap fee is ours)
                    _, chosen = await wallet.swap_to_send(proofs, amount, set_reserved=True)
            else:
                chosen = await self._swap_to_lock(c, wallet, proofs, amount, lock)
        except c.BalanceTooLowError:
            raise PaymentError(f"Not enough ecash at {mint} to send {amount} {self.unit} "
                               f"(available: {self._available(wallet)}).") from None
        except Exception as exc:
            error = mint_error(exc, mint)
            if error.code == "spent":
                # Our own coins are spent at the mint: an earlier swap went through but its answer
                # was lost. Drop them here (NUT-07) so that the next try picks others.
                try:
                    await wallet.invalidate(proofs, check_spendable=True)
                except Exception:
                    pass
                raise PaymentError(error.customer_message, retryable=True, code="spent") from exc
            raise error from exc
        return chosen

    @staticmethod
    async def _swap_to_lock(c, wallet, proofs: list, amount: int, lock) -> list:
        """Nutshell's `swap_to_send(proofs, amount, secret_lock=lock, set_reserved=True)` with
        fewer database transactions: no used-secrets query (the change's secrets are random, as
        Nutshell makes them for a locked send, and each locked one has a fresh nonce), and the
        new proofs, the reservation of the locked ones and the spent inputs written in one
        transaction, not one for the new proofs and one per proof after it. Returns the locked
        proofs, reserved. The caller holds the mint's spend lock."""
        proofs = wallet.active_proofs(proofs)
        if sum(p.amount for p in proofs) < amount:
            raise c.BalanceTooLowError()
        inputs = wallet.coinselect(proofs, amount, include_fees=True)
        inputs += [p for p in proofs    # as Nutshell: spend coins of inactive keysets too
                   if not wallet.keysets[p.id].active and not p.reserved and p not in inputs]
        keep, send = wallet.determine_output_amounts(inputs, amount, keyset_id_outputs=wallet.keyset_id)
        secrets = [await wallet._generate_random_secret() for _ in keep] + [lock.serialize() for _ in send]
        outputs, rs = wallet._construct_outputs(keep + send, secrets, [], wallet.keyset_id)
        inputs = wallet.sign_proofs_inplace_swap(inputs, outputs)
        promises = await _post_swap(c, wallet, inputs, outputs)
        made = _unblind(c, wallet, promises, secrets, rs, ["custom"] * len(secrets))
        locked = made[len(keep):]
        await _keep_swapped(c, wallet, made, spent=inputs, sent=locked)
        return locked

    # -- pay on delivery (NUT-14), the customer's side ----------------------------------------
    async def send_htlc(self, amount: int, mint: str, terms: HtlcTerms, *,
                        before_swap: Callable[[dict], None] | None = None) -> str:
        """A cashuB token worth exactly `amount`, with DLEQ proofs, HTLC-locked by `terms`: the
        provider redeems it only with the preimage of `terms.hash` (and the signature of
        `terms.pubkey`), which the mint then shows us (`htlc_preimage`); after
        `terms.locktime` our `terms.refund_key` takes it back (`reclaim_htlc`).

        Keep the token before sending it: the locked proofs have random secrets (a fresh nonce
        each), so they cannot be restored from the wallet's seed, and the token is what
        `htlc_preimage` and `reclaim_htlc` need. For the same reason `before_swap(record)` is
        called with every output of the swap (amount, secret, blinding factor) just before the
        mint is asked: store it (it is as good as the money), and if the mint's answer is lost,
        `recover_htlc_send(record)` gets the token and the change back (NUT-09 restore).
        """
        if amount <= 0:
            raise ValueError("amount must be positive")
        mint = self._accepted(mint)
        c = nutshell.load()
        lock = c.HTLCSecret(kind="HTLC", data=terms.hash, tags=c.Tags(terms.tags()))
        try:   # the mint's own parser: a lock it finds malformed is ecash nobody can ever spend
            c.nut10.parse_spending_condition(lock.serialize())
        except Exception as exc:
            raise ValueError(f"the mint would refuse this HTLC lock: {exc}") from None
        wallet = await self._online(mint)
        missing = [n for n in (7, 14) if not (wallet.mint_info and wallet.mint_info.supports_nut(n))]
        if missing:
            raise PaymentError(f"The mint {mint} does not support NUT-{missing[0]}, which paying on "
                               "delivery needs (NUT-07 to learn the preimage, NUT-14 to lock).")
        async with self._spend_lock(mint):
            with _outputs_noted(wallet, mint, before_swap):
                chosen = await self._choose_to_send(c, wallet, mint, amount, lock)
            return await wallet.serialize_proofs(chosen, include_dleq=True)

    async def unspent_part(self, token: str) -> str | None:
        """The proofs of `token` the mint says are still unspent (NUT-07), as a token of their
        own, when some of its proofs were spent (someone copied them into a token of theirs);
        None when all or none are. Raises PaymentError (the mint)."""
        info = read_token(token)
        wallet = await self._online(self._accepted(info.mint))
        try:
            states = await wallet.check_proof_state(_nutshell_proofs(info))
        except Exception as exc:
            raise mint_error(exc, info.mint) from exc
        unspent = {s.Y for s in states.states if s.unspent}
        keep = [p for p, y in zip(info.proofs, [q.Y for q in _nutshell_proofs(info)]) if y in unspent]
        if not keep or len(keep) == len(info.proofs):
            return None
        return encode_token_a(info.mint, [dict(p) for p in keep], info.unit)

    async def recover_htlc_send(self, record: dict) -> str | None:
        """After `send_htlc` was cut short (a crash, a lost answer): ask the mint for the
        signatures of the outputs `record` (what `before_swap` got) lists (NUT-09). Returns the
        HTLC token its swap made, with the change back in the wallet, or None when the swap
        never happened at the mint (then the coins it would have spent are still ours)."""
        made = await self._recover_locked_send(record)
        return None if made is None else await made[0].serialize_proofs(made[1], include_dleq=True)

    async def recover_locked_send(self, record: dict) -> list[dict] | None:
        """`recover_htlc_send` for `send_proofs(before_swap=...)`: the locked proofs its swap
        made (NUT-00 dicts with DLEQ and full keyset ids, as a nutzap carries them), or None."""
        made = await self._recover_locked_send(record)
        return None if made is None else [p.to_dict(include_dleq=True) for p in made[1]]

    async def _recover_locked_send(self, record: dict) -> tuple[object, list] | None:
        c = nutshell.load()
        mint = self._accepted(record["mint"])
        wallet = await self._online(mint)
        noted = {o["B_"]: o for o in record["outputs"]}
        outputs = [c.BlindedMessage(amount=o["amount"], B_=o["B_"], id=o["id"]) for o in record["outputs"]]
        async with self._spend_lock(mint):
            try:
                restored, promises = await c.LedgerAPI.restore_promises(wallet, outputs)
            except Exception as exc:
                raise mint_error(exc, mint) from exc
            if not restored:
                return None
            await wallet.load_proofs(reload=True)
            known = {p.secret: p for p in wallet.proofs}
            found = [(promise, noted[o.B_]) for o, promise in zip(restored, promises) if o.B_ in noted]
            new = [(p, o) for p, o in found if o["secret"] not in known]
            if new:
                await wallet._construct_proofs(
                    [p for p, _ in new], [o["secret"] for _, o in new],
                    [c.PrivateKey(bytes.fromhex(o["r"])) for _, o in new], ["custom"] * len(new))
                await wallet.load_proofs(reload=True)
                known = {p.secret: p for p in wallet.proofs}
            try:   # the coins the swap spent are gone: drop them (NUT-07)
                await wallet.invalidate([p for p in wallet.proofs if _plain(p)], check_spendable=True)
            except Exception as exc:
                raise mint_error(exc, mint) from exc
            locked = [known[o["secret"]] for _, o in found
                      if o["secret"] in known and not _plain(known[o["secret"]])]
            await wallet.set_reserved_for_send(locked, reserved=True)
            return wallet, locked

    def _read_htlc(self, token: str) -> TokenInfo:
        """A token of ours made by `send_htlc`: every proof HTLC-locked, from one of our mints."""
        info = read_token(token)
        if info.mint not in self.accepted_mints:
            raise PaymentError(f"The mint {info.mint} is not one of this wallet's mints.")
        if not all(c is not None and c.kind == "HTLC" for c in info.conditions):
            raise PaymentError("This token is not HTLC-locked in every proof.")
        return info

    async def htlc_preimage(self, token: str) -> bytes | None:
        """The preimage the provider revealed by redeeming an HTLC token we sent (`send_htlc`),
        read from the mint alone (NUT-07 returns the witness a spent proof was spent with), so a
        provider that takes the money cannot keep the key. None while no proof is spent with a
        preimage of its hash (unspent, pending, or taken back by the refund key)."""
        info = self._read_htlc(token)
        c = nutshell.load()
        wallet = await self._online(info.mint)
        proofs = _nutshell_proofs(info)     # Y = hash_to_curve(secret): no keyset id needed
        try:
            states = await wallet.check_proof_state(proofs)
        except Exception as exc:
            raise mint_error(exc, info.mint) from exc
        by_y = {p.Y: cond.hash for p, cond in zip(proofs, info.conditions)}
        for state in states.states:
            if not state.spent or not state.witness or state.Y not in by_y:
                continue
            try:
                preimage = bytes.fromhex(c.HTLCWitness.from_witness(state.witness).preimage or "")
                if htlc_hash(preimage) == by_y[state.Y]:
                    return preimage
            except (ValueError, TypeError):
                continue   # a refund witness, or one we cannot read: look at the next proof
        return None

    async def reclaim_htlc(self, token: str, *,
                           before_swap: Callable[[dict], None] | None = None) -> Received:
        """Take back, after its locktime, an HTLC token we sent (`send_htlc`) that the provider
        did not redeem: swapped with a signature of our P2PK key, which must be its refund key.
        Only the proofs still unspent are taken back: if the provider redeemed some, it revealed
        the preimage (`htlc_preimage`) and is owed those. `before_swap`: as in `receive`."""
        info = self._read_htlc(token)
        if self._p2pk_secret is None or not all(_has_key(c.refund, self.p2pk_pubkey)
                                                for c in info.conditions):
            raise PaymentError("This HTLC token's refund key is not this wallet's key "
                               f"{self._p2pk_secret and self.p2pk_pubkey or '(none configured)'}.")
        if not all(_expired(c) for c in info.conditions):
            locktime = max(c.locktime or 0 for c in info.conditions)
            raise PaymentError(f"This HTLC token can be taken back only after its locktime "
                               f"{locktime} (unix time), {locktime - int(time.time())} s from now.",
                               retryable=True)
        self._check_offline(info, 0)
        wallet = await self._online(info.mint)
        proofs = _nutshell_proofs(info)
        try:
            states = await wallet.check_proof_state(proofs)
        except Exception as exc:
            raise mint_error(exc, info.mint) from exc
        unspent = {s.Y for s in states.states if s.unspent}
        keep = [i for i, p in enumerate(proofs) if p.Y in unspent]
        if not keep:
            raise PaymentError("This HTLC token was already spent; a Cashu token can be used "
                               "only once.", code="spent")
        info = dataclasses.replace(info, proofs=tuple(info.proofs[i] for i in keep),
                                   conditions=tuple(info.conditions[i] for i in keep))
        return await self._redeem(info, 0, None, before_swap, ours=True)

    async def melt(self, bolt11: str, mint: str | None = None) -> dict:
        """Pay a Lightning invoice with our ecash (melt quote, then melt).

        Returns {"mint", "amount", "fee_paid", "preimage", "state"}; "state" is "paid" or, if
        the Lightning payment is still in flight, "pending".
        """
        candidates = [self._accepted(mint)] if mint else list(self.accepted_mints)
        last_error: PaymentError | None = None
        for url in candidates:
            wallet = await self._open(url)
            if not self._available(wallet):
                continue
            try:
                wallet = await self._online(url)
                quote = await wallet.melt_quote(bolt11)
            except Exception as exc:
                last_error = mint_error(exc, url, "this Lightning payment")
                continue
            total = quote.amount + quote.fee_reserve
            if self._available(wallet) < total + wallet.coinselect_fee(wallet.proofs, total):
                continue
            before = sum(p.amount for p in wallet.proofs)
            try:
                proofs, _ = await wallet.select_to_send(wallet.proofs, total, include_fees=True,
                                                        set_reserved=False)
                response = await wallet.melt(proofs, bolt11, quote.fee_reserve, quote.quote)
            except Exception as exc:
                raise mint_error(exc, url, "this Lightning payment") from exc
            state = str(getattr(response.state, "value", response.state) or "").lower()
            spent = before - sum(p.amount for p in wallet.proofs)
            return {"mint": url, "amount": quote.amount, "fee_paid": spent - quote.amount,
                    "preimage": response.payment_preimage, "state": state}
        raise last_error or PaymentError(
            "Not enough ecash to pay this invoice (available: "
            f"{sum(self._available(w) for w in self._wallets.values())} {self.unit}).")

    async def create_invoice(self, amount: int, mint: str) -> Invoice:
        """Ask `mint` for a Lightning invoice that buys `amount` of ecash (a NUT-04 mint quote).
        Whoever pays the invoice funds this wallet once `claim_invoice` is called."""
        mint = self._accepted(mint)
        wallet = await self._online(mint)
        try:
            quote = await wallet.request_mint(amount)
        except Exception as exc:
            raise mint_error(exc, mint) from exc
        return Invoice(quote_id=quote.quote, bolt11=quote.request, mint=mint, amount=amount)

    async def claim_invoice(self, invoice: Invoice, timeout: float = MINT_QUOTE_TIMEOUT) -> int:
        """Wait up to `timeout` seconds for the invoice to be paid, then mint its ecash; returns
        the amount minted."""
        wallet = await self._online(invoice.mint)
        deadline = time.monotonic() + timeout
        try:
            while not (await wallet.get_mint_quote(invoice.quote_id)).paid:
                if time.monotonic() > deadline:
                    raise PaymentError(f"The Lightning invoice for {invoice.amount} {self.unit} was "
                                       f"not paid within {timeout:g} s.", retryable=True)
                await asyncio.sleep(0.2)
            proofs = await wallet.mint(invoice.amount, quote_id=invoice.quote_id)
        except Exception as exc:
            raise mint_error(exc, invoice.mint) from exc
        return sum(p.amount for p in proofs)

    async def mint_from_lightning(self, amount: int, mint: str) -> int:
        """Buy `amount` of ecash at `mint` and wait for it: `create_invoice` + `claim_invoice`.
        A FakeWallet mint (tests, demo) pays its own invoices; a real one waits for a payer."""
        return await self.claim_invoice(await self.create_invoice(amount, mint))

    async def check_spent(self, token: str) -> bool:
        """NUT-07: True once any proof of the token is spent (or being spent) at its mint, i.e.
        the token can no longer be redeemed whole."""
        info = read_token(token)
        if info.mint not in self.accepted_mints:
            raise PaymentError(f"The mint {info.mint} is not one of this wallet's mints.")
        wallet = await self._online(info.mint)
        try:
            states = await wallet.check_proof_state(_nutshell_proofs(info))
        except Exception as exc:
            raise mint_error(exc, info.mint) from exc
        return any(not state.unspent for state in states.states)

    # -- balances ---------------------------------------------------------------------------
    async def balance(self) -> dict[str, int]:
        """Spendable balance (reserved proofs excluded) per mint URL, from our database only."""
        for mint in self.accepted_mints:
            await self._open(mint)
        return {mint: self._available(wallet) for mint, wallet in self._wallets.items()}

    async def total_balance(self) -> int:
        """The sum of `balance()` over all mints."""
        return sum((await self.balance()).values())

    async def _mint_with_balance(self, amount: int) -> str:
        balances = await self.balance()
        for mint in self.accepted_mints:
            if balances.get(mint, 0) >= amount:
                return mint
        raise PaymentError(f"Not enough ecash at any one mint to send {amount} {self.unit} "
                           f"(balances: {balances}).")

    def _accepted(self, mint: str) -> str:
        mint = normalize_mint_url(mint)
        if mint not in self.accepted_mints:
            raise ValueError(f"{mint} is not one of this wallet's mints")
        return mint

    @staticmethod
    def _available(wallet) -> int:
        return sum(p.amount for p in wallet.proofs if not p.reserved and _plain(p))

    # -- opening Nutshell wallets -----------------------------------------------------------
    async def _open(self, mint: str):
        """The Nutshell wallet for `mint`, opened from our database without network access."""
        wallet = self._wallets.get(mint)
        if wallet is not None:
            return wallet
        async with self._open_lock:
            if mint in self._wallets:
                return self._wallets[mint]
            c = nutshell.load()
            name = _wallet_name(mint, self.unit)
            db_file = self.directory / f"{name}.sqlite3"
            create_private_file(db_file)
            # The first with_db of a database prints a "Generated a new mnemonic" notice.
            with contextlib.redirect_stdout(io.StringIO()):
                wallet = await c.KeptClientWallet.with_db(mint, str(self.directory), name=name,
                                                         unit=self.unit)
            for path in self.directory.glob(f"{name}.sqlite3*"):   # the -wal and -shm files too
                path.chmod(0o600)
            if self._p2pk_secret is not None:
                # Nutshell signs P2PK proofs with `wallet.private_key` (derived from its mnemonic
                # unless replaced); use our dedicated, even-Y key.
                wallet.private_key = c.PrivateKey(bytes.fromhex(self._p2pk_secret))
            await wallet.load_proofs(reload=True)
            self._wallets[mint] = wallet
            return wallet

    async def _online(self, mint: str, refresh: bool = False):
        """The wallet for `mint` with the mint's keysets and info loaded (network)."""
        wallet = await self._open(mint)
        if not self._keysets_fresh(mint) or refresh:
            # One loader at a time: concurrent payments on a fresh wallet would both insert the
            # mint's keysets into its database and one would fail on the unique key.
            async with self._keyset_lock:
                if refresh or not self._keysets_fresh(mint):
                    # Not wallet.load_mint(): it logs and swallows every error, so an
                    # unreachable mint would show up later as a KeyError.
                    try:
                        await wallet.load_mint_keysets()
                        await wallet.activate_keyset()
                        await wallet.load_mint_info(reload=True)
                    except Exception as exc:
                        raise mint_error(exc, mint) from exc
                    self._keysets_loaded_at[mint] = time.monotonic()
        return wallet

    def _spend_lock(self, mint: str) -> asyncio.Lock:
        lock = self._spend_locks.get(mint)
        if lock is None:
            lock = self._spend_locks[mint] = asyncio.Lock()
        return lock

    def _keysets_fresh(self, mint: str) -> bool:
        loaded = self._keysets_loaded_at.get(mint)
        return loaded is not None and time.monotonic() - loaded <= KEYSET_REFRESH_SECONDS

    async def close(self) -> None:
        """Close the HTTP client and database engine of every opened wallet."""
        for wallet in self._wallets.values():
            client = getattr(wallet, "httpx", None)
            if client is not None:
                await client.aclose()
            await wallet.db.engine.dispose()
        self._wallets.clear()
        self._keysets_loaded_at.clear()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()
