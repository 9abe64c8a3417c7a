"""Checking a request before any work or payment: the inputs, the params and the provider's limits.

`parse_request` runs on the worker's event loop before the customer pays: quick, no I/O. What
needs the files (the model's size and modules, the dataset's lines and tokens) is checked in
`run` and still raised as `JobInputError`, which the core refunds.

The provider's settings come from the worker's configuration::

    [plugins.llm-finetune]
    allowed_models = ["HuggingFaceTB/SmolLM2-135M"]  # hub repo ids served from the hub cache
    hub_cache_dir = "/var/cache/huggingface/hub"     # default: huggingface_hub's own cache
    max_model_parameters = 1000000000                # base models above this are refused
    max_model_bytes = 4294967296                     # weights on disk (hub or archive)
    max_dataset_bytes = 268435456                    # each JSONL file
    max_examples = 200000
    max_tokens = 50000000                            # tokens trained on per epoch
    max_seq_length = 4096
    max_epochs = 20
    max_steps = 100000
    max_seconds = 3600                               # training time a job may ask for
    max_processes = 1                                # > 1: `accelerate launch` over that many GPUs
    launcher = "auto"                                # "accelerate": always a child process
    trust_remote_code = false                        # models with their own Python code
    sats_per_million_tokens = 100                    # price: tokens × epochs × this / 10⁶, min 1
    sats_per_check = 0                               # a verify check of this plugin's transcripts: this,
                                                     # plus its segment's tokens at the rate above (its
                                                     # fixed costs: the base model, tokenizing the data)
    checkpoint_retention_days = 30                   # a transcript's checkpoints (checkpoint_every) are
                                                     # announced as kept this long, and deleted then
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields

from dvm_core import JobInputError
from dvm_core.params import choice, flag, number, params_schema, plugin_settings, url_inputs

NAME = "llm-finetune"
METHODS = ("lora", "full")
OUTPUTS = ("model", "delta")
COMPRESSIONS = ("none", "bf16", "int8")
SCHEDULES = ("cosine", "linear", "constant")
LAUNCHERS = ("auto", "accelerate")
MAX_BATCH_SIZE = 1024
# A Hugging Face repo id: "name" or "owner/name", letters, digits, "-", "_", ".".
REPO_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_./-]{0,127}$")
MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]{0,127}$")

DEFAULTS = {
    "method": "lora",
    "epochs": 1,
    "max_seq_length": 512,
    "batch_size": 8,
    "gradient_accumulation_steps": 1,
    "lr_schedule": "cosine",
    "warmup_ratio": 0.03,
    "weight_decay": 0.0,
    "max_grad_norm": 1.0,
    "seed": 0,
    "eval_fraction": 0.05,
    "packing": "no",
    "gradient_checkpointing": "no",
    "lora_r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.05,
}
DEFAULT_LR = {"lora": 2e-4, "full": 5e-5}

PARAMS = {
    "model": "the base model: a Hugging Face repo id the provider allows (see the description); "
             "or send a url input marked 'model' (a zip/tar of a model folder: config.json, "
             "*.safetensors weights, tokenizer files)",
    "revision": "with model: a branch, tag or commit in the provider's hub cache (default main)",
    "method": "lora (a LoRA adapter) or full (all weights) (default lora)",
    "learning_rate": "the peak learning rate (default 2e-4 for lora, 5e-5 for full)",
    "lr_schedule": "cosine, linear (decay to 0 after warm-up) or constant (default cosine)",
    "warmup_ratio": "share of the steps spent warming the learning rate up from 0, 0-0.5 (default 0.03)",
    "weight_decay": "AdamW weight decay, 0-1 (default 0)",
    "max_grad_norm": "clip the gradients' norm to this before each step, 0: no clipping (default 1)",
    "epochs": "passes over the training set (default 1)",
    "max_steps": "stop after this many optimizer steps (default: as many as the epochs take)",
    "max_seq_length": "tokens per sequence; longer prompt/completion and chat examples are "
                      "dropped, longer texts split (default 512)",
    "batch_size": "sequences per step, per process (default 8)",
    "gradient_accumulation_steps": "batches per optimizer step (default 1)",
    "seed": "random seed: same seed, data and machine give the same weights (default 0)",
    "checkpoint_every": "k > 0: a training transcript, signed by the provider, with a checkpoint every k "
                        "steps and at the end (returned as files: transcript.json and "
                        "checkpoint-<step>.safetensors: the trained weights, the optimizer's and the "
                        "schedule's state), which a verify job (kind 5753) can replay; one process "
                        "only; 0: none (default 0)",
    "packing": "yes: fill rows of max_seq_length tokens with whole examples, batch_size rows a step "
               "(fewer, fuller steps); no: batch_size examples a step (default no). Either way examples "
               "sharing a row never see each other",
    "gradient_checkpointing": "yes: recompute activations in the backward pass, less memory, "
                              "slower (default no)",
    "lora_r": "LoRA rank, 1-1024 (default 8)",
    "lora_alpha": "LoRA scaling alpha (default 16)",
    "lora_dropout": "LoRA dropout, 0-0.9 (default 0.05)",
    "target_modules": "comma-separated names of the linear layers LoRA adapts (default per "
                      "architecture, e.g. c_attn for GPT-2, q_proj,k_proj,v_proj,o_proj for Llama)",
    "eval_fraction": "share of the training set held out for evaluation when no input is marked "
                     "'eval', 0-0.5 (default 0.05)",
    "processes": "training processes (GPUs) for one job, launched with accelerate launch "
                 "(default 1; at most the provider's max_processes)",
    "time_limit": "stop training after this many seconds and return the model as it is "
                  "(default: the provider's max_seconds)",
    "output": "method full: model (the fine-tuned weights, default) or delta (only the pseudo-gradient "
              "base − fine-tuned, pseudo_gradient.safetensors: what a DiLoCo round sends back)",
    "compression": "with output delta: none (float32), bf16 or int8 (per-row absmax scales) (default none)",
    "tokens": "not needed: the worker counts the tokens before it prices the job (an older way to "
              "say how many; a number above the provider's max_tokens is refused at once)",
}


def _repo_ids(value, where: str) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)) \
            or not all(isinstance(v, str) and REPO_ID.match(v) for v in value):
        raise ValueError(f"{where} must be a list of Hugging Face repo ids, got {value!r}")
    return tuple(value)


def _launcher(value, where: str) -> str:
    if value not in LAUNCHERS:
        raise ValueError(f"{where} must be one of {', '.join(LAUNCHERS)}, got {value!r}")
    return value


@dataclass(frozen=True)
class Limits:
    """What a provider allows one job (from ``[plugins.llm-finetune]``)."""

    allowed_models: tuple[str, ...] = ()
    hub_cache_dir: str = ""
    max_model_parameters: int = 1_000_000_000
    max_model_bytes: int = 4 << 30
    max_dataset_bytes: int = 256 << 20
    max_examples: int = 200_000
    max_tokens: int = 50_000_000
    max_seq_length: int = 4096
    max_epochs: int = 20
    max_steps: int = 100_000
    max_seconds: float = 3600.0
    max_processes: int = 1
    launcher: str = "auto"
    trust_remote_code: bool = False
    sats_per_million_tokens: float = 100.0
    sats_per_check: float = 0.0
    checkpoint_retention_days: float = 30.0   # how long a transcript's checkpoints are kept (announced;
                                              # the worker deletes them then: `Artifact.keep_days`)

    @classmethod
    def from_config(cls, config: dict | None) -> "Limits":
        """Read the settings from the worker's whole configuration. Raises ValueError on a
        setting that is unknown or of the wrong type: a typo must stop the worker at start."""
        return plugin_settings(cls, config, NAME, may_be_zero=("sats_per_million_tokens", "sats_per_check"),
                               checks={"allowed_models": _repo_ids, "launcher": _launcher})


@dataclass(frozen=True)
class FinetuneParams:
    """The hyperparameters of one job, validated, with the defaults filled in."""

    method: str = DEFAULTS["method"]
    learning_rate: float = DEFAULT_LR["lora"]
    lr_schedule: str = DEFAULTS["lr_schedule"]
    warmup_ratio: float = DEFAULTS["warmup_ratio"]
    weight_decay: float = DEFAULTS["weight_decay"]
    max_grad_norm: float = DEFAULTS["max_grad_norm"]
    epochs: int = DEFAULTS["epochs"]
    max_steps: int | None = None
    max_seq_length: int = DEFAULTS["max_seq_length"]
    batch_size: int = DEFAULTS["batch_size"]
    gradient_accumulation_steps: int = DEFAULTS["gradient_accumulation_steps"]
    seed: int = DEFAULTS["seed"]
    checkpoint_every: int = 0        # steps between the transcript's checkpoints; 0: no transcript
    packing: bool = False
    gradient_checkpointing: bool = False
    lora_r: int = DEFAULTS["lora_r"]
    lora_alpha: float = DEFAULTS["lora_alpha"]
    lora_dropout: float = DEFAULTS["lora_dropout"]
    target_modules: tuple[str, ...] | None = None
    eval_fraction: float = DEFAULTS["eval_fraction"]
    processes: int = 1
    time_limit: float = Limits.max_seconds
    output: str = "model"
    compression: str = "none"

    def as_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["target_modules"] = list(self.target_modules) if self.target_modules else None
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "FinetuneParams":
        data = dict(data)
        if data.get("target_modules") is not None:
            data["target_modules"] = tuple(data["target_modules"])
        return cls(**data)


@dataclass(frozen=True)
class FinetuneJob:
    """What `parse_request` hands to `run`."""

    dataset: str                    # URL of the training JSONL
    eval_dataset: str | None        # URL of the evaluation JSONL (input marked 'eval')
    model_repo: str | None          # a hub repo id (param model) ...
    model_revision: str | None
    model_archive: str | None       # ... or the URL of a zip/tar of a model folder
    params: FinetuneParams
    declared_tokens: int | None
    limits: Limits = field(compare=False, default_factory=Limits)

    @property
    def priced_tokens(self) -> int:
        return self.declared_tokens if self.declared_tokens is not None else self.limits.max_tokens








def _checkpoint_every(params: dict, limits: Limits) -> int:
    every = number(params, "checkpoint_every", int, 0, 2**31, 0)
    processes = number(params, "processes", int, 1, limits.max_processes, 1)
    if every and (processes > 1 or limits.launcher == "accelerate"):
        raise JobInputError("param checkpoint_every (a training transcript) needs training in one process, "
                            + ("send processes=1" if processes > 1 else
                               "and this provider trains in a child process (launcher accelerate)")
                            + ", or checkpoint_every=0")
    return every


def parse_params(params: dict[str, str], limits: Limits, has_eval_input: bool) -> FinetuneParams:
    """Validate the request's params against the provider's limits and fill in the defaults."""
    method = choice(params, "method", METHODS, DEFAULTS["method"])
    fraction = number(params, "eval_fraction", float, 0.0, 0.5,
                       0.0 if has_eval_input else DEFAULTS["eval_fraction"])
    if has_eval_input and fraction:
        raise JobInputError("send either an input marked 'eval' or param eval_fraction, not both")
    targets = None
    if params.get("target_modules") is not None:
        targets = tuple(t.strip() for t in params["target_modules"].split(",") if t.strip())
        bad = [t for t in targets if not MODULE_NAME.match(t)]
        if not targets or bad:
            raise JobInputError("param target_modules must be comma-separated module names like "
                                f"q_proj,v_proj, got {params['target_modules'][:80]!r}")
        if method == "full":
            raise JobInputError("param target_modules is for method lora; method full trains every weight")
    if method == "full":
        lora_given = sorted(p for p in ("lora_r", "lora_alpha", "lora_dropout") if p in params)
        if lora_given:
            raise JobInputError(f"param(s) {', '.join(lora_given)} are for method lora, not full")
    output = choice(params, "output", OUTPUTS, "model")
    compression = choice(params, "compression", COMPRESSIONS, "none")
    if output == "delta" and method != "full":
        raise JobInputError("param output delta is for method full (a LoRA adapter is already its update)")
    if compression != "none" and output != "delta":
        raise JobInputError("param compression is for output delta: the pseudo-gradient is what is compressed")
    return FinetuneParams(
        method=method, output=output, compression=compression,
        learning_rate=number(params, "learning_rate", float, 1e-12, 1.0, DEFAULT_LR[method]),
        lr_schedule=choice(params, "lr_schedule", SCHEDULES, DEFAULTS["lr_schedule"]),
        warmup_ratio=number(params, "warmup_ratio", float, 0.0, 0.5, DEFAULTS["warmup_ratio"]),
        weight_decay=number(params, "weight_decay", float, 0.0, 1.0, DEFAULTS["weight_decay"]),
        max_grad_norm=number(params, "max_grad_norm", float, 0.0, 1e6, DEFAULTS["max_grad_norm"]),
        epochs=number(params, "epochs", int, 1, limits.max_epochs, DEFAULTS["epochs"]),
        max_steps=number(params, "max_steps", int, 1, limits.max_steps, None),
        max_seq_length=number(params, "max_seq_length", int, 8, limits.max_seq_length,
                               min(DEFAULTS["max_seq_length"], limits.max_seq_length)),
        batch_size=number(params, "batch_size", int, 1, MAX_BATCH_SIZE, DEFAULTS["batch_size"]),
        gradient_accumulation_steps=number(params, "gradient_accumulation_steps", int, 1, 1024,
                                            DEFAULTS["gradient_accumulation_steps"]),
        seed=number(params, "seed", int, 0, 2**63 - 1, DEFAULTS["seed"]),
        checkpoint_every=_checkpoint_every(params, limits),
        packing=flag(params, "packing", DEFAULTS["packing"]),
        gradient_checkpointing=flag(params, "gradient_checkpointing", DEFAULTS["gradient_checkpointing"]),
        lora_r=number(params, "lora_r", int, 1, 1024, DEFAULTS["lora_r"]),
        lora_alpha=number(params, "lora_alpha", float, 1e-6, 1e6, DEFAULTS["lora_alpha"]),
        lora_dropout=number(params, "lora_dropout", float, 0.0, 0.9, DEFAULTS["lora_dropout"]),
        target_modules=targets,
        eval_fraction=fraction,
        processes=number(params, "processes", int, 1, limits.max_processes, 1),
        time_limit=number(params, "time_limit", float, 1.0, limits.max_seconds, limits.max_seconds),
    )


def parse_request(request, limits: Limits) -> FinetuneJob:
    """Turn a job request into a `FinetuneJob`, or raise JobInputError.

    Inputs are ``url`` inputs told apart by their marker: none (or ``train``) for the training
    JSONL, ``eval`` for an evaluation JSONL, ``model`` for a model-folder archive (instead of
    param ``model``)."""
    urls = url_inputs(request, ("train", "eval", "model"),
                      what="the training JSONL, optionally one marked 'eval' and one marked 'model'")
    if urls["train"] is None:
        raise JobInputError("send the training set as an input of type 'url': a JSONL file whose lines "
                            "hold 'text', or 'prompt' and 'completion', or chat 'messages'")
    repo = request.params.get("model")
    revision = request.params.get("revision")
    archive = urls["model"]
    if repo is not None:
        repo = repo.strip()
        if archive is not None:
            raise JobInputError("send either param model (a hub repo id) or an input marked 'model' "
                                "(a model archive), not both")
        if not REPO_ID.match(repo):
            raise JobInputError(f"param model must be a Hugging Face repo id like owner/name, got {repo[:100]!r}")
        if repo not in limits.allowed_models:
            allowed = ", ".join(limits.allowed_models) or "none: send the model as an archive"
            raise JobInputError(f"model {repo!r} is not offered by this provider (allowed: {allowed})")
        if revision is not None and not REVISION.match(revision.strip()):
            raise JobInputError(f"param revision is not a branch, tag or commit name: {revision[:60]!r}")
    elif archive is None:
        allowed = ", ".join(limits.allowed_models) or "none"
        raise JobInputError("send the base model: param model (a Hugging Face repo id; this provider "
                            f"allows {allowed}) or an input of type 'url' marked 'model' (a zip/tar "
                            "of a model folder with safetensors weights)")
    elif revision is not None:
        raise JobInputError("param revision goes with param model, not with a model archive")
    params = parse_params(request.params, limits, has_eval_input=urls["eval"] is not None)
    declared = number(request.params, "tokens", int, 1, 2**62, None)
    if declared is not None and declared > limits.max_tokens:
        raise JobInputError(f"this provider trains on at most {limits.max_tokens} tokens per epoch "
                            f"(param tokens is {declared})")
    return FinetuneJob(dataset=urls["train"], eval_dataset=urls["eval"],
                       model_repo=repo, model_revision=revision.strip() if revision else None,
                       model_archive=archive, params=params, declared_tokens=declared, limits=limits)


def price(job: FinetuneJob, limits: Limits) -> int:
    """Tokens × epochs × the provider's rate per million tokens, rounded up, at least 1 sat
    (0 when the rate is 0). A max_steps cap does not lower the price: the steps' size is only
    known once the data is tokenized."""
    rate = limits.sats_per_million_tokens
    if rate <= 0:
        return 0
    return max(1, math.ceil(job.priced_tokens * job.params.epochs * rate / 1e6))


def schema(limits: Limits) -> dict:
    """The params' JSON Schema (for the announcement), from the reading `parse_request` does."""
    def read(params):
        parse_params(params, limits, has_eval_input=False)
        number(params, "tokens", int, 1, limits.max_tokens, None)
    return params_schema(read, PARAMS)
