"""Customers cancel with a kind-5 deletion of their request (NIP-09, as NIP-90 says).

One relay subscription covers every job that can still be cancelled — waiting for payment,
queued or running — and is re-sent, debounced, as that set changes: relays keep deletions, so
one sent before the job started is found too.
"""

from __future__ import annotations

import asyncio
from typing import Callable

from dvm_core.protocol.nip90 import DELETION_KIND

SUBSCRIPTION = "dvm-cancels"
DEBOUNCE_SECONDS = 0.05


class Cancels:
    def __init__(self, pool, spawn: Callable[[object], asyncio.Task]):
        self.pool = pool
        self.spawn = spawn
        self.watched: set[str] = set()       # jobs a deletion of their request cancels
        self.stopping = False
        self._timer: asyncio.TimerHandle | None = None

    def watch(self, job_id: str) -> None:
        if job_id not in self.watched:
            self.watched.add(job_id)
            self._changed()

    def forget(self, job_id: str) -> None:
        if job_id in self.watched:
            self.watched.discard(job_id)
            self._changed()

    def stop(self) -> None:
        self.stopping = True
        if self._timer is not None:
            self._timer.cancel()

    def _changed(self) -> None:
        if self._timer is None and not self.stopping:
            self._timer = asyncio.get_running_loop().call_later(DEBOUNCE_SECONDS, self._resubscribe)

    def _resubscribe(self) -> None:
        self._timer = None
        if self.stopping:
            return
        ids = sorted(self.watched)
        if ids:
            self.spawn(self.pool.subscribe(SUBSCRIPTION, [{"kinds": [DELETION_KIND], "#e": ids}]))
        else:
            self.spawn(self.pool.unsubscribe(SUBSCRIPTION))
