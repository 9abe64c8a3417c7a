"""The merge report (``merge_report.json``), built in one place for every engine.

An engine returns its `Measures` (squared distances, shares, what it left out); `build_report`
adds what the files and the request say and turns squares into norms, so that FedAvg, the
robust methods and LoRA stacking report the same fields the same way.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .safetensors_io import _FLOATS, _File


@dataclass
class MergeReport:
    """What a merge did, for ``merge_report.json``.

    `inputs`: one dict per input, in order: index, name, weight (as given), weight_used (its
    share of the merged model; None for the unweighted coordinate-wise methods), update_norm
    (‖xᵢ − base‖, with a base), clip_scale (with clip_norm), distance_to_merged (‖xᵢ − merged‖;
    FedAvg only with `distances`, LoRA stacking never), and per method krum_score / selected, or
    trimmed_fraction / median_fraction (share of coordinates where the input was trimmed /
    supplied the median). `excluded`: index, name, reason.
    """

    method: str
    inputs: list[dict]
    excluded: list[dict]
    params: dict = field(default_factory=dict)
    base: dict | None = None
    merged_distance_to_base: float | None = None
    tensors: int = 0
    parameters: int = 0
    copied_tensors: list[str] = field(default_factory=list)
    lora: dict | None = None
    bytes_read: int = 0
    output_bytes: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Measures:
    """What an engine measured, per input in order (None: not measured by this merge)."""

    weight_used: list[float | None]
    bytes_read: int
    update_sq: list[float] | None = None       # ‖xᵢ − base‖², with a base
    clip_scales: list[float] | None = None     # with clip_norm
    to_merged_sq: list[float] | None = None    # ‖xᵢ − merged‖²
    merged_to_base_sq: float | None = None     # ‖merged − base‖², with a base
    extra: list[dict] | None = None            # the method's own fields per input (krum_score, …)
    excluded: list[dict] = field(default_factory=list)
    lora: dict | None = None


def method_params(method: str, trim_ratio: float, k: int, f: int, keep: int, clip_norm: float | None) -> dict:
    """The parameters the merge actually used, for the report."""
    params: dict = {"trim_ratio": trim_ratio, "trimmed_each_end": k} if method == "trimmed_mean" else {}
    if method in ("krum", "multi_krum"):
        params = {"f": f, "m": keep}
    if clip_norm is not None:
        params["clip_norm"] = clip_norm
    return params


def build_report(method: str, files: list[_File], base_file: _File | None, expected_base: str | None,
                 weights: list[float], params: dict, measures: Measures, out: Path, started: float) -> MergeReport:
    m = measures
    inputs = []
    for i, f in enumerate(files):
        r = {"index": i, "name": f.label, "weight": weights[i], "weight_used": m.weight_used[i]}
        if m.update_sq is not None:
            r["update_norm"] = math.sqrt(m.update_sq[i])
        if m.clip_scales is not None:
            r["clip_scale"] = m.clip_scales[i]
        if m.to_merged_sq is not None:
            r["distance_to_merged"] = math.sqrt(m.to_merged_sq[i])
        r.update(m.extra[i] if m.extra is not None else {})
        inputs.append(r)
    first = files[0]
    return MergeReport(
        method=method, inputs=inputs, excluded=sorted(m.excluded, key=lambda e: e["index"]), params=params,
        base={"name": base_file.label, "sha256": expected_base} if base_file else (
            {"sha256": expected_base} if expected_base else None),
        merged_distance_to_base=math.sqrt(m.merged_to_base_sq) if m.merged_to_base_sq is not None else None,
        tensors=len(first.tensors),
        parameters=sum(t.numel for t in first.tensors.values() if t.dtype in _FLOATS),
        copied_tensors=[key for key in first.order if first.tensors[key].dtype not in _FLOATS],
        lora=m.lora, bytes_read=m.bytes_read, output_bytes=out.stat().st_size,
        seconds=round(time.monotonic() - started, 4))
