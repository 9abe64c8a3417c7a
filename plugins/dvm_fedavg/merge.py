"""Merging models from federated clients, streamed: FedAvg and robust aggregators.

`merge_files` reads N safetensors files (and optionally the base model they were trained from)
and writes the merged ``model.safetensors`` atomically; it never holds N models. It checks the
inputs (this module), then hands them to one of two engines:

- FedAvg (`fedavg`) maps one input at a time and adds it into one accumulator that holds the
  model's floating-point values (in float32, or float64 for F64 models), with BLAS axpy, giving
  the input's pages back as it goes: memory is that accumulator, whatever N.
- The robust methods (`robust`) walk the tensors in chunks on `chunked._ChunkReader`: the same
  chunk (`CHUNK_ELEMENTS` values; `robust.ROBUST_CHUNK_ELEMENTS` in the median's and trimmed
  mean's merging pass) of every input and of the base is read with ``pread`` (no mmap, so the
  page cache never counts against the process) while a thread reads the next: memory is a few
  megabytes per input, whatever the model's size. Distances to the merged model and to the base
  are measured in the merging pass, from the chunks already in cache. LoRA adapters (`lora`)
  are small: each factor is read whole, every input's at once.

Both parse and write the files with `safetensors_io`; `report.build_report` reports for both.

Methods (`METHODS`):

- ``fedavg``: the weighted mean Σ wᵢxᵢ / Σ wᵢ (McMahan et al. 2017); wᵢ = the input's number
  of training examples. One read of each input (see `fedavg` for what a base and `distances` add).
- ``median``: the coordinate-wise median (the mean of the two middle values for even N), and
- ``trimmed_mean``: per coordinate, drop the ⌊trim_ratio·N⌋ largest and smallest values and
  average the rest (Yin et al. 2018). Both are unweighted, as published: a weight cannot buy a
  client more say against a coordinate-wise robust rule. One pass.
- ``krum`` / ``multi_krum``: score each input by the sum of its squared distances to its
  N − f − 2 nearest neighbours, keep the m lowest (m = 1 for krum, default N − f for
  multi_krum) and take their weighted mean (Blanchard et al. 2017). Needs N > 2f + 2. Two
  passes: pairwise distances accumulated chunk by chunk, then the mean of the kept inputs.
- ``clip_norm`` (any method; needs a base): each update uᵢ = xᵢ − base is scaled to an L2 norm of
  at most clip_norm (over all floating-point tensors) before merging. FedAvg measures each
  norm just before adding that input; the robust methods make one extra pass for the norms.

Tensors that are not floating point (e.g. BatchNorm's ``num_batches_tracked``) are copied from
the base if given, else from input 0.

LoRA adapters (PEFT safetensors whose keys hold ``lora_A``/``lora_B``): averaging A and B
separately is wrong, so `fedavg` stacks them exactly (FLoRA; see `lora`): the adapter's rank
becomes r·N, and `stacked_adapter_config` rewrites its ``adapter_config.json`` to match. The
robust methods, `clip_norm` and a base are refused for adapters (MergeError): they are not
defined on factor pairs.

Validation, each failure a `MergeError` naming the input (index and name): unreadable or invalid
safetensors, different tensor names, shapes or dtypes (inputs and base), NaN or Inf anywhere, a
weight that is not a positive finite number, too few inputs for the method, and a base mismatch:
an update whose safetensors metadata names ``base_sha256`` must name the base's sha256 (given as
`base_sha256`, else computed from the `base` file), and updates naming a base must agree. The
robust methods exist to merge around bad inputs: there an input at fault is left out, with its
reason in the report's ``excluded``, as long as enough remain; FedAvg refuses the whole merge.

No pickle is ever loaded: the safetensors header is JSON, the data raw little-endian arrays.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from dvm_core.datarefs import sha256_file

from .checks import METHODS, MergeError, check_method, check_weights
from .fedavg import merge_fedavg
from .lora import _check_lora_request, _lora_pairs, is_lora_key, merge_lora, stacked_adapter_config
from .report import MergeReport, build_report, method_params
from .robust import merge_robust
from .safetensors_io import BASE_HASH_KEY, CHUNK_ELEMENTS, _File, read_header

__all__ = ["METHODS", "MergeError", "MergeReport", "merge_files", "stacked_adapter_config",
           "is_lora_key", "read_header", "CHUNK_ELEMENTS"]

LEAVE_OUT_METHODS = ("median", "trimmed_mean", "krum", "multi_krum")   # merge around a bad input


# --- checks before any data is read ---------------------------------------------------------------

def _check_same_architecture(files: list[_File], base: _File | None) -> None:
    ref = files[0]
    for other in ([base] if base else []) + files[1:]:
        missing = sorted(set(ref.tensors) - set(other.tensors))
        extra = sorted(set(other.tensors) - set(ref.tensors))
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"lacks {len(missing)} tensor(s) of {ref.what} ({', '.join(missing[:3])}"
                             f"{', …' if len(missing) > 3 else ''})")
            if extra:
                parts.append(f"has {len(extra)} tensor(s) {ref.what} lacks ({', '.join(extra[:3])}"
                             f"{', …' if len(extra) > 3 else ''})")
            raise MergeError(f"{other.what} is not the same architecture: it {' and '.join(parts)}", other.index)
        for key, t in ref.tensors.items():
            o = other.tensors[key]
            if o.shape != t.shape:
                raise MergeError(f"{other.what}: tensor {key!r} has shape {list(o.shape)} but {ref.what} "
                                 f"has {list(t.shape)} (not the same architecture)", other.index)
            if o.dtype != t.dtype:
                raise MergeError(f"{other.what}: tensor {key!r} is {o.dtype} but in {ref.what} it is "
                                 f"{t.dtype}; send every model in the same dtype", other.index)


def _check_base_hash(files: list[_File], base: _File | None, base_sha256: str | None) -> str | None:
    named = [(f, f.metadata[BASE_HASH_KEY].strip().lower()) for f in files if f.metadata.get(BASE_HASH_KEY)]
    expected = base_sha256.strip().lower() if base_sha256 else None
    if base is not None and (named or expected):
        actual = sha256_file(base.path)
        if expected and actual != expected:
            raise MergeError(f"{base.what} has sha256 {actual}, not the expected base {expected}")
        expected = actual
    for f, h in named:
        if expected is None:
            expected = h   # no base given: the updates must at least agree with each other
        elif h != expected:
            raise MergeError(f"{f.what} was trained from base {h[:16]}…, not from {expected[:16]}… "
                             f"(its metadata {BASE_HASH_KEY})", f.index)
    return expected


# --- the entry point -------------------------------------------------------------------------------

def merge_files(paths: Sequence[Path], weights: Sequence[float], out: Path, *, method: str = "fedavg",
                base: Path | None = None, trim_ratio: float = 0.1, f: int = 1, m: int | None = None,
                clip_norm: float | None = None, names: Sequence[str] | None = None,
                base_sha256: str | None = None,
                progress: Callable[[float, str], None] | None = None,
                check_cancelled: Callable[[], None] | None = None,
                distances: bool = False) -> MergeReport:
    """Merge the safetensors models at `paths` into `out` (written atomically) and report.

    FedAvg (not of LoRA adapters) reads one input at a time, memory-mapped, into one
    preallocated accumulator (`fedavg.merge_fedavg`): each input is read once, or twice with a
    base (its update norm first, for the report and `clip_norm`). The robust methods and the
    stacking of LoRA adapters read a chunk of every input at a time (`robust.merge_robust`,
    `lora.merge_lora`). The inputs are checked here first; one report is built for all
    (`report.build_report`).

    :param weights: one per input, in order: its number of training examples (> 0). FedAvg and
        (multi-)Krum's mean use them; median and trimmed_mean are unweighted.
    :param method: one of `METHODS`.
    :param base: the global model the inputs were trained from: needed by `clip_norm`; gives
        update norms in the report; its non-float tensors are the ones copied.
    :param trim_ratio: trimmed_mean drops ⌊trim_ratio·N⌋ values at each end (0 ≤ r < 0.5, ≥ 1 value).
    :param f: Krum's number of Byzantine inputs tolerated (N > 2f + 2).
    :param m: inputs multi_krum keeps (default N − f).
    :param clip_norm: scale each update xᵢ − base to an L2 norm of at most this (needs `base`).
    :param names: labels of the inputs for messages and the report (default: the file names).
    :param base_sha256: the expected base hash: the base file must have it (if given), and an
        update whose metadata names ``base_sha256`` must name it.
    :param progress: called with (fraction 0-1, message) as the merge goes.
    :param check_cancelled: called between chunks; raise from it to stop (nothing is written).
    :param distances: FedAvg: also report each input's distance to the merged model, at the
        cost of one more read of every input (its update norm, with a base, is measured
        anyway). The coordinate-wise methods and Krum always report them: they cost nothing
        there. LoRA stacking never does (factors of different adapters are not comparable).
    :raises MergeError: naming the input at fault (`.index`; None for the base, the parameters
        or the whole set); nothing is written to `out`. The robust methods leave an input at
        fault out instead, and raise only when too few remain or the fault is not an input's.
    """
    # NaN/Inf are found and refused after the pass, naming the input: no numpy warnings meanwhile.
    with np.errstate(invalid="ignore", over="ignore"):
        if method not in LEAVE_OUT_METHODS:
            return _merge(paths, weights, out, method=method, base=base, trim_ratio=trim_ratio, f=f, m=m,
                          clip_norm=clip_norm, names=names, base_sha256=base_sha256, progress=progress,
                          check_cancelled=check_cancelled, distances=distances)
        # The robust methods exist to merge around bad inputs: one that cannot be read (NaN, a
        # wrong shape, not safetensors) is left out with its reason, as long as enough remain.
        paths = [Path(p) for p in paths]
        labels = [str(x) for x in names] if names is not None else [p.name for p in paths]
        if len(labels) == len(paths) == len(weights):
            check_weights(weights, labels)   # the customer's weights are not an input's fault
        keep, left_out = list(range(len(paths))), []
        while True:
            try:
                report = _merge([paths[i] for i in keep], [weights[i] for i in keep], out, method=method,
                                base=base, trim_ratio=trim_ratio, f=f, m=m, clip_norm=clip_norm,
                                names=[labels[i] for i in keep], base_sha256=base_sha256, progress=progress,
                                check_cancelled=check_cancelled, distances=distances)
            except MergeError as exc:
                if exc.index is None:   # the set, the base or the params: nothing to leave out
                    if left_out:
                        raise MergeError(f"{exc} (after leaving out "
                                         + "; ".join(f"{e['name']}: {e['reason']}" for e in left_out) + ")") from None
                    raise
                original = keep.pop(exc.index)
                left_out.append({"index": original, "name": labels[original], "reason": f"left out: {exc}"})
                continue
            for entry in report.inputs + report.excluded:
                if entry.get("index") is not None:
                    entry["index"] = keep[entry["index"]]
            report.excluded = left_out + report.excluded
            return report


def _merge(paths, weights, out, *, method, base, trim_ratio, f, m, clip_norm, names, base_sha256,
           progress, check_cancelled, distances) -> MergeReport:
    started = time.monotonic()
    paths = [Path(p) for p in paths]
    n = len(paths)
    if n == 0:
        raise MergeError("no inputs to merge")
    labels = [str(x) for x in names] if names is not None else [p.name for p in paths]
    if len(labels) != n:
        raise MergeError(f"{len(labels)} names for {n} inputs")
    if len(weights) != n:
        raise MergeError(f"{len(weights)} weights for {n} inputs: give one weight per input")
    weights = check_weights(weights, labels)
    k, keep = check_method(method, n, trim_ratio, f, m)
    if clip_norm is not None:
        if not (isinstance(clip_norm, (int, float)) and math.isfinite(clip_norm) and clip_norm > 0):
            raise MergeError(f"clip_norm must be a positive number, got {clip_norm!r}")
        if base is None:
            raise MergeError("clip_norm clips each update against the base model: send the base too")
    files = [_File(p, labels[i], i) for i, p in enumerate(paths)]
    base_file = _File(Path(base), Path(base).name, None) if base is not None else None
    _check_same_architecture(files, base_file)
    pairs = _lora_pairs(files)
    if pairs:
        _check_lora_request(method, base_file, clip_norm)
    expected_base = _check_base_hash(files, base_file, base_sha256)
    progress = progress or (lambda fraction, message: None)
    check = check_cancelled or (lambda: None)
    out = Path(out)
    if pairs:
        measures = merge_lora(files, weights, pairs, out, progress=progress, check=check)
    elif method == "fedavg":
        measures = merge_fedavg(files, base_file, weights, out, clip_norm=clip_norm, distances=distances,
                                progress=progress, check=check)
    else:
        measures = merge_robust(files, base_file, weights, out, method=method, k=k, f=f, keep=keep,
                                clip_norm=clip_norm, progress=progress, check=check)
    return build_report(method, files, base_file, expected_base, weights,
                        method_params(method, trim_ratio, k, f, keep, clip_norm), measures, out, started)
