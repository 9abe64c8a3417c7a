"""Result files kept for a time (`Artifact.keep_days`: a training transcript's checkpoints, for
the retention the provider announces): deleted from the blob servers once their time is up.

The runner records each such blob in the store when it uploads it (server, sha256, expiry);
`sweep` deletes those that are due with BUD-02 ``DELETE /<sha256>`` (a kind-24242 authorization,
``t`` = ``delete``, signed with the worker's key, naming the blob and that server only). A blob
the server no longer has counts as deleted; a failed delete stays recorded and is tried again
`retry_seconds` later. The record is in SQLite, so a restarted worker deletes what fell due while
it was down.
"""

from __future__ import annotations

import time

import structlog

from dvm_core.protocol.events import Keys
from dvm_core.state.store import Store
from dvm_core.transport.blossom import BlossomClient, BlossomError

log = structlog.get_logger("dvm.worker")


async def sweep(store: Store, keys: Keys, *, retry_seconds: float, now: float | None = None,
                timeout: float = 30.0) -> dict[str, int]:
    """Delete every blob that is due; how many were deleted, already gone, and failed."""
    now = time.time() if now is None else now
    client = BlossomClient([], keys, timeout=timeout)
    counts = {"deleted": 0, "gone": 0, "failed": 0}
    for blob in store.due_blobs(now):
        server, sha256 = blob["server"], blob["sha256"]
        try:
            found = await client.delete(server, sha256)
        except BlossomError as exc:
            counts["failed"] += 1
            store.blob_delete_failed(server, sha256, str(exc), time.time() + retry_seconds)
            log.warning("could not delete an expired result file; trying again later", server=server,
                        sha256=sha256, job=blob["job_id"], file=blob["name"], attempts=blob["attempts"] + 1,
                        retry_seconds=retry_seconds, error=str(exc))
            continue
        store.blob_deleted(server, sha256)
        counts["deleted" if found else "gone"] += 1
        log.info("expired result file deleted" if found else "expired result file already gone from its server",
                 server=server, sha256=sha256, job=blob["job_id"], file=blob["name"])
    return counts
