"""Generate text with the result of an llm-finetune job (kind 5751).

    python examples/customer/finetune_llm.py RESULT_DIR "the prompt" [--base BASE] [--chat]

RESULT_DIR holds the files the job returned: a LoRA adapter (adapter_model.safetensors,
adapter_config.json) or a whole model (model.safetensors, config.json, tokenizer files), and
model_card.json. BASE is the base model the job fine-tuned: a local model folder (the one you
sent as an archive, unpacked) or a Hugging Face repo id already in your hub cache (nothing is
downloaded). For an adapter it is required unless the card names a hub model; a whole model
needs no base.

The weights are checked against the sha256s in the model card, and the base model's against
the card's ``weights_sha256`` (a mismatch is an error: an adapter on the wrong base gives
nonsense; ``--no-verify`` skips the checks). Weights load from safetensors only, never from a
pickle, and no code shipped with a model is run. With ``--chat`` the prompt is sent as a user
message through the tokenizer's chat template (when it has one), as chat training sets are
formatted. Decoding is greedy unless ``--temperature`` is given. The generated text (the prompt
left out) goes to stdout, everything else to stderr.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


class UsageError(Exception):
    """A problem with the files or arguments, shown as one line."""


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def weights_sha256(folder: Path) -> str:
    """As the model card computes ``base_model.weights_sha256``: sha256 of the lines
    '<file>:<sha256>\\n' of the folder's *.safetensors files in name order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.name.endswith(".safetensors") and p.is_file()):
        digest.update(f"{path.name}:{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def read_card(result: Path) -> dict:
    path = result / "model_card.json"
    if not path.is_file():
        return {}
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path} cannot be read: {exc}") from None
    return card if isinstance(card, dict) else {}


def result_kind(result: Path) -> str:
    """``adapter`` or ``full``; refuses folders whose weights are only pickles."""
    if (result / "adapter_config.json").is_file():
        if not (result / "adapter_model.safetensors").is_file():
            raise UsageError(f"{result} has adapter_config.json but no adapter_model.safetensors "
                             "(pickled adapters are never loaded)")
        return "adapter"
    if (result / "config.json").is_file():
        if not any(p.name.endswith(".safetensors") for p in result.iterdir()):
            raise UsageError(f"{result} has config.json but no *.safetensors weights "
                             "(pickled weights are never loaded)")
        return "full"
    raise UsageError(f"{result} holds neither a LoRA adapter (adapter_config.json, adapter_model.safetensors) "
                     "nor a model (config.json, *.safetensors)")


def resolve_base(base: str | None, card: dict, kind: str) -> Path | None:
    """The base model's folder: a local folder, or a repo id from the local hub cache only."""
    hub = (card.get("base_model") or {}).get("hub")
    revision = (card.get("base_model") or {}).get("revision")
    if base is None:
        if kind == "full":
            return None
        if not hub:
            raise UsageError("this adapter was trained on a model sent as an archive: give that model's "
                             "folder with --base")
        base = hub
    else:
        revision = revision if base == hub else None
    folder = Path(base).expanduser()
    if folder.is_dir():
        return folder
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(base, revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError) as exc:
        where = f" at {revision}" if revision else ""
        raise UsageError(f"base model {base!r}{where} is neither a folder nor in the local hub cache "
                         f"(download it first, e.g. `hf download {base}`): {str(exc)[:200]}") from None


def verify(result: Path, base: Path | None, card: dict, kind: str) -> None:
    """The returned weights and the base model against the hashes in the card."""
    for name, expected in (card.get("weights") or {}).items():
        path = result / name
        if not path.is_file():
            raise UsageError(f"{name} is listed in the model card but missing from {result}")
        if file_sha256(path) != expected:
            raise UsageError(f"{name} does not match the sha256 in the model card")
    expected = (card.get("base_model") or {}).get("weights_sha256")
    if kind == "adapter" and base is not None and expected:
        if not any(p.name.endswith(".safetensors") for p in base.iterdir()):
            raise UsageError(f"the base model {base} has no *.safetensors weights "
                             "(pickled weights are never loaded)")
        if weights_sha256(base) != expected:
            raise UsageError(f"the base model in {base} is not the one this adapter was trained on "
                             "(its weights differ from the model card's base_model.weights_sha256)")


def load(result: Path, base: Path | None, kind: str, device: str):
    """(model, tokenizer), in eval mode on `device`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    options = dict(local_files_only=True, trust_remote_code=False)
    if kind == "adapter":
        from peft import PeftModel

        model = AutoModelForCausalLM.from_pretrained(str(base), use_safetensors=True, dtype=torch.float32,
                                                     **options)
        model = PeftModel.from_pretrained(model, str(result), is_trainable=False)
        tokenizer_folder = base
    else:
        model = AutoModelForCausalLM.from_pretrained(str(result), use_safetensors=True, dtype=torch.float32,
                                                     **options)
        has_tokenizer = any((result / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json"))
        tokenizer_folder = result if has_tokenizer or base is None else base
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_folder), **options)
    return model.to(device).eval(), tokenizer


def encode(tokenizer, prompt: str, chat: bool, system: str | None) -> list[int]:
    """The prompt's token ids, formatted as the job formatted training examples: plain text with
    the tokenizer's special tokens, or (``--chat``) the chat template up to the assistant's turn."""
    if chat and getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else []) + \
                   [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    if chat:
        print("the tokenizer has no chat template: the prompt is sent as plain text", file=sys.stderr)
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


def generate(model, tokenizer, ids: list[int], *, max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, skip_special_tokens: bool = True) -> str:
    """The text `model` writes after the prompt `ids` (greedy when temperature is 0)."""
    import torch

    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else \
        dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             max_new_tokens=max_new_tokens, pad_token_id=pad, **sampling)
    return tokenizer.decode(out[0][len(ids):], skip_special_tokens=skip_special_tokens)


def describe(card: dict, kind: str, base: Path | None) -> str:
    metrics = card.get("metrics") or {}
    before = (metrics.get("before") or {}).get("eval_loss")
    after = metrics.get("eval_loss")
    losses = f", eval loss {before:.4f} -> {after:.4f}" if isinstance(before, float) and isinstance(after, float) \
        else ""
    on = f" on {base}" if base is not None and kind == "adapter" else ""
    return f"loaded a {card.get('method', kind)} result{on}{losses}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("result", type=Path, help="the folder with the job's returned files")
    parser.add_argument("prompt", help="the text to continue (with --chat: the user's message)")
    parser.add_argument("--base", help="the base model: a local folder or a hub repo id in the local cache "
                                       "(default: the card's hub model; not needed for a full model)")
    parser.add_argument("--chat", action="store_true", help="format the prompt with the chat template")
    parser.add_argument("--system", help="a system message (with --chat)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0, help="for sampling")
    parser.add_argument("--keep-special-tokens", action="store_true", help="print special tokens too")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-verify", action="store_true", help="skip the sha256 checks against the card")
    args = parser.parse_args(argv)

    try:
        result = args.result
        if not result.is_dir():
            raise UsageError(f"{result} is not a folder")
        card = read_card(result)
        kind = result_kind(result)
        base = resolve_base(args.base, card, kind)
        if not args.no_verify:
            verify(result, base, card, kind)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load(result, base, kind, device)
    print(describe(card, kind, base), file=sys.stderr)
    ids = encode(tokenizer, args.prompt, args.chat, args.system)
    text = generate(model, tokenizer, ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    top_p=args.top_p, seed=args.seed, skip_special_tokens=not args.keep_special_tokens)
    sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
