"""Checking a request before any work or payment: the inputs, the params and the provider's limits.

`parse_request` runs on the worker's event loop, before the customer pays: it must be quick and
do no I/O. Everything that can be checked from the request alone is checked here; what needs
the data (the real number of samples, image sizes, labels) is checked in `run`, and still
raised as `JobInputError`.

The provider's limits come from the worker's configuration::

    [plugins.image-classifier]
    max_dataset_bytes = 1073741824   # the file, its unpacked contents, and the decoded images
    max_samples = 200000             # training images (the validation set may add as many)
    max_image_size = 128             # the largest side the network trains at, in pixels
    max_epochs = 200
    max_seconds = 3600               # training time a job may ask for (param time_limit)
    sats_per_million_sample_epochs = 10   # the price: samples × epochs × this / 10⁶, min 1 sat
    sats_per_check = 0               # a verify check of this plugin's transcripts: this, plus its
                                     # segment's images at the rate above (its fixed costs: the data)
    processes = 1                    # > 1: train under `accelerate launch` in that many processes
    checkpoint_retention_days = 30   # how long the blob servers keep a transcript's checkpoints
                                     # (announced, stated in each transcript; the worker deletes
                                     # them from its blob servers then: `Artifact.keep_days`)

``processes``: 1 (the default) trains in the worker's process. N > 1 runs each job's training as
``accelerate launch --num_processes N --multi_gpu -m dvm_image_classifier.launched`` in a child
process group (see `launched`): N GPUs (the worker's machine needs that many; BatchNorm becomes
SyncBatchNorm), or N CPU processes when the job's device is the CPU (DDP over gloo). The images
per step stay ``batch_size``, split across the processes; cancellation and the job's deadline
kill the processes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dvm_core import JobInputError
from dvm_core.params import choice, number, params_schema, plugin_settings, url_inputs

NAME = "image-classifier"
ARCHITECTURES = ("cnn", "resnet")  # built by models.py
OPTIMIZERS = ("adam", "adamw", "sgd")
MIN_IMAGE_SIZE = 4

# Defaults chosen so that a customer who sends only digits (8×8, 1797 images) gets ≥ 0.95
# held-out accuracy in a few seconds of CPU time.
DEFAULTS = {
    "architecture": "auto",
    "epochs": 10,
    "batch_size": 64,
    "optimizer": "adamw",
    "weight_decay": 1e-4,
    "seed": 0,
    "validation_fraction": 0.1,
    "augment": "no",
}
DEFAULT_LR = {"adam": 1e-3, "adamw": 1e-3, "sgd": 0.05}  # sgd with Nesterov momentum 0.9
MAX_BATCH_SIZE = 4096
PARAMS = {
    "architecture": "cnn (small images, up to 32 px), resnet (larger) or auto (default: by image size)",
    "epochs": f"passes over the training set (default {DEFAULTS['epochs']})",
    "batch_size": f"images per step, 2-{MAX_BATCH_SIZE} (default {DEFAULTS['batch_size']})",
    "learning_rate": "the peak learning rate, decayed by a cosine schedule "
                     "(default 0.001 for adam/adamw, 0.05 for sgd)",
    "optimizer": "adam, adamw or sgd (Nesterov momentum 0.9) (default adamw)",
    "weight_decay": f"weight decay (default {DEFAULTS['weight_decay']})",
    "seed": "random seed: the same seed and data give the same weights on the same machine (default 0)",
    "validation_fraction": "share of the training set held out for validation, 0-0.5 (default 0.1; "
                           "0 when a validation input is sent)",
    "image_size": "train at this many pixels square, resizing every image (default: the images' own size)",
    "augment": "yes: random crops (padding 1/8 of the side) and horizontal flips, for images of 16 px "
               "or more (default no)",
    "time_limit": "stop training after this many seconds and return the model as it is "
                  "(default: the provider's max_seconds)",
    "normalisation": "the input normalisation, per-channel mean and std on the 0-1 scale as "
                     "'mean1,mean2,…;std1,std2,…' (default: computed from the training images); "
                     "federated rounds send the whole dataset's, so every provider and the merged "
                     "model normalise alike",
    "checkpoint_every": "k > 0: a training transcript, signed by the provider, with a checkpoint every k "
                        "steps and at the end (returned as files: transcript.json and "
                        "checkpoint-<step>.safetensors), which a verify job (kind 5753) can replay; "
                        "0: none (default 0)",
    "samples": "not needed: the worker counts the images before it prices the job (an older way to "
               "say how many; a number above the provider's max_samples is refused at once)",
}


@dataclass(frozen=True)
class Limits:
    """What a provider allows one job (from ``[plugins.image-classifier]``)."""

    max_dataset_bytes: int = 1 << 30
    max_samples: int = 200_000
    max_image_size: int = 128
    max_epochs: int = 200
    max_seconds: float = 3600.0
    sats_per_million_sample_epochs: float = 10.0
    sats_per_check: float = 0.0
    processes: int = 1
    checkpoint_retention_days: float = 30.0

    @classmethod
    def from_config(cls, config: dict | None) -> "Limits":
        """Read the limits from the worker's whole configuration. Raises ValueError on a
        setting that is unknown or not a positive number: a typo must stop the worker at start,
        not silently leave a limit at its default."""
        return plugin_settings(cls, config, NAME, may_be_zero=("sats_per_million_sample_epochs", "sats_per_check"))


@dataclass(frozen=True)
class TrainParams:
    """The hyperparameters of one job, validated, with the defaults filled in."""

    architecture: str = DEFAULTS["architecture"]
    epochs: int = DEFAULTS["epochs"]
    batch_size: int = DEFAULTS["batch_size"]
    learning_rate: float = DEFAULT_LR[DEFAULTS["optimizer"]]
    optimizer: str = DEFAULTS["optimizer"]
    weight_decay: float = DEFAULTS["weight_decay"]
    seed: int = DEFAULTS["seed"]
    validation_fraction: float = DEFAULTS["validation_fraction"]
    image_size: int | None = None
    augment: bool = False
    time_limit: float = Limits.max_seconds
    normalisation: tuple[tuple[float, ...], tuple[float, ...]] | None = None  # (mean, std) per channel
    checkpoint_every: int = 0        # steps between the transcript's checkpoints; 0: no transcript


@dataclass(frozen=True)
class ImageClassifierJob:
    """What `parse_request` hands to `run`: the input URLs, the params and the limits."""

    dataset: str
    validation: str | None
    weights: str | None
    params: TrainParams
    declared_samples: int | None
    limits: Limits

    @property
    def priced_samples(self) -> int:
        """The number of training images the price is computed for."""
        return self.declared_samples if self.declared_samples is not None else self.limits.max_samples






def _normalisation(params: dict) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    raw = params.get("normalisation")
    if raw is None:
        return None
    parts = raw.split(";")
    try:
        if len(parts) != 2:
            raise ValueError
        mean, std = (tuple(float(v) for v in part.split(",")) for part in parts)
    except ValueError:
        raise JobInputError(f"param normalisation must be 'mean1,…;std1,…' (numbers, one per channel), "
                            f"got {raw[:60]!r}") from None
    if len(mean) != len(std) or len(mean) not in (1, 3):
        raise JobInputError("param normalisation needs as many means as stds, 1 (grey) or 3 (RGB) of each")
    if not all(math.isfinite(m) and 0 <= m <= 1 for m in mean) \
            or not all(math.isfinite(v) and 0 < v <= 1 for v in std):
        raise JobInputError("param normalisation: means must be within 0-1 and stds within (0, 1]")
    return mean, std


def parse_params(params: dict[str, str], limits: Limits, has_validation_input: bool) -> TrainParams:
    """Validate the request's params against the provider's limits and fill in the defaults.
    Raises JobInputError naming the param and the allowed range."""
    optimizer = choice(params, "optimizer", OPTIMIZERS, DEFAULTS["optimizer"])
    fraction = number(params, "validation_fraction", float, 0.0, 0.5,
                       0.0 if has_validation_input else DEFAULTS["validation_fraction"])
    if has_validation_input and fraction:
        raise JobInputError("send either a validation input or param validation_fraction, not both")
    augment = choice(params, "augment", ("yes", "no", "true", "false"), DEFAULTS["augment"])
    return TrainParams(
        architecture=choice(params, "architecture", ("auto",) + ARCHITECTURES, DEFAULTS["architecture"]),
        epochs=number(params, "epochs", int, 1, limits.max_epochs, DEFAULTS["epochs"]),
        # At least 2: BatchNorm cannot learn from a batch of one image.
        batch_size=number(params, "batch_size", int, 2, MAX_BATCH_SIZE, DEFAULTS["batch_size"]),
        learning_rate=number(params, "learning_rate", float, 1e-12, 1e9, DEFAULT_LR[optimizer]),
        optimizer=optimizer,
        weight_decay=number(params, "weight_decay", float, 0.0, 1.0, DEFAULTS["weight_decay"]),
        seed=number(params, "seed", int, 0, 2**63 - 1, DEFAULTS["seed"]),
        validation_fraction=fraction,
        image_size=number(params, "image_size", int, MIN_IMAGE_SIZE, limits.max_image_size, None),
        augment=augment in ("yes", "true"),
        time_limit=number(params, "time_limit", float, 1.0, limits.max_seconds, limits.max_seconds),
        normalisation=_normalisation(params),
        checkpoint_every=number(params, "checkpoint_every", int, 0, 2**31, 0),
    )


def parse_request(request, limits: Limits) -> ImageClassifierJob:
    """Turn a job request into an `ImageClassifierJob`, or raise JobInputError.

    Inputs are ``url`` inputs told apart by their marker (the 5th element of the ``i`` tag):
    none (or ``train``/``dataset``) for the training set, ``validation`` for a validation set,
    ``weights`` for initial weights (a safetensors file from an earlier result).
    """
    urls = url_inputs(request, ("dataset", "validation", "weights"),
                      what="the dataset, and optionally a validation set and initial weights")
    if urls["dataset"] is None:
        raise JobInputError("send the training set as an input of type 'url': an .npz file with arrays "
                            "x (uint8 images) and y (integer labels), or a zip/tar of one folder per class")
    params = parse_params(request.params, limits, has_validation_input=urls["validation"] is not None)
    declared = number(request.params, "samples", int, 1, 2**62, None)
    if declared is not None and declared > limits.max_samples:
        raise JobInputError(f"this provider trains on at most {limits.max_samples} images per job "
                            f"(param samples is {declared})")
    return ImageClassifierJob(
        dataset=urls["dataset"],
        validation=urls["validation"],
        weights=urls["weights"],
        params=params, declared_samples=declared, limits=limits)


def price(job: ImageClassifierJob, limits: Limits) -> int:
    """The job's price in sats: samples × epochs × the provider's rate per million
    sample-epochs, rounded up, at least 1 sat (0 when the provider's rate is 0: free)."""
    rate = limits.sats_per_million_sample_epochs
    if rate <= 0:
        return 0
    work = job.priced_samples * job.params.epochs
    return max(1, math.ceil(work * rate / 1e6))


def schema(limits: Limits) -> dict:
    """The params' JSON Schema (for the announcement), from the reading `parse_request` does."""
    def read(params):
        parse_params(params, limits, has_validation_input=False)
        number(params, "samples", int, 1, limits.max_samples, None)
    return params_schema(read, PARAMS)
