"""Federated rounds across providers (FEDSTR): three workers with three keys on one relay and
one mint train shards of the digits from the same global weights, the customer pays each,
merges the updates and evaluates; a poisoning provider is survived by the robust methods and
not by FedAvg; a provider that fails or never answers is dropped from the round."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from dvm_core import hookimpl  # noqa: E402
from dvm_core.devtools.blobserver import start_blob_server  # noqa: E402
from dvm_core.protocol.events import Keys  # noqa: E402
from dvm_core.worker.plugins import plugin_manager  # noqa: E402
from dvm_core.customer import Customer  # noqa: E402
from dvm_federate.rounds import Federation, FederationSettings, contribution_table, federate, split_indices  # noqa: E402
from dvm_image_classifier.digits import digits_split, write_npz  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import dvm_image_classifier as ic  # noqa: E402

from .paying import FUNDS, close_customer, funded_customer  # noqa: E402

RATE = 1000  # sats per million sample-epochs: a 480-image shard × 2 epochs → 1 sat


@pytest.fixture
async def blobs(tmp_path):
    server = await start_blob_server(tmp_path / "blobs")
    yield server
    await server.stop()


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    x_train, y_train, x_test, y_test = digits_split(0)
    directory = tmp_path_factory.mktemp("digits")
    return write_npz(directory / "train.npz", x_train, y_train), write_npz(directory / "test.npz", x_test, y_test)


class Poisoner:
    """A provider that trains, then returns poison instead of its update: `signflip` sends
    base − 10 × (update − base), `random` sends noise, `lazy` the weights it was sent; `fail`
    raises."""

    def __init__(self, mode: str):
        self.mode = mode

    @hookimpl
    def register_job_kinds(self, register, config):
        honest = ic.job_kind(config)

        def run(ctx, job):
            if self.mode == "fail":
                raise RuntimeError("this provider's GPU caught fire")
            result = honest.run(ctx, job)
            path = next(a.path for a in result.artifacts if a.name == "model.safetensors")
            update = load_file(path)
            base = load_file(ctx.fetch(job.weights))
            generator = torch.Generator().manual_seed(7)
            for key, value in update.items():
                if not value.is_floating_point():
                    continue
                if self.mode == "signflip":
                    update[key] = base[key] - 10 * (value - base[key])
                elif self.mode == "lazy":   # trained (and billed for it), returns what it was sent
                    update[key] = base[key]
                else:
                    update[key] = torch.randn(value.shape, generator=generator) * 5
            save_file(update, str(path), metadata={"poisoned": self.mode})
            return result

        # Poisoners serve for free (the image classifier's price stays with its own provider).
        register(dataclasses.replace(honest, run=run, price=None, pricing=None))


async def start_providers(workers, mint, blobs, honest: int, poisoners: tuple[str, ...] = ()):
    keys = []
    for i in range(honest + len(poisoners)):
        if i < honest:
            pm = plugin_manager(only=["image-classifier"])
        else:
            pm = plugin_manager(only=[])
            pm.register(Poisoner(poisoners[i - honest]), name=f"poisoner-{i}")
        worker = await workers.start(
            pm=pm, name=f"provider-{i}", mints=[mint.url], blob_servers=[blobs.url], allow_private_urls=True,
            plugins={"image-classifier": {"sats_per_million_sample_epochs": RATE}})
        keys.append(worker.keys.public_key)
    return keys


def test_split_iid_and_by_label():
    labels = np.repeat(np.arange(10), 30)
    iid = split_indices(labels, 3, "iid", seed=1)
    assert sorted(np.concatenate(iid).tolist()) == list(range(300)) and [len(p) for p in iid] == [100] * 3
    assert all(len(np.unique(labels[p])) == 10 for p in iid)
    by_label = split_indices(labels, 3, "label", seed=1)
    assert sorted(np.concatenate(by_label).tolist()) == list(range(300))
    assert all(len(np.unique(labels[p])) <= 6 for p in by_label)  # 2 runs of 50: ≤ 3 classes each
    with pytest.raises(ValueError, match="unknown split 'dirichlet'"):
        split_indices(labels, 3, "dirichlet")


async def test_three_providers_three_rounds_match_one_provider_on_all_data(
        workers, mint, relay, blobs, digits, tmp_path):
    providers = await start_providers(workers, mint, blobs, honest=3)
    customer = await funded_customer(tmp_path, mint.url, relay.url)
    lines: list[str] = []
    try:
        settings = FederationSettings(rounds=3, epochs=2, allow_private_urls=True)
        rounds = await federate(customer, customer.wallet, providers, *digits, [blobs.url],
                                tmp_path / "fed", settings, say=lines.append)
        central = await federate(customer, customer.wallet, providers[:1], *digits, [blobs.url],
                                 tmp_path / "central",
                                 dataclasses.replace(settings, rounds=1, epochs=6), say=lines.append)
    finally:
        await close_customer(customer)
    print("\n".join(lines))
    assert [len(r.providers) for r in rounds] == [3, 3, 3] and not any(r.dropped for r in rounds)
    assert all(sum(r.paid.values()) == 3 for r in rounds)  # 1 sat each, paid by nutzap
    assert all(len(r.payments) == 3 and all(w.startswith("paid 1 sat") for w in r.payments.values())
               for r in rounds)
    accuracies = [r.accuracy for r in rounds]
    assert accuracies[-1] >= central[0].accuracy - 0.02, (accuracies, central[0].accuracy)
    assert accuracies[-1] > accuracies[0] - 0.01
    assert central[0].accuracy >= 0.9
    saved = json.loads((tmp_path / "fed" / "rounds.json").read_text())
    assert [r["accuracy"] for r in saved["rounds"]] == accuracies
    assert (tmp_path / "fed" / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = rounds[-1].merge
    assert report["method"] == "fedavg" and len(report["inputs"]) == 3


async def test_robust_methods_survive_a_poisoning_provider(workers, mint, relay, blobs, digits, tmp_path):
    """Sign-flipped ×10 updates from one of five providers, end to end. (Random updates, and
    both attacks against every method, are in test_fedavg.py at the merge level.)"""
    providers = await start_providers(workers, mint, blobs, honest=4, poisoners=("signflip",))
    customer = await funded_customer(tmp_path, mint.url, relay.url)
    lines: list[str] = []
    try:
        settings = FederationSettings(rounds=2, epochs=2, method="median", allow_private_urls=True, score=False,
                                      trim_ratio=0.2, krum_f=1, compare=("fedavg", "trimmed_mean", "krum"))
        rounds = await federate(customer, customer.wallet, providers, *digits, [blobs.url],
                                tmp_path / "fed", settings, say=lines.append)
    finally:
        await close_customer(customer)
    print("\n".join(lines))
    last = rounds[-1]
    robust = {"median": last.accuracy, **{m: last.compared[m] for m in ("trimmed_mean", "krum")}}
    assert all(a >= 0.85 for a in robust.values()), (robust, last.compared)
    assert last.compared["fedavg"] < min(robust.values()) - 0.3, last.compared
    assert rounds[0].merge["method"] == "median" and len(rounds[0].merge["inputs"]) == 5


async def test_scores_leave_out_a_lazy_and_a_poisoning_provider(workers, mint, relay, blobs, digits, tmp_path):
    """Five providers, one lazy and one sign-flipping, merged with plain FedAvg: every update is
    scored before the merge (held-out loss with and without it, its own shard before and after),
    the two are left out with their reasons in rounds.json, and the honest three make the model."""
    providers = await start_providers(workers, mint, blobs, honest=3, poisoners=("signflip", "lazy"))
    customer = await funded_customer(tmp_path, mint.url, relay.url)
    lines: list[str] = []
    try:
        settings = FederationSettings(rounds=2, epochs=2, allow_private_urls=True, compare=("fedavg",), bonus=10,
                                      publish_verdicts=True)
        rounds = await federate(customer, customer.wallet, providers, *digits, [blobs.url],
                                tmp_path / "fed", settings, say=lines.append)
        await asyncio.sleep(2)   # a bonus the workers sent back (they must not) would be back by now
        balance = await customer.wallet.total_balance()
        # The verdicts it published: the next federation that trusts this customer skips the two.
        verdicts = await customer.verdicts(providers, [customer.keys.public_key])
        again = Federation(customer, customer.wallet, providers, *digits, [blobs.url], tmp_path / "again",
                           FederationSettings(trusted=("self",)), say=lines.append)
        skipped = await again.skip_flagged()
        stranger = Federation(customer, customer.wallet, providers, *digits, [blobs.url], tmp_path / "stranger",
                              FederationSettings(trusted=(Keys.generate().public_key,)), say=lines.append)
        assert await stranger.skip_flagged() == {} and stranger.providers == providers
    finally:
        await close_customer(customer)
    print("\n".join(lines))
    honest, (flipper, lazy) = providers[:3], providers[3:]
    # The bonus: 10 sat a round, shared among the honest three by their positive gains, sent
    # as nutzaps outside any job, which the workers leave for their operators to collect.
    for r in rounds:
        assert sum(r.bonus.values()) == 10 and set(r.bonus) <= set(honest), r.bonus
        positive = {p: r.scores[p]["gain"] for p in honest if r.scores[p]["gain"] > 0}
        assert set(r.bonus) == set(positive), (r.bonus, positive)
    paid = sum(sum(r.paid.values()) for r in rounds)
    assert paid == 6 and balance == FUNDS - paid - 20, balance
    best = max(honest, key=lambda p: sum(r.bonus.get(p, 0) for r in rounds))
    worker = next(w for w in workers.workers if w.keys.public_key == best)
    async with Customer(worker.keys, [relay.url]) as operator:   # `dvm wallet collect`, as the operator
        await operator.pool.wait_all_connected(10)
        before = await worker.cashier.wallet.total_balance()
        got = await operator.collect_nutzaps(worker.cashier.wallet, expect=sum(r.bonus.get(best, 0) for r in rounds))
        assert got == sum(r.bonus.get(best, 0) for r in rounds) > 0
        assert await worker.cashier.wallet.total_balance() == before + got
    assert {v.provider for v in verdicts} == {flipper, lazy} and len(verdicts) == 4   # two rounds each
    assert all(v.label == "update-left-out" and v.kind == 5750 for v in verdicts)
    assert set(skipped) == {flipper, lazy} and again.providers == honest
    assert "no change from the global model" in skipped[lazy]
    table = "\n".join(contribution_table(rounds, providers))
    print(table)
    assert "no change from the global model" in table.splitlines()[5]
    for r in rounds:
        assert r.providers == honest, (r.round, r.scores)
        assert all(r.scores[p]["merged"] for p in honest), r.scores
        assert r.scores[flipper]["score"] < 0 and any(
            why in r.scores[flipper]["reason"] for why in ("raised the held-out loss", "did not lower the loss on its own"))
        assert r.scores[lazy]["score"] == 0 and "lazy" in r.scores[lazy]["reason"]
        assert r.scores[lazy]["shard_after"] == r.scores[lazy]["shard_before"]
        assert all(r.scores[p]["shard_after"] < r.scores[p]["shard_before"] for p in honest)
        assert not r.scores[flipper]["merged"] and not r.scores[lazy]["merged"]
        assert len(r.merge["inputs"]) == 3
    assert rounds[-1].accuracy >= 0.85 and rounds[-1].compared["fedavg"] < rounds[-1].accuracy - 0.3
    saved = json.loads((tmp_path / "fed" / "rounds.json").read_text())
    assert saved["rounds"][0]["scores"][lazy]["merged"] is False
    assert any("LEFT OUT: no change from the global model" in line for line in lines)


async def test_failing_and_silent_providers_are_dropped(workers, mint, relay, blobs, digits, tmp_path):
    providers = await start_providers(workers, mint, blobs, honest=1, poisoners=("fail",))
    silent = Keys.generate().public_key  # no worker behind it: never answers
    customer = await funded_customer(tmp_path, mint.url, relay.url)
    lines: list[str] = []
    try:
        settings = FederationSettings(rounds=1, epochs=1, allow_private_urls=True, job_timeout=12)
        rounds = await federate(customer, customer.wallet, providers + [silent], *digits, [blobs.url],
                                tmp_path / "fed", settings, say=lines.append)
    finally:
        await close_customer(customer)
    print("\n".join(lines))
    (only,) = rounds
    assert only.providers == [providers[0]]
    assert "internal error while running the job" in only.dropped[providers[1]]  # (and refunded)
    assert "no result within 12s" in only.dropped[silent]
    # What was paid to whom, and why (the failing provider serves for free; the silent one never asked).
    assert only.paid == {providers[0]: 1}
    assert only.payments[providers[0]].startswith("paid 1 sat (its quote, within max_price")
    assert set(only.payments) == {providers[0]}
    assert only.accuracy > 0.2  # one epoch on one shard from random weights: better than chance


async def test_every_provider_paid_on_delivery(workers, mint, relay, blobs, digits, tmp_path):
    """`pay_on_delivery`: each provider is paid only once its update is sealed and offered, with
    ecash it redeems only by revealing the update's key."""
    providers = await start_providers(workers, mint, blobs, honest=2)
    customer = await funded_customer(tmp_path, mint.url, relay.url)
    try:
        settings = FederationSettings(rounds=1, epochs=1, allow_private_urls=True, pay_on_delivery=True)
        (only,) = await federate(customer, customer.wallet, providers, *digits, [blobs.url],
                                 tmp_path / "fed", settings, say=print)
        balance = await customer.wallet.total_balance()
    finally:
        await close_customer(customer)
    assert only.providers == providers and only.paid == {p: 1 for p in providers}
    assert all(w.startswith("paid 1 sat on delivery") for w in only.payments.values()), only.payments
    assert balance == FUNDS - 2
    assert len(list((tmp_path / "fed" / "delivery-tokens").glob("*.json"))) == 2
    assert only.accuracy > 0.2


async def test_merging_through_a_merge_dvm(workers, mint, relay, blobs, digits, tmp_path):
    """The merge as a kind-5752 job on another DVM gives the same global model as merging here."""
    from dvm_fedavg.merge import merge_files

    providers = await start_providers(workers, mint, blobs, honest=2)
    merger = await workers.start(pm=plugin_manager(only=["fedavg"]), name="merger", mints=[mint.url],
                                 blob_servers=[blobs.url], allow_private_urls=True)
    customer = await funded_customer(tmp_path, mint.url, relay.url)
    try:
        settings = FederationSettings(rounds=1, epochs=1, allow_private_urls=True,
                                      merge_provider=merger.keys.public_key)
        (only,) = await federate(customer, customer.wallet, providers, *digits, [blobs.url],
                                 tmp_path / "fed", settings, say=print)
    finally:
        await close_customer(customer)
    fed = tmp_path / "fed"
    updates = [next((fed / "round-1" / f"provider-{i}").glob("model.safetensors")) for i in range(2)]
    sizes = [float(np.load(fed / f"shard-{i}.npz")["y"].size) for i in range(2)]
    local = merge_files(updates, sizes, tmp_path / "local.safetensors", method="fedavg",
                        base=fed / "global-0.safetensors")
    remote, here = load_file(fed / "global-1.safetensors"), load_file(tmp_path / "local.safetensors")
    assert remote.keys() == here.keys() and all(torch.equal(remote[k], here[k]) for k in here)
    assert only.merge["method"] == "fedavg" and [i["weight"] for i in only.merge["inputs"]] == \
        [i["weight"] for i in local.to_dict()["inputs"]]


def test_dvm_federate_local_runs_from_one_command(tmp_path):
    """`dvm federate --local N`: relay, mint, blob server and N provider processes, one command."""
    import subprocess
    import sys

    out = tmp_path / "federation"
    run = subprocess.run(
        [sys.executable, "-m", "dvm_core.cli", "federate", "--local", "3", "--rounds", "1", "--epochs", "1",
         "--split", "label", "--attack", "lazy:2", "--out", str(out)],
        capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "3 providers up" in run.stdout and "round 1: 2/3 updates merged (fedavg)" in run.stdout
    assert "plays lazy (simulated)" in run.stdout and "LEFT OUT: no change from the global model" in run.stdout
    assert "mean score  mean gain  merged  left out" in run.stdout
    saved = json.loads((out / "rounds.json").read_text())
    assert [r["round"] for r in saved["rounds"]] == [1] and saved["settings"]["split"] == "label"
    assert (out / "global-1.safetensors").exists() and (out / "accuracy.png").exists()
    assert "customer wallet now holds" in run.stdout
    refused = subprocess.run([sys.executable, "-m", "dvm_core.cli", "federate", "--local", "2", "--method", "krum"],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "--method krum with 2 providers: " in refused.stderr
    for args, message in ((["--local", "2", "--attack", "lazy:2"], "N a provider from 0 to 1"),
                          (["--local", "2", "--attack", "bribe:1"], "MODE one of lazy, sign-flip"),
                          (["--attack", "lazy:1"], "use it with --local N")):
        refused = subprocess.run([sys.executable, "-m", "dvm_core.cli", "federate", *args],
                                 capture_output=True, text=True, timeout=60)
        assert refused.returncode != 0 and message in refused.stderr, refused.stderr
