"""The image classifier as a customer meets it: scikit-learn's digits sent as a private job over
a real relay, priced by the plugin, paid with a nutzap through a real mint, the model fetched
from a real blob server, decrypted, loaded and checked on held-out digits."""

from __future__ import annotations

import json
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from dvm_core.devtools.blobserver import start_blob_server  # noqa: E402
from dvm_core.customer.client import download_artifacts, upload_dataset  # noqa: E402
from dvm_core.protocol.nip90 import HANDLER_KIND, JobInput, Result, parse_handler_announcement  # noqa: E402
from dvm_core.worker.plugins import plugin_manager  # noqa: E402

from .paying import close_customer, funded_customer, provider_balance  # noqa: E402

from dvm_image_classifier.digits import digits_split  # noqa: E402

KIND = 5750
RATE = 1000  # sats per million sample-epochs: 1438 images × 10 epochs → 15 sat


@pytest.fixture
async def blobs(tmp_path):
    server = await start_blob_server(tmp_path / "blobs")
    yield server
    await server.stop()


async def test_digits_job_paid_over_relay_and_mint_reaches_090(workers, mint, relay, blobs, tmp_path):
    from dvm_image_classifier.predict import load_model

    worker = await workers.start(
        pm=plugin_manager(only=["image-classifier"]), mints=[mint.url], blob_servers=[blobs.url],
        allow_private_urls=True, plugins={"image-classifier": {"sats_per_million_sample_epochs": RATE}})
    customer = await funded_customer(tmp_path, mint.url, relay.url)
    try:
        # The announcement says how this kind is priced, not a fixed price it would not ask.
        announced = await customer.pool.query(
            [{"kinds": [HANDLER_KIND], "authors": [worker.keys.public_key]}], timeout=5)
        content = json.loads(announced[-1]["content"])
        assert KIND in parse_handler_announcement(announced[-1])[1]
        assert "image-classifier" not in content["payment"]["prices"]
        assert f"{RATE:g} sats per million sample-epochs" in content["payment"]["pricing"]["image-classifier"]

        x_train, y_train, x_test, y_test = digits_split(0)
        dataset = tmp_path / "digits_train.npz"
        np.savez(dataset, x=x_train, y=y_train)
        url = await upload_dataset(dataset, [blobs.url], customer.keys, encrypt=True)
        request = await customer.submit(KIND, [JobInput(url, "url")],
                                        {"epochs": "10", "samples": str(len(y_train))},
                                        provider=worker.keys.public_key)
        price = -(-len(y_train) * 10 * RATE // 1_000_000)  # rounded up: 14.38 → 15 sat
        statuses, progress, result = [], [], None
        async for update in customer.updates(request, timeout=180):
            if isinstance(update, Result):
                result = update
                break
            statuses.append(update.status)
            assert update.status != "error", update.message
            if update.status == "payment-required":
                assert update.amount_msats == price * 1000
                await customer.pay_with_nutzap(request, update, customer.wallet)
            if update.status == "processing" and update.progress is not None:
                progress.append((update.progress, update.message))
        assert result is not None and result.encrypted
        assert statuses[0] == "payment-required" and "processing" in statuses
        # Per-epoch progress with metrics, rate-limited: never more than one per epoch.
        epochs = [m for _, m in progress if " epoch " in m]
        assert all(0 <= p <= 100 for p, _ in progress) and [p for p, _ in progress] == sorted(p for p, _ in progress)
        assert 1 <= len(epochs) <= 10 and all("loss" in m and "val_acc" in m for m in epochs), progress

        summary = json.loads(result.content)
        saved = {p.name: p for p in await download_artifacts(result, tmp_path / "result", allow_private=True)}
        assert set(saved) == {"model.safetensors", "model_card.json", "README.md", "training_curves.png",
                              "confusion_matrix.png"}
        card = json.loads(saved["model_card.json"].read_text())
        import hashlib
        plain = hashlib.sha256(dataset.read_bytes()).hexdigest()
        assert card["datasets"]["train"]["sha256"] in (plain, url.rsplit("/", 1)[-1][:64])
        model, preprocess = load_model(saved["model.safetensors"], saved["model_card.json"])
        with torch.no_grad():
            predicted = model(preprocess(x_test)).argmax(1).numpy()
        names = np.array([int(n) for n in preprocess.classes])
        accuracy = float((names[predicted] == y_test).mean())
        assert accuracy >= 0.90, (accuracy, summary)
        assert await provider_balance(worker) == price
    finally:
        await close_customer(customer)


async def test_the_price_is_the_rate_times_the_images_sent_and_bad_files_cost_nothing(
        workers, mint, relay, blobs, tmp_path):
    """Without a `samples` param the worker counts the images before it asks (not the provider's
    maximum), and data it cannot train on is refused before anything is paid."""
    worker = await workers.start(
        pm=plugin_manager(only=["image-classifier"]), mints=[mint.url], blob_servers=[blobs.url],
        allow_private_urls=True, plugins={"image-classifier": {"sats_per_million_sample_epochs": RATE}})
    customer = await funded_customer(tmp_path, mint.url, relay.url)
    try:
        x_train, y_train, _, _ = digits_split(0)
        good = tmp_path / "good.npz"
        np.savez(good, x=x_train, y=y_train)
        url = await upload_dataset(good, [blobs.url], customer.keys, encrypt=True)
        request = await customer.submit(KIND, [JobInput(url, "url")], {"epochs": "10"},
                                        provider=worker.keys.public_key)
        asked = await anext(customer.updates(request, timeout=60))
        assert asked.status == "payment-required", asked
        assert asked.amount_msats == -(-len(y_train) * 10 * RATE // 1_000_000) * 1000  # 15 sat, not 2000
        await customer.cancel(request)

        bad = {
            "text.txt": b"not images at all\n",
            "truncated.npz": good.read_bytes()[: len(good.read_bytes()) // 2],
        }
        np.savez(tmp_path / "no_labels.npz", x=x_train)
        np.savez(tmp_path / "other_names.npz", images=x_train, labels=y_train)
        np.savez(tmp_path / "one_class.npz", x=x_train[:50], y=np.zeros(50, dtype=np.int64))
        for name in ("no_labels.npz", "other_names.npz", "one_class.npz"):
            bad[name] = (tmp_path / name).read_bytes()
        before = await customer.wallet.total_balance()
        for name, data in bad.items():
            path = tmp_path / name
            path.write_bytes(data)
            url = await upload_dataset(path, [blobs.url], customer.keys, encrypt=True)
            request = await customer.submit(KIND, [JobInput(url, "url")], {"epochs": "10"},
                                            provider=worker.keys.public_key)
            first = await anext(customer.updates(request, timeout=60))
            assert first.status == "error", (name, first)
            assert first.message and "internal error" not in first.message, (name, first.message)
            if name == "other_names.npz":
                assert "no array 'x'" in first.message and "images, labels" in first.message, first.message
        assert await customer.wallet.total_balance() == before
        assert await provider_balance(worker) == 0
    finally:
        await close_customer(customer)


async def test_dvm_job_submit_checks_the_files_here_before_uploading(relay, blobs, tmp_path):
    """The image classifier is installed on the customer's side too: its own checks run on the
    local file first, and a set it cannot train on is never uploaded, let alone paid for."""
    import asyncio
    import sys
    x_train, _, _, _ = digits_split(0)
    one_class = tmp_path / "one_class.npz"
    np.savez(one_class, x=x_train[:50], y=np.zeros(50, dtype=np.int64))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dvm_core.cli", "job", "submit", "--relay", relay.url,
        "--dvm", "ab" * 32, "--kind", str(KIND), "--file", str(one_class), "--blossom", blobs.url,
        "--out", str(tmp_path / "out"), stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode != 0
    assert "not sent:" in err.decode() and "at least two" in err.decode(), err.decode()
    assert "uploaded" not in err.decode()   # nothing left this machine
