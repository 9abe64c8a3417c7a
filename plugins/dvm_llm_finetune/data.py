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
example never attends to another in its row (positions restarting at 0, and a block-diagonal
causal mask made on the device, by the model itself where it can: see the batches section) and
its first token is not predicted from the one before: training computes what it would on each
example alone. Each epoch draws a new order from the job's seed.

Memory: the tokens are kept compact (`Examples`, int32), an epoch is planned as indices and its
batches are built one at a time as training reaches them (`Batches`), so host memory is the
data itself plus one batch, whatever the number of tokens (tests/benchmarks/bench_llm_memory.py).
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


class Examples:
    """Tokenized examples, compact: every token id in one int32 array, whether each token is a
    target (its label is its id, else IGNORE) in one bool array, and where each example starts.
    About 5 bytes a token, where lists of Python ints (`Example`) take about 70: a 50 M-token
    training set is 250 MB, not several GB. Indexing gives an `Example` (lists), iterating too."""

    def __init__(self, ids, trained, starts):
        import numpy as np

        self.ids = np.asarray(ids, dtype=np.int32)
        self.trained = np.asarray(trained, dtype=np.bool_)
        self.starts = np.asarray(starts, dtype=np.int64)        # len(self) + 1 offsets
        self.lengths = np.diff(self.starts)
        # Targets of each example after its first token (never predicted from the one before).
        after_first = self.trained.copy()
        after_first[self.starts[:-1][self.lengths > 0]] = False
        self.loss_counts = np.add.reduceat(after_first, self.starts[:-1], dtype=np.int64) \
            if len(self.lengths) and len(after_first) else np.zeros(len(self.lengths), dtype=np.int64)
        self.loss_counts[self.lengths == 0] = 0

    @classmethod
    def of(cls, examples) -> "Examples":
        """`examples` as `Examples` (a list of `Example`s is converted)."""
        if isinstance(examples, Examples):
            return examples
        builder = ExamplesBuilder()
        for e in examples:
            builder.add(e.input_ids, e.labels)
        return builder.finish()

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.take(range(len(self))[index])
        ids, labels = self.arrays(index)
        return Example(ids.tolist(), labels.tolist())

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def arrays(self, index: int):
        """(ids, labels) of one example as int32 arrays."""
        import numpy as np

        a, b = self.starts[index], self.starts[index + 1]
        ids = self.ids[a:b]
        return ids, np.where(self.trained[a:b], ids, np.int32(IGNORE))

    def take(self, indices) -> "Examples":
        """The examples at `indices`, in that order."""
        import numpy as np

        indices = np.asarray(indices, dtype=np.int64)
        if not len(indices):
            return Examples(np.zeros(0, np.int32), np.zeros(0, np.bool_), np.zeros(1, np.int64))
        lengths = self.lengths[indices]
        starts = np.zeros(len(indices) + 1, dtype=np.int64)
        np.cumsum(lengths, out=starts[1:])
        # Gather every token of the chosen examples at once: its source offset is its
        # example's start plus its place in the example.
        source = np.repeat(self.starts[indices] - starts[:-1], lengths) + np.arange(starts[-1], dtype=np.int64)
        return Examples(self.ids[source], self.trained[source], starts)

    @property
    def tokens(self) -> int:
        return int(self.starts[-1])

    @property
    def nbytes(self) -> int:
        return self.ids.nbytes + self.trained.nbytes + self.starts.nbytes


class ExamplesBuilder:
    """Collects examples one by one into `Examples` (growing typed arrays, never int lists)."""

    def __init__(self):
        from array import array

        self._ids = array("i")
        self._trained = array("b")
        self._starts = [0]

    def add(self, ids: list[int], labels: list[int] | None = None) -> None:
        """One example; `labels` None: every token is a target. A label must be its token's id
        or IGNORE (all this module produces)."""
        if labels is None:
            trained = b"\x01" * len(ids)
        else:
            if len(labels) != len(ids):
                raise ValueError("labels and input_ids differ in length")
            for token, label in zip(ids, labels):
                if label != token and label != IGNORE:
                    raise ValueError(f"label {label} is neither the token id {token} nor IGNORE")
            trained = bytes(label != IGNORE for label in labels)
        self._ids.extend(ids)
        self._trained.frombytes(trained)
        self._starts.append(len(self._ids))

    def __len__(self) -> int:
        return len(self._starts) - 1

    def finish(self) -> Examples:
        import numpy as np

        if not len(self._ids):
            return Examples(np.zeros(0, np.int32), np.zeros(0, np.bool_), np.asarray(self._starts, dtype=np.int64))
        # Views of the arrays' own buffers (kept alive by the views): no copy of the tokens.
        return Examples(np.frombuffer(self._ids, dtype=np.int32), np.frombuffer(self._trained, dtype=np.bool_),
                        np.asarray(self._starts, dtype=np.int64))


@dataclass
class Tokenized:
    examples: Examples
    dropped_too_long: int
    loss_on: str                      # what the loss is computed on, for the model card

    @property
    def tokens(self) -> int:
        return self.examples.tokens


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
    examples = ExamplesBuilder()
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
                    examples.add(piece)
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
        examples.add(ids, labels)
    if not len(examples):
        if dropped:
            raise JobInputError(f"every example of the {what} is longer than max_seq_length="
                                f"{max_seq_length} tokens (the shortest has {shortest_dropped}): "
                                "raise max_seq_length or shorten them")
        raise JobInputError(f"the {what} has no tokens to learn from")
    return Tokenized(examples.finish(), dropped, loss_on)


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


def split_eval(examples, fraction: float, seed: int) -> tuple[Examples, Examples]:
    """A seeded held-out share of the examples: (train, eval)."""
    examples = Examples.of(examples)
    if fraction <= 0 or len(examples) < 2:
        return examples, examples.take([])
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(examples) - 1, max(1, round(len(examples) * fraction)))
    held = set(order[:n_eval])
    return examples.take([i for i in range(len(examples)) if i not in held]), examples.take(order[:n_eval])


# --- batches ---------------------------------------------------------------------------------
#
# An epoch is planned up front as example indices only (which examples share which row of which
# batch: a few bytes an example); each batch's tensors are built when the loop reaches it, and
# without any rows × L × L mask: a row holding several examples carries position ids that
# restart at 0 for each, and which example each token belongs to (`Batch.document`), from
# which the device builds the block-diagonal mask when the model does not isolate packed
# examples by their positions itself (`train.positions_isolate`). Host memory is then the
# compact examples (`Examples`) plus one batch, whatever the epoch's size.

@dataclass
class Batch:
    input_ids: "torch.Tensor"       # noqa: F821 - rows × length, int64
    labels: "torch.Tensor"          # noqa: F821 - IGNORE where no loss
    tokens: int                     # real (non-padding) tokens
    loss_tokens: int                # tokens the loss is on (labels shifted by one)
    position_ids: "torch.Tensor | None" = None  # noqa: F821 - restarting at 0 for each example
    document: "torch.Tensor | None" = None      # noqa: F821 - each token's example in its row (-1: padding)


def _collate(examples: Examples, rows: list[list[int]], pad_id: int, length: int | None = None) -> Batch:
    """Rows of one or more whole examples (indices into `examples`). Where a row holds several,
    each example's positions restart at 0 and `document` tells them apart, and its first token
    is not a target: the model computes exactly what it would on each example alone. Rows of
    one example each are right-padded and carry neither (a causal model never looks right)."""
    import numpy as np
    import torch

    lengths, starts = examples.lengths, examples.starts
    length = length or max(int(sum(lengths[i] for i in row)) for row in rows)
    ids = np.full((len(rows), length), pad_id, dtype=np.int64)
    labels = np.full((len(rows), length), IGNORE, dtype=np.int64)
    positions = np.zeros((len(rows), length), dtype=np.int64)
    document = np.full((len(rows), length), -1, dtype=np.int64)
    tokens = 0
    for r, row in enumerate(rows):
        at = 0
        for d, i in enumerate(row):
            a, b = int(starts[i]), int(starts[i + 1])
            n = b - a
            piece = examples.ids[a:b]
            ids[r, at:at + n] = piece
            labels[r, at:at + n] = np.where(examples.trained[a:b], piece, IGNORE)
            labels[r, at] = IGNORE  # never predicted from the example before it
            positions[r, at:at + n] = np.arange(n)
            document[r, at:at + n] = d
            at += n
        tokens += at
    loss_tokens = int((labels[:, 1:] != IGNORE).sum())
    ids_t, labels_t = torch.from_numpy(ids), torch.from_numpy(labels)
    if all(len(row) == 1 for row in rows):
        return Batch(ids_t, labels_t, tokens, loss_tokens)
    return Batch(ids_t, labels_t, tokens, loss_tokens, torch.from_numpy(positions), torch.from_numpy(document))


class Batches:
    """An epoch's (or an evaluation's) batches in order, each built only when it is used:
    `plans` holds, per batch, its rows of example indices. Indexing with an int gives a
    `Batch`, with a slice another `Batches`; ``batches * n`` repeats the plan.
    `tokens`/`loss_tokens` count from the plans without building anything."""

    def __init__(self, examples: Examples, plans: list[list[list[int]]], pad_id: int, length: int | None):
        self.examples = examples
        self.plans = plans
        self.pad_id = pad_id
        self.length = length

    def __len__(self) -> int:
        return len(self.plans)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return Batches(self.examples, self.plans[index], self.pad_id, self.length)
        return _collate(self.examples, self.plans[index], self.pad_id, self.length)

    def __iter__(self):
        return (_collate(self.examples, plan, self.pad_id, self.length) for plan in self.plans)

    def __mul__(self, n: int) -> "Batches":
        return Batches(self.examples, self.plans * n, self.pad_id, self.length)

    def loss_tokens(self) -> int:
        """Tokens the loss is on, over all batches."""
        return int(sum(int(self.examples.loss_counts[i]) for plan in self.plans for row in plan for i in row))

    def tokens(self) -> int:
        return int(sum(int(self.examples.lengths[i]) for plan in self.plans for row in plan for i in row))


def collate(examples: list[Example], pad_id: int, length: int | None = None) -> Batch:
    """One example per row, right-padded to the longest."""
    return collate_rows([[e] for e in examples], pad_id, length)


def collate_rows(rows: list[list[Example]], pad_id: int, length: int | None = None) -> Batch:
    """Rows of one or more whole examples each (see `_collate`)."""
    flat = Examples.of([e for row in rows for e in row])
    plan, at = [], 0
    for row in rows:
        plan.append(list(range(at, at + len(row))))
        at += len(row)
    return _collate(flat, plan, pad_id, length)


def _fill(lengths: list[int], order: list[int], width: int, decreasing: bool) -> list[list[int]]:
    """First-fit (decreasing) of the examples `order` names, by their `lengths`, into rows of
    `width` tokens: rows of indices."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(order, key=lambda i: -lengths[i]) if decreasing else order:
        n = lengths[i]
        for r in range(max(0, len(rows) - OPEN_ROWS), len(rows)):  # bounded: linear in examples
            if room[r] >= n:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(width - n)
    return rows


def fill_rows(examples: list[Example], width: int, decreasing: bool = True) -> list[list[Example]]:
    """First-fit (decreasing): the examples in as few rows of `width` tokens as it finds."""
    lengths = [len(e.input_ids) for e in examples]
    return [[examples[i] for i in row] for row in _fill(lengths, list(range(len(examples))), width, decreasing)]


def pack(examples: list[Example], length: int) -> list[list[Example]]:
    """The examples in rows of at most `length` tokens (whole examples only), first-fit in
    their (shuffled) order: each goes into the first row with room for it."""
    return fill_rows(examples, length, decreasing=False)


def epoch_batches(examples, *, batch_size: int, packing: bool, length: int, pad_id: int,
                  rng: random.Random) -> Batches:
    """One epoch's batches in training order (see the module docstring), planned now, built
    one by one as they are used."""
    examples = Examples.of(examples)
    order = list(range(len(examples)))
    rng.shuffle(order)
    lengths = examples.lengths.tolist()
    if packing:
        rows = _fill(lengths, order, length, decreasing=False)
        return Batches(examples, [rows[s:s + batch_size] for s in range(0, len(rows), batch_size)], pad_id, length)
    # Random batches of batch_size examples, as any trainer draws them; the examples of a
    # batch share rows as long as its longest, so the padding is only what does not fit.
    plans = []
    for s in range(0, len(order), batch_size):
        drawn = order[s:s + batch_size]
        plans.append(_fill(lengths, drawn, max(lengths[i] for i in drawn), decreasing=True))
    return Batches(examples, plans, pad_id, None)


def eval_batches(examples, *, batch_size: int, pad_id: int) -> Batches:
    """Examples one by one (never packed, so every job's eval loss means the same thing),
    sorted by length so that batches carry little padding."""
    examples = Examples.of(examples)
    lengths = examples.lengths.tolist()
    ordered = sorted(range(len(examples)), key=lambda i: lengths[i])
    return Batches(examples, [[[i] for i in ordered[s:s + batch_size]] for s in range(0, len(ordered), batch_size)],
                   pad_id, None)
