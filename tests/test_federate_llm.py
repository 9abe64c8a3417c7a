"""Federated LLM fine-tuning, LoRA mode (issue 20): three llm-finetune workers (kind 5751) with
three keys on one relay and one mint each train a fresh LoRA adapter on their shard of a JSONL
set, from the global model the customer sends as an archive; the customer pays each, merges the
adapters into the weights exactly and evaluates on its held-out JSONL, three rounds, the loss
lower every round. The merge is checked against the direct weighted average of the B·A
products (random tensors) and against peft's own merge (a real adapter on GPT-2 and Llama)."""

from __future__ import annotations

import dataclasses
import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from dvm_core import hookimpl  # noqa: E402
from dvm_core.devtools.blobserver import start_blob_server  # noqa: E402
from dvm_core.worker.plugins import plugin_manager  # noqa: E402
from dvm_federate import tiny  # noqa: E402
from dvm_federate.llm import (LlmSettings, check_adapter, federate_llm, merge_adapters, merge_into,  # noqa: E402
                              round_table, weight_shapes)

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


# --- the merge ----------------------------------------------------------------------------------

def random_adapter(shapes: dict[str, tuple[int, int]], rank: int, alpha: float, seed: int,
                   fan_in_fan_out: bool = False) -> tuple[dict, dict]:
    """(tensors, config) of a LoRA adapter in peft's key layout with random A and B."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (out_dim, in_dim) in shapes.items():
        if fan_in_fan_out:   # the weight is (in, out); B·A is (out, in)
            out_dim, in_dim = in_dim, out_dim
        module = "base_model.model." + name.removesuffix(".weight")
        tensors[module + ".lora_A.weight"] = torch.randn(rank, in_dim, generator=g)
        tensors[module + ".lora_B.weight"] = torch.randn(out_dim, rank, generator=g)
    return tensors, {"r": rank, "lora_alpha": alpha, "fan_in_fan_out": fan_in_fan_out, "peft_type": "LORA"}


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_merge_is_the_weighted_average_of_the_BA_products(fan_in_fan_out):
    g = torch.Generator().manual_seed(0)
    shapes = {"layers.0.q.weight": (6, 5), "layers.1.v.weight": (4, 7)}
    state = {name: torch.randn(shape, generator=g, dtype=torch.float64) for name, shape in shapes.items()}
    state["layers.0.norm.weight"] = torch.ones(5, dtype=torch.float64)
    # Different ranks and alphas: each adapter's own scaling counts.
    adapters = [random_adapter(shapes, 2, 16, 1, fan_in_fan_out), random_adapter(shapes, 3, 4, 2, fan_in_fan_out),
                random_adapter(shapes, 1, 1, 3, fan_in_fan_out)]
    weights = [10.0, 30.0, 60.0]
    merged = merge_into(state, adapters, weights)
    for name in shapes:
        module = "base_model.model." + name.removesuffix(".weight")
        expected = state[name].clone()
        for (tensors, config), w in zip(adapters, weights):
            ba = tensors[module + ".lora_B.weight"].double() @ tensors[module + ".lora_A.weight"].double()
            expected += (w / 100) * (ba.T if fan_in_fan_out else ba) * (config["lora_alpha"] / config["r"])
        assert torch.allclose(merged[name], expected, rtol=0, atol=1e-12), name
    assert merged["layers.0.norm.weight"] is state["layers.0.norm.weight"]
    with pytest.raises(ValueError, match="does not have"):
        merge_into({"other.weight": state["layers.0.q.weight"]}, adapters[:1], [1.0])
    with pytest.raises(ValueError, match="one weight per adapter"):
        merge_into(state, adapters, [1.0])


def test_a_bad_adapter_is_refused_before_the_merge(tmp_path):
    """What `check_adapter` refuses drops that provider from the round (not the round)."""
    from safetensors.torch import save_file

    shapes = {"layers.0.q.weight": (6, 5)}
    good, config = random_adapter(shapes, 2, 4, 1)
    folder = tmp_path / "adapter"
    folder.mkdir()

    def write(tensors, config_text):
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        (folder / "adapter_config.json").write_text(config_text)

    write(good, json.dumps(config))
    check_adapter(folder, shapes)
    for tensors, text, message in (
            (good, "{not json", "cannot be read"),
            (good, "[1]", "not a JSON object"),
            (good, json.dumps({**config, "fan_in_fan_out": True}), "fits no weight"),
            ({k: v * float("nan") for k, v in good.items()}, json.dumps(config), "NaN or infinite"),
            ({"base_model.model.layers.0.q.bias": torch.zeros(6)}, json.dumps(config), "not a LoRA factor")):
        write(tensors, text)
        with pytest.raises(ValueError, match=message):
            check_adapter(folder, shapes)
    assert weight_shapes(tiny.save_model_folder(tmp_path / "m", "gpt2"))["transformer.h.0.attn.c_attn.weight"] \
        == (64, 192)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_merge_agrees_with_peft(kind, tmp_path):
    """A real adapter (peft, random non-zero B) merged by `merge_adapters` gives the weights peft's
    own merge_and_unload gives: the key names, the Conv1D transpose and α/r are peft's. Two
    adapters weighted 1:3 give the base plus ¼ and ¾ of each one's update."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base = tiny.save_model_folder(tmp_path / "base", kind)
    targets = ["c_attn", "c_proj"] if kind == "gpt2" else ["q_proj", "v_proj", "down_proj"]
    updates, dirs = [], []
    for i in range(2):
        model = AutoModelForCausalLM.from_pretrained(str(base))
        peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8 + 8 * i, target_modules=targets,
                                                      lora_dropout=0.0))
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5)
        dirs.append(tmp_path / f"adapter-{i}")
        peft_model.save_pretrained(str(dirs[-1]), safe_serialization=True)
        updates.append(peft_model.merge_and_unload().state_dict())
    original = load_file(str(base / "model.safetensors"))
    report = merge_adapters(base, dirs[:1], [5.0], tmp_path / "one")
    one = load_file(str(tmp_path / "one" / "model.safetensors"))
    modules = sum(".lora_A." in k for k in load_file(str(dirs[0] / "adapter_model.safetensors")))
    assert modules >= 2 * len(targets) and report["modules"] == modules   # every adapted layer
    changed = 0
    for key, value in one.items():
        assert torch.allclose(value, updates[0][key], atol=1e-6), key
        changed += not torch.equal(value, original[key])
    assert changed == modules
    assert (tmp_path / "one" / "config.json").is_file() and (tmp_path / "one" / "tokenizer.json").is_file()
    merge_adapters(base, dirs, [1.0, 3.0], tmp_path / "two")
    two = load_file(str(tmp_path / "two" / "model.safetensors"))
    for key, value in two.items():
        expected = original[key] + 0.25 * (updates[0][key] - original[key]) + 0.75 * (updates[1][key] - original[key])
        assert torch.allclose(value, expected, atol=1e-6), key
    AutoModelForCausalLM.from_pretrained(str(tmp_path / "two"))   # a model folder transformers loads
    if kind == "gpt2":   # the merge DVM's FLoRA stacking, merged with weight 1, is the same merge
        from dvm_fedavg.merge import merge_files, stacked_adapter_config

        # (same r and α for both, as every job of a round asks)
        same = tmp_path / "adapter-1b"
        same.mkdir()
        (same / "adapter_model.safetensors").write_bytes((dirs[1] / "adapter_model.safetensors").read_bytes())
        (same / "adapter_config.json").write_text((dirs[0] / "adapter_config.json").read_text())
        stacked = tmp_path / "stacked"
        stacked.mkdir()
        merge_files([d / "adapter_model.safetensors" for d in (dirs[0], same)], [1.0, 3.0],
                    stacked / "adapter_model.safetensors")
        config = json.loads((dirs[0] / "adapter_config.json").read_text())
        (stacked / "adapter_config.json").write_text(json.dumps(stacked_adapter_config(config, 2)))
        merge_adapters(base, [stacked], [1.0], tmp_path / "via-stack")
        merge_adapters(base, [dirs[0], same], [1.0, 3.0], tmp_path / "direct")
        via, direct = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("via-stack", "direct"))
        assert all(torch.allclose(via[k], direct[k], atol=1e-6) for k in direct)


# --- three providers, three rounds --------------------------------------------------------------

async def start_llm_providers(workers, mint, blobs, count: int) -> list[str]:
    keys = []
    for i in range(count):
        worker = await workers.start(
            pm=plugin_manager(only=["llm-finetune"]), name=f"provider-{i}", mints=[mint.url],
            blob_servers=[blobs.url], allow_private_urls=True,
            plugins={"llm-finetune": {"sats_per_million_tokens": RATE}})
        keys.append(worker.keys.public_key)
    return keys


async def test_three_providers_three_rounds_lower_the_heldout_loss(workers, mint, relay, blobs, tmp_path):
    model = tiny.save_model_folder(tmp_path / "base-model", "gpt2")
    train = tiny.write_corpus(tmp_path / "train.jsonl", 240, seed=1)
    test = tiny.write_corpus(tmp_path / "test.jsonl", 60, seed=2)
    providers = await start_llm_providers(workers, mint, blobs, 3)
    customer = await funded_customer(tmp_path, mint.url, relay.url)
    lines: list[str] = []
    settings = LlmSettings(rounds=3, epochs=1, batch_size=8, learning_rate=3e-3, lora_r=8, lora_alpha=16,
                           target_modules=("c_attn", "c_proj", "c_fc"), allow_private_urls=True, baseline=True)
    try:
        federation = await federate_llm(customer, customer.wallet, providers, train, test, model, [blobs.url],
                                        tmp_path / "fed", settings, say=lines.append)
    finally:
        await close_customer(customer)
    print("\n".join(lines + round_table(federation)))
    rounds = federation.reports
    assert [len(r.providers) for r in rounds] == [3, 3, 3] and not any(r.dropped for r in rounds)
    assert all(sum(r.paid.values()) == 3 for r in rounds)   # 1 sat each, paid by nutzap
    assert all(all(w.startswith("paid 1 sat") for w in r.payments.values()) for r in rounds)
    losses = [federation.initial_loss] + [r.eval_loss for r in rounds]
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert all(r.merge["method"] == "lora-exact" and r.merge["inputs"] == 3 for r in rounds)
    assert all(r.merge["weights"] == pytest.approx([1 / 3] * 3) for r in rounds)   # 80 examples each
    saved = json.loads((tmp_path / "fed" / "rounds.json").read_text())
    assert [r["eval_loss"] for r in saved["rounds"]] == losses[1:]
    assert saved["base_model"]["eval_loss"] == losses[0]
    # The centralised reference: one adapter on all 240 examples for 3 epochs, merged the same way.
    assert saved["centralised_baseline"]["eval_loss"] == federation.baseline < losses[0]
    assert "one LoRA adapter on all 240 examples, 3 epochs of batch 8" in saved["centralised_baseline"]["plan"]
    assert (tmp_path / "fed" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "fed" / "global-3" / "model.safetensors").is_file()
    # Scored before the merge (on by default): every honest adapter lowers its shard's loss and is kept.
    assert all(len(r.scores) == 3 and all(sc["merged"] and sc["shard_after"] < sc["shard_before"]
                                          for sc in r.scores.values()) for r in rounds)


class Failing:
    """An llm-finetune provider whose every job fails (free: it never asks to be paid)."""

    @hookimpl
    def register_job_kinds(self, register, config):
        import dvm_llm_finetune

        def run(ctx, job):
            raise RuntimeError("this provider's GPU caught fire")

        register(dataclasses.replace(dvm_llm_finetune.job_kind(config), run=run, price=None, pricing=None))


async def test_a_lazy_and_a_sign_flipping_provider_are_left_out(workers, mint, relay, blobs, tmp_path):
    """Scores on LLM updates: provider 2 returns B = 0 (its adapter changes nothing), provider 3
    its update × −4 (`--attack`, simulated on arrival); both are left out, and the merge of the
    honest one still lowers the held-out loss. Provider 4 fails: dropped, the round goes on."""
    model = tiny.save_model_folder(tmp_path / "base-model", "gpt2")
    train = tiny.write_corpus(tmp_path / "train.jsonl", 240, seed=1)
    test = tiny.write_corpus(tmp_path / "test.jsonl", 60, seed=2)
    providers = await start_llm_providers(workers, mint, blobs, 3)
    pm = plugin_manager(only=[])
    pm.register(Failing(), name="failing")
    failing = await workers.start(pm=pm, name="failing", mints=[mint.url], blob_servers=[blobs.url],
                                  allow_private_urls=True)
    providers.append(failing.keys.public_key)
    customer = await funded_customer(tmp_path, mint.url, relay.url)
    lines: list[str] = []
    settings = LlmSettings(rounds=1, epochs=1, batch_size=8, learning_rate=3e-3,
                           target_modules=("c_attn", "c_proj", "c_fc"), allow_private_urls=True,
                           attacks={1: "lazy", 2: "sign-flip"})
    try:
        federation = await federate_llm(customer, customer.wallet, providers, train, test, model, [blobs.url],
                                        tmp_path / "fed", settings, say=lines.append)
    finally:
        await close_customer(customer)
    print("\n".join(lines))
    (only,) = federation.reports
    assert only.providers == [providers[0]] and only.merge["inputs"] == 1
    assert only.scores[providers[1]]["reason"] == "no change from the global model (a lazy update)"
    flipped = only.scores[providers[2]]
    assert not flipped["merged"] and "did not lower the loss on its own shard" in flipped["reason"]
    assert flipped["shard_after"] > flipped["shard_before"]
    assert only.eval_loss < federation.initial_loss
    assert sum(only.paid.values()) == 3   # all paid: the cheating is found after delivery
    assert list(only.dropped) == [providers[3]] and "internal error" in only.dropped[providers[3]]


async def test_median_survives_a_sign_flipping_provider_where_fedavg_does_not(workers, mint, relay, blobs,
                                                                             tmp_path):
    """Unscored, one provider of three sends its update × −4: averaged in, the held-out loss
    rises above the base model's; the coordinate-wise median of the updates W + Δᵢ lowers it."""
    model = tiny.save_model_folder(tmp_path / "base-model", "gpt2")
    train = tiny.write_corpus(tmp_path / "train.jsonl", 150, seed=1)
    test = tiny.write_corpus(tmp_path / "test.jsonl", 30, seed=2)
    providers = await start_llm_providers(workers, mint, blobs, 3)
    customer = await funded_customer(tmp_path, mint.url, relay.url)
    settings = LlmSettings(rounds=1, epochs=1, batch_size=8, learning_rate=3e-3, allow_private_urls=True,
                           target_modules=("c_attn", "c_proj", "c_fc"), score=False, attacks={2: "sign-flip"})
    runs = {}
    try:
        for method in ("fedavg", "median"):
            runs[method] = await federate_llm(customer, customer.wallet, providers, train, test, model,
                                              [blobs.url], tmp_path / method,
                                              dataclasses.replace(settings, method=method), say=print)
    finally:
        await close_customer(customer)
    base = runs["fedavg"].initial_loss
    fedavg, median = (runs[m].reports[0] for m in ("fedavg", "median"))
    assert fedavg.providers == median.providers == providers   # unscored: every update merged
    assert fedavg.eval_loss > base, (base, fedavg.eval_loss)
    assert median.eval_loss < base - 0.1, (base, median.eval_loss)
    assert median.merge["method"] == "median" and fedavg.merge["method"] == "lora-exact"
    assert not list((tmp_path / "median" / "round-1").glob("robust-*"))   # the whole-model copies are gone


async def test_merging_through_a_merge_dvm(workers, mint, relay, blobs, tmp_path):
    """`--merge-dvm`: the adapters stacked (FLoRA) by a kind-5752 job on another DVM and merged
    here give the global model the exact merge here gives."""
    from safetensors.torch import load_file

    model = tiny.save_model_folder(tmp_path / "base-model", "gpt2")
    train = tiny.write_corpus(tmp_path / "train.jsonl", 100, seed=1)
    test = tiny.write_corpus(tmp_path / "test.jsonl", 30, seed=2)
    providers = await start_llm_providers(workers, mint, blobs, 2)
    merger = await workers.start(pm=plugin_manager(only=["fedavg"]), name="merger", mints=[mint.url],
                                 blob_servers=[blobs.url], allow_private_urls=True)
    customer = await funded_customer(tmp_path, mint.url, relay.url)
    settings = LlmSettings(rounds=1, epochs=1, batch_size=8, learning_rate=3e-3, allow_private_urls=True,
                           merge_provider=merger.keys.public_key, score=False)
    try:
        federation = await federate_llm(customer, customer.wallet, providers, train, test, model, [blobs.url],
                                        tmp_path / "fed", settings, say=print)
    finally:
        await close_customer(customer)
    (only,) = federation.reports
    assert only.providers == providers and only.merge["stacked_by"] == merger.keys.public_key[:12]
    assert only.merge["remote"]["lora"]["rank_multiplier"] == 2
    fed = tmp_path / "fed"
    adapters = [fed / "round-1" / f"provider-{i}" for i in range(2)]
    merge_adapters(fed / "global-0", adapters, [50.0, 50.0], tmp_path / "here")
    remote, here = (load_file(str(p / "model.safetensors")) for p in (fed / "global-1", tmp_path / "here"))
    assert remote.keys() == here.keys() and all(torch.allclose(remote[k], here[k], atol=1e-6) for k in here)
    assert any(not torch.equal(remote[k], load_file(str(fed / "global-0" / "model.safetensors"))[k]) for k in here)
    assert only.eval_loss < federation.initial_loss



async def test_a_round_stopped_after_its_bonus_pays_neither_bonus_nor_merge_again(workers, mint, relay, blobs,
                                                                                  tmp_path, monkeypatch):
    """Resumed after a stop between the round's bonus and its end (the held-out loss of an LLM
    can take minutes), the round runs again but pays nothing twice: the providers' jobs and the
    merge DVM's job are taken from their journals, and the bonus from its records (one per
    provider, written before its ecash is made, `Customer.send_bonus(keep=...)`)."""
    from dvm_federate.llm import HeldOut

    model = tiny.save_model_folder(tmp_path / "base-model", "gpt2")
    train = tiny.write_corpus(tmp_path / "train.jsonl", 100, seed=1)
    test = tiny.write_corpus(tmp_path / "test.jsonl", 30, seed=2)
    providers = await start_llm_providers(workers, mint, blobs, 2)
    merger = await workers.start(pm=plugin_manager(only=["fedavg"]), name="merger", mints=[mint.url],
                                 blob_servers=[blobs.url], allow_private_urls=True)
    customer = await funded_customer(tmp_path, mint.url, relay.url)
    settings = LlmSettings(rounds=1, epochs=1, batch_size=8, learning_rate=3e-3, allow_private_urls=True,
                           merge_provider=merger.keys.public_key, bonus=10)
    fed = tmp_path / "fed"
    loss = HeldOut.loss

    class Stopped(Exception):
        pass

    def stopped_after_the_bonus(self, model_dir):
        if list((fed / "round-1" / "bonus").glob("*.json")):
            raise Stopped("killed after the bonus")
        return loss(self, model_dir)
    try:
        before = await customer.wallet.total_balance()
        monkeypatch.setattr(HeldOut, "loss", stopped_after_the_bonus)
        with pytest.raises(Stopped):
            await federate_llm(customer, customer.wallet, providers, train, test, model, [blobs.url], fed,
                               settings, say=print)
        monkeypatch.setattr(HeldOut, "loss", loss)
        first = before - await customer.wallet.total_balance()
        bonus = {p.stem: json.loads(p.read_text()) for p in (fed / "round-1" / "bonus").glob("*.json")}
        assert bonus and all(b["published"] for b in bonus.values()), bonus
        assert sum(b["amount"] for b in bonus.values()) == 10
        merge = json.loads((fed / "round-1" / "merge.job.json").read_text())
        assert merge["state"] == "paid" and merge["amount"] > 0, merge
        lines: list[str] = []
        resumed = await federate_llm(customer, customer.wallet, providers, train, test, model, [blobs.url], fed,
                                     settings, say=lines.append)
        after = await customer.wallet.total_balance()
    finally:
        await close_customer(customer)
    (only,) = resumed.reports
    assert only.providers == providers, lines
    assert sum(1 for line in lines if "(paid before the restart) recovered" in line) == 3, lines   # and the merge
    assert only.bonus == {p: b["amount"] for p, b in bonus.items()}, (only.bonus, bonus)
    assert sum(1 for line in lines if "sent before the restart" in line) == len(bonus), lines
    jobs = sum(only.paid[p] for p in providers)
    assert jobs > 0 and before - after == first == jobs + merge["amount"] + 10, (before, after, first)   # each once

# --- the command --------------------------------------------------------------------------------

def dvm(*args: str, timeout: float = 60):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "dvm_core.cli", "federate", *args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_dvm_federate_task_llm_local_runs_from_one_command(tmp_path):
    """`dvm federate --task llm --local 2`: relay, mint, blob server, two llm-finetune provider
    processes, a tiny GPT-2 and a toy corpus built here; the per-round table. About 1½ minutes on
    2 cores (each provider process imports torch and transformers for its first job)."""
    out = tmp_path / "federation"
    run = dvm("--task", "llm", "--local", "2", "--rounds", "2", "--epochs", "1", "--batch-size", "8",
              "--out", str(out), timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "2 providers up" in run.stdout and "round 2: 2/2 adapters merged" in run.stdout
    assert "round  eval loss  perplexity  merged  dropped  paid(sat)  MB up  seconds" in run.stdout
    saved = json.loads((out / "rounds.json").read_text())
    losses = [saved["base_model"]["eval_loss"]] + [r["eval_loss"] for r in saved["rounds"]]
    assert losses[2] < losses[1] < losses[0], losses
    assert saved["settings"]["kind"] == 5751 and saved["settings"]["target_modules"] == ["c_attn", "c_proj", "c_fc"]
    assert (out / "global-2" / "model.safetensors").exists() and (out / "loss.png").exists()


def test_dvm_federate_task_llm_refuses_what_it_cannot_do(tmp_path):
    """Before anything starts or is paid: what LoRA rounds do not support yet is refused."""
    from click.testing import CliRunner

    from dvm_federate.commands import federate_command

    model = tmp_path / "model"
    model.mkdir()
    data = tiny.write_corpus(tmp_path / "train.jsonl", 4)
    for args, message in ((["--task", "llm", "--relay", "ws://x"], "--task llm needs --model FOLDER"),
                          (["--task", "llm", "--local", "2", "--train", str(data)], "give all of --model, --train"),
                          (["--task", "llm", "--relay", "ws://x", "--model", str(model), "--method", "median",
                            "--merge-dvm", "ab" * 32], "not on a --merge-dvm")):
        refused = CliRunner().invoke(federate_command, args)
        assert refused.exit_code != 0 and message in refused.output, (args, refused.output)
