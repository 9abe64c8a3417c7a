"""Helpers for plugins: reading a request's params and the provider's ``[plugins.<name>]`` table.

Pure functions, no I/O. A request's params are strings (``["param", name, value]`` tags); these
turn them into checked values or raise `JobInputError` with a message for the customer::

    epochs = number(request.params, "epochs", int, 1, limits.max_epochs, default=10)
    optimizer = choice(request.params, "optimizer", ("adam", "sgd"), default="adam")
    augment = flag(request.params, "augment", default="no")
    inputs = url_inputs(request, ("train", "eval"), what="the training set, optionally one marked 'eval'")

The same helpers describe the params as a JSON Schema (`params_schema`), which the worker
publishes in its NIP-89 announcement: reading an empty `SchemaRecorder` instead of a request's
params notes each param's type, range, choices and default, so the schema is what the parser
checks, not a second description of it.

A plugin's provider settings are a frozen dataclass read with `plugin_settings`, which refuses
unknown keys and values of the wrong type, so that a typo stops the worker at start instead of
silently leaving a limit at its default.
"""

from __future__ import annotations

import math
from dataclasses import fields
from typing import Any, Callable, Iterable, TypeVar

from .jobs import JobInputError

T = TypeVar("T")
YES_NO = ("yes", "no", "true", "false")


class SchemaRecorder(dict):
    """An empty params dict that notes, for `params_schema`, what the helpers were asked for."""

    def __init__(self):
        super().__init__()
        self.properties: dict[str, dict] = {}

    def note(self, name: str, schema: dict, default) -> None:
        self.properties[name] = schema | ({"default": default} if default is not None else {})


def number(params: dict[str, str], name: str, kind: type, low: float, high: float, default=None):
    """Param `name` as an int or float within [low, high] (`default` when absent), else
    JobInputError naming the param and the range."""
    if isinstance(params, SchemaRecorder):
        params.note(name, {"type": "integer" if kind is int else "number", "minimum": low, "maximum": high},
                    default)
    raw = params.get(name)
    if raw is None:
        return default
    text = raw.strip()
    try:
        value = int(text) if kind is int else float(text)
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise JobInputError(f"param {name} must be {what}, got {raw[:40]!r}") from None
    if not math.isfinite(value) or not low <= value <= high:
        shown = (str(int(low)), str(int(high))) if kind is int else (f"{low:g}", f"{high:g}")
        raise JobInputError(f"param {name} must be between {shown[0]} and {shown[1]}, got {text[:40]}")
    return value


def choice(params: dict[str, str], name: str, choices: tuple[str, ...], default: str) -> str:
    """Param `name`, lower-cased, one of `choices` (`default` when absent), else JobInputError."""
    if isinstance(params, SchemaRecorder):
        params.note(name, {"type": "string", "enum": list(choices)}, default)
    value = params.get(name)
    if value is None:
        return default
    value = value.strip().lower()
    if value not in choices:
        raise JobInputError(f"param {name} must be one of {', '.join(choices)}, got {params[name][:40]!r}")
    return value


def flag(params: dict[str, str], name: str, default: str = "no") -> bool:
    """Param `name` as yes/no (or true/false), else JobInputError."""
    if isinstance(params, SchemaRecorder):
        params.note(name, {"type": "string", "enum": list(YES_NO)}, default)
    value = (params.get(name) or default).strip().lower()
    if value not in YES_NO:
        raise JobInputError(f"param {name} must be yes or no, got {params[name][:20]!r}")
    return value in ("yes", "true")


def plugin_settings(cls: type[T], config: dict | None, name: str, *, may_be_zero: Iterable[str] = (),
                    checks: dict[str, Callable[[Any, str], Any]] | None = None) -> T:
    """The frozen dataclass `cls` filled from ``config["plugins"][name]`` (the worker's whole
    configuration), each field typed by its default: true/false, a string, a list of strings
    (for a tuple), or a number that must be positive (or zero, for the fields in
    `may_be_zero`). `checks` replace that for a field: ``check(value, where) -> value``, raising
    ValueError. Raises ValueError on an unknown setting or a bad value."""
    table = ((config or {}).get("plugins") or {}).get(name) or {}
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise ValueError(f"unknown setting(s) in [plugins.{name}]: {', '.join(unknown)} "
                         f"(known: {', '.join(known)})")
    zero_ok, checks = set(may_be_zero), checks or {}
    values: dict[str, Any] = {}
    for key, value in table.items():
        where = f"[plugins.{name}] {key}"
        default = known[key].default
        if key in checks:
            values[key] = checks[key](value, where)
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise ValueError(f"{where} must be true or false, got {value!r}")
            values[key] = value
        elif isinstance(default, str):
            if not isinstance(value, str):
                raise ValueError(f"{where} must be a string, got {value!r}")
            values[key] = value
        elif isinstance(default, tuple):
            if isinstance(value, str) or not isinstance(value, (list, tuple)) \
                    or not all(isinstance(v, str) for v in value):
                raise ValueError(f"{where} must be a list of strings, got {value!r}")
            values[key] = tuple(value)
        else:
            typ = type(default)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or (typ is int and not float(value).is_integer()):
                raise ValueError(f"{where} must be a {typ.__name__}, got {value!r}")
            if value < 0 or (value == 0 and key not in zero_ok):
                raise ValueError(f"{where} must be positive, got {value!r}")
            values[key] = typ(value)
    return cls(**values)


__all__ = ["number", "choice", "flag", "plugin_settings", "YES_NO"]


def url_inputs(request, roles: tuple[str, ...], *, what: str) -> dict[str, str | None]:
    """A request's ``url`` inputs by role, told apart by their marker (the ``i`` tag's 5th
    element): no marker, ``train`` or ``dataset`` is the first role (the training set), any
    other marker must name one of `roles`; at most one input per role. Returns each role's URL
    or None; `what` tells the customer what to send, should they send another type of input."""
    found: dict[str, list[str]] = {role: [] for role in roles}
    for item in request.inputs:
        if item.type != "url":
            raise JobInputError(f"this job takes only inputs of type 'url' (got one of type {item.type!r}): {what}")
        marker = (item.marker or "").strip().lower()
        role = roles[0] if marker in ("", "train", "dataset") else marker
        if role not in found:
            others = [f"'{r}'" for r in roles[1:]]
            named = " or ".join(others) if len(others) <= 2 else ", ".join(others[:-1]) + " or " + others[-1]
            raise JobInputError(f"unknown input marker {item.marker[:40]!r}: use none (the training set), {named}")
        found[role].append(item.data)
    for role, urls in found.items():
        if len(urls) > 1:
            raise JobInputError(f"send at most one {role} input (got {len(urls)})")
    return {role: urls[0] if urls else None for role, urls in found.items()}


SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def params_schema(read: Callable[[dict], Any], descriptions: dict[str, str]) -> dict:
    """The JSON Schema of a kind's params: `read(params)` is the plugin's own reading of them
    (called once, on a `SchemaRecorder`); `descriptions` are the kind's `JobKind.params`. A param
    the helpers do not read (free text, a list) is a string with its description.

    NIP-90 params travel as strings: a value is valid when, read as the type its property names
    (`coerce_params`), it validates against the schema."""
    recorder = SchemaRecorder()
    try:
        read(recorder)
    except JobInputError:
        pass   # a rule across params that an empty request breaks: what was read so far is noted
    properties = {name: {"type": "string", "description": text} for name, text in descriptions.items()}
    for name, schema in recorder.properties.items():
        properties[name] = schema | {"description": descriptions.get(name, "")}
    return {"$schema": SCHEMA_DIALECT, "type": "object", "properties": properties,
            "additionalProperties": False}


def coerce_params(schema: dict, params: dict[str, str]) -> dict:
    """A request's string params as the types `schema` names (for validating them against it);
    a value that is not of its type stays a string, which the schema then refuses."""
    out = {}
    for name, raw in params.items():
        prop = (schema.get("properties") or {}).get(name, {})
        value = raw.strip()
        try:
            if prop.get("type") == "integer":
                value = int(value)
            elif prop.get("type") == "number":
                value = float(value)
                if not math.isfinite(value):
                    value = raw
            elif "enum" in prop:
                value = value.lower()
        except ValueError:
            value = raw
        out[name] = value
    return out
