"""Federated rounds, the customer's side (FEDSTR, arXiv 2404.15834): `dvm federate`.

One call of `federate` runs R rounds of federated averaging over DVMs:

1. once: split the training set (an image-classifier ``.npz``) into one shard per provider,
   IID or non-IID by label (`split_indices`), and upload each shard to the blob servers,
   encrypted with its own key;
2. each round: upload the current global weights; send each provider a private
   image-classifier job (kind 5750) on its shard, starting from those weights, with the whole
   dataset's normalisation so every provider prepares images alike; pay each one's
   ``payment-required`` with a nutzap (up to ``max_price``); collect the updates;
3. merge the updates, weighted by shard size, with the chosen method (``fedavg``, ``median``,
   ``trimmed_mean``, ``krum``, ``multi_krum``): locally (`dvm_fedavg.merge.merge_files`) or as
   a merge job (kind 5752) sent to a DVM;
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

from dvm_core.customer import Customer, PaymentDeclined, ProgressMeter, download_artifacts, upload_dataset
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
    # Simulated misbehaviour (`dvm federate --local --attack`): provider index → "sign-flip" or
    # "lazy"; its update is replaced here, after download, by what such a provider would send.
    attacks: dict[int, str] = field(default_factory=dict)
    baseline: bool = False  # also train one model on all the data here, for the accuracy chart


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


class ProviderFailed(Exception):
    pass


ATTACKS = {
    "sign-flip": "its change to the global model reversed (global - (update - global))",
    "lazy": "the global model it was sent, untrained",
}


def parse_attack(text: str, providers: int) -> tuple[int, str]:
    """``sign-flip:1`` → (1, "sign-flip"): the provider index (0-based, as in the shard lines)."""
    name, _, index = text.partition(":")
    if name not in ATTACKS or not index.isdigit():
        raise ValueError(f"--attack {text!r}: give {' or '.join(f'{a}:INDEX' for a in ATTACKS)}")
    if int(index) >= providers:
        raise ValueError(f"--attack {text!r}: provider indices go from 0 to {providers - 1}")
    return int(index), name


def poison(update: Path, base: Path, attack: str, out: Path) -> Path:
    """Write what a misbehaving provider would have sent instead of `update`: ``lazy``, the
    `base` weights it was given; ``sign-flip``, its change to them reversed. BatchNorm's
    running statistics are kept as trained (they are not part of the update being attacked,
    and a reversed variance would be negative). The file's metadata is kept."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(update), "pt") as f:
        metadata = f.metadata()
    local, start = load_file(str(update)), load_file(str(base))
    if attack == "lazy":
        poisoned = start
    elif attack == "sign-flip":
        poisoned = {k: (2 * start[k] - v if v.is_floating_point() and "running_" not in k else v)
                    for k, v in local.items()}
    else:
        raise ValueError(f"unknown attack {attack!r}")
    save_file({k: v.contiguous() for k, v in poisoned.items()}, str(out), metadata=metadata)
    return out


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
    with np.load(path, allow_pickle=False) as data:
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
        self.x, self.y, self.classes = _read_npz(Path(train))
        self.x_test, y_test, test_classes = _read_npz(Path(test))
        self.test_labels = [test_classes[int(i)] for i in y_test]  # class names
        if self.x.ndim == 3:
            self.x = self.x[..., None]
        self.shards: list[np.ndarray] = []
        self.shard_urls: list[str] = []
        self.reports: list[RoundReport] = []
        self._paid: dict[str, int] = {}        # this round: provider → sats paid
        self._payments: dict[str, str] = {}    # this round: provider → what it asked, why paid or not
        self.global_weights: Path | None = None
        self.card: Path | None = None

    # --- set-up ------------------------------------------------------------------------------

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

    async def _job(self, provider: str, kind: int, inputs: list[JobInput], params: dict[str, str],
                   dest: Path, label: str = "") -> tuple[dict[str, Path], int]:
        """One paid job on one provider: its downloaded files and what it cost. Its progress
        (the provider's ``processing`` feedback) is said as it comes, after `label`, with a rate
        and an ETA, and a full bar once its result is in."""
        s = self.settings
        if s.pay_on_delivery:
            params = dict(params, pay_on_delivery=self.wallet.p2pk_pubkey)   # the HTLCs' refund key
        request = await self.customer.submit(kind, inputs, params, provider=provider)
        paid = 0
        started = time.monotonic()
        meter = ProgressMeter()
        label = label or f"provider {provider[:12]}…"
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
                if update.status == "payment-required" and s.pay_on_delivery:
                    result = await self._pay_on_delivery(provider, request, update,
                                                         s.job_timeout - (time.monotonic() - started))
                    self.say(f"{label} {meter.done('result received')}")
                    files = await download_artifacts(result, dest, allow_private=s.allow_private_urls)
                    return {p.name: p for p in files}, self._paid[provider]
                if update.status == "payment-required":
                    asked = (update.amount_msats or 0) // 1000
                    if paid:
                        raise ProviderFailed("asked to be paid twice")
                    try:   # checked by the client: signer, amount, cap, mint, lock
                        await self.customer.pay_with_nutzap(request, update, self.wallet,
                                                            max_price=s.max_price)
                    except PaymentDeclined as exc:
                        self._payments[provider] = f"not paid: {exc}"
                        raise ProviderFailed(f"not paid: {exc}") from None
                    paid = asked
                    self._paid[provider] = asked
                    self._payments[provider] = (f"paid {asked} sat (its quote, within max_price "
                                                f"{s.max_price}): {update.message[:160]}")
        except TimeoutError:
            await self.customer.cancel(request, "timed out")
            raise ProviderFailed(f"no result within {s.job_timeout:g}s") from None
        raise ProviderFailed("no result")

    async def _pay_on_delivery(self, provider: str, request: dict, offer, timeout: float):
        """Pay a provider's offer of its sealed update (checked: signer, amount, cap, lock, mint)
        with HTLC ecash, kept under workdir/delivery-tokens/ before it is sent; returns the result
        the key opens. A provider that never redeems is dropped; the ecash comes back after the
        locktime (`dvm job reclaim`)."""
        s = self.settings
        tokens = self.workdir / "delivery-tokens"

        def keep(state: dict) -> None:
            tokens.mkdir(exist_ok=True, mode=0o700)
            (tokens / f"{request['id']}.json").write_text(json.dumps(state))
        try:
            delivery = await self.customer.pay_on_delivery(request, offer, self.wallet,
                                                           max_price=s.max_price, keep=keep)
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
            attack = s.attacks.get(i)
            if attack:
                update = await asyncio.to_thread(poison, update, self.global_weights, attack,
                                                 update.with_name(f"{attack}.safetensors"))
                self.say(f"round {round_}: provider {i} ({provider[:12]}…) simulated as {attack}: its update "
                         f"is {ATTACKS[attack]}")
            updates.append(update)
            weights.append(float(len(self.shards[i])))
            names.append(provider)
        merged = self.workdir / f"global-{round_}.safetensors"
        report: dict = {}
        compared = {}
        base = self.global_weights
        for method in s.compare if updates else ():
            trial = rdir / f"merged-{method}.safetensors"
            try:
                await asyncio.to_thread(lambda: merge_files(
                    updates, weights, trial, method=method, base=base, trim_ratio=s.trim_ratio,
                    f=s.krum_f, clip_norm=s.clip_norm))
            except ValueError as exc:
                self.say(f"round {round_}: {method} could not merge: {exc}")
                continue
            compared[method] = await asyncio.to_thread(self.evaluate, trial)
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
        else:
            self.say(f"round {round_}: no update came back; the global model stays as it was")
        accuracy = await asyncio.to_thread(self.evaluate)
        result = RoundReport(round=round_, accuracy=accuracy, providers=names, dropped=dropped, paid=paid,
                             seconds=round(time.monotonic() - started, 3), merge=report, compared=compared,
                             payments=payments)
        self.reports.append(result)
        self.say(f"round {round_}: {len(names)}/{len(self.providers)} updates merged ({s.method}), "
                 f"held-out accuracy {accuracy:.4f}, paid {sum(paid.values())} sat, {result.seconds:.1f}s"
                 + "".join(f"; {m} would give {a:.4f}" for m, a in compared.items()))
        return result

    async def _merge_remote(self, updates: list[Path], weights: list[float], out: Path, rdir: Path) -> dict:
        s = self.settings
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
                                   label=f"merge DVM ({s.merge_provider[:12]}…)")
        if "model.safetensors" not in files:
            raise ProviderFailed("the merge result has no model.safetensors")
        files["model.safetensors"].replace(out)
        report = files.get("merge_report.json")
        return json.loads(report.read_text()) if report else {}

    def evaluate(self, weights: Path | None = None) -> float:
        """The accuracy of the global model (or of `weights`) on the held-out set."""
        from dvm_image_classifier.predict import accuracy, load_model

        model, preprocess = load_model(weights or self.global_weights, self.card)
        return accuracy(model, preprocess, self.x_test, self.test_labels)

    # --- all rounds ----------------------------------------------------------------------------

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


async def federate(customer: Customer, wallet, providers: Sequence[str], train: Path, test: Path,
                   servers: Sequence[str], workdir: Path, settings: FederationSettings | None = None,
                   say: Callable[[str], None] = print) -> list[RoundReport]:
    """Run the rounds (see the module docstring); returns one report per round."""
    return await Federation(customer, wallet, providers, train, test, servers, workdir, settings, say).run()
