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

Memory: nothing grows with the number of tokens. `read_jsonl` checks every line (format,
fields, limits) and hashes the file in one pass but keeps no record (`Records` parses the file
again when `tokenize` iterates it; chat conversations go to the template's child process and
come back rendered one a line through files). `tokenize` writes the int32 token ids and bool
targets to a temporary file in the job's work folder as they come (`ExamplesBuilder(folder)`,
a megabyte or so buffered), keeping in memory only each example's start, length and loss count
(`Examples`, 32 bytes an example); the held-out split and slices are views of the same file.
An epoch is planned as example indices (the same seeded order as ever), and each batch is built
when training reaches it, its examples read from the file with ``os.pread`` (`Batches`): those
pages sit in the kernel's page cache, not in the process's resident set, as a memory map's
touched pages would. Host memory is then a few bytes an example plus one batch: 0.27-0.28 GiB
(interpreter, torch and tokenizer included) for 20 M as for 60 M tokens at L = 2,048
(tests/benchmarks/bench_llm_memory.py); the file takes about 5 bytes a token on disk.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from dvm_core import JobError, JobInputError

IGNORE = -100
FORMATS = {"text": ("text",), "prompt-completion": ("prompt", "completion"), "chat": ("messages",)}
ROLES = ("system", "user", "assistant", "tool")
OPEN_ROWS = 64   # first-fit looks for room in the last this many rows only
CHUNK_TOKENS = 1 << 20   # tokens written to, or read from, the examples' files at once
ENCODE_BATCH = 256       # records whose texts go to the tokenizer in one call


@dataclass
class Dataset:
    """A checked JSONL file: its records (one format; `read_jsonl` gives `Records`, read again
    from the file when iterated, a list does as well), sha256 and size."""

    records: "list[dict] | Records"
    format: str
    sha256: str
    bytes: int


class Records:
    """The records of a JSONL file `read_jsonl` has checked, parsed again from the file each
    time they are iterated: holding them all would hold the whole dataset in memory."""

    def __init__(self, path: Path, count: int, what: str, stamp: tuple | None = None):
        self.path, self.count, self.what = Path(path), count, what
        self._stamp = stamp or _stamp(self.path)   # (size, mtime, inode) when it was checked

    def __len__(self) -> int:
        return self.count

    def __iter__(self):
        if _stamp(self.path) != self._stamp:
            raise JobError(f"the {self.what} changed on disk after it was checked")
        with open(self.path, "rb") as f:
            for raw in f:
                line = raw.decode("utf-8")
                if line.strip():
                    yield json.loads(line)

    def __getitem__(self, index: int) -> dict:
        if index < 0:
            index += self.count
        if not 0 <= index < self.count:
            raise IndexError(index)
        for i, record in enumerate(self):
            if i == index:
                return record
        raise IndexError(index)


def _stamp(path: Path) -> tuple:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns, stat.st_ino


@dataclass
class Example:
    """One tokenized example: token ids and labels (IGNORE where there is no loss)."""

    input_ids: list[int]
    labels: list[int]


class _Column:
    """A flat array of one dtype (an example's tokens are a range of it): in memory (a numpy
    array), or in a file read with explicit reads (``os.pread``), whose pages then stay in the
    page cache, not in this process's resident set, however much of the file an epoch reads."""

    def __init__(self, dtype, array=None, *, file=None, offset: int = 0, size: int = 0):
        import numpy as np

        self.dtype = np.dtype(dtype)
        self.array = None if array is None else np.asarray(array, dtype=self.dtype)
        self.file = file            # an open binary file, kept open (a temporary file lives with it)
        self.offset = offset        # where the array starts in it (after a .npy header)
        self.size = len(self.array) if self.array is not None else size

    def read(self, a: int, b: int):
        """Elements [a, b), as an array (read-only when read from the file)."""
        import numpy as np

        if self.array is not None:
            return self.array[a:b]
        if b <= a:
            return np.zeros(0, dtype=self.dtype)
        size = self.dtype.itemsize
        want, at = (b - a) * size, self.offset + a * size
        parts = []
        while want:
            part = os.pread(self.file.fileno(), want, at)
            if not part:
                raise OSError(f"{getattr(self.file, 'name', 'token file')}: ends before element {b}")
            parts.append(part)
            want -= len(part)
            at += len(part)
        return np.frombuffer(parts[0] if len(parts) == 1 else b"".join(parts), dtype=self.dtype)


class Examples:
    """Tokenized examples, compact: every token id in one int32 array, whether each token is a
    target (its label is its id, else IGNORE) in one bool array, and where each example starts.
    About 5 bytes a token, where lists of Python ints (`Example`) take about 70. Those two
    arrays are in memory (`Examples.of`, `ExamplesBuilder()`) or in a file (`tokenize`:
    ``ExamplesBuilder(folder)``), from which each example is read when it is used: then only
    the per-example figures (starts, lengths, loss counts: 32 bytes an example) are in memory,
    whatever the number of tokens. `take` and slices are views (no token is copied).
    Indexing gives an `Example` (lists), iterating too; `ids`/`trained` the whole arrays, in
    memory (small sets only: `chunks` reads them piece by piece)."""

    def __init__(self, ids, trained, starts, *, at=None, loss_counts=None):
        import numpy as np

        self._ids = ids if isinstance(ids, _Column) else _Column(np.int32, ids)
        self._trained = trained if isinstance(trained, _Column) else _Column(np.bool_, trained)
        self.starts = np.asarray(starts, dtype=np.int64)        # len(self) + 1 offsets, as if contiguous
        self.lengths = np.diff(self.starts)
        # Where each example's tokens are in the two arrays (a view taken by `take` skips some).
        self._at = self.starts[:-1] if at is None else np.asarray(at, dtype=np.int64)
        if loss_counts is not None:
            self.loss_counts = np.asarray(loss_counts, dtype=np.int64)
        elif self._trained.array is not None and at is None:
            # Targets of each example after its first token (never predicted from the one before).
            after_first = self._trained.array.copy()
            after_first[self.starts[:-1][self.lengths > 0]] = False
            self.loss_counts = np.add.reduceat(after_first, self.starts[:-1], dtype=np.int64) \
                if len(self.lengths) and len(after_first) else np.zeros(len(self.lengths), dtype=np.int64)
            self.loss_counts[self.lengths == 0] = 0
        else:
            self.loss_counts = np.array([int(self._trained.read(a + 1, a + n).sum()) if n else 0
                                         for a, n in zip(self._at.tolist(), self.lengths.tolist())], dtype=np.int64)

    @classmethod
    def of(cls, examples) -> "Examples":
        """`examples` as `Examples` (a list of `Example`s is converted, in memory)."""
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

    def pieces(self, index: int):
        """(ids, trained) of one example: an int32 and a bool array."""
        if index < 0:
            index += len(self)
        a = int(self._at[index])
        b = a + int(self.lengths[index])
        return self._ids.read(a, b), self._trained.read(a, b)

    def arrays(self, index: int):
        """(ids, labels) of one example as int32 arrays."""
        import numpy as np

        ids, trained = self.pieces(index)
        return ids, np.where(trained, ids, np.int32(IGNORE))

    def take(self, indices) -> "Examples":
        """The examples at `indices`, in that order: a view, sharing the token arrays."""
        import numpy as np

        indices = np.asarray(indices, dtype=np.int64)
        lengths = self.lengths[indices]
        starts = np.zeros(len(indices) + 1, dtype=np.int64)
        np.cumsum(lengths, out=starts[1:])
        return Examples(self._ids, self._trained, starts, at=self._at[indices], loss_counts=self.loss_counts[indices])

    def _runs(self):
        """(first, end) in the token arrays of each run of examples stored one after another."""
        import numpy as np

        if not len(self):
            return
        ends = self._at + self.lengths
        breaks = np.flatnonzero(self._at[1:] != ends[:-1]) + 1
        for s, e in zip([0, *breaks.tolist()], [*breaks.tolist(), len(self)]):
            yield int(self._at[s]), int(ends[e - 1])

    def chunks(self, part: str, size: int = CHUNK_TOKENS):
        """The ``"ids"`` or ``"trained"`` of all examples in order, as arrays of at most `size`."""
        column = {"ids": self._ids, "trained": self._trained}[part]
        for a, b in self._runs():
            for s in range(a, b, size):
                yield column.read(s, min(b, s + size))

    def _whole(self, part: str):
        import numpy as np

        column = {"ids": self._ids, "trained": self._trained}[part]
        if column.array is not None and len(self) and int(self._at[0]) == 0 and \
                np.array_equal(self._at, self.starts[:-1]):
            return column.array[:self.tokens]
        parts = list(self.chunks(part))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=column.dtype)

    @property
    def ids(self):
        """Every token id in order, in memory (use `chunks` for a large set)."""
        return self._whole("ids")

    @property
    def trained(self):
        """Whether each token is a target, in order, in memory (use `chunks` for a large set)."""
        return self._whole("trained")

    @property
    def on_disk(self) -> bool:
        return self._ids.array is None

    @property
    def tokens(self) -> int:
        return int(self.starts[-1])

    @property
    def nbytes(self) -> int:
        """The size of the examples as arrays (token ids, targets, starts), wherever they are."""
        return self.tokens * (4 + 1) + self.starts.nbytes

    def save(self, folder: Path, name: str) -> None:
        """Write ``<name>.{ids,trained,starts,loss_counts}.npy`` into `folder`, the token
        arrays piece by piece (`load` reads them back)."""
        import numpy as np

        for part in ("ids", "trained"):
            column = {"ids": self._ids, "trained": self._trained}[part]
            with open(folder / f"{name}.{part}.npy", "wb") as f:
                np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(column.dtype),
                                                         "fortran_order": False, "shape": (self.tokens,)})
                for chunk in self.chunks(part):
                    f.write(chunk.tobytes())
        np.save(folder / f"{name}.starts.npy", self.starts, allow_pickle=False)
        np.save(folder / f"{name}.loss_counts.npy", self.loss_counts, allow_pickle=False)

    @classmethod
    def load(cls, folder: Path, name: str) -> "Examples":
        """What `save` wrote, the token arrays left in their files (read when used)."""
        import numpy as np

        from dvm_core.archives import NUMPY_HEADER_LOCK   # numpy's header parsing is not thread-safe

        columns = []
        for part, dtype in (("ids", np.int32), ("trained", np.bool_)):
            f = open(folder / f"{name}.{part}.npy", "rb")
            with NUMPY_HEADER_LOCK:
                version = np.lib.format.read_magic(f)
                if version != (1, 0):
                    raise ValueError(f"{f.name}: .npy version {version}, not (1, 0)")
                shape, fortran, got = np.lib.format.read_array_header_1_0(f)
            if got != np.dtype(dtype) or fortran or len(shape) != 1:
                raise ValueError(f"{f.name}: not a flat {np.dtype(dtype)} array")
            columns.append(_Column(dtype, file=f, offset=f.tell(), size=shape[0]))
        with NUMPY_HEADER_LOCK:
            starts = np.load(folder / f"{name}.starts.npy", allow_pickle=False)
            loss_counts = np.load(folder / f"{name}.loss_counts.npy", allow_pickle=False)
        if int(starts[-1]) != columns[0].size:
            raise ValueError(f"{name}: the starts do not match the tokens")
        return cls(*columns, starts, loss_counts=loss_counts)


class ExamplesBuilder:
    """Collects examples one by one into `Examples` (growing typed arrays, never int lists):
    in memory, or, given a `folder`, written to a temporary file there (unnamed: it goes when
    the `Examples` do) every `CHUNK_TOKENS` tokens, so that only the per-example figures grow."""

    def __init__(self, folder: Path | None = None):
        from array import array

        self._ids = array("i")
        self._trained = array("b")
        self._starts = array("q", [0])
        self._loss_counts = array("q")
        self._files = None
        self._written = 0
        if folder is not None:
            Path(folder).mkdir(parents=True, exist_ok=True)
            self._files = tuple(tempfile.TemporaryFile(dir=folder, prefix=f"examples-{part}-")
                                for part in ("ids", "trained"))

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
        self._starts.append(self._written + len(self._ids))
        self._loss_counts.append(trained.count(1, 1))   # its first token is never a target
        if self._files is not None and len(self._ids) >= CHUNK_TOKENS:
            self._flush()

    def _flush(self) -> None:
        from array import array

        self._files[0].write(self._ids)
        self._files[1].write(self._trained)
        self._written += len(self._ids)
        self._ids, self._trained = array("i"), array("b")

    def __len__(self) -> int:
        return len(self._starts) - 1

    def finish(self) -> Examples:
        import numpy as np

        starts = np.frombuffer(self._starts, dtype=np.int64)
        loss_counts = np.frombuffer(self._loss_counts, dtype=np.int64)
        if self._files is not None:
            self._flush()
            for f in self._files:
                f.flush()
            return Examples(_Column(np.int32, file=self._files[0], size=self._written),
                            _Column(np.bool_, file=self._files[1], size=self._written), starts,
                            loss_counts=loss_counts)
        if not len(self._ids):
            return Examples(np.zeros(0, np.int32), np.zeros(0, np.bool_), starts, loss_counts=loss_counts)
        # Views of the arrays' own buffers (kept alive by the views): no copy of the tokens.
        return Examples(np.frombuffer(self._ids, dtype=np.int32), np.frombuffer(self._trained, dtype=np.bool_),
                        starts, loss_counts=loss_counts)


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
    stamp = _stamp(path)
    size = stamp[0]
    if size > max_bytes:
        raise JobInputError(f"the {what} is {size} bytes; this provider takes at most {max_bytes}")
    count = 0
    fmt = None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            digest.update(raw)
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
            count += 1
            if count > max_examples:
                raise JobInputError(f"the {what} has more than {max_examples} examples (this provider's limit)")
    if not count:
        raise JobInputError(f"the {what} holds no examples: send one JSON object per line")
    # The records are not kept: `tokenize` reads them again (`Records`).
    return Dataset(records=Records(path, count, what, stamp), format=fmt, sha256=digest.hexdigest(), bytes=size)


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
             check_cancelled: Callable[[], None] = lambda: None, render_seconds: float | None = None,
             folder: Path | None = None) -> Tokenized:
    """Turn records into `Examples`, every one at most `max_seq_length` tokens, in one pass over
    the records, the tokens written as they come to a temporary file in `folder` (the job's
    work folder; None: the system's temporary folder), read back when used (`Examples`). Chat
    templates are rendered in a child process given `render_seconds` at most
    (`render.render_chats`)."""
    chat_template = dataset.format == "chat" and bool(getattr(tokenizer, "chat_template", None))
    renders = None
    if chat_template:
        from .render import RENDER_SECONDS, render_chats
        renders = render_chats(tokenizer, (record["messages"] for record in dataset.records),
                               seconds=min(RENDER_SECONDS, render_seconds or RENDER_SECONDS),
                               check_cancelled=check_cancelled, folder=folder)
    try:
        examples = ExamplesBuilder(Path(folder) if folder is not None else Path(tempfile.gettempdir()))
        return _tokenize(dataset, tokenizer, max_seq_length, what, check_cancelled, examples,
                         None if renders is None else iter(renders))
    finally:
        if renders is not None:
            renders.close()


def _tokenize(dataset: Dataset, tokenizer, max_seq_length: int, what: str, check_cancelled, examples,
              renders) -> Tokenized:
    eos = tokenizer.eos_token_id
    dropped = 0
    shortest_dropped = None
    loss_on = {"text": "all tokens", "prompt-completion": "completions (and end-of-sequence)",
               "chat": "assistant turns"}[dataset.format]
    for index, record, encoded in _encoded(dataset, tokenizer):
        if index % 1000 == 0:
            check_cancelled()
        if dataset.format == "text":
            ids = encoded[0]
            if eos is not None:
                ids = ids + [eos]
            for start in range(0, len(ids), max_seq_length):
                piece = ids[start:start + max_seq_length]
                if len(piece) >= 2:
                    examples.add(piece)
            continue
        if dataset.format == "prompt-completion":
            prompt, completion = encoded
            completion = completion + ([eos] if eos is not None else [])
            ids = prompt + completion
            labels = [IGNORE] * len(prompt) + completion
        else:
            ids, labels, masked = _chat_tokens(record["messages"], tokenizer,
                                               next(renders) if renders is not None else None)
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


def _encoded(dataset: Dataset, tokenizer):
    """(index, record, token ids of its texts) for each record: the text (with special tokens),
    or the prompt (with) and the completion (without); nothing for chats. A batch of records'
    texts goes to the tokenizer in one call, which gives the same ids as one call each with
    less overhead per record (a fast tokenizer's per-call cost was most of a short example's)."""
    fields = {"text": (("text", True),),
              "prompt-completion": (("prompt", True), ("completion", False))}.get(dataset.format, ())
    records = iter(dataset.records)
    index = 0
    while True:
        chunk = list(itertools.islice(records, ENCODE_BATCH))
        if not chunk:
            return
        columns = [tokenizer([record[name] for record in chunk], add_special_tokens=special)["input_ids"]
                   for name, special in fields]
        for offset, record in enumerate(chunk):
            yield index + offset, record, [column[offset] for column in columns]
        index += len(chunk)


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
# per-example figures (`Examples`; the tokens themselves are read from their file for each
# batch) plus one batch, whatever the epoch's size.

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

    lengths = examples.lengths
    length = length or max(int(sum(lengths[i] for i in row)) for row in rows)
    ids = np.full((len(rows), length), pad_id, dtype=np.int64)
    labels = np.full((len(rows), length), IGNORE, dtype=np.int64)
    positions = np.zeros((len(rows), length), dtype=np.int64)
    document = np.full((len(rows), length), -1, dtype=np.int64)
    tokens = 0
    for r, row in enumerate(rows):
        at = 0
        for d, i in enumerate(row):
            piece, trained = examples.pieces(i)     # read from the examples' file when there
            n = len(piece)
            ids[r, at:at + n] = piece
            labels[r, at:at + n] = np.where(trained, piece, IGNORE)
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
