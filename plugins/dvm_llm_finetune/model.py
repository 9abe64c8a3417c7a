"""The base model: finding its folder (hub cache or the customer's archive), checking it,
loading it with its tokenizer, and wrapping it for LoRA.

Nothing here ever reaches the network or unpickles: hub models come from the provider's cache
only (``local_files_only``), weights from ``*.safetensors`` files only (``use_safetensors``),
and a model that ships its own Python code (``auto_map`` in its config) is refused unless the
provider sets ``trust_remote_code``.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path

from dvm_core import JobInputError
from dvm_core.datarefs import sha256_file

# LoRA targets per architecture (model_type in config.json): the attention projections.
DEFAULT_TARGETS = {
    "gpt2": ["c_attn"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mixtral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "phi3": ["qkv_proj", "o_proj"],
    "phi": ["q_proj", "k_proj", "v_proj", "dense"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj"],
    "gpt_neox": ["query_key_value"],
    "falcon": ["query_key_value"],
    "bloom": ["query_key_value"],
    "gptj": ["q_proj", "k_proj", "v_proj", "out_proj"],
}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
SAFETENSORS_HEADER_MAX = 100 << 20
BYTES_PER_DTYPE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                   "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass
class BaseModel:
    """A checked model folder and what the model card says about it."""

    folder: Path
    source: dict              # {"hub": repo, "revision": commit} or {"archive_sha256": ...}
    model_type: str
    parameters: int
    weights_bytes: int
    weights_sha256: str       # sha256 over the weight files' own sha256s, in name order


def hub_folder(repo: str, revision: str | None, cache_dir: str | None) -> tuple[Path, str]:
    """The snapshot folder of `repo` in the provider's hub cache, never downloading:
    (folder, commit)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(repo, revision=revision, cache_dir=cache_dir or None,
                                        local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        raise JobInputError(f"model {repo!r}{' at ' + revision if revision else ''} is not in this "
                            "provider's model cache") from None
    return folder, folder.name


def find_model_folder(root: Path) -> Path:
    """The folder holding config.json in an extracted archive: the root or a single subfolder."""
    if (root / "config.json").is_file():
        return root
    found = sorted(p.parent for p in root.rglob("config.json") if p.is_file())
    found = [p for p in found if (p / "config.json").is_file()]
    if len(found) == 1 and len(found[0].relative_to(root).parts) <= 2:
        return found[0]
    if not found:
        raise JobInputError("the model archive has no config.json: send a model folder as written by "
                            "save_pretrained (config.json, *.safetensors, tokenizer files)")
    raise JobInputError("the model archive holds several folders with a config.json: send one model")


def _safetensors_size(path: Path) -> tuple[int, int]:
    """(parameters, data bytes) of a safetensors file, from its header only."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise JobInputError(f"{path.name} is not a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > SAFETENSORS_HEADER_MAX:
            raise JobInputError(f"{path.name} is not a safetensors file (header of {n} bytes)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            raise JobInputError(f"{path.name} is not a safetensors file (bad header)") from None
    if not isinstance(header, dict):
        raise JobInputError(f"{path.name} is not a safetensors file (its header is not an object)")
    params = 0
    data = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            count = 1
            for d in info["shape"]:
                if not isinstance(d, int) or d < 0:   # a negative size would lower the count
                    raise ValueError(d)
                count *= d
            start, end = info["data_offsets"]
            if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end):
                raise ValueError(info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise JobInputError(f"{path.name} is not a safetensors file (tensor {name[:60]!r})") from None
        params += count
        data = max(data, int(end))
    return params, data


def _check_shard_index(folder: Path, weights: list[Path]) -> None:
    """transformers loads the shards a `*.safetensors.index.json` names by joining them to the
    folder: each must be a plain file name of this folder's checked weights, or a shard outside
    it (another job's files, anything) would be loaded, past the size and parameter limits."""
    names = {p.name for p in weights}
    for index in folder.glob("*.index.json"):
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
            shards = set(weight_map.values()) if isinstance(weight_map, dict) else None
        except (OSError, UnicodeDecodeError, ValueError, RecursionError, AttributeError):
            shards = None
        if shards is None or not all(isinstance(s, str) for s in shards):
            raise JobInputError(f"the model's {index.name} is not a shard index (weight_map of file names)")
        outside = sorted(s for s in shards if s not in names)
        if outside:
            raise JobInputError(f"the model's {index.name} names shards that are not safetensors files of "
                                f"the model folder: {', '.join(repr(s[:60]) for s in outside[:3])}")


def check_folder(folder: Path, *, source: dict, limits, check_cancelled=lambda: None) -> BaseModel:
    """Check a model folder before loading anything: config, safetensors weights only, no
    remote code unless allowed, the provider's size limits."""
    config_file = folder / "config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise JobInputError(f"the model's config.json cannot be read ({exc})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise JobInputError("the model's config.json has no model_type")
    if config.get("auto_map") and not limits.trust_remote_code:
        raise JobInputError("this model needs its own Python code (auto_map / trust_remote_code), "
                            "which this provider does not run")
    weights = sorted(p for p in folder.iterdir() if p.name.endswith(".safetensors") and p.is_file())
    if not weights:
        pickled = sorted(p.name for p in folder.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
        if pickled:
            raise JobInputError(f"the model has only pickle weights ({', '.join(pickled[:3])}), which are "
                                "never loaded here: convert them to safetensors (save_pretrained does)")
        raise JobInputError("the model folder has no *.safetensors weights")
    _check_shard_index(folder, weights)
    parameters = 0
    size = 0
    digest = hashlib.sha256()
    for path in weights:
        n, _ = _safetensors_size(path)
        parameters += n
        size += path.stat().st_size
        if size > limits.max_model_bytes:
            raise JobInputError(f"the model's weights are over {limits.max_model_bytes} bytes, "
                                "this provider's limit")
    if parameters > limits.max_model_parameters:
        raise JobInputError(f"the model has {parameters:,} parameters; this provider fine-tunes at most "
                            f"{limits.max_model_parameters:,}")
    for path in weights:
        check_cancelled()
        digest.update(f"{path.name}:{sha256_file(path)}\n".encode())
    return BaseModel(folder=folder, source=source, model_type=config["model_type"], parameters=parameters,
                     weights_bytes=size, weights_sha256=digest.hexdigest())


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds; all mean "bad folder"
        raise JobInputError(f"the model's tokenizer cannot be loaded: {str(exc)[:300]}") from None
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise JobInputError("the model's tokenizer has neither a padding nor an end-of-sequence token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(folder: Path, *, trust_remote_code: bool, dtype=None):
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(folder), local_files_only=True, use_safetensors=True, trust_remote_code=trust_remote_code,
            dtype=dtype or torch.float32)
    except (torch.OutOfMemoryError, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001
        if "out of memory" in str(exc).lower():
            raise
        raise JobInputError(f"the model cannot be loaded as a causal language model: {str(exc)[:300]}") from None
    return model


def check_tokenizer_fits(tokenizer, model) -> None:
    """A tokenizer whose ids run past the model's embedding table is not this model's."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise JobInputError(f"the tokenizer does not match the model: it has {len(tokenizer)} tokens, "
                            f"the model's embeddings only {rows}")


def linear_module_names(model) -> list[str]:
    """The short names of the layers LoRA can adapt (linear and GPT-2's Conv1D)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    names = set()
    for full, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, Conv1D)) and full:
            names.add(full.rsplit(".", 1)[-1])
    return sorted(names)


def lora_targets(model, model_type: str, requested: tuple[str, ...] | None) -> list[str]:
    """The requested target modules, checked against the model, else the architecture's default."""
    available = linear_module_names(model)
    if requested:
        missing = [t for t in requested if t not in available]
        if missing:
            raise JobInputError(f"target module(s) {', '.join(missing)} do not exist in this {model_type} "
                                f"model; its linear layers are: {', '.join(available)}")
        return list(requested)
    default = [t for t in DEFAULT_TARGETS.get(model_type, []) if t in available]
    if default:
        return default
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

    default = [t for t in PEFT_DEFAULTS.get(model_type, []) if t in available]
    if not default:
        raise JobInputError(f"no default LoRA target modules for a {model_type} model: send param "
                            f"target_modules (its linear layers are: {', '.join(available)})")
    return default


def add_lora(model, targets: list[str], params):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=params.lora_r, lora_alpha=params.lora_alpha, lora_dropout=params.lora_dropout,
                        target_modules=targets, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)
