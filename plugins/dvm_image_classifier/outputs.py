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
    validation; `title` (above both) says what was trained. The legend is outside the charts,
    right of them (`save_png`), so it never hides the last epochs."""
    save_png(curves_figure(history, title), path)


def curves_figure(history: list[dict], title: str = "training curves"):
    """The figure `plot_curves` saves (its legend is added when saved)."""
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
    return fig


@torch.no_grad()
def confusion_matrix(state_dict: dict[str, torch.Tensor], spec: dict, mean: list[float], std: list[float],
                     images: torch.Tensor, labels: torch.Tensor, batch: int = 512) -> list[list[int]]:
    """counts[true][predicted] of the trained model on uint8 `images` (N×C×H×W), on the CPU: the
    same evaluation split the history's val_accuracy comes from, normalised as in training."""
    from .models import build_model

    model = build_model(spec)
    model.load_state_dict(state_dict, strict=True)
    model.eval()
    channels = images.shape[1]
    std_t = torch.tensor(std, dtype=torch.float32)
    scale = (1.0 / (255.0 * std_t)).view(1, channels, 1, 1)
    shift = (-torch.tensor(mean, dtype=torch.float32) / std_t).view(1, channels, 1, 1)
    n = spec["num_classes"]
    counts = torch.zeros(n, n, dtype=torch.int64)
    for start in range(0, images.shape[0], batch):
        x = images[start:start + batch].to("cpu").float().mul_(scale).add_(shift)
        predicted = model(x).argmax(1)
        truth = labels[start:start + batch].to("cpu")
        counts += torch.bincount(truth * n + predicted, minlength=n * n).view(n, n)
    return counts.tolist()


def per_class(matrix: list[list[int]], classes: list[str]) -> list[dict]:
    """Precision, recall and F1 of each class from a confusion matrix (None where undefined:
    no image of the class, or none predicted as it), with its support (true images)."""
    rows = []
    for i, name in enumerate(classes):
        true_positive = matrix[i][i]
        support = sum(matrix[i])
        predicted = sum(row[i] for row in matrix)
        precision = true_positive / predicted if predicted else None
        recall = true_positive / support if support else None
        if precision is None or recall is None:
            f1 = None
        else:
            f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        rows.append({"class": name, "precision": _round(precision), "recall": _round(recall),
                     "f1": _round(f1), "support": support})
    return rows


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def plot_confusion(matrix: list[list[int]], classes: list[str], path: Path, title: str) -> None:
    """A PNG of the confusion matrix: true class per row, predicted per column, each cell
    coloured by its share of the row (so small classes show as well as large ones) and labelled
    with its count (up to 30 classes; more would be unreadable)."""
    import numpy as np

    counts = np.asarray(matrix, dtype=np.int64)
    n = len(classes)
    shares = counts / np.maximum(1, counts.sum(axis=1, keepdims=True))
    side = int(min(1400, max(520, 90 + 38 * n)))
    fig, (ax,) = figure(title, (side + 80, side))
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    names = [c if len(c) <= 12 else c[:11] + "…" for c in classes]
    step = max(1, n // 30)
    ax.set_xticks(range(0, n, step), [names[i] for i in range(0, n, step)], rotation=45 if n > 6 else 0,
                  ha="right" if n > 6 else "center")
    ax.set_yticks(range(0, n, step), [names[i] for i in range(0, n, step)])
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if counts[i, j]:
                    ax.text(j, i, str(int(counts[i, j])), ha="center", va="center", fontsize=9 if n <= 15 else 7,
                            color="white" if shares[i, j] > 0.5 else "black")
    save_png(fig, path)
