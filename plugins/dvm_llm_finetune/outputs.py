"""The files a job returns besides the weights: the model card (JSON) and the loss curve (PNG).

The curve is drawn with Pillow (matplotlib is not a dependency of the worker).
"""

from __future__ import annotations

import json
import math
import platform
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

CARD_FORMAT = "dvm-llm-finetune/1"
TRAIN_COLOUR = (31, 119, 180)
EVAL_COLOUR = (255, 127, 14)


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
                     "mixed_precision": outcome.mixed_precision, "processes": outcome.processes,
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


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: the small bitmap font
        return ImageFont.load_default()


def _nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    if high <= low:
        high = low + 1.0
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    value = math.floor(low / step) * step
    ticks = []
    while value <= high + step * 1e-9:
        ticks.append(round(value, 10))
        value += step
    return ticks


def plot_loss(history: list[dict], before: dict, after: dict, path: Path) -> None:
    """Training loss per step (blue line), and the evaluation loss before and after training
    (orange dots at step 0 and the last step)."""
    width, height = 800, 450
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font, small = _font(16), _font(12)
    left, top, right, bottom = 70, 40, width - 20, height - 50
    draw.text((width // 2, 10), "loss", fill="black", font=font, anchor="mt")
    points = [(r["step"], r["loss"]) for r in history if math.isfinite(r["loss"])]
    last_step = max([p[0] for p in points], default=1)
    evals = [(0, before.get("eval_loss")), (last_step, after.get("eval_loss"))]
    evals = [(s, v) for s, v in evals if v is not None and math.isfinite(v)]
    values = [v for _, v in points + evals]
    if not values:
        draw.text((width // 2, height // 2), "no data", fill="gray", font=font, anchor="mm")
        image.save(path, format="PNG", optimize=True)
        return
    low, high = min(values), max(values)
    pad = (high - low) * 0.05 or 0.5
    ticks = _nice_ticks(max(0.0, low - pad), high + pad)
    y_low, y_high = ticks[0], ticks[-1]

    def px(step: float, value: float) -> tuple[float, float]:
        fx = step / last_step if last_step else 0.5
        fy = (value - y_low) / (y_high - y_low) if y_high > y_low else 0.5
        return left + fx * (right - left), bottom - fy * (bottom - top)

    for t in ticks:
        _, y = px(0, t)
        draw.line([(left, y), (right, y)], fill=(230, 230, 230))
        draw.text((left - 6, y), f"{t:g}", fill="black", font=small, anchor="rm")
    for s in _nice_ticks(0, last_step, 8):
        if 0 <= s <= last_step:
            x, _ = px(s, y_low)
            draw.line([(x, bottom), (x, bottom + 4)], fill="black")
            draw.text((x, bottom + 6), f"{s:g}", fill="black", font=small, anchor="mt")
    draw.text(((left + right) // 2, height - 8), "optimizer step", fill="black", font=small, anchor="mb")
    draw.rectangle([left, top, right, bottom], outline="black")
    line = [px(s, v) for s, v in points]
    if len(line) > 1:
        draw.line(line, fill=TRAIN_COLOUR, width=2)
    for x, y in line if len(line) <= 60 else []:
        draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=TRAIN_COLOUR)
    for s, v in evals:
        x, y = px(s, v)
        draw.ellipse([x - 5, y - 5, x + 5, y + 5], fill=EVAL_COLOUR)
    legend = [("train", TRAIN_COLOUR)] + ([("eval", EVAL_COLOUR)] if evals else [])
    draw.rectangle([right - 110, top + 8, right - 8, top + 14 + 18 * len(legend)], fill="white",
                   outline=(180, 180, 180))
    for i, (name, colour) in enumerate(legend):
        y = top + 13 + 18 * i
        draw.line([(right - 102, y + 7), (right - 82, y + 7)], fill=colour, width=3)
        draw.text((right - 77, y), name, fill="black", font=small)
    image.save(path, format="PNG", optimize=True)
