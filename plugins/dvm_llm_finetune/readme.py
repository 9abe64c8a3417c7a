"""The model card a person reads: ``README.md`` in the Hugging Face layout, beside ``model_card.json``.

YAML front matter as the Hugging Face Hub reads it (``library_name`` peft or transformers,
``base_model`` when the base came from the hub, ``pipeline_tag``, ``tags``, ``metrics``,
``model-index`` with the evaluation perplexity), then what was trained on what (the datasets'
sha256, never their content), how to load the returned files, the hyperparameters, the metrics
before and after, and the limitations. Written from the JSON card alone. It replaces the
README.md peft's ``save_pretrained`` writes (a template with nothing filled in).
"""

from __future__ import annotations

import json
from pathlib import Path


def _yaml(value) -> str:
    """A YAML scalar: JSON's quoting is valid YAML (1.2 and what PyYAML reads)."""
    return json.dumps(value, ensure_ascii=False)


def _num(value, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def front_matter(card: dict, name: str) -> str:
    base, lora = card["base_model"], card["method"] == "lora"
    after = card["metrics"]["after"]
    lines = ["---", f"library_name: {'peft' if lora else 'transformers'}"]
    if base.get("hub"):
        lines.append(f"base_model: {_yaml(base['hub'])}")
    lines += ["pipeline_tag: text-generation", "tags:"]
    lines += [f"- {t}" for t in ("text-generation", *(("lora", "peft") if lora else ("full-fine-tuning",)),
                                 base["model_type"], "safetensors", "nostr-dvm", "nip-90")]
    lines += ["metrics:", "- perplexity"]
    if after.get("eval_loss") is not None:
        data_name = f"customer dataset sha256:{card['datasets']['train']['sha256'][:12]}"
        lines += ["model-index:", f"- name: {_yaml(name)}", "  results:", "  - task:",
                  "      type: text-generation", "      name: Text Generation",
                  "    dataset:", f"      name: {_yaml(data_name)}", "      type: private",
                  f"      split: {_yaml('eval (' + card['datasets']['eval']['source'] + ')')}",
                  "    metrics:",
                  "    - type: perplexity", f"      value: {round(after['eval_perplexity'], 4)}",
                  "      name: eval perplexity",
                  "    - type: loss", f"      value: {round(after['eval_loss'], 4)}", "      name: eval loss"]
    lines.append("---")
    return "\n".join(lines)


def base_name(card: dict) -> str:
    base = card["base_model"]
    if base.get("hub"):
        return f"`{base['hub']}` (revision `{base.get('revision')}`)"
    return f"a model archive you sent (sha256 `{base.get('archive_sha256')}`)"


def usage(card: dict, files: list[str]) -> list[str]:
    """The "How to use" section: a snippet that loads exactly the returned files."""
    base = card["base_model"]
    lines = ["## How to use", ""]
    if card["method"] == "lora":
        where = (f'"{base["hub"]}"' if base.get("hub")
                 else '"base_model"  # the folder of the model archive you sent')
        revision = f', revision="{base["revision"]}"' if base.get("hub") and base.get("revision") else ""
        lines += ["A LoRA adapter: load the base model, then the adapter from the folder holding this "
                  "result's files (`pip install transformers peft`):", "",
                  "```python",
                  "from peft import PeftModel",
                  "from transformers import AutoModelForCausalLM, AutoTokenizer",
                  "",
                  f"BASE = {where}",
                  "RESULT = \".\"  # the folder with adapter_model.safetensors and adapter_config.json",
                  f"tokenizer = AutoTokenizer.from_pretrained(BASE{revision})",
                  f"model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE{revision}), RESULT)",
                  "inputs = tokenizer(\"Hello\", return_tensors=\"pt\")",
                  "output = model.generate(**inputs, max_new_tokens=20, do_sample=False)",
                  "print(tokenizer.decode(output[0], skip_special_tokens=True))",
                  "```", ""]
    elif card["hyperparameters"].get("output") == "delta":
        lines += [f"Only the pseudo-gradient Δ = base − fine-tuned (`pseudo_gradient.safetensors`, compression "
                  f"{card['hyperparameters'].get('compression')}), as a DiLoCo round asks: the fine-tuned weights "
                  "are the base's minus Δ. `dvm_llm_finetune.delta.read_delta` reads it back as float32 "
                  "tensors (the format is in its docstring and in docs/protocol.md).", ""]
    else:
        lines += ["The whole fine-tuned model and its tokenizer (`pip install transformers`):", "",
                  "```python",
                  "from transformers import AutoModelForCausalLM, AutoTokenizer",
                  "",
                  "RESULT = \".\"  # the folder with this result's files",
                  "tokenizer = AutoTokenizer.from_pretrained(RESULT)",
                  "model = AutoModelForCausalLM.from_pretrained(RESULT)",
                  "inputs = tokenizer(\"Hello\", return_tensors=\"pt\")",
                  "output = model.generate(**inputs, max_new_tokens=20, do_sample=False)",
                  "print(tokenizer.decode(output[0], skip_special_tokens=True))",
                  "```", ""]
    lines += ["Each weight file's sha256 is in `model_card.json` (`weights`): check them before loading a "
              "file from elsewhere.", ""]
    return lines


def markdown(card: dict, *, job: dict, files: list[str], charts: dict[str, str]) -> str:
    """The README of a finished job. `job`: {"id", "kind", "name"} of the request; `files`: the
    names of the files the job returns; `charts`: {PNG file: its title}."""
    base, hyper, data = card["base_model"], card["hyperparameters"], card["datasets"]
    before, after, training = card["metrics"]["before"], card["metrics"]["after"], card["training"]
    lora = card["method"] == "lora"
    name = f"{job['name']}-{job['id'][:12]}"
    out = [front_matter(card, name), "",
           f"# {'LoRA adapter' if lora else 'Fully fine-tuned model'} for a {base['model_type']} model", "",
           f"Fine-tuned by a NIP-90 Data Vending Machine for job `{job['id']}` (kind {job['kind']}, "
           f"`{job['name']}`) from {base_name(card)}, {base['parameters']:,} parameters "
           f"(weights sha256 `{base['weights_sha256']}`). Everything below comes from `model_card.json`.", ""]

    train, evaluation = data["train"], data["eval"]
    out += ["## Training data", "",
            f"- training set: {train['examples']:,} examples ({train['format']}), sha256 `{train['sha256']}`; "
            f"{train['trained_on']:,} trained on; loss on {train['loss_on']}"
            + (f"; {train['dropped_too_long']} dropped as too long" if train.get("dropped_too_long") else "")]
    if evaluation["source"] == "input":
        out.append(f"- evaluation set: {evaluation['examples']:,} examples sent separately ({evaluation['format']}), "
                   f"sha256 `{evaluation['sha256']}`")
    elif evaluation["examples"]:
        out.append(f"- evaluation: {evaluation['examples']:,} examples held out from the training set "
                   f"(fraction {evaluation['fraction']:g}, chosen by the seed {hyper.get('seed')})")
    else:
        out.append("- evaluation: none (eval_fraction 0): no figure below measures unseen text")
    out += ["", "The data itself is not in this card: only its fingerprint, to tell which data a model came from.", ""]
    out += usage(card, files)

    out += ["## Training hyperparameters", "", "| parameter | value |", "|---|---|"]
    for key, value in hyper.items():
        if value is not None:
            shown = ", ".join(map(str, value)) if isinstance(value, list) else value
            out.append(f"| {key} | {shown} |")
    out += ["", f"{training['steps']} optimizer steps of {training['planned_steps']} planned, "
            f"{training['tokens_seen']:,} tokens in {training['seconds']:.1f} s on `{training['device']}` "
            f"({training['tokens_per_s']:,.0f} tokens/s, mixed precision {training['mixed_precision']}, "
            f"{training['processes']} process(es)); {training['trainable_parameters']:,} of "
            f"{training['total_parameters']:,} parameters trained"
            + (f"; stopped early ({training['stopped_early']})" if training["stopped_early"] else "") + ".", ""]

    out += ["## Metrics", "", "| | before | after |", "|---|---|---|"]
    for key in ("train_loss", "train_perplexity", "eval_loss", "eval_perplexity"):
        out.append(f"| {key} | {_num(before.get(key))} | {_num(after.get(key))} |")
    out += ["", "Losses are token-level cross-entropy on the labelled tokens; perplexity is exp(loss).", ""]
    for file, title in charts.items():
        out += [f"![{title}]({file})", ""]

    out += ["## Limitations", ""]
    limits = [f"Fine-tuned on {train['trained_on']:,} examples of one dataset: it is tuned to that text and "
              "may do worse than the base model elsewhere.",
              f"It inherits the limits, knowledge and biases of its base model, {base_name(card)}.",
              f"Sequences were cut to {hyper.get('max_seq_length')} tokens in training."]
    if after.get("eval_loss") is None:
        limits.append("No evaluation set: nothing here measures how it does on text it has not seen.")
    elif before.get("eval_loss") is not None and after["eval_loss"] >= before["eval_loss"]:
        limits.append("The evaluation loss did not go down: this fine-tuning did not help on held-out text.")
    if training["stopped_early"]:
        limits.append("Training stopped at its time limit, before the planned steps.")
    out += [f"- {line}" for line in limits] + [""]

    out += ["## Files", ""]
    sums = card.get("weights", {})
    out += [f"- `{f}`" + (f" (sha256 `{sums[f]}`)" if f in sums else "") for f in files]
    out += ["", "## Reproducibility", "",
            f"seed {hyper.get('seed')}. Versions: "
            + ", ".join(f"{k} {v}" for k, v in card["versions"].items()) + ".", ""]
    return "\n".join(out)


def write(path: Path, card: dict, *, job: dict, files: list[str], charts: dict[str, str]) -> None:
    path.write_text(markdown(card, job=job, files=files, charts=charts), encoding="utf-8")
