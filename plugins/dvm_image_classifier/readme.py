"""The model card a person reads: ``README.md`` in the Hugging Face layout, beside ``model_card.json``.

YAML front matter as the Hugging Face Hub reads it (``library_name``, ``pipeline_tag``, ``tags``,
``metrics``, ``model-index`` with the validation accuracy), then what was trained on what (the
datasets' sha256, never their content), how to load the files the job returns, the
hyperparameters, the metrics with per-class precision and recall, and the limitations. Written
from the JSON card alone, so the two never disagree.
"""

from __future__ import annotations

import json
from pathlib import Path

FILES = {
    "model.safetensors": "the weights (safetensors: no pickles)",
    "model_card.json": "the architecture, classes, input normalisation and training record (JSON)",
    "README.md": "this card",
    "training_curves.png": "loss and accuracy per epoch, training and validation",
    "confusion_matrix.png": "true class × predicted class on the validation images",
}


def _yaml(value) -> str:
    """A YAML scalar: JSON's quoting is valid YAML (1.2 and what PyYAML reads)."""
    return json.dumps(value, ensure_ascii=False)


def front_matter(card: dict, name: str) -> str:
    metrics = card["metrics"]
    lines = ["---", "library_name: pytorch", "pipeline_tag: image-classification", "tags:"]
    lines += [f"- {t}" for t in ("image-classification", "pytorch", "safetensors", card["architecture"]["type"],
                                 "nostr-dvm", "nip-90")]
    lines += ["metrics:", "- accuracy"]
    if metrics.get("val_accuracy") is not None:
        validation = card["datasets"]["validation"]
        data_name = f"customer dataset sha256:{card['datasets']['train']['sha256'][:12]}"
        lines += ["model-index:", f"- name: {_yaml(name)}", "  results:", "  - task:",
                  "      type: image-classification", "      name: Image Classification",
                  "    dataset:", f"      name: {_yaml(data_name)}", "      type: private",
                  f"      split: {_yaml('validation (' + validation['source'] + ')')}",
                  "    metrics:", "    - type: accuracy", f"      value: {round(metrics['val_accuracy'], 4)}",
                  "      name: validation accuracy"]
    lines.append("---")
    return "\n".join(lines)


def _num(value, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown(card: dict, *, job: dict, files: list[str], charts: dict[str, str]) -> str:
    """The README of a finished job. `job`: {"id", "kind", "name"} of the request; `files`: the
    names of the files the job returns (so the card lists exactly those); `charts`: {PNG file:
    its title}, shown with the title as the image's text."""
    arch, data, hyper = card["architecture"], card["datasets"], card["hyperparameters"]
    train, validation = data["train"], data["validation"]
    metrics, training = card["metrics"], card["training"]
    height, width, channels = card["input"]["height"], card["input"]["width"], card["input"]["channels"]
    classes = card["classes"]
    name = f"{job['name']}-{job['id'][:12]}"
    out = [front_matter(card, name), "",
           f"# {arch['type']} image classifier, {len(classes)} classes ({height}×{width}×{channels})", "",
           f"Trained by a NIP-90 Data Vending Machine for job `{job['id']}` (kind {job['kind']}, "
           f"`{job['name']}`). Everything below comes from `model_card.json`, returned with it.", ""]
    if card.get("warning"):
        out += [f"> **Warning:** {card['warning']}", ""]

    out += ["## Training data", "",
            f"- training set: {train['samples']:,} images ({train['format']}), sha256 `{train['sha256']}`; "
            f"{train['trained_on']:,} trained on",
            ]
    if validation["source"] == "input":
        out.append(f"- validation set: {validation['samples']:,} images sent separately ({validation['format']}), "
                   f"sha256 `{validation['sha256']}`")
    elif validation["samples"]:
        out.append(f"- validation: {validation['samples']:,} images held out from the training set "
                   f"(fraction {validation['fraction']:g}, chosen by the seed {card['seed']})")
    else:
        out.append("- validation: none (validation_fraction 0): the metrics below are on the training images only")
    if card.get("initial_weights_sha256"):
        out.append(f"- fine-tuned from initial weights, sha256 `{card['initial_weights_sha256']}`")
    out += [f"- classes, in the order of the model's outputs: {', '.join(f'`{c}`' for c in classes)}", "",
            "The data itself is not in this card: only its fingerprint, to tell which data a model came from.", ""]

    out += ["## How to use", "",
            "With the files of this result in the current folder and the DVM's plugin installed "
            "(`pip install \"dvm-worker[train]\"`):", "",
            "```python",
            "from PIL import Image",
            "from dvm_image_classifier.predict import load_model, predict",
            "",
            'model, preprocess = load_model("model.safetensors", "model_card.json")',
            'for label, probability in predict(model, preprocess, [Image.open("image.png")]):',
            '    print(label, round(probability, 4))',
            "```", "",
            "Or from a shell, for one image or a folder of PNG/JPEG images (one line per image: path, "
            "label, probability):", "",
            "```",
            "python -m dvm_image_classifier.predict model.safetensors model_card.json images/",
            "```", "",
            f"Images are resized to {height}×{width}, converted to {'grey' if channels == 1 else 'RGB'} "
            "and normalised with the card's mean and std, as the training images were.", ""]

    out += ["## Training hyperparameters", "", "| parameter | value |", "|---|---|"]
    for key in ("architecture", "epochs", "batch_size", "learning_rate", "lr_schedule", "optimizer",
                "weight_decay", "augment", "validation_fraction", "image_size", "time_limit"):
        if key in hyper and hyper[key] is not None:
            out.append(f"| {key} | {hyper[key]} |")
    out += [f"| seed | {card['seed']} |",
            f"| network widths | {', '.join(map(str, arch['widths']))} |", "",
            f"Trained for {training['seconds']:.1f} s on `{training['device']}` "
            f"({training['samples_per_s']:,.0f} images/s, mixed precision {training['mixed_precision']}); "
            f"{training['epochs_completed']} epoch(s) completed"
            + (f", stopped early ({training['stopped_early']})" if training["stopped_early"] else "") + ".", ""]

    out += ["## Metrics", "", "| metric | value |", "|---|---|"]
    for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
        out.append(f"| {key} | {_num(metrics.get(key))} |")
    out.append("")
    rows = metrics.get("per_class")
    if rows:
        out += [f"Per class, on the {validation['samples']:,} validation images:", "",
                "| class | precision | recall | F1 | images |", "|---|---|---|---|---|"]
        out += [f"| `{r['class']}` | {_num(r['precision'])} | {_num(r['recall'])} | {_num(r['f1'])} | {r['support']} |"
                for r in rows]
        out.append("")
    for file, title in charts.items():
        out += [f"![{title}]({file})", ""]

    out += ["## Limitations", ""]
    limits = [f"Trained on {train['trained_on']:,} images; it knows only these {len(classes)} classes and "
              "gives one of them for any image, however unlike the training images it is.",
              f"It sees images at {height}×{width} pixels: detail finer than that is lost."]
    if validation["samples"]:
        limits.append(f"The metrics come from {validation['samples']:,} validation images of the same data: "
                      "expect lower accuracy on images from elsewhere (other cameras, lighting, writers).")
        if rows:
            weak = [r for r in rows if r["recall"] is not None and r["recall"] < 0.8]
            if weak:
                limits.append("Classes recognised less than 80% of the time on the validation images: "
                              + ", ".join(f"`{r['class']}` ({r['recall']:.2f})" for r in weak) + ".")
            few = [r for r in rows if r["support"] < 10]
            if few:
                limits.append(f"{len(few)} class(es) have fewer than 10 validation images: their figures are rough.")
    else:
        limits.append("No validation images: nothing here measures how it does on images it has not seen.")
    if training["stopped_early"]:
        limits.append("Training stopped at its time limit, before the planned epochs.")
    out += [f"- {line}" for line in limits] + [""]

    out += ["## Files", ""]
    out += [f"- `{f}`: {FILES.get(f, '')}" for f in files]
    out += ["", "## Reproducibility", "",
            f"weights sha256 `{card['weights']['sha256']}`; same data, seed and thread count give the same "
            "bytes. Versions: " + ", ".join(f"{k} {v}" for k, v in card["versions"].items()) + ".", ""]
    return "\n".join(out)


def write(path: Path, card: dict, *, job: dict, files: list[str], charts: dict[str, str]) -> None:
    path.write_text(markdown(card, job=job, files=files, charts=charts), encoding="utf-8")
