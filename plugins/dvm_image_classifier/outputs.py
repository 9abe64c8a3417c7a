"""The files a job returns: the weights (safetensors), the model card (JSON), the training curves (PNG).

The model card holds everything needed to use the weights without this plugin's trainer:
the architecture spec (`models.build_model` rebuilds the network from it), the class names,
the input shape and normalisation, and how the model was trained (hyperparameters, per-epoch
losses and accuracies, seed, dataset sha256s, time, device, library versions).

The curves are drawn with Pillow (matplotlib is not a dependency of the worker).
"""

from __future__ import annotations

import json
import math
import platform
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from safetensors.torch import save_file

from dvm_core.datarefs import sha256_file

CARD_FORMAT = "dvm-image-classifier/1"
TRAIN_COLOUR = (31, 119, 180)
VAL_COLOUR = (255, 127, 14)


def save_weights(state_dict: dict[str, torch.Tensor], path: Path, spec: dict) -> None:
    """Write the weights as safetensors, with the architecture spec in the file's metadata.

    Nothing time- or machine-dependent goes in, so the same weights give the same bytes. The
    metadata is a single key on purpose: safetensors writes its metadata map in hash order,
    which changes from one process to the next when there are several keys."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    info = json.dumps({"card_format": CARD_FORMAT, "architecture": spec}, sort_keys=True, separators=(",", ":"))
    save_file(tensors, str(path), metadata={"dvm_image_classifier": info})


def model_card(*, spec: dict, classes: list[str], mean: list[float], std: list[float], params, outcome,
               datasets: dict, initial_weights_sha256: str | None, weights_file: Path) -> dict:
    """The model card of a finished job (see the module docstring), as a JSON-able dict.

    :param params: the job's `TrainParams`; :param outcome: `train.TrainOutcome`;
    :param datasets: sha256, format and size of the training (and validation) data."""
    last = outcome.history[-1] if outcome.history else {}
    height, width = spec["image_size"]
    return {
        "format": CARD_FORMAT,
        "task": "image-classification",
        "architecture": spec,
        "classes": classes,
        "input": {"height": height, "width": width, "channels": spec["in_channels"], "layout": "NCHW",
                  "pixels": "uint8 0-255, divided by 255, then (x - mean) / std per channel",
                  "resize": "bilinear with antialiasing (torch.nn.functional.interpolate)",
                  "mean": mean, "std": std},
        "hyperparameters": {
            "architecture": params.architecture, "epochs": params.epochs, "batch_size": params.batch_size,
            "learning_rate": params.learning_rate, "lr_schedule": "cosine decay to 0, per step",
            "optimizer": params.optimizer, "momentum": 0.9 if params.optimizer == "sgd" else None,
            "weight_decay": params.weight_decay,
            "weight_decay_on": "conv and linear weights (not biases, not BatchNorm)",
            "validation_fraction": params.validation_fraction, "image_size": params.image_size,
            "augment": params.augment, "time_limit": params.time_limit, "loss": "cross-entropy",
        },
        "seed": params.seed,
        "metrics": {key: last.get(key) for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy")},
        "history": outcome.history,
        "datasets": datasets,
        "initial_weights_sha256": initial_weights_sha256,
        "training": {"seconds": round(outcome.train_seconds, 3), "samples_per_s": round(outcome.samples_per_s, 1),
                     "epochs_completed": sum(1 for r in outcome.history if r["complete"]),
                     "stopped_early": outcome.stopped, "device": outcome.device,
                     "mixed_precision": outcome.mixed_precision, "threads": outcome.threads},
        "versions": environment(),
        "weights": {"file": weights_file.name, "sha256": sha256_file(weights_file)},
    }


def write_card(path: Path, card: dict) -> None:
    """Write the model card as indented JSON (UTF-8)."""
    path.write_text(json.dumps(card, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def environment() -> dict:
    """Versions that matter to reproduce a run."""
    import accelerate
    import numpy
    import safetensors
    return {"torch": torch.__version__, "accelerate": accelerate.__version__, "numpy": numpy.__version__,
            "safetensors": safetensors.__version__, "python": platform.python_version()}


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: the small bitmap font
        return ImageFont.load_default()


def _nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About `count` round tick values covering [low, high]."""
    if high <= low:
        high = low + 1.0
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.floor(low / step) * step
    ticks = []
    value = first
    while value <= high + step * 1e-9:
        ticks.append(round(value, 10))
        value += step
    return ticks


def _panel(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], title: str,
           series: list[tuple[str, tuple[int, int, int], list[tuple[int, float]]]],
           y_range: tuple[float, float] | None, font, small, legend_bottom: bool = False,
           x_label: str = "epoch") -> None:
    """One line chart in `box` (left, top, right, bottom): axes, ticks, lines, and the legend
    in the top right corner (bottom right with `legend_bottom`, where rising curves are not)."""
    left, top, right, bottom = box
    plot_l, plot_t, plot_r, plot_b = left + 60, top + 30, right - 15, bottom - 40
    points = [p for _, _, pts in series for p in pts if p[1] is not None and math.isfinite(p[1])]
    draw.text(((left + right) // 2, top + 5), title, fill="black", font=font, anchor="mt")
    if not points:
        draw.text(((left + right) // 2, (top + bottom) // 2), "no data", fill="gray", font=font, anchor="mm")
        return
    x_max = max(1, max(p[0] for p in points))
    if y_range is None:
        y_low, y_high = 0.0, max(p[1] for p in points) * 1.05 or 1.0
    else:
        y_low, y_high = y_range
    y_ticks = [t for t in _nice_ticks(y_low, y_high) if y_low - 1e-9 <= t <= y_high + 1e-9]
    y_low, y_high = min(y_low, y_ticks[0]), max(y_high, y_ticks[-1])

    def px(x: float, y: float) -> tuple[float, float]:
        fx = (x - 1) / (x_max - 1) if x_max > 1 else 0.5
        fy = (y - y_low) / (y_high - y_low) if y_high > y_low else 0.5
        return plot_l + fx * (plot_r - plot_l), plot_b - fy * (plot_b - plot_t)

    for t in y_ticks:
        _, y = px(1, t)
        draw.line([(plot_l, y), (plot_r, y)], fill=(230, 230, 230))
        draw.text((plot_l - 6, y), f"{t:g}", fill="black", font=small, anchor="rm")
    x_step = max(1, math.ceil(x_max / 10))
    for e in range(1, x_max + 1, x_step):
        x, _ = px(e, y_low)
        draw.line([(x, plot_b), (x, plot_b + 4)], fill="black")
        draw.text((x, plot_b + 6), str(e), fill="black", font=small, anchor="mt")
    draw.text(((plot_l + plot_r) // 2, bottom - 4), x_label, fill="black", font=small, anchor="mb")
    draw.rectangle([plot_l, plot_t, plot_r, plot_b], outline="black")
    drawn = []
    for name, colour, pts in series:
        pts = [px(x, y) for x, y in pts if y is not None and math.isfinite(y)]
        if not pts:
            continue
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=2)
        for x, y in pts:
            draw.ellipse([x - 2.5, y - 2.5, x + 2.5, y + 2.5], fill=colour)
        drawn.append((name, colour))
    if drawn:
        legend_h = 18 * len(drawn) + 6
        legend_t = plot_b - 8 - legend_h if legend_bottom else plot_t + 8
        draw.rectangle([plot_r - 110, legend_t, plot_r - 8, legend_t + legend_h], fill="white", outline=(180, 180, 180))
        for i, (name, colour) in enumerate(drawn):
            y = legend_t + 5 + 18 * i
            draw.line([(plot_r - 102, y + 7), (plot_r - 82, y + 7)], fill=colour, width=3)
            draw.text((plot_r - 77, y), name, fill="black", font=small)


def plot_curves(history: list[dict], path: Path) -> None:
    """A PNG with two charts: loss and accuracy per epoch, training and validation."""
    width, height = 1000, 420
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font, small = _font(16), _font(12)

    def series(key: str) -> list[tuple[int, float]]:
        return [(r["epoch"], r[key]) for r in history if r.get(key) is not None]

    _panel(draw, (0, 0, width // 2, height), "loss",
           [("train", TRAIN_COLOUR, series("train_loss")), ("validation", VAL_COLOUR, series("val_loss"))],
           None, font, small)
    accuracies = [v for _, v in series("train_accuracy") + series("val_accuracy")]
    low = math.floor(min(accuracies, default=0.0) * 10) / 10
    _panel(draw, (width // 2, 0, width, height), "accuracy",
           [("train", TRAIN_COLOUR, series("train_accuracy")),
            ("validation", VAL_COLOUR, series("val_accuracy"))],
           (max(0.0, min(low, 0.9)), 1.0), font, small, legend_bottom=True)
    image.save(path, format="PNG", optimize=True)


def plot_lines(path: Path, title: str, series: list[tuple[str, list[tuple[int, float]]]], *,
               x_label: str = "epoch", y_range: tuple[float, float] | None = None) -> None:
    """A PNG with one line chart: each series is (name, [(x ≥ 1, y), …]); e.g. the accuracy of
    a federated model per round."""
    colours = [TRAIN_COLOUR, VAL_COLOUR, (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
    image = Image.new("RGB", (640, 420), "white")
    draw = ImageDraw.Draw(image)
    _panel(draw, (0, 0, 640, 420), title,
           [(name, colours[i % len(colours)], points) for i, (name, points) in enumerate(series)],
           y_range, _font(16), _font(12), legend_bottom=True, x_label=x_label)
    image.save(path, format="PNG", optimize=True)
