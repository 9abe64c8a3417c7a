"""The files a job returns: the weights (safetensors), the model card (JSON), the training curves (PNG).

The model card holds everything needed to use the weights without this plugin's trainer:
the architecture spec (`models.build_model` rebuilds the network from it), the class names,
the input shape and normalisation, and how the model was trained (hyperparameters, per-epoch
losses and accuracies, seed, dataset sha256s, time, device, library versions).

The curves are drawn with matplotlib (`dvm_core.charts`), imported only when they are drawn.
"""

from __future__ import annotations

import json
import math
import platform
from pathlib import Path

import torch
from safetensors.torch import save_file

from dvm_core.charts import figure, plot_series, save_png
from dvm_core.datarefs import sha256_file

CARD_FORMAT = "dvm-image-classifier/1"


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


def plot_curves(history: list[dict], path: Path, title: str = "training curves") -> None:
    """A PNG with two charts side by side, loss and accuracy per epoch, each with training and
    validation; `title` (above both) says what was trained."""
    def series(key: str) -> list[tuple[int, float]]:
        return [(r["epoch"], r[key]) for r in history if r.get(key) is not None]

    fig, (loss, accuracy) = figure(title, (1000, 420), panels=2)
    plot_series(loss, [("train", series("train_loss")), ("validation", series("val_loss"))],
                title="loss", x_label="epoch", y_label="cross-entropy", y_range=(0.0, None))
    accuracies = [v for _, v in series("train_accuracy") + series("val_accuracy")]
    low = math.floor(min(accuracies, default=0.0) * 10) / 10
    plot_series(accuracy, [("train", series("train_accuracy")), ("validation", series("val_accuracy"))],
                title="accuracy", x_label="epoch", y_label="fraction correct",
                y_range=(max(0.0, min(low, 0.9)), 1.0))
    save_png(fig, path)
