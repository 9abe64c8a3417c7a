"""Federated rounds, the customer's side (FEDSTR, arXiv 2404.15834): `dvm federate`.

One call of `federate` runs R rounds of federated averaging over DVMs:

1. once: split the training set (an image-classifier ``.npz``) into one shard per provider,
   IID or non-IID by label (`split_indices`), and upload each shard to the blob servers,
   encrypted with its own key;
2. each round: upload the current global weights; send each provider a private
   image-classifier job (kind 5750) on its shard, starting from those weights, with the whole
   dataset's normalisation so every provider prepares images alike; pay each one's
   ``payment-required`` with a nutzap (up to ``max_price``); collect the updates;
3. score every update (`scoring.py`: the held-out loss with and without it, Gauntlet-style,
   and its loss on its own shard) and leave out the lazy ones, the copies and those that raise
   the held-out loss (``score``, on by default); merge the rest, weighted by shard size, with
   the chosen method (``fedavg``, ``median``, ``trimmed_mean``, ``krum``, ``multi_krum``):
   locally (`dvm_fedavg.merge.merge_files`) or as a merge job (kind 5752) sent to a DVM;
4. evaluate the global model on the customer's held-out set, and report.

A provider that fails, refuses, asks too much or times out is dropped from that round (its job
cancelled) without stopping it; a round with no update left keeps the previous model. The
first round starts every provider from the same weights, built and seeded here. The accuracy
per round is printed and plotted (``accuracy.png``), and ``rounds.json`` holds every round's
figures and merge report.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from dvm_core.customer import (Customer, PaymentDeclined, ProgressMeter, download_artifacts, state_keeper,
                               upload_dataset)
from dvm_core.datarefs import sha256_file
from dvm_core.protocol.nip90 import JobInput, Result

IMAGE_CLASSIFIER_KIND = 5750
MERGE_KIND = 5752
SPLITS = ("iid", "label")


@dataclass
class FederationSettings:
    """How the rounds run. `merge_provider`: a DVM's public key to merge through (a kind-5752
    job), else the merge runs here."""

    rounds: int = 3
    epochs: int = 2
    batch_size: int = 32
    learning_rate: float | None = None
    split: str = "iid"
    method: str = "fedavg"
    trim_ratio: float = 0.2
    krum_f: int = 1
    clip_norm: float | None = None
    seed: int = 0
    job_timeout: float = 300.0
    max_price: int = 1000  # sats per job; a provider asking more is dropped
    pay_on_delivery: bool = False  # pay each provider only once its update is ready (NUT-14 HTLC)
    kind: int = IMAGE_CLASSIFIER_KIND
    merge_kind: int = MERGE_KIND
    merge_provider: str | None = None
    allow_private_urls: bool = False  # download results from loopback/private blob servers
    compare: tuple[str, ...] = ()  # other methods merged from the same updates and evaluated each round
    score: bool = True  # score every update before the merge and leave out those that add nothing or harm
    score_tolerance: float = 0.2  # left out when it raises the held-out loss by more than this share
    bonus: int = 0  # sats per round shared among the merged updates by their (positive) gains
    attacks: dict[int, str] = field(default_factory=dict)  # simulation only: provider index → ATTACKS mode
    publish_verdicts: bool = False  # publish a NIP-32 verdict (kind 1985) on each update left out
    trusted: tuple[str, ...] = ()  # keys whose verdicts count: a provider with a negative one is skipped
    baseline: bool = False  # also train one model on all the data here, for the accuracy chart


ATTACKS = ("lazy", "sign-flip", "noise", "scaled", "copy")


def simulate_attack(update: Path, base: Path, mode: str, out: Path, other: Path | None = None) -> Path:
    """Write to `out` what a cheating provider would have sent instead of `update` (`dvm
    federate --local --attack`, to see what the scores and the robust methods do): `lazy` the
    weights it was given, `sign-flip` base − 4·Δ, `noise` base + noise of 10× Δ's spread,
    `scaled` base + 10·Δ, `copy` another provider's update (`other`). BatchNorm's running
    statistics stay as trained (a reversed variance would be negative), except for `lazy`,
    which sends the base back whole. The file's metadata is kept."""
    import torch
    from safetensors.torch import load_file, safe_open, save_file

    with safe_open(str(update), "pt") as f:
        metadata = f.metadata()
    w, b = load_file(str(update)), load_file(str(base))
    if mode == "copy":
        if other is None:
            raise ValueError("copy needs another provider's update")
        w = load_file(str(other))
    elif mode == "lazy":
        w = {k: v.clone() for k, v in b.items()}
    else:
        generator = torch.Generator().manual_seed(3)
        for key, value in w.items():
            if not value.is_floating_point() or "running_" in key:
                continue
            delta = value - b[key]
            if mode == "sign-flip":
                w[key] = b[key] - 4 * delta
            elif mode == "noise":
                w[key] = b[key] + torch.randn(value.shape, generator=generator) * float(delta.std()) * 10
            elif mode == "scaled":
                w[key] = b[key] + 10 * delta
            else:
                raise ValueError(f"unknown attack {mode!r}: use one of {', '.join(ATTACKS)}")
    save_file({k: v.contiguous() for k, v in w.items()}, str(out), metadata=metadata)
    return out


@dataclass
class RoundReport:
    round: int
    accuracy: float
    providers: list[str]  # whose updates went into the merge
    dropped: dict[str, str]  # provider → why
    paid: dict[str, int]  # provider → sats (paid ones dropped later included)
    seconds: float
    merge: dict = field(default_factory=dict)
    compared: dict[str, float] = field(default_factory=dict)  # method → held-out accuracy
    payments: dict[str, str] = field(default_factory=dict)  # provider → what it asked and why paid (or not)
    scores: dict[str, dict] = field(default_factory=dict)  # provider → its UpdateScore (scoring.py)
    bonus: dict[str, int] = field(default_factory=dict)  # provider → sats of bonus sent for this round


class ProviderFailed(Exception):
    pass


def _journal_writer(path: Path | None, request: dict, provider: str, what=None) -> Callable[..., None]:
    """A function that records a job's payment state in `path` (atomically): the request, the
    provider, `state` (submitted, paying, paid, declined), the sats asked, and `what` the job
    works on (a merge: its inputs' sha256), for a resumed run to tell whether it is the job it
    needs again."""
    def note(state: str, amount: int = 0) -> None:
        if path is None:
            return
        part = path.with_name(path.name + ".part")
        part.write_text(json.dumps({"request": request, "provider": provider, "state": state, "amount": amount,
                                    "what": what}))
        part.replace(path)
    return note


def split_indices(labels: np.ndarray, parts: int, how: str = "iid", seed: int = 0) -> list[np.ndarray]:
    """Indices of each of `parts` shards. ``iid``: a random permutation cut in equal parts.
    ``label``: non-IID, the classic pathological split (McMahan et al.): sorted by label, cut
    in 2 × parts runs, two runs per shard, so each shard sees only a few classes."""
    if parts < 1:
        raise ValueError("split into at least one part")
    rng = np.random.default_rng(seed)
    if how == "iid":
        return [np.sort(p) for p in np.array_split(rng.permutation(len(labels)), parts)]
    if how != "label":
        raise ValueError(f"unknown split {how!r}: use one of {', '.join(SPLITS)}")
    order = np.argsort(labels, kind="stable")
    runs = np.array_split(order, 2 * parts)
    pick = rng.permutation(2 * parts)
    return [np.sort(np.concatenate([runs[pick[2 * i]], runs[pick[2 * i + 1]]])) for i in range(parts)]


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(x, y as indices into the names, class names) of an image-classifier .npz: `y` indexes
    its ``classes`` when it has them, else the labels' own values (as text) are the names."""
    from dvm_core.archives import NUMPY_HEADER_LOCK

    with NUMPY_HEADER_LOCK, np.load(path, allow_pickle=False) as data:
        x, y = data["x"], data["y"].astype(np.int64)
        names = [str(c) for c in data["classes"]] if "classes" in data.files else None
    if names is None:
        values = np.unique(y)
        names = [str(int(v)) for v in values]
        y = np.searchsorted(values, y).astype(np.int64)
    return x, y, names


class Federation:
    """The state of one federated training: the data, the global model, the rounds so far."""

    def __init__(self, customer: Customer, wallet, providers: Sequence[str], train: Path, test: Path,
                 servers: Sequence[str], workdir: Path, settings: FederationSettings | None = None,
                 say: Callable[[str], None] = print):
        if not providers:
            raise ValueError("name at least one provider")
        self.customer, self.wallet = customer, wallet
        self.providers = list(providers)
        self.servers = list(servers)
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.settings = settings or FederationSettings()
        self.say = say
        if self.settings.split not in SPLITS:
            raise ValueError(f"unknown split {self.settings.split!r}: use one of {', '.join(SPLITS)}")
        from dvm_fedavg.checks import check_method
        s = self.settings
        for method in (s.method, *s.compare):  # before any money is spent
            check_method(method, len(self.providers), s.trim_ratio, s.krum_f, None)
        self._load_data(Path(train), Path(test))
        self.shards: list = []
        self.shard_urls: list[str] = []
        self.reports: list[RoundReport] = []
        self._paid: dict[str, int] = {}        # this round: provider → sats paid
        self._payments: dict[str, str] = {}    # this round: provider → what it asked, why paid or not
        self._resumed = False   # a run that goes on from an earlier one's state (`llm.LlmFederation`)
        self.global_weights: Path | None = None
        self.card: Path | None = None

    # --- set-up ------------------------------------------------------------------------------

    def _load_data(self, train: Path, test: Path) -> None:
        """Read the training and held-out sets (image-classifier .npz; `llm.LlmFederation`
        reads JSONL instead)."""
        self.x, self.y, self.classes = _read_npz(train)
        self.x_test, y_test, test_classes = _read_npz(test)
        self.test_labels = [test_classes[int(i)] for i in y_test]  # class names
        if self.x.ndim == 3:
            self.x = self.x[..., None]

    def _normalisation(self) -> tuple[list[float], list[float]]:
        pixels = self.x.astype(np.float64) / 255.0
        axes = (0, 1, 2)
        return pixels.mean(axis=axes).tolist(), pixels.std(axis=axes).tolist()

    def _initial_model(self) -> None:
        """The first global weights (seeded), and the card the global model is read with."""
        import torch

        from dvm_image_classifier import outputs
        from dvm_image_classifier.models import build_model, make_spec

        _, height, width, channels = self.x.shape
        self.spec = make_spec("auto", channels, len(self.classes), height, width)
        torch.manual_seed(self.settings.seed)
        model = build_model(self.spec)
        self.global_weights = self.workdir / "global-0.safetensors"
        outputs.save_weights(model.state_dict(), self.global_weights, self.spec)
        self.mean, self.std = self._normalisation()
        self.card = self.workdir / "global_card.json"
        outputs.write_card(self.card, {
            "format": outputs.CARD_FORMAT, "task": "image-classification", "architecture": self.spec,
            "classes": self.classes,
            "input": {"height": height, "width": width, "channels": channels, "layout": "NCHW",
                      "mean": self.mean, "std": self.std},
            "federated": {"method": self.settings.method, "providers": self.providers}})

    async def prepare(self) -> None:
        """Split the data and upload the shards (once)."""
        s = self.settings
        self._initial_model()
        self.shards = split_indices(self.y, len(self.providers), s.split, s.seed)
        for i, idx in enumerate(self.shards):
            path = self.workdir / f"shard-{i}.npz"
            np.savez(path, x=self.x[idx], y=self.y[idx], classes=np.array(self.classes))
            self.shard_urls.append(await upload_dataset(path, self.servers, self.customer.keys, encrypt=True))
            counts = np.bincount(self.y[idx], minlength=len(self.classes))
            self.say(f"shard {i} → {self.providers[i][:12]}…: {len(idx)} images, "
                     f"{int((counts > 0).sum())} classes")

    # --- one round -----------------------------------------------------------------------------

    def _params(self, provider_index: int, shard: np.ndarray, round_: int) -> dict[str, str]:
        s = self.settings
        params = {"epochs": str(s.epochs), "batch_size": str(s.batch_size), "samples": str(len(shard)),
                  "validation_fraction": "0", "architecture": self.spec["type"],
                  "seed": str(s.seed * 1000 + round_ * 100 + provider_index),
                  "normalisation": ",".join(f"{m:.6f}" for m in self.mean) + ";"
                                   + ",".join(f"{v:.6f}" for v in self.std)}
        if s.learning_rate is not None:
            params["learning_rate"] = str(s.learning_rate)
        return params

    def _paid_before(self, provider: str, journal: Path, what=None) -> bool:
        """On a resumed run: whether `journal` holds a job for `provider` (on `what`) that was
        paid, or being paid, before the stop: its result is then taken (`_recover_job`), never
        asked or paid for again."""
        if not (self._resumed and journal.exists()):
            return False
        try:
            entry = json.loads(journal.read_text())
        except (OSError, ValueError):
            return False
        return (isinstance(entry, dict) and entry.get("provider") == provider
                and entry.get("state") in ("paying", "paid") and entry.get("what") == what)

    async def _job(self, provider: str, kind: int, inputs: list[JobInput], params: dict[str, str],
                   dest: Path, label: str = "", journal: Path | None = None, what=None) -> tuple[dict[str, Path], int]:
        """One paid job on one provider: its downloaded files and what it cost. Its progress
        (the provider's ``processing`` feedback) is said as it comes, after `label`, with a rate
        and an ETA, and a full bar once its result is in. With a `journal` file, the request and
        how far its payment went (submitted, paying, paid) are written there before each step,
        so a restarted run can take the result of a job it paid for (`_recover_job`) instead of
        paying again."""
        s = self.settings
        if s.pay_on_delivery:
            params = dict(params, pay_on_delivery=self.wallet.p2pk_pubkey)   # the HTLCs' refund key
        request = await self.customer.submit(kind, inputs, params, provider=provider)
        note = _journal_writer(journal, request, provider, what)
        note("submitted")
        paid = 0
        started = time.monotonic()
        meter = ProgressMeter()
        label = label or f"provider {provider[:12]}…"
        preparing: asyncio.Task | None = None   # pay on delivery: the ecash made while the job runs
        try:
            async for update in self.customer.updates(request, timeout=s.job_timeout):
                if isinstance(update, Result):
                    self.say(f"{label} {meter.done('result received')}")
                    files = await download_artifacts(update, dest, allow_private=s.allow_private_urls)
                    return {p.name: p for p in files}, paid
                if update.status == "error":
                    raise ProviderFailed(update.message or "error")
                if update.status == "processing" and update.progress is not None:
                    self.say(f"{label} {meter.line(update.progress, update.message)}")
                if s.pay_on_delivery and preparing is None and update.status == "processing" \
                        and update.content.startswith("creqA"):
                    preparing = asyncio.ensure_future(self._prepare_delivery(provider, request, update))
                if update.status == "payment-required" and s.pay_on_delivery:
                    prepared = await preparing if preparing is not None else None
                    asked = (update.amount_msats or 0) // 1000
                    note("paying", asked)   # a restart from here opens this job's result, never pays again
                    try:
                        result = await self._pay_on_delivery(provider, request, update,
                                                             s.job_timeout - (time.monotonic() - started), prepared)
                    except ProviderFailed:
                        if provider not in self._paid:   # declined: nothing was sent
                            note("declined")
                        raise
                    note("paid", self._paid[provider])
                    self.say(f"{label} {meter.done('result received')}")
                    files = await download_artifacts(result, dest, allow_private=s.allow_private_urls)
                    return {p.name: p for p in files}, self._paid[provider]
                if update.status == "payment-required":
                    asked = (update.amount_msats or 0) // 1000
                    if paid:
                        raise ProviderFailed("asked to be paid twice")
                    note("paying", asked)
                    try:   # checked by the client: signer, amount, cap, mint, lock
                        # Kept as it goes: a payment cut short is sent on with `dvm job reclaim`.
                        await self.customer.pay_with_nutzap(
                            request, update, self.wallet, max_price=s.max_price,
                            keep=state_keeper(dest.parent / f"{dest.name}.payment.json"))
                    except PaymentDeclined as exc:
                        note("declined")
                        self._payments[provider] = f"not paid: {exc}"
                        raise ProviderFailed(f"not paid: {exc}") from None
                    note("paid", asked)
                    paid = asked
                    self._paid[provider] = asked
                    self._payments[provider] = (f"paid {asked} sat (its quote, within max_price "
                                                f"{s.max_price}): {update.message[:160]}")
        except TimeoutError:
            await self.customer.cancel(request, "timed out")
            raise ProviderFailed(f"no result within {s.job_timeout:g}s") from None
        finally:
            if preparing is not None and not preparing.done():
                await asyncio.shield(preparing)   # its state is written before it returns: let it end
        raise ProviderFailed("no result")

    async def _open_paid_offer(self, provider: str, request: dict, feedback: list, answered: bool) -> Result:
        """A job paid on delivery before a restart: its offer (the last `payment-required`
        found), the HTLC token kept in delivery-tokens/, and the key K from the DVM's result or
        from the mint (`Customer.await_delivery`)."""
        from dvm_core.customer.client import Delivery
        offers = [f for f in feedback if f.status == "payment-required"]
        path = self.workdir / "delivery-tokens" / f"{request['id']}.json"
        state = json.loads(path.read_text()) if path.exists() else {}
        if not offers or not state.get("token"):
            raise ProviderFailed("its payment on delivery before the restart is not complete on record "
                                 f"({path}): take the ecash back with `dvm job reclaim`")
        offer, terms, _ = await self.customer.check_delivery(
            request, offers[-1], refund_key=self.wallet.p2pk_pubkey, mints=list(self.wallet.accepted_mints),
            min_lock_seconds=0)
        delivery = Delivery(request, provider, offer, state["token"], terms)
        if not answered:
            # Its nutzap may never have gone out (killed first, or no relay took it): sent again,
            # which pays nothing twice (the same proofs).
            await self.customer.send_delivery_payment(request, provider, state["token"])
        return await self.customer.await_delivery(delivery, self.wallet, timeout=self.settings.job_timeout)

    async def _recover_job(self, provider: str, journal: Path, dest: Path) -> tuple[dict[str, Path], int]:
        """The result of a job paid (or being paid) before a restart, from its `journal`: found
        on the relays (`Customer.recover`), or awaited until the job timeout; not paid again."""
        s = self.settings
        entry = json.loads(journal.read_text())
        amount = int(entry.get("amount") or 0)
        job_id = entry["request"]["id"]
        try:
            request, feedback, result = await self.customer.recover(job_id)
            if s.pay_on_delivery:   # the result is the sealed one the offer paid for, opened with K
                result = await self._open_paid_offer(provider, request, feedback, result is not None)
            if result is None:
                async for update in self.customer.updates(request, timeout=s.job_timeout):
                    if isinstance(update, Result):
                        result = update
                        break
                    if update.status == "error":
                        raise ProviderFailed(update.message or "error")
            if result is None:
                raise ProviderFailed("no result")
        except LookupError:
            raise ProviderFailed(f"its job {job_id[:12]}… paid before the restart is not on the relays") from None
        except TimeoutError:
            raise ProviderFailed(f"no result within {s.job_timeout:g}s for its job paid before the restart") from None
        finally:
            self._paid[provider] = amount
            how = "paid" if entry.get("state") == "paid" else "was paying"
            self._payments[provider] = f"{how} {amount} sat before the restart (job {job_id[:12]}…), not paid again"
        files = await download_artifacts(result, dest, allow_private=s.allow_private_urls)
        self.say(f"provider {provider[:12]}… result of job {job_id[:12]}… (paid before the restart) recovered")
        return {p.name: p for p in files}, amount

    def _delivery_keeper(self, request: dict) -> Callable[[dict], None]:
        """Where a job's pay-on-delivery state goes: workdir/delivery-tokens/<job id>.json."""
        path = self.workdir / "delivery-tokens" / f"{request['id']}.json"
        # An earlier try's record with money of its own (a lost answer while the ecash was
        # made early) is moved beside, not written over.
        return state_keeper(path, lambda aside: self.say(
            f"an earlier payment record for job {request['id'][:12]}… kept in {aside}"))

    async def _prepare_delivery(self, provider: str, request: dict, accepted):
        """The HTLC ecash for the terms a provider announced when it accepted the job, made
        while it trains (`Customer.prepare_delivery`); None when they fail a check or the
        wallet cannot make it now (the ecash is then made when the offer comes)."""
        try:
            return await self.customer.prepare_delivery(request, accepted, self.wallet, max_price=self.settings.max_price,
                                                        keep=self._delivery_keeper(request))
        except Exception as exc:   # noqa: BLE001 - any failure here only loses the head start
            self.say(f"provider {provider[:12]}…: the ecash is made when the offer comes ({exc})")
            return None

    async def _pay_on_delivery(self, provider: str, request: dict, offer, timeout: float, prepared=None):
        """Pay a provider's offer of its sealed update (checked: signer, amount, cap, lock, mint)
        with HTLC ecash (`prepared` while it trained, if it is for these terms), kept under
        workdir/delivery-tokens/ before it is sent; returns the result the key opens. A provider
        that never redeems is dropped; the ecash comes back after the locktime (`dvm job reclaim`)."""
        s = self.settings
        tokens = self.workdir / "delivery-tokens"
        keep = self._delivery_keeper(request)
        try:
            delivery = await self.customer.pay_on_delivery(request, offer, self.wallet,
                                                           max_price=s.max_price, keep=keep, prepared=prepared)
        except PaymentDeclined as exc:
            self._payments[provider] = f"not paid: {exc}"
            raise ProviderFailed(f"not paid: {exc}") from None
        self._paid[provider] = delivery.offer.amount
        self._payments[provider] = (f"paid {delivery.offer.amount} sat on delivery (its offer, within "
                                    f"max_price {s.max_price})")
        try:
            return await self.customer.await_delivery(delivery, self.wallet, timeout=max(1.0, timeout))
        except TimeoutError:
            self._paid[provider] = 0
            self._payments[provider] += ("; it never redeemed: take the ecash back after the locktime "
                                         f"with `dvm job reclaim {tokens / (request['id'] + '.json')}`")
            raise ProviderFailed("paid on delivery but never redeemed") from None

    async def run_round(self, round_: int) -> RoundReport:
        from dvm_fedavg.merge import merge_files

        s = self.settings
        started = time.monotonic()
        weights_url = await upload_dataset(self.global_weights, self.servers, self.customer.keys, encrypt=True)
        rdir = self.workdir / f"round-{round_}"
        rdir.mkdir(parents=True, exist_ok=True)

        async def train(i: int, provider: str):
            inputs = [JobInput(self.shard_urls[i], "url"), JobInput(weights_url, "url", "", "weights")]
            return await self._job(provider, s.kind, inputs, self._params(i, self.shards[i], round_),
                                   rdir / f"provider-{i}", label=f"round {round_}: provider {i} ({provider[:12]}…)")

        self._paid, self._payments = {}, {}
        outcomes = await asyncio.gather(*(train(i, p) for i, p in enumerate(self.providers)),
                                        return_exceptions=True)
        updates, weights, names, dropped = [], [], [], {}
        paid, payments = dict(self._paid), dict(self._payments)   # dropped after paying counts too
        for provider, why in payments.items():
            self.say(f"round {round_}: provider {provider[:12]}… {why}")
        for i, (provider, outcome) in enumerate(zip(self.providers, outcomes)):
            if isinstance(outcome, BaseException):
                if not isinstance(outcome, Exception):   # cancelled, interrupted: stop the federation
                    raise outcome
                # Whatever went wrong with this provider (its error, a download, a bad file):
                # drop it from the round, go on with the others.
                dropped[provider] = str(outcome) if isinstance(outcome, ProviderFailed) \
                    else f"{type(outcome).__name__}: {outcome}"
                self.say(f"round {round_}: provider {provider[:12]}… dropped: {dropped[provider]}")
                continue
            files, _cost = outcome
            if "model.safetensors" not in files:
                dropped[provider] = "the result has no model.safetensors"
                continue
            update = files["model.safetensors"]
            if i in s.attacks:   # a simulation (--local --attack): this provider cheats
                update = await asyncio.to_thread(simulate_attack, update, self.global_weights, s.attacks[i],
                                                 update.with_name(f"{s.attacks[i]}.safetensors"),
                                                 updates[0] if updates else None)
                self.say(f"round {round_}: provider {i} ({provider[:12]}…) plays {s.attacks[i]} (simulated)")
            updates.append(update)
            weights.append(float(len(self.shards[i])))
            names.append(provider)
        merged = self.workdir / f"global-{round_}.safetensors"
        report: dict = {}
        compared = {}
        base = self.global_weights
        for method in s.compare if updates else ():   # every update that came back, unscored
            trial = rdir / f"merged-{method}.safetensors"
            try:
                await asyncio.to_thread(lambda: merge_files(
                    updates, weights, trial, method=method, base=base, trim_ratio=s.trim_ratio,
                    f=s.krum_f, clip_norm=s.clip_norm))
            except ValueError as exc:
                self.say(f"round {round_}: {method} could not merge: {exc}")
                continue
            compared[method] = await asyncio.to_thread(self.evaluate, trial)
        scores: dict[str, dict] = {}
        if updates and s.score:
            scored = await asyncio.to_thread(self.score, updates, weights, names)
            scores, (updates, weights, names) = self._keep_scored(round_, scored, "update", updates, weights, names)
        if updates:
            try:
                if s.merge_provider:
                    report = await self._merge_remote(updates, weights, merged, rdir)
                else:
                    report = await asyncio.to_thread(
                        lambda: merge_files(updates, weights, merged, method=s.method, base=self.global_weights,
                                            trim_ratio=s.trim_ratio, f=s.krum_f, clip_norm=s.clip_norm,
                                            names=[n[:12] for n in names], distances=True).to_dict())
                self.global_weights = merged
            except (ValueError, ProviderFailed) as exc:  # MergeError is a ValueError
                # E.g. the providers left are fewer than the method needs, or an update does not
                # fit: the round is lost, the federation goes on from the model it had.
                report = {"error": str(exc)}
                names = []
                self.say(f"round {round_}: the merge failed ({exc}); the global model stays as it was")
        elif not scores:
            self.say(f"round {round_}: no update came back; the global model stays as it was")
        bonus = await self._pay_bonus(round_, names, scores, payments) if s.bonus and names else {}
        if s.publish_verdicts and scores:
            await self._publish_verdicts(round_, scores)
        accuracy = await asyncio.to_thread(self.evaluate)
        result = RoundReport(round=round_, accuracy=accuracy, providers=names, dropped=dropped, paid=paid,
                             seconds=round(time.monotonic() - started, 3), merge=report, compared=compared,
                             payments=payments, scores=scores, bonus=bonus)
        self.reports.append(result)
        self.say(f"round {round_}: {len(names)}/{len(self.providers)} updates merged ({s.method}), "
                 f"held-out accuracy {accuracy:.4f}, paid {sum(paid.values())} sat, {result.seconds:.1f}s"
                 + "".join(f"; {m} would give {a:.4f}" for m, a in compared.items()))
        return result

    async def _pay_bonus(self, round_: int, merged: list[str], scores: dict[str, dict],
                         payments: dict[str, str]) -> dict[str, int]:
        """Share the round's bonus among the merged updates in proportion to their positive
        gains (the held-out loss lowered by each update alone, `scoring.py`; largest remainders
        get the odd sats), each share a nutzap outside any job (`Customer.send_bonus`). A
        provider whose share cannot be sent is told in `payments`."""
        s = self.settings
        positive = {p: scores[p]["gain"] for p in merged
                    if p in scores and (scores[p].get("gain") or 0) > 0 and scores[p]["gain"] != float("inf")}
        total = sum(positive.values())
        if not positive or total <= 0:
            self.say(f"round {round_}: no merged update lowered the held-out loss alone; no bonus")
            return {}
        exact = {p: s.bonus * v / total for p, v in positive.items()}
        shares = {p: int(v) for p, v in exact.items()}
        for p in sorted(exact, key=lambda p: exact[p] - shares[p], reverse=True)[:s.bonus - sum(shares.values())]:
            shares[p] += 1
        folder = self.workdir / f"round-{round_}" / "bonus"
        earlier = self._bonus_records(folder) if self._resumed else {}
        sent: dict[str, int] = {}
        for provider, (path, state) in list(earlier.items()):   # sent (or being sent) before a restart
            amount = int(state["amount"])
            try:
                if not state.get("published") and \
                        await self.customer.resend_payment(state, self.wallet, keep=state_keeper(path)) is None:
                    path.unlink()   # its swap never took place at the mint: nothing was sent
                    del earlier[provider]
                    continue
            except Exception as exc:   # noqa: BLE001 - its record stays for `dvm job reclaim`
                payments[provider] = payments.get(provider, "") + (
                    f"; bonus of {amount} sat begun before the restart, not sent: {exc} (its record: {path})")
                self.say(f"round {round_}: provider {provider[:12]}… bonus of {amount} sat begun before the "
                         f"restart not sent: {exc}; `dvm job reclaim` sends it from {path}")
                continue
            sent[provider] = amount
            payments[provider] = payments.get(provider, "") + f"; bonus {amount} sat (sent before the restart)"
            self.say(f"round {round_}: provider {provider[:12]}… bonus {amount} sat sent before the restart")
        left = s.bonus - sum(int(state["amount"]) for _, state in earlier.values())
        for provider, amount in shares.items():
            amount = min(amount, left)
            if amount <= 0 or provider in earlier:
                continue
            why = f"bonus for round {round_}: gain {positive[provider]:+.4f} of {total:.4f}"
            path = folder / f"{provider}.json"
            left -= amount   # from its first record on, a share counts as sent: never twice
            try:
                await self.customer.send_bonus(provider, amount, self.wallet, comment=why, keep=state_keeper(path))
            except Exception as exc:   # noqa: BLE001 - the round stands; the provider hears nothing
                if not path.exists():
                    left += amount   # no record: nothing was sent
                payments[provider] = payments.get(provider, "") + f"; bonus of {amount} sat not sent: {exc}"
                self.say(f"round {round_}: provider {provider[:12]}… bonus of {amount} sat not sent: {exc}"
                         + (f"; `dvm job reclaim` sends it from {path}" if path.exists() else ""))
                continue
            sent[provider] = amount
            payments[provider] = payments.get(provider, "") + f"; bonus {amount} sat ({why})"
            self.say(f"round {round_}: provider {provider[:12]}… bonus {amount} sat ({why})")
        return sent

    @staticmethod
    def _bonus_records(folder: Path) -> dict[str, tuple[Path, dict]]:
        """The bonuses of a round begun before a restart, by provider (`send_bonus`'s records:
        one is written before its ecash is made)."""
        found = {}
        for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            try:
                state = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(state, dict) and state.get("bonus") and state.get("provider") == path.stem:
                found[path.stem] = (path, state)
        return found

    async def _merge_remote(self, updates: list[Path], weights: list[float], out: Path, rdir: Path) -> dict:
        s = self.settings
        journal = rdir / "merge.job.json"
        what = {"updates": [sha256_file(p) for p in updates], "base": sha256_file(self.global_weights),
                "weights": list(weights), "method": s.method}
        if self._paid_before(s.merge_provider, journal, what):
            files, _ = await self._recover_job(s.merge_provider, journal, rdir / "merge")
            return self._merged(files, out)
        inputs = []
        for path in updates:
            url = await upload_dataset(path, self.servers, self.customer.keys, encrypt=True)
            inputs.append(JobInput(url, "url", "", "update"))
        base_url = await upload_dataset(self.global_weights, self.servers, self.customer.keys, encrypt=True)
        inputs.append(JobInput(base_url, "url", "", "base"))
        params = {"method": s.method, "weights": ",".join(f"{w:g}" for w in weights), "distances": "yes"}
        if s.method == "trimmed_mean":
            params["trim_ratio"] = str(s.trim_ratio)
        if s.method in ("krum", "multi_krum"):
            params["f"] = str(s.krum_f)
        if s.clip_norm is not None:
            params["clip_norm"] = str(s.clip_norm)
        files, _ = await self._job(s.merge_provider, s.merge_kind, inputs, params, rdir / "merge",
                                   label=f"merge DVM ({s.merge_provider[:12]}…)", journal=journal, what=what)
        return self._merged(files, out)

    @staticmethod
    def _merged(files: dict[str, Path], out: Path) -> dict:
        if "model.safetensors" not in files:
            raise ProviderFailed("the merge result has no model.safetensors")
        files["model.safetensors"].replace(out)
        report = files.get("merge_report.json")
        return json.loads(report.read_text()) if report else {}

    def _keep_scored(self, round_: int, scored: list, what: str, *columns: list) -> tuple[dict, list[list]]:
        """Say each score, and keep of `columns` (updates, weights, names…, in the scores' order)
        the entries merged: (provider → score, the columns kept)."""
        for u in scored:
            verdict = "merged" if u.merged else "LEFT OUT"
            self.say(f"round {round_}: provider {u.provider[:12]}… score {u.score:+.4f}, {verdict}: {u.reason}")
        kept = [[x for x, u in zip(column, scored) if u.merged] for column in columns]
        if not any(u.merged for u in scored):
            self.say(f"round {round_}: every {what} was left out; the global model stays as it was")
        return {u.provider: u.to_dict() for u in scored}, kept

    def score(self, updates: list[Path], weights: list[float], names: list[str]) -> list:
        """Score the round's updates against the global model (`scoring.score_updates`): on
        the held-out set, and each on the shard its provider trained on."""
        from dvm_image_classifier.models import build_model
        from dvm_image_classifier.predict import Preprocess, read_card

        from .scoring import LossOn, labelled, score_updates

        card = read_card(self.card)
        preprocess = Preprocess(card)
        build = lambda: build_model(card["architecture"])   # noqa: E731
        heldout = LossOn(build, *labelled(self.x_test, self.test_labels, preprocess))
        index = {name: self.providers.index(name) for name in names}
        shard_sets: dict[int, LossOn] = {}

        def shard_loss(i: int, state: dict) -> float:
            shard = self.shards[index[names[i]]]
            if i not in shard_sets:
                shard_sets[i] = LossOn(build, *labelled(self.x[shard], [self.classes[int(c)] for c in self.y[shard]],
                                                        preprocess))
            return shard_sets[i](state)

        return score_updates(self.global_weights, updates, names, weights, heldout, shard_loss,
                             tolerance=self.settings.score_tolerance)

    def evaluate(self, weights: Path | None = None) -> float:
        """The accuracy of the global model (or of `weights`) on the held-out set."""
        from dvm_image_classifier.predict import accuracy, load_model

        model, preprocess = load_model(weights or self.global_weights, self.card)
        return accuracy(model, preprocess, self.x_test, self.test_labels)

    # --- all rounds ----------------------------------------------------------------------------

    async def skip_flagged(self) -> dict[str, str]:
        """Leave out the providers with a negative verdict from a trusted key (before the data is
        split); returns provider → why."""
        s = self.settings
        skipped: dict[str, str] = {}
        trusted = [self.customer.keys.public_key if t == "self" else t for t in s.trusted]
        for verdict in await self.customer.verdicts(self.providers, trusted):
            if verdict.negative and verdict.provider not in skipped:
                skipped[verdict.provider] = (f"{verdict.label} by {verdict.author[:12]}…: {verdict.reason[:200]}")
        for provider, why in skipped.items():
            self.say(f"skipping provider {provider[:12]}…: {why}")
        self.providers = [p for p in self.providers if p not in skipped]
        if not self.providers:
            raise ValueError("every provider has a verdict against it from a key you trust")
        from dvm_fedavg.checks import check_method
        for method in (s.method, *s.compare):
            check_method(method, len(self.providers), s.trim_ratio, s.krum_f, None)
        return skipped

    async def _publish_verdicts(self, round_: int, scores: dict[str, dict]) -> None:
        for provider, score in scores.items():
            if score["merged"]:
                continue
            try:
                await self.customer.publish_verdict(
                    provider, "update-left-out", f"round {round_} of a federated training: {score['reason']}",
                    kind=self.settings.kind)
            except (RuntimeError, ValueError) as exc:
                self.say(f"round {round_}: the verdict on {provider[:12]}… was not published: {exc}")

    def centralised_baseline(self) -> list[float]:
        """What the same training gives without federation: one model trained here on the whole
        training set, from the same first weights and normalisation, for rounds × epochs epochs
        (the epochs each provider trained in all); its held-out accuracy after each round's worth
        of epochs. The chart's reference line."""
        import torch
        from safetensors.torch import load_file

        from dvm_image_classifier.params import DEFAULT_LR, DEFAULTS, TrainParams
        from dvm_image_classifier.train import to_tensors, train

        s = self.settings
        test_x = self.x_test if self.x_test.ndim == 4 else self.x_test[..., None]
        test_y = np.array([self.classes.index(label) if label in self.classes else -1 for label in self.test_labels])
        keep = test_y >= 0
        x, y = to_tensors(self.x, self.y)
        x_test, y_test = to_tensors(test_x[keep], test_y[keep])
        params = TrainParams(architecture=self.spec["type"], epochs=s.rounds * s.epochs, batch_size=s.batch_size,
                             learning_rate=s.learning_rate or DEFAULT_LR[DEFAULTS["optimizer"]], seed=s.seed,
                             validation_fraction=0.0)
        outcome = train(train_images=x, train_labels=y, val_images=x_test, val_labels=y_test, spec=self.spec,
                        params=params, mean=self.mean, std=self.std,
                        initial_weights=load_file(str(self.workdir / "global-0.safetensors")),
                        device=torch.device("cpu"))
        by_epoch = {r["epoch"]: r["val_accuracy"] * keep.mean() for r in outcome.history}  # unknown labels: wrong
        return [by_epoch.get(r * s.epochs) for r in range(1, s.rounds + 1)]

    async def run(self) -> list[RoundReport]:
        if not self.shard_urls:
            if self.settings.trusted:
                await self.skip_flagged()
            await self.prepare()
        for round_ in range(1, self.settings.rounds + 1):
            await self.run_round(round_)
        if self.settings.baseline:
            self.say(f"training the centralised baseline here ({self.settings.rounds * self.settings.epochs} "
                     "epochs on the whole training set)")
            self.baseline = await asyncio.to_thread(self.centralised_baseline)
            self.say("centralised baseline: " + ", ".join(f"round {i} {a:.4f}" for i, a in
                                                        enumerate(self.baseline, 1) if a is not None))
        self.write_reports()
        return self.reports

    def write_reports(self) -> None:
        from dvm_core.charts import plot_lines

        baseline = getattr(self, "baseline", None)
        (self.workdir / "rounds.json").write_text(json.dumps(
            {"settings": asdict(self.settings), "providers": self.providers,
             "rounds": [asdict(r) for r in self.reports], "centralised_baseline": baseline}, indent=2) + "\n")
        s = self.settings
        series = [(f"global model ({s.method})", [(r.round, r.accuracy) for r in self.reports])]
        for method in s.compare:
            series.append((f"{method}, same updates", [(r.round, r.compared.get(method)) for r in self.reports]))
        if baseline:
            series.append(("centralised (all data here)", list(enumerate(baseline, 1))))
        attacked = ", ".join(f"provider {i} {a}" for i, a in sorted(s.attacks.items()))
        plot_lines(self.workdir / "accuracy.png",
                   f"held-out accuracy per round ({s.method}, {len(self.providers)} providers"
                   + (f"; simulated: {attacked}" if attacked else "") + ")",
                   series, x_label="round", y_label="accuracy", y_range=(0.0, 1.0),
                   size=(760, 420) if len(series) > 1 else (640, 420))


def contribution_table(reports: Sequence[RoundReport], providers: Sequence[str]) -> list[str]:
    """Per provider, over all rounds: sats paid for jobs and as bonus, mean score (leave one
    out) and gain (its update alone), rounds merged and left out, and the last reason it was
    left out (or dropped)."""
    def mean(values) -> str:
        finite = [v for v in values if isinstance(v, (int, float)) and abs(v) != float("inf")]
        return f"{sum(finite) / len(finite):+.4f}" if finite else "-"

    lines = ["provider       paid(sat)  bonus(sat)  mean score  mean gain  merged  left out  why (last)"]
    for p in providers:
        scored = [r.scores[p] for r in reports if p in r.scores]
        merged = sum(1 for r in reports if p in r.providers)
        out = [sc["reason"] for sc in scored if not sc["merged"]] + [r.dropped[p] for r in reports if p in r.dropped]
        lines.append(f"{p[:12]}…  {sum(r.paid.get(p, 0) for r in reports):9d}  "
                     f"{sum(r.bonus.get(p, 0) for r in reports):10d}  {mean(sc['score'] for sc in scored):>10}  "
                     f"{mean(sc.get('gain') for sc in scored):>9}  {merged:6d}  "
                     f"{len(reports) - merged:8d}  {out[-1] if out else ''}")
    return lines


async def federate(customer: Customer, wallet, providers: Sequence[str], train: Path, test: Path,
                   servers: Sequence[str], workdir: Path, settings: FederationSettings | None = None,
                   say: Callable[[str], None] = print) -> list[RoundReport]:
    """Run the rounds (see the module docstring); returns one report per round."""
    return await Federation(customer, wallet, providers, train, test, servers, workdir, settings, say).run()
