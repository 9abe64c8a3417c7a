"""The llm-finetune plugin's data path off the heap: the tokenized examples in a file of the job's
work folder, read back batch by batch, and the JSONL records read again rather than kept.

Proves, without a model: examples built into a file and in memory are the same examples (the
same digest as the in-memory arrays hashed whole, the same seeded batches, the same held-out
split, which is a view of the file); the launch files round-trip; `read_jsonl` keeps no records,
hashes the file as `sha256_file` does and refuses a file changed after it was checked; and the
chat template's renders come back through files, in order.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
from pathlib import Path

import pytest

np = pytest.importorskip("numpy")
pytest.importorskip("torch")
pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
try:
    import dvm_llm_finetune  # noqa: F401
except ImportError:  # not installed as a package yet: use the source tree
    sys.path.insert(0, str(REPO / "plugins"))

from dvm_core import JobError  # noqa: E402
from dvm_core.datarefs import sha256_file  # noqa: E402
from dvm_llm_finetune import data as datamod  # noqa: E402
from dvm_llm_finetune import launch as launchmod  # noqa: E402
from dvm_llm_finetune.transcript import examples_digest  # noqa: E402


def whole_digest(ids, trained, starts) -> str:
    """The digest as it was computed before the file: the three arrays hashed whole."""
    h = hashlib.sha256()
    for name, array in (("ids", ids), ("trained", trained), ("starts", starts)):
        h.update(f"{name}\0{array.dtype.str}\0{array.shape}\0".encode())
        h.update(array.tobytes())
    return h.hexdigest()


def random_examples(n: int = 1500, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ids = [rng.randint(0, 50000) for _ in range(rng.randint(2, 400))]
        cut = rng.randint(0, len(ids) - 1)
        out.append((ids, [datamod.IGNORE] * cut + ids[cut:]))
    return out


def same_batch(a, b) -> bool:
    for field in ("input_ids", "labels", "position_ids", "document"):
        x, y = getattr(a, field), getattr(b, field)
        if (x is None) != (y is None) or (x is not None and not bool((x == y).all())):
            return False
    return a.tokens == b.tokens and a.loss_tokens == b.loss_tokens


def test_examples_in_a_file_are_the_examples_in_memory(tmp_path, monkeypatch):
    monkeypatch.setattr(datamod, "CHUNK_TOKENS", 5000)    # many writes and reads across pieces
    in_memory, in_file = datamod.ExamplesBuilder(), datamod.ExamplesBuilder(tmp_path)
    for ids, labels in random_examples():
        in_memory.add(ids, labels)
        in_file.add(ids, labels)
    memory, disk = in_memory.finish(), in_file.finish()
    assert disk.on_disk and not memory.on_disk and len(list(tmp_path.iterdir())) == 0   # unnamed files
    assert np.array_equal(disk.loss_counts, memory.loss_counts) and disk.tokens == memory.tokens
    expected = whole_digest(memory.ids, memory.trained, memory.starts)
    assert examples_digest(disk) == examples_digest(memory) == expected
    assert disk[7] == memory[7] and disk[-1] == memory[len(memory) - 1]

    # The held-out split: views of the same file, the same examples as in memory.
    (train_d, eval_d), (train_m, eval_m) = (datamod.split_eval(x, 0.1, 3) for x in (disk, memory))
    assert train_d.on_disk and examples_digest(train_d) == examples_digest(train_m)
    assert examples_digest(eval_d) == whole_digest(eval_m.ids, eval_m.trained, eval_m.starts)
    assert examples_digest(train_d[:100]) == examples_digest(train_m[:100])

    for packing in (True, False):
        batches = [datamod.epoch_batches(x, batch_size=8, packing=packing, length=1024, pad_id=0,
                                         rng=random.Random(5)) for x in (train_d, train_m)]
        assert batches[0].plans == batches[1].plans
        assert batches[0].loss_tokens() == batches[1].loss_tokens()
        assert all(same_batch(a, b) for a, b in zip(*batches))
    evals = [datamod.eval_batches(x, batch_size=8, pad_id=0) for x in (eval_d, eval_m)]
    assert all(same_batch(a, b) for a, b in zip(*evals))

    # What `launch` hands the accelerate children: written and read back piece by piece.
    launch = tmp_path / "launch"
    launch.mkdir()
    launchmod._save_examples(launch, "train", train_d)
    back = launchmod._load_examples(launch, "train")
    assert back.on_disk and examples_digest(back) == examples_digest(train_m)
    assert np.array_equal(back.loss_counts, train_m.loss_counts)
    assert np.array_equal(np.load(launch / "train.ids.npy"), train_m.ids)   # plain .npy files


def test_read_jsonl_keeps_no_records_and_rereads_the_file(tmp_path):
    path = tmp_path / "train.jsonl"
    lines = [json.dumps({"text": f"the cat number {i} sees the dog."}) for i in range(50)]
    path.write_text("\n".join(lines[:25]) + "\n\n  \n" + "\n".join(lines[25:]))   # blank lines, no final newline
    dataset = datamod.read_jsonl(path, what="training set", max_bytes=10**6, max_examples=100)
    assert isinstance(dataset.records, datamod.Records) and len(dataset.records) == 50
    assert dataset.sha256 == sha256_file(path) and dataset.bytes == path.stat().st_size
    assert list(dataset.records) == [json.loads(line) for line in lines]
    assert dataset.records[30] == json.loads(lines[30]) and dataset.records[-1] == json.loads(lines[-1])
    path.write_text("\n".join(lines[:10]) + "\n")
    with pytest.raises(JobError, match="changed on disk after it was checked"):
        list(dataset.records)


def test_tokenize_writes_into_the_folder_given(tmp_path):
    from tests.test_llm_finetune import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    path = tmp_path / "chat.jsonl"
    conversations = [[{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"hello {i}"},
                      {"role": "user", "content": "bye"}, {"role": "assistant", "content": "see you"}]
                     for i in range(30)]
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in conversations))
    dataset = datamod.read_jsonl(path, what="training set", max_bytes=10**6, max_examples=100)
    work = tmp_path / "work"
    tokenized = datamod.tokenize(dataset, tokenizer, 256, what="training set", folder=work)
    assert tokenized.examples.on_disk and tokenized.loss_on == "assistant turns"
    assert list(work.iterdir()) == []      # the chat renders' folder is gone, the token files unnamed
    for i in (0, 17, 29):
        whole = tokenizer.apply_chat_template(conversations[i], tokenize=False)
        assert tokenizer.decode(tokenized.examples[i].input_ids) == whole


@pytest.mark.parametrize("fmt", ["text", "prompt-completion"])
def test_tokenizing_in_batches_gives_the_ids_of_one_call_per_record(tmp_path, monkeypatch, fmt):
    """The tokenizer gets ENCODE_BATCH records' texts a call; the examples must be those of one
    call per record (the transcript's examples digest, which a verifier recomputes, depends on it),
    whatever the batch size, with odd texts and a last batch cut short."""
    from tests.test_llm_finetune import build_tokenizer

    tokenizer = build_tokenizer()
    texts = [f"the cat number {i} sees the dog." for i in range(40)] + \
        ["", " ", "  leading", "trailing  ", "héllo wörld ✓", "a\nb\n\n", "the " * 300]
    if fmt == "text":
        records = [{"text": t} for t in texts]
    else:
        records = [{"prompt": t, "completion": f" answer {i} {t[:5]}"} for i, t in enumerate(texts)]
    dataset = datamod.Dataset(records=records, format=fmt, sha256="-", bytes=0)
    digests = []
    for batch in (1, 7, 256):
        monkeypatch.setattr(datamod, "ENCODE_BATCH", batch)
        digests.append(examples_digest(datamod.tokenize(dataset, tokenizer, 48, what="training set").examples))
    assert digests[0] == digests[1] == digests[2]
    one = datamod.tokenize(dataset, tokenizer, 48, what="training set").examples
    first = tokenizer(records[0]["text"] if fmt == "text" else records[0]["prompt"], add_special_tokens=True)
    assert list(one[0].input_ids[:len(first["input_ids"])]) == first["input_ids"]   # a single call's ids
