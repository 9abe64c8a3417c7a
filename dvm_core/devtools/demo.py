"""`dvm demo`: a whole marketplace on one machine.

A real relay, a Cashu mint and a Blossom blob server on loopback, the worker as its own process
(`dvm run`), and a customer who funds a wallet, then sends two private jobs: a text-stats job
(the example third-party plugin) paid with a token inside the encrypted request, and an
image-classifier job on scikit-learn's digits, priced by the plugin and paid with a nutzap
after the worker asks. The customer checks the trained model on held-out digits.

The core never imports torch: preparing the digits and checking the model run as child
processes (``python -m dvm_image_classifier.digits`` / ``.predict``), as a customer would.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from dvm_core.customer.client import Customer, JobFailed, download_artifacts, result_json, upload_dataset
from dvm_core.protocol.events import Keys
from dvm_core.state.keyfiles import write_key_file
from .localnet import start_blob_server_process, start_mint, start_relay
from dvm_core.protocol.nip90 import HANDLER_KIND, JobInput, Result, parse_handler_announcement

TEXT_STATS_KIND = 5790
PRICE = 5  # sats
IMAGE_CLASSIFIER_KIND = 5750
RATE = 1000  # sats per million sample-epochs: 1438 digits × 10 epochs → 15 sat
EPOCHS = 10
DEMO_TEXT = ("Money in, data out. Providers train models; customers pay in ecash; "
             "relays carry the messages, and nobody holds the money but the mint.")


class Steps:
    def __init__(self):
        self.ok = True
        self.t0 = time.monotonic()

    def say(self, mark: str, text: str) -> None:
        print(f"  [{time.monotonic() - self.t0:6.2f}s] {mark} {text}", flush=True)

    def good(self, text: str) -> None:
        self.say("✓", text)

    def bad(self, text: str) -> None:
        self.ok = False
        self.say("✗", text)


async def run_demo(workdir: str | None = None, verbose: bool = False) -> int:
    temp = workdir is None
    root = Path(workdir or tempfile.mkdtemp(prefix="dvm-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    steps = Steps()
    print("dvm demo: a NIP-90 marketplace on loopback\n")
    relay = worker = mint = blobs = None
    customer_wallet = None
    try:
        relay = start_relay(root / "relay")
        steps.good(f"relay (nostr-relay) listening on {relay.url}")
        mint = start_mint(root / "mint")
        steps.good(f"Cashu mint (Nutshell, FakeWallet Lightning) listening on {mint.url}")
        blobs = start_blob_server_process(root / "blobs")
        steps.good(f"Blossom blob server listening on {blobs.url}")

        provider = Keys.generate()
        write_key_file(root / "provider.key", provider)
        (root / "dvm.toml").write_text(
            f'[dvm]\nname = "Demo DVM"\nrelays = ["{relay.url}"]\nkey_file = "provider.key"\n'
            f'state_dir = "state"\nprogress_interval = 0.5\nlog_format = "json"\n'
            f'mints = ["{mint.url}"]\nblob_servers = ["{blobs.url}"]\n'
            f'allow_private_urls = true  # the demo\'s blob server is on loopback\n'
            f'\n[prices]\n"text-stats" = {PRICE}\n'
            f'\n[plugins.image-classifier]\nsats_per_million_sample_epochs = {RATE}\n')
        log_path = root / "worker.log"
        worker = subprocess.Popen(
            [sys.executable, "-m", "dvm_core.cli", "run", "--config", str(root / "dvm.toml")],
            stdout=None if verbose else open(log_path, "wb"), stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        customer_keys = Keys.generate()
        from dvm_core.payments.wallet import EcashWallet
        customer_wallet = EcashWallet(directory=root / "customer-wallet", accepted_mints=[mint.url],
                                      p2pk_private_key=customer_keys.private_key)
        await customer_wallet.mint_from_lightning(100, mint.url)
        paid = 0
        customer_before = await customer_wallet.total_balance()
        steps.good(f"customer funded a wallet over Lightning: {customer_before} sat")
        async with Customer(customer_keys, [relay.url]) as customer:
            kinds = await _wait_announcement(customer, provider.public_key, worker, timeout=60)
            if kinds is None:
                steps.bad(f"the worker did not announce itself; see {log_path}")
                return 1
            steps.good(f"provider {provider.npub[:20]}… is up and announces kinds {kinds} (NIP-89)")
            if TEXT_STATS_KIND not in kinds:
                steps.bad(f"kind {TEXT_STATS_KIND} (text-stats) is not served: install examples/dvm-textstats")
                return 1

            dataset = root / "dataset.txt"
            dataset.write_text(DEMO_TEXT)
            data_url = await upload_dataset(dataset, [blobs.url], customer_keys, encrypt=True)
            steps.good("customer uploaded its dataset to the blob server, encrypted with a fresh key")
            token = await customer_wallet.send(PRICE, mint=mint.url)
            request = await customer.submit(
                TEXT_STATS_KIND, [JobInput(data_url, "url")],
                {"top": "3", "work_seconds": "1", "counts_file": "yes"},
                provider=provider.public_key, encrypt="nip44", cashu=token)
            steps.good(f"customer {customer_keys.npub[:20]}… sent job {request['id'][:12]}… "
                       f"with a {PRICE} sat token (params, data key and token NIP-44-encrypted)")
            try:
                result = await customer.result(
                    request, timeout=60,
                    on_feedback=lambda f: steps.say("…", f"feedback: {f.status} {f.message}".rstrip()))
            except (JobFailed, TimeoutError) as exc:
                steps.bad(f"the job failed: {exc}")
                return 1
            stats = result_json(result)
            expected = len(re.findall(r"\w+", DEMO_TEXT.lower()))
            top = Counter(re.findall(r"\w+", DEMO_TEXT.lower())).most_common(1)[0]
            if result.encrypted and stats["words"] == expected and tuple(stats["top_words"][0]) == top:
                steps.good(f"result received (encrypted, kind {result.event['kind']}): "
                           f"{stats['words']} words, top words {stats['top_words']}")
            else:
                steps.bad(f"unexpected result: {stats}")
            saved = await download_artifacts(result, root / "result", allow_private=True)
            counts = saved[0].read_text().splitlines() if saved else []
            if saved and counts[0] == "word,count" and counts[1] == f"{top[0]},{top[1]}":
                steps.good(f"result file {saved[0].name} downloaded, sha256 verified and decrypted "
                           f"({len(counts) - 1} words counted)")
            else:
                steps.bad(f"result file missing or wrong: {saved}")
            paid = PRICE
            if IMAGE_CLASSIFIER_KIND in kinds:
                paid += await _train_digits(steps, root, customer, customer_wallet, provider, blobs)
            else:
                steps.bad(f"kind {IMAGE_CLASSIFIER_KIND} (image-classifier) is not served: "
                          "install the train extra (pip install 'dvm-worker[train]')")
        worker.terminate()
        code = worker.wait(30)
        if code == 0:
            steps.good("worker stopped cleanly on SIGTERM")
        else:
            steps.bad(f"worker exited with {code}; see {log_path}")
        customer_after = await customer_wallet.total_balance()
        async with EcashWallet(directory=root / "state" / "wallet", accepted_mints=[mint.url]) as earned:
            provider_after = await earned.total_balance()
        line = (f"balances: customer {customer_before} → {customer_after} sat, "
                f"provider 0 → {provider_after} sat")
        if customer_before - customer_after == paid and provider_after == paid:
            steps.good(line)
        else:
            steps.bad(line)
    except Exception as exc:
        steps.bad(f"demo failed: {type(exc).__name__}: {exc}")
    finally:
        if worker is not None and worker.poll() is None:
            worker.kill()
        if customer_wallet is not None:
            await customer_wallet.close()
        if relay is not None:
            relay.stop()
        if mint is not None:
            mint.stop()
        if blobs is not None:
            blobs.stop()
        if temp and steps.ok:
            shutil.rmtree(root, ignore_errors=True)
    print(f"\n{'demo succeeded' if steps.ok else 'demo FAILED (files kept in ' + str(root) + ')'}"
          f" in {time.monotonic() - steps.t0:.1f}s")
    return 0 if steps.ok else 1


async def _train_digits(steps: Steps, root: Path, customer: Customer, wallet, provider: Keys, blobs) -> int:
    """The image-classifier job; returns what it cost."""
    digits = root / "digits"
    made = subprocess.run([sys.executable, "-m", "dvm_image_classifier.digits", "--out", str(digits)],
                          capture_output=True, text=True)
    if made.returncode != 0:
        steps.bad(f"could not write the digits: {made.stderr.strip()[-300:]}")
        return 0
    data_url = await upload_dataset(digits / "digits_train.npz", [blobs.url], customer.keys, encrypt=True)
    samples = 1438
    request = await customer.submit(
        IMAGE_CLASSIFIER_KIND, [JobInput(data_url, "url")], {"epochs": str(EPOCHS), "samples": str(samples)},
        provider=provider.public_key, encrypt="nip44")
    steps.good(f"customer sent image-classifier job {request['id'][:12]}… ({samples} digits, "
               f"{EPOCHS} epochs), encrypted, with no payment yet")
    cost, result = 0, None
    try:
        async for update in customer.updates(request, timeout=300):
            if isinstance(update, Result):
                result = update
                break
            if update.status == "payment-required":
                cost = (update.amount_msats or 0) // 1000
                await customer.pay_with_nutzap(request, update, wallet)
                steps.good(f"the worker priced it at {cost} sat ({RATE} sats per million sample-epochs); "
                           "customer paid with a NIP-61 nutzap")
            elif update.status == "error":
                steps.bad(f"the job failed: {update.message}")
                return cost
            else:
                steps.say("…", f"feedback: {update.status} {update.message}".rstrip())
    except TimeoutError as exc:
        steps.bad(f"the job failed: {exc}")
        return cost
    summary = result_json(result)
    saved = {p.name: p for p in await download_artifacts(result, root / "model", allow_private=True)}
    if not {"model.safetensors", "model_card.json", "training_curves.png"} <= set(saved):
        steps.bad(f"the model's files are missing: {sorted(saved)}")
        return cost
    steps.good(f"model received (kind {result.event['kind']}): " + ", ".join(sorted(saved))
               + f"; validation accuracy {summary.get('val_accuracy', 0):.3f}")
    checked = subprocess.run(
        [sys.executable, "-m", "dvm_image_classifier.predict", str(saved["model.safetensors"]),
         str(saved["model_card.json"]), "--test", str(digits / "digits_test.npz")], capture_output=True, text=True)
    if checked.returncode != 0:
        steps.bad(f"could not check the model: {checked.stderr.strip()[-300:]}")
        return cost
    score = json.loads(checked.stdout.strip().splitlines()[-1])
    line = f"held-out accuracy {score['accuracy']:.3f} on {score['samples']} digits the worker never saw"
    (steps.good if score["accuracy"] >= 0.9 else steps.bad)(line)
    return cost


async def _wait_announcement(customer: Customer, pubkey: str, worker, timeout: float) -> list[int] | None:
    found: asyncio.Future = asyncio.get_running_loop().create_future()

    def on_event(event, relay):
        if event["kind"] == HANDLER_KIND and event["pubkey"] == pubkey and not found.done():
            found.set_result(parse_handler_announcement(event)[1])

    customer.pool.set_handler(lambda e, r: on_event(e, r) or customer._on_event(e, r))
    await customer.pool.subscribe("announce", [{"kinds": [HANDLER_KIND], "authors": [pubkey]}])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and worker.poll() is None:
        try:
            return await asyncio.wait_for(asyncio.shield(found), 0.5)
        except asyncio.TimeoutError:
            continue
    return None
