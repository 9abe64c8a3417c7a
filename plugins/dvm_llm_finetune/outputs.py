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
    """A 1000×450 PNG of two charts: the training loss per optimizer step (a line) with the
    evaluation loss before and after training (dots at step 0 and the last step, each labelled
    with its value), and the same as perplexity (exp(loss)); `title` says what was trained."""
    save_png(loss_figure(history, before, after, title), path)


def loss_figure(history: list[dict], before: dict, after: dict, title: str = "fine-tuning loss"):
    """The figure `plot_loss` saves (its legend, outside the charts, is added when saved)."""
    points = [(r["step"], r["loss"]) for r in history]
    last_step = max([s for s, v in points if math.isfinite(v)], default=1)
    evals = [(0, before.get("eval_loss")), (last_step, after.get("eval_loss"))]
    fig, (loss, perplexity) = figure(title, (1000, 450), panels=2)
    plot_series(loss, [("train", points)], dots=[("eval (before, after)", evals)],
                title="loss", x_label="optimizer step", y_label="cross-entropy")
    plot_series(perplexity, [("train", [(s, _exp(v)) for s, v in points])],
                dots=[("eval (before, after)", [(s, _exp(v)) for s, v in evals])],
                title="perplexity", x_label="optimizer step", y_label="exp(loss), log scale")
    if any(_exp(v) is not None for _, v in points + evals):
        _plain_log_scale(perplexity)
    for ax, shown in ((loss, evals), (perplexity, [(s, _exp(v)) for s, v in evals])):
        ax.margins(y=0.12)
        for (step, value), offset, align in zip(shown, ((8, -6), (-8, -6)), ("left", "right")):
            if value is not None and math.isfinite(value):  # below the dot: right of before, left of after
                ax.annotate(f"eval {value:.3g}", (step, value), textcoords="offset points", xytext=offset,
                            ha=align, va="top", color="C1", fontsize=9,
                            bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none",
                                  "alpha": 0.85})
    return fig


def _plain_log_scale(ax) -> None:
    """A log y axis labelled 200, 300 rather than 2×10², with the in-between ticks labelled too
    when the values span less than a decade (else too many labels)."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.set_yscale("log")
    low, high = ax.get_ylim()
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain if high / max(low, 1e-12) < 10 else NullFormatter())


def _exp(loss: float | None) -> float | None:
    """Perplexity of a loss (None stays None; capped so a diverged loss does not overflow)."""
    if loss is None or not math.isfinite(loss):
        return None
    return math.exp(min(loss, 700.0))
