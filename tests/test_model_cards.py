"""The model cards a person reads: ``README.md`` beside ``model_card.json``, in the Hugging Face
layout, from real training jobs of both plugins (run directly, as tests/test_image_classifier.py
and tests/test_llm_finetune.py do); the classifier's confusion matrix and per-class figures; the
LLM's loss and perplexity curve; the training curves' title and legend. The "how to use"
snippet of each card is run, as written, on the files the job returned.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")
yaml = pytest.importorskip("yaml")

from PIL import Image  # noqa: E402

from .test_image_classifier import DATA_URL, Job, save_npz  # noqa: E402

from dvm_image_classifier.digits import CLASSES, digits_split  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def front_matter(readme: str) -> tuple[dict, str]:
    """The YAML front matter (parsed) and the Markdown after it."""
    match = re.match(r"---\n(.*?)\n---\n", readme, re.S)
    assert match, readme[:300]
    return yaml.safe_load(match.group(1)), readme[match.end():]


def python_block(readme: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert len(blocks) == 1, readme
    return blocks[0]


def env() -> dict:
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'plugins'}", "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


# --- the image classifier ------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits_job(tmp_path_factory):
    """Digits, 3 epochs (as few as give a useful model), 10% held out for validation."""
    tmp = tmp_path_factory.mktemp("cards")
    x, y, x_test, y_test = digits_split()
    train = save_npz(tmp / "digits_train.npz", x=x, y=y, classes=np.array(CLASSES))
    job = Job(tmp, {DATA_URL: train}, {"epochs": 3})
    result = job.run()
    return {"result": result, "files": {a.name: a.path for a in result.artifacts}, "train": train,
            "x_test": x_test, "y_test": y_test, "job_id": job.request.id}


def test_classifier_returns_a_readme_in_the_hugging_face_layout(digits_job):
    result, files = digits_job["result"], digits_job["files"]
    assert [a.name for a in result.artifacts] == ["model.safetensors", "model_card.json", "README.md",
                                                  "training_curves.png", "confusion_matrix.png"]
    assert {a.name: a.type for a in result.artifacts}["README.md"] == "text/markdown"
    card = json.loads(files["model_card.json"].read_text())
    readme = files["README.md"].read_text(encoding="utf-8")
    meta, body = front_matter(readme)
    assert meta["library_name"] == "pytorch" and meta["pipeline_tag"] == "image-classification"
    assert {"image-classification", "cnn", "safetensors"} <= set(meta["tags"]) and meta["metrics"] == ["accuracy"]
    (result_entry,) = meta["model-index"][0]["results"]
    assert result_entry["task"]["type"] == "image-classification"
    assert result_entry["metrics"][0] == {"type": "accuracy", "value": round(card["metrics"]["val_accuracy"], 4),
                                          "name": "validation accuracy"}
    for section in ("## Training data", "## How to use", "## Training hyperparameters", "## Metrics",
                    "## Limitations"):
        assert section in body, section
    # The data by fingerprint: the sha256 of the file sent, and the job it came from.
    assert hashlib.sha256(digits_job["train"].read_bytes()).hexdigest() in body
    assert digits_job["job_id"] in body and card["job"] == {"id": digits_job["job_id"], "kind": 5750,
                                                           "name": "image-classifier"}
    assert "| epochs | 3 |" in body and "| optimizer | adamw |" in body
    # Every file returned is listed, and shown where it is a chart.
    listed = re.findall(r"^- `([^`]+)`", body.split("## Files")[1], re.M)
    assert listed == [a.name for a in result.artifacts]
    assert "](training_curves.png)" in body and "](confusion_matrix.png)" in body


def test_per_class_precision_and_recall_match_the_confusion_matrix(digits_job):
    files = digits_job["files"]
    card = json.loads(files["model_card.json"].read_text())
    matrix = np.array(card["metrics"]["confusion_matrix"])
    assert matrix.shape == (10, 10) and matrix.sum() == card["datasets"]["validation"]["samples"] == 144
    # The same validation images as the history's val_accuracy.
    assert np.trace(matrix) / matrix.sum() == pytest.approx(card["metrics"]["val_accuracy"], abs=1e-9)
    rows = card["metrics"]["per_class"]
    assert [r["class"] for r in rows] == list(CLASSES)
    for i, row in enumerate(rows):
        assert row["support"] == matrix[i].sum()
        assert row["recall"] == round(matrix[i, i] / matrix[i].sum(), 4)
        assert row["precision"] == round(matrix[i, i] / matrix[:, i].sum(), 4)
    body = files["README.md"].read_text(encoding="utf-8")
    first = rows[0]
    assert f"| `0` | {first['precision']:.4f} | {first['recall']:.4f} |" in body
    with Image.open(files["confusion_matrix.png"]) as png:
        assert png.format == "PNG" and png.mode == "RGB" and min(png.size) >= 500
        colours = dict((c, n) for n, c in png.getcolors(1 << 20))
    # The diagonal (well classified) is drawn in dark blue: cells of at least 30×30 pixels each.
    dark = sum(n for c, n in colours.items() if c[2] > 100 and c[0] < 40 and c[1] < 80)
    assert dark > 8 * 30 * 30, dark


def test_the_readme_snippet_runs_on_the_returned_files(digits_job, tmp_path):
    """The "How to use" code, as written, in a folder holding only what the job returned."""
    from dvm_image_classifier.predict import classify, load_model

    for name, path in digits_job["files"].items():
        shutil.copy(path, tmp_path / name)
    image = digits_job["x_test"][0]
    Image.fromarray(image).save(tmp_path / "image.png")
    code = python_block((tmp_path / "README.md").read_text(encoding="utf-8"))
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env(), capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    label, probability = run.stdout.split()
    model, preprocess = load_model(tmp_path / "model.safetensors", tmp_path / "model_card.json")
    assert label == classify(model, preprocess, image[None])[0]
    assert 0.1 < float(probability) <= 1.0


def test_training_curves_name_the_job_and_keep_the_legend_off_the_last_points(digits_job, tmp_path):
    from dvm_core.charts import save_png
    from dvm_image_classifier.outputs import curves_figure

    card = json.loads(digits_job["files"]["model_card.json"].read_text())
    readme = digits_job["files"]["README.md"].read_text(encoding="utf-8")
    (title,) = re.findall(r"!\[([^\]]*)\]\(training_curves\.png\)", readme)   # the title the PNG was drawn with
    assert title.startswith(f"image-classifier job {digits_job['job_id'][:8]}: cnn on 1,294 images")
    fig = curves_figure(card["history"], title)
    save_png(fig, tmp_path / "curves.png")
    assert fig._suptitle.get_text() == title
    renderer = fig.canvas.get_renderer()
    legend = fig.axes[-1].get_legend().get_window_extent(renderer)
    for ax in fig.axes:
        box = ax.get_window_extent(renderer)
        assert not box.overlaps(legend), (box, legend)       # the legend is beside the charts
        for line in ax.get_lines():                           # and every last point inside its chart
            x, y = line.get_xydata()[-1]
            px, py = ax.transData.transform((x, y))
            assert box.x0 <= px <= box.x1 and box.y0 <= py <= box.y1
    with Image.open(digits_job["files"]["training_curves.png"]) as png, Image.open(tmp_path / "curves.png") as again:
        assert png.size == again.size == (1000, 420)
        assert png.tobytes() == again.tobytes()               # the PNG returned is this figure


# --- the LLM fine-tuner ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def lora_result(tmp_path_factory):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from .test_llm_finetune import (DATA_URL as TEXT_URL, FAST, MODEL_URL, build_tokenizer, save_model_folder,
                                    sentences, write_jsonl, zip_folder)
    from .test_llm_finetune import Job as LlmJob

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tmp = tmp_path_factory.mktemp("llm-card")
        gpt2 = save_model_folder(tmp / "gpt2", "gpt2", build_tokenizer())
        text = write_jsonl(tmp / "text.jsonl", [{"text": s} for s in sentences(400)])
        job = LlmJob(tmp, {TEXT_URL: text, MODEL_URL: zip_folder(gpt2, tmp / "gpt2.zip")},
                     {**FAST, "epochs": 1, "method": "lora", "learning_rate": 0.01, "lora_r": 8})
        result = job.run()
    finally:
        torch.set_num_threads(before)
    return {"result": result, "files": {a.name: a.path for a in result.artifacts}, "gpt2": gpt2,
            "text": text, "job_id": job.request.id}


def test_llm_result_has_a_readme_and_a_loss_and_perplexity_curve(lora_result):
    result, files = lora_result["result"], lora_result["files"]
    assert [a.name for a in result.artifacts] == ["adapter_model.safetensors", "adapter_config.json",
                                                  "model_card.json", "README.md", "loss_curve.png"]
    card = json.loads(files["model_card.json"].read_text())
    readme = files["README.md"].read_text(encoding="utf-8")
    assert "More Information Needed" not in readme      # ours, not the template peft writes there
    meta, body = front_matter(readme)
    assert meta["library_name"] == "peft" and meta["pipeline_tag"] == "text-generation"
    assert {"lora", "peft", "gpt2"} <= set(meta["tags"]) and meta["metrics"] == ["perplexity"]
    metrics = meta["model-index"][0]["results"][0]["metrics"]
    assert metrics[0] == {"type": "perplexity", "value": round(card["metrics"]["after"]["eval_perplexity"], 4),
                          "name": "eval perplexity"}
    assert hashlib.sha256(lora_result["text"].read_bytes()).hexdigest() in body
    assert card["base_model"]["archive_sha256"] in body and lora_result["job_id"] in body
    assert f"| eval_loss | {card['metrics']['before']['eval_loss']:.4f} | {card['metrics']['after']['eval_loss']:.4f} |" \
        in body
    assert card["weights"]["adapter_model.safetensors"] in body
    for section in ("## Training data", "## How to use", "## Training hyperparameters", "## Metrics",
                    "## Limitations"):
        assert section in body, section

    from dvm_llm_finetune.outputs import loss_figure
    fig = loss_figure(card["history"], card["metrics"]["before"], card["metrics"]["after"], "t")
    loss, perplexity = fig.axes[:2]
    assert (loss.get_title(), perplexity.get_title()) == ("loss", "perplexity")
    marked = [t.get_text() for ax in (loss, perplexity) for t in ax.texts]
    after = card["metrics"]["after"]
    assert marked[1] == f"eval {after['eval_loss']:.3g}" and marked[3] == f"eval {after['eval_perplexity']:.3g}"
    with Image.open(files["loss_curve.png"]) as png:
        assert png.size == (1000, 450)
        colours = {c for _, c in png.getcolors(1 << 20)}
    assert (31, 119, 180) in colours and (255, 127, 14) in colours    # the train line, the eval dots


def test_llm_readme_snippet_loads_the_adapter(lora_result, tmp_path):
    """The LoRA snippet, with BASE pointed at the base model's folder (the card says to)."""
    for name, path in lora_result["files"].items():
        shutil.copy(path, tmp_path / name)
    code = python_block((tmp_path / "README.md").read_text(encoding="utf-8"))
    assert 'BASE = "base_model"' in code
    code = code.replace('BASE = "base_model"', f"BASE = {str(lora_result['gpt2'])!r}")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env(), capture_output=True, text=True,
                         timeout=180)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.startswith("Hello") and len(run.stdout.strip()) > len("Hello")


def test_full_finetuning_readme_names_the_hub_base_and_its_snippet_loads_the_result(tmp_path):
    """A full fine-tune of a model from the provider's hub cache: ``base_model`` in the front
    matter, and the snippet loads the returned folder alone (model and tokenizer)."""
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from .test_llm_finetune import (COMMIT, DATA_URL as TEXT_URL, FAST, REPO_ID, build_tokenizer, hub_cache,
                                    save_model_folder, sentences, write_jsonl)
    from .test_llm_finetune import Job as LlmJob

    gpt2 = save_model_folder(tmp_path / "gpt2", "gpt2", build_tokenizer())
    config = {"plugins": {"llm-finetune": {"allowed_models": [REPO_ID],
                                           "hub_cache_dir": str(hub_cache(tmp_path / "hub", REPO_ID, gpt2))}}}
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": s} for s in sentences(200)])
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = LlmJob(tmp_path, {TEXT_URL: text}, {**FAST, "epochs": 1, "model": REPO_ID, "method": "full"},
                        config=config).run()
    finally:
        torch.set_num_threads(before)
    files = {a.name: a.path for a in result.artifacts}
    assert {"model.safetensors", "config.json", "tokenizer.json", "model_card.json", "README.md",
            "loss_curve.png"} <= set(files)
    meta, body = front_matter(files["README.md"].read_text(encoding="utf-8"))
    assert meta["library_name"] == "transformers" and meta["base_model"] == REPO_ID
    assert "full-fine-tuning" in meta["tags"] and "lora" not in meta["tags"]
    assert f"`{REPO_ID}` (revision `{COMMIT}`)" in body
    returned = tmp_path / "returned"
    returned.mkdir()
    for name, path in files.items():
        shutil.copy(path, returned / name)
    run = subprocess.run([sys.executable, "-c", python_block(body)], cwd=returned, env=env(), capture_output=True,
                         text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.startswith("Hello")
