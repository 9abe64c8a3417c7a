"""Each bundled kind publishes its params as a JSON Schema (NIP-89 announcement, docs/protocol.md),
and the schema says what the plugin accepts: for every typed param, values at, inside and past
its bounds (and every choice, and a wrong one) are accepted by the plugin exactly when they
validate against the schema."""

from __future__ import annotations

import json

import pytest
from jsonschema import Draft202012Validator

import dvm_fedavg as fa
import dvm_image_classifier as ic
import dvm_llm_finetune as lf
from dvm_image_classifier import verify as icv
from dvm_llm_finetune import verify as lfv
from dvm_core import JobInputError
from dvm_core import transcripts
from dvm_core.params import coerce_params
from dvm_core.protocol.nip90 import (JobInput, JobRequest, KindDescription, build_handler_announcement,
                                     parse_handler_announcement)

URLS = [f"https://blossom.example/{c * 64}" for c in "0123456789abcdef"]


def request(inputs: list[JobInput], params: dict[str, str]) -> JobRequest:
    return JobRequest(id="ab" * 32, pubkey="cd" * 32, kind=5750, created_at=0, inputs=tuple(inputs), params=params)


# Per plugin: its kind, the inputs of a valid request, and params that a param needs beside it.
PLUGINS = {
    "image-classifier": (ic.job_kind({}), [JobInput(URLS[0], "url")], {}),
    "llm-finetune": (lf.job_kind({}), [JobInput(URLS[0], "url"), JobInput(URLS[1], "url", marker="model")],
                     {"output": {"method": "full"}, "compression": {"method": "full", "output": "delta"}}),
    "fedavg": (fa.job_kind({}), [JobInput(u, "url", marker="update") for u in URLS[:12]]
               + [JobInput(URLS[12], "url", marker="base")], {"m": {"method": "multi_krum"}}),
    "training-verify": (transcripts.job_kind([icv.checker(), lfv.checker()]), [JobInput(URLS[0], "url"), JobInput(URLS[1], "url", marker="transcript"),
                                                   JobInput(URLS[2], "url", marker="start")], {}),
}
# What also depends on the inputs, which a schema of the params cannot know: Multi-Krum keeps at
# most the n − f inputs it has (12 − 1 here); values past that are left out of the comparison.
BOUNDED_BY_INPUTS = {("fedavg", "m"): 11}


def samples(prop: dict) -> list[str]:
    if "enum" in prop:
        return [*prop["enum"], prop["enum"][0].upper(), "no-such-choice"]
    low, high = prop["minimum"], prop["maximum"]
    if prop["type"] == "integer":
        return [str(v) for v in (low, high, (low + high) // 2, low - 1, high + 1)] + ["1.5", "many"]
    return [repr(float(v)) for v in (low, high, (low + high) / 2, low - abs(low) - 1, high * 2 + 1)] + ["nan", "x"]


@pytest.mark.parametrize("name", sorted(PLUGINS))
def test_the_schema_is_valid_and_goes_into_the_announcement(name):
    kind = PLUGINS[name][0]
    Draft202012Validator.check_schema(kind.params_schema)
    assert set(kind.params_schema["properties"]) == set(kind.params)
    event = {"kind": 31990, "tags": [], "content": ""}
    _, content, tags = build_handler_announcement(
        "d", "n", "a", [KindDescription(kind.kind, kind.name, kind.description, kind.params, kind.params_schema)])
    event.update(content=content, tags=tags)
    announced, _ = parse_handler_announcement(event)
    assert announced["nip90"][str(kind.kind)]["params_schema"] == json.loads(json.dumps(kind.params_schema))


CASES = [(plugin, param, value) for plugin, (kind, _, _) in PLUGINS.items()
         for param, prop in kind.params_schema["properties"].items() if prop["type"] != "string" or "enum" in prop
         for value in samples(prop)
         if not (value.isdigit() and int(value) > BOUNDED_BY_INPUTS.get((plugin, param), float("inf")))]


@pytest.mark.parametrize("plugin,param,value", CASES, ids=[f"{p}-{n}-{v}" for p, n, v in CASES])
def test_the_schema_accepts_what_the_plugin_accepts(plugin, param, value):
    kind, inputs, context = PLUGINS[plugin]
    params = {**context.get(param, {}), param: value}
    try:
        kind.parse(request(inputs, params))
        accepted = True
    except JobInputError:
        accepted = False
    valid = Draft202012Validator(kind.params_schema).is_valid(coerce_params(kind.params_schema, params))
    assert accepted == valid, f"{param}={value!r}: the plugin {'accepts' if accepted else 'refuses'} it, " \
                              f"the schema {'accepts' if valid else 'refuses'} it"


def test_a_param_outside_the_schema_is_refused_by_it():
    kind = PLUGINS["image-classifier"][0]
    assert not Draft202012Validator(kind.params_schema).is_valid({"colour": "blue"})
