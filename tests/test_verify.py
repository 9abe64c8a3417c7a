"""Checkable training (issue 17): the image classifier's transcript, and the verify job (kind
5753) that replays one segment of it.

An honest run passes every segment, bit for bit; a provider that trained fewer steps, on other
data, with another learning rate, or returned its starting weights is caught by the check of
any segment it cheated in. The cheats are real trainings, run with the cheat and written up as
if honest, replayed by `verify.verify_segment` (what the job runs) on the real data. The
plugin's own job (param checkpoint_every) and the verify kind run with a real `JobContext`.
"""

from __future__ import annotations

import dataclasses
import math
import re
import json
import shutil
import sys
import time
from pathlib import Path

import pytest
import structlog

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from dvm_core import JobInputError  # noqa: E402
from dvm_core.jobs import JobContext  # noqa: E402
from dvm_core.protocol.nip90 import JobInput, JobRequest  # noqa: E402
from dvm_core.transcripts import KIND as VERIFY_KIND, structure_problems  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
try:
    import dvm_image_classifier as ic
except ImportError:  # not installed as a package yet: use the source tree
    sys.path.insert(0, str(REPO / "plugins"))
    import dvm_image_classifier as ic

from dvm_image_classifier import transcript as T  # noqa: E402
from dvm_image_classifier import verify as V  # noqa: E402
from dvm_image_classifier.digits import digits_split, write_npz  # noqa: E402
from dvm_image_classifier.models import make_spec  # noqa: E402
from dvm_image_classifier.params import TrainParams  # noqa: E402
from dvm_image_classifier.train import normalisation, split_indices, to_tensors, train  # noqa: E402

CPU = torch.device("cpu")
EPOCHS, BATCH, EVERY = 2, 64, 10     # 1438 digits, 10% held out: 21 steps an epoch, 42 in all


def verify_kind(config: dict | None = None, plugins=("image-classifier",)):
    """Kind 5753 as a worker running `plugins` registers it."""
    from dvm_core.worker.plugins import collect_job_kinds, plugin_manager

    return collect_job_kinds(plugin_manager(only=list(plugins)), config or {})[VERIFY_KIND]


def make_ctx(tmp_path: Path, kind: int, files: dict[str, Path], markers: dict[str, str], params: dict):
    inputs = tuple(JobInput(url, "url", "", markers.get(url, "")) for url in files)
    request = JobRequest(id="ab" * 32, pubkey="cd" * 32, kind=kind, created_at=0, inputs=inputs,
                         params={k: str(v) for k, v in params.items()})
    ctx = JobContext(job_id=request.id, request=request, workdir=tmp_path, log=structlog.get_logger(),
                     deadline=time.monotonic() + 3600, report=lambda p, m: None, config={},
                     fetcher=lambda url, into, max_bytes=None: files[url])
    return request, ctx


# --- a honest run, and cheats, written up as transcripts ------------------------------------

@dataclasses.dataclass
class Run:
    """A transcript (as the job writes it) and the folder of its checkpoint files."""

    transcript: dict
    folder: Path

    def file(self, step: int) -> Path:
        return self.folder / T.entry_at(self.transcript, step)["file"]

    def check(self, data: Path, a: int, b: int) -> dict:
        return V.verify_segment(self.transcript, data, self.file(a), self.file(b), end_step=b, device=CPU)

    def check_all(self, data: Path) -> list[dict]:
        return [self.check(data, a, b) for a, b in T.segments(self.transcript)]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    folder = tmp_path_factory.mktemp("digits")
    x, y, _, _ = digits_split(0)
    path = write_npz(folder / "digits_train.npz", x, y)
    # The tensors the job trains on: the file as `run` reads it, 10% held out by the seed.
    images, labels = to_tensors(x[..., None], y)
    train_idx, _ = split_indices(len(y), 0.1, 0)
    return path, images[train_idx], labels[train_idx]


def write_up(folder: Path, recorder: T.Recorder, outcome, params: TrainParams, images, labels, data_sha: str,
             mean, std) -> Run:
    per_epoch = images.shape[0] // params.batch_size + (1 if images.shape[0] % params.batch_size >= 2 else 0)
    record = T.build(recorder=recorder, params=params, spec=make_spec("auto", 1, 10, 8, 8), mean=mean, std=std,
                     data_sha256=data_sha, train_sha256=T.data_digest(images, labels), n_train=images.shape[0],
                     validation={"source": "held out from the training set", "fraction": 0.1},
                     image_size=None, steps_per_epoch=per_epoch, outcome=outcome)
    return Run(json.loads(json.dumps(record)), folder)


def training(folder: Path, images, labels, params: TrainParams, every: int, mean, std):
    recorder = T.Recorder(every, folder)
    outcome = train(train_images=images, train_labels=labels, val_images=None, val_labels=None,
                    spec=make_spec("auto", 1, 10, 8, 8), params=params, mean=mean, std=std, device=CPU,
                    transcript=recorder)
    return recorder, outcome


@pytest.fixture(scope="module")
def honest(digits, tmp_path_factory):
    _, images, labels = digits
    params = TrainParams(epochs=EPOCHS, batch_size=BATCH, checkpoint_every=EVERY)
    mean, std = normalisation(images)
    folder = tmp_path_factory.mktemp("honest")
    recorder, outcome = training(folder, images, labels, params, EVERY, mean, std)
    run = write_up(folder, recorder, outcome, params, images, labels, "a" * 64, mean, std)
    assert [c["step"] for c in run.transcript["checkpoints"]] == [0, 10, 20, 30, 40, 42]
    assert run.transcript["checkpoints"][-1]["weights_sha256"] == T.tensor_digest(outcome.state_dict)
    return run, params, mean, std


def test_an_honest_run_passes_every_segment(digits, honest):
    run = honest[0]
    verdicts = run.check_all(digits[0])
    assert [v["match"] for v in verdicts] == [True] * 5, verdicts
    assert all(v["exact"] and v["distance"] == 0.0 and v["expected_sha256"] == v["got_sha256"] for v in verdicts)
    assert all(v["data_matches_transcript"] and v["start_checkpoint_matches_transcript"] for v in verdicts)
    # A segment over an epoch's end (step 21: BatchNorm recalibrated) replays too: [20, 30) above.
    assert verdicts[2]["segment"] == [20, 30]


def test_a_run_stopped_by_its_time_limit_mid_epoch_replays(tmp_path, digits, honest, monkeypatch):
    """Stopped at its time limit in the middle of epoch 2 (a clock that ticks once a step): the
    last checkpoint is the stopped state, BatchNorm recalibrated after it, and replays."""
    import types

    import dvm_image_classifier.train as train_module

    _, images, labels = digits
    _, params, mean, std = honest
    ticks = iter(range(10**6))
    clock = types.SimpleNamespace(monotonic=lambda: float(next(ticks)), perf_counter=time.perf_counter)
    monkeypatch.setattr(train_module, "time", clock)
    recorder = T.Recorder(EVERY, tmp_path / "stopped")
    outcome = train(train_images=images, train_labels=labels, val_images=None, val_labels=None,
                    spec=make_spec("auto", 1, 10, 8, 8), params=params, mean=mean, std=std, device=CPU,
                    transcript=recorder, time_budget=25.5)
    monkeypatch.undo()
    assert outcome.stopped == "time_limit"
    run = write_up(tmp_path / "stopped", recorder, outcome, params, images, labels, "a" * 64, mean, std)
    steps = [c["step"] for c in run.transcript["checkpoints"]]
    assert steps == [0, 10, 20, 25] and run.transcript["checkpoints"][-1]["stopped"] == "time_limit"
    assert [v["match"] for v in run.check_all(digits[0])] == [True, True, True]


def cheat(tmp_path, digits, honest, *, params=None, images=None, labels=None, relabel=None) -> Run:
    """Train with the cheat, then claim the honest run's params, data and steps."""
    _, real_images, real_labels = digits
    _, claimed, mean, std = honest
    folder = tmp_path / "cheat"
    recorder, outcome = training(folder, real_images if images is None else images,
                                 real_labels if labels is None else labels, params or claimed,
                                 EVERY if relabel is None else relabel[0], mean, std)
    if relabel is not None:   # trained `every` steps between checkpoints, claims `EVERY`: relabelled
        for entry in recorder.entries:
            point = T.Checkpoint.load(folder / entry["file"])
            step = entry["step"] * EVERY // relabel[0]
            point = T.Checkpoint(step, point.tensors, dict(point.meta, step=step))
            point.save(folder / entry["file"])
            entry.update(step=step, weights_sha256=point.weights_sha256(), state_sha256=point.state_sha256())
        recorder.every = EVERY
    return write_up(folder, recorder, outcome, claimed, real_images, real_labels, "a" * 64, mean, std)


def assert_caught(run: Run, data: Path) -> list[dict]:
    verdicts = run.check_all(data)
    assert verdicts and not any(v["match"] for v in verdicts), verdicts
    assert all(v["expected_sha256"] != v["got_sha256"] and v["distance"] > 0 for v in verdicts)
    return verdicts


def test_fewer_steps_are_caught(tmp_path, digits, honest):
    """Half the steps: one epoch, a checkpoint every 5 steps, written up as every 10 of two."""
    claimed = honest[1]
    run = cheat(tmp_path, digits, honest, params=dataclasses.replace(claimed, epochs=1), relabel=(5,))
    assert [c["step"] for c in run.transcript["checkpoints"]][:5] == [0, 10, 20, 30, 40]
    assert_caught(run, digits[0])


def test_other_data_is_caught(tmp_path, digits, honest):
    """Trained on the customer's images with shuffled labels, claiming the real data's digest."""
    _, images, labels = digits
    shuffled = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(7))]
    run = cheat(tmp_path, digits, honest, labels=shuffled)
    verdicts = assert_caught(run, digits[0])
    assert all(v["data_matches_transcript"] for v in verdicts)   # the claim names the real data


def test_another_learning_rate_is_caught(tmp_path, digits, honest):
    claimed = honest[1]
    run = cheat(tmp_path, digits, honest, params=dataclasses.replace(claimed, learning_rate=claimed.learning_rate * 3))
    assert_caught(run, digits[0])


def test_starting_weights_returned_are_caught(tmp_path, digits, honest):
    """No training at all: every checkpoint is the starting state, relabelled."""
    run, _, _, _ = honest
    folder = tmp_path / "lazy"
    folder.mkdir()
    lazy = json.loads(json.dumps(run.transcript))
    start = T.Checkpoint.load(run.file(0))
    for entry in lazy["checkpoints"]:
        point = T.Checkpoint(entry["step"], start.tensors, dict(start.meta, step=entry["step"]))
        point.save(folder / entry["file"])
        entry.update(weights_sha256=point.weights_sha256(), state_sha256=point.state_sha256())
    assert_caught(Run(lazy, folder), digits[0])


def test_other_starting_weights_are_caught_at_step_0(tmp_path, digits, honest):
    """Trained honestly, but from other weights than the seed gives (a model from elsewhere):
    every later segment replays; the check of [0, 10) sees that step 0 is not the seed's."""
    from dvm_image_classifier.models import build_model

    _, images, labels = digits
    _, params, mean, std = honest
    spec = make_spec("auto", 1, 10, 8, 8)
    torch.manual_seed(5)
    other = build_model(spec).state_dict()
    recorder = T.Recorder(EVERY, tmp_path / "other")
    outcome = train(train_images=images, train_labels=labels, val_images=None, val_labels=None, spec=spec,
                    params=params, mean=mean, std=std, device=CPU, transcript=recorder, initial_weights=other)
    run = write_up(tmp_path / "other", recorder, outcome, params, images, labels, "a" * 64, mean, std)
    verdicts = run.check_all(digits[0])
    assert [v["match"] for v in verdicts] == [False, True, True, True, True]
    assert verdicts[0]["start_checkpoint_matches_transcript"] is False and verdicts[0]["exact"] is True
    # The honest run's step 0 is the seed's.
    honest_start = T.Checkpoint.load(honest[0].file(0))
    assert T.seeded_start(honest[0].transcript).weights_sha256() == honest_start.weights_sha256()


def test_a_cheat_in_one_segment_is_caught_by_that_segment_only(tmp_path, digits, honest):
    """Honest to step 40, then the last two steps skipped (the weights at 40 returned as 42's):
    the other segments pass; the check of [40, 42) fails."""
    run, _, _, _ = honest
    folder = tmp_path / "partial"
    shutil.copytree(run.folder, folder)
    partial = json.loads(json.dumps(run.transcript))
    shutil.copy(folder / T.entry_at(partial, 40)["file"], folder / T.entry_at(partial, 42)["file"])
    partial["checkpoints"][-1].update({k: partial["checkpoints"][-2][k] for k in ("weights_sha256", "state_sha256")})
    verdicts = Run(partial, folder).check_all(digits[0])
    assert [v["match"] for v in verdicts] == [True, True, True, True, False]
    assert verdicts[-1]["distance"] > 0


def committed_copy(run: Run, folder: Path, change) -> Run:
    """The run with `change(step, checkpoint)` applied to its checkpoints (it returns the new
    tensors), each file and digest written up as the transcript's."""
    folder.mkdir()
    changed = json.loads(json.dumps(run.transcript))
    for entry in changed["checkpoints"]:
        point = T.Checkpoint.load(run.file(entry["step"]))
        point = T.Checkpoint(entry["step"], change(entry["step"], point), dict(point.meta, step=entry["step"]))
        point.save(folder / entry["file"])
        entry.update(weights_sha256=point.weights_sha256(), state_sha256=point.state_sha256())
    return Run(changed, folder)


def test_a_tolerance_takes_noise_but_not_moments_that_stop_training(tmp_path, digits, honest, monkeypatch):
    """With a tolerance (a GPU's replays are not bit for bit), a replay within it of the end
    checkpoint matches: every committed state moved by 1e-7. Not a provider who trained to step
    10, then set AdamW's second moments to 1e30 (no weight moves any more) and committed that
    state for every later step: the whole state is not within the tolerance, in any segment. (A
    verdict on the weights alone let such a run through when the cheat also ran the forward
    passes that move BatchNorm's statistics: found in review.)"""
    run = honest[0]
    data = digits[0]

    def noise(step, point):     # the last state, as a replay elsewhere might have reached it
        g = torch.Generator().manual_seed(step)
        return {k: v * (1 + 1e-7 * torch.randn(v.shape, generator=g)) if v.is_floating_point() and step == 42 else v
                for k, v in point.tensors.items()}
    noisy = committed_copy(run, tmp_path / "noisy", noise)
    checks = [V.verify_segment(noisy.transcript, data, noisy.file(40), noisy.file(42), end_step=42, device=CPU,
                               tolerance=tolerance) for tolerance in (0.0, 1e-4)]
    assert [v["match"] for v in checks] == [False, True] and not checks[1]["exact"], checks
    assert 0 < checks[1]["state_distance"] < 1e-6

    # The cheat: AdamW frozen at step 10; later states made by forward passes alone (they move
    # BatchNorm's statistics as training would), no backward pass, no update.
    import accelerate
    point = T.Checkpoint.load(run.file(10))
    point.tensors = {k: torch.full_like(v, 1e30) if k.endswith("/exp_avg_sq") else v for k, v in point.tensors.items()}
    stalled = {10: point.tensors}
    monkeypatch.setattr(accelerate.Accelerator, "backward", lambda self, loss, **kw: None)
    for a, b in T.segments(run.transcript)[1:]:
        point = T.replay(run.transcript, point, digits[1], digits[2], b, device=CPU)
        stalled[b] = point.tensors
    monkeypatch.undo()
    lazy = committed_copy(run, tmp_path / "stalled", lambda step, point: stalled.get(step, point.tensors))
    verdicts = [V.verify_segment(lazy.transcript, data, lazy.file(a), lazy.file(b), end_step=b, device=CPU,
                                 tolerance=1e-4) for a, b in T.segments(lazy.transcript)]
    assert [v["match"] for v in verdicts] == [False] * 5, verdicts
    assert all(v["state_distance"] is None or v["state_distance"] > 1e-4 for v in verdicts)   # None: counters differ


def test_a_start_checkpoint_not_in_the_transcript_and_other_data_mismatch(tmp_path, digits, honest):
    run, _, _, _ = honest
    # A check replays one segment: two at once (which one price would pay for) are refused.
    with pytest.raises(JobInputError, match="a check replays one segment: the one from step 10 ends at step 20"):
        V.verify_segment(run.transcript, digits[0], run.file(10), run.file(30), end_step=30, device=CPU)
    # The provider's start checkpoint is not the state its transcript names.
    point = T.Checkpoint.load(run.file(10))
    key = next(k for k in point.tensors if k.startswith("model/") and k.endswith("weight"))
    point.tensors[key] = point.tensors[key] + 1e-3
    verdict = V.verify_segment(run.transcript, digits[0], point.save(tmp_path / "start.safetensors"),
                               run.file(20), end_step=20, device=CPU)
    assert verdict["match"] is False and verdict["start_checkpoint_matches_transcript"] is False
    forged = json.loads(json.dumps(run.transcript))
    forged["checkpoints"][1]["state_sha256"] = "0" * 64
    verdict = V.verify_segment(forged, digits[0], run.file(10), run.file(20), end_step=20, device=CPU)
    assert verdict["match"] is False and verdict["start_checkpoint_matches_transcript"] is False
    # The customer's data is not what the transcript says was trained on.
    x, y, _, _ = digits_split(1)
    other = write_npz(tmp_path / "other.npz", x, y)
    verdict = run.check(other, 0, 10)
    assert verdict["match"] is False and verdict["data_matches_transcript"] is False


# --- the job and the verify kind, as the worker runs them ------------------------------------

def test_the_job_writes_a_transcript_that_the_verify_kind_passes(tmp_path, digits):
    data = digits[0]
    request, ctx = make_ctx(tmp_path / "train", ic.KIND, {"https://b/data": data}, {},
                            {"epochs": EPOCHS, "checkpoint_every": EVERY})
    result = ic.job_kind({}).run(ctx, ic.job_kind({}).parse(request))
    files = {a.name: a for a in result.artifacts}
    assert files["transcript.json"].signed and not files["model.safetensors"].signed
    checkpoints = sorted(n for n in files if n.startswith("checkpoint-"))
    assert checkpoints == [f"checkpoint-{s:07d}.safetensors" for s in (0, 10, 20, 30, 40, 42)]
    assert all(files[n].keep_days == 30.0 for n in checkpoints)   # the worker deletes them then
    assert files["model.safetensors"].keep_days is None and files["transcript.json"].keep_days is None
    transcript = json.loads(files["transcript.json"].path.read_text())
    assert transcript["format"] == T.FORMAT and transcript["seed"] == 0 and transcript["checkpoint_every"] == EVERY
    assert transcript["versions"]["torch"] == torch.__version__ and transcript["params"]["epochs"] == EPOCHS
    assert transcript["checkpoints_kept_days"] == 30.0 and "kept 30 days" in ic.job_kind({}).description
    kept = {"plugins": {"image-classifier": {"checkpoint_retention_days": 7}}}
    assert "kept 7 days" in ic.job_kind(kept).description
    from safetensors.torch import load_file
    final = load_file(str(files["model.safetensors"].path))
    assert T.tensor_digest(final) == transcript["checkpoints"][-1]["weights_sha256"] \
        == result.content["transcript"]["final_weights_sha256"]

    # The verify kind, on the segment [20, 30) and on the last one.
    kind = verify_kind()
    assert V.FORMAT == T.FORMAT and kind.name == "training-verify" and kind.plugin == "image-classifier"
    assert kind.kind == 5753 and set(kind.params_schema["properties"]) == {"end_step", "tolerance"}
    for start, end in ((20, 30), (40, 42)):
        urls = {"https://b/data": data, "https://b/t": files["transcript.json"].path,
                "https://b/s": files[f"checkpoint-{start:07d}.safetensors"].path,
                "https://b/e": files[f"checkpoint-{end:07d}.safetensors"].path}
        markers = {"https://b/t": "transcript", "https://b/s": "start", "https://b/e": "end"}
        request, ctx = make_ctx(tmp_path / f"verify-{start}", VERIFY_KIND, urls, markers, {})
        verdict = kind.run(ctx, kind.parse(request)).content
        assert verdict["match"] is True and verdict["segment"] == [start, end] and verdict["distance"] == 0.0
        assert verdict["transcript_signer"] is None   # a bare transcript: the worker signs it on delivery

    # Another learning rate than the transcript says: the same checkpoints no longer replay.
    lied = json.loads(files["transcript.json"].path.read_text())
    lied["params"]["learning_rate"] *= 2
    (tmp_path / "lied.json").write_text(json.dumps(lied))
    urls |= {"https://b/t": tmp_path / "lied.json"}
    request, ctx = make_ctx(tmp_path / "verify-lied", VERIFY_KIND, urls, markers, {})
    assert kind.run(ctx, kind.parse(request)).content["match"] is False


def test_checkpoint_every_is_checked(tmp_path, digits):
    request, ctx = make_ctx(tmp_path, ic.KIND, {"https://b/data": digits[0]}, {},
                            {"epochs": 10, "checkpoint_every": 1})
    with pytest.raises(JobInputError, match="would write 212 checkpoints over 210 steps; at most 64: send 4 or more"):
        ic.job_kind({}).run(ctx, ic.job_kind({}).parse(request))
    request, _ = make_ctx(tmp_path, ic.KIND, {"https://b/data": digits[0]}, {}, {"checkpoint_every": -1})
    with pytest.raises(JobInputError, match="checkpoint_every"):
        ic.job_kind({}).parse(request)
    request, _ = make_ctx(tmp_path, VERIFY_KIND, {"https://b/data": digits[0]}, {}, {})
    with pytest.raises(JobInputError, match="transcript"):
        verify_kind().parse(request)



def test_a_check_replays_one_segment_and_is_priced_by_it(tmp_path, honest):
    """A check costs the training rate for the images its segment goes through, known from the
    transcript before payment (end_step names the segment; without it, the longest one's), so
    a transcript of one long segment (a stranger may write one of a whole job) costs a check
    as much as the training. An end_step that ends no segment is refused before payment."""
    run = honest[0]
    rate = {"plugins": {"image-classifier": {"sats_per_million_sample_epochs": 10000}}}
    kind = verify_kind(rate)
    assert "10000 sats per million images replayed" in kind.pricing

    def priced(transcript: dict, params: dict) -> int:
        (tmp_path / "t.json").write_text(json.dumps(transcript))
        files = {"https://b/data": tmp_path / "t.json", "https://b/t": tmp_path / "t.json",
                 "https://b/s": run.file(0)}
        request, ctx = make_ctx(tmp_path, VERIFY_KIND, files, {"https://b/t": "transcript", "https://b/s": "start"},
                                params)
        return kind.price(kind.precheck(ctx, kind.parse(request)))

    assert BATCH == 64   # 10 steps: 640 images, 6.4 sat; 2 steps: 1.28
    assert priced(run.transcript, {"end_step": 20}) == 7 and priced(run.transcript, {"end_step": 42}) == 2
    assert priced(run.transcript, {}) == 7
    for wrong in (25, 43):
        with pytest.raises(JobInputError, match=f"end_step {wrong} ends no segment of the transcript"):
            priced(run.transcript, {"end_step": wrong})
    # One segment over the whole job: 42 steps of 64 images.
    whole = json.loads(json.dumps(run.transcript))
    whole["checkpoint_every"] = whole["params"]["checkpoint_every"] = 42
    whole["checkpoints"] = [whole["checkpoints"][0], whole["checkpoints"][-1]]
    assert structure_problems(whole) == [] and priced(whole, {}) == math.ceil(42 * 64 * 10000 / 1e6) == 27

    # A provider's fixed part per check (sats_per_check: its fixed costs), on top.
    kind = verify_kind({"plugins": {"image-classifier": {"sats_per_million_sample_epochs": 10000,
                                                         "sats_per_check": 5}}})
    assert "5 sats a check plus 10000 sats per million images replayed" in kind.pricing
    assert priced(run.transcript, {"end_step": 20}) == 12 and priced(run.transcript, {"end_step": 42}) == 7
    kind = verify_kind({"plugins": {"image-classifier": {"sats_per_million_sample_epochs": 0, "sats_per_check": 3}}})
    assert "3 sats a check, at least 1 sat" in kind.pricing and priced(whole, {}) == 3

    # Free training, free checks: a check then costs the fixed [prices] training-verify.
    free = verify_kind({"plugins": {"image-classifier": {"sats_per_million_sample_epochs": 0}}})
    assert free.price is None and free.pricing is None


def test_a_transcript_whose_epochs_the_data_cannot_fill_is_refused_before_payment(digits, honest):
    """steps_per_epoch must be what train_samples in batches of batch_size give: one more (and
    the planned steps to match, stopped early) passed, and the replay ran off the end of an
    epoch into an IndexError, an internal error refunded in full (found in review)."""
    run = honest[0]
    transcript = json.loads(json.dumps(run.transcript))
    assert transcript["steps_per_epoch"] == 21 and transcript["data"]["train_samples"] == 1294
    transcript["steps_per_epoch"] = 22
    transcript["planned_steps"] = 44
    transcript["checkpoints"][-1]["stopped"] = "time_limit"
    assert structure_problems(transcript) == []
    with pytest.raises(JobInputError, match="train_samples, steps_per_epoch and planned_steps"):
        V.checked_params(transcript, V.Limits())
    with pytest.raises(JobInputError, match="train_samples, steps_per_epoch and planned_steps"):
        Run(transcript, run.folder).check(digits[0], 20, 30)
    V.checked_params(run.transcript, V.Limits())


async def test_hiring_a_verifier_with_a_wrong_model_fails_before_anything_is_uploaded(tmp_path, digits, honest):
    """A base model given for an image classifier's transcript is said before the data, the
    transcript and the checkpoints go to the blob server (here one that does not answer, and no
    customer: the check must not get as far as it). A model folder for an LLM's is checked at
    the same place."""
    from dvm_verify.checks import VerifyError, check_remote, open_result

    run = honest[0]
    folder = tmp_path / "result"
    shutil.copytree(run.folder, folder)
    (folder / "transcript.json").write_text(json.dumps(run.transcript))
    opened = open_result(folder, allow_unsigned=True)
    (tmp_path / "model.zip").write_bytes(b"PK")
    with pytest.raises(VerifyError, match="a base model is for LLM transcripts"):
        await check_remote(None, None, "ab" * 32, opened, digits[0], [(10, 20)], ["http://127.0.0.1:9"],
                           model=tmp_path / "model.zip", timeout=5)


# --- through a real worker, relay, mint and blob server; `dvm verify` ----------------------

@pytest.fixture
async def blobs(tmp_path):
    from dvm_core.devtools.blobserver import start_blob_server

    server = await start_blob_server(tmp_path / "blobs")
    yield server
    await server.stop()


def _checkpoint_left_out(transcript: dict) -> str:
    del transcript["checkpoints"][2]
    return "not a transcript as training writes it"


def _huge_images(transcript: dict) -> str:
    transcript["params"]["image_size"] = 3000     # a verifier would decode every image at 3000x3000
    return "the transcript names params no job here could have: image_size"


@pytest.mark.parametrize("spoil", [_checkpoint_left_out, _huge_images], ids=["uneven", "image-size"])
async def test_a_transcript_no_job_here_could_write_is_refused_before_payment(workers, mint, relay, blobs,
                                                                              digits, honest, tmp_path, spoil):
    """The verify kind reads the transcript before it asks for payment: one with a checkpoint
    left out (uneven segments), or with params beyond this provider's limits, is refused, and
    the customer pays nothing."""
    from dvm_core.customer.client import upload_dataset
    from dvm_core.worker.plugins import plugin_manager

    from .paying import close_customer, funded_customer

    run = honest[0]
    worker = await workers.start(pm=plugin_manager(only=["image-classifier"]), mints=[mint.url],
                                 blob_servers=[blobs.url], allow_private_urls=True)
    customer = await funded_customer(tmp_path, mint.url, relay.url)
    try:
        spoilt = json.loads(json.dumps(run.transcript))
        why = spoil(spoilt)
        (tmp_path / "transcript.json").write_text(json.dumps(spoilt))
        urls = [await upload_dataset(path, [blobs.url], customer.keys, encrypt=True)
                for path in (digits[0], tmp_path / "transcript.json", run.file(10))]
        before = sum((await customer.wallet.balance()).values())
        request = await customer.submit(VERIFY_KIND, [JobInput(urls[0], "url"),
                                                      JobInput(urls[1], "url", marker="transcript"),
                                                      JobInput(urls[2], "url", marker="start")],
                                        {}, provider=worker.keys.public_key)
        statuses = []
        async for update in customer.updates(request, timeout=60):
            statuses.append(update.status)
            if update.status == "error":
                assert why in update.message, update.message
                break
        assert statuses[-1] == "error" and "payment-required" not in statuses, statuses
        assert sum((await customer.wallet.balance()).values()) == before
    finally:
        await close_customer(customer)


RATE = 10000   # sats per million images: the training rate a check is priced at too


def check_price(a: int, b: int) -> int:
    return math.ceil((b - a) * 64 * RATE / 1e6)    # 64: the default batch_size


async def test_a_paid_job_with_a_transcript_verified_here_and_by_a_verifier_dvm(workers, mint, relay, blobs,
                                                                             digits, tmp_path):
    """A private kind-5750 job with checkpoint_every: the result holds transcript.json as a
    kind-1750 event signed by the provider, and the checkpoints; two segments checked here and
    two by a verifier DVM (kind 5753, paid), all matching; a checkpoint swapped after the fact
    makes its segment fail, here and there."""
    from click.testing import CliRunner
    from dvm_core import SIGNED_FILE_KIND, open_signed_file
    from dvm_core.customer.client import download_artifacts, upload_dataset
    from dvm_core.protocol.nip90 import Result
    from dvm_core.worker.plugins import plugin_manager
    from dvm_verify.checks import check_local, check_remote, open_result, pick_segments
    from dvm_verify.commands import MISMATCH_EXIT, verify_command

    from .paying import close_customer, funded_customer

    worker = await workers.start(
        pm=plugin_manager(only=["image-classifier"]), mints=[mint.url], blob_servers=[blobs.url],
        allow_private_urls=True, plugins={"image-classifier": {"sats_per_million_sample_epochs": RATE}})
    customer = await funded_customer(tmp_path, mint.url, relay.url)
    try:
        url = await upload_dataset(digits[0], [blobs.url], customer.keys, encrypt=True)
        request = await customer.submit(ic.KIND, [JobInput(url, "url")],
                                        {"epochs": str(EPOCHS), "checkpoint_every": str(EVERY)},
                                        provider=worker.keys.public_key)
        result = None
        async for update in customer.updates(request, timeout=300):
            if isinstance(update, Result):
                result = update
                break
            assert update.status != "error", update.message
            if update.status == "payment-required":
                await customer.pay_with_nutzap(request, update, customer.wallet)
        assert result is not None and result.encrypted
        folder = tmp_path / "result"
        saved = {p.name for p in await download_artifacts(result, folder, allow_private=True)}
        assert {"model.safetensors", "transcript.json", "checkpoint-0000000.safetensors",
                "checkpoint-0000042.safetensors"} <= saved
        event = json.loads((folder / "transcript.json").read_text())
        assert event["kind"] == SIGNED_FILE_KIND and event["pubkey"] == worker.keys.public_key
        assert ["e", request["id"]] in event["tags"] and ["name", "transcript.json"] in event["tags"]
        assert open_signed_file(json.dumps(event)).job_id == request["id"]
        forged = dict(event, content=event["content"].replace('"seed": 0', '"seed": 1'))
        with pytest.raises(ValueError, match="not a signed file"):
            open_signed_file(json.dumps(forged))

        opened = open_result(folder, provider=worker.keys.npub)
        assert opened.signer == worker.keys.public_key
        picked = pick_segments(opened.transcript, 2, seed=3)
        assert len(picked) == 2 and picked == pick_segments(opened.transcript, 2, seed=3)
        here = check_local(opened, digits[0], picked)
        assert here.passed and len(here.verdicts) == 2
        async def balance() -> int:
            return sum((await customer.wallet.balance()).values())

        before = await balance()
        there = await check_remote(customer, customer.wallet, worker.keys.public_key, opened, digits[0], picked,
                                   [blobs.url], max_price=10, timeout=300)
        assert there.passed and [v["segment"] for v in there.verdicts] == [list(s) for s in picked]
        assert all(v["transcript_signer"] == worker.keys.public_key and v["distance"] == 0.0 for v in there.verdicts)
        # Each check is priced by its segment, at the training rate: steps × 64 images a step ×
        # RATE / 10⁶, rounded up (a 10-step segment 7 sat, the last one, of 2 steps, 2 sat).
        assert before - await balance() == sum(check_price(a, b) for a, b in picked)
        spent = before - await balance()
        info = await customer.wallet_info(worker.keys.public_key)
        assert "training-verify" not in info.prices
        assert f"{RATE} sats per million images replayed" in info.pricing["training-verify"]

        # `dvm verify` with no --max-price does not pay a verifier that prices checks by their
        # segment (it could ask anything), and says so before uploading anything.
        payer = await funded_customer(tmp_path, mint.url, relay.url)
        wallet_dir = payer.wallet.directory
        await close_customer(payer)
        import asyncio
        stored = len(list(blobs.store.blobs.iterdir()))
        run = await asyncio.to_thread(CliRunner().invoke, verify_command, [
            str(folder), "--data", str(digits[0]), "--checks", "1", "--seed", "2", "--provider", worker.keys.npub,
            "--relay", relay.url, "--dvm", worker.keys.npub, "--blossom", blobs.url, "--wallet-dir", str(wallet_dir),
            "--mint", mint.url, "--json"])
        assert run.exit_code != 0 and "give --max-price" in run.output, run.output
        assert len(list(blobs.store.blobs.iterdir())) == stored

        # `dvm verify` as typed, hiring the verifier DVM: one check, paid from another wallet.
        run = await asyncio.to_thread(CliRunner().invoke, verify_command, [
            str(folder), "--data", str(digits[0]), "--checks", "1", "--seed", "2", "--provider", worker.keys.npub,
            "--relay", relay.url, "--dvm", worker.keys.npub, "--blossom", blobs.url, "--wallet-dir", str(wallet_dir),
            "--mint", mint.url, "--max-price", "10", "--json"])
        assert run.exit_code == 0, run.output
        summary = json.loads(run.output)
        assert summary["passed"] and summary["verdicts"][0]["by"] == worker.keys.public_key
        assert [(w["file"], w["match"]) for w in summary["returned_weights"]] == [("model.safetensors", True)]
        assert summary["verdicts"][0]["segment"] == list(pick_segments(opened.transcript, 1, seed=2)[0])

        # A transcript that names another learning rate than the checkpoints were trained at:
        # the verifier DVM replays the segment and answers mismatch.
        lied = tmp_path / "lied"
        shutil.copytree(folder, lied)
        claim = json.loads(event["content"])
        claim["params"]["learning_rate"] *= 2
        (lied / "transcript.json").write_text(json.dumps(claim))
        there = await check_remote(customer, customer.wallet, worker.keys.public_key,
                                   open_result(lied, allow_unsigned=True), digits[0], [(10, 20)], [blobs.url],
                                   max_price=10, timeout=300)
        assert not there.passed and there.verdicts[0]["distance"] > 0
        assert there.verdicts[0]["transcript_signer"] is None
        assert before - await balance() == spent + check_price(10, 20)

        # The checkpoint at 20 replaced by the one at 30: [10, 20) and [20, 30) no longer hold,
        # which is seen before paying anyone.
        (folder / "checkpoint-0000020.safetensors").write_bytes((folder / "checkpoint-0000030.safetensors").read_bytes())
        there = await check_remote(customer, customer.wallet, worker.keys.public_key, opened, digits[0],
                                   [(10, 20)], [blobs.url], max_price=10, timeout=300)
        assert not there.passed and "not the state its transcript names" in there.verdicts[0]["reason"]
        assert before - await balance() == spent + check_price(10, 20)

        # `dvm verify` as typed, here: every segment (5 checks of 5), one JSON object, and the
        # verdict published for whoever trusts this customer (`--trust`).
        from dvm_core.state.keyfiles import write_key_file
        write_key_file(tmp_path / "judge.nsec", customer.keys)
        run = await asyncio.to_thread(CliRunner().invoke, verify_command, [
            str(folder), "--data", str(digits[0]), "--local", "--checks", "5", "--seed", "1",
            "--provider", worker.keys.npub, "--json", "--publish-verdict", "--relay", relay.url,
            "--key", str(tmp_path / "judge.nsec")])
        assert run.exit_code == MISMATCH_EXIT, run.output
        summary = json.loads(run.output)
        assert [v["match"] for v in summary["verdicts"]] == [True, False, False, True, True]
        (verdict,) = await customer.verdicts([worker.keys.public_key], [customer.keys.public_key])
        assert verdict.label == "verification-failed" and verdict.job_id == opened.job_id
        assert verdict.event_id == summary["verdict"]["event_id"] and "3/5 replayed segments" in verdict.reason
        assert summary["passed"] is False and summary["checked"] == 5 and summary["catch_probability_one_segment"] == 1.0
        run = CliRunner().invoke(verify_command, [str(folder), "--data", str(digits[0]), "--local",
                                                  "--provider", "ab" * 32])
        assert run.exit_code == 1 and "not by the provider" in run.output
    finally:
        await close_customer(customer)


def test_dvm_verify_local_passes_an_honest_run_and_says_the_odds(tmp_path, digits, honest, monkeypatch):
    import tempfile

    from click.testing import CliRunner
    from dvm_verify.checks import catch_probability, checks_needed
    from dvm_verify.commands import verify_command

    run = honest[0]
    folder = tmp_path / "result"
    shutil.copytree(run.folder, folder)
    (folder / "transcript.json").write_text(json.dumps(run.transcript))
    refused = CliRunner().invoke(verify_command, [str(folder), "--data", str(digits[0]), "--local"])
    assert refused.exit_code == 1 and "is not signed" in refused.output
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    ok = CliRunner().invoke(verify_command, [str(folder), "--data", str(digits[0]), "--local", "--allow-unsigned",
                                             "--checks", "2", "--seed", "5"])
    assert ok.exit_code == 0, ok.output
    assert list(scratch.iterdir()) == []    # nothing of the replays is left behind in the temp folder
    assert "transcript: 5 segments, NOT signed; checking 2 (seed 5)" in ok.output
    assert "PASSED: 2/2 segments match" in ok.output and "probability 0.40" in ok.output
    # The odds the README gives.
    assert catch_probability(10, 1, 1) == pytest.approx(0.1) and catch_probability(10, 10, 1) == 1.0
    assert catch_probability(100, 10, 10) == pytest.approx(1 - math.comb(90, 10) / math.comb(100, 10))
    assert checks_needed(100, 10, 0.95) == 25 and checks_needed(10, 1, 0.5) == 5


def test_a_transcript_not_as_training_writes_it_fails_before_any_replay(tmp_path, digits, honest):
    """Uneven segments (ten honest steps, then 32 untrained in one segment that a random check
    seldom draws), a step that is not a multiple of checkpoint_every, an end short of the planned
    steps with no early stop, a file name with a path: the verify job refuses to replay it (the
    input was the customer's), and `dvm verify` says FAILED (exit 3) without replaying."""
    from click.testing import CliRunner
    from dvm_core.transcripts import structure_problems
    from dvm_verify.commands import verify_command

    run = honest[0]
    assert structure_problems(run.transcript) == []

    def edited(change) -> dict:
        transcript = json.loads(json.dumps(run.transcript))
        change(transcript, transcript["checkpoints"])
        return transcript

    def uneven(t, entries):   # [0, 10), [10, 42): the second one untrained
        entries[:] = [entries[0], entries[1], dict(entries[1], step=42, final=True, stopped=None,
                                                   file=entries[-1]["file"])]
    cases = {
        "uneven": (edited(uneven), "not within 10 steps after 10"),
        "off the grid": (edited(lambda t, e: e[2].update(step=21)), "checkpoint 2 is at step 21, not 20"),
        "short": (edited(lambda t, e: t.update(planned_steps=84)), "without being stopped early, but 84"),
        "a path": (edited(lambda t, e: e[1].update(file="../../etc/passwd")), "names no plain file"),
        "no digest": (edited(lambda t, e: e[3].pop("state_sha256")), "lacks its weights_sha256 or state_sha256"),
        "two finals": (edited(lambda t, e: e[2].update(final=True)), "is marked final"),
    }
    kind = verify_kind()
    for name, (transcript, words) in cases.items():
        problems = structure_problems(transcript)
        assert any(words in p for p in problems), (name, problems)
        (tmp_path / f"{name}.json").write_text(json.dumps(transcript))
        request, ctx = make_ctx(tmp_path, VERIFY_KIND, {"data": digits[0], "t": tmp_path / f"{name}.json",
                                                        "s": run.file(0)}, {"t": "transcript", "s": "start"}, {})
        with pytest.raises(JobInputError, match="not a transcript as training writes it"):
            kind.run(ctx, kind.parse(request))

    folder = tmp_path / "uneven-result"
    shutil.copytree(run.folder, folder)
    (folder / "transcript.json").write_text(json.dumps(cases["uneven"][0]))
    out = CliRunner().invoke(verify_command, [str(folder), "--data", str(digits[0]), "--local", "--allow-unsigned",
                                              "--json"])
    assert out.exit_code == 3, out.output
    report = json.loads(out.output)
    assert not report["passed"] and report["checked"] == 0 and "not within 10 steps" in report["problems"][0]


def test_a_checkpoint_not_delivered_fails_the_check_of_its_segments(tmp_path, digits, honest):
    """The checkpoints are kept for the time the provider announces: one missing from the
    result is a failed check of the segments it bounds (exit 3, a verdict to publish), not a
    check that could not be made (exit 1, nothing said about the provider)."""
    from click.testing import CliRunner
    from dvm_verify.commands import verify_command

    run = honest[0]
    folder = tmp_path / "result"
    shutil.copytree(run.folder, folder)
    (folder / "transcript.json").write_text(json.dumps(run.transcript))
    (folder / T.entry_at(run.transcript, 20)["file"]).unlink()
    out = CliRunner().invoke(verify_command, [str(folder), "--data", str(digits[0]), "--local", "--allow-unsigned",
                                              "--checks", "5", "--json"])
    assert out.exit_code == 3, out.output
    verdicts = json.loads(out.output)["verdicts"]
    assert [v["match"] for v in verdicts] == [True, False, False, True, True]
    assert all("for step 20" in v["reason"] and "was not delivered" in v["reason"] for v in verdicts[1:3])
    said = CliRunner().invoke(verify_command, [str(folder), "--data", str(digits[0]), "--local", "--allow-unsigned",
                                               "--checks", "5"])   # in words: a verdict without a state
    assert said.exit_code == 3 and "Traceback" not in said.output, said.output
    assert "[10, 20): MISMATCH, distance n/a" in said.output and "got nothing (local): the provider's" in said.output


def test_a_transcript_naming_what_no_job_here_could_have_is_refused_before_building_it(tmp_path, digits, honest):
    """A verifier rebuilds what a stranger's transcript names: an image size, a network, a run
    its limits would refuse for a job are refused before anything is built (found in review:
    image_size 3000 asked for 12 GiB, widths [60000] for 130 GB)."""
    run = honest[0]

    def edited(**changes) -> dict:
        transcript = json.loads(json.dumps(run.transcript))
        for key, value in changes.items():
            part, _, name = key.partition("__")
            (transcript[part] if name else transcript)[name or part] = value
        return transcript
    cases = {
        "image_size": (edited(params__image_size=3000), "image_size (4-128 here)"),
        "widths": (edited(architecture__widths=[60000]), "architecture is not the network"),
        "epochs": (edited(params__epochs=10**6), "epochs (1-200 here)"),
        "steps": (edited(planned_steps=10**9), "steps_per_epoch and planned_steps"),
        "batch": (edited(params__batch_size=10**7), "batch_size (2-4096)"),
    }
    for name, (transcript, words) in cases.items():
        started = time.perf_counter()
        with pytest.raises(JobInputError, match=re.escape(words)):
            V.verify_segment(transcript, digits[0], run.file(0), run.file(10), end_step=10, device=CPU,
                             workdir=tmp_path)
        assert time.perf_counter() - started < 5, name


def test_a_job_started_from_the_customers_weights_is_checked_against_them_at_step_0(tmp_path, digits, honest):
    """A transcript that names initial weights (the customer sent some): step 0 passes with the
    weights sent, and with no others; without them it cannot pass. Before, naming any digest
    switched the check of step 0 off, so a provider could start from a model of its own
    (found in review)."""
    from safetensors.torch import save_file

    from dvm_core.datarefs import sha256_file
    from dvm_image_classifier.models import build_model

    _, images, labels = digits
    _, params, mean, std = honest
    spec = make_spec("auto", 1, 10, 8, 8)
    torch.manual_seed(11)
    sent = build_model(spec).state_dict()
    save_file({k: v.contiguous() for k, v in sent.items()}, str(tmp_path / "sent.safetensors"))
    torch.manual_seed(12)
    save_file({k: v.contiguous() for k, v in build_model(spec).state_dict().items()}, str(tmp_path / "own.safetensors"))
    recorder = T.Recorder(EVERY, tmp_path / "from-sent")
    outcome = train(train_images=images, train_labels=labels, val_images=None, val_labels=None, spec=spec,
                    params=params, mean=mean, std=std, device=CPU, transcript=recorder, initial_weights=sent)
    run = write_up(tmp_path / "from-sent", recorder, outcome, params, images, labels, "a" * 64, mean, std)
    run.transcript["initial_weights_sha256"] = sha256_file(tmp_path / "sent.safetensors")

    def step_0(weights) -> dict:
        return V.verify_segment(run.transcript, digits[0], run.file(0), run.file(10), end_step=10, device=CPU,
                                weights_path=weights)
    assert step_0(tmp_path / "sent.safetensors")["match"] is True
    missing = step_0(None)
    assert missing["match"] is False and "send them, marked 'weights'" in missing["reason"]
    other = step_0(tmp_path / "own.safetensors")
    assert other["match"] is False and "not the ones the transcript says" in other["reason"]
    # A provider that started from its own model, naming that model's digest as the customer's:
    # checked against what the customer really sent, step 0 fails.
    run.transcript["initial_weights_sha256"] = sha256_file(tmp_path / "own.safetensors")
    assert step_0(tmp_path / "sent.safetensors")["match"] is False


def test_a_transcript_of_a_cheaper_job_than_the_one_ordered_fails(tmp_path, digits, honest):
    """Held to what was ordered (OUT/request.json of `dvm job submit`, found in RESULT or given
    with --request): an honest transcript of fewer epochs, or another learning rate, than the
    customer sent replays bit for bit, and is still not the job paid for (found in review)."""
    from click.testing import CliRunner
    from dvm_verify.commands import MISMATCH_EXIT, verify_command

    run = honest[0]
    folder = tmp_path / "result"
    shutil.copytree(run.folder, folder)
    (folder / "transcript.json").write_text(json.dumps(run.transcript))
    args = [str(folder), "--data", str(digits[0]), "--local", "--allow-unsigned", "--checks", "1", "--json"]

    def verify(params: dict, kind: int = 5750):
        (folder / "request.json").write_text(json.dumps({"id": "ab" * 32, "kind": kind, "params": params,
                                                         "inputs": [{"data": "https://x/y", "type": "url",
                                                                     "marker": ""}]}))
        out = CliRunner().invoke(verify_command, args)
        return out.exit_code, json.loads(out.output)
    code, report = verify({"epochs": "2", "batch_size": "64", "checkpoint_every": "10"})
    assert code == 0 and report["passed"] and report["checked"] == 1, report
    code, report = verify({"epochs": "4", "checkpoint_every": "10"})
    assert code == MISMATCH_EXIT and report["checked"] == 0
    assert report["problems"] == ["param epochs: 4 was ordered, the transcript trained with 2"]
    code, report = verify({"learning_rate": "0.003"})
    assert code == MISMATCH_EXIT and "param learning_rate: 0.003 was ordered" in report["problems"][0]
    code, report = verify({}, kind=5751)
    assert code == MISMATCH_EXIT and "kind 5751 was ordered" in report["problems"][0]
