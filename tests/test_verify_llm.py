"""Checkable training (issue 17) for LLM fine-tuning (kind 5751): the transcript, and the
verify job (kind 5753) replaying one segment of it.

The tiny offline GPT-2 of `dvm_federate.tiny` (random weights, a BPE tokenizer trained on a toy
grammar), sent as an archive, as every test of the plugin does; GPT-2's own dropout (0.1) and
LoRA's (0.05) are on, so the replay must draw what training drew. An honest run passes every
segment bit for bit, LoRA and full; a provider that trained fewer steps, on other data, with
another learning rate, or returned its starting weights is caught by the check of any segment
it cheated in. The cheats are real jobs, run with the cheat and written up as if honest (the
honest transcript's claims, the cheat's checkpoints), replayed by `verify.verify_segment` (what
kind 5753 runs) on the real data and base model.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import shutil
import time
import types
import zipfile
from pathlib import Path

import pytest
import structlog

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

import dvm_llm_finetune as lf  # noqa: E402
from dvm_core import JobInputError  # noqa: E402
from dvm_core.jobs import JobContext  # noqa: E402
from dvm_core.protocol.nip90 import JobInput, JobRequest  # noqa: E402
from dvm_core.transcripts import KIND as VERIFY_KIND  # noqa: E402
from dvm_federate import tiny  # noqa: E402
from dvm_llm_finetune import transcript as T  # noqa: E402
from dvm_llm_finetune import verify as LV  # noqa: E402

CPU = torch.device("cpu")
EVERY = 6
# 200 sentences, 10% held out: 180 examples, 23 steps of 8; checkpoints at 0, 6, 12, 18, 23.
PARAMS = {"epochs": 1, "batch_size": 8, "max_seq_length": 32, "eval_fraction": 0.1, "learning_rate": 0.01,
          "checkpoint_every": EVERY}
STEPS = [0, 6, 12, 18, 23]
DATA, MODEL = "https://b/train.jsonl", "https://b/model.zip"
REPO_ID, COMMIT = "tiny-org/tiny-gpt2", "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread, steady on a shared machine; training and replay run with the same count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def verify_kind(config: dict | None = None, plugins=("llm-finetune",)):
    """Kind 5753 as a worker running `plugins` registers it."""
    from dvm_core.worker.plugins import collect_job_kinds, plugin_manager

    return collect_job_kinds(plugin_manager(only=list(plugins)), config or {})[VERIFY_KIND]


def make_ctx(workdir: Path, kind: int, files: dict[str, Path], markers: dict[str, str], params: dict,
             config: dict | None = None):
    inputs = tuple(JobInput(url, "url", "", markers.get(url, "")) for url in files)
    request = JobRequest(id="ab" * 32, pubkey="cd" * 32, kind=kind, created_at=0, inputs=inputs,
                         params={k: str(v) for k, v in params.items()})
    ctx = JobContext(job_id=request.id, request=request, workdir=workdir, log=structlog.get_logger(),
                     deadline=time.monotonic() + 3600, report=lambda p, m: None, config=config or {},
                     fetcher=lambda url, into, max_bytes=None: files[url])
    return request, ctx


def hub_config(assets) -> dict:
    return {"plugins": {"llm-finetune": {"allowed_models": [REPO_ID], "hub_cache_dir": str(assets["cache"])}}}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("llm-verify")
    model = tiny.save_model_folder(root / "gpt2")
    archive = root / "gpt2.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted(model.iterdir()):
            zf.write(f, "model/" + f.name)
    snapshot = root / "hub" / ("models--" + REPO_ID.replace("/", "--")) / "snapshots" / COMMIT
    shutil.copytree(model, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text(COMMIT)
    return {"model": model, "zip": archive, "cache": root / "hub",
            "data": tiny.write_corpus(root / "train.jsonl", 200),
            "other": tiny.write_corpus(root / "other.jsonl", 200, seed=1)}


@dataclasses.dataclass
class Run:
    """A transcript (as the job writes it), the folder of its checkpoints, the job's result."""

    transcript: dict
    folder: Path
    result: object = None

    def file(self, step: int) -> Path:
        return self.folder / T.entry_at(self.transcript, step)["file"]

    def check(self, assets, a: int, b: int, data: Path | None = None) -> dict:
        return LV.verify_segment(self.transcript, data or assets["data"], self.file(a), self.file(b),
                                 model_folder=assets["model"], end_step=b, device=CPU)

    def check_all(self, assets) -> list[dict]:
        return [self.check(assets, a, b) for a, b in T.segments(self.transcript)]


def run_job(workdir: Path, assets, data: Path | None = None, **params) -> Run:
    """A kind-5751 job as the worker runs it, on the zipped tiny GPT-2."""
    files = {DATA: data or assets["data"], MODEL: assets["zip"]}
    request, ctx = make_ctx(workdir, lf.KIND, files, {MODEL: "model"}, PARAMS | params)
    kind = lf.job_kind({})
    result = kind.run(ctx, kind.parse(request))
    files = {a.name: a for a in result.artifacts}
    transcript = json.loads(files["transcript.json"].path.read_text())
    return Run(transcript, files["checkpoint-0000000.safetensors"].path.parent, result)


@pytest.fixture(scope="module")
def honest(assets, tmp_path_factory):
    return run_job(tmp_path_factory.mktemp("honest"), assets)


def test_the_job_returns_a_signed_transcript_and_checkpoints(honest):
    files = {a.name: a for a in honest.result.artifacts}
    assert files["transcript.json"].signed and not files["adapter_model.safetensors"].signed
    assert sorted(n for n in files if n.startswith("checkpoint-")) == \
        [f"checkpoint-{s:07d}.safetensors" for s in STEPS]
    t = honest.transcript
    assert t["format"] == T.FORMAT == "dvm-llm-finetune-transcript/1" and t["seed"] == 0
    assert [c["step"] for c in t["checkpoints"]] == STEPS and t["planned_steps"] == 23
    assert t["checkpoints"][-1]["final"] is True and t["checkpoints"][-1]["stopped"] is None
    assert t["versions"]["torch"] == torch.__version__ and "transformers" in t["versions"]
    assert t["params"]["learning_rate"] == 0.01 and t["device"] == "cpu" and t["threads"] == 1
    assert t["base_model"]["source"]["archive_sha256"] and t["data"]["train_examples"] == 180
    assert t["checkpoints_kept_days"] == 30.0 and "kept 30 days" in lf.job_kind({}).description
    assert "kept 7 days" in lf.job_kind({"plugins": {"llm-finetune": {"checkpoint_retention_days": 7}}}).description
    assert all(a.keep_days == 30.0 for n, a in files.items() if n.startswith("checkpoint-"))   # deleted then
    assert files["adapter_model.safetensors"].keep_days is None and files["transcript.json"].keep_days is None
    assert honest.result.content["transcript"]["final_weights_sha256"] == t["checkpoints"][-1]["weights_sha256"]
    # A checkpoint holds the adapter only (not the frozen base), the optimizer's moments, no RNG.
    last = T.Checkpoint.load(honest.file(23))
    assert last.weights and all(".lora_" in k for k in last.weights)
    assert any(k.endswith("/exp_avg_sq") for k in last.tensors) and last.meta["scheduler"]["last_epoch"] == 23
    # The returned adapter is the last checkpoint's weights (peft drops the adapter's name).
    from safetensors.torch import load_file
    adapter = load_file(str(files["adapter_model.safetensors"].path))
    assert T.tensor_digest(adapter) == t["result_weights"]["adapter_model.safetensors"]
    assert {k.replace(".default.", "."): v for k, v in last.weights.items()}.keys() == adapter.keys()
    assert all(torch.equal(v, adapter[k.replace(".default.", ".")]) for k, v in last.weights.items())


def test_an_honest_run_passes_every_segment(assets, honest):
    verdicts = honest.check_all(assets)
    assert [v["match"] for v in verdicts] == [True] * 4, verdicts
    assert all(v["exact"] and v["distance"] == 0.0 and v["expected_sha256"] == v["got_sha256"] for v in verdicts)
    assert all(v["data_matches_transcript"] and v["start_checkpoint_matches_transcript"]
               and v["base_model_matches_transcript"] for v in verdicts)


def test_full_finetuning_replays_too(assets, tmp_path):
    run = run_job(tmp_path, assets, method="full", learning_rate=1e-3, max_steps=6, checkpoint_every=3)
    assert [c["step"] for c in run.transcript["checkpoints"]] == [0, 3, 6]
    point = T.Checkpoint.load(run.file(3))
    assert "transformer.wte.weight" in point.weights       # every weight, no adapter
    assert [v["match"] for v in run.check_all(assets)] == [True, True]
    # The returned model's files hold the last checkpoint's weights, as the customer checks them.
    from dvm_verify.checks import ResultFolder, check_returned_weights
    folder = tmp_path / "checked"
    shutil.copytree(run.folder, folder)
    for a in run.result.artifacts:
        if a.name in run.transcript["result_weights"]:
            shutil.copy(a.path, folder / a.name)
    weights = check_returned_weights(ResultFolder(folder, run.transcript, None, None))
    assert len(weights) >= 2 and all(w["match"] for w in weights), weights


def written_up(folder: Path, honest: Run, cheat: Run, steps=None) -> Run:
    """The cheat's checkpoints under the honest transcript's claims (params, data, steps); with
    `steps`, the cheat's i-th checkpoint relabelled as step steps[i]."""
    folder.mkdir()
    claim = json.loads(json.dumps(honest.transcript))
    entries = []
    for i, entry in enumerate(cheat.transcript["checkpoints"]):
        point = T.Checkpoint.load(cheat.folder / entry["file"])
        step = steps[i] if steps else entry["step"]
        point = T.Checkpoint(step, point.tensors, dict(point.meta, step=step))
        name = f"checkpoint-{step:07d}.safetensors"
        point.save(folder / name)
        entries.append({"step": step, "weights_sha256": point.weights_sha256(),
                        "state_sha256": point.state_sha256(), "file": name})
    claim["checkpoints"] = entries
    return Run(claim, folder)


def assert_caught(run: Run, assets) -> list[dict]:
    verdicts = run.check_all(assets)
    assert verdicts and not any(v["match"] for v in verdicts), verdicts
    assert all(v["expected_sha256"] != v["got_sha256"] and v["distance"] > 0 for v in verdicts)
    return verdicts


def test_fewer_steps_are_caught(assets, honest, tmp_path):
    """Half the steps (12, a checkpoint every 3), written up as 23 with one every 6."""
    cheat = run_job(tmp_path / "job", assets, max_steps=12, checkpoint_every=3)
    assert [c["step"] for c in cheat.transcript["checkpoints"]] == [0, 3, 6, 9, 12]
    assert_caught(written_up(tmp_path / "claim", honest, cheat, STEPS), assets)


def test_other_data_is_caught(assets, honest, tmp_path):
    """Trained on other sentences, claiming the customer's data."""
    cheat = run_job(tmp_path / "job", assets, data=assets["other"])
    verdicts = assert_caught(written_up(tmp_path / "claim", honest, cheat), assets)
    assert all(v["data_matches_transcript"] for v in verdicts)   # the claim names the real data


def test_another_learning_rate_is_caught(assets, honest, tmp_path):
    cheat = run_job(tmp_path / "job", assets, learning_rate=0.03)
    assert_caught(written_up(tmp_path / "claim", honest, cheat), assets)


def test_starting_weights_returned_are_caught(assets, honest, tmp_path):
    """No training at all: every checkpoint is the starting state, relabelled."""
    zero = Run({"checkpoints": [honest.transcript["checkpoints"][0]] * len(STEPS)}, honest.folder)
    assert_caught(written_up(tmp_path / "claim", honest, zero, STEPS), assets)


def test_a_cheat_in_one_segment_is_caught_by_that_segment_only(assets, honest, tmp_path):
    """Honest to step 18, then the last five steps skipped: only [18, 23) fails."""
    folder = tmp_path / "partial"
    shutil.copytree(honest.folder, folder)
    partial = json.loads(json.dumps(honest.transcript))
    point = T.Checkpoint.load(folder / T.entry_at(partial, 18)["file"])
    point = T.Checkpoint(23, point.tensors, dict(point.meta, step=23))
    point.save(folder / T.entry_at(partial, 23)["file"])
    partial["checkpoints"][-1].update(weights_sha256=point.weights_sha256(), state_sha256=point.state_sha256())
    verdicts = Run(partial, folder).check_all(assets)
    assert [v["match"] for v in verdicts] == [True, True, True, False]
    assert verdicts[-1]["distance"] > 0


def test_other_base_model_data_or_start_mismatch(assets, honest, tmp_path):
    # Other starting weights at step 0 than the seed gives (an adapter from elsewhere).
    point = T.Checkpoint.load(honest.file(0))
    key = next(k for k in point.weights if "lora_A" in k)
    point.tensors[f"model/{key}"] = point.tensors[f"model/{key}"] + 1e-3
    verdict = LV.verify_segment(honest.transcript, assets["data"], point.save(tmp_path / "s.safetensors"),
                                honest.file(6), model_folder=assets["model"], end_step=6, device=CPU)
    assert verdict["match"] is False and verdict["start_checkpoint_matches_transcript"] is False
    # The customer's data is not what the transcript says was trained on.
    verdict = honest.check(assets, 6, 12, data=assets["other"])
    assert verdict["match"] is False and verdict["data_matches_transcript"] is False
    # Another base model than the transcript's.
    other = tiny.save_model_folder(tmp_path / "other-model", seed=1)
    verdict = LV.verify_segment(honest.transcript, assets["data"], honest.file(6), honest.file(12),
                                model_folder=other, end_step=12, device=CPU)
    assert verdict["match"] is False and verdict["base_model_matches_transcript"] is False
    with pytest.raises(JobInputError, match="not a checkpoint of an LLM fine-tuning"):
        T.Checkpoint.load(assets["data"])


# --- kind 5753, as the worker runs it ----------------------------------------------------------

def test_a_transcript_naming_what_no_job_here_could_have_is_refused_before_building_it(assets, honest):
    """Its params are read as a job's are here (this provider's limits): a LoRA rank, a
    sequence length, a batch or a number of steps no job could have is refused before the model
    is built (found in review: nothing bounded them)."""
    cases = {"lora_r": 10**5, "max_seq_length": 10**6, "batch_size": 10**6, "learning_rate": 50.0,
             "planned_steps": 10**9}
    for name, value in cases.items():
        transcript = json.loads(json.dumps(honest.transcript))
        (transcript if name == "planned_steps" else transcript["params"])[name] = value
        started = time.perf_counter()
        with pytest.raises(JobInputError, match="no job here could have|a job here runs at most"):
            LV.verify_segment(transcript, assets["data"], honest.file(0), honest.file(6), end_step=6,
                              model_folder=assets["model"], device=CPU)
        assert time.perf_counter() - started < 10, name
        # ... and by the verify kind's precheck, before the customer pays (nothing downloaded but
        # the transcript); the honest transcript passes it.
        with pytest.raises(JobInputError, match="no job here could have|a job here runs at most"):
            LV.checker({}).precheck(types.SimpleNamespace(config={}), None, transcript)
    LV.checker({}).precheck(types.SimpleNamespace(config={}), None, honest.transcript)


def test_a_transcript_planning_other_steps_than_its_params_give_is_refused_before_any_step(assets, honest):
    """Its params on the data plan 20 steps (max_steps), its checkpoints go to 23: refused
    before the replay trains anything (before, [18, 23) replayed two steps, then failed)."""
    transcript = json.loads(json.dumps(honest.transcript))
    transcript["params"]["max_steps"] = 20
    with pytest.raises(JobInputError, match="the transcript plans 23 steps, 23 an epoch; its params on this "
                                            "data plan 20, 23 an epoch"):
        LV.verify_segment(transcript, assets["data"], honest.file(18), honest.file(23), end_step=23,
                          model_folder=assets["model"], device=CPU)


def test_a_check_of_an_llm_segment_is_priced_at_the_training_rate_for_its_steps(honest):
    """Each step counted as full sequences (batch_size × gradient_accumulation_steps ×
    max_seq_length tokens: the tokens themselves are known only once the data is tokenized)."""
    checker = LV.checker({"plugins": {"llm-finetune": {"sats_per_million_tokens": 2000}}})
    assert "2000 sats per million tokens replayed" in checker.pricing
    assert checker.price(honest.transcript, 6) == math.ceil(6 * 8 * 32 * 2000 / 1e6) == 4
    accumulating = json.loads(json.dumps(honest.transcript))
    accumulating["params"]["gradient_accumulation_steps"] = 4
    assert checker.price(accumulating, 6) == math.ceil(6 * 4 * 8 * 32 * 2000 / 1e6) == 13
    assert checker.price(honest.transcript, 1) == 1        # at least 1 sat
    based = LV.checker({"plugins": {"llm-finetune": {"sats_per_million_tokens": 2000, "sats_per_check": 20}}})
    assert based.pricing.startswith("20 sats a check plus 2000 sats per million tokens replayed")
    assert based.price(honest.transcript, 6) == math.ceil(20 + 6 * 8 * 32 * 2000 / 1e6) == 24
    free = LV.checker({"plugins": {"llm-finetune": {"sats_per_million_tokens": 0}}})
    assert free.price is None and free.pricing is None


def verify_ctx(workdir, run: Run, transcript: Path, a: int, b: int, data: Path, extra: dict | None = None,
               params: dict | None = None, config: dict | None = None):
    urls = {"https://b/d": data, "https://b/t": transcript, "https://b/s": run.file(a), "https://b/e": run.file(b)}
    markers = {"https://b/t": "transcript", "https://b/s": "start", "https://b/e": "end"}
    for url, (path, marker) in (extra or {}).items():
        urls[url], markers[url] = path, marker
    return make_ctx(workdir, VERIFY_KIND, urls, markers, params or {}, config)


def test_the_verify_kind_replays_an_llm_segment(assets, honest, tmp_path):
    kind = verify_kind()
    assert {"model", "revision"} <= set(kind.params_schema["properties"]) and "5751" in kind.description
    transcript = next(a.path for a in honest.result.artifacts if a.name == "transcript.json")
    model_input = {"https://b/m": (assets["zip"], "model")}
    request, ctx = verify_ctx(tmp_path / "v1", honest, transcript, 12, 18, assets["data"], model_input)
    verdict = kind.run(ctx, kind.parse(request)).content
    assert verdict["match"] is True and verdict["segment"] == [12, 18] and verdict["distance"] == 0.0
    assert verdict["transcript_signer"] is None and verdict["base_model_matches_transcript"] is True
    # Without the model: the transcript names an archive, which must be sent.
    request, ctx = verify_ctx(tmp_path / "v2", honest, transcript, 12, 18, assets["data"])
    with pytest.raises(JobInputError, match="marked 'model'"):
        kind.run(ctx, kind.parse(request))
    # A transcript that names another learning rate than the checkpoints were trained at.
    lied = json.loads(transcript.read_text())
    lied["params"]["learning_rate"] *= 2
    (tmp_path / "lied.json").write_text(json.dumps(lied))
    request, ctx = verify_ctx(tmp_path / "v3", honest, tmp_path / "lied.json", 12, 18, assets["data"], model_input)
    verdict = kind.run(ctx, kind.parse(request)).content
    assert verdict["match"] is False and verdict["distance"] > 0
    # The model param is checked as the job checks it, when the request is read: before payment.
    request, ctx = verify_ctx(tmp_path / "v4", honest, transcript, 12, 18, assets["data"], params={"model": "a/b"})
    with pytest.raises(JobInputError, match="not offered by this provider"):
        kind.parse(request)
    offered = verify_kind({"plugins": {"llm-finetune": {"allowed_models": ["a/b"]}}})
    assert offered.parse(request).params == {"model": "a/b"}
    with pytest.raises(JobInputError, match="not a branch, tag or commit"):
        offered.parse(verify_ctx(tmp_path / "v6", honest, transcript, 12, 18, assets["data"],
                                 params={"model": "a/b", "revision": "../x y"})[0])
    request, _ = verify_ctx(tmp_path / "v5", honest, transcript, 12, 18, assets["data"], model_input,
                            params={"model": "a/b"})
    with pytest.raises(JobInputError, match="not both"):
        kind.parse(request)


def test_kind_5753_is_served_by_either_training_plugin_once(assets, honest, tmp_path):
    """llm-finetune alone serves kind 5753 for its transcripts; with image-classifier too, the
    kind is registered once and checks both formats; image-classifier alone refuses an LLM
    transcript before fetching anything else, saying which formats it checks (its provider does
    not run llm-finetune, whose settings, model allow-list and hub cache the check needs)."""
    from dvm_core.worker.plugins import describe, plugin_manager

    from dvm_image_classifier import verify as ICV

    llm_only = verify_kind()
    assert llm_only.plugin == "llm-finetune" and "5751" in llm_only.description and "5750" not in llm_only.description
    both = verify_kind(plugins=("image-classifier", "llm-finetune"))
    assert both.plugin == "image-classifier,llm-finetune" and "5750" in both.description and "5751" in both.description
    assert set(both.params) == {"end_step", "tolerance", "model", "revision"} == set(both.params_schema["properties"])
    listed = {p["name"]: [k["kind"] for k in p["kinds"]]
              for p in describe(plugin_manager(only=["image-classifier", "llm-finetune"]), {})}
    assert listed == {"image-classifier": [5750, 5753], "llm-finetune": [5751, 5753]}
    assert LV.FORMAT == T.FORMAT

    transcript = next(a.path for a in honest.result.artifacts if a.name == "transcript.json")
    model_input = {"https://b/m": (assets["zip"], "model")}
    request, ctx = verify_ctx(tmp_path / "both", honest, transcript, 18, 23, assets["data"], model_input)
    verdict = both.run(ctx, both.parse(request)).content
    assert verdict["match"] is True and verdict["segment"] == [18, 23]

    image_only = verify_kind(plugins=("image-classifier",))
    fetched = []
    request, ctx = verify_ctx(tmp_path / "image", honest, transcript, 18, 23, assets["data"])
    fetcher = ctx._fetcher
    ctx._fetcher = lambda url, into, **kw: fetched.append(url) or fetcher(url, into, **kw)
    with pytest.raises(JobInputError, match=r"does not check transcripts of format 'dvm-llm-finetune-transcript/1': "
                                            rf"it checks {ICV.FORMAT} \(kind 5750, image classifier\)"):
        image_only.run(ctx, image_only.parse(request))
    assert fetched == ["https://b/t"]
    # Nor does it take the LLM check's model input or params.
    request, _ = verify_ctx(tmp_path / "image2", honest, transcript, 18, 23, assets["data"], model_input)
    with pytest.raises(JobInputError, match="unknown input marker 'model'"):
        image_only.parse(request)
    assert "model" not in image_only.params


def test_a_hub_model_job_is_verified_with_the_transcripts_model(assets, tmp_path):
    """Param model (the provider's hub cache): the transcript names repo and commit; the
    verifier takes them from it."""
    config = hub_config(assets)
    request, ctx = make_ctx(tmp_path / "job", lf.KIND, {DATA: assets["data"]}, {},
                            PARAMS | {"model": REPO_ID, "max_steps": 4, "checkpoint_every": 2}, config)
    kind = lf.job_kind(config)
    result = kind.run(ctx, kind.parse(request))
    files = {a.name: a.path for a in result.artifacts}
    transcript = json.loads(files["transcript.json"].read_text())
    assert transcript["base_model"]["source"] == {"hub": REPO_ID, "revision": COMMIT}
    run = Run(transcript, files["checkpoint-0000000.safetensors"].parent)
    verify = verify_kind(config)
    for a, b in ((0, 2), (2, 4)):
        request, ctx = verify_ctx(tmp_path / f"v{a}", run, files["transcript.json"], a, b, assets["data"],
                                  config=config)
        verdict = verify.run(ctx, verify.parse(request)).content
        assert verdict["match"] is True and verdict["segment"] == [a, b], verdict


def test_checkpoint_every_is_checked(assets, tmp_path):
    files = {DATA: assets["data"], MODEL: assets["zip"]}
    config = {"plugins": {"llm-finetune": {"max_processes": 2}}}
    request, _ = make_ctx(tmp_path, lf.KIND, files, {MODEL: "model"}, PARAMS | {"processes": 2}, config)
    with pytest.raises(JobInputError, match="checkpoint_every .*one process.*send processes=1"):
        lf.job_kind(config).parse(request)
    config = {"plugins": {"llm-finetune": {"launcher": "accelerate"}}}
    request, _ = make_ctx(tmp_path, lf.KIND, files, {MODEL: "model"}, PARAMS, config)
    with pytest.raises(JobInputError, match="child process"):
        lf.job_kind(config).parse(request)
    request, _ = make_ctx(tmp_path, lf.KIND, files, {MODEL: "model"}, PARAMS | {"checkpoint_every": -1})
    with pytest.raises(JobInputError, match="checkpoint_every"):
        lf.job_kind({}).parse(request)
    request, ctx = make_ctx(tmp_path / "many", lf.KIND, files, {MODEL: "model"},
                            PARAMS | {"epochs": 3, "checkpoint_every": 1})
    with pytest.raises(JobInputError, match="would write 71 checkpoints over 69 steps; at most 64: send 2 or more"):
        lf.job_kind({}).run(ctx, lf.job_kind({}).parse(request))


# --- `dvm verify` on an LLM result -------------------------------------------------------------

def test_dvm_verify_local_on_an_llm_result(assets, honest, tmp_path, monkeypatch):
    import tempfile

    from click.testing import CliRunner
    from dvm_verify.commands import MISMATCH_EXIT, verify_command

    folder = tmp_path / "result"
    shutil.copytree(honest.folder, folder)
    (folder / "transcript.json").write_text(json.dumps(honest.transcript))
    shutil.copy(next(a.path for a in honest.result.artifacts if a.name == "adapter_model.safetensors"), folder)
    args = [str(folder), "--data", str(assets["data"]), "--local", "--allow-unsigned", "--checks", "4"]
    missing = CliRunner().invoke(verify_command, args)
    assert missing.exit_code == 1 and "--model" in missing.output
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    ok = CliRunner().invoke(verify_command, args + ["--model", str(assets["zip"]), "--json"])
    assert ok.exit_code == 0, ok.output
    assert list(scratch.iterdir()) == []    # the base model unpacked from the archive is gone again
    summary = json.loads(ok.stdout)
    assert summary["passed"] and summary["checked"] == 4 and all(v["distance"] == 0.0 for v in summary["verdicts"])
    digest = honest.transcript["result_weights"]["adapter_model.safetensors"]
    assert summary["returned_weights"] == [
        {"file": "adapter_model.safetensors", "match": True, "expected_sha256": digest, "got_sha256": digest},
        {"file": "returned weights = last checkpoint's", "match": True, "expected_sha256": digest, "got_sha256": digest}]
    said = CliRunner().invoke(verify_command, args + ["--model", str(assets["zip"]), "--checks", "1"])
    assert said.exit_code == 0 and "returned weights: adapter_model.safetensors matches the transcript" in said.output
    # The adapter returned is not the one trained (one weight nudged): the segments still replay,
    # the returned weights do not match, and the check fails.
    from safetensors.torch import load_file, save_file
    adapter = load_file(str(folder / "adapter_model.safetensors"))
    first = sorted(adapter)[0]
    adapter[first] = adapter[first].clone()
    adapter[first].view(-1)[0] += 1e-3
    save_file(adapter, str(folder / "adapter_model.safetensors"))
    swapped = CliRunner().invoke(verify_command, args + ["--model", str(assets["zip"]), "--checks", "1"])
    assert swapped.exit_code == MISMATCH_EXIT, swapped.output
    assert "returned weights: adapter_model.safetensors DOES NOT MATCH the transcript" in swapped.output
    assert "FAILED: 1/1 segments match; the returned adapter_model.safetensors not the transcript's" in swapped.output
    # ... and a transcript that names that other adapter's digest as the one returned: the file
    # is the transcript's, but not the weights its last checkpoint holds (found in review); a
    # transcript that names no returned file at all fails too.
    for claimed in ({"adapter_model.safetensors": T.tensor_digest(adapter)}, {}):
        (folder / "transcript.json").write_text(json.dumps(dict(honest.transcript, result_weights=claimed)))
        other = CliRunner().invoke(verify_command, args + ["--model", str(assets["zip"]), "--checks", "1", "--json"])
        assert other.exit_code == MISMATCH_EXIT, other.output
        weights = json.loads(other.stdout)["returned_weights"]
        assert [w["match"] for w in weights] == [True, False] if claimed else [False], weights
    (folder / "transcript.json").write_text(json.dumps(honest.transcript))
    (folder / "adapter_model.safetensors").unlink()
    gone = CliRunner().invoke(verify_command, args + ["--model", str(assets["zip"]), "--checks", "1", "--json"])
    assert gone.exit_code == 0 and json.loads(gone.stdout)["returned_weights"][0]["match"] is None
    # The learning rate claimed is not the one trained at: every segment fails.
    claim = json.loads(json.dumps(honest.transcript))
    claim["params"]["learning_rate"] = 0.02
    (folder / "transcript.json").write_text(json.dumps(claim))
    bad = CliRunner().invoke(verify_command, args + ["--model", str(assets["model"]), "--checks", "2"])
    assert bad.exit_code == MISMATCH_EXIT and "FAILED: 0/2 segments match" in bad.output


def test_an_llm_transcript_is_held_to_the_base_model_and_params_ordered(honest):
    """`dvm verify --request`'s comparison for an LLM job: the base model sent (an archive,
    marked 'model') or asked for (param model), and the params sent."""
    from dvm_verify.checks import order_problems

    sent = {"learning_rate": "0.01", "checkpoint_every": "6"}
    archive = [{"data": "https://x/m", "type": "url", "marker": "model"}]
    assert order_problems(honest.transcript, {"kind": 5751, "params": sent, "inputs": archive}, None) == []
    hub = order_problems(honest.transcript, {"kind": 5751, "params": dict(sent, model="org/other"), "inputs": []},
                         None)
    assert len(hub) == 1 and "the base model 'org/other' was ordered" in hub[0]
    more = order_problems(honest.transcript, {"params": dict(sent, epochs="3"), "inputs": archive}, "ab" * 32)
    assert more == ["param epochs: 3 was ordered, the transcript trained with " f"{honest.transcript['params']['epochs']}"]


# --- through a real worker, relay, mint and blob server ----------------------------------------

@pytest.fixture
async def blobs(tmp_path):
    from dvm_core.devtools.blobserver import start_blob_server

    server = await start_blob_server(tmp_path / "blobs")
    yield server
    await server.stop()


async def test_a_paid_llm_job_with_a_transcript_verified_by_a_verifier_dvm(workers, mint, relay, blobs, assets,
                                                                          tmp_path):
    """A private kind-5751 job with checkpoint_every: the transcript comes back as a kind-1750
    event signed by the provider; one segment replayed here, one by a verifier DVM (kind 5753,
    paid, the base model archive sent marked 'model') that runs llm-finetune alone (no
    image-classifier plugin); `dvm verify` as typed hires it too."""
    from click.testing import CliRunner
    from dvm_core import SIGNED_FILE_KIND
    from dvm_core.customer.client import download_artifacts, upload_dataset
    from dvm_core.protocol.nip90 import Result
    from dvm_core.worker.plugins import plugin_manager
    from dvm_verify.checks import check_local, check_remote, open_result
    from dvm_verify.commands import verify_command

    from .paying import close_customer, funded_customer

    worker = await workers.start(
        pm=plugin_manager(only=["llm-finetune"]), mints=[mint.url], blob_servers=[blobs.url],
        allow_private_urls=True, plugins={"llm-finetune": {"sats_per_million_tokens": 2000}})
    customer = await funded_customer(tmp_path, mint.url, relay.url)
    try:
        data_url = await upload_dataset(assets["data"], [blobs.url], customer.keys, encrypt=True)
        model_url = await upload_dataset(assets["zip"], [blobs.url], customer.keys, encrypt=True)
        request = await customer.submit(lf.KIND, [JobInput(data_url, "url"), JobInput(model_url, "url", marker="model")],
                                        {k: str(v) for k, v in PARAMS.items()}, provider=worker.keys.public_key)
        result = None
        async for update in customer.updates(request, timeout=300):
            if isinstance(update, Result):
                result = update
                break
            assert update.status != "error", update.message
            if update.status == "payment-required":
                await customer.pay_with_nutzap(request, update, customer.wallet)
        assert result is not None
        folder = tmp_path / "result"
        saved = {p.name for p in await download_artifacts(result, folder, allow_private=True)}
        assert {"adapter_model.safetensors", "transcript.json", "checkpoint-0000000.safetensors",
                "checkpoint-0000023.safetensors"} <= saved
        event = json.loads((folder / "transcript.json").read_text())
        assert event["kind"] == SIGNED_FILE_KIND and event["pubkey"] == worker.keys.public_key

        opened = open_result(folder, provider=worker.keys.npub)
        assert opened.transcript["format"] == T.FORMAT
        here = check_local(opened, assets["data"], [(6, 12)], model=assets["zip"])
        assert here.passed and here.verdicts[0]["distance"] == 0.0
        before = sum((await customer.wallet.balance()).values())
        there = await check_remote(customer, customer.wallet, worker.keys.public_key, opened, assets["data"],
                                   [(18, 23)], [blobs.url], max_price=5, timeout=300, model=assets["zip"])
        assert there.passed and there.verdicts[0]["transcript_signer"] == worker.keys.public_key
        assert there.verdicts[0]["base_model_matches_transcript"] is True
        # Priced by its segment at the training rate, each step counted as full sequences: 5 steps
        # × 8 × 32 tokens × 2000 sats per million = 2.56, rounded up.
        assert before - sum((await customer.wallet.balance()).values()) == 3

        payer = await funded_customer(tmp_path, mint.url, relay.url)
        wallet_dir = payer.wallet.directory
        await close_customer(payer)
        run = await asyncio.to_thread(CliRunner().invoke, verify_command, [
            str(folder), "--data", str(assets["data"]), "--model", str(assets["zip"]), "--checks", "1",
            "--seed", "2", "--provider", worker.keys.npub, "--relay", relay.url, "--dvm", worker.keys.npub,
            "--blossom", blobs.url, "--wallet-dir", str(wallet_dir), "--mint", mint.url, "--max-price", "5",
            "--json"])
        assert run.exit_code == 0, run.output
        summary = json.loads(run.stdout)
        assert summary["passed"] and summary["verdicts"][0]["by"] == worker.keys.public_key
    finally:
        await close_customer(customer)
