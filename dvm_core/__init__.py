"""NIP-90 Data Vending Machine worker core: protocol, relays, payment, persistence, plugins.

This top level is the plugin API: what a plugin needs is importable from here (`hookimpl`,
`JobKind`, `JobResult`, the errors), with `hookspecs` (the contract), `params`, `archives`,
`childproc`, `launch`, `devices`, `charts` and `datarefs` beside it. The rest of the core is in
layers below (see dvm_core/README.md); plugins do not import them.
"""

import pluggy

from .jobs import (SIGNED_FILE_KIND, Artifact, JobCancelled, JobContext, JobError, JobInputError, JobKind,
                   JobResult, JobTimeout, SignedFile, StopReason, TranscriptChecker, open_signed_file)
from .protocol.nip90 import JobInput, JobRequest

hookimpl = pluggy.HookimplMarker("dvm")

__all__ = [
    "hookimpl", "Artifact", "JobKind", "JobResult", "JobContext", "JobError", "JobInputError",
    "JobCancelled", "JobTimeout", "StopReason", "JobRequest", "JobInput", "SIGNED_FILE_KIND",
    "SignedFile", "open_signed_file", "TranscriptChecker",
]
