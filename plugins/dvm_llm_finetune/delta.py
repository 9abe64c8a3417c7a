"""The pseudo-gradient file: what a full fine-tuning job returns with param ``output=delta``.

A DiLoCo round (`dvm federate --task llm --mode diloco`) needs from each provider only how far
its inner steps moved the weights: Δ = θ_base − θ_trained, per floating-point tensor of the base
model's safetensors files (tied weights such as GPT-2's ``lm_head`` are not in those files and
follow the tensor they are tied to). The customer applies the average of the Δs with its outer
optimizer. Sending Δ instead of θ lets it be compressed: its values are small and centred on 0.

``pseudo_gradient.safetensors``, metadata ``format`` = ``dvm-pseudo-gradient/1``,
``compression`` and ``base_sha256`` (the model card's ``weights_sha256`` of the base):

- ``none``: each Δ as float32 under the tensor's own name;
- ``bf16``: each Δ as bfloat16 (half the bytes; 8 bits of mantissa);
- ``int8``: each Δ as int8 q under its name and a float32 ``<name>::scale`` s with one value per
  row (the first dimension; one value for a 0-d or 1-d tensor): Δ ≈ q · s, s = max|Δ_row| / 127,
  q = round(Δ / s). About a quarter of the bytes of float32.

`read_delta` gives back float32 tensors whatever the compression.
"""

from __future__ import annotations

from pathlib import Path

FORMAT = "dvm-pseudo-gradient/1"
FILE = "pseudo_gradient.safetensors"
SCALE = "::scale"
COMPRESSIONS = ("none", "bf16", "int8")


def quantize_int8(delta):
    """(q int8, scale float32 per row): Δ ≈ q · scale[row]."""
    import torch

    d = delta.to(torch.float32)
    rows = d.reshape(d.shape[0], -1) if d.ndim >= 2 else d.reshape(1, -1)
    scale = rows.abs().amax(dim=1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(rows / safe[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.reshape(d.shape), scale


def dequantize_int8(q, scale):
    import torch

    rows = q.reshape(q.shape[0], -1) if q.ndim >= 2 else q.reshape(1, -1)
    return (rows.to(torch.float32) * scale.to(torch.float32)[:, None]).reshape(q.shape)


def encode(deltas: dict, compression: str) -> dict:
    """The tensors of the file for float32 Δs, as `compression` stores them."""
    import torch

    if compression not in COMPRESSIONS:
        raise ValueError(f"unknown compression {compression!r}: one of {', '.join(COMPRESSIONS)}")
    out = {}
    for name, delta in deltas.items():
        if SCALE in name:
            raise ValueError(f"a tensor name holds {SCALE!r}: {name[:80]!r}")
        if compression == "none":
            out[name] = delta.to(torch.float32).contiguous()
        elif compression == "bf16":
            out[name] = delta.to(torch.bfloat16).contiguous()
        else:
            q, scale = quantize_int8(delta)
            out[name] = q.contiguous()
            out[name + SCALE] = scale.contiguous()
    return out


def write_delta(base_folder: Path, trained: dict, path: Path, compression: str, base_sha256: str) -> dict:
    """Write the file for the trained state dict `trained` against the base model folder's
    safetensors files; returns {"tensors", "bytes", "compression"}."""
    import torch
    from safetensors.torch import load_file, save_file

    deltas = {}
    for f in sorted(Path(base_folder).glob("*.safetensors")):
        for name, base in load_file(str(f)).items():
            if not base.is_floating_point():
                continue
            if name not in trained:
                raise RuntimeError(f"the trained model has no tensor {name!r}")
            deltas[name] = base.to(torch.float32) - trained[name].detach().to("cpu", torch.float32)
    if not deltas:
        raise RuntimeError("the base model has no floating-point tensors")
    save_file(encode(deltas, compression), str(path),
              metadata={"format": FORMAT, "compression": compression, "base_sha256": base_sha256})
    return {"tensors": len(deltas), "bytes": Path(path).stat().st_size, "compression": compression}


def read_delta(path: Path) -> tuple[dict, dict]:
    """(name → float32 Δ, the file's metadata). ValueError for a file that is not one: the
    caller drops the provider that sent it."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
    except Exception as exc:   # noqa: BLE001 - any unreadable file is the sender's fault
        raise ValueError(f"its pseudo-gradient cannot be read ({type(exc).__name__}: {str(exc)[:200]})") from None
    if metadata.get("format") != FORMAT:
        raise ValueError(f"its pseudo-gradient is not a {FORMAT} file (format {metadata.get('format')!r})")
    compression = metadata.get("compression")
    if compression not in COMPRESSIONS:
        raise ValueError(f"its pseudo-gradient has an unknown compression {compression!r}")
    out = {}
    for name, value in tensors.items():
        if name.endswith(SCALE):
            if compression != "int8" or name[:-len(SCALE)] not in tensors:
                raise ValueError(f"its pseudo-gradient holds a stray {name[:80]!r}")
            continue
        if compression == "int8":
            scale = tensors.get(name + SCALE)
            rows = value.shape[0] if value.ndim >= 2 else 1
            if value.dtype != torch.int8 or scale is None or scale.ndim != 1 or scale.shape[0] != rows:
                raise ValueError(f"its int8 tensor {name[:80]!r} has no per-row scale")
            out[name] = dequantize_int8(value, scale)
        else:
            if not value.is_floating_point():
                raise ValueError(f"its tensor {name[:80]!r} is not floating-point")
            out[name] = value.to(torch.float32)
    return out, metadata
