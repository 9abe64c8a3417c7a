"""Federated LLM fine-tuning, full-model DiLoCo (issue 20): llm-finetune workers (kind 5751) on
one relay and one mint each take H inner AdamW steps on their shard from the global weights and
send back only their pseudo-gradient (`output=delta`, float32, bf16 or int8); the customer
averages them (or merges them robustly) and takes an outer Nesterov step, keeps the momentum
across rounds and restarts, and lands within 2 % of one model trained here on all the shards for
the same steps and tokens."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from dvm_core import JobInputError  # noqa: E402
from dvm_core.devtools.blobserver import start_blob_server  # noqa: E402
from dvm_core.worker.plugins import plugin_manager  # noqa: E402
from dvm_federate import tiny  # noqa: E402
from dvm_federate.diloco import check_delta, outer_step  # noqa: E402
from dvm_federate.llm import STATE, LlmSettings, federate_llm, round_table  # noqa: E402
from dvm_llm_finetune import delta as D  # noqa: E402
from dvm_llm_finetune.params import Limits, parse_params  # noqa: E402

from .paying import close_customer, funded_customer  # noqa: E402

RATE = 100  # sats per million tokens: a shard of a few thousand tokens → 1 sat


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: three in-process providers and the customer share 2 cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
async def blobs(tmp_path):
    server = await start_blob_server(tmp_path / "blobs")
    yield server
    await server.stop()


# --- the parts ------------------------------------------------------------------------------------

def test_outer_step_is_pytorch_sgd_with_nesterov_momentum():
    """Three outer steps on pseudo-gradients give what torch.optim.SGD(nesterov=True) gives
    with the pseudo-gradient as the gradient; with lr 1 and momentum 0, the plain average."""
    g = torch.Generator().manual_seed(0)
    theta = {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)}
    deltas = [{k: torch.randn(v.shape, generator=g) for k, v in theta.items()} for _ in range(3)]
    params = {k: torch.nn.Parameter(v.clone()) for k, v in theta.items()}
    sgd = torch.optim.SGD(params.values(), lr=0.7, momentum=0.9, nesterov=True)
    state, momentum = dict(theta), None
    for delta in deltas:
        for k, p in params.items():
            p.grad = delta[k].clone()
        sgd.step()
        state, momentum, report = outer_step(state, delta, momentum, 0.7, 0.9)
        for k, p in params.items():
            assert torch.allclose(state[k], p.detach(), atol=1e-6), k
            assert torch.allclose(momentum[k], sgd.state[p]["momentum_buffer"], atol=1e-6), k
    assert report["outer_lr"] == 0.7 and report["step_norm"] > 0
    plain, _, _ = outer_step(theta, deltas[0], None, 1.0, 0.0)
    assert all(torch.allclose(plain[k], theta[k] - deltas[0][k]) for k in theta)


@pytest.mark.parametrize("compression,bound", [("none", 0.0), ("bf16", 2 ** -8), ("int8", 0.5 / 127)])
def test_pseudo_gradient_file_round_trip(tmp_path, compression, bound):
    """What the provider writes (`write_delta`) reads back (`read_delta`) as base − trained,
    within the compression's error: exact, bf16's 8-bit mantissa, half an int8 step of each
    row's largest value; int8 is about a quarter of float32's bytes."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(1)
    base = {"a.weight": torch.randn(256, 64, generator=g), "a.bias": torch.randn(256, generator=g),
            "steps": torch.arange(3)}
    (tmp_path / "base").mkdir()
    save_file(base, str(tmp_path / "base" / "model.safetensors"))
    trained = {k: v - 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
               for k, v in base.items()}
    info = D.write_delta(tmp_path / "base", trained, tmp_path / "d.safetensors", compression, "ab" * 32)
    delta, meta = D.read_delta(tmp_path / "d.safetensors")
    assert meta == {"format": D.FORMAT, "compression": compression, "base_sha256": "ab" * 32}
    assert set(delta) == {"a.weight", "a.bias"} and info["tensors"] == 2   # floats only
    for k, d in delta.items():
        exact = base[k] - trained[k]
        rows = exact.reshape(exact.shape[0], -1) if exact.ndim > 1 else exact.reshape(1, -1)
        scale = rows.abs().amax(dim=1, keepdim=True).expand_as(rows).reshape(exact.shape)
        assert ((d - exact).abs() <= bound * scale + 1e-7).all(), (k, float((d - exact).abs().max()))
    if compression == "int8":
        D.write_delta(tmp_path / "base", trained, tmp_path / "f.safetensors", "none", "ab" * 32)
        assert info["bytes"] < 0.3 * (tmp_path / "f.safetensors").stat().st_size


def test_a_bad_pseudo_gradient_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "d.safetensors"
    save_file({"w": torch.zeros(2, 2)}, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not a dvm-pseudo-gradient/1 file"):
        D.read_delta(path)
    save_file({"w": torch.zeros(2, 2, dtype=torch.int8)}, str(path),
              metadata={"format": D.FORMAT, "compression": "int8", "base_sha256": ""})
    with pytest.raises(ValueError, match="no per-row scale"):
        D.read_delta(path)
    path.write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="cannot be read"):
        D.read_delta(path)
    state = {"w": torch.zeros(2, 2), "b": torch.zeros(2), "n": torch.arange(2)}
    check_delta({"w": torch.ones(2, 2), "b": torch.ones(2)}, state)
    for delta, message in (({"w": torch.ones(2, 2)}, "missing"),
                           ({"w": torch.ones(2, 2), "b": torch.ones(2), "x": torch.ones(1)}, "not in the model"),
                           ({"w": torch.ones(2, 3), "b": torch.ones(2)}, "is \\[2, 3\\]"),
                           ({"w": torch.ones(2, 2) * float("inf"), "b": torch.ones(2)}, "NaN or infinite")):
        with pytest.raises(ValueError, match=message):
            check_delta(delta, state)


def test_output_and_compression_params():
    limits = Limits()
    params = parse_params({"method": "full", "output": "delta", "compression": "int8"}, limits, False)
    assert (params.output, params.compression) == ("delta", "int8")
    assert parse_params({}, limits, False).output == "model"
    for given, message in (({"output": "delta"}, "output delta is for method full"),
                           ({"method": "full", "compression": "int8"}, "compression is for output delta"),
                           ({"method": "full", "output": "delta", "compression": "zip"}, "must be one of")):
        with pytest.raises(JobInputError, match=message):
            parse_params(given, limits, False)


# --- providers on a relay and a mint ----------------------------------------------------------------

async def start_llm_providers(workers, mint, blobs, count: int) -> list:
    started = []
    for i in range(count):
        started.append(await workers.start(
            pm=plugin_manager(only=["llm-finetune"]), name=f"provider-{i}", mints=[mint.url],
            blob_servers=[blobs.url], allow_private_urls=True, progress_interval=0.2,
            plugins={"llm-finetune": {"sats_per_million_tokens": RATE}}))
    return started


SETTINGS = LlmSettings(mode="diloco", rounds=3, inner_steps=20, batch_size=8, learning_rate=3e-3,
                       outer_lr=0.7, outer_momentum=0.9, allow_private_urls=True, max_seq_length=64)


async def federation_parts(workers, mint, relay, blobs, tmp_path, *, providers: int = 2, train: int = 96,
                           test: int = 30):
    """What a federated LLM run needs: the tiny base model's folder, train and test corpora of
    `train` and `test` sentences, `providers` running LLM providers (their keys) and a funded
    customer (close it with `close_customer`)."""
    model = tiny.save_model_folder(tmp_path / "base-model", "gpt2")
    train_file = tiny.write_corpus(tmp_path / "train.jsonl", train, seed=1)
    test_file = tiny.write_corpus(tmp_path / "test.jsonl", test, seed=2)
    keys = [w.keys.public_key for w in await start_llm_providers(workers, mint, blobs, providers)]
    return model, train_file, test_file, keys, await funded_customer(tmp_path, mint.url, relay.url)


async def test_diloco_three_providers_within_two_percent_of_centralised(workers, mint, relay, blobs, tmp_path):
    """Three providers, three rounds of H = 20 inner steps, the pseudo-gradients averaged and an
    outer Nesterov step: the held-out loss falls every round and ends within 2 % of one model
    trained here on all the shards for 3 × 20 steps of batch 3 × 8 (the same tokens)."""
    from safetensors.torch import load_file

    model, train, test, providers, customer = await federation_parts(workers, mint, relay, blobs, tmp_path,
                                                                     providers=3, train=240, test=60)
    lines: list[str] = []
    try:
        federation = await federate_llm(customer, customer.wallet, providers, train, test, model, [blobs.url],
                                        tmp_path / "fed", dataclasses.replace(SETTINGS, baseline=True, score=False),
                                        say=lines.append)
    finally:
        await close_customer(customer)
    print("\n".join(lines + round_table(federation)))
    rounds = federation.reports
    assert [len(r.providers) for r in rounds] == [3, 3, 3] and not any(r.dropped for r in rounds), lines
    assert all(sum(r.paid.values()) == 3 for r in rounds)
    losses = [federation.initial_loss] + [r.eval_loss for r in rounds]
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] <= 1.02 * federation.baseline, (losses, federation.baseline)
    assert all(r.merge["method"] == "fedavg" and r.outer["outer_momentum"] == 0.9 for r in rounds)
    # Only the pseudo-gradients came back: float32, the size of the model's weights, per provider.
    size = (tmp_path / "fed" / "global-0" / "model.safetensors").stat().st_size
    assert all(2.7 * size < r.bytes_up < 3.3 * size and r.bytes_down > 0 for r in rounds)
    assert all(set(r.train_seconds) == set(providers) for r in rounds)
    fed = tmp_path / "fed"
    assert sorted(p.name for p in (fed / "round-1" / "provider-0").iterdir()) == \
        ["README.md", "loss_curve.png", "model_card.json", "pseudo_gradient.safetensors"]
    card = json.loads((fed / "round-1" / "provider-0" / "model_card.json").read_text())
    assert card["training"]["steps"] == 20 and card["hyperparameters"]["output"] == "delta"
    state = json.loads((fed / STATE).read_text())
    assert state["round"] == 3 and state["global_model"] == "global-3"
    assert state["outer_momentum"] == "outer-3.safetensors"
    momentum = load_file(str(fed / "outer-3.safetensors"))
    assert momentum.keys() == load_file(str(fed / "global-3" / "model.safetensors")).keys()
    saved = json.loads((fed / "rounds.json").read_text())
    assert saved["centralised_baseline"]["loss_ratio"] == pytest.approx(losses[-1] / federation.baseline)
    assert any("centralised, same tokens" in line for line in round_table(federation))


async def test_diloco_resumes_after_its_last_finished_round(workers, mint, relay, blobs, tmp_path):
    """Stopped after round 1 (a run of 1 round), `federate_llm` with 2 rounds in the same folder
    runs round 2 only, from global-1 and the outer momentum of round 1, and int8 pseudo-gradients
    travel at about a quarter of float32's bytes. With resume off it starts over."""
    from safetensors.torch import load_file

    model, train, test, providers, customer = await federation_parts(workers, mint, relay, blobs, tmp_path)
    settings = dataclasses.replace(SETTINGS, rounds=1, inner_steps=8, compression="int8", score=False)
    fed = tmp_path / "fed"
    try:
        first = await federate_llm(customer, customer.wallet, providers, train, test, model, [blobs.url], fed,
                                   settings, say=print)
        lines: list[str] = []
        resumed = await federate_llm(customer, customer.wallet, providers, train, test, model, [blobs.url], fed,
                                     dataclasses.replace(settings, rounds=2), say=lines.append)
        other = tiny.write_corpus(tmp_path / "other.jsonl", 96, seed=5)
        with pytest.raises(ValueError, match="holds another federation \\(its train differ"):
            await federate_llm(customer, customer.wallet, providers, other, test, model, [blobs.url], fed,
                               settings, say=print)
    finally:
        await close_customer(customer)
    assert any("resuming after round 1" in line for line in lines)
    assert [r.round for r in resumed.reports] == [1, 2]
    assert resumed.reports[0] == first.reports[0] and resumed.initial_loss == first.initial_loss
    assert sum(resumed.reports[1].paid.values()) == 2   # round 2's jobs only: round 1 was not run again
    assert resumed.reports[1].eval_loss < resumed.reports[0].eval_loss
    # Round 2's momentum carried round 1's: m₂ = μ·m₁ + Δ₂, so m₂ − Δ₂ = μ·m₁ ≠ 0.
    m1, m2 = (load_file(str(fed / f"outer-{r}.safetensors")) for r in (1, 2))
    g1, g2 = (load_file(str(fed / f"global-{r}" / "model.safetensors")) for r in (1, 2))
    for k in m1:
        # θ₂ = θ₁ − η(Δ₂ + μ·m₂) and m₂ = μ·m₁ + Δ₂ ⇒ Δ₂ = (θ₁ − θ₂)/η − μ·m₂, then check m₂.
        d2 = (g1[k].double() - g2[k].double()) / 0.7 - 0.9 * m2[k].double()
        assert torch.allclose(m2[k].double(), 0.9 * m1[k].double() + d2, atol=1e-4), k
    up = resumed.reports[1].bytes_up
    size = (fed / "global-0" / "model.safetensors").stat().st_size
    assert 0.4 * size < up < 0.6 * size, (up, size)   # two int8 pseudo-gradients ≈ half a float32 model


async def test_diloco_provider_dropping_mid_round_and_a_sign_flipper(workers, mint, relay, blobs, tmp_path):
    """A provider whose worker stops mid-job is left out of that round, which finishes with the
    others; a sign-flipping provider (× −4) raises the held-out loss when averaged in, while the
    coordinate-wise median of the updates θ − Δᵢ lowers it."""
    model = tiny.save_model_folder(tmp_path / "base-model", "gpt2")
    train = tiny.write_corpus(tmp_path / "train.jsonl", 160, seed=1)
    test = tiny.write_corpus(tmp_path / "test.jsonl", 30, seed=2)
    started = await start_llm_providers(workers, mint, blobs, 4)
    providers = [w.keys.public_key for w in started]
    customer = await funded_customer(tmp_path, mint.url, relay.url)
    settings = dataclasses.replace(SETTINGS, rounds=1, inner_steps=10, score=False, attacks={2: "sign-flip"},
                                   job_timeout=20, outer_lr=1.0, outer_momentum=0.0)
    stopping: list = []

    def say(line: str) -> None:   # provider 3 goes away once its job is under way
        print(line)
        if not stopping and line.startswith(f"provider {providers[3][:12]}") and "%" in line:
            stopping.append(asyncio.get_running_loop().create_task(started[3].stop(grace=0.1)))

    runs = {}
    try:
        runs["fedavg"] = await federate_llm(customer, customer.wallet, providers, train, test, model, [blobs.url],
                                            tmp_path / "fedavg", settings, say=say)
        runs["median"] = await federate_llm(customer, customer.wallet, providers[:3], train, test, model,
                                            [blobs.url], tmp_path / "median",
                                            dataclasses.replace(settings, method="median"), say=print)
    finally:
        await close_customer(customer)
    assert stopping, "provider 3 never reported progress"
    fedavg, median = (runs[m].reports[0] for m in ("fedavg", "median"))
    assert list(fedavg.dropped) == [providers[3]] and "no result within 20s" in fedavg.dropped[providers[3]]
    assert fedavg.providers == providers[:3] == median.providers
    base = runs["fedavg"].initial_loss
    assert fedavg.eval_loss > runs["median"].reports[0].eval_loss
    assert median.eval_loss < base - 0.5, (base, median.eval_loss)
    assert median.merge["method"] == "median"


async def test_a_round_cut_short_after_paying_is_not_paid_again(workers, mint, relay, blobs, tmp_path):
    """The customer's run is stopped in round 1 once the providers are paid and training; run
    again in the same folder, it takes each paid job's result from the relay (its journal says
    it was paid) instead of asking and paying again: round 1 costs one payment per provider."""
    model, train, test, providers, customer = await federation_parts(workers, mint, relay, blobs, tmp_path)
    settings = dataclasses.replace(SETTINGS, rounds=1, inner_steps=60, score=False)
    fed = tmp_path / "fed"
    progress: list[str] = []

    def say(line: str) -> None:
        print(line)
        if "%" in line and "step" in line:
            progress.append(line)

    try:
        before = await customer.wallet.total_balance()
        run = asyncio.get_running_loop().create_task(federate_llm(
            customer, customer.wallet, providers, train, test, model, [blobs.url], fed, settings, say=say))
        while not progress and not run.done():   # both paid, one training: stop the customer
            await asyncio.sleep(0.05)
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run
        journals = sorted(json.loads(p.read_text())["state"] for p in (fed / "round-1").glob("*.job.json"))
        assert journals == ["paid", "paid"], journals
        lines: list[str] = []
        resumed = await federate_llm(customer, customer.wallet, providers, train, test, model, [blobs.url], fed,
                                     settings, say=lines.append)
        after = await customer.wallet.total_balance()
    finally:
        await close_customer(customer)
    (only,) = resumed.reports
    assert only.providers == providers and not only.dropped, lines
    assert sum(1 for line in lines if "(paid before the restart) recovered" in line) == 2, lines
    assert all("not paid again" in why for why in only.payments.values()), only.payments
    assert before - after == sum(only.paid.values()) == 2   # one sat per provider, once
    assert only.eval_loss < resumed.initial_loss


@pytest.mark.parametrize("cut", ["paid", "before-the-nutzap-went-out"])
async def test_a_round_paid_on_delivery_cut_short_is_not_paid_again(workers, mint, relay, blobs, tmp_path, cut):
    """The same with `pay_on_delivery`: stopped once both providers' offers are paid (or the
    HTLC ecash is made and kept but its nutzaps never went out), run again in the same folder,
    each job's sealed result is opened with its key (from the DVM's result or the mint) and the
    HTLC ecash kept in delivery-tokens/ (its nutzap sent again where there is no result yet),
    not paid for again."""
    model, train, test, providers, customer = await federation_parts(workers, mint, relay, blobs, tmp_path)
    settings = dataclasses.replace(SETTINGS, rounds=1, inner_steps=8, score=False, pay_on_delivery=True)
    fed = tmp_path / "fed"

    def journals() -> list[str]:
        return sorted(json.loads(p.read_text())["state"] for p in (fed / "round-1").glob("*.job.json"))

    def tokens_kept() -> bool:
        files = list((fed / "delivery-tokens").glob("*.json"))
        return len(files) == 2 and all("token" in json.loads(p.read_text()) for p in files)

    publish = customer.pool.publish
    if cut != "paid":
        async def killed_first(event):   # the nutzap is never sent: as if killed before it
            if event["kind"] == 9321:
                await asyncio.Event().wait()
            return await publish(event)
        customer.pool.publish = killed_first
    try:
        before = await customer.wallet.total_balance()
        run = asyncio.get_running_loop().create_task(federate_llm(
            customer, customer.wallet, providers, train, test, model, [blobs.url], fed, settings, say=print))
        while not run.done() and not ((fed / "round-1").is_dir() and
                                      all(j in ("paying", "paid") for j in journals() or ["-"])
                                      and len(journals()) == 2 and (cut == "paid" or tokens_kept())):
            await asyncio.sleep(0.02)
        run.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await run
        customer.pool.publish = publish
        assert set(journals()) <= {"paying", "paid"} and len(journals()) == 2, journals()
        lines: list[str] = []
        resumed = await federate_llm(customer, customer.wallet, providers, train, test, model, [blobs.url], fed,
                                     settings, say=lines.append)
        after = await customer.wallet.total_balance()
    finally:
        await close_customer(customer)
    (only,) = resumed.reports
    assert only.providers == providers and not only.dropped, lines
    assert sum(1 for line in lines if "(paid before the restart) recovered" in line) == 2, lines
    assert before - after == sum(only.paid.values()) == 2   # one sat per provider, once


async def test_diloco_scores_leave_a_lazy_provider_out(workers, mint, relay, blobs, tmp_path):
    """Scored (the default), a provider that sends a zero pseudo-gradient (its starting weights
    back) is left out of the outer step, and said so; the others' step lowers the loss."""
    model, train, test, providers, customer = await federation_parts(workers, mint, relay, blobs, tmp_path, providers=3)
    settings = dataclasses.replace(SETTINGS, rounds=1, inner_steps=8, attacks={1: "lazy"})
    try:
        federation = await federate_llm(customer, customer.wallet, providers, train, test, model, [blobs.url],
                                        tmp_path / "fed", settings, say=print)
    finally:
        await close_customer(customer)
    (only,) = federation.reports
    assert only.providers == [providers[0], providers[2]]
    assert only.scores[providers[1]]["merged"] is False
    assert "no change from the global model" in only.scores[providers[1]]["reason"]
    assert only.eval_loss < federation.initial_loss


async def test_inner_steps_that_do_not_fit_the_shards_are_refused_before_any_job(tmp_path):
    """H steps of the batch must fit in the passes over a shard providers allow (20): asked
    for more, the run stops before any job is sent or paid, saying what to change."""
    model = tiny.save_model_folder(tmp_path / "base-model", "gpt2")
    train = tiny.write_corpus(tmp_path / "train.jsonl", 48, seed=1)
    test = tiny.write_corpus(tmp_path / "test.jsonl", 10, seed=2)

    class NoCustomer:   # any use of it would be a job or a payment
        def __getattr__(self, name):
            raise AssertionError(f"customer.{name} used")

    settings = dataclasses.replace(SETTINGS, inner_steps=200)   # 16 examples, 2 steps a pass
    with pytest.raises(ValueError, match="H = 200 steps of batch 8 take 101 passes over shard 0"):
        await federate_llm(NoCustomer(), None, ["ab" * 32, "cd" * 32, "ef" * 32], train, test, model, [],
                           tmp_path / "fed", settings, say=print)
