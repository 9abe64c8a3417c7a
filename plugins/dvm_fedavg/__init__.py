"""Merging federated model updates as a NIP-90 job (kind 5752, ``fedavg``): the FEDSTR design.

Each round of federated learning (arXiv 2404.15834), the customer sends the models that
providers trained from the same global model, and gets back the merged global model
(``model.safetensors``, same tensors and dtypes) and ``merge_report.json`` (the weight each
input got, the inputs a robust method excluded and why, update norms, distances to the merged
model). The merging itself is `dvm_fedavg.merge.merge_files`, usable without a worker.

Inputs (``url`` with sha256, safetensors files, told apart by the ``i`` tag's marker):

- ``update:<n>``: a client's model trained on n examples (n is its FedAvg weight); ``update``
  or no marker: weight 1, or its value in param ``weights`` (comma-separated, input order);
- ``base``: the global model the updates started from (optional; needed by ``clip_norm``,
  gives update norms; an update whose safetensors metadata names ``base_sha256`` must match it);
- ``adapter_config``: for LoRA adapters, their ``adapter_config.json``, returned with r and
  lora_alpha multiplied for the stacked adapter (see `merge.stacked_adapter_config`).

Params: see `params.PARAMS`: ``method`` (fedavg, median, trimmed_mean, krum, multi_krum),
``trim_ratio``, ``f``, ``m``, ``clip_norm``, ``base_sha256``, ``model_bytes``. The price is
the bytes merged × the provider's ``sats_per_gb`` (at least 1 sat); Krum's pairwise distances
are quadratic in the updates, so krum and multi_krum count one model size more per pair.
Nothing past ``model_bytes`` is downloaded.
"""

from __future__ import annotations

import json
import time

from dvm_core import Artifact, JobCancelled, JobError, JobInputError, JobKind, JobResult, JobTimeout, hookimpl

from .params import NAME, PARAMS, Limits, MergeJob, _public, parse_request, price
from .params import schema as params_schema

__version__ = "0.1.0"
KIND = 5752
MAX_CONFIG_BYTES = 1 << 20

__all__ = ["KIND", "NAME", "run", "register_job_kinds", "job_kind"]


def job_kind(config: dict | None = None) -> JobKind:
    """The `JobKind` with the provider's limits from `config` (the worker's whole config)."""
    limits = Limits.from_config(config)
    rate = limits.sats_per_gb
    pricing = f"Price: {rate:g} sats per GB merged, at least 1 sat." if rate > 0 else "Free."
    return JobKind(
        kind=KIND, name=NAME,
        description=(
            "Merges federated-learning model updates (safetensors) into one global model: weighted FedAvg, "
            "or robust coordinate-wise median, trimmed mean, Krum or Multi-Krum, with optional norm "
            "clipping against the base model. LoRA adapters are stacked exactly (FLoRA). Inputs: url "
            "inputs marked update:<training examples>, optionally one marked base (the global model "
            "they were trained from) and one marked adapter_config. Returns model.safetensors and "
            f"merge_report.json. Limits: {limits.max_inputs} updates, {limits.max_input_bytes} bytes "
            f"per file. {pricing}"),
        run=run, parse=lambda request: parse_request(request, limits), params=dict(PARAMS),
        params_schema=params_schema(limits),
        price=(lambda job: price(job, job.limits)) if rate > 0 else None,
        pricing=(f"{rate:g} sats per GB merged (files × model size; krum and multi_krum add one model "
                 "size per pair of updates, for their pairwise distances), at least 1 sat"
                 if rate > 0 else None))


@hookimpl
def register_job_kinds(register, config):
    """Register kind 5752 ``fedavg`` with the limits of ``[plugins.fedavg]``."""
    register(job_kind(config))


def _fetch(ctx, url: str, what: str, max_bytes: int):
    """A url input's local path; any failure a JobInputError naming the input."""
    try:
        path = ctx.fetch(url, max_bytes=max_bytes)   # no more downloaded than was priced
    except (JobCancelled, JobTimeout):
        raise
    except JobError as exc:
        raise JobInputError(f"{what} ({_public(url)}): {exc}") from None
    size = path.stat().st_size
    if size > max_bytes:
        raise JobInputError(f"{what} ({_public(url)}) is {size} bytes; this job accepts at most {max_bytes}")
    return path


def run(ctx, job: MergeJob) -> JobResult:
    """Download the models, merge them, return the merged model and the report."""
    from .merge import MergeError, merge_files, stacked_adapter_config

    started = time.monotonic()
    limit = min(job.limits.max_input_bytes, job.model_bytes or job.limits.max_input_bytes)
    paths = []
    for i, url in enumerate(job.updates):
        ctx.progress(30 * i / len(job.updates), f"downloading update {i + 1}/{len(job.updates)}")
        paths.append(_fetch(ctx, url, f"update {i}", limit))
    base = _fetch(ctx, job.base, "the base model", limit) if job.base else None
    adapter_config = None
    if job.adapter_config:
        config_path = _fetch(ctx, job.adapter_config, "the adapter_config input", MAX_CONFIG_BYTES)
        try:
            adapter_config = json.loads(config_path.read_text())
            if not isinstance(adapter_config, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise JobInputError(f"the adapter_config input is not a JSON object ({type(exc).__name__})") from None

    out_dir = ctx.workdir / "result"
    out_dir.mkdir(exist_ok=True)
    model_file = out_dir / "model.safetensors"
    fetched = time.monotonic()
    try:
        report = merge_files(paths, job.weights, model_file, method=job.method, base=base,
                             trim_ratio=job.trim_ratio, f=job.f, m=job.m, clip_norm=job.clip_norm,
                             names=[_public(u) for u in job.updates], base_sha256=job.base_sha256,
                             progress=lambda fraction, message: ctx.progress(30 + 68 * fraction, message),
                             check_cancelled=ctx.check_cancelled, distances=job.distances)
    except MergeError as exc:
        message = str(exc)
        if exc.index is not None:   # the customer counts updates, the library inputs
            message = message.replace(f"input {exc.index} (", f"update {exc.index} (", 1)
        raise JobInputError(message) from None
    merge_seconds = time.monotonic() - fetched

    artifacts = [Artifact(model_file, "application/octet-stream", "model.safetensors")]
    if adapter_config is not None:
        if report.lora is None:
            raise JobInputError("an adapter_config input was sent but the updates are not LoRA adapters")
        config_file = out_dir / "adapter_config.json"
        config_file.write_text(json.dumps(stacked_adapter_config(adapter_config, len(paths)), indent=2))
        artifacts.append(Artifact(config_file, "application/json", "adapter_config.json"))
    report_dict = report.to_dict()
    report_file = out_dir / "merge_report.json"
    report_file.write_text(json.dumps(report_dict, indent=2, ensure_ascii=False))
    artifacts.insert(1, Artifact(report_file, "application/json", "merge_report.json"))
    ctx.progress(100, "done")

    content = {
        "method": report.method,
        "inputs": len(paths),
        "weights_used": [r.get("weight_used") for r in report.inputs],
        "excluded": report.excluded,
        "parameters": report.parameters,
        "merged_distance_to_base": report.merged_distance_to_base,
    }
    if report.lora is not None:
        content["lora"] = report.lora
    metrics = {"method": report.method, "inputs": len(paths), "excluded": len(report.excluded),
               "parameters": report.parameters, "bytes_read": report.bytes_read,
               "merge_seconds": round(merge_seconds, 3),
               "merge_gb_per_s": round(report.bytes_read / 1e9 / max(merge_seconds, 1e-9), 3),
               "job_seconds": round(time.monotonic() - started, 3)}
    return JobResult(content, metrics=metrics, artifacts=artifacts)
