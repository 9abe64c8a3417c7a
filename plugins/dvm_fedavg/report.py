"""The merge report (``merge_report.json``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class MergeReport:
    """What a merge did, for ``merge_report.json``.

    `inputs`: one dict per input, in order: index, name, weight (as given), weight_used (its
    share of the merged model; None for the unweighted coordinate-wise methods), update_norm
    (‖xᵢ − base‖, with a base), clip_scale, distance_to_merged (‖xᵢ − merged‖), and per method
    krum_score / selected, or trimmed_fraction / median_fraction (share of coordinates where the
    input was trimmed / supplied the median). `excluded`: index, name, reason.
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
