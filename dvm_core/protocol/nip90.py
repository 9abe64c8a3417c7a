"""NIP-90 Data Vending Machine messages: job requests, feedback, results, NIP-89 announcements.

Pure protocol code: it parses and builds event bodies and never touches the network, the store
or a key file. Encryption comes in as callables so this module stays free of key handling.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Callable

FEEDBACK_KIND = 7000
DELETION_KIND = 5
HANDLER_KIND = 31990
REQUEST_KINDS = range(5000, 6000)

INPUT_TYPES = ("url", "event", "job", "text")
PAY_ON_DELIVERY_PARAM = "pay_on_delivery"   # ["param", it, refund key]: pay once the result is ready
STATUSES = ("payment-required", "processing", "error", "success", "partial")

from dvm_core.errors import JobInputError  # noqa: E402  (the customer's fault, one exception)

from .events import HEX64 as _HEX64  # noqa: E402


_MAX_DIGITS = 100   # longer than any amount, bid or kind; int() refuses past 4300 digits (ValueError)


def _is_uint(text: str) -> bool:
    # str.isdigit() accepts "²", which int() refuses
    return text.isascii() and text.isdigit() and len(text) <= _MAX_DIGITS


@dataclass(frozen=True)
class JobInput:
    """One `i` tag: `["i", data, type, relay, marker]`."""

    data: str
    type: str
    relay: str = ""
    marker: str = ""

    def to_tag(self) -> list[str]:
        tag = ["i", self.data, self.type]
        if self.relay or self.marker:
            tag.append(self.relay)
        if self.marker:
            tag.append(self.marker)
        return tag


@dataclass(frozen=True)
class JobRequest:
    """A parsed NIP-90 job request. `params` maps each `param` key to its value."""

    id: str
    pubkey: str
    kind: int
    created_at: int
    inputs: tuple[JobInput, ...] = ()
    params: dict[str, str] = field(default_factory=dict)
    output: str | None = None
    bid_msats: int | None = None
    relays: tuple[str, ...] = ()
    providers: tuple[str, ...] = ()
    encrypted: bool = False
    content: str = ""
    pay_on_delivery: str | None = None   # the customer's refund key, when they pay on delivery
    extra_tags: tuple[tuple[str, ...], ...] = ()
    event: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def result_kind(self) -> int:
        return self.kind + 1000

    def param(self, name: str, default: str | None = None) -> str | None:
        return self.params.get(name, default)


def is_encrypted(event: dict) -> bool:
    return any(t and t[0] == "encrypted" for t in event.get("tags", []))


def addressed_providers(event: dict) -> list[str]:
    return [t[1] for t in event.get("tags", []) if len(t) >= 2 and t[0] == "p"]


def parse_job_request(event: dict, private_tags: list | None = None) -> JobRequest:
    """Parse a verified job request event.

    For an encrypted request, `private_tags` is the decrypted content (a JSON array of `i` and
    `param` tags); they are merged with the public tags. Raises JobInputError with a message
    for the customer.
    """
    kind = event["kind"]
    if kind not in REQUEST_KINDS:
        raise JobInputError(f"kind {kind} is not a job request kind (5000-5999)")
    encrypted = is_encrypted(event)
    tags = list(event["tags"])
    if encrypted:
        if private_tags is None:
            raise JobInputError("encrypted request without decrypted params")
        if not isinstance(private_tags, list) or not all(
            isinstance(t, list) and t and all(isinstance(x, str) for x in t) for t in private_tags
        ):
            raise JobInputError("encrypted content must be a JSON array of tags (lists of strings)")
        tags += private_tags

    inputs: list[JobInput] = []
    params: dict[str, str] = {}
    output = None
    bid = None
    relays: list[str] = []
    providers: list[str] = []
    extra: list[tuple[str, ...]] = []
    pay_on_delivery = None
    for tag in tags:
        if not tag:
            continue
        name = tag[0]
        if name == "i":
            inputs.append(_parse_input(tag))
        elif name == "param":
            if len(tag) < 3 or not tag[1]:
                raise JobInputError('a "param" tag needs a name and a value: ["param", name, value]')
            if tag[1] == "cashu":
                continue  # a payment, as some clients send it: the cashier reads it, not the plugin
            if tag[1] == PAY_ON_DELIVERY_PARAM:
                if pay_on_delivery is not None:
                    raise JobInputError(f"param {tag[1]!r} is given more than once")
                pay_on_delivery = _refund_key(tag[2])
                continue  # a payment mode: the worker's, not the plugin's
            if tag[1] in params:
                raise JobInputError(f"param {tag[1]!r} is given more than once")
            params[tag[1]] = tag[2]
        elif name == "output":
            if len(tag) < 2 or not tag[1]:
                raise JobInputError('an "output" tag needs a MIME type')
            output = tag[1]
        elif name == "bid":
            if len(tag) < 2 or not _is_uint(tag[1]):
                raise JobInputError('the "bid" tag must be a whole number of millisats')
            bid = int(tag[1])
        elif name == "relays":
            relays.extend(r for r in tag[1:] if r)
        elif name == "p":
            if len(tag) < 2 or not _HEX64.fullmatch(tag[1]):
                raise JobInputError('a "p" tag must hold a 64-hex public key')
            providers.append(tag[1])
        elif name == "encrypted":
            continue
        else:
            extra.append(tuple(tag))
    if encrypted and not providers:
        raise JobInputError('an encrypted request must name its provider in a "p" tag')
    return JobRequest(
        id=event["id"], pubkey=event["pubkey"], kind=kind, created_at=event["created_at"],
        inputs=tuple(inputs), params=params, output=output, bid_msats=bid, relays=tuple(relays),
        providers=tuple(providers), encrypted=encrypted,
        content="" if encrypted else event.get("content", ""), extra_tags=tuple(extra), event=event,
        pay_on_delivery=pay_on_delivery,
    )


def _refund_key(value: str) -> str:
    """The `pay_on_delivery` param: the key the customer takes unpaid ecash back with (the HTLC's
    refund key), compressed (66 hex) or x-only (64 hex, read as "02" + x)."""
    key = value.strip().lower()
    if _HEX64.fullmatch(key):
        key = "02" + key
    if not re.fullmatch(r"0[23][0-9a-f]{64}", key):
        raise JobInputError(f'param "{PAY_ON_DELIVERY_PARAM}" must be your refund key: a public key '
                            "of 66 hex digits (compressed) or 64 (x-only)")
    return key


def _parse_input(tag: list[str]) -> JobInput:
    if len(tag) < 3:
        raise JobInputError('an "i" tag needs data and a type: ["i", data, type, relay, marker]')
    data, typ = tag[1], tag[2]
    if typ not in INPUT_TYPES:
        raise JobInputError(f"input type {typ!r} is not one of {', '.join(INPUT_TYPES)}")
    if typ in ("event", "job") and not _HEX64.fullmatch(data):
        raise JobInputError(f"an input of type {typ!r} must be a 64-hex event id")
    if typ == "url" and not re.match(r"^[a-z][a-z0-9+.-]*://", data, re.I):
        raise JobInputError("an input of type 'url' must be an absolute URL")
    relay = tag[3] if len(tag) > 3 else ""
    marker = tag[4] if len(tag) > 4 else ""
    return JobInput(data=data, type=typ, relay=relay, marker=marker)


def request_private_tags(inputs: list[JobInput], params: dict[str, str]) -> list[list[str]]:
    """The tags a customer encrypts into the content of a private request."""
    return [i.to_tag() for i in inputs] + [["param", k, str(v)] for k, v in params.items()]


def build_request(
    kind: int, inputs: list[JobInput] = (), params: dict[str, str] | None = None, *,
    output: str | None = None, bid_msats: int | None = None, relays: list[str] = (),
    providers: list[str] = (), content: str = "", encrypt: Callable[[str], str] | None = None,
    cashu: str | None = None,
) -> tuple[int, str, list[list[str]]]:
    """A job request's (kind, content, tags). With `encrypt`, inputs and params go in the
    content, encrypted for the single provider in `providers`. `cashu` is a token paying for
    the job, in a `cashu` tag: private when the request is encrypted, public otherwise."""
    if kind not in REQUEST_KINDS:
        raise ValueError(f"kind {kind} is not a job request kind")
    params = params or {}
    tags: list[list[str]] = []
    if encrypt is not None:
        if len(providers) != 1:
            raise ValueError("an encrypted request names exactly one provider")
        private = request_private_tags(list(inputs), params) + ([["cashu", cashu]] if cashu else [])
        content = encrypt(json.dumps(private))
        tags.append(["encrypted"])
    else:
        tags += request_private_tags(list(inputs), params) + ([["cashu", cashu]] if cashu else [])
    if output:
        tags.append(["output", output])
    if bid_msats is not None:
        tags.append(["bid", str(int(bid_msats))])
    if relays:
        tags.append(["relays", *relays])
    tags += [["p", p] for p in providers]
    return kind, content, tags


def _reply_tags(request: JobRequest, relay_hint: str) -> list[list[str]]:
    return [["e", request.id, relay_hint], ["p", request.pubkey]]


def _amount_tag(amount_msats: int | None, bolt11: str | None) -> list[list[str]]:
    if amount_msats is None:
        return []
    return [["amount", str(int(amount_msats))] + ([bolt11] if bolt11 else [])]


PAYABLE_PREFIXES = ("creqA", "creqB", "lnbc", "lntb", "lnbcrt")


def build_feedback(
    request: JobRequest, status: str, message: str = "", *, content: str = "",
    amount_msats: int | None = None, bolt11: str | None = None, progress: float | None = None,
    relay_hint: str = "", encrypt: Callable[[str], str] | None = None, extra_tags: list | None = None,
) -> tuple[int, str, list[list[str]]]:
    """A kind-7000 feedback's (kind, content, tags).

    For an encrypted request (`encrypt` given) the human-readable message and any content go
    encrypted in the content, and the status tag carries the status alone. When the content is
    something to pay (a NUT-18 `creqA`, an invoice), the plaintext is the message, a newline, and
    the content as its last line, so the customer reads what to pay and why.
    """
    if status not in STATUSES:
        raise ValueError(f"unknown feedback status {status!r}")
    if encrypt is not None:
        tags = [["status", status]]
        payable = message and content.startswith(PAYABLE_PREFIXES)
        body = f"{message}\n{content}" if payable else (content or message)
        content = encrypt(body) if body else ""
    else:
        tags = [["status", status, message] if message else ["status", status]]
    tags += _reply_tags(request, relay_hint) + _amount_tag(amount_msats, bolt11)
    if progress is not None:
        tags.append(["progress", f"{max(0.0, min(100.0, progress)):.0f}"])
    if encrypt is not None:
        tags.append(["encrypted"])
    tags += extra_tags or []
    return FEEDBACK_KIND, content, tags


def build_result(
    request: JobRequest, content: str, *, amount_msats: int | None = None,
    bolt11: str | None = None, relay_hint: str = "", encrypt: Callable[[str], str] | None = None,
) -> tuple[int, str, list[list[str]]]:
    """A job result's (kind = request kind + 1000, content, tags).

    An encrypted request gets an encrypted result with no `i` tags, as NIP-90 says.
    """
    tags = [["request", json.dumps(request.event, separators=(",", ":"), ensure_ascii=False)]]
    tags += _reply_tags(request, relay_hint)
    if encrypt is None:
        tags += [i.to_tag() for i in request.inputs]
    tags += _amount_tag(amount_msats, bolt11)
    if encrypt is not None:
        content = encrypt(content)
        tags.append(["encrypted"])
    return request.result_kind, content, tags


@dataclass(frozen=True)
class KindDescription:
    """What a NIP-89 announcement says of one job kind."""

    kind: int
    name: str
    description: str
    params: dict[str, str] = field(default_factory=dict)
    params_schema: dict | None = None   # a JSON Schema of the params (docs/protocol.md)


def build_handler_announcement(
    identifier: str, name: str, about: str, kinds: list[KindDescription],
    extra_tags: list | None = None, extra_content: dict | None = None,
) -> tuple[int, str, list[list[str]]]:
    """A NIP-89 kind-31990 handler announcement: a `k` tag per kind; the content is kind-0 style
    metadata plus, per kind, its name, description, params and (when known) their JSON Schema."""
    content = {
        "name": name, "about": about,
        "nip90": {
            str(k.kind): {"name": k.name, "description": k.description, "params": k.params,
                          **({"params_schema": k.params_schema} if k.params_schema else {})}
            for k in kinds
        },
        **(extra_content or {}),
    }
    tags = [["d", identifier]] + [["k", str(k.kind)] for k in kinds] + (extra_tags or [])
    return HANDLER_KIND, json.dumps(content, separators=(",", ":")), tags


def parse_handler_announcement(event: dict) -> tuple[dict, list[int]]:
    """Inverse of build_handler_announcement: (content dict, kinds)."""
    if event["kind"] != HANDLER_KIND:
        raise ValueError("not a kind-31990 handler announcement")
    kinds = [int(t[1]) for t in event["tags"] if len(t) >= 2 and t[0] == "k" and _is_uint(t[1])]
    try:
        content = json.loads(event["content"] or "{}")
    except RecursionError:   # nested past the recursion limit: not a ValueError of json's own
        raise ValueError("the announcement's content is nested too deeply to read") from None
    return content, kinds


def deleted_event_ids(event: dict) -> list[str]:
    """Ids that a kind-5 deletion asks to delete (a job cancellation, per NIP-90)."""
    if event.get("kind") != DELETION_KIND:
        return []
    return [t[1] for t in event.get("tags", []) if len(t) >= 2 and t[0] == "e"]


@dataclass(frozen=True)
class Feedback:
    """A parsed kind-7000 feedback, as a customer reads it."""

    status: str
    message: str
    request_id: str
    amount_msats: int | None
    bolt11: str | None
    progress: float | None
    content: str
    event: dict = field(repr=False, compare=False, default_factory=dict)


def parse_feedback(event: dict, decrypt: Callable[[str], str] | None = None) -> Feedback:
    if event.get("kind") != FEEDBACK_KIND:
        raise ValueError("not a kind-7000 feedback")
    status, message, req, amount, bolt11, progress = "", "", "", None, None, None
    for t in event["tags"]:
        if len(t) >= 2 and t[0] == "status":
            status, message = t[1], (t[2] if len(t) > 2 else "")
        elif len(t) >= 2 and t[0] == "e":
            req = t[1]
        elif len(t) >= 2 and t[0] == "amount" and _is_uint(t[1]):
            amount, bolt11 = int(t[1]), (t[2] if len(t) > 2 else None)
        elif len(t) >= 2 and t[0] == "progress":
            try:
                progress = float(t[1])
            except ValueError:
                pass
    content = event.get("content", "")
    if is_encrypted(event) and decrypt is not None and content:
        content = decrypt(content)
        text, _, last = content.rpartition("\n")
        if text and last.startswith(PAYABLE_PREFIXES):
            message, content = message or text, last   # the message, then what to pay
        else:
            message = message or content
    return Feedback(status, message, req, amount, bolt11, progress, content, event)


@dataclass(frozen=True)
class Result:
    """A parsed job result, as a customer reads it."""

    request_id: str
    provider: str
    content: str
    amount_msats: int | None
    encrypted: bool
    event: dict = field(repr=False, compare=False, default_factory=dict)


def parse_result(event: dict, decrypt: Callable[[str], str] | None = None) -> Result:
    if event.get("kind") not in range(6000, 7000):
        raise ValueError("not a job result (kind 6000-6999)")
    req, amount = "", None
    for t in event["tags"]:
        if len(t) >= 2 and t[0] == "e" and not req:
            req = t[1]
        elif len(t) >= 2 and t[0] == "amount" and _is_uint(t[1]):
            amount = int(t[1])
    encrypted = is_encrypted(event)
    content = event.get("content", "")
    if encrypted and decrypt is not None:
        content = decrypt(content)
    return Result(req, event["pubkey"], content, amount, encrypted, event)
