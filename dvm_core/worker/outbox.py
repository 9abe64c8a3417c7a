"""What the worker says: events signed, published to every relay, and the ones that must arrive
(results, final errors, payouts' nutzaps) kept in the store until a relay took them.

`Reply` is everything said about one request, encrypted as the request was; `Outbox` signs and
publishes. A stored event is published again with backoff, and after a restart, until a relay
accepts it or refuses it for good (relays drop a repeated id, so the customer sees one).
"""

from __future__ import annotations

import asyncio
import sqlite3
from typing import Callable

import structlog

from dvm_core.protocol.encryption import Scheme, encrypter
from dvm_core.protocol.events import Keys, sign_event
from dvm_core.protocol.nip90 import JobRequest, build_feedback, build_result
from dvm_core.state.store import Store, disk_full

log = structlog.get_logger("dvm.worker")

MAX_BACKOFF_SECONDS = 60.0


class Outbox:
    """Signs with the DVM's key and publishes through the relay pool (any object with
    ``async publish(event) -> list[PublishResult]``)."""

    def __init__(self, *, pool, store: Store, keys: Keys, relay_hint: str,
                 spawn: Callable[[object], asyncio.Task]):
        self.pool = pool
        self.store = store
        self.keys = keys
        self.relay_hint = relay_hint
        self.spawn = spawn
        self.stopping = False   # no more retries: what is stored goes out after the next start
        self.closed = False     # the store is closed: nothing more is marked

    def sign(self, kind: int, content: str, tags: list[list[str]]) -> dict:
        return sign_event(self.keys, kind, content, tags)

    def send(self, event: dict, role: str = "feedback") -> None:
        """Publish once, in the background; lost if no relay takes it (progress, notices)."""
        self.spawn(self.publish(event, role=role))

    def send_stored(self, event: dict, role: str, job_id: str | None) -> None:
        """Publish an event already in the store's outbox, in the background, until it arrives."""
        self.spawn(self.publish(event, role=role, job_id=job_id, stored=True))

    def store_and_send(self, event: dict, role: str, job_id: str | None) -> None:
        """Put `event` in the store's outbox (inside the caller's transaction, if any), then
        publish it until it arrives."""
        self.store.add_outgoing(event, role, job_id)
        self.send_stored(event, role, job_id)

    def resend_unpublished(self) -> None:
        """After a restart: everything stored that no relay confirmed goes out again."""
        for job_id, role, event in self.store.unpublished():
            log.info("publishing again after restart", job_id=job_id, role=role, event_id=event["id"])
            self.send_stored(event, role, job_id)

    async def publish(self, event: dict, role: str = "feedback", job_id: str | None = None,
                      stored: bool = False) -> bool:
        """Publish to every relay. A stored event is tried again with backoff until a relay
        accepts it; it stays in the outbox for the next start otherwise."""
        delay = 1.0
        while True:
            results = await self.pool.publish(event)
            accepted = [r.relay for r in results if r.ok]
            if accepted:
                if stored and not self.closed:
                    try:
                        self.store.mark_published(event["id"], accepted)
                    except sqlite3.OperationalError as exc:
                        if not disk_full(exc):
                            raise
                        # Out, but not marked: the next start publishes it again (a duplicate
                        # the relays drop).
                        log.warning("published, but the full disk could not record it",
                                    role=role, job_id=job_id, event_id=event["id"])
                return True
            log.warning("no relay accepted an event", role=role, job_id=job_id, event_id=event["id"],
                        reasons={r.relay: r.message for r in results})
            if not stored or self.stopping or any(r.refused_for_good for r in results):
                return False
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_BACKOFF_SECONDS)


class Reply:
    """Everything the worker tells the customer about one request: encrypted to them exactly
    when the request was (with the request's scheme), always tagged with the request."""

    def __init__(self, request: JobRequest, scheme: Scheme | None, outbox: Outbox):
        self.request = request
        self.scheme = scheme
        self._outbox = outbox
        self._encrypt = encrypter(scheme, outbox.keys.private_key, request.pubkey) if scheme else None

    def feedback_event(self, status: str, message: str, **fields) -> dict:
        """A signed feedback event, not yet stored or sent."""
        return self._feedback(status, message, **fields)

    def _feedback(self, status: str, message: str, **fields) -> dict:
        return self._outbox.sign(*build_feedback(self.request, status, message,
                                                 relay_hint=self._outbox.relay_hint,
                                                 encrypt=self._encrypt, **fields))

    def feedback(self, status: str, message: str, **fields) -> None:
        """Feedback that may be lost (`processing`, progress, `payment-required`)."""
        self._outbox.send(self._feedback(status, message, **fields))

    def final_error(self, message: str, amount_msats: int | None = None) -> None:
        """The job's last word, an `error`: stored, so it reaches the customer across restarts.
        Call it inside the transaction that ends the job."""
        event = self._feedback("error", message, amount_msats=amount_msats)
        self._outbox.store_and_send(event, "feedback", self.request.id)

    def send_stored(self, event: dict, role: str) -> None:
        """Publish one of this request's events, already in the store's outbox, until it arrives."""
        self._outbox.send_stored(event, role, self.request.id)

    def result(self, payload: str) -> dict:
        """The signed result event (not yet stored or sent)."""
        return self._outbox.sign(*build_result(self.request, payload, relay_hint=self._outbox.relay_hint,
                                               encrypt=self._encrypt))

