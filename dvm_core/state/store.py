"""The worker's durable state in SQLite: jobs, their states, and events that must go out.

Every step that could be lost is written before it is taken: a request is recorded before it
is answered, a result event is signed and stored before it is published, and what has not been
confirmed by a relay is published again after a restart (relays drop a repeated id, so the
customer sees one result).
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from .jobstate import ACTIVE, FINAL, JobState, check_transition

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,            -- the job request's event id
    kind INTEGER NOT NULL,
    customer TEXT NOT NULL,
    created_at INTEGER NOT NULL,    -- the request's created_at
    received_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    state TEXT NOT NULL,            -- received, rejected, queued, running, succeeded, failed, cancelled
    request TEXT NOT NULL,          -- the request event as received (private content stays encrypted)
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    summary TEXT,                   -- JSON metrics of the finished job
    progress REAL,                  -- last reported percent, for `dvm status`
    progress_message TEXT,
    crashes INTEGER NOT NULL DEFAULT 0  -- times the worker died while this job ran
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
CREATE TABLE IF NOT EXISTS outbox (
    event_id TEXT PRIMARY KEY,
    job_id TEXT,
    role TEXT NOT NULL,             -- result, feedback, announcement
    event TEXT NOT NULL,
    created REAL NOT NULL,
    published_at REAL,
    relays TEXT                     -- JSON: relays that accepted it
);
CREATE INDEX IF NOT EXISTS outbox_unpublished ON outbox(published_at) WHERE published_at IS NULL;
CREATE TABLE IF NOT EXISTS payments (
    token_id TEXT PRIMARY KEY,      -- sha256 of the token's proof secrets: a token pays once
    job_id TEXT NOT NULL,
    customer TEXT NOT NULL,
    method TEXT NOT NULL,           -- encrypted, p2pk, public, nutzap
    mint TEXT NOT NULL,
    unit TEXT NOT NULL,
    offered INTEGER NOT NULL,       -- face value of the token
    price INTEGER NOT NULL,
    token TEXT NOT NULL,            -- kept until redeemed, to retry after a mint outage or a crash
    received INTEGER,               -- what arrived after mint fees
    state TEXT NOT NULL,            -- received, redeeming, redeemed, rejected, consumed, refunded,
                                    -- returning (to be sent back once its mint answers)
    error TEXT,
    change_sent INTEGER NOT NULL DEFAULT 0,
    refund_sent INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    refund_to TEXT,                 -- the key money goes back to (the token's NUT-11 refund key)
    swap TEXT                       -- JSON: where each swap attempt's outputs start (NUT-09 restore)
);
CREATE INDEX IF NOT EXISTS payments_job ON payments(job_id);
CREATE TABLE IF NOT EXISTS job_locks (
    lock_key TEXT PRIMARY KEY,      -- the P2PK key derived for one job (locks.job_lock_pubkey)
    job_id TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS nutzaps (
    event_id TEXT PRIMARY KEY,      -- a nutzap that may pay a job, kept until it is used or returned
    job_id TEXT NOT NULL,
    sender TEXT NOT NULL,
    token TEXT NOT NULL,
    state TEXT NOT NULL,            -- pending, used, refused, returned, expired
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS nutzaps_pending ON nutzaps(job_id) WHERE state = 'pending';
CREATE TABLE IF NOT EXISTS payouts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,   -- ecash this DVM owes: written before it is made
    job_id TEXT NOT NULL,
    token_id TEXT,                  -- the payment it comes out of
    role TEXT NOT NULL,             -- refund, change
    customer TEXT NOT NULL,         -- who gets it (their Nostr key)
    lock_to TEXT,                   -- the key it is locked to, once chosen
    mint TEXT NOT NULL,
    unit TEXT NOT NULL,
    amount INTEGER NOT NULL,
    comment TEXT NOT NULL,
    zapped_kind INTEGER,
    state TEXT NOT NULL,            -- owed, sending (at the mint), sent (a nutzap in the outbox)
    proofs TEXT,                    -- JSON: the proofs made for it
    event_id TEXT,                  -- the nutzap that carries them
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS payouts_open ON payouts(state) WHERE state != 'sent';
CREATE TABLE IF NOT EXISTS deliveries (
    job_id TEXT PRIMARY KEY,        -- a job paid on delivery, from the moment its result is sealed
    preimage TEXT NOT NULL,         -- K (hex): what the mint gets when we redeem; never logged
    hash TEXT NOT NULL,             -- sha256(K), the HTLC's hash lock
    locktime INTEGER NOT NULL,      -- the HTLC's locktime asked for
    refund_key TEXT NOT NULL,       -- the customer's refund key
    price INTEGER NOT NULL,
    offer TEXT NOT NULL,            -- the offer's content (protocol.delivery.DeliveryOffer)
    result TEXT NOT NULL,           -- the result payload, with the seal key, sent once paid
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS expiring_blobs (
    server TEXT NOT NULL,           -- the blob server it was uploaded to
    sha256 TEXT NOT NULL,
    job_id TEXT,                    -- the job whose result it is
    name TEXT,                      -- the file's name in the result
    expires REAL NOT NULL,          -- unix time: deleted from the server after this
    attempts INTEGER NOT NULL DEFAULT 0,   -- deletes that failed so far
    next_try REAL NOT NULL,         -- no delete before this (expires, then after each failure)
    last_error TEXT,
    PRIMARY KEY (server, sha256)
);
CREATE INDEX IF NOT EXISTS expiring_blobs_due ON expiring_blobs(next_try);
"""

ACTIVE_STATES = tuple(s.value for s in ACTIVE)
FINAL_STATES = tuple(s.value for s in FINAL)


def disk_full(exc: BaseException) -> bool:
    """Whether `exc` is the store refusing a write for want of space (SQLITE_FULL: the disk
    under the state directory is full). Nothing of the failed transaction was written."""
    return isinstance(exc, sqlite3.OperationalError) and (
        getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
        or "database or disk is full" in str(exc))


@dataclass(frozen=True)
class JobRecord:
    id: str
    kind: int
    customer: str
    created_at: int
    state: str
    request: dict
    error: str | None
    attempts: int
    received_at: float
    updated_at: float
    summary: dict | None


class Store:
    """One SQLite file. Used from the event loop's thread only; each call is one transaction."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            # It holds tokens until they are redeemed, and so do its -wal and -shm files, which
            # SQLite creates with the mode of the main file: make that one 0600 first.
            for suffix in ("", "-wal", "-shm"):
                _private_file(Path(self.path + suffix), create=not suffix)
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._depth = 0
        self.db.row_factory = sqlite3.Row
        # WAL with synchronous=NORMAL survives a killed process (the data is in the OS); only a
        # power cut can take the last commits, and costs no fsync per job.
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA busy_timeout=5000")
        self.db.executescript(SCHEMA)
        columns = {r[1] for r in self.db.execute("PRAGMA table_info(jobs)")}
        for column, typ in (("progress", "REAL"), ("progress_message", "TEXT"),
                            ("crashes", "INTEGER NOT NULL DEFAULT 0")):
            if column not in columns:  # a store made by an older version
                self.db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {typ}")
        payment_columns = {r[1] for r in self.db.execute("PRAGMA table_info(payments)")}
        for column in ("refund_to", "swap"):
            if column not in payment_columns:  # a store made by an older version
                self.db.execute(f"ALTER TABLE payments ADD COLUMN {column} TEXT")
        if self.path != ":memory:":
            for suffix in ("", "-wal", "-shm"):
                _private_file(Path(self.path + suffix), create=False)

    def close(self) -> None:
        self.db.close()

    @contextlib.contextmanager
    def atomic(self):
        """One transaction for the calls inside (nested uses join the outer one): what must not
        be half-written by a crash is written together."""
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        self._depth = 1
        try:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                # SQLite may have rolled the transaction back itself (it does on SQLITE_FULL):
                # a ROLLBACK then fails, and its error would hide the one that matters.
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")
        finally:
            self._depth = 0

    # jobs -----------------------------------------------------------------
    def record_request(self, event: dict, state: str = JobState.RECEIVED) -> bool:
        """Record a job request; False if it was seen before (so it is never handled twice)."""
        now = time.time()
        cur = self.db.execute(
            "INSERT OR IGNORE INTO jobs (id, kind, customer, created_at, received_at, updated_at,"
            " state, request) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (event["id"], event["kind"], event["pubkey"], event["created_at"], now, now, JobState(state).value,
             json.dumps(event, separators=(",", ":"), ensure_ascii=False)),
        )
        return cur.rowcount == 1

    def set_state(self, job_id: str, state: JobState | str, error: str | None = None,
                  summary: dict | None = None, count_attempt: bool = False) -> None:
        """Move a job to `state`; only the moves in `jobstate.TRANSITIONS` are allowed."""
        row = self.db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            return
        new = check_transition(job_id, row[0], state)
        self.db.execute(
            "UPDATE jobs SET state = ?, updated_at = ?, error = COALESCE(?, error),"
            " summary = COALESCE(?, summary), attempts = attempts + ? WHERE id = ?",
            (new.value, time.time(), error, json.dumps(summary) if summary is not None else None,
             1 if count_attempt else 0, job_id),
        )

    def count_crash(self, job_id: str) -> int:
        """The worker died while this job ran: count it; returns the count."""
        self.db.execute("UPDATE jobs SET crashes = crashes + 1 WHERE id = ?", (job_id,))
        return self.db.execute("SELECT crashes FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]

    def set_progress(self, job_id: str, percent: float, message: str) -> None:
        self.db.execute("UPDATE jobs SET progress = ?, progress_message = ? WHERE id = ?",
                        (percent, message, job_id))

    def job_rows(self, *, states: tuple[str, ...] = (), kind: int | None = None,
                 customer: str | None = None, since: float | None = None, limit: int = 50) -> list[dict]:
        """Jobs for the operator's commands, newest first, without the request bodies."""
        where, args = [], []
        if states:
            where.append(f"state IN ({','.join('?' * len(states))})")
            args += list(states)
        if kind is not None:
            where.append("kind = ?")
            args.append(kind)
        if customer:
            where.append("customer = ?")
            args.append(customer)
        if since is not None:
            where.append("received_at >= ?")
            args.append(since)
        sql = ("SELECT id, kind, customer, state, error, attempts, received_at, updated_at, summary,"
               " progress, progress_message FROM jobs")
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY received_at DESC LIMIT ?"
        return [dict(r) for r in self.db.execute(sql, (*args, limit))]

    def earnings(self) -> dict[str, int]:
        """Sats kept per unit: received, less change and refunds sent back."""
        rows = self.db.execute(
            "SELECT unit, SUM(COALESCE(received, 0) - change_sent - refund_sent) FROM payments"
            " WHERE state IN ('redeemed', 'consumed', 'refunded') GROUP BY unit")
        return {unit: int(total or 0) for unit, total in rows}

    def left_over(self) -> dict[str, int]:
        """What the next start takes up again, counted for the worker's last log line: jobs not
        finished (by state), events not yet published, tokens not yet redeemed, ecash owed and
        not yet sent, nutzaps kept for their job."""
        counts = {"queued": 0, "running": 0, "received": 0, "payment-required": 0, "delivered": 0}
        marks = ",".join("?" * len(counts))
        for state, n in self.db.execute(f"SELECT state, COUNT(*) FROM jobs WHERE state IN ({marks})"
                                        " GROUP BY state", tuple(counts)):
            counts[state] = n
        one = lambda sql: self.db.execute(sql).fetchone()[0]   # noqa: E731
        return {
            "jobs_queued": counts["queued"], "jobs_running": counts["running"],
            "jobs_unpaid": counts["received"] + counts["payment-required"],
            "jobs_delivered": counts["delivered"],
            "outbox_unsent": one("SELECT COUNT(*) FROM outbox WHERE published_at IS NULL"),
            "payments_unredeemed": one("SELECT COUNT(*) FROM payments WHERE state IN ('received', 'redeeming')"),
            "payouts_unsent": one("SELECT COUNT(*) FROM payouts WHERE state != 'sent'"),
            "nutzaps_pending": one("SELECT COUNT(*) FROM nutzaps WHERE state = 'pending'"),
        }

    def get_job(self, job_id: str) -> JobRecord | None:
        row = self.db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row) if row else None

    def jobs(self, states: tuple[str, ...] | None = None, limit: int = 1000) -> list[JobRecord]:
        if states:
            marks = ",".join("?" * len(states))
            rows = self.db.execute(
                f"SELECT * FROM jobs WHERE state IN ({marks}) ORDER BY received_at LIMIT ?",
                (*states, limit),
            )
        else:
            rows = self.db.execute("SELECT * FROM jobs ORDER BY received_at DESC LIMIT ?", (limit,))
        return [_job(r) for r in rows]

    def job_rowid(self, job_id: str) -> int | None:
        """Where a request stands in the order it was recorded in (its rowid), or None."""
        row = self.db.execute("SELECT rowid FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return row[0] if row else None

    def last_rowid(self) -> int:
        """The rowid of the request recorded last (0 for none)."""
        return self.db.execute("SELECT COALESCE(MAX(rowid), 0) FROM jobs").fetchone()[0]

    def unfinished_after(self, states: tuple[str, ...], rowid: int, limit: int) -> list[tuple[int, JobRecord]]:
        """Up to `limit` jobs in `states` recorded after `rowid`, oldest first, with their rowid:
        the unfinished jobs a restart resumes, a page at a time."""
        marks = ",".join("?" * len(states))
        rows = self.db.execute(
            f"SELECT rowid, * FROM jobs WHERE state IN ({marks}) AND rowid > ? ORDER BY rowid LIMIT ?",
            (*states, rowid, limit))
        return [(r[0], _job(r)) for r in rows]

    def received_after(self, rowid: int, limit: int) -> list[tuple[int, dict]]:
        """Up to `limit` requests recorded after `rowid` and still `received`, oldest first,
        with their rowid: requests that waited in the store, taken up a batch at a time."""
        rows = self.db.execute(
            "SELECT rowid, request FROM jobs WHERE rowid > ? AND state = ? ORDER BY rowid LIMIT ?",
            (rowid, JobState.RECEIVED.value, limit))
        return [(r[0], json.loads(r[1])) for r in rows]

    def latest_request_time(self) -> int | None:
        row = self.db.execute("SELECT MAX(created_at) FROM jobs").fetchone()
        return row[0]

    # outbox ---------------------------------------------------------------
    def add_outgoing(self, event: dict, role: str, job_id: str | None = None) -> None:
        self.db.execute(
            "INSERT OR IGNORE INTO outbox (event_id, job_id, role, event, created)"
            " VALUES (?, ?, ?, ?, ?)",
            (event["id"], job_id, role, json.dumps(event, separators=(",", ":"), ensure_ascii=False),
             time.time()),
        )

    def mark_published(self, event_id: str, relays: list[str]) -> None:
        self.db.execute(
            "UPDATE outbox SET published_at = ?, relays = ? WHERE event_id = ?",
            (time.time(), json.dumps(relays), event_id),
        )

    def unpublished(self) -> list[tuple[str | None, str, dict]]:
        rows = self.db.execute(
            "SELECT job_id, role, event FROM outbox WHERE published_at IS NULL ORDER BY created"
        )
        return [(r["job_id"], r["role"], json.loads(r["event"])) for r in rows]

    def count_unpublished(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM outbox WHERE published_at IS NULL").fetchone()[0]

    def outgoing_rowid(self, event_id: str) -> int | None:
        """Where an event stands in the outbox's order (its rowid), or None if it is not there."""
        row = self.db.execute("SELECT rowid FROM outbox WHERE event_id = ?", (event_id,)).fetchone()
        return row[0] if row else None

    def unpublished_after(self, rowid: int, limit: int) -> list[tuple[int, str | None, str, dict]]:
        """Up to `limit` unpublished events stored after `rowid`, oldest first, with their rowid:
        the outbox's backlog read a batch at a time, never all at once."""
        rows = self.db.execute(
            "SELECT rowid, job_id, role, event FROM outbox WHERE rowid > ? AND published_at IS NULL"
            " ORDER BY rowid LIMIT ?", (rowid, limit))
        return [(r[0], r["job_id"], r["role"], json.loads(r["event"])) for r in rows]

    def outgoing_for_job(self, job_id: str, role: str) -> dict | None:
        row = self.db.execute(
            "SELECT event FROM outbox WHERE job_id = ? AND role = ? ORDER BY created LIMIT 1",
            (job_id, role),
        ).fetchone()
        return json.loads(row["event"]) if row else None

    # payments ---------------------------------------------------------------
    def record_payment(self, token_id: str, job_id: str, customer: str, method: str, mint: str,
                       unit: str, offered: int, price: int, token: str,
                       refund_to: str | None = None) -> dict | None:
        """Record a token before anything is done with it (a token is redeemed at most once,
        across restarts). Returns None when the token is new to this job, else the row that
        already holds it. A token refused earlier (state `rejected`) is taken over by the new
        job: the customer may well have fixed what was wrong, and the mint stops double spends."""
        now = time.time()
        cur = self.db.execute(
            "INSERT OR IGNORE INTO payments (token_id, job_id, customer, method, mint, unit, offered,"
            " price, token, state, created, updated, refund_to)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'received', ?, ?, ?)",
            (token_id, job_id, customer, method, mint, unit, offered, price, token, now, now, refund_to),
        )
        if cur.rowcount == 1:
            return None
        cur = self.db.execute(
            "UPDATE payments SET job_id = ?, customer = ?, method = ?, price = ?, token = ?,"
            " state = 'received', error = NULL, updated = ?, refund_to = ?"
            " WHERE token_id = ? AND state = 'rejected'",
            (job_id, customer, method, price, token, now, refund_to, token_id),
        )
        if cur.rowcount == 1:
            return None
        row = self.db.execute("SELECT * FROM payments WHERE token_id = ?", (token_id,)).fetchone()
        return dict(row)

    def set_payment(self, token_id: str, state: str, *, received: int | None = None,
                    error: str | None = None, **flags: int) -> None:
        sets = ["state = ?", "updated = ?", "received = COALESCE(?, received)", "error = COALESCE(?, error)"]
        args: list = [state, time.time(), received, error]
        for name, value in flags.items():
            if name not in ("change_sent", "refund_sent"):
                raise ValueError(name)
            sets.append(f"{name} = ?")
            args.append(value)
        self.db.execute(f"UPDATE payments SET {', '.join(sets)} WHERE token_id = ?", (*args, token_id))

    def payment_for_job(self, job_id: str) -> dict | None:
        """The payment that pays for a job (the latest redeemed one, else the latest), a token
        being sent back (method `returned`) only when there is no other: its retries can end
        long after a later payment for the job began."""
        row = self.db.execute(
            "SELECT * FROM payments WHERE job_id = ? ORDER BY method != 'returned' DESC,"
            " state IN ('redeemed', 'consumed') DESC, updated DESC LIMIT 1", (job_id,)).fetchone()
        return dict(row) if row else None

    def add_payment_swap(self, token_id: str, mark: dict) -> None:
        """Note, before a swap, where its outputs' secrets start (one mark per attempt)."""
        row = self.db.execute("SELECT swap FROM payments WHERE token_id = ?", (token_id,)).fetchone()
        marks = json.loads(row[0]) if row and row[0] else []
        self.db.execute("UPDATE payments SET swap = ? WHERE token_id = ?",
                        (json.dumps(marks + [mark]), token_id))

    def remove_payment_swap(self, token_id: str, mark: dict) -> None:
        """Forget a mark whose swap the mint refused (none of its outputs was signed), before
        the wallet uses its secrets for another swap."""
        row = self.db.execute("SELECT swap FROM payments WHERE token_id = ?", (token_id,)).fetchone()
        marks = [m for m in (json.loads(row[0]) if row and row[0] else []) if m != mark]
        self.db.execute("UPDATE payments SET swap = ? WHERE token_id = ?",
                        (json.dumps(marks) if marks else None, token_id))

    def payment(self, token_id: str) -> dict | None:
        row = self.db.execute("SELECT * FROM payments WHERE token_id = ?", (token_id,)).fetchone()
        return dict(row) if row else None

    def payments(self, limit: int = 1000) -> list[dict]:
        return [dict(r) for r in self.db.execute(
            "SELECT * FROM payments ORDER BY created DESC LIMIT ?", (limit,))]

    # job locks and nutzaps -------------------------------------------------------
    def add_job_lock(self, lock_key: str, job_id: str) -> None:
        self.db.execute("INSERT OR IGNORE INTO job_locks (lock_key, job_id) VALUES (?, ?)", (lock_key, job_id))

    def job_for_lock(self, lock_key: str) -> str | None:
        row = self.db.execute("SELECT job_id FROM job_locks WHERE lock_key = ?", (lock_key,)).fetchone()
        return row[0] if row else None

    def add_nutzap(self, event_id: str, job_id: str, sender: str, token: str) -> bool:
        """Keep a nutzap that may pay `job_id` until it is used or returned; False if known."""
        cur = self.db.execute(
            "INSERT OR IGNORE INTO nutzaps (event_id, job_id, sender, token, state, created)"
            " VALUES (?, ?, ?, ?, 'pending', ?)", (event_id, job_id, sender, token, time.time()))
        return cur.rowcount == 1

    def pending_nutzaps(self, job_id: str | None = None) -> list[dict]:
        sql, args = "SELECT * FROM nutzaps WHERE state = 'pending'", ()
        if job_id is not None:
            sql, args = sql + " AND job_id = ?", (job_id,)
        return [dict(r) for r in self.db.execute(sql + " ORDER BY created", args)]

    def count_pending_nutzaps(self, unknown_jobs: bool = False) -> int:
        """Nutzaps kept, waiting for their job; with `unknown_jobs`, only those for requests
        not recorded."""
        sql = "SELECT COUNT(*) FROM nutzaps WHERE state = 'pending'"
        if unknown_jobs:
            sql += " AND job_id NOT IN (SELECT id FROM jobs)"
        return self.db.execute(sql).fetchone()[0]

    def set_nutzap(self, event_id: str, state: str) -> None:
        self.db.execute("UPDATE nutzaps SET state = ? WHERE event_id = ?", (state, event_id))

    # money owed -------------------------------------------------------------------
    def owe(self, *, job_id: str, token_id: str | None, role: str, customer: str, lock_to: str | None,
            mint: str, unit: str, amount: int, comment: str, zapped_kind: int | None,
            payment_state: str | None = None, received: int | None = None) -> int:
        """Write down ecash to send back before anything is made: one transaction with the
        payment's ledger (`refund_sent` or `change_sent`, its new state and what arrived)."""
        now = time.time()
        with self.atomic():
            cur = self.db.execute(
                "INSERT INTO payouts (job_id, token_id, role, customer, lock_to, mint, unit, amount,"
                " comment, zapped_kind, state, created, updated)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'owed', ?, ?)",
                (job_id, token_id, role, customer, lock_to, mint, unit, amount, comment, zapped_kind,
                 now, now))
            if token_id is not None:
                column = "refund_sent" if role == "refund" else "change_sent"
                self.db.execute(
                    f"UPDATE payments SET {column} = {column} + ?, state = COALESCE(?, state),"
                    " received = COALESCE(?, received), updated = ? WHERE token_id = ?",
                    (amount, payment_state, received, now, token_id))
            return cur.lastrowid

    def payout(self, payout_id: int) -> dict | None:
        row = self.db.execute("SELECT * FROM payouts WHERE id = ?", (payout_id,)).fetchone()
        return dict(row) if row else None

    def open_payouts(self) -> list[dict]:
        return [dict(r) for r in self.db.execute(
            "SELECT * FROM payouts WHERE state != 'sent' ORDER BY id")]

    def payouts(self, job_id: str | None = None) -> list[dict]:
        sql, args = "SELECT * FROM payouts", ()
        if job_id is not None:
            sql, args = sql + " WHERE job_id = ?", (job_id,)
        return [dict(r) for r in self.db.execute(sql + " ORDER BY id", args)]

    def set_payout(self, payout_id: int, state: str, *, lock_to: str | None = None,
                   error: str | None = None, attempt: bool = False) -> None:
        self.db.execute(
            "UPDATE payouts SET state = ?, lock_to = COALESCE(?, lock_to), error = ?,"
            " attempts = attempts + ?, updated = ? WHERE id = ?",
            (state, lock_to, error, 1 if attempt else 0, time.time(), payout_id))

    def payout_sent(self, payout_id: int, proofs: list[dict], event: dict, role: str, job_id: str) -> None:
        """The proofs made for a payout and the nutzap that carries them, in one transaction:
        after a crash the nutzap is in the outbox, published again until a relay takes it."""
        with self.atomic():
            self.db.execute(
                "UPDATE payouts SET state = 'sent', proofs = ?, event_id = ?, error = NULL, updated = ?"
                " WHERE id = ?", (json.dumps(proofs), event["id"], time.time(), payout_id))
            self.add_outgoing(event, role, job_id)

    def payout_secrets(self) -> set[str]:
        """Secrets of every proof already given to a payout."""
        secrets = set()
        for (proofs,) in self.db.execute("SELECT proofs FROM payouts WHERE proofs IS NOT NULL"):
            secrets.update(p["secret"] for p in json.loads(proofs))
        return secrets

    # pay on delivery ----------------------------------------------------------------------
    def add_delivery(self, *, job_id: str, preimage: bytes, hash: str, locktime: int, refund_key: str,
                     price: int, offer: str, result: str) -> None:
        self.db.execute(
            "INSERT INTO deliveries (job_id, preimage, hash, locktime, refund_key, price, offer, result,"
            " created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (job_id, preimage.hex(), hash, locktime, refund_key, price, offer, result, time.time()))

    def payments_to_return(self) -> list[dict]:
        """Tokens being sent back (`Cashier._give_back`), to be tried again after a restart."""
        return [dict(r) for r in self.db.execute(
            "SELECT * FROM payments WHERE state = 'returning' OR (method = 'returned' AND state IN"
            " ('received', 'redeeming')) ORDER BY created")]

    def delivered_unredeemed(self) -> list[dict]:
        """Payments of jobs paid on delivery whose result went out before the swap at the mint
        was done, or done but not yet marked consumed (`Cashier.redeem_delivered`): to be finished
        after a restart."""
        return [dict(r) for r in self.db.execute(
            "SELECT p.* FROM payments p JOIN deliveries d ON d.job_id = p.job_id"
            " JOIN jobs j ON j.id = p.job_id"
            " WHERE p.state IN ('received', 'redeeming', 'redeemed') AND j.state = 'succeeded'"
            " ORDER BY p.created")]

    def delivery(self, job_id: str) -> dict | None:
        row = self.db.execute("SELECT * FROM deliveries WHERE job_id = ?", (job_id,)).fetchone()
        return dict(row) if row else None

    # meta -----------------------------------------------------------------
    # blobs kept for a time (`Artifact.keep_days`) -------------------------------------------
    def add_expiring_blob(self, *, server: str, sha256: str, expires: float, job_id: str | None = None,
                          name: str | None = None) -> None:
        """Record an uploaded blob to delete from `server` after `expires`. The same blob recorded
        again (the same bytes in another result) is kept until the later of the two."""
        self.db.execute(
            "INSERT INTO expiring_blobs (server, sha256, job_id, name, expires, next_try) VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT(server, sha256) DO UPDATE SET expires = max(expires, excluded.expires), "
            "next_try = max(next_try, excluded.next_try)",
            (server, sha256, job_id, name, expires, expires))

    def due_blobs(self, now: float, limit: int = 100) -> list[dict]:
        """Blobs whose time is up (and whose last failed delete is not too recent)."""
        rows = self.db.execute("SELECT * FROM expiring_blobs WHERE next_try <= ? AND expires <= ? "
                               "ORDER BY next_try LIMIT ?", (now, now, limit))
        return [dict(r) for r in rows]

    def expiring_blobs(self) -> list[dict]:
        return [dict(r) for r in self.db.execute("SELECT * FROM expiring_blobs ORDER BY expires")]

    def blob_deleted(self, server: str, sha256: str) -> None:
        self.db.execute("DELETE FROM expiring_blobs WHERE server = ? AND sha256 = ?", (server, sha256))

    def blob_delete_failed(self, server: str, sha256: str, error: str, retry_at: float) -> None:
        self.db.execute("UPDATE expiring_blobs SET attempts = attempts + 1, last_error = ?, next_try = ? "
                        "WHERE server = ? AND sha256 = ?", (error[:500], retry_at, server, sha256))

    def get_meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def delete_meta(self, key: str) -> None:
        self.db.execute("DELETE FROM meta WHERE key = ?", (key,))


def _private_file(path: Path, create: bool) -> None:
    """Readable by its owner alone (0600): created so when `create`, else tightened if it exists."""
    if create and not path.exists():
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    if path.exists():
        path.chmod(0o600)


def _job(row: sqlite3.Row) -> JobRecord:
    return JobRecord(
        id=row["id"], kind=row["kind"], customer=row["customer"], created_at=row["created_at"],
        state=row["state"], request=json.loads(row["request"]), error=row["error"],
        attempts=row["attempts"], received_at=row["received_at"], updated_at=row["updated_at"],
        summary=json.loads(row["summary"]) if row["summary"] else None,
    )
