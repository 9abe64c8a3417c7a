"""A full disk under the state directory: what the store cannot write waits for room.

The store refuses a write with SQLITE_FULL and keeps nothing of the transaction, so the job is
in the store as far as it got, as after a crash. A write made once the work is done (the result,
a job's end) is tried again in place until there is room, so no work is redone and nothing is
failed or refunded for want of disk; a request that met the full disk before its work began is
taken up again the way a restart would (`Worker._wait_for_room`).
"""

from __future__ import annotations

import asyncio
from typing import Callable, TypeVar

import structlog

from dvm_core.state.store import disk_full

log = structlog.get_logger("dvm.worker")

ROOM_RETRY_SECONDS = 1.0       # the first try again after a full disk; then twice as long each time...
MAX_ROOM_RETRY_SECONDS = 10.0  # ...up to this
WAITING_MESSAGE = ("waiting: this DVM's disk is full; the job goes on when there is room again, and "
                   "nothing you paid is lost")

T = TypeVar("T")


def log_full(job_id: str | None, what: str, waited: int, retry_in: float) -> None:
    """The first time, a clear error line; after that a quieter one."""
    if waited == 0:
        log.error("the state directory's disk is full: the job waits until there is room again",
                  job_id=job_id, step=what, retry_in=retry_in)
    else:
        log.info("still no room in the state directory; the job waits", job_id=job_id, step=what,
                 retry_in=retry_in)


def retry_delay(waited: int) -> float:
    return min(ROOM_RETRY_SECONDS * 2 ** waited, MAX_ROOM_RETRY_SECONDS)


async def when_room(write: Callable[[], T], *, job_id: str | None, what: str,
                    on_wait: Callable[[], None] | None = None) -> T:
    """`write()` (one store transaction), tried again until the disk has room for it; `on_wait`
    is called once, when it first has to wait (to tell the customer)."""
    waited = 0
    while True:
        try:
            return write()
        except Exception as exc:
            if not disk_full(exc):
                raise
        delay = retry_delay(waited)
        log_full(job_id, what, waited, delay)
        if waited == 0 and on_wait is not None:
            on_wait()
        waited += 1
        await asyncio.sleep(delay)
