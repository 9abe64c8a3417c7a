"""Result files kept for a time (`Artifact.keep_days`: a training transcript's checkpoints, kept
as long as the provider announces): the worker records each in its store when it uploads it
and deletes it from the blob server once its time is up (BUD-02 DELETE), across restarts, and
tries a failed delete again later.

Real parts: a worker, relay and Blossom server on loopback; the plugin is a small one of this
file's that returns files with the retention a request asks for (the training plugins set
`keep_days` on their checkpoints: tests/test_verify.py, tests/test_verify_llm.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import time

import httpx
import pytest

from dvm_core import Artifact, JobKind, JobResult, hookimpl
from dvm_core.devtools.blobserver import start_blob_server
from dvm_core.protocol.nip90 import JobInput
from dvm_core.state.store import Store
from dvm_core.worker.plugins import plugin_manager

KIND = 5798
SECONDS = 1 / 86400


class Keeper:
    """Three files: ``short.bin`` kept ``short`` seconds, ``long.bin`` a day, ``plain.bin`` for good."""

    @staticmethod
    def run(ctx, request):
        short = float(request.params["short"])
        files = []
        for name, keep in (("short.bin", short * SECONDS), ("long.bin", 1.0), ("plain.bin", None)):
            path = ctx.workdir / name
            path.write_bytes(os.urandom(256))
            files.append(Artifact(path, name=name, keep_days=keep))
        return JobResult({"files": 3}, artifacts=files)

    @hookimpl
    def register_job_kinds(self, register):
        register(JobKind(kind=KIND, name="keeper", description="Returns files kept for a time.", run=self.run,
                         params={"short": "seconds short.bin is kept"}))


def keeper_pm():
    pm = plugin_manager(only=[], load_entry_points=False)
    pm.register(Keeper(), name="keeper")
    return pm


@pytest.fixture
async def blobs(tmp_path):
    server = await start_blob_server(tmp_path / "blobs")
    yield server
    await server.stop()


async def status(url: str) -> int:
    async with httpx.AsyncClient() as http:
        return (await http.get(url)).status_code


async def wait_status(url: str, wanted: int, timeout: float) -> None:
    end = time.monotonic() + timeout
    while await status(url) != wanted:
        assert time.monotonic() < end, f"{url} did not answer {wanted} within {timeout} s"
        await asyncio.sleep(0.1)


async def run_job(customer, worker, short: float) -> tuple[dict, float]:
    """The result's files by name, and when it came (time.time())."""
    request = await customer.submit(KIND, [JobInput("x", "text")], {"short": str(short)},
                                    provider=worker.keys.public_key, encrypt="nip44")
    result = await customer.result(request, timeout=30)
    content = json.loads(result.content)
    return {a["name"]: a for a in content["artifacts"]}, time.time()


def records(worker_or_path) -> dict[str, dict]:
    path = worker_or_path if isinstance(worker_or_path, str) else worker_or_path.settings.store_path
    store = Store(path)
    try:
        return {r["name"]: r for r in store.expiring_blobs()}
    finally:
        store.close()


async def test_an_expired_file_is_deleted_and_the_others_stay(workers, customer, blobs):
    worker = await workers.start(pm=keeper_pm(), blob_servers=[blobs.url], blob_sweep_seconds=0.2)
    files, got_at = await run_job(customer, worker, short=4)
    for name in ("short.bin", "long.bin", "plain.bin"):
        assert await status(files[name]["url"]) == 200, name
    kept = {r["name"]: r for r in worker.store.expiring_blobs()}
    assert set(kept) == {"short.bin", "long.bin"}   # plain.bin: no keep_days, never deleted
    assert kept["short.bin"]["server"] == blobs.url and kept["short.bin"]["sha256"] == files["short.bin"]["sha256"]
    assert got_at - 5 < kept["short.bin"]["expires"] <= got_at + 4
    assert abs(kept["long.bin"]["expires"] - (got_at + 86400)) < 10

    await wait_status(files["short.bin"]["url"], 404, timeout=15)
    assert time.time() >= kept["short.bin"]["expires"]          # not before its time
    assert not blobs.store.path(files["short.bin"]["sha256"]).exists()
    assert await status(files["long.bin"]["url"]) == 200 and await status(files["plain.bin"]["url"]) == 200
    assert set(r["name"] for r in worker.store.expiring_blobs()) == {"long.bin"}


async def test_a_restarted_worker_deletes_what_fell_due_while_it_was_down(workers, customer, blobs):
    worker = await workers.start(pm=keeper_pm(), blob_servers=[blobs.url], blob_sweep_seconds=0.2, name="w")
    files, _ = await run_job(customer, worker, short=3)
    url = files["short.bin"]["url"]
    await worker.stop(grace=1.0)
    store_path = str(worker.settings.store_path)
    expires = records(store_path)["short.bin"]["expires"]
    assert time.time() < expires and await status(url) == 200
    await asyncio.sleep(expires - time.time() + 1.0)
    assert await status(url) == 200          # due, but no worker runs to delete it

    again = await workers.start(keys=worker.keys, pm=keeper_pm(), blob_servers=[blobs.url],
                                blob_sweep_seconds=0.2, name="w")
    assert str(again.settings.store_path) == store_path
    await wait_status(url, 404, timeout=10)
    assert set(records(again)) == {"long.bin"}
    assert await status(files["long.bin"]["url"]) == 200


async def test_a_failed_delete_is_tried_again_later(workers, customer, tmp_path):
    server = await start_blob_server(tmp_path / "flaky")
    port = int(server.url.rsplit(":", 1)[1])
    worker = await workers.start(pm=keeper_pm(), blob_servers=[server.url], blob_sweep_seconds=0.2,
                                 blob_retry_seconds=1.0)
    files, _ = await run_job(customer, worker, short=2)
    url = files["short.bin"]["url"]
    await server.stop()                      # down when the file falls due: the delete fails
    end = time.monotonic() + 15
    while not (kept := {r["name"]: r for r in worker.store.expiring_blobs()})["short.bin"]["attempts"]:
        assert time.monotonic() < end, "no delete was tried"
        await asyncio.sleep(0.1)
    failed = kept["short.bin"]
    assert failed["last_error"] and "delete" in failed["last_error"]
    assert failed["next_try"] > failed["expires"]

    server = await start_blob_server(tmp_path / "flaky", port=port)   # back, with the blob
    try:
        assert server.url == url.rsplit("/", 1)[0] and await status(url) == 200
        await wait_status(url, 404, timeout=10)
        assert set(r["name"] for r in worker.store.expiring_blobs()) == {"long.bin"}
    finally:
        await server.stop()


def test_an_older_store_gets_the_table(tmp_path):
    path = tmp_path / "dvm.sqlite3"
    Store(path).close()
    import sqlite3
    db = sqlite3.connect(path)
    db.execute("DROP TABLE expiring_blobs")
    db.commit()
    db.close()
    store = Store(path)
    store.add_expiring_blob(server="http://b", sha256="ab" * 32, expires=10.0, name="f")
    store.add_expiring_blob(server="http://b", sha256="ab" * 32, expires=5.0, name="f")   # kept till the later
    assert [(r["expires"], r["attempts"]) for r in store.due_blobs(now=20.0)] == [(10.0, 0)]
    assert store.due_blobs(now=9.0) == []
    store.blob_delete_failed("http://b", "ab" * 32, "HTTP 500", retry_at=30.0)
    assert store.due_blobs(now=20.0) == [] and store.due_blobs(now=30.0)[0]["attempts"] == 1
    store.blob_deleted("http://b", "ab" * 32)
    assert store.expiring_blobs() == []
    store.close()
