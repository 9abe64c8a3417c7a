"""LoRA adapters: FedAvg by stacking (FLoRA), the stacked adapter_config, the factor pairs."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from .checks import MergeError
from .safetensors_io import _FLOATS, CHUNK_ELEMENTS, _Buffer, _File, _Writer, check_finite

if TYPE_CHECKING:
    from .robust import _Merger


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


def _write_lora_and_rest(merger: _Merger, writer: _Writer, pairs, coefs, layout, start, span) -> dict:
    """LoRA: stack A along the rank and B (scaled by each input's share) along the rank; average
    every other floating-point tensor; copy the rest. Adapters are small: one module's factors
    from all inputs at a time."""
    files, n = merger.files, merger.n
    pair_of = {a: b for a, b in pairs}
    a_of = {b: a for a, b in pairs}
    buf = _Buffer(CHUNK_ELEMENTS * 8)
    float_set = set(merger.float_keys)
    ranks = set()
    for key, dtype, _shape in layout:
        info = files[0].tensors[key]
        merger.check()

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
                parts.append((part.to(merger.acc) * coefs[i]).to(part.dtype))
            writer.write(torch.cat(parts, dim=1))
        elif key in float_set:
            for begin in range(0, info.numel, CHUNK_ELEMENTS):
                count = min(CHUNK_ELEMENTS, info.numel - begin)
                xs, _ = merger._read_all(key, begin, count)
                merged = None
                for i, x in enumerate(xs):
                    check_finite(x, files[i], key)
                    merged = torch.mul(x.to(merger.acc), coefs[i]) if merged is None else merged.add_(x, alpha=coefs[i])
                writer.write(merged.to(info.torch_dtype))
        else:
            writer.copy(files[0], key, buf)
        merger.progress(start + span, "stacking LoRA adapters")
    merger.bytes_read += sum(f.size for f in files)
    return {"modules": len(pairs), "rank_in": sorted(ranks), "rank_multiplier": n,
            "rank_out": sorted(r * n for r in ranks),
            "note": f"stacked (FLoRA): multiply the adapter's r and lora_alpha by {n} "
                    f"(see stacked_adapter_config), or use the adapter_config.json returned with it"}
