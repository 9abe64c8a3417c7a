"""Checking a merge request before any work or payment: inputs, params, the provider's limits.

`parse_request` runs on the worker's event loop before the customer pays: quick, no I/O. What
needs the files (architectures, NaN, base hashes) is checked by `merge.merge_files` in `run`.

The provider's settings::

    [plugins.fedavg]
    max_inputs = 64                  # update files per job (the base not counted)
    max_input_bytes = 4294967296     # per file, updates and base alike
    sats_per_gb = 1                  # the price: files × model_bytes / 10⁹ × this, min 1 sat
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from dvm_core import JobInputError
from dvm_core.params import choice, flag, number, params_schema, plugin_settings
from dvm_core.datarefs import parse_data_ref

from .checks import METHODS, MergeError, check_method, check_weights

NAME = "fedavg"
PARAMS = {
    "method": f"{', '.join(METHODS)} (default fedavg)",
    "weights": "comma-separated number of training examples of each update, in input order "
               "(alternative to the marker update:<n>; default: all equal)",
    "trim_ratio": "trimmed_mean: share of values dropped at each end per coordinate, 0-0.5 (default 0.1; "
                  "must drop at least one)",
    "f": "krum/multi_krum: number of faulty updates tolerated; needs more than 2f+2 updates (default 1)",
    "m": "multi_krum: updates kept and averaged (default: updates − f)",
    "clip_norm": "scale each update (model − base) to at most this L2 norm before merging (needs a base input)",
    "distances": "yes: fedavg also reports each update's distance to the merged model (a second read of "
                 "every update; the robust methods always report it) (default no)",
    "base_sha256": "the sha256 the base model must have; updates whose safetensors metadata names a "
                   "base_sha256 must name this one",
    "model_bytes": "size of one model file in bytes, for the price (default: the provider's max_input_bytes); "
                   "a larger file is refused",
}
_UPDATE_MARKER = re.compile(r"^(?:update)?(?::\s*(.+))?$")


@dataclass(frozen=True)
class Limits:
    """What a provider allows one job (from ``[plugins.fedavg]``)."""

    max_inputs: int = 64
    max_input_bytes: int = 4 << 30
    sats_per_gb: float = 1.0

    @classmethod
    def from_config(cls, config: dict | None) -> "Limits":
        """The limits from the worker's whole config. ValueError on an unknown or bad setting."""
        return plugin_settings(cls, config, NAME, may_be_zero=("sats_per_gb",))


@dataclass(frozen=True)
class MergeJob:
    """What `parse_request` hands to `run`."""

    updates: tuple[str, ...]          # URLs, in order
    weights: tuple[float, ...]
    base: str | None
    adapter_config: str | None
    method: str
    trim_ratio: float
    f: int
    m: int | None
    clip_norm: float | None
    base_sha256: str | None
    model_bytes: int | None           # as declared by the customer
    limits: Limits
    distances: bool = False

    @property
    def priced_bytes(self) -> int:
        """The work, in bytes: every file read once, and for krum/multi_krum one model size
        more per pair of updates (their pairwise distances: quadratic in the updates)."""
        files = len(self.updates) + (self.base is not None)
        if self.method in ("krum", "multi_krum"):
            files += len(self.updates) * (len(self.updates) - 1) // 2
        return files * (self.model_bytes if self.model_bytes is not None else self.limits.max_input_bytes)




def _public(url: str) -> str:
    """The URL without its fragment (which may hold a decryption key): safe in messages."""
    try:
        return parse_data_ref(url).url
    except ValueError:
        return url.split("#", 1)[0][:120]


def parse_request(request, limits: Limits) -> MergeJob:
    """Turn a request into a `MergeJob`, or raise JobInputError.

    Inputs are ``url`` inputs (each with its sha256, see `dvm_core.datarefs`), told apart by the
    ``i`` tag's marker: ``update`` or none (an update of weight 1, or its weight from param
    ``weights``), ``update:<n>`` (an update trained on n examples), ``base`` (the global model
    the updates were trained from, at most one), ``adapter_config`` (for LoRA adapters: their
    ``adapter_config.json``, returned with r and lora_alpha updated).
    """
    updates: list[str] = []
    marked: list[float | None] = []
    base = adapter_config = None
    for item in request.inputs:
        if item.type != "url":
            raise JobInputError(f"this job takes only inputs of type 'url' (got one of type {item.type!r}): "
                                "the model files, each with its sha256")
        marker = (item.marker or "").strip()
        lowered = marker.lower()
        if lowered in ("base", "adapter_config"):
            if (base if lowered == "base" else adapter_config) is not None:
                raise JobInputError(f"send at most one input marked {lowered!r}")
            if lowered == "base":
                base = item.data
            else:
                adapter_config = item.data
            continue
        match = _UPDATE_MARKER.match(lowered)
        if not match:
            raise JobInputError(f"update {len(updates)} ({_public(item.data)}): unknown input marker "
                                f"{marker[:40]!r}; use update, update:<examples>, base or adapter_config")
        weight = None
        if match.group(1) is not None:
            try:
                weight = float(match.group(1))
            except ValueError:
                weight = float("nan")
            if not math.isfinite(weight) or weight <= 0:
                raise JobInputError(f"update {len(updates)} ({_public(item.data)}): its marker {marker[:40]!r} "
                                    "must give a positive number of training examples, e.g. update:1438")
        updates.append(item.data)
        marked.append(weight)
    if not updates:
        raise JobInputError("send the models to merge as url inputs marked update:<training examples>")
    if len(updates) > limits.max_inputs:
        raise JobInputError(f"this provider merges at most {limits.max_inputs} updates per job (got {len(updates)})")
    names = [_public(u) for u in updates]

    params = request.params
    if params.get("weights") is not None:
        if any(w is not None for w in marked):
            raise JobInputError("give the weights either in the markers (update:<n>) or in param weights, not both")
        parts = [p for p in params["weights"].replace(";", ",").split(",") if p.strip()]
        if len(parts) != len(updates):
            raise JobInputError(f"param weights has {len(parts)} values for {len(updates)} updates: "
                                "one per update, in input order")
        raw_weights = [p.strip() for p in parts]
    else:
        raw_weights = [1.0 if w is None else w for w in marked]
    try:
        weights = check_weights(raw_weights, names)
    except MergeError as exc:
        raise JobInputError(str(exc).replace("input ", "update ", 1)) from None

    method = (params.get("method") or "fedavg").strip().lower()
    trim_ratio = number(params, "trim_ratio", float, 0.0, 0.4999, 0.1)
    f = number(params, "f", int, 0, 10_000, 1)
    m = number(params, "m", int, 1, 10_000, None)
    clip_norm = number(params, "clip_norm", float, 1e-30, 1e30, None)
    if m is not None and method != "multi_krum":
        raise JobInputError("param m applies to method multi_krum only")
    try:
        check_method(method, len(updates), trim_ratio, f, m)
    except MergeError as exc:
        raise JobInputError(str(exc)) from None
    if clip_norm is not None and base is None:
        raise JobInputError("param clip_norm clips each update against the base model: send an input marked base")
    base_sha256 = params.get("base_sha256")
    if base_sha256 is not None:
        base_sha256 = base_sha256.strip().lower()
        if not re.fullmatch(r"[0-9a-f]{64}", base_sha256):
            raise JobInputError("param base_sha256 must be 64 hex digits")
        if base is not None:
            try:
                ref = parse_data_ref(base)
            except ValueError as exc:
                raise JobInputError(f"the base input: {exc}") from None
            if ref.key is None and ref.sha256 != base_sha256:
                raise JobInputError(f"the base input ({ref.url}) has sha256 {ref.sha256}, not param "
                                    f"base_sha256 {base_sha256}")
    distances = flag(params, "distances", "no")
    model_bytes = number(params, "model_bytes", int, 1, 2**62, None)
    if model_bytes is not None and model_bytes > limits.max_input_bytes:
        raise JobInputError(f"this provider merges files of at most {limits.max_input_bytes} bytes "
                            f"(param model_bytes is {model_bytes})")
    return MergeJob(updates=tuple(updates), weights=tuple(weights), base=base, adapter_config=adapter_config,
                    method=method, trim_ratio=trim_ratio, f=f, m=m, clip_norm=clip_norm,
                    base_sha256=base_sha256, model_bytes=model_bytes, limits=limits,
                    distances=distances)


def price(job: MergeJob, limits: Limits) -> int:
    """Sats: the bytes merged (files × model size) in GB × the provider's rate, rounded up,
    at least 1 (0 when the rate is 0: free)."""
    if limits.sats_per_gb <= 0:
        return 0
    return max(1, math.ceil(job.priced_bytes / 1e9 * limits.sats_per_gb))


def schema(limits: Limits) -> dict:
    """The params' JSON Schema (for the announcement): the ranges `parse_request` checks
    (tests/test_param_schemas.py holds the two to agreement)."""
    def read(params):
        choice(params, "method", METHODS, "fedavg")
        number(params, "trim_ratio", float, 0.0, 0.4999, 0.1)
        number(params, "f", int, 0, 10_000, 1)
        number(params, "m", int, 1, 10_000, None)
        number(params, "clip_norm", float, 1e-30, 1e30, None)
        flag(params, "distances", "no")
        number(params, "model_bytes", int, 1, limits.max_input_bytes, None)
    return params_schema(read, PARAMS)
