"""Verdicts on providers: NIP-32 labels (kind 1985) a customer signs and publishes about a DVM's
work, so that other customers who trust that key can skip it (`docs/protocol.md`, "Verdicts").

    kind 1985, content: the reason in words
    ["L", "dvm.training"]
    ["l", <label>, "dvm.training"]      one of LABELS
    ["p", <the provider's key>]
    ["e", <the job request's id>]       optional: the job the verdict is about
    ["k", <the job's kind>]             optional

A verdict is only worth the key that signed it: readers count those of authors they trust and
nothing else (relays cannot forge a signature, but anyone can label anyone).
"""

from __future__ import annotations

from dataclasses import dataclass

from .events import HEX64

LABEL_KIND = 1985
NAMESPACE = "dvm.training"
NEGATIVE = ("update-left-out", "verification-failed")   # a reason to skip the provider
POSITIVE = ("verification-passed",)
LABELS = NEGATIVE + POSITIVE


def is_hex_key(value: str) -> bool:
    return isinstance(value, str) and HEX64.fullmatch(value) is not None


@dataclass(frozen=True)
class Verdict:
    author: str
    provider: str
    label: str
    reason: str
    job_id: str | None
    kind: int | None
    created_at: int
    event_id: str

    @property
    def negative(self) -> bool:
        return self.label in NEGATIVE


def build_verdict(provider: str, label: str, reason: str, *, job_id: str | None = None,
                  kind: int | None = None) -> tuple[int, str, list[list[str]]]:
    """(kind, content, tags) of a verdict about `provider`."""
    if label not in LABELS:
        raise ValueError(f"unknown verdict {label!r}: use one of {', '.join(LABELS)}")
    if not is_hex_key(provider):
        raise ValueError("the provider must be a 64-hex public key")
    tags = [["L", NAMESPACE], ["l", label, NAMESPACE], ["p", provider]]
    if job_id:
        tags.append(["e", job_id])
    if kind is not None:
        tags.append(["k", str(int(kind))])
    return LABEL_KIND, reason[:1000], tags


def parse_verdict(event: dict) -> Verdict:
    """A signed kind-1985 event as a Verdict (its signature is the caller's to have checked);
    ValueError when it is not one of ours."""
    if event.get("kind") != LABEL_KIND:
        raise ValueError("not a label event (kind 1985)")
    tags = [t for t in event.get("tags") or [] if isinstance(t, list) and t and all(isinstance(x, str) for x in t)]
    if ["L", NAMESPACE] not in [t[:2] for t in tags]:
        raise ValueError(f"not in the {NAMESPACE} namespace")
    labels = [t[1] for t in tags if t[0] == "l" and len(t) >= 3 and t[2] == NAMESPACE and t[1] in LABELS]
    targets = [t[1] for t in tags if t[0] == "p" and len(t) >= 2 and is_hex_key(t[1])]
    if len(labels) != 1 or len(targets) != 1:
        raise ValueError("a verdict names exactly one known label and one provider")
    job = next((t[1] for t in tags if t[0] == "e" and len(t) >= 2 and is_hex_key(t[1])), None)
    kind_tag = next((t[1] for t in tags if t[0] == "k" and len(t) >= 2 and t[1].isdigit() and len(t[1]) <= 5), None)
    content = event.get("content")
    return Verdict(author=event.get("pubkey", ""), provider=targets[0], label=labels[0],
                   reason=content if isinstance(content, str) else "", job_id=job,
                   kind=int(kind_tag) if kind_tag else None, created_at=int(event.get("created_at") or 0),
                   event_id=event.get("id", ""))
