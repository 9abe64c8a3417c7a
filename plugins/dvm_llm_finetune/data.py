"""The customer's JSONL: reading and checking it, tokenizing it, cutting it into batches.

Three formats, one per file, told by the first line's keys:

- ``{"text": ...}``: language modelling on the whole text; a text longer than
  ``max_seq_length`` tokens is split into pieces of that length.
- ``{"prompt": ..., "completion": ...}``: the loss is on the completion (and the end-of-sequence
  token) only.
- ``{"messages": [{"role": ..., "content": ...}, ...]}``: rendered with the tokenizer's chat
  template when it has one (else ``<|role|>\\ncontent\\n`` lines); the loss is on the assistant
  turns only, when the template renders conversations prefix by prefix (all common ones do),
  else on the whole conversation (the model card says which).

Prompt/completion and chat examples longer than ``max_seq_length`` are dropped (cut, they would
lose the very tokens the loss is on) and counted in the model card; if all are, the job fails.

Batches: without packing, random batches of ``batch_size`` examples (as any trainer draws
them), but the examples of a batch share rows as long as its longest example (first-fit
decreasing), so little compute goes to padding; with packing, the shuffled examples fill rows
of ``max_seq_length`` tokens, ``batch_size`` rows a step (fewer, fuller steps). Either way an
example never attends to another in its row (a block-diagonal causal mask, positions restarting
at 0) and its first token is not predicted from the one before: training computes what it
would on each example alone. Each epoch draws a new order from the job's seed.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from dvm_core import JobInputError
from dvm_core.datarefs import sha256_file

IGNORE = -100
FORMATS = {"text": ("text",), "prompt-completion": ("prompt", "completion"), "chat": ("messages",)}
ROLES = ("system", "user", "assistant", "tool")
OPEN_ROWS = 64   # first-fit looks for room in the last this many rows only


@dataclass
class Dataset:
    """A checked JSONL file: its records (one format), sha256 and size."""

    records: list[dict]
    format: str
    sha256: str
    bytes: int


@dataclass
class Example:
    """One tokenized example: token ids and labels (IGNORE where there is no loss)."""

    input_ids: list[int]
    labels: list[int]


@dataclass
class Tokenized:
    examples: list[Example]
    dropped_too_long: int
    loss_on: str                      # what the loss is computed on, for the model card

    @property
    def tokens(self) -> int:
        return sum(len(e.input_ids) for e in self.examples)


def read_jsonl(path: Path, *, what: str, max_bytes: int, max_examples: int,
               check_cancelled: Callable[[], None] = lambda: None) -> Dataset:
    """Read and check a JSONL dataset; JobInputError naming the line of any problem."""
    size = path.stat().st_size
    if size > max_bytes:
        raise JobInputError(f"the {what} is {size} bytes; this provider takes at most {max_bytes}")
    records: list[dict] = []
    fmt = None
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if number % 10000 == 0:
                check_cancelled()
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise JobInputError(f"{what}, line {number}: not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise JobInputError(f"{what}, line {number}: not valid JSON ({exc.msg} at column {exc.colno})") \
                    from None
            except RecursionError:   # [[[[…]]]]: deeper than the parser's stack, not an example
                raise JobInputError(f"{what}, line {number}: JSON nested too deeply to be an example") from None
            if not isinstance(record, dict):
                raise JobInputError(f"{what}, line {number}: each line must be a JSON object, "
                                    f"got {type(record).__name__}")
            line_format = _format_of(record, what, number)
            if fmt is None:
                fmt = line_format
            elif line_format != fmt:
                raise JobInputError(f"{what}, line {number}: a {line_format} example in a {fmt} dataset "
                                    "(one format per file)")
            _check_record(record, fmt, what, number)
            records.append(record)
            if len(records) > max_examples:
                raise JobInputError(f"the {what} has more than {max_examples} examples (this provider's limit)")
    if not records:
        raise JobInputError(f"the {what} holds no examples: send one JSON object per line")
    return Dataset(records=records, format=fmt, sha256=sha256_file(path), bytes=size)


def _format_of(record: dict, what: str, number: int) -> str:
    keys = set(record)
    for name, fields in FORMATS.items():
        if fields[0] in keys:
            unknown = sorted(keys - set(fields))
            if unknown:
                raise JobInputError(f"{what}, line {number}: unknown field(s) {', '.join(map(repr, unknown))} "
                                    f"in a {name} example (allowed: {', '.join(fields)})")
            missing = [f for f in fields if f not in keys]
            if missing:
                raise JobInputError(f"{what}, line {number}: field {missing[0]!r} is missing")
            return name
    raise JobInputError(f"{what}, line {number}: unknown field(s) {', '.join(map(repr, sorted(keys))) or 'none'}: "
                        "each line needs 'text', or 'prompt' and 'completion', or 'messages'")


def _check_record(record: dict, fmt: str, what: str, number: int) -> None:
    if fmt == "chat":
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise JobInputError(f"{what}, line {number}: 'messages' must be a non-empty list")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or set(message) - {"role", "content"} \
                    or not isinstance(message.get("role"), str) or not isinstance(message.get("content"), str):
                raise JobInputError(f"{what}, line {number}: message {i + 1} must be an object with "
                                    "string fields 'role' and 'content' only")
            if message["role"] not in ROLES:
                raise JobInputError(f"{what}, line {number}: message {i + 1} has unknown role "
                                    f"{message['role'][:30]!r} (use {', '.join(ROLES)})")
        if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
            raise JobInputError(f"{what}, line {number}: no assistant message with content to learn from")
        return
    for name in FORMATS[fmt]:
        if not isinstance(record[name], str):
            raise JobInputError(f"{what}, line {number}: {name!r} must be a string")
    trained = record["text"] if fmt == "text" else record["completion"]
    if not trained.strip():
        raise JobInputError(f"{what}, line {number}: empty {'text' if fmt == 'text' else 'completion'}")


# --- tokenizing ----------------------------------------------------------------------------

def tokenize(dataset: Dataset, tokenizer, max_seq_length: int, *, what: str,
             check_cancelled: Callable[[], None] = lambda: None, render_seconds: float | None = None) -> Tokenized:
    """Turn records into `Example`s, every one at most `max_seq_length` tokens. Chat templates
    are rendered in a child process given `render_seconds` at most (`render.render_chats`)."""
    eos = tokenizer.eos_token_id
    examples: list[Example] = []
    dropped = 0
    shortest_dropped = None
    loss_on = {"text": "all tokens", "prompt-completion": "completions (and end-of-sequence)",
               "chat": "assistant turns"}[dataset.format]
    chat_template = dataset.format == "chat" and bool(getattr(tokenizer, "chat_template", None))
    renders = None
    if chat_template:
        from .render import RENDER_SECONDS, render_chats
        renders = render_chats(tokenizer, [record["messages"] for record in dataset.records],
                               seconds=min(RENDER_SECONDS, render_seconds or RENDER_SECONDS),
                               check_cancelled=check_cancelled)
    for index, record in enumerate(dataset.records):
        if index % 1000 == 0:
            check_cancelled()
        if dataset.format == "text":
            ids = tokenizer(record["text"], add_special_tokens=True)["input_ids"]
            if eos is not None:
                ids = ids + [eos]
            for start in range(0, len(ids), max_seq_length):
                piece = ids[start:start + max_seq_length]
                if len(piece) >= 2:
                    examples.append(Example(piece, list(piece)))
            continue
        if dataset.format == "prompt-completion":
            prompt = tokenizer(record["prompt"], add_special_tokens=True)["input_ids"]
            completion = tokenizer(record["completion"], add_special_tokens=False)["input_ids"]
            completion = completion + ([eos] if eos is not None else [])
            ids = prompt + completion
            labels = [IGNORE] * len(prompt) + completion
        else:
            ids, labels, masked = _chat_tokens(record["messages"], tokenizer,
                                               renders[index] if renders is not None else None)
            if not masked:
                loss_on = "whole conversations (the chat template does not render turn by turn)"
        if len(ids) > max_seq_length:
            dropped += 1
            shortest_dropped = len(ids) if shortest_dropped is None else min(shortest_dropped, len(ids))
            continue
        if all(label == IGNORE for label in labels[1:]):
            continue
        examples.append(Example(ids, labels))
    if not examples:
        if dropped:
            raise JobInputError(f"every example of the {what} is longer than max_seq_length="
                                f"{max_seq_length} tokens (the shortest has {shortest_dropped}): "
                                "raise max_seq_length or shorten them")
        raise JobInputError(f"the {what} has no tokens to learn from")
    return Tokenized(examples, dropped, loss_on)


def _plain_renders(messages: list[dict]) -> dict:
    """Without a chat template: ``<|role|>`` lines, the renders `_chat_tokens` compares."""
    def render(part: list[dict], generation_prompt: bool) -> str:
        text = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in part)
        return text + ("<|assistant|>\n" if generation_prompt else "")
    steps = [[render(messages[:i], True), render(messages[:i + 1], False)]
             for i, message in enumerate(messages) if message["role"] == "assistant"]
    return {"steps": steps, "whole": render(messages, False)}


def _chat_tokens(messages: list[dict], tokenizer, rendered: dict | None) -> tuple[list[int], list[int], bool]:
    """Token ids and labels of a conversation, the loss on the assistant turns only. The
    conversation is rendered prefix by prefix (`rendered`: by the model's chat template, else
    plain): the text an assistant turn adds after the generation prompt is what the model must
    learn to write."""
    use_template = rendered is not None
    rendered = rendered if use_template else _plain_renders(messages)
    segments: list[tuple[str, bool]] = []      # (text, trained)
    done = ""
    for before, after in rendered["steps"]:
        if not (before.startswith(done) and after.startswith(before)):
            break
        segments += [(before[len(done):], False), (after[len(before):], True)]
        done = after
    else:
        whole = rendered["whole"]
        if whole.startswith(done):
            segments.append((whole[len(done):], False))
            ids: list[int] = []
            labels: list[int] = []
            for text, trained in segments:
                if not text:
                    continue
                part = tokenizer(text, add_special_tokens=False)["input_ids"]
                ids += part
                labels += part if trained else [IGNORE] * len(part)
            if not use_template and tokenizer.eos_token_id is not None:
                ids.append(tokenizer.eos_token_id)
                labels.append(tokenizer.eos_token_id)
            return ids, labels, True
    # The template rewrites earlier turns as the conversation grows: train on all of it.
    ids = tokenizer(rendered["whole"], add_special_tokens=False)["input_ids"]
    return ids, list(ids), False


def split_eval(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A seeded held-out share of the examples: (train, eval)."""
    if fraction <= 0 or len(examples) < 2:
        return examples, []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(examples) - 1, max(1, round(len(examples) * fraction)))
    held = set(order[:n_eval])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in order[:n_eval]]


# --- batches ---------------------------------------------------------------------------------

@dataclass
class Batch:
    input_ids: "torch.Tensor"       # noqa: F821 - rows × length, int64
    attention_mask: "torch.Tensor"  # noqa: F821 - rows × length, or rows × 1 × length × length (bool)
    labels: "torch.Tensor"          # noqa: F821 - IGNORE where no loss
    tokens: int                     # real (non-padding) tokens
    loss_tokens: int                # tokens the loss is on (labels shifted by one)
    position_ids: "torch.Tensor | None" = None  # noqa: F821 - restarting at 0 for each example


def collate(examples: list[Example], pad_id: int, length: int | None = None) -> Batch:
    """One example per row, right-padded to the longest."""
    return collate_rows([[e] for e in examples], pad_id, length)


def collate_rows(rows: list[list[Example]], pad_id: int, length: int | None = None) -> Batch:
    """Rows of one or more whole examples each. Where a row holds several, each example sees
    only itself (a block-diagonal causal mask) and its positions restart at 0, and its first
    token is not a target: the model computes exactly what it would on each example alone."""
    import torch

    length = length or max(sum(len(e.input_ids) for e in row) for row in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(rows), length), dtype=torch.long)
    document = torch.full((len(rows), length), -1, dtype=torch.long)
    tokens = 0
    for r, row in enumerate(rows):
        at = 0
        for d, example in enumerate(row):
            n = len(example.input_ids)
            ids[r, at:at + n] = torch.tensor(example.input_ids, dtype=torch.long)
            labels[r, at:at + n] = torch.tensor(example.labels, dtype=torch.long)
            labels[r, at] = IGNORE  # never predicted from the example before it
            positions[r, at:at + n] = torch.arange(n)
            document[r, at:at + n] = d
            at += n
        tokens += at
    loss_tokens = int((labels[:, 1:] != IGNORE).sum())
    if all(len(row) == 1 for row in rows):
        return Batch(ids, (document >= 0).long(), labels, tokens, loss_tokens)
    causal = torch.ones((length, length), dtype=torch.bool).tril()
    mask = (document[:, :, None] == document[:, None, :]) & causal   # padding sees padding: no empty row
    return Batch(ids, mask[:, None], labels, tokens, loss_tokens, positions)


def fill_rows(examples: list[Example], width: int, decreasing: bool = True) -> list[list[Example]]:
    """First-fit (decreasing): the examples in as few rows of `width` tokens as it finds."""
    rows: list[list[Example]] = []
    room: list[int] = []
    for e in sorted(examples, key=lambda e: -len(e.input_ids)) if decreasing else examples:
        n = len(e.input_ids)
        for i in range(max(0, len(rows) - OPEN_ROWS), len(rows)):  # bounded: linear in examples
            if room[i] >= n:
                rows[i].append(e)
                room[i] -= n
                break
        else:
            rows.append([e])
            room.append(width - n)
    return rows


def pack(examples: list[Example], length: int) -> list[list[Example]]:
    """The examples in rows of at most `length` tokens (whole examples only), first-fit in
    their (shuffled) order: each goes into the first row with room for it."""
    return fill_rows(examples, length, decreasing=False)


def epoch_batches(examples: list[Example], *, batch_size: int, packing: bool, length: int,
                  pad_id: int, rng: random.Random) -> list[Batch]:
    """One epoch's batches in training order (see the module docstring)."""
    order = list(range(len(examples)))
    rng.shuffle(order)
    shuffled = [examples[i] for i in order]
    if packing:
        rows = pack(shuffled, length)
        return [collate_rows(rows[s:s + batch_size], pad_id, length) for s in range(0, len(rows), batch_size)]
    # Random batches of batch_size examples, as any trainer draws them; the examples of a
    # batch share rows as long as its longest, so the padding is only what does not fit.
    return [collate_rows(fill_rows(shuffled[s:s + batch_size], max(len(e.input_ids)
                                                                    for e in shuffled[s:s + batch_size])), pad_id)
            for s in range(0, len(shuffled), batch_size)]


def eval_batches(examples: list[Example], *, batch_size: int, pad_id: int) -> list[Batch]:
    """Examples one by one (never packed, so every job's eval loss means the same thing),
    sorted by length so that batches carry little padding."""
    ordered = sorted(examples, key=lambda e: len(e.input_ids))
    return [collate(ordered[s:s + batch_size], pad_id) for s in range(0, len(ordered), batch_size)]
