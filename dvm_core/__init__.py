"""NIP-90 Data Vending Machine worker core: protocol, relays, payment, persistence, plugins.

What a plugin needs is importable from here: `hookimpl`, `JobKind`, `JobResult`, the errors.
"""

import pluggy

from .jobs import Artifact, JobCancelled, JobContext, JobError, JobInputError, JobKind, JobResult, JobTimeout
from .protocol.nip90 import JobInput, JobRequest

hookimpl = pluggy.HookimplMarker("dvm")

__all__ = [
    "hookimpl", "Artifact", "JobKind", "JobResult", "JobContext", "JobError", "JobInputError",
    "JobCancelled", "JobTimeout", "JobRequest", "JobInput",
]
