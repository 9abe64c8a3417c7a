"""The errors of the plugin API, importable on their own (the protocol parsers raise
`JobInputError` too). Re-exported by `dvm_core` and `dvm_core.jobs`."""

from __future__ import annotations

import enum


class JobError(Exception):
    """Base of the errors a plugin raises on purpose; the message goes to the customer."""


class JobInputError(JobError, ValueError):
    """The customer's fault: the request cannot be served as sent (a malformed request, bad
    params, bad data). Raised by the protocol parsers and by plugins alike; before payment the
    request is refused for nothing, during a paid job the announced `input_error_fee` is kept."""


class StopReason(enum.StrEnum):
    """Why a job is stopped (`JobContext.cancel`): the worker decides on these codes (a
    time-out fails the job, a stopping worker puts it back in the queue, a customer's
    cancellation ends it), and each one's text is what the customer reads."""

    TIME_LIMIT = "time limit"
    WORKER_STOPPING = "worker stopping"
    CUSTOMER = "cancelled by the customer"


class JobCancelled(JobError):
    """The customer cancelled the job (kind-5 deletion) or the worker is stopping (then
    `stopping` is true: the job goes back to the queue)."""

    @property
    def reason(self) -> StopReason | None:
        """The code the job was stopped with, if it was one of `StopReason`."""
        return StopReason(self.args[0]) if self.args and self.args[0] in set(StopReason) else None

    @property
    def stopping(self) -> bool:
        return self.reason is StopReason.WORKER_STOPPING


class JobTimeout(JobError):
    """The job ran past its time limit."""
