"""The customer's side of NIP-90: send a job request, follow its feedback, get the result.

Used by `dvm demo`, the tests and the example scripts; any other NIP-90 client works as well.
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import AsyncIterator, Callable

from dataclasses import dataclass

from dvm_core.protocol.delivery import DeliveryOffer, decode_sealed, parse_offer, seal_key
from dvm_core.protocol.ecash import (NUTZAP_INFO_KIND, NUTZAP_KIND, HtlcTerms, build_nutzap, build_nutzap_info,
                    decode_payment_request, decode_token, htlc_hash, htlc_terms_of,
                    normalize_mint_url_or_keep, parse_nutzap, parse_nutzap_info)
from dvm_core.protocol.nip44 import get_conversation_key
from dvm_core.protocol.encryption import Scheme, decrypt, encrypter
from dvm_core.protocol.events import InvalidEvent, Keys, sign_event, verify_event
from dvm_core.payments.locks import job_lock_pubkey
from dvm_core.protocol.nip90 import (DELETION_KIND, FEEDBACK_KIND, HANDLER_KIND, Feedback, JobInput, Result,
                    addressed_providers, build_request, is_encrypted, parse_feedback,
                    parse_handler_announcement, parse_result)
from dvm_core.protocol.verdicts import LABEL_KIND, NAMESPACE, Verdict, build_verdict, parse_verdict
from dvm_core.transport.relay import RelayPool


class JobFailed(Exception):
    """The provider answered with an `error` feedback."""

    def __init__(self, feedback: Feedback):
        super().__init__(feedback.message or "the provider reported an error")
        self.feedback = feedback


class PaymentDeclined(Exception):
    """The customer's side refuses to pay what a `payment-required` asks; the message says why."""


@dataclass(frozen=True)
class WalletInfo:
    """How a DVM says it takes ecash, from events it signed itself (kind 10019, NIP-89)."""

    p2pk_pubkey: str | None
    mints: tuple[str, ...]
    prices: dict             # kind name -> fixed price, for kinds with one
    names: dict              # kind number -> kind name
    pricing: dict = None     # kind name -> how it is priced, in words


class Customer:
    """A NIP-90 customer. Feedback and results count only when signed by the DVM the request
    named (anyone can tag a request), and payment goes only where that DVM's own events say."""

    def __init__(self, keys: Keys, relays: list[str]):
        self.keys = keys
        self.pool = RelayPool(relays, self._on_event)
        self._queues: dict[str, asyncio.Queue] = {}
        self._schemes: dict[str, tuple[Scheme | None, str | None]] = {}
        self._wallet_infos: dict[str, WalletInfo] = {}
        self._collected: set[str] = set()
        self._paid: dict[str, int] = {}   # jobs paid by `pay_with_nutzap` -> the amount

    async def __aenter__(self) -> "Customer":
        await self.pool.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.pool.close()

    def _on_event(self, event: dict, relay: str) -> None:
        for t in event["tags"]:
            if len(t) >= 2 and t[0] == "e" and t[1] in self._queues:
                provider = self._schemes[t[1]][1]
                if provider is not None and event["pubkey"] != provider:
                    return  # not from the DVM we asked: a forged result, error or payment request
                self._queues[t[1]].put_nowait(event)
                return

    def _decrypter(self, request_id: str, event: dict) -> Callable[[str], str] | None:
        scheme, provider = self._schemes.get(request_id, (None, None))
        if scheme is None:
            return None
        return lambda text: decrypt(self.keys.private_key, event["pubkey"], text)[0]

    async def submit(
        self, kind: int, inputs: list[JobInput] = (), params: dict[str, str] | None = None, *,
        provider: str | None = None, encrypt: Scheme | None = "nip44", bid_msats: int | None = None,
        output: str | None = None, cashu: str | None = None,
    ) -> dict:
        """Sign and publish a job request; returns the request event. Encrypted (NIP-44 by
        default) when a provider is named; `encrypt=None` sends it in the clear. `cashu`: a
        token paying for the job (inside the encrypted params, or a public tag)."""
        if encrypt and not provider:
            raise ValueError("an encrypted request needs the provider's public key")
        enc = encrypter(encrypt, self.keys.private_key, provider) if encrypt else None
        kind_, content, tags = build_request(
            kind, list(inputs), params or {}, output=output, bid_msats=bid_msats,
            providers=[provider] if provider else [], encrypt=enc, cashu=cashu)
        event = sign_event(self.keys, kind_, content, tags)
        self._queues[event["id"]] = asyncio.Queue()
        self._schemes[event["id"]] = (encrypt or None, provider)
        await self.pool.subscribe(f"job-{event['id'][:16]}", [
            {"kinds": [FEEDBACK_KIND, kind + 1000], "#e": [event["id"]]}])
        results = await self.pool.publish(event)
        if not any(r.ok for r in results):
            raise RuntimeError("no relay accepted the request: "
                               + "; ".join(f"{r.relay}: {r.message}" for r in results))
        return event

    async def recover(self, job_id: str, timeout: float = 5.0) -> tuple[dict, list[Feedback], Result | None]:
        """Find one of this customer's jobs again by its id: the request, the feedback so far and
        the result, if any, decrypted with this customer's key (only the named DVM's count).
        Afterwards `updates` follows it as if it had just been submitted. Raises LookupError."""
        events = await self.pool.query([{"ids": [job_id]}], timeout)
        request = None
        for event in events:
            try:
                verify_event(event)
            except InvalidEvent:
                continue
            if event["id"] == job_id and event["pubkey"] == self.keys.public_key:
                request = event
        if request is None:
            raise LookupError(f"no job {job_id} of this key on these relays (give the key that sent it)")
        providers = addressed_providers(request)
        provider = providers[0] if providers else None
        self._schemes[job_id] = ("nip44" if is_encrypted(request) else None, provider)
        self._queues.setdefault(job_id, asyncio.Queue())
        filters = [{"kinds": [FEEDBACK_KIND, request["kind"] + 1000], "#e": [job_id]}]
        await self.pool.subscribe(f"job-{job_id[:16]}", filters)
        replies = await self.pool.query(filters, timeout)
        replies = sorted((e for e in replies if provider is None or e["pubkey"] == provider),
                         key=lambda e: e["created_at"])
        feedback, result = [], None
        for event in replies:
            dec = self._decrypter(job_id, event)
            if event["kind"] == FEEDBACK_KIND:
                feedback.append(parse_feedback(event, dec))
            else:
                result = parse_result(event, dec)
        return request, feedback, result

    async def updates(self, request: dict, timeout: float = 600.0) -> AsyncIterator[Feedback | Result]:
        """Feedback and results for `request` as they arrive; ends after a result or an error."""
        queue = self._queues[request["id"]]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"no result for job {request['id'][:12]} within {timeout:g}s")
            try:
                # Not asyncio.wait_for: on Python 3.11 it loses a cancellation (Ctrl-C) that
                # arrives as the queue hands over an event; asyncio.timeout does not.
                async with asyncio.timeout(remaining):
                    event = await queue.get()
            except TimeoutError:
                continue
            dec = self._decrypter(request["id"], event)
            if event["kind"] == FEEDBACK_KIND:
                feedback = parse_feedback(event, dec)
                yield feedback
                if feedback.status == "error":
                    return
            else:
                yield parse_result(event, dec)
                return

    async def result(self, request: dict, timeout: float = 600.0,
                     on_feedback: Callable[[Feedback], None] | None = None) -> Result:
        """Wait for the result; raises JobFailed on an error feedback."""
        async for update in self.updates(request, timeout):
            if isinstance(update, Result):
                return update
            if on_feedback:
                on_feedback(update)
            if update.status == "error":
                raise JobFailed(update)
        raise RuntimeError("unreachable")

    async def wallet_info(self, provider: str, refresh: bool = False) -> WalletInfo:
        """The DVM's wallet key, mints and fixed prices, read from its own kind 10019 and NIP-89
        announcement: only events it signed count, whatever a relay returns."""
        if provider in self._wallet_infos and not refresh:
            return self._wallet_infos[provider]
        events = await self.pool.query([{"kinds": [NUTZAP_INFO_KIND, HANDLER_KIND], "authors": [provider]}], 5.0)
        key, mints, prices, names, pricing = None, (), {}, {}, {}
        for event in sorted(events, key=lambda e: e["created_at"]):   # newest last, so it wins
            if event.get("pubkey") != provider:
                continue
            try:
                verify_event(event)
            except InvalidEvent:
                continue
            if event["kind"] == NUTZAP_INFO_KIND:
                info = parse_nutzap_info(event)
                key = info.p2pk_pubkey or key
                mints = tuple(normalize_mint_url_or_keep(m) for m in info.mints) or mints
            else:
                try:
                    content, _ = parse_handler_announcement(event)
                except ValueError:
                    continue
                payment = content.get("payment") if isinstance(content, dict) else None
                if isinstance(payment, dict):
                    key = payment.get("p2pk_pubkey") or key
                    mints = tuple(normalize_mint_url_or_keep(m) for m in payment.get("mints") or ()) or mints
                    prices = payment.get("prices") if isinstance(payment.get("prices"), dict) else {}
                    pricing = payment.get("pricing") if isinstance(payment.get("pricing"), dict) else {}
                kinds = content.get("nip90") if isinstance(content, dict) else None
                if isinstance(kinds, dict):
                    names = {str(k): v.get("name") for k, v in kinds.items() if isinstance(v, dict)}
        info = WalletInfo(key, tuple(mints), prices, names, pricing)
        self._wallet_infos[provider] = info
        return info

    async def check_payment_request(self, request: dict, feedback: Feedback, *,
                                    max_price: int | None = None, mints: list[str] | None = None) -> dict:
        """What a `payment-required` asks, checked before any sat moves: signed by the DVM the
        request named, the same amount in its `amount` tag and its NUT-18 request, no more than
        `max_price`, no other than the DVM's announced fixed price, on a mint the DVM announced
        (and `mints`, ours), locked to the key derived for this job from the wallet key the DVM
        advertises. Returns the NUT-18 request with `m` narrowed to the usable mints; raises
        PaymentDeclined."""
        provider = self._signer(request, feedback, "payment request")
        try:
            creq = decode_payment_request(feedback.content)
            amount, unit = int(creq["a"]), creq.get("u", "sat")
        except (ValueError, KeyError, TypeError):
            raise PaymentDeclined("the payment request is not a NUT-18 creqA with an amount") from None
        if unit != "sat":
            raise PaymentDeclined(f"the DVM asks to be paid in {unit!r}, not sat")
        if feedback.amount_msats is None or feedback.amount_msats != amount * 1000:
            raise PaymentDeclined(f"the DVM's amount tag ({feedback.amount_msats} msats) and its payment "
                                  f"request ({amount} sat) disagree")
        if amount <= 0:
            raise PaymentDeclined("the payment request asks for nothing")
        info = await self._announced_terms(request, provider, amount, max_price, "payment request")
        nut10 = creq.get("nut10") or {}
        expected = job_lock_pubkey(info.p2pk_pubkey, request["id"])
        if nut10.get("k") != "P2PK" or str(nut10.get("d", "")).lower() != expected:
            raise PaymentDeclined("the payment request asks for a lock to a key that is not this job's "
                                  "key derived from the DVM's advertised wallet key")
        usable = _usable_mints(creq, info, mints)
        return dict(creq, m=usable, a=amount)

    def _signer(self, request: dict, feedback: Feedback, what: str) -> str:
        """The DVM a payment request or offer comes from: the one the request named, if any."""
        signer = feedback.event.get("pubkey")
        named = self._schemes.get(request["id"], (None, None))[1]
        if named is not None and signer != named:
            raise PaymentDeclined(f"the {what} is not signed by the DVM you asked")
        return named or signer

    async def _announced_terms(self, request: dict, provider: str, amount: int,
                               max_price: int | None, what: str) -> WalletInfo:
        """The DVM's own terms, once `amount` is within `max_price` and its announced fixed
        price, and it advertises a wallet key to check the lock against."""
        if max_price is not None and amount > max_price:
            raise PaymentDeclined(f"the DVM asks {amount} sat, more than your limit of {max_price} sat")
        info = await self.wallet_info(provider)
        name = info.names.get(str(request["kind"]))
        fixed = info.prices.get(name) if name else None
        if isinstance(fixed, int) and amount != fixed:
            raise PaymentDeclined(f"the DVM asks {amount} sat, but announces {fixed} sat for {name}")
        if not info.p2pk_pubkey:
            raise PaymentDeclined("the DVM publishes no wallet key of its own (kind 10019 or NIP-89), "
                                  f"so there is no key to check the {what}'s lock against")
        return info

    async def pay_with_nutzap(self, request: dict, feedback: Feedback, wallet, *,
                              max_price: int | None = None,
                              keep: Callable[[dict], None] | None = None) -> dict:
        """Answer a `payment-required` feedback, once `check_payment_request` passed: a NIP-61
        nutzap of exactly the amount asked, on a mint the DVM announced, P2PK-locked to this
        job's key, sent to the DVM the request named. A job is paid once: a second
        `payment-required` for it (a DVM that asks again, honest after a restart or not) is
        declined, so `max_price` caps the job, not each ask. Raises PaymentDeclined.

        `keep(state)` stores the payment as it goes (a JSON-able dict; `state_keeper` writes it
        to a file): before the swap that locks the ecash (`{"job_id", "provider", "kind",
        "swap"}`: only this record gets the locked ecash back if the mint's answer is lost),
        then with the signed nutzap (`"event"`) before it is published, then `"published"`.
        Ecash locked to the job's key is the DVM's alone to spend: a payment cut short is sent
        on with `resend_payment(state)`, never lost (`dvm job reclaim` does it)."""
        if request["id"] in self._paid:
            raise PaymentDeclined(f"this job was paid already ({self._paid[request['id']]} sat); it "
                                  "is not paid twice")
        creq = await self.check_payment_request(request, feedback, max_price=max_price,
                                                mints=list(wallet.accepted_mints))
        provider = self._schemes.get(request["id"], (None, None))[1] or feedback.event["pubkey"]
        # Bare proofs with the mint's full keyset ids, as NIP-61 wants (a cashuB token's 16-hex
        # short ids are refused by stock wallets).
        self._paid[request["id"]] = creq["a"]   # before the ecash is made: never twice
        keep = keep or (lambda _state: None)
        state: dict = {"job_id": request["id"], "provider": provider, "kind": request["kind"],
                       "amount": creq["a"]}

        def before_swap(record: dict) -> None:
            state["swap"] = record
            keep(dict(state))
        proofs = await wallet.send_proofs(creq["a"], creq["m"][0], lock_to=creq["nut10"]["d"],
                                          before_swap=before_swap)
        return await self._send_payment(state, proofs, creq["m"][0], wallet.unit, keep)

    async def _send_payment(self, state: dict, proofs: list[dict], mint: str, unit: str,
                            keep: Callable[[dict], None]) -> dict:
        kind, content, tags = build_nutzap(mint, proofs, state["provider"], unit=unit,
                                           zapped_event=state.get("job_id"), zapped_kind=state.get("kind"),
                                           comment=state.get("comment", "payment"))
        event = sign_event(self.keys, kind, content, tags)
        state["event"] = event
        keep(dict(state))
        results = await self.pool.publish(event)
        if not any(r.ok for r in results):
            raise RuntimeError("no relay accepted the nutzap (it is kept: send it again with "
                               "`dvm job reclaim`)")
        state["published"] = True
        keep(dict(state))
        return event

    async def resend_payment(self, state: dict, wallet, keep: Callable[[dict], None] | None = None) -> dict | None:
        """Finish a nutzap payment that `pay_with_nutzap` kept in `state` and did not finish (a
        lost answer from the mint, a crash, no relay took it): its nutzap published again, made
        first from the ecash the lost swap locked (NUT-09) if it never was. The DVM runs the job
        if it still waits for that payment, else sends the ecash back. Returns the nutzap event,
        or None when the swap never took place at the mint (the coins are still in `wallet`).
        Raises PaymentError (the mint), RuntimeError (no relay took it)."""
        keep = keep or (lambda _state: None)
        if state.get("event"):
            event = verify_event(state["event"])
            results = await self.pool.publish(event)
            if not any(r.ok for r in results):
                raise RuntimeError("no relay accepted the nutzap; try again later")
            keep({**state, "published": True})
            return event
        if not state.get("swap"):
            return None
        proofs = await wallet.recover_locked_send(state["swap"])
        if proofs is None:
            return None
        return await self._send_payment(dict(state), proofs, state["swap"]["mint"], wallet.unit, keep)

    async def send_bonus(self, provider: str, amount: int, wallet, *, comment: str = "bonus",
                         keep: Callable[[dict], None] | None = None) -> dict:
        """A gift outside any job (e.g. a federated round's bonus for contribution): a NIP-61
        nutzap locked to the wallet key the DVM advertises, on a mint it announces and the wallet
        holds, tagging no job, so the worker leaves it for its operator to collect (`dvm wallet
        collect`) rather than taking it for a payment or sending it back. Raises PaymentDeclined.

        `keep(state)` as for `pay_with_nutzap` (`{"provider", "amount", "comment", "bonus"}`,
        then `"swap"`, `"event"`, `"published"`): a bonus cut short (a lost answer from the mint,
        a crash) is sent on with `resend_payment(state)` (`dvm job reclaim`), its locked ecash
        and change never lost."""
        if amount <= 0:
            raise PaymentDeclined("a bonus of nothing")
        info = await self.wallet_info(provider)
        if not info.p2pk_pubkey:
            raise PaymentDeclined("the DVM publishes no wallet key of its own (kind 10019 or NIP-89)")
        accepted = list(wallet.accepted_mints)
        usable = [m for m in accepted if not info.mints or m in info.mints]
        if not usable:
            raise PaymentDeclined("the DVM announces none of your wallet's mints")
        keep = keep or (lambda _state: None)
        state: dict = {"provider": provider, "amount": amount, "comment": comment, "bonus": True}

        def before_swap(record: dict) -> None:
            state["swap"] = record
            keep(dict(state))
        proofs = await wallet.send_proofs(amount, usable[0], lock_to=info.p2pk_pubkey, before_swap=before_swap)
        return await self._send_payment(state, proofs, usable[0], wallet.unit, keep)

    # verdicts ------------------------------------------------------------------------------
    async def publish_verdict(self, provider: str, label: str, reason: str, *, job_id: str | None = None,
                              kind: int | None = None) -> dict:
        """Sign and publish a verdict on `provider` (NIP-32, `dvm_core.protocol.verdicts`)."""
        event = sign_event(self.keys, *build_verdict(provider, label, reason, job_id=job_id, kind=kind))
        results = await self.pool.publish(event)
        if not any(r.ok for r in results):
            raise RuntimeError("no relay accepted the verdict")
        return event

    async def verdicts(self, providers: list[str], trusted: list[str], timeout: float = 5.0) -> list[Verdict]:
        """The verdicts on `providers` signed by `trusted` keys (others are not even asked for,
        and any a relay returns anyway are dropped), newest first."""
        if not providers or not trusted:
            return []
        events = await self.pool.query([{"kinds": [LABEL_KIND], "authors": list(trusted), "#L": [NAMESPACE],
                                         "#p": list(providers)}], timeout)
        found: dict[str, Verdict] = {}
        for event in events:
            if event.get("pubkey") not in trusted:
                continue
            try:
                verify_event(event)
                verdict = parse_verdict(event)
            except (InvalidEvent, ValueError):
                continue
            if verdict.provider in providers:
                found[verdict.event_id] = verdict
        return sorted(found.values(), key=lambda v: v.created_at, reverse=True)

    # pay on delivery ---------------------------------------------------------------------
    async def check_delivery(self, request: dict, feedback: Feedback, *, refund_key: str,
                             max_price: int | None = None, mints: list[str] | None = None,
                             min_lock_seconds: float = 120, max_lock_seconds: float = 7 * 86400,
                             ) -> tuple[DeliveryOffer, HtlcTerms, dict]:
        """What a pay-on-delivery offer asks, checked before any sat moves: signed by the DVM the
        request named; the amount the same in its `amount` tag, the offer and its NUT-18 request,
        within `max_price` and the DVM's announced fixed price; the HTLC lock of the request is
        the offer's hash, this job's key derived from the DVM's advertised wallet key, our
        `refund_key`, and a locktime between `min_lock_seconds` and `max_lock_seconds` from now;
        on a mint the DVM announced and we hold. Returns (offer, terms, the NUT-18 request with
        `m` narrowed to usable mints); raises PaymentDeclined."""
        provider = self._signer(request, feedback, "offer")
        try:
            offer = parse_offer(feedback.content)
        except ValueError as exc:
            raise PaymentDeclined(f"the offer cannot be read: {exc}") from None
        if offer.unit != "sat":
            raise PaymentDeclined(f"the DVM asks to be paid in {offer.unit!r}, not sat")
        terms, creq = await self._htlc_request(request, provider, offer.payment_request, feedback,
                                               refund_key=refund_key, max_price=max_price, mints=mints,
                                               min_lock_seconds=min_lock_seconds,
                                               max_lock_seconds=max_lock_seconds, what="offer")
        if creq["a"] != offer.amount:
            raise PaymentDeclined(f"the offer's amounts disagree (offer {offer.amount} sat, payment request "
                                  f"{creq['a']} sat)")
        if terms.hash != offer.hash:
            raise PaymentDeclined("the payment request locks to another hash than the offer's")
        if terms.locktime != offer.locktime:
            raise PaymentDeclined("the payment request's locktime is not the offer's")
        if len(offer.files) > MAX_ARTIFACTS:
            raise PaymentDeclined(f"the offer lists more than {MAX_ARTIFACTS} files")
        return offer, terms, creq

    async def _htlc_request(self, request: dict, provider: str, payment_request: str, feedback: Feedback, *,
                            refund_key: str, max_price: int | None, mints: list[str] | None,
                            min_lock_seconds: float, max_lock_seconds: float, what: str) -> tuple[HtlcTerms, dict]:
        """The HTLC terms of a NUT-18 request a DVM sent for a job paid on delivery, checked:
        in sat, the amount the same as the feedback's `amount` tag (if it has one) and within
        `max_price` and the DVM's announced price; the lock to this job's key derived from the
        DVM's advertised wallet key, our `refund_key`, a locktime between `min_lock_seconds` and
        `max_lock_seconds` from now; on a mint the DVM announced and we hold. Returns (the terms,
        the request with `a` an int and `m` narrowed to usable mints); raises PaymentDeclined."""
        try:
            creq = decode_payment_request(payment_request)
            terms = htlc_terms_of(creq.get("nut10"))
            amount = int(creq["a"])
        except (ValueError, KeyError, TypeError) as exc:
            raise PaymentDeclined(f"the {what} cannot be read: {exc}") from None
        if terms is None:
            raise PaymentDeclined(f"the {what}'s payment request asks for no HTLC lock")
        if creq.get("u", "sat") != "sat":
            raise PaymentDeclined(f"the DVM asks to be paid in {creq.get('u')!r}, not sat")
        if feedback.amount_msats is not None and feedback.amount_msats != amount * 1000:
            raise PaymentDeclined(f"the {what}'s amounts disagree (amount tag {feedback.amount_msats} msats, "
                                  f"payment request {amount} sat)")
        if what == "offer" and feedback.amount_msats is None:
            raise PaymentDeclined("the offer has no amount tag")
        info = await self._announced_terms(request, provider, amount, max_price, what)
        if terms.pubkey != job_lock_pubkey(info.p2pk_pubkey, request["id"]):
            raise PaymentDeclined("the payment request asks for a lock to a key that is not this job's "
                                  "key derived from the DVM's advertised wallet key")
        if terms.refund_key[2:] != refund_key[-64:]:
            raise PaymentDeclined(f"the payment request's refund key is {terms.refund_key}, not yours")
        now = time.time()
        if not (now + min_lock_seconds <= terms.locktime <= now + max_lock_seconds):
            raise PaymentDeclined(f"the lock would expire at {terms.locktime} (unix time), "
                                  f"{terms.locktime - int(now)} s from now; between {min_lock_seconds:g} "
                                  f"and {max_lock_seconds:g} s is accepted")
        usable = _usable_mints(creq, info, mints)
        return terms, dict(creq, m=usable, a=amount)

    async def prepare_delivery(self, request: dict, feedback: Feedback, wallet, *,
                               max_price: int | None = None, keep: Callable[[dict], None] | None = None,
                               min_lock_seconds: float = 120,
                               max_lock_seconds: float = 7 * 86400) -> "PreparedDelivery | None":
        """Make the HTLC ecash for a job paid on delivery while it runs: a DVM announces the
        terms its offer will have (hash, this job's key, locktime, amount) in the `processing`
        feedback that accepts the job (a NUT-18 request as its content), so the swap at the mint
        need not wait for the offer. The ecash is kept here, not sent: `pay_on_delivery` sends it
        once the offer (the sealed result's hashes) has come and asks for exactly these terms.
        `keep` as for `pay_on_delivery` (before the swap, then with the token). Returns None for
        feedback that announces no terms; raises PaymentDeclined for terms that fail the checks
        `check_delivery` makes."""
        if feedback.status != "processing" or not feedback.content.startswith("creqA"):
            return None
        provider = self._signer(request, feedback, "announcement of the terms")
        terms, creq = await self._htlc_request(
            request, provider, feedback.content, feedback, refund_key=wallet.p2pk_pubkey, max_price=max_price,
            mints=list(wallet.accepted_mints), min_lock_seconds=min_lock_seconds,
            max_lock_seconds=max_lock_seconds, what="announced terms")
        token = await _make_htlc(wallet, creq["a"], creq["m"][0], terms,
                                 {"job_id": request["id"], "prepared": True}, keep)
        return PreparedDelivery(terms, creq["a"], creq["m"][0], token)

    async def pay_on_delivery(self, request: dict, feedback: Feedback, wallet, *,
                              max_price: int | None = None, keep: Callable[[dict], None] | None = None,
                              min_lock_seconds: float = 120,
                              prepared: "PreparedDelivery | None" = None) -> "Delivery":
        """Answer a pay-on-delivery offer, once `check_delivery` passed: HTLC-locked ecash of
        exactly the amount asked (`wallet.send_htlc`), sent as a nutzap to the DVM the request
        named. `keep(state)` is called to store the payment's state, a JSON-able dict, as it
        grows: before the swap that makes the ecash (`{"job_id", "swap"}`: what
        `wallet.recover_htlc_send` needs if the swap's answer is lost), then with the `token`
        before the nutzap goes out (what reads the key from the mint and takes the ecash back:
        `dvm job reclaim`). With `prepared` (`prepare_delivery`) whose terms, amount and mint
        are the offer's, that ecash is sent and no swap is made; with other terms it stays
        ours, listed in the state as ``unused_tokens`` (`dvm job reclaim` takes it back after
        its locktime), and a new one is made. Raises PaymentDeclined."""
        offer, terms, creq = await self.check_delivery(
            request, feedback, refund_key=wallet.p2pk_pubkey, max_price=max_price,
            mints=list(wallet.accepted_mints), min_lock_seconds=min_lock_seconds)
        provider = self._schemes.get(request["id"], (None, None))[1] or feedback.event["pubkey"]
        state: dict = {"job_id": request["id"]}
        if prepared is not None and (prepared.terms, prepared.amount) == (terms, creq["a"]) \
                and prepared.mint in creq["m"]:
            token, mint = prepared.token, prepared.mint
            state["token"] = token
            (keep or (lambda _state: None))(dict(state))
        else:
            if prepared is not None:
                state["unused_tokens"] = [prepared.token]
            mint = creq["m"][0]
            token = await _make_htlc(wallet, creq["a"], mint, terms, state, keep)
        await self.send_delivery_payment(request, provider, token)
        return Delivery(request, provider, offer, token, terms)

    async def send_delivery_payment(self, request: dict, provider: str, token: str) -> dict:
        """The nutzap that carries HTLC ecash made for a job paid on delivery, published (again:
        the same proofs pay once, so a payment whose nutzap may not have gone out is sent again
        safely). Raises RuntimeError when no relay takes it."""
        info = decode_token(token)
        kind, content, tags = build_nutzap(info.mint, list(info.proofs), provider, unit=info.unit,
                                           zapped_event=request["id"], zapped_kind=request["kind"],
                                           comment="payment on delivery")
        event = sign_event(self.keys, kind, content, tags)
        results = await self.pool.publish(event)
        if not any(r.ok for r in results):
            raise RuntimeError("no relay accepted the nutzap (the ecash is kept: send it again, or "
                               "take it back after the locktime)")
        return event

    async def await_delivery(self, delivery: "Delivery", wallet, *, timeout: float = 600.0,
                             poll_seconds: float = 2.0) -> Result:
        """The result of a job paid on delivery: the key comes from the DVM's result event or,
        if the DVM says nothing more, from the mint (NUT-07 shows the preimage the DVM redeemed
        with); the result opened is the sealed one of the offer that was paid for. Raises
        TimeoutError when neither comes within `timeout` (`reclaim` after the locktime)."""
        from dvm_core.payments.wallet_types import PaymentError
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        queue = self._queues.get(delivery.request["id"])

        async def from_mint() -> bytes | None:
            try:
                return await wallet.htlc_preimage(delivery.token)
            except PaymentError as exc:
                if not exc.retryable:
                    raise
                return None   # the mint is down: the result event may still bring the key

        # The result event brings K first as a rule: the mint is asked only after `poll_seconds`
        # without it (then every `poll_seconds`), and once more before giving up. Asking it at
        # once cost a checkstate's round trip on every delivery (the result event came while
        # the answer was awaited).
        last_asked = loop.time() if queue is not None else -math.inf
        preimage = None
        while preimage is None:
            if loop.time() - last_asked >= poll_seconds:
                last_asked = loop.time()
                preimage = await from_mint()
                if preimage is not None:
                    break
            remaining = deadline - loop.time()
            if remaining <= 0:
                preimage = await from_mint()
                if preimage is not None:
                    break
                raise TimeoutError(f"the DVM has not redeemed the payment of job "
                                   f"{delivery.request['id'][:12]} within {timeout:g} s")
            wait = max(0.01, min(poll_seconds - (loop.time() - last_asked), remaining))
            if queue is None:
                await asyncio.sleep(wait)
                continue
            try:
                async with asyncio.timeout(wait):
                    event = await queue.get()
            except TimeoutError:
                continue
            if event["kind"] != FEEDBACK_KIND:
                result = parse_result(event, self._decrypter(delivery.request["id"], event))
                preimage = _preimage_in(result, delivery.offer.hash)
        return open_delivery(delivery, preimage, self.keys)

    async def publish_wallet_info(self, wallet) -> dict:
        """Kind 10019 (NIP-61) for this customer: change and refunds come locked to `wallet`'s
        P2PK key, on its mints, so that `collect_nutzaps` can redeem them."""
        kind, content, tags = build_nutzap_info([r.url for r in self.pool.relays], list(wallet.accepted_mints),
                                                [wallet.unit], wallet.p2pk_pubkey)
        event = sign_event(self.keys, kind, content, tags)
        await self.pool.publish(event)
        return event

    async def collect_nutzaps(self, wallet, *, expect: int = 0, timeout: float = 10.0) -> int:
        """Redeem the nutzaps sent to this customer (change, refunds) into `wallet`, waiting up to
        `timeout` seconds for at least `expect` sat. Returns the amount collected."""
        from dvm_core.payments.wallet_types import PaymentError
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        total = 0
        while True:
            for zap in await self.nutzaps_received(timeout=2):
                if zap.event_id in self._collected or zap.mint not in wallet.accepted_mints:
                    continue
                try:
                    # Locked to the wallet's key (our kind 10019), or to "02" + our Nostr key
                    # where the DVM did not see that event.
                    total += (await wallet.receive(zap.token(), min_amount=1, require_lock=True,
                                                   also_key=self.keys.private_key)).amount
                except PaymentError as exc:
                    if exc.retryable:
                        continue          # the mint is down: try again next time
                self._collected.add(zap.event_id)   # redeemed, spent already, or not ours
            if total >= expect or loop.time() >= deadline:
                return total
            await asyncio.sleep(0.5)

    async def nutzaps_received(self, timeout: float = 5.0) -> list:
        """Nutzaps sent to this customer (change and refunds), parsed."""
        events = await self.pool.query([{"kinds": [NUTZAP_KIND], "#p": [self.keys.public_key]}], timeout)
        return [parse_nutzap(e) for e in events]

    async def cancel(self, request: dict, reason: str = "") -> None:
        event = sign_event(self.keys, DELETION_KIND, reason,
                           [["e", request["id"]], ["k", str(request["kind"])]])
        await self.pool.publish(event)


def _usable_mints(creq: dict, info: WalletInfo, mints: list[str] | None) -> list[str]:
    """The mints of a NUT-18 request that the DVM announces and (`mints`) our wallet holds."""
    offered = [normalize_mint_url_or_keep(m) for m in creq.get("m") or []]
    usable = [m for m in offered if (not info.mints or m in info.mints) and (mints is None or m in mints)]
    if not usable:
        raise PaymentDeclined(f"none of the mints the DVM asks for ({', '.join(offered) or 'none'}) "
                              "is one it announces and your wallet holds")
    return usable


def state_keeper(path: Path, moved: Callable[[Path], None] | None = None) -> Callable[[dict], None]:
    """A `keep` for `pay_on_delivery` and `prepare_delivery`: each state is written to `path`
    (0600, fsynced, replaced atomically). A file already there that holds money the new state
    does not (a swap record or a token of an earlier try: a rerun with the same --out, a lost
    answer before the offer) is never written over: it is moved beside, to the first free
    `<stem>-N<suffix>`, and `moved(new_path)` is told; `dvm job reclaim` takes either file."""
    import os

    def swap(state: dict) -> str | None:
        return json.dumps(state["swap"], sort_keys=True) if state.get("swap") else None

    def money(state: dict) -> set[str]:
        # A swap's record matters until its token is kept (its change is in the wallet then).
        return {t for t in [state.get("token") or swap(state), *(state.get("unused_tokens") or [])] if t}

    def holds(state: dict) -> set[str]:
        return money(state) | {t for t in [swap(state)] if t}

    def keep(state: dict) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if path.exists():
            try:
                earlier = json.loads(path.read_text())
                kept = money(earlier) <= holds(state) if isinstance(earlier, dict) else False
            except (OSError, ValueError):
                kept = False   # unreadable: not ours to judge, keep it too
            if not kept:
                n = 1
                while (aside := path.with_name(f"{path.stem}-{n}{path.suffix}")).exists():
                    n += 1
                os.replace(path, aside)
                if moved is not None:
                    moved(aside)
        write_private_json(path, state)
    return keep


def write_private_json(path: Path, value) -> None:
    """Write `value` as JSON to `path`, readable by us only (0600), fsynced and replaced
    atomically: a kill leaves the old file or the new one, never half of one."""
    import os
    part = path.with_name(path.name + ".part")
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(value, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, path)


async def _make_htlc(wallet, amount: int, mint: str, terms: HtlcTerms, state: dict,
                     keep: Callable[[dict], None] | None) -> str:
    """HTLC ecash for `terms` (`wallet.send_htlc`), `state` kept before the swap (with its
    outputs, for `recover_htlc_send`) and again with the token: what `dvm job reclaim` reads."""
    keep = keep or (lambda _state: None)

    def before_swap(record: dict) -> None:
        state["swap"] = record
        keep(dict(state))
    token = await wallet.send_htlc(amount, mint, terms, before_swap=before_swap)
    state["token"] = token
    keep(dict(state))
    return token


@dataclass(frozen=True)
class PreparedDelivery:
    """HTLC ecash made for a job paid on delivery before its offer came (`prepare_delivery`):
    kept by the customer until the offer asks for exactly these terms."""

    terms: HtlcTerms
    amount: int
    mint: str
    token: str


@dataclass(frozen=True)
class Delivery:
    """A job paid on delivery, after paying: what was offered and the HTLC token sent for it."""

    request: dict
    provider: str
    offer: DeliveryOffer
    token: str
    terms: HtlcTerms


def _preimage_in(result: Result, hash_: str) -> bytes | None:
    """K from a result's ``pay_on_delivery.preimage``, if it is the preimage of `hash_`."""
    try:
        value = bytes.fromhex(json.loads(result.content)["pay_on_delivery"]["preimage"])
        return value if htlc_hash(value) == hash_ else None
    except (ValueError, KeyError, TypeError):
        return None


def open_delivery(delivery: Delivery, preimage: bytes, keys: Keys) -> Result:
    """The result a pay-on-delivery offer sealed, opened with its preimage K: a `Result` whose
    files `download_artifacts` fetches, checks and decrypts. ValueError if K is not the
    preimage of the offer's hash or the sealed result does not open."""
    from dvm_core.transport.blobcrypt import BlobDecryptError, decrypt_bytes
    if htlc_hash(preimage) != delivery.offer.hash:
        raise ValueError("that is not the preimage of the offer's hash")
    conversation = (get_conversation_key(keys.private_key, delivery.provider)
                    if is_encrypted(delivery.request) else None)
    key = seal_key(preimage, conversation).hex()
    try:
        payload = decrypt_bytes(decode_sealed(delivery.offer.sealed_result), key).decode()
    except (BlobDecryptError, ValueError) as exc:
        raise ValueError(f"the offer's sealed result does not open with the key: {exc}") from None
    return Result(delivery.request["id"], delivery.provider, payload, delivery.offer.amount * 1000,
                  is_encrypted(delivery.request))


def result_json(result: Result) -> dict:
    return json.loads(result.content)


async def upload_dataset(path: Path, servers: list[str], keys: Keys, *, encrypt: bool = True) -> str:
    """Put a file on Blossom servers for a job; returns the data URL to send as a `url` input.

    With `encrypt` (the default) the file is encrypted with a fresh key first and the key rides
    in the URL's fragment, so send that URL only inside an encrypted request."""
    from dvm_core.transport.blobcrypt import encrypt_file
    from dvm_core.transport.blossom import BlossomClient
    from dvm_core.datarefs import DataRef
    client = BlossomClient(servers, keys)
    key = None
    if encrypt:
        sealed = Path(tempfile.mkdtemp(prefix="dvm-upload-")) / (path.name + ".sealed")
        key = await asyncio.to_thread(encrypt_file, path, sealed)
        path = sealed
    try:
        blob = await client.upload(path, "application/octet-stream")
    finally:
        if encrypt:
            shutil.rmtree(path.parent, ignore_errors=True)
    return DataRef(blob.url, blob.sha256, key).to_url()


MAX_ARTIFACTS = 64


async def download_artifacts(result: Result, dest: Path, *, allow_private: bool = False,
                             max_bytes: int = 10 * 1024**3, max_total_bytes: int = 20 * 1024**3) -> list[Path]:
    """Fetch every file listed in a result, check its sha256, decrypt it, save it in `dest`:
    at most `max_bytes` a file and `max_total_bytes` in all (a provider cannot fill the
    customer's disk by listing many large files)."""
    from dvm_core.transport.blobcrypt import decrypt_file
    from dvm_core.transport.fetch import fetch
    dest.mkdir(parents=True, exist_ok=True)
    saved, total = [], 0
    entries = result_json(result).get("artifacts", [])
    if not isinstance(entries, list) or len(entries) > MAX_ARTIFACTS:
        raise ValueError(f"the result lists more than {MAX_ARTIFACTS} files (or no list): not downloaded")
    for entry in entries:
        name = Path(str(entry.get("name") or "")).name  # never a path from the provider
        if name in ("", ".", "..") or name.startswith("."):
            raise ValueError(f"the result names a file {str(entry.get('name'))[:60]!r}: not a file name")
        left = max_total_bytes - total
        if left <= 0:
            raise ValueError(f"the result's files pass {max_total_bytes} bytes in all: {name} not downloaded")
        with tempfile.TemporaryDirectory(prefix="dvm-download-") as tmp:
            path = await fetch(entry["url"], entry["sha256"], Path(tmp), cache_dir=None,
                               max_bytes=min(max_bytes, left), allow_private=allow_private)
            total += path.stat().st_size
            target = dest / name
            if entry.get("key"):
                await asyncio.to_thread(decrypt_file, path, target, entry["key"])
            else:
                shutil.move(str(path), target)
        saved.append(target)
    return saved
