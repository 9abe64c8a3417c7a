"""The errors of the plugin API, importable on their own (the protocol parsers raise
`JobInputError` too). Re-exported by `dvm_core` and `dvm_core.jobs`."""

from __future__ import annotations


class JobError(Exception):
    """Base of the errors a plugin raises on purpose; the message goes to the customer."""


class JobInputError(JobError, ValueError):
    """The customer's fault: the request cannot be served as sent (a malformed request, bad
    params, bad data). Raised by the protocol parsers and by plugins alike; before payment the
    request is refused for nothing, during a paid job the announced `input_error_fee` is kept."""


# Why a job is stopped (`JobContext.cancel`): decisions are taken on these, never on the words.
TIME_LIMIT = "time limit"
WORKER_STOPPING = "worker stopping"


class JobCancelled(JobError):
    """The customer cancelled the job (kind-5 deletion) or the worker is stopping (then
    `stopping` is true: the job goes back to the queue)."""

    @property
    def stopping(self) -> bool:
        return bool(self.args) and self.args[0] == WORKER_STOPPING


class JobTimeout(JobError):
    """The job ran past its time limit."""
