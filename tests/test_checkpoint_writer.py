"""The LLM transcript's checkpoint writer (`dvm_llm_finetune.transcript.CheckpointWriter`, what
training on a GPU saves its checkpoints with): a checkpoint is copied into one page-aligned
buffer, then hashed and written with direct I/O in the background while training goes on. What must hold: the file is a safetensors file with the
state as it was when `write` was called (not as training left it afterwards), its digests are
`Checkpoint.digests()`, and a failure to write is raised, not lost.
"""

from __future__ import annotations

import errno
import json
import os
import struct
import threading

import pytest

torch = pytest.importorskip("torch")
safetensors = pytest.importorskip("safetensors")

from safetensors.torch import save as st_save  # noqa: E402

from dvm_llm_finetune import transcript as T  # noqa: E402


def state(seed: int = 0, *, optimizer: bool = True) -> T.Checkpoint:
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "model/h.0.attn.c_attn.weight": torch.randn(64, 192, generator=g),
        "model/h.0.ln_1.bias": torch.randn(64, generator=g),
        "model/wte.weight": torch.randn(50, 64, generator=g).to(torch.bfloat16),
        "model/empty": torch.empty(0, 4),
        "model/scale": torch.tensor(0.5, dtype=torch.float16),
    }
    if optimizer:
        for i, name in enumerate(["h.0.attn.c_attn.weight", "h.0.ln_1.bias"]):
            shape = tensors[f"model/{name}"].shape
            tensors[f"optim/{i}/exp_avg"] = torch.randn(shape, generator=g)
            tensors[f"optim/{i}/exp_avg_sq"] = torch.rand(shape, generator=g)
            tensors[f"optim/{i}/step"] = torch.tensor(float(seed + 1))
    return T.Checkpoint(seed, tensors, {"format": T.CHECKPOINT_FORMAT, "step": seed,
                                        "param_groups": [{"lr": 0.001 * (seed + 1), "betas": [0.9, 0.999]}],
                                        "scheduler": {"last_epoch": seed}})


def header_of(raw: bytes) -> tuple[dict, int]:
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), 8 + n


def test_files_hold_the_state_when_written_with_its_digests(tmp_path):
    writer = T.CheckpointWriter()
    points = [state(0, optimizer=False), state(1), state(2)]   # the layout grows after step 0
    expected = [(p.digests(), {k: v.clone() for k, v in p.tensors.items()}) for p in points]
    futures = []
    for p in points:
        futures.append(writer.write(p, tmp_path / f"c{p.step}.safetensors"))
        with torch.no_grad():           # training goes on: the live tensors change at once
            for t in p.tensors.values():
                t.add_(1) if t.dtype != torch.bool else None
    writer.close()
    for p, future, (digests, tensors) in zip(points, futures, expected):
        assert future.result() == digests
        loaded = T.Checkpoint.load(tmp_path / f"c{p.step}.safetensors")
        assert loaded.digests() == digests
        assert set(loaded.tensors) == set(tensors)
        for k, v in tensors.items():
            assert loaded.tensors[k].dtype == v.dtype and torch.equal(loaded.tensors[k], v), k
        assert loaded.meta == json.loads(json.dumps(p.meta))


def test_the_file_is_safetensors_own_layout_with_the_data_on_a_page(tmp_path):
    point = state(3)
    writer = T.CheckpointWriter()
    writer.write(point, tmp_path / "c.safetensors")
    writer.close()
    ours = (tmp_path / "c.safetensors").read_bytes()
    theirs = st_save({k: v.contiguous() for k, v in point.tensors.items()},
                     metadata={"dvm": json.dumps(point.meta, sort_keys=True)})
    our_header, our_start = header_of(ours)
    their_header, their_start = header_of(theirs)
    assert our_start % T.ALIGN == 0 and our_start > 8
    assert our_header["__metadata__"] == their_header["__metadata__"]
    for name, entry in their_header.items():
        if name == "__metadata__":
            continue
        a, b = our_header[name]["data_offsets"]
        c, d = entry["data_offsets"]
        assert (our_header[name]["dtype"], our_header[name]["shape"]) == (entry["dtype"], entry["shape"])
        assert ours[our_start + a:our_start + b] == theirs[their_start + c:their_start + d], name
    assert len(ours) == our_start + max(e["data_offsets"][1] for k, e in our_header.items() if k != "__metadata__")


def test_where_direct_io_is_refused_the_page_cache_writes_the_same_bytes(tmp_path, monkeypatch):
    point = state(4)
    direct = T.CheckpointWriter()
    direct.write(point, tmp_path / "direct.safetensors")
    direct.close()

    real_open = os.open

    def no_direct(path, flags, *args):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", no_direct)
    cached = T.CheckpointWriter()
    cached.write(point, tmp_path / "cached.safetensors")
    cached.close()
    assert not cached.direct
    assert (tmp_path / "cached.safetensors").read_bytes() == (tmp_path / "direct.safetensors").read_bytes()


def test_a_file_that_cannot_be_written_is_an_error_not_a_silence(tmp_path):
    writer = T.CheckpointWriter()
    future = writer.write(state(5), tmp_path / "missing" / "c.safetensors")
    with pytest.raises(FileNotFoundError):
        writer.close()
    with pytest.raises(FileNotFoundError):
        future.result()


@pytest.mark.parametrize("background", [None, True])
def test_the_recorder_saves_every_checkpoint_in_the_loop_or_the_background(tmp_path, background):
    """On the CPU the loop saves (None); forced, the background writer does, as on a GPU."""
    recorder = T.Recorder(2, tmp_path / "ck", background=background)
    model = torch.nn.Linear(8, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    for step in range(5):
        if step % 2 == 0:
            recorder.checkpoint(step, model, optimizer, scheduler)
        model(torch.randn(3, 8)).sum().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    recorder.checkpoint(5, model, optimizer, scheduler, final=True, stopped=None)
    assert [e["step"] for e in recorder.entries] == [0, 2, 4, 5]
    for entry, path in zip(recorder.entries, recorder.files):
        loaded = T.Checkpoint.load(path)
        assert loaded.step == entry["step"]
        assert (loaded.weights_sha256(), loaded.state_sha256()) == (entry["weights_sha256"], entry["state_sha256"])
    assert recorder.entries[-1]["weights_sha256"] == T.tensor_digest(T.trainable_parameters(model))
    if background:
        assert recorder.writer.cpu_seconds > 0
        assert recorder.seconds == pytest.approx(recorder.loop_seconds + recorder.writer.cpu_seconds)
    else:
        assert recorder.writer is None and recorder.seconds == recorder.loop_seconds > 0


def accepts_direct_io(folder) -> bool:
    """Whether `folder`'s file system takes an O_DIRECT write of one aligned page."""
    import mmap

    if not hasattr(os, "O_DIRECT"):
        return False
    page = mmap.mmap(-1, T.ALIGN)
    try:
        fd = os.open(folder / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
    except OSError:
        return False
    try:
        os.write(fd, page)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        os.unlink(folder / "probe")
        page.close()


def test_direct_io_is_used_where_the_file_system_takes_it(tmp_path):
    """Not a silent fall back to the page cache (an unaligned write would be refused with
    EINVAL and fall back, and every other test would still pass)."""
    if not accepts_direct_io(tmp_path):
        pytest.skip("this file system refuses direct I/O")
    writer = T.CheckpointWriter()
    for step in range(2):
        writer.write(state(step), tmp_path / f"c{step}.safetensors")
    writer.close()
    assert writer.direct
    assert T.Checkpoint.load(tmp_path / "c1.safetensors").digests() == state(1).digests()


def test_training_stopped_early_closes_the_writer(tmp_path):
    """Cancelled, NaN, out of memory: no final checkpoint, yet the checkpoint being written is
    finished, the thread stopped and the buffer freed; a failure of the writer goes with the
    job's error as a note, not over it."""
    recorder = T.Recorder(1, tmp_path / "ck", background=True)
    model = torch.nn.Linear(8, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    recorder.checkpoint(0, model, optimizer, scheduler)
    writer = recorder.writer
    error = RuntimeError("cancelled")
    recorder.abandon(error)
    assert writer._pool is None and writer._buffer is None and writer._pending is None
    assert T.Checkpoint.load(recorder.files[0]).step == 0
    assert not getattr(error, "__notes__", None)

    failing = T.Recorder(1, tmp_path / "gone", background=True)
    failing.checkpoint(0, model, optimizer, scheduler)
    failing.writer.wait()
    (tmp_path / "gone" / "checkpoint-0000000.safetensors").unlink()
    (tmp_path / "gone").rmdir()
    failing.checkpoint(1, model, optimizer, scheduler)
    error = RuntimeError("loss became NaN")
    failing.abandon(error)
    assert failing.writer._pool is None and failing.writer._buffer is None
    assert any("saving a checkpoint failed: FileNotFoundError" in note for note in error.__notes__)


def test_a_stopped_llm_training_abandons_its_recorder(tmp_path):
    """`train.train` calls `Recorder.abandon` with whatever stopped it."""
    pytest.importorskip("transformers")
    from dvm_federate import tiny
    from dvm_llm_finetune import data as datamod
    from dvm_llm_finetune import model as modelmod
    from dvm_llm_finetune.params import Limits, parse_params
    from dvm_llm_finetune.train import TrainSpec, train

    folder = tiny.save_model_folder(tmp_path / "gpt2")
    tokenizer = modelmod.load_tokenizer(folder)
    base = modelmod.check_folder(folder, source={"archive_sha256": "-"}, limits=Limits())
    params = parse_params({"method": "full", "epochs": "1", "batch_size": "4", "max_seq_length": "32",
                           "checkpoint_every": "1"}, Limits(), has_eval_input=False)
    dataset = datamod.read_jsonl(tiny.write_corpus(tmp_path / "train.jsonl", 40), what="training set",
                                 max_bytes=1 << 20, max_examples=1000)
    examples = datamod.tokenize(dataset, tokenizer, 32, what="training set").examples
    spec = TrainSpec(model_folder=str(folder), model_type=base.model_type, base_model_name="tiny",
                     params=params.as_dict(), output_dir=str(tmp_path / "out"), device="cpu")
    recorder = T.Recorder(1, tmp_path / "ck", background=True)

    def cancel_after_two_checkpoints():
        if len(recorder.entries) >= 2:
            raise RuntimeError("cancelled by the customer")

    with pytest.raises(RuntimeError, match="cancelled by the customer"):
        train(spec, examples[:36], examples[36:], tokenizer, transcript=recorder,
              check_cancelled=cancel_after_two_checkpoints)
    assert not any(e.get("final") for e in recorder.entries)
    assert recorder.files and recorder.writer is not None
    assert recorder.writer._pool is None and recorder.writer._buffer is None
    for path in recorder.files:
        T.Checkpoint.load(path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (gpu_check.sh runs it on one)")
def test_tensors_on_a_gpu_are_written_as_they_were_when_written(tmp_path):
    """Copied into a page-locked buffer without a wait per tensor: the copies are finished when
    `write` returns, before training changes the tensors."""
    writer = T.CheckpointWriter()
    points = [state(0), state(1)]
    for p in points:
        p.tensors = {k: v.to("cuda") for k, v in p.tensors.items()}
    expected = [T.Checkpoint(p.step, {k: v.cpu() for k, v in p.tensors.items()}, p.meta).digests() for p in points]
    futures = []
    for p in points:
        futures.append(writer.write(p, tmp_path / f"c{p.step}.safetensors"))
        assert writer.pinned
        with torch.no_grad():
            for t in p.tensors.values():
                t.add_(1)
    writer.close()
    for p, future, digests in zip(points, futures, expected):
        assert future.result() == digests
        assert T.Checkpoint.load(tmp_path / f"c{p.step}.safetensors").digests() == digests


def test_saved_in_the_loop_with_its_digests_in_one_pass(tmp_path):
    """`Checkpoint.save_and_digest` (the CPU's path): the digests are `digests()`, the file is a
    safetensors file whose tensors are safetensors' own bytes, its header padded to 8 only."""
    point = state(6)
    digests = point.save_and_digest(tmp_path / "c.safetensors")
    assert digests == point.digests()
    ours = (tmp_path / "c.safetensors").read_bytes()
    theirs = st_save({k: v.contiguous() for k, v in point.tensors.items()},
                     metadata={"dvm": json.dumps(point.meta, sort_keys=True)})
    our_header, our_start = header_of(ours)
    their_header, their_start = header_of(theirs)
    assert our_start % 8 == 0 and our_start - 8 - len(json.dumps(our_header, separators=(",", ":"))) < 8
    assert our_header["__metadata__"] == their_header["__metadata__"] and set(our_header) == set(their_header)
    for name, entry in their_header.items():
        if name != "__metadata__":
            (a, b), (c, d) = our_header[name]["data_offsets"], entry["data_offsets"]
            assert (our_header[name]["dtype"], our_header[name]["shape"]) == (entry["dtype"], entry["shape"])
            assert ours[our_start + a:our_start + b] == theirs[their_start + c:their_start + d], name
    assert len(ours) == len(theirs) - their_start + our_start
    loaded = T.Checkpoint.load(tmp_path / "c.safetensors")
    assert loaded.digests() == digests and loaded.meta == json.loads(json.dumps(point.meta))


def test_saved_in_the_loop_whatever_writev_takes_at_a_time(tmp_path, monkeypatch):
    """More tensors than one writev takes (IOV_MAX), each call taking only part of what it is
    given: the file still holds every byte, once."""
    g = torch.Generator().manual_seed(7)
    point = T.Checkpoint(7, {f"model/t{i:04d}": torch.randn(i % 5 + 1, generator=g) for i in range(1500)},
                         {"format": T.CHECKPOINT_FORMAT, "step": 7})
    point.save_and_digest(tmp_path / "whole.safetensors")

    def stingy(fd, buffers):
        assert len(buffers) <= 1024
        return os.write(fd, b"".join(bytes(b) for b in buffers[:3])[:101])   # a prefix of them

    monkeypatch.setattr(os, "writev", stingy)
    assert point.save_and_digest(tmp_path / "bits.safetensors") == point.digests()
    assert (tmp_path / "bits.safetensors").read_bytes() == (tmp_path / "whole.safetensors").read_bytes()
    loaded = T.Checkpoint.load(tmp_path / "bits.safetensors")
    assert all(torch.equal(loaded.tensors[k], v) for k, v in point.tensors.items())


class FakeCudart:
    """What `torch.cuda.cudart()` answers on a GPU machine, for the writer's page-locking: the
    calls it gets are kept (this machine has no CUDA runtime to lock pages with), with whether
    they came from the caller's thread and whether the buffer was still there at unlocking."""

    def __init__(self, writer_of, answer: int = 0):
        self.writer_of, self.answer, self.calls = writer_of, answer, []
        self.caller = threading.get_ident()

    def cudaHostRegister(self, address, size, flags):
        self.calls.append(("register", address, size, flags, threading.get_ident() == self.caller))
        return self.answer

    def cudaHostUnregister(self, address):
        buffer = self.writer_of()._buffer
        self.calls.append(("unregister", address, buffer is not None and not buffer.closed,
                           threading.get_ident() == self.caller))
        return 0


@pytest.mark.parametrize("answer", [0, 1])
def test_the_buffer_for_a_gpu_is_page_locked_once_and_unlocked_before_it_is_freed(tmp_path, monkeypatch, answer):
    """pin=True (what a checkpoint on a CUDA device gets): the whole buffer is registered once,
    where it lies, for every device (portable), from a thread of its own (a refusal's error must
    not reach the training thread's next kernel launch); unregistered while it is still there,
    when a bigger checkpoint needs a new buffer and when the writer closes. Where the driver
    refuses (answer 1), nothing is unregistered and the files are the same."""
    writer = T.CheckpointWriter(pin=True)
    cudart = FakeCudart(lambda: writer, answer)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: cudart)
    points = [state(8, optimizer=False), state(9), state(10)]   # the second one needs a bigger buffer
    digests = [p.digests() for p in points]
    futures, buffers = [], []
    for p in points:
        futures.append(writer.write(p, tmp_path / f"c{p.step}.safetensors"))
        buffers.append((writer._pinned_at, len(writer._buffer)))
        assert writer.pinned == (answer == 0)
    writer.close()
    (first, small), (second, big) = buffers[0], buffers[1]
    assert buffers[2] == buffers[1] and big > small and first % T.ALIGN == 0
    locks = [("register", first, small, 1, False), ("register", second, big, 1, False)]
    if answer == 0:
        assert cudart.calls == [locks[0], ("unregister", first, True, False), locks[1],
                                ("unregister", second, True, False)]
    else:
        assert cudart.calls == locks
    assert not writer.pinned and writer._buffer is None
    assert [f.result() for f in futures] == digests
    assert [T.Checkpoint.load(tmp_path / f"c{p.step}.safetensors").digests() for p in points] == digests


def test_a_cpu_checkpoint_is_not_page_locked(tmp_path, monkeypatch):
    writer = T.CheckpointWriter()
    cudart = FakeCudart(lambda: writer)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: cudart)
    writer.write(state(10), tmp_path / "c.safetensors")
    writer.close()
    assert cudart.calls == [] and not writer.pinned
