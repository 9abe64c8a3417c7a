"""Spot checks of a training result: which segments, how likely they catch a cheat, and running
them here or on a verifier DVM.

A provider that cheated in m of a transcript's n segments (trained fewer steps there, on other
data, at another learning rate, or not at all) is caught by a check of any of those m: c checks
drawn without replacement miss every one of them with probability C(n − m, c) / C(n, c), so they
catch it with probability 1 − C(n − m, c) / C(n, c) (about 1 − (1 − m/n)^c).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path


class VerifyError(Exception):
    """The result cannot be checked (no transcript, a bad signature, a missing checkpoint)."""


def catch_probability(n: int, m: int, c: int) -> float:
    """The chance that c distinct random segments of n include at least one of m cheated ones."""
    if m <= 0 or c <= 0:
        return 0.0
    c = min(c, n)
    return 1.0 - math.comb(n - m, c) / math.comb(n, c)


def checks_needed(n: int, m: int, p: float) -> int:
    """The fewest checks that catch a cheat in m of n segments with probability at least p."""
    for c in range(1, n + 1):
        if catch_probability(n, m, c) >= p:
            return c
    return n


@dataclass
class ResultFolder:
    """A downloaded result: the transcript (its signature checked) and its checkpoint files."""

    folder: Path
    transcript: dict
    signer: str | None
    job_id: str | None

    def checkpoint(self, step: int) -> Path:
        from dvm_core.transcripts import entry_at

        path = self.folder / entry_at(self.transcript, step)["file"]
        if not path.exists():
            raise VerifyError(f"the checkpoint at step {step} ({path.name}) is not in {self.folder}")
        return path


def open_result(folder: Path, provider: str | None = None, allow_unsigned: bool = False) -> ResultFolder:
    """Read `folder`/transcript.json; check that it is signed, and by `provider` when given."""
    from dvm_core import open_signed_file
    from dvm_core.protocol.events import parse_public_key

    path = Path(folder) / "transcript.json"
    if not path.exists():
        raise VerifyError(f"no transcript.json in {folder}: send the job with param checkpoint_every")
    data = path.read_bytes()
    raw = json.loads(data)
    signer = job_id = None
    if isinstance(raw, dict) and "sig" in raw:
        try:
            signed = open_signed_file(data)
        except ValueError as exc:
            raise VerifyError(f"{path}: {exc}") from None
        signer, job_id, raw = signed.pubkey, signed.job_id, json.loads(signed.text)
        if provider is not None and signer != parse_public_key(provider):
            raise VerifyError(f"{path} is signed by {signer}, not by the provider {provider}")
    elif not allow_unsigned:
        raise VerifyError(f"{path} is not signed (a signed transcript is a Nostr event)")
    if not isinstance(raw, dict) or not raw.get("checkpoints"):
        raise VerifyError(f"{path} is not a training transcript")
    return ResultFolder(Path(folder), raw, signer, job_id)


def order_problems(transcript: dict, order: dict, job_id: str | None) -> list[str]:
    """Where the transcript does not describe the job that was ordered (`order`: OUT/request.json
    of `dvm job submit`, the request as sent): another job id or kind, or a param the customer
    sent that it trained with another value of (fewer epochs, another learning rate, every
    checkpoint_every...). An honest replay of a cheaper job than the one paid for is still a
    cheat. The params are read as the plugin reads them (`parse_params`, its defaults), with no
    provider's limits."""
    import dataclasses

    problems = []
    if job_id is not None and order.get("id") not in (None, job_id):
        problems.append(f"the transcript is signed for job {job_id}, not the one ordered ({str(order['id'])[:64]})")
    if order.get("kind") not in (None, job_kind_of(transcript)):
        problems.append(f"the transcript is of a kind-{job_kind_of(transcript)} job; kind {order['kind']} was ordered")
    sent = {str(k): str(v) for k, v in (order.get("params") or {}).items()}
    markers = {str(i.get("marker") or "") for i in order.get("inputs") or [] if isinstance(i, dict)}
    if is_llm(transcript):
        from dvm_llm_finetune.params import Limits, parse_params

        def read(limits):
            return parse_params(sent, limits, has_eval_input="eval" in markers).as_dict()
    else:
        from dvm_image_classifier.params import Limits, parse_params
        from dvm_image_classifier.transcript import _params_json

        def read(limits):
            return _params_json(parse_params(sent, limits, has_validation_input="validation" in markers))
    limits = Limits()
    limits = dataclasses.replace(limits, **{f.name: 10**12 for f in dataclasses.fields(limits)
                                            if f.name.startswith("max_") and type(getattr(limits, f.name)) in (int, float)})
    from dvm_core import JobInputError
    try:
        ordered = read(limits)
    except JobInputError as exc:
        raise VerifyError(f"the order's params cannot be read: {exc}") from None
    claimed = transcript.get("params") or {}
    if is_llm(transcript):   # the base model: the hub repo asked for, or the archive sent
        source = (transcript.get("base_model") or {}).get("source") or {}
        if "model" in sent and source.get("hub") != sent["model"]:
            problems.append(f"the base model {sent['model']!r} was ordered; the transcript's is {source}")
        if "model" in markers and not source.get("archive_sha256"):
            problems.append(f"a base model archive was sent; the transcript's base is {source}")
    for name in sorted(set(sent) & set(ordered) - {"time_limit"}):
        if claimed.get(name) != ordered[name]:
            problems.append(f"param {name}: {ordered[name]!r} was ordered, the transcript trained with "
                            f"{claimed.get(name)!r}")
    return problems


def pick_segments(transcript: dict, checks: int, seed: int) -> list[tuple[int, int]]:
    """`checks` distinct segments, drawn with `seed` (all of them when there are fewer)."""
    from dvm_core.transcripts import segments

    every = segments(transcript)
    chosen = random.Random(seed).sample(range(len(every)), min(checks, len(every)))
    return [every[i] for i in sorted(chosen)]


@dataclass
class Report:
    """The checks' verdicts and what they mean."""

    segments: int
    verdicts: list[dict] = field(default_factory=list)
    signer: str | None = None
    weights: list[dict] = field(default_factory=list)   # `check_returned_weights`
    problems: list[str] = field(default_factory=list)   # `dvm_core.transcripts.structure_problems`

    @property
    def passed(self) -> bool:
        return not self.problems and all(v.get("match") for v in self.verdicts) \
            and all(w["match"] is not False for w in self.weights)

    def to_dict(self) -> dict:
        checked = len(self.verdicts)
        return {"passed": self.passed, "segments": self.segments, "checked": checked, "signer": self.signer,
                "problems": self.problems, "verdicts": self.verdicts, "returned_weights": self.weights,
                # had the provider cheated in one segment (or in a tenth of them): the chance
                # that these checks would have caught it
                "catch_probability_one_segment": round(catch_probability(self.segments, 1, checked), 4),
                "catch_probability_tenth": round(catch_probability(
                    self.segments, max(1, self.segments // 10), checked), 4)}


LLM_FORMAT = "dvm-llm-finetune-transcript/1"


def check_returned_weights(result: ResultFolder) -> list[dict]:
    """Whether the weights the job returned are the ones the transcript names: for an LLM
    transcript each file of its ``result_weights`` (the adapter, or the model's safetensors), for
    an image classifier's ``model.safetensors`` against the last checkpoint's ``weights_sha256``.
    One entry per file: ``match`` True or False, or None when the file is not in the folder (then
    unchecked, and said so)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    llm = is_llm(result.transcript)
    if llm:
        from dvm_llm_finetune.transcript import tensor_digest
        expected = dict(result.transcript.get("result_weights") or {})
    else:
        from dvm_image_classifier.transcript import tensor_digest
        expected = {"model.safetensors": result.transcript["checkpoints"][-1]["weights_sha256"]}
    out, returned = [], {}
    for name, digest in sorted(expected.items()):
        path = result.folder / name
        entry = {"file": name, "expected_sha256": digest, "got_sha256": None, "match": None}
        if path.exists():
            try:
                tensors = load_file(str(path))
                entry["got_sha256"] = tensor_digest(tensors)
                returned.update(tensors)
            except (SafetensorError, OSError, ValueError) as exc:
                entry["error"] = f"not a safetensors file: {exc}"
            entry["match"] = entry["got_sha256"] == digest
        out.append(entry)
    if llm:
        out.append(_returned_against_last_checkpoint(result, expected, returned, out, tensor_digest))
    return out


def _returned_against_last_checkpoint(result: ResultFolder, expected: dict, returned: dict, entries: list,
                                      tensor_digest) -> dict:
    """An LLM transcript names its returned files' digests itself (`result_weights`): that they
    are the trained weights is checked here, against the last checkpoint (whose state is the
    transcript's): the returned tensors, all files together, are its weights, named as peft and
    transformers save them (without the adapter's name, ``.default``). None when a file or the
    checkpoint is not in the folder; False when the transcript names no returned file."""
    last = result.transcript["checkpoints"][-1]
    entry = {"file": "returned weights = last checkpoint's", "expected_sha256": last["weights_sha256"],
             "got_sha256": None, "match": None}
    if not expected:
        return entry | {"match": False, "error": "the transcript names no returned weights (result_weights)"}
    if any(e["match"] is None for e in entries) or any(e["match"] is False for e in entries):
        return entry | {"error": "not compared: a returned file is missing or is not the transcript's"}
    from dvm_core import JobInputError
    try:
        point = _checkpoint_class(result.transcript).load(result.checkpoint(last["step"]))
    except VerifyError:
        return entry | {"error": f"not compared: {last['file']} is not in the folder"}
    except JobInputError:
        point = None
    if point is None or point.state_sha256() != last["state_sha256"]:
        return entry | {"match": False, "error": f"{last['file']} is not the state the transcript names"}
    named = {k.replace(".default.", "."): v for k, v in point.weights.items()}
    entry["expected_sha256"], entry["got_sha256"] = tensor_digest(named), tensor_digest(returned)
    entry["match"] = entry["expected_sha256"] == entry["got_sha256"]
    return entry


def is_llm(transcript: dict) -> bool:
    """An LLM fine-tuning's transcript (kind 5751), else an image classifier's (kind 5750)."""
    return transcript.get("format") == LLM_FORMAT


def job_kind_of(transcript: dict) -> int:
    return 5751 if is_llm(transcript) else 5750


def _checkpoint_class(transcript: dict):
    if is_llm(transcript):
        from dvm_llm_finetune.transcript import Checkpoint
    else:
        from dvm_image_classifier.transcript import Checkpoint
    return Checkpoint


def _unreplayable(result: ResultFolder, a: int, b: int) -> dict | None:
    """A mismatch found before any replay: the provider's checkpoint file for step `a` or `b` is
    not the state its transcript names there (or not a checkpoint at all)."""
    from dvm_core import JobInputError
    from dvm_core.transcripts import entry_at

    Checkpoint = _checkpoint_class(result.transcript)

    for step in (a, b):
        expected = entry_at(result.transcript, step)
        why = f"the provider's checkpoint for step {step} is not the state its transcript names"
        try:
            point = Checkpoint.load(result.checkpoint(step))
            ok = point.step == step and point.state_sha256() == expected["state_sha256"]
            got = point.weights_sha256()
        except JobInputError:
            ok, got = False, None
        except VerifyError:     # kept for the announced retention time: its absence is the provider's
            ok, got = False, None
            why = f"the provider's checkpoint for step {step} ({expected['file']}) was not delivered"
        if not ok:
            return {"match": False, "distance": None, "segment": [a, b],
                    "expected_sha256": expected["weights_sha256"], "got_sha256": got, "reason": why}
    return None


def _weights_fit(result: ResultFolder, weights: Path | None) -> None:
    if weights is not None and is_llm(result.transcript):
        raise VerifyError("initial weights (--weights) are for image classifier transcripts; an LLM's base is --model")


def check_local(result: ResultFolder, data: Path, picked: list[tuple[int, int]], *, tolerance: float = 0.0,
                model: Path | None = None, weights: Path | None = None, on_verdict=lambda verdict: None) -> Report:
    """Replay each picked segment on this machine. An LLM transcript also needs its base model:
    `model` (a model folder, or the archive the job was sent), else this machine's hub cache. An
    image classifier's job sent initial weights is checked at step 0 against `weights`."""
    import functools
    import tempfile

    _weights_fit(result, weights)
    with tempfile.TemporaryDirectory(prefix="dvm-verify-") as workdir:   # an unpacked base model: gigabytes
        if is_llm(result.transcript):
            from dvm_core import JobInputError
            from dvm_llm_finetune.verify import local_base, verify_segment
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()   # "Loading weights" bars on every replay: the report is the output
            try:
                folder = local_base(result.transcript, model, Path(workdir))
            except JobInputError as exc:
                raise VerifyError(f"the base model: {exc}") from None
            verify_segment = functools.partial(verify_segment, model_folder=folder)
        else:
            from dvm_image_classifier.verify import verify_segment
            verify_segment = functools.partial(verify_segment, weights_path=weights)

        report = Report(len(result.transcript["checkpoints"]) - 1, signer=result.signer)
        for a, b in picked:
            verdict = _unreplayable(result, a, b) or verify_segment(
                result.transcript, data, result.checkpoint(a), result.checkpoint(b), end_step=b, tolerance=tolerance)
            verdict["by"] = "local"
            report.verdicts.append(verdict)
            on_verdict(verdict)
    return report


async def _fixed_price_announced(customer, verifier: str, kind: int, *, before_asked: bool = False) -> None:
    """Without a cap (`max_price`), a check is paid only at a fixed price the verifier announced
    (which the client holds it to); one that prices checks by their segment could ask anything.
    `before_asked`: before anything is uploaded, refuse only a verifier whose announcement says
    it prices this kind by a rule (one that announces nothing may serve it free)."""
    info = await customer.wallet_info(verifier)
    name = info.names.get(str(kind))
    if before_asked and not (name and (info.pricing or {}).get(name)):
        return
    if not isinstance(info.prices.get(name) if name else None, int):
        rule = (info.pricing or {}).get(name) if name else None
        raise VerifyError("not paid: the verifier announces no fixed price for a check"
                          + (f" (it prices {rule})" if rule else "")
                          + "; give --max-price, the most you pay for one check")


async def check_remote(customer, wallet, verifier: str, result: ResultFolder, data: Path,
                       picked: list[tuple[int, int]], servers: list[str], *, kind: int = 5753,
                       tolerance: float = 0.0, max_price: int | None = None, timeout: float = 600,
                       model: Path | None = None, weights: Path | None = None,
                       on_verdict=lambda verdict: None) -> Report:
    """Hire the verifier DVM `verifier` for each picked segment: the data, the signed transcript
    and the two checkpoints uploaded encrypted, one paid kind-5753 job each. For an LLM
    transcript, `model` (the archive the job was sent) is uploaded too, marked 'model'; without
    it the verifier takes the hub model the transcript names."""
    from dvm_core.customer import PaymentDeclined, upload_dataset
    from dvm_core.customer.client import state_keeper
    from dvm_core.payments.wallet_types import PaymentError
    from dvm_core.protocol.nip90 import JobInput, Result

    async def url(path: Path) -> str:
        return await upload_dataset(path, servers, customer.keys, encrypt=True)

    _weights_fit(result, weights)    # before anything is uploaded
    if model is not None:
        if not is_llm(result.transcript):
            raise VerifyError("a base model is for LLM transcripts; this is an image classifier's")
        if Path(model).is_dir():
            raise VerifyError(f"{model} is a folder: give the archive (zip/tar) the job was sent")
    if max_price is None:
        await _fixed_price_announced(customer, verifier, kind, before_asked=True)
    data_url = await url(Path(data))
    transcript_url = await url(result.folder / "transcript.json")
    extra = []
    if model is not None:
        extra.append(JobInput(await url(Path(model)), "url", marker="model"))
    if weights is not None:
        extra.append(JobInput(await url(Path(weights)), "url", marker="weights"))
    report = Report(len(result.transcript["checkpoints"]) - 1, signer=result.signer)
    for a, b in picked:
        verdict = _unreplayable(result, a, b)
        if verdict is not None:   # no need to pay anyone to see that
            verdict["by"] = "local"
            report.verdicts.append(verdict)
            on_verdict(verdict)
            continue
        inputs = [JobInput(data_url, "url"), JobInput(transcript_url, "url", marker="transcript"),
                  JobInput(await url(result.checkpoint(a)), "url", marker="start"),
                  JobInput(await url(result.checkpoint(b)), "url", marker="end"), *extra]
        params = {"end_step": str(b)} | ({"tolerance": repr(tolerance)} if tolerance else {})
        request = await customer.submit(kind, inputs, params, provider=verifier)
        verdict = None
        async for update in customer.updates(request, timeout=timeout):
            if isinstance(update, Result):
                verdict = json.loads(update.content)
                break
            if update.status == "error":
                raise VerifyError(f"the verifier refused the check of [{a}, {b}): {update.message}")
            if update.status == "payment-required":
                if max_price is None:
                    await _fixed_price_announced(customer, verifier, kind)
                # Kept as it goes (the locked ecash and the change have random secrets: only this
                # record gets them back if the mint's answer is lost or we are killed mid-payment).
                record = result.folder / "verify-payments" / f"{request['id']}.json"
                keep, kept = state_keeper(record), []
                try:
                    await customer.pay_with_nutzap(request, update, wallet, max_price=max_price,
                                                   keep=lambda state: (kept.append(True), keep(state)))
                except PaymentDeclined as exc:
                    raise VerifyError(f"not paid: {exc}") from None
                except (PaymentError, RuntimeError) as exc:
                    raise VerifyError(
                        f"the check of [{a}, {b}) was not paid: {exc}"
                        + (f"; the payment may have been made at the mint: `dvm job reclaim --wallet-dir DIR "
                           f"--relay R {record}` sends it to the verifier (which runs the check or sends "
                           "the ecash back)" if kept else "")) from None
        if verdict is None:
            raise VerifyError(f"no answer from the verifier for [{a}, {b})")
        verdict["by"] = verifier
        report.verdicts.append(verdict)
        on_verdict(verdict)
    return report
