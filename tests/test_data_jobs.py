"""Datasets and results by URL + sha256 through a real Blossom server, end to end: private
jobs stay private on a public blob server; bad data references fail clearly, before payment
where they can."""

from __future__ import annotations

import asyncio
import csv
import hashlib
import json

import httpx
import pytest

from dvm_core.devtools.blobserver import start_blob_server
from dvm_core.transport.blossom import BlossomClient
from dvm_core.customer.client import JobFailed, download_artifacts, result_json, upload_dataset
from dvm_core.datarefs import DataRef
from dvm_core.protocol.nip90 import JobInput

KIND = 5790
TEXT = "the quick brown fox jumps over the lazy dog the end"


@pytest.fixture
async def html_site():
    """A web server answering every path with an HTML error page."""
    from aiohttp import web
    async def page(request):
        return web.Response(text="<html>Not here</html>", content_type="text/html")

    app = web.Application()
    app.router.add_get("/{tail:.*}", page)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


@pytest.fixture
async def blobs(tmp_path):
    server = await start_blob_server(tmp_path / "blobs")
    yield server
    await server.stop()


async def data_worker(workers, blobs, **settings):
    return await workers.start(blob_servers=[blobs.url], allow_private_urls=True, **settings)


async def test_private_job_moves_encrypted_data_both_ways(workers, customer, blobs, tmp_path):
    worker = await data_worker(workers, blobs)
    dataset = tmp_path / "words.txt"
    dataset.write_text(TEXT)
    url = await upload_dataset(dataset, [blobs.url], customer.keys, encrypt=True)
    assert "key=" in url
    request = await customer.submit(KIND, [JobInput(url, "url")], {"counts_file": "yes"},
                                    provider=worker.keys.public_key, encrypt="nip44")
    data_key = url.split("key=")[1]
    assert data_key not in json.dumps(request)  # the data key travels only inside the ciphertext
    result = await customer.result(request, timeout=30)
    stats = result_json(result)
    assert stats["words"] == 11
    artifact = stats["artifacts"][0]
    assert artifact["encrypted"] and artifact["key"] and artifact["type"] == "text/csv"
    assert artifact["key"] not in json.dumps(result.event)  # the result event itself is encrypted

    async with httpx.AsyncClient() as http:
        stored = (await http.get(artifact["url"])).content
        stored_input = (await http.get(url.split("#")[0])).content
    assert b"word,count" not in stored and b"quick" not in stored_input  # ciphertext at rest
    assert hashlib.sha256(stored).hexdigest() == artifact["sha256"]

    saved = await download_artifacts(result, tmp_path / "out", allow_private=True)
    rows = list(csv.reader(saved[0].open()))
    assert rows[0] == ["word", "count"] and rows[1] == ["the", "3"]


async def test_public_job_gets_plain_result_files(workers, customer, blobs, tmp_path):
    worker = await data_worker(workers, blobs)
    dataset = tmp_path / "words.txt"
    dataset.write_text(TEXT)
    url = await upload_dataset(dataset, [blobs.url], customer.keys, encrypt=False)
    request = await customer.submit(KIND, [JobInput(url, "url")], {"counts_file": "yes"},
                                    provider=worker.keys.public_key, encrypt=None)
    result = await customer.result(request, timeout=30)
    artifact = result_json(result)["artifacts"][0]
    assert "key" not in artifact and not artifact.get("encrypted")
    saved = await download_artifacts(result, tmp_path / "out", allow_private=True)
    assert saved[0].read_text().startswith("word,count")


async def test_result_upload_falls_over_to_the_next_blob_server(workers, customer, blobs, tmp_path):
    worker = await workers.start(blob_servers=["http://127.0.0.1:9", blobs.url], allow_private_urls=True)
    request = await customer.submit(KIND, [JobInput(TEXT, "text")], {"counts_file": "yes"},
                                    provider=worker.keys.public_key)
    result = await customer.result(request, timeout=30)
    assert result_json(result)["artifacts"][0]["url"].startswith(blobs.url)


async def test_blob_server_refusing_the_upload_fails_the_job_clearly(workers, customer, tmp_path):
    strict = await start_blob_server(tmp_path / "strict", allowed_pubkeys=["f" * 64])
    try:
        worker = await workers.start(blob_servers=[strict.url])
        request = await customer.submit(KIND, [JobInput(TEXT, "text")], {"counts_file": "yes"},
                                        provider=worker.keys.public_key)
        with pytest.raises(JobFailed, match="could not upload the result files"):
            await customer.result(request, timeout=30)
    finally:
        await strict.stop()


async def upload_plain(blobs, keys, data: bytes) -> str:
    blob = await BlossomClient([blobs.url], keys).upload(data, "text/plain")
    return blob.url


@pytest.mark.parametrize("case", ["no-sha256", "unreachable", "html-page", "too-large", "private-address"])
async def test_bad_data_references_are_refused_before_payment(workers, customer, blobs, mint, html_site,
                                                              tmp_path, case):
    from dvm_core.payments.wallet import EcashWallet
    allow_private = case != "private-address"
    worker = await workers.start(blob_servers=[blobs.url], allow_private_urls=allow_private,
                                 max_download_bytes=1000, mints=[mint.url], prices={"text-stats": 2})
    good = await upload_plain(blobs, customer.keys, b"some words")
    url, expected = {
        "no-sha256": ("http://127.0.0.1:1/data.txt", "give the sha256 of the data"),
        "unreachable": (f"http://127.0.0.1:9/data.txt#sha256={'a' * 64}", "cannot connect"),
        "html-page": (f"{html_site}/data.npz#sha256={'a' * 64}", "HTML page"),
        "too-large": (await upload_plain(blobs, customer.keys, b"x" * 5000), "more than the 1000 bytes allowed"),
        "private-address": (good, "loopback"),
    }[case]
    wallet = EcashWallet(directory=tmp_path / "w", accepted_mints=[mint.url])
    await wallet.mint_from_lightning(2, mint.url)
    token = await wallet.send(2, mint=mint.url)
    try:
        request = await customer.submit(KIND, [JobInput(url, "url")], {}, provider=worker.keys.public_key,
                                        cashu=token)
        with pytest.raises(JobFailed, match=expected):
            await customer.result(request, timeout=30)
        assert await wallet.check_spent(token) is False  # no payment taken
        assert await worker.cashier.wallet.total_balance() == 0
    finally:
        await wallet.close()


async def test_sha256_mismatch_after_payment_is_refunded(workers, customer, blobs, mint, tmp_path):
    from dvm_core.payments.wallet import EcashWallet
    worker = await workers.start(blob_servers=[blobs.url], allow_private_urls=True, mints=[mint.url],
                                 prices={"text-stats": 2})
    url = await upload_plain(blobs, customer.keys, b"real words")
    lying = DataRef(url.rsplit("/", 1)[0] + "/" + url.rsplit("/", 1)[1], "b" * 64).to_url()
    wallet = EcashWallet(directory=tmp_path / "w", accepted_mints=[mint.url],
                         p2pk_private_key=customer.keys.private_key)
    await wallet.mint_from_lightning(2, mint.url)
    try:
        request = await customer.submit(KIND, [JobInput(lying, "url")], {}, provider=worker.keys.public_key,
                                        cashu=await wallet.send(2, mint=mint.url))
        with pytest.raises(JobFailed, match="sha256 is .* not the expected"):
            await customer.result(request, timeout=30)
        assert worker.store.payment_for_job(request["id"])["state"] == "refunded"
    finally:
        await wallet.close()


@pytest.mark.parametrize("damage", ["wrong-key", "corrupt-ciphertext"])
async def test_undecryptable_private_dataset_fails_clearly(workers, customer, blobs, tmp_path, damage):
    from dvm_core.transport.blobcrypt import encrypt_bytes, generate_key
    worker = await data_worker(workers, blobs)
    sealed, key = encrypt_bytes(TEXT.encode())
    if damage == "corrupt-ciphertext":
        sealed = sealed[:40] + bytes([sealed[40] ^ 1]) + sealed[41:]
    else:
        key = generate_key()
    blob = await BlossomClient([blobs.url], customer.keys).upload(sealed, "application/octet-stream")
    request = await customer.submit(KIND, [JobInput(DataRef(blob.url, blob.sha256, key).to_url(), "url")], {},
                                    provider=worker.keys.public_key)
    with pytest.raises(JobFailed, match="could not decrypt"):
        await customer.result(request, timeout=30)


async def test_dvm_job_submit_uploads_follows_and_saves_the_result(workers, relay, blobs, tmp_path):
    import sys
    worker = await data_worker(workers, blobs)
    dataset = tmp_path / "words.txt"
    dataset.write_text(TEXT)
    out = tmp_path / "out"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dvm_core.cli", "job", "submit", "--relay", relay.url,
        "--dvm", worker.keys.npub, "--kind", str(KIND), "--file", str(dataset), "--blossom", blobs.url,
        "--param", "counts_file=yes", "--param", "work_seconds=1", "--out", str(out), "--allow-private",
        "--timeout", "60", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 90)
    log = stderr.decode()
    assert proc.returncode == 0, log
    assert "uploaded" in log and "(encrypted)" in log
    assert "[####" in log  # the progress bar
    assert "sha256 verified, decrypted" in log
    assert json.loads(stdout)["words"] == 11
    assert (out / "word_counts.csv").read_text().startswith("word,count")
    assert json.loads((out / "result.json").read_text())["words"] == 11
    # What was ordered is kept beside it (for `dvm verify`), private: its URL holds the file's key.
    order = json.loads((out / "request.json").read_text())
    assert order["kind"] == KIND and order["params"] == {"counts_file": "yes", "work_seconds": "1"}
    assert order["provider"] == worker.keys.public_key and len(order["id"]) == 64
    assert [i["type"] for i in order["inputs"]] == ["url"] and "#" in order["inputs"][0]["data"]
    assert (out / "request.json").stat().st_mode & 0o777 == 0o600


@pytest.fixture
async def flaky_site():
    """Serves one file; `site.failures` requests after the first (the probe) answer 503."""
    from types import SimpleNamespace

    from aiohttp import web
    body = b"words from a flaky server"
    site = SimpleNamespace(failures=0, served=0, url="", sha256=hashlib.sha256(body).hexdigest())

    async def handler(request):
        site.served += 1
        if site.served > 1 and site.failures > 0:
            site.failures -= 1
            return web.Response(status=503, text="busy")
        return web.Response(body=body, content_type="application/octet-stream")

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    tcp = web.TCPSite(runner, "127.0.0.1", 0)
    await tcp.start()
    site.url = f"http://127.0.0.1:{tcp._server.sockets[0].getsockname()[1]}/data.txt#sha256={site.sha256}"
    yield site
    await runner.cleanup()


@pytest.mark.parametrize("failures,outcome", [(2, "done"), (100, "refunded")])
async def test_an_input_server_down_after_payment_is_tried_again_then_refunded(
        workers, customer, mint, flaky_site, tmp_path, failures, outcome):
    """Once paid, an input that does not come is tried again (3 tries); if it never comes, the
    job is refunded, never kept."""
    from dvm_core.payments.wallet import EcashWallet
    worker = await workers.start(allow_private_urls=True, mints=[mint.url], prices={"text-stats": 2})
    wallet = EcashWallet(directory=tmp_path / "w", accepted_mints=[mint.url],
                         p2pk_private_key=customer.keys.private_key)
    await wallet.mint_from_lightning(2, mint.url)
    flaky_site.failures = failures
    try:
        request = await customer.submit(KIND, [JobInput(flaky_site.url, "url")], {},
                                        provider=worker.keys.public_key,
                                        cashu=await wallet.send(2, mint=mint.url))
        if outcome == "done":
            assert result_json(await customer.result(request, timeout=40))["words"] == 5
            assert worker.store.payment_for_job(request["id"])["state"] == "consumed"
        else:
            with pytest.raises(JobFailed, match="after 3 tries.*refunded as a nutzap"):
                await customer.result(request, timeout=40)
            assert worker.store.payment_for_job(request["id"])["state"] == "refunded"
    finally:
        await wallet.close()


async def _cli(*args: str, timeout: float = 90) -> tuple[int, str, str]:
    import sys
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "dvm_core.cli", *args,
                                                stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode, out.decode(), err.decode()


async def test_dvm_job_fetch_recovers_a_result_whose_download_failed(workers, relay, blobs, tmp_path):
    """The result's files are refused by the customer's own setting (a loopback blob server
    without --allow-private): one clear line, a non-zero exit, and the saved key finds the job
    again for `dvm job status` and `dvm job fetch`."""
    worker = await data_worker(workers, blobs)
    dataset = tmp_path / "words.txt"
    dataset.write_text(TEXT)
    out = tmp_path / "out"
    code, stdout, err = await _cli(
        "job", "submit", "--relay", relay.url, "--dvm", worker.keys.npub, "--kind", str(KIND),
        "--file-as", "training", str(dataset), "--blossom", blobs.url, "--param", "counts_file=yes",
        "--out", str(out), "--timeout", "60", "--json")
    assert code == 5, err
    assert "Traceback" not in err and "could not be downloaded" in err and "dvm job fetch" in err, err
    job_id = json.loads(stdout.strip().splitlines()[-1])["job_id"]
    key = out / "customer.nsec"
    assert key.is_file() and oct(key.stat().st_mode & 0o777) == "0o600"
    request = worker.store.get_job(job_id).request
    assert request["tags"][0] == ["encrypted"]   # the marker travelled inside the encrypted params
    code, stdout, err = await _cli("job", "status", job_id, "--relay", relay.url, "--key", str(key))
    assert code == 0 and f"job {job_id} (kind {KIND}): succeeded" in stdout, err
    again = tmp_path / "again"
    code, stdout, err = await _cli("job", "fetch", job_id, "--relay", relay.url, "--key", str(key),
                                   "--out", str(again), "--allow-private")
    assert code == 0, err
    rows = list(csv.reader((again / "word_counts.csv").read_text().splitlines()))
    assert ["the", "3"] in rows, rows


async def test_a_paid_job_that_fails_on_the_customers_data_is_refunded_less_the_announced_fee(
        workers, customer, blobs, mint, tmp_path):
    from dvm_core.transport.blobcrypt import encrypt_bytes, generate_key
    from dvm_core.payments.wallet import EcashWallet
    worker = await workers.start(blob_servers=[blobs.url], allow_private_urls=True, mints=[mint.url],
                                 prices={"text-stats": 3}, input_error_fee=1)
    assert json.loads(worker.announcement()[1])["payment"]["input_error_fee"] == 1
    sealed, _ = encrypt_bytes(TEXT.encode())
    blob = await BlossomClient([blobs.url], customer.keys).upload(sealed, "application/octet-stream")
    wrong_key = DataRef(blob.url, blob.sha256, generate_key()).to_url()
    wallet = EcashWallet(directory=tmp_path / "w", accepted_mints=[mint.url],
                         p2pk_private_key=customer.keys.private_key)
    await wallet.mint_from_lightning(3, mint.url)
    try:
        request = await customer.submit(KIND, [JobInput(wrong_key, "url")], {}, provider=worker.keys.public_key,
                                        cashu=await wallet.send(3, mint=mint.url))
        with pytest.raises(JobFailed, match="could not decrypt.*your 2 sat were refunded"):
            await customer.result(request, timeout=30)
        for _ in range(100):
            payouts = worker.store.payouts(request["id"])
            if payouts and payouts[0]["state"] == "sent":
                break
            await asyncio.sleep(0.1)
        assert [(p["role"], p["amount"], p["state"]) for p in payouts] == [("refund", 2, "sent")]
        assert await worker.cashier.wallet.total_balance() == 1
    finally:
        await wallet.close()


async def test_a_result_cannot_fill_the_customers_disk(customer, blobs, tmp_path):
    """Files listed in a result count against one total: past it, nothing more is downloaded."""
    from dvm_core.protocol.nip90 import Result
    from dvm_core.transport.blossom import BlossomClient
    from dvm_core.transport.fetch import FetchError

    entries = []
    for i in range(3):
        path = tmp_path / f"part{i}.bin"
        path.write_bytes(bytes([i]) * 600)
        blob = await BlossomClient([blobs.url], customer.keys).upload(path, "application/octet-stream")
        entries.append({"name": path.name, "url": blob.url, "sha256": blob.sha256, "size": blob.size})
    result = Result("ab" * 32, "cd" * 32, json.dumps({"artifacts": entries}), None, False)
    with pytest.raises(FetchError):   # the second file would pass 1,000 bytes in all
        await download_artifacts(result, tmp_path / "out", allow_private=True, max_total_bytes=1000)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["part0.bin"]
    saved = await download_artifacts(result, tmp_path / "all", allow_private=True, max_total_bytes=1800)
    assert [p.stat().st_size for p in saved] == [600, 600, 600]
