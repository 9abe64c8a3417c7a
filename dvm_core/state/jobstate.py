"""A job's states and the moves between them, in one place.

    received ──► payment-required ──► queued ──► running ──► succeeded
        │               │               │  ▲        │  ▲
        └───────────────┴──► rejected   │  └────────┤  └── delivered ──► failed (not paid)
                                        └──► failed / cancelled ◄┘ (paid on delivery)

A request is `received` when it is first recorded; `rejected` means it was refused before any
work (bad input, busy, not paid); `failed` and `cancelled` are jobs that were accepted and did
not deliver. A job paid on delivery is `delivered` once its result is sealed and offered, and
`succeeded` once the customer's ecash is redeemed (which hands them the key); unpaid by the
offer's deadline it is `failed`, with nothing to refund. After a restart a job whose result is in the outbox is `succeeded` whatever it was,
and an accepted job that could not be read again is `rejected`. `Store.set_state` refuses any
other move (`IllegalTransition`): a bug, never the customer's doing.
"""

from __future__ import annotations

import enum


class JobState(str, enum.Enum):
    RECEIVED = "received"
    PAYMENT_REQUIRED = "payment-required"
    QUEUED = "queued"
    RUNNING = "running"
    DELIVERED = "delivered"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    REJECTED = "rejected"

    def __str__(self) -> str:
        return self.value


S = JobState
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    S.RECEIVED: frozenset({S.PAYMENT_REQUIRED, S.QUEUED, S.REJECTED, S.FAILED, S.SUCCEEDED}),
    S.PAYMENT_REQUIRED: frozenset({S.PAYMENT_REQUIRED, S.QUEUED, S.REJECTED, S.FAILED, S.SUCCEEDED}),
    S.QUEUED: frozenset({S.QUEUED, S.RUNNING, S.SUCCEEDED, S.FAILED, S.CANCELLED, S.REJECTED}),
    S.RUNNING: frozenset({S.QUEUED, S.DELIVERED, S.SUCCEEDED, S.FAILED, S.CANCELLED, S.REJECTED}),
    S.DELIVERED: frozenset({S.SUCCEEDED, S.FAILED}),
    S.SUCCEEDED: frozenset(),
    S.FAILED: frozenset(),
    S.CANCELLED: frozenset(),
    S.REJECTED: frozenset(),
}
del S

ACTIVE = (JobState.QUEUED, JobState.RUNNING)                     # accepted, not finished
UNPAID = (JobState.RECEIVED, JobState.PAYMENT_REQUIRED)          # taken in, not yet accepted
AWAITING_PAYMENT = UNPAID + (JobState.DELIVERED,)                # a nutzap for it may pay it
FINAL = tuple(s for s, nxt in TRANSITIONS.items() if not nxt)


class IllegalTransition(RuntimeError):
    """A move between job states that the table above does not allow."""


def check_transition(job_id: str, old: str, new: str) -> JobState:
    """The new state, if `old` may move to it; else IllegalTransition."""
    new_state = JobState(new)
    if new_state not in TRANSITIONS[JobState(old)]:
        raise IllegalTransition(f"job {job_id[:12]}: {old} → {new} is not a move a job makes")
    return new_state
