"""FedAvg of LoRA adapters by stacking (FLoRA, Wang et al. 2024), exactly.

Averaging A and B separately is wrong (the mean of products is not the product of means), so
the factors are stacked: A' = [A₁; …; A_N] along the rank, B' = [p₁B₁ | … | p_N B_N] with
pᵢ = wᵢ / Σw, so B'A' = Σ pᵢ BᵢAᵢ. The rank becomes r·N, and `stacked_adapter_config` scales
``lora_alpha`` to keep the adapter's scaling. Adapters are small: each factor is read whole, from
every input at once; the adapter's other floating-point tensors get the weighted mean, chunk by
chunk on the `_ChunkReader`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch

from .chunked import _ChunkReader
from .checks import MergeError
from .report import Measures
from .safetensors_io import (_FLOATS, CHUNK_ELEMENTS, _Buffer, _File, _Writer, check_finite,
                             merged_metadata)


def is_lora_key(key: str) -> bool:
    return "lora_A" in key or "lora_B" in key or "lora_embedding_A" in key or "lora_embedding_B" in key


def stacked_adapter_config(config: dict, n: int) -> dict:
    """The ``adapter_config.json`` of N LoRA adapters stacked by `merge_files`: rank r·N and
    lora_alpha scaled so that the adapter's scaling (α/r, or α/√r with rsLoRA) is unchanged."""
    out = dict(config)
    factor = math.sqrt(n) if out.get("use_rslora") else n
    out["r"] = int(out.get("r", 8)) * n
    out["lora_alpha"] = float(out.get("lora_alpha", 8)) * factor
    if out["lora_alpha"].is_integer():
        out["lora_alpha"] = int(out["lora_alpha"])
    for name, scale in (("rank_pattern", n), ("alpha_pattern", factor)):
        if out.get(name):
            out[name] = {k: (int(v * scale) if float(v * scale).is_integer() else v * scale)
                         for k, v in out[name].items()}
    return out


def _lora_pairs(files: list[_File]) -> list[tuple[str, str]]:
    """(A key, B key) of every LoRA module, checked: pairs complete, ranks consistent."""
    tensors = files[0].tensors
    pairs = []
    for key in sorted(tensors):
        if "magnitude" in key:
            raise MergeError(f"{files[0].what}: tensor {key!r} is a DoRA magnitude vector; DoRA adapters "
                             "cannot be merged exactly (send plain LoRA adapters)", files[0].index)
        for a_name, b_name in (("lora_embedding_A", "lora_embedding_B"), ("lora_A", "lora_B")):
            if a_name in key:
                b_key = key.replace(a_name, b_name)
                if b_key not in tensors:
                    raise MergeError(f"{files[0].what}: LoRA tensor {key!r} has no matching {b_key!r}",
                                     files[0].index)
                a, b = tensors[key], tensors[b_key]
                rank_dim = 0
                if len(a.shape) < 1 or len(b.shape) < 2 or a.shape[rank_dim] != b.shape[1]:
                    raise MergeError(f"{files[0].what}: LoRA pair {key!r} {list(a.shape)} / {b_key!r} "
                                     f"{list(b.shape)} do not share a rank", files[0].index)
                if a.dtype not in _FLOATS:
                    raise MergeError(f"{files[0].what}: LoRA tensor {key!r} is {a.dtype}", files[0].index)
                pairs.append((key, b_key))
                break
        else:
            if ("lora_B" in key or "lora_embedding_B" in key) and \
                    key.replace("lora_embedding_B", "lora_embedding_A").replace("lora_B", "lora_A") not in tensors:
                raise MergeError(f"{files[0].what}: LoRA tensor {key!r} has no matching A", files[0].index)
    return pairs


def _check_lora_request(method: str, base_file: _File | None, clip_norm: float | None) -> None:
    """Stacking is FedAvg's; the robust methods, a base and clipping are not defined on factors."""
    if method != "fedavg":
        raise MergeError(f"these are LoRA adapters: {method} on separate A and B factors is not "
                         "defined (the factors of two adapters are not comparable); use fedavg, "
                         "which stacks them exactly")
    if base_file is not None or clip_norm is not None:
        raise MergeError("these are LoRA adapters: a base model and clip_norm do not apply to them "
                         "(their update is the adapter itself); send the adapters alone")


def _write_lora_and_rest(reader: _ChunkReader, writer: _Writer, pairs, coefs, layout, start, span) -> dict:
    """LoRA: stack A along the rank and B (scaled by each input's share) along the rank; average
    every other floating-point tensor; copy the rest. Adapters are small: one module's factors
    from all inputs at a time."""
    files, n = reader.files, reader.n
    pair_of = {a: b for a, b in pairs}
    a_of = {b: a for a, b in pairs}
    buf = _Buffer(CHUNK_ELEMENTS * 8)
    float_set = set(reader.float_keys)
    ranks = set()
    for key, dtype, _shape in layout:
        info = files[0].tensors[key]
        reader.check()

        def whole(f: _File) -> torch.Tensor:
            return f.read(key, 0, info.numel, buf).clone().view(info.shape)
        if key in pair_of:
            parts = [whole(f) for f in files]
            ranks.add(info.shape[0])
            for f, part in zip(files, parts):
                check_finite(part, f, key)
            writer.write(torch.cat(parts, dim=0))
        elif key in a_of:
            parts = []
            for i, f in enumerate(files):
                part = whole(f)
                check_finite(part, f, key)
                parts.append((part.to(reader.acc) * coefs[i]).to(part.dtype))
            writer.write(torch.cat(parts, dim=1))
        elif key in float_set:
            for begin in range(0, info.numel, CHUNK_ELEMENTS):
                count = min(CHUNK_ELEMENTS, info.numel - begin)
                xs, _ = reader.read_all(key, begin, count)
                merged = None
                for i, x in enumerate(xs):
                    check_finite(x, files[i], key)
                    merged = torch.mul(x.to(reader.acc), coefs[i]) if merged is None else merged.add_(x, alpha=coefs[i])
                writer.write(merged.to(info.torch_dtype))
        else:
            writer.copy(files[0], key, buf)
        reader.progress(start + span, "stacking LoRA adapters")
    reader.bytes_read += sum(f.size for f in files)
    return {"modules": len(pairs), "rank_in": sorted(ranks), "rank_multiplier": n,
            "rank_out": sorted(r * n for r in ranks),
            "note": f"stacked (FLoRA): multiply the adapter's r and lora_alpha by {n} "
                    f"(see stacked_adapter_config), or use the adapter_config.json returned with it"}


def merge_lora(files: list[_File], weights: list[float], pairs: list[tuple[str, str]], out: Path, *,
               progress: Callable[[float, str], None], check: Callable[[], None]) -> Measures:
    """Stack the adapters into `out` (committed atomically); what it measured (no distances:
    the factors of different inputs are not comparable)."""
    n = len(files)
    keys = [key for key in files[0].float_keys if not is_lora_key(key)]
    total = sum(weights)
    shares = [w / total for w in weights]
    first = files[0].tensors
    pair_of = {a: b for a, b in pairs}
    b_keys = set(pair_of.values())
    layout = []
    for key in files[0].order:
        t = first[key]
        if key in pair_of:
            layout.append((key, t.dtype, (t.shape[0] * n,) + t.shape[1:]))
        elif key in b_keys:
            layout.append((key, t.dtype, (t.shape[0], t.shape[1] * n) + t.shape[2:]))
        else:
            layout.append((key, t.dtype, t.shape))
    with _ChunkReader(files, None, keys, progress, check) as reader, \
            _Writer(out, layout, merged_metadata(files[0], "fedavg", n)) as writer:
        lora_info = _write_lora_and_rest(reader, writer, pairs, shares, layout, 0.0, 1.0)
        writer.commit()
    return Measures(weight_used=shares, bytes_read=reader.bytes_read, lora=lora_info)
