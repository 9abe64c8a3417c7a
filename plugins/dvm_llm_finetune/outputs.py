"""The files a job returns besides the weights: the model card (JSON) and the loss curve (PNG).

The curve is drawn with matplotlib (`dvm_core.charts`), imported only when it is drawn.
"""

from __future__ import annotations

import json
import math
import platform
from pathlib import Path

from dvm_core.charts import figure, plot_series, save_png

CARD_FORMAT = "dvm-llm-finetune/1"


def model_card(*, base, params, outcome, datasets: dict, weights: dict, job_seconds: float) -> dict:
    """Everything needed to use and reproduce the result (JSON-able dict).

    :param base: `model.BaseModel`; :param params: `FinetuneParams`; :param outcome: `train.Outcome`;
    :param weights: {file name: sha256} of the returned weight files."""
    hyper = params.as_dict()
    hyper.pop("processes", None)
    if params.method == "full":
        for key in ("lora_r", "lora_alpha", "lora_dropout", "target_modules"):
            hyper.pop(key, None)
    else:
        hyper["target_modules"] = outcome.target_modules
    return {
        "format": CARD_FORMAT,
        "task": "causal-language-modeling",
        "base_model": {**base.source, "model_type": base.model_type, "parameters": base.parameters,
                       "weights_bytes": base.weights_bytes, "weights_sha256": base.weights_sha256,
                       "weights_sha256_is": "sha256 of the lines '<file>:<sha256>\\n' of its *.safetensors "
                                            "files in name order"},
        "method": params.method,
        "hyperparameters": {**hyper, "optimizer": "AdamW (no weight decay on biases and norms)",
                            "loss": "token-level cross-entropy, mean over labelled tokens per optimizer step"},
        "metrics": {
            "before": outcome.before,
            "after": outcome.after,
            "train_loss": outcome.after["train_loss"], "eval_loss": outcome.after["eval_loss"],
            "eval_perplexity": outcome.after["eval_perplexity"],
        },
        "history": outcome.history,
        "datasets": datasets,
        "training": {"tokens_seen": outcome.tokens_seen, "loss_tokens_seen": outcome.loss_tokens_seen,
                     "steps": outcome.steps, "planned_steps": outcome.planned_steps,
                     "epochs_completed": outcome.epochs_completed, "seconds": round(outcome.train_seconds, 3),
                     "tokens_per_s": round(outcome.tokens_per_s, 1), "job_seconds": round(job_seconds, 3),
                     "stopped_early": outcome.stopped, "device": outcome.device,
                     "mixed_precision": outcome.mixed_precision, "base_dtype": outcome.extra.get("base_dtype"),
                     "processes": outcome.processes,
                     "threads": outcome.threads, "trainable_parameters": outcome.trainable_parameters,
                     "total_parameters": outcome.total_parameters},
        "weights": weights,
        "versions": environment(),
    }


def write_card(path: Path, card: dict) -> None:
    path.write_text(json.dumps(card, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def environment() -> dict:
    import accelerate
    import peft
    import safetensors
    import torch
    import transformers
    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "accelerate": accelerate.__version__, "safetensors": safetensors.__version__,
            "python": platform.python_version()}


def plot_loss(history: list[dict], before: dict, after: dict, path: Path, title: str = "fine-tuning loss") -> None:
    """An 800×450 PNG: the training loss per optimizer step (a line), and the evaluation loss
    before and after training (dots at step 0 and the last step); `title` says what was trained."""
    points = [(r["step"], r["loss"]) for r in history]
    last_step = max([s for s, v in points if math.isfinite(v)], default=1)
    fig, (ax,) = figure(title, (800, 450))
    plot_series(ax, [("train", points)], dots=[("eval (before, after)", [(0, before.get("eval_loss")),
                                                                          (last_step, after.get("eval_loss"))])],
                x_label="optimizer step", y_label="loss (cross-entropy)")
    save_png(fig, path)
