"""A tiny language model and corpus built here, offline, so that ``dvm federate --task llm
--local N`` runs from one command with no download: a toy grammar ("the red cat sees the
dog."), a byte-level BPE tokenizer trained on it with `tokenizers`, and a 2-layer GPT-2 of
random weights (about 140 k parameters) saved as a model folder the llm-finetune plugin takes
as an archive. The tests build their models with it too."""

from __future__ import annotations

import json
import random
from pathlib import Path

NOUNS = ["cat", "dog", "bird", "fish", "fox", "owl", "cow", "bee"]
VERBS = ["sees", "likes", "chases", "finds", "hears", "helps"]
ADJS = ["red", "big", "old", "shy", "fast", "calm"]


def sentences(n: int, seed: int = 0) -> list[str]:
    """`n` sentences of the toy grammar; a 2-layer model learns it within a few dozen steps."""
    rng = random.Random(seed)
    return [f"the {rng.choice(ADJS)} {rng.choice(NOUNS)} {rng.choice(VERBS)} the {rng.choice(NOUNS)}."
            for _ in range(n)]


def write_corpus(path: Path, n: int, seed: int = 0) -> Path:
    """A JSONL training set of `n` ``{"text": …}`` lines."""
    path.write_text("".join(json.dumps({"text": s}) + "\n" for s in sentences(n, seed)))
    return path


def build_tokenizer(vocab_size: int = 600):
    """A byte-level BPE tokenizer (GPT-2 style) trained on the toy grammar, no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(sentences(2000, seed=99), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")


def build_model(kind: str, vocab_size: int, seed: int = 0, width: int = 64):
    """A 2-layer GPT-2 or Llama of random (seeded) weights."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if kind == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_positions=128, n_embd=width, n_layer=2,
                                          n_head=4, bos_token_id=0, eos_token_id=0))
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(
            vocab_size=vocab_size, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            bos_token_id=0, eos_token_id=0, tie_word_embeddings=False))
    raise ValueError(f"unknown tiny model {kind!r}: gpt2 or llama")


def save_model_folder(folder: Path, kind: str = "gpt2", seed: int = 0) -> Path:
    """A model folder (config.json, model.safetensors, tokenizer files) of a tiny model."""
    tokenizer = build_tokenizer()
    model = build_model(kind, len(tokenizer), seed)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    return folder
