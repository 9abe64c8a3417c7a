"""`dvm federate`: federated rounds across DVMs, from the customer's side (see `federate`).

Two ways to run it:

- against real providers: ``dvm federate --relay wss://… --provider npub1… --provider npub1…
  --train train.npz --test test.npz --blossom https://… --wallet-dir wallet --mint https://…``;
- all on this machine: ``dvm federate --local 3`` starts a relay, a Cashu mint (FakeWallet), a
  blob server and three providers (``dvm run`` processes, three keys), funds a customer wallet,
  and federates scikit-learn's digits (unless ``--train``/``--test`` are given).

``--task llm`` federates fine-tuning of a language model (kind 5751) instead: LoRA adapters
merged exactly (`llm`), or with ``--mode diloco`` the whole model, pseudo-gradients and an outer
Nesterov step (`diloco`). ``--train``/``--test`` are JSONL sets and ``--model`` a model folder;
with ``--local N`` and none of them, a tiny GPT-2 and a toy corpus built here (`tiny`).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import click

LOCAL_RATE = 1000  # sats per million sample-epochs on the local providers
LOCAL_LLM_RATE = 100  # sats per million tokens on the local LLM providers


@click.command("federate")
@click.option("--task", type=click.Choice(["image", "llm"]), default="image", show_default=True,
              help="image: the image classifier (kind 5750, .npz sets); llm: LoRA fine-tuning of a "
                   "language model (kind 5751, JSONL sets, --model), the adapters merged exactly each round.")
@click.option("--local", type=click.IntRange(1, 16), help="Start this many providers on this machine, "
              "with a relay, a mint and a blob server, and federate with them.")
@click.option("--relay", "relays", multiple=True, help="Relay URL (repeatable).")
@click.option("--provider", "providers", multiple=True, help="A provider's npub or hex key (repeatable).")
@click.option("--train", type=click.Path(exists=True, dir_okay=False),
              help="Training set (.npz: x, y[, classes]; with --task llm: JSONL).")
@click.option("--test", type=click.Path(exists=True, dir_okay=False),
              help="Held-out set to evaluate on (.npz; with --task llm: JSONL).")
@click.option("--model", "model_dir", type=click.Path(exists=True, file_okay=False),
              help="--task llm: the base model folder (config.json, safetensors weights, tokenizer files).")
@click.option("--mode", type=click.Choice(["lora", "diloco"]), default="lora", show_default=True,
              help="--task llm: lora (fresh adapters merged exactly each round) or diloco (the whole model: "
                   "H inner AdamW steps per provider, the pseudo-gradients averaged, an outer Nesterov step here).")
@click.option("--inner-steps", type=click.IntRange(1, 10**6), default=20, show_default=True,
              help="--mode diloco: H, each provider's optimizer steps per round.")
@click.option("--outer-lr", type=click.FloatRange(0, 10, min_open=True), default=0.7, show_default=True,
              help="--mode diloco: the outer learning rate (1 with --outer-momentum 0: plain averaging).")
@click.option("--outer-momentum", type=click.FloatRange(0, 1, max_open=True), default=0.9, show_default=True,
              help="--mode diloco: the outer Nesterov momentum, kept across rounds and restarts.")
@click.option("--compression", type=click.Choice(["none", "bf16", "int8"]), default="none", show_default=True,
              help="--mode diloco: how the providers send their pseudo-gradients (int8: about a quarter "
                   "of the bytes).")
@click.option("--restart", is_flag=True, help="--task llm: start over even if --out holds finished rounds "
              "(by default a run goes on after the last round finished there).")
@click.option("--lora-r", type=click.IntRange(1, 1024), default=8, show_default=True, help="--task llm: LoRA rank.")
@click.option("--lora-alpha", type=float, default=16, show_default=True, help="--task llm: LoRA alpha.")
@click.option("--max-seq-length", type=click.IntRange(8, 1 << 20), default=256, show_default=True,
              help="--task llm: tokens per sequence.")
@click.option("--target-modules", help="--task llm: comma-separated layers LoRA adapts (default: the plugin's).")
@click.option("--blossom", "servers", multiple=True, help="Blob server for the shards and weights (repeatable).")
@click.option("--wallet-dir", type=click.Path(file_okay=False), help="The wallet that pays the providers.")
@click.option("--mint", "mints", multiple=True, help="The wallet's mint(s).")
@click.option("--key", "key_file", type=click.Path(dir_okay=False), help="Your nsec key file (default: a fresh key).")
@click.option("--rounds", type=click.IntRange(1, 1000), default=3, show_default=True)
@click.option("--epochs", type=click.IntRange(1, 1000), default=2, show_default=True, help="Local epochs per round.")
@click.option("--batch-size", type=click.IntRange(2, 4096), default=32, show_default=True)
@click.option("--learning-rate", type=float, help="Providers' learning rate (default: the plugin's).")
@click.option("--split", type=click.Choice(["iid", "label"]), default="iid", show_default=True,
              help="IID shards, or non-IID by label (each provider sees a few classes).")
@click.option("--method", type=click.Choice(["fedavg", "median", "trimmed_mean", "krum", "multi_krum"]),
              default="fedavg", show_default=True, help="How updates are merged.")
@click.option("--trim-ratio", type=float, default=0.2, show_default=True)
@click.option("--krum-f", type=int, default=1, show_default=True, help="Faulty providers Krum tolerates.")
@click.option("--clip-norm", type=float, help="Clip each update's norm against the global model.")
@click.option("--merge-dvm", help="Merge through this DVM (a kind-5752 job) instead of locally.")
@click.option("--max-price", type=int, default=1000, show_default=True, help="Most sats paid per job.")
@click.option("--pay-on-delivery", is_flag=True,
              help="Pay each provider only once its update is ready, with ecash it can redeem only by "
                   "revealing the key to the sealed update (NUT-14 HTLC).")
@click.option("--bonus", type=click.IntRange(0, 10**9), default=0, show_default=True,
              help="Sats per round shared among the merged updates by their scores (a nutzap to each; "
                   "providers collect it with `dvm wallet collect`).")
@click.option("--attack", "attacks", multiple=True, metavar="MODE:N",
              help="With --local: provider N (0, 1, … as the shard lines number them) cheats, its update "
                   "rewritten as it arrives: "
                   "lazy, sign-flip, noise, scaled or copy (of the first update). Repeatable.")
@click.option("--publish-verdicts", is_flag=True,
              help="Publish a signed verdict (NIP-32 label, kind 1985) on each provider whose update is left out.")
@click.option("--trust", "trusted", multiple=True, metavar="KEY",
              help="Skip providers with a negative verdict signed by this key (npub or hex; `self` for "
                   "yours). Repeatable.")
@click.option("--no-score", is_flag=True, help="Merge every update that came back, unscored.")
@click.option("--job-timeout", type=float, default=600, show_default=True, help="Seconds before a provider is dropped.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(file_okay=False), default="federation", show_default=True,
              help="Where the global models, rounds.json and accuracy.png go.")
@click.option("--allow-private", is_flag=True, help="Allow downloads from loopback/private addresses.")
@click.option("--compare", default="", metavar="METHOD,...",
              help="Also merge each round's updates with these methods (e.g. median,krum) and report and "
                   "plot their held-out accuracy; the global model stays --method's. Image rounds.")
@click.option("--baseline", is_flag=True,
              help="Also train one model here on the whole training set (rounds × epochs epochs) and plot "
                   "it on accuracy.png as the centralised reference. With --task llm: one model on all "
                   "the data for the same tokens, its held-out loss beside the rounds'.")
def federate_command(task, local, relays, providers, train, test, servers, wallet_dir, mints, key_file, rounds,
                     epochs, batch_size, learning_rate, split, method, trim_ratio, krum_f, clip_norm,
                     merge_dvm, max_price, pay_on_delivery, bonus, attacks, publish_verdicts, trusted, no_score,
                     job_timeout, seed, out, allow_private, model_dir, lora_r, lora_alpha, max_seq_length,
                     target_modules, compare, baseline, mode, inner_steps, outer_lr, outer_momentum, compression,
                     restart) -> None:
    """Federated training across DVMs: split, train, merge, evaluate, pay, repeat."""
    from dvm_core.protocol.events import parse_public_key
    from dvm_core.cli.logs import configure_logging

    from .llm import LlmSettings
    from .rounds import FederationSettings

    configure_logging("console", "warning")
    compared = tuple(m.strip() for m in compare.split(",") if m.strip())
    extra = {}
    if task == "llm":
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()   # "Loading weights" bars at every evaluation
        if compared:
            raise click.ClickException("--compare is for image rounds (--task image)")
        if mode == "diloco" and merge_dvm:
            raise click.ClickException("--mode diloco merges here: --merge-dvm is for LoRA rounds")
        if not local and not model_dir:
            raise click.ClickException("--task llm needs --model FOLDER (or --local N for a tiny built-in one)")
        given = [x is not None for x in (model_dir, train, test)]
        if local and any(given) and not all(given):
            raise click.ClickException("--task llm --local: give all of --model, --train and --test, or none "
                                       "(a tiny model and corpus built here)")
        if method != "fedavg" and merge_dvm:
            raise click.ClickException("--task llm: a robust --method runs here, not on a --merge-dvm")
        extra = {"lora_r": lora_r, "lora_alpha": lora_alpha, "max_seq_length": max_seq_length, "mode": mode,
                 "inner_steps": inner_steps, "outer_lr": outer_lr, "outer_momentum": outer_momentum,
                 "compression": compression, "resume": not restart, "baseline": baseline,
                 "target_modules": tuple(t.strip() for t in (target_modules or "").split(",") if t.strip())}
        if local and model_dir is None and learning_rate is None:
            learning_rate = 3e-3   # the tiny model starts from random weights: the LoRA default 2e-4 crawls
    else:
        llm_only = [name for name, given in (("--mode", mode != "lora"), ("--compression", compression != "none"),
                                             ("--restart", restart)) if given]
        if llm_only:
            raise click.ClickException(f"{', '.join(llm_only)}: for --task llm")
        extra = {"compare": compared, "baseline": baseline}
    settings = (LlmSettings if task == "llm" else FederationSettings)(
        rounds=rounds, epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, split=split,
        method=method, trim_ratio=trim_ratio, krum_f=krum_f, clip_norm=clip_norm, seed=seed,
        job_timeout=job_timeout, max_price=max_price, allow_private_urls=allow_private or bool(local),
        pay_on_delivery=pay_on_delivery, bonus=bonus, score=not no_score,
        publish_verdicts=publish_verdicts, **extra)
    try:
        if merge_dvm:
            settings.merge_provider = parse_public_key(merge_dvm)
        provider_keys = [parse_public_key(p) for p in providers]
        settings.trusted = tuple(t if t == "self" else parse_public_key(t) for t in trusted)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    if attacks and not local:
        raise click.ClickException("--attack simulates cheating local providers: use it with --local N")
    from .rounds import ATTACKS
    for attack in attacks:
        mode, _, index = attack.partition(":")
        if mode not in ATTACKS or not index.isdigit() or not int(index) < (local or 0):
            raise click.ClickException(f"--attack {attack}: use MODE:N, MODE one of {', '.join(ATTACKS)} "
                                       f"and N a provider from 0 to {(local or 1) - 1} (as the shard lines number them)")
        settings.attacks[int(index)] = mode
    out_dir = Path(out)
    from dvm_fedavg.checks import MergeError, check_method
    for option, name in (("--method", method), *(("--compare", m) for m in compared)):
        try:
            check_method(name, local or len(provider_keys), trim_ratio, krum_f, None)
        except (MergeError, ValueError) as exc:
            raise click.ClickException(f"{option} {name} with {local or len(provider_keys)} providers: {exc}") \
                from None
    if local:
        if relays or providers or servers or wallet_dir or mints:
            raise click.ClickException("--local starts its own relay, providers, blob server and mint: "
                                       "leave out --relay, --provider, --blossom, --wallet-dir and --mint")
        code = asyncio.run(_run_local(local, train, test, settings, out_dir, model_dir))
    else:
        missing = [name for name, value in (("--relay", relays), ("--provider", providers), ("--train", train),
                                            ("--test", test), ("--blossom", servers), ("--wallet-dir", wallet_dir))
                   if not value]
        if missing:
            raise click.ClickException(f"missing {', '.join(missing)} (or use --local N)")
        code = asyncio.run(_run_remote(list(relays), provider_keys, Path(train), Path(test), list(servers),
                                       Path(wallet_dir), list(mints), key_file, settings, out_dir, model_dir))
    sys.exit(code)


def _say(text: str) -> None:
    click.echo(text)


async def _federate(customer, wallet, providers, train, test, servers, settings, out_dir, model=None) -> int:
    from .llm import LlmSettings
    from .rounds import contribution_table, federate

    if isinstance(settings, LlmSettings):
        return await _federate_llm(customer, wallet, providers, train, test, model, servers, settings, out_dir)
    reports = await federate(customer, wallet, providers, train, test, servers, out_dir, settings, say=_say)
    methods = list(settings.compare)
    click.echo("\nround  accuracy  merged  dropped  paid(sat)" + "".join(f"  {m:>12}" for m in methods))
    for r in reports:
        click.echo(f"{r.round:5d}  {r.accuracy:8.4f}  {len(r.providers):6d}  {len(r.dropped):7d}  "
                   f"{sum(r.paid.values()):9d}"
                   + "".join(f"  {r.compared[m]:12.4f}" if m in r.compared else f"  {'-':>12}" for m in methods))
    click.echo("")
    for line in contribution_table(reports, providers):
        click.echo(line)
    click.echo(f"\nglobal model: {out_dir / f'global-{reports[-1].round}.safetensors'} "
               f"(card: {out_dir / 'global_card.json'}); accuracy per round: {out_dir / 'accuracy.png'}")
    return 0 if any(r.providers for r in reports) else 1


async def _federate_llm(customer, wallet, providers, train, test, model, servers, settings, out_dir) -> int:
    from .llm import federate_llm, round_table
    from .rounds import contribution_table

    federation = await federate_llm(customer, wallet, providers, train, test, Path(model), servers, out_dir,
                                    settings, say=_say)
    reports = federation.reports
    click.echo("")
    for line in round_table(federation) + [""] + contribution_table(reports, providers):
        click.echo(line)
    click.echo(f"\nglobal model: {federation.global_model} (a model folder); held-out loss per round: "
               f"{out_dir / 'loss.png'}, every figure: {out_dir / 'rounds.json'}")
    return 0 if any(r.providers for r in reports) else 1


async def _run_remote(relays, providers, train, test, servers, wallet_dir, mints, key_file, settings,
                      out_dir, model=None) -> int:
    from dvm_core.customer import Customer
    from dvm_core.protocol.events import Keys
    from dvm_core.customer import EcashWallet, load_or_create_p2pk_key, read_key_file

    keys = read_key_file(key_file) if key_file else Keys.generate()
    wallet = EcashWallet(directory=wallet_dir, accepted_mints=mints,
                         p2pk_private_key=load_or_create_p2pk_key(wallet_dir / "p2pk.key"))
    try:
        async with Customer(keys, relays) as customer:
            return await _federate(customer, wallet, providers, train, test, servers, settings, out_dir, model)
    finally:
        await wallet.close()


async def _run_local(count: int, train, test, settings, out_dir: Path, model=None) -> int:
    """Everything on loopback: relay, mint, blob server, `count` providers, a funded customer."""
    from .llm import LlmSettings

    llm = isinstance(settings, LlmSettings)
    root = Path(tempfile.mkdtemp(prefix="dvm-federate-"))
    code = 1
    try:
        if llm and train is None:
            from . import tiny
            model = tiny.save_model_folder(root / "tiny-model", "gpt2", settings.seed)
            train = tiny.write_corpus(root / "train.jsonl", 80 * count, settings.seed + 1)
            test = tiny.write_corpus(root / "test.jsonl", 60, settings.seed + 2)
            if not settings.target_modules:
                settings.target_modules = ("c_attn", "c_proj", "c_fc")
            click.echo(f"data: a toy grammar, {80 * count} sentences to train on, 60 held out; model: a tiny "
                       f"GPT-2 of random weights ({model})")
        elif train is None or test is None:
            from dvm_image_classifier.digits import digits_split, write_npz
            x_train, y_train, x_test, y_test = digits_split(settings.seed)
            train = write_npz(root / "digits_train.npz", x_train, y_train)
            test = write_npz(root / "digits_test.npz", x_test, y_test)
            click.echo(f"data: scikit-learn's digits, {len(y_train)} to train on, {len(y_test)} held out")
        async with local_marketplace(count, "llm-finetune" if llm else "image-classifier", root) as market:
            code = await _federate(market.customer, market.wallet, market.providers, Path(train), Path(test),
                                   market.servers, settings, out_dir, model)
            click.echo(f"customer wallet now holds {await market.wallet.total_balance()} sat")
        return code
    finally:
        if code == 0:
            shutil.rmtree(root, ignore_errors=True)
        else:
            click.echo(f"files kept in {root}", err=True)


@dataclass
class LocalMarket:
    customer: object
    wallet: object
    providers: list[str]
    servers: list[str]
    workers: list[subprocess.Popen]


@asynccontextmanager
async def local_marketplace(count: int, plugin: str, root: Path, funds: int = 10_000,
                            say: Callable[[str], None] = click.echo):
    """A relay, a Cashu mint (FakeWallet), a blob server and `count` providers (``dvm run``
    processes serving only `plugin`, three keys, each with its share of the cores) on loopback,
    with files under `root`, and a customer with a wallet of `funds` sat: a `LocalMarket`.
    Everything is stopped on the way out. `dvm federate --local` and the benchmarks use it."""
    from dvm_core.customer import Customer, EcashWallet, write_key_file
    from dvm_core.devtools.localnet import start_blob_server_process, start_mint, start_relay
    from dvm_core.protocol.events import Keys

    services, workers, wallet = [], [], None
    try:
        relay = start_relay(root / "relay")
        services.append(relay)
        mint = start_mint(root / "mint")
        services.append(mint)
        blobs = start_blob_server_process(root / "blobs")
        services.append(blobs)
        say(f"relay {relay.url}, mint {mint.url}, blob server {blobs.url}")
        providers = []
        # Each provider gets its share of the cores: N providers each taking torch's default
        # (all cores) ran 2N busy threads on 2 cores and trained 4 to 180 times slower.
        threads = str(max(1, (os.cpu_count() or 1) // count))
        prices = {"llm-finetune": f"\n[plugins.llm-finetune]\nsats_per_million_tokens = {LOCAL_LLM_RATE}\n",
                  "image-classifier": f"\n[plugins.image-classifier]\nsats_per_million_sample_epochs = {LOCAL_RATE}\n"}
        for i in range(count):
            keys = Keys.generate()
            home = root / f"provider-{i}"
            home.mkdir()
            write_key_file(home / "dvm.key", keys)
            (home / "dvm.toml").write_text(
                f'[dvm]\nname = "Local provider {i}"\nrelays = ["{relay.url}"]\nkey_file = "dvm.key"\n'
                f'state_dir = "state"\nprogress_interval = 0.5\nlog_format = "json"\nmints = ["{mint.url}"]\n'
                f'blob_servers = ["{blobs.url}"]\nallow_private_urls = true\n' + prices.get(plugin, ""))
            workers.append(subprocess.Popen(
                [sys.executable, "-m", "dvm_core.cli", "run", "--config", str(home / "dvm.toml")],
                stdout=open(home / "worker.log", "wb"), stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", "DVM_PLUGINS": plugin,
                     "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}))
            providers.append(keys.public_key)
        customer_keys = Keys.generate()
        wallet = EcashWallet(directory=root / "customer-wallet", accepted_mints=[mint.url],
                             p2pk_private_key=customer_keys.private_key)
        await wallet.mint_from_lightning(funds, mint.url)
        say(f"customer wallet funded: {await wallet.total_balance()} sat")
        async with Customer(customer_keys, [relay.url]) as customer:
            await _wait_ready(customer, providers, workers, root)
            say(f"{count} providers up: " + ", ".join(p[:12] + "…" for p in providers))
            yield LocalMarket(customer, wallet, providers, [blobs.url], workers)
    finally:
        for worker in workers:
            worker.terminate()
        for worker in workers:
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                worker.kill()
        if wallet is not None:
            await wallet.close()
        for service in reversed(services):
            service.stop()


async def _wait_ready(customer, providers: list[str], workers, root: Path, timeout: float = 120) -> None:
    """Until every provider has announced itself (NIP-89)."""
    from dvm_core.protocol.nip90 import HANDLER_KIND

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for worker in workers:
            if worker.poll() is not None:
                raise click.ClickException(f"a provider exited with {worker.returncode}; logs in {root}")
        events = await customer.pool.query([{"kinds": [HANDLER_KIND], "authors": providers}], timeout=2)
        if {e["pubkey"] for e in events} >= set(providers):
            return
        await asyncio.sleep(0.5)
    raise click.ClickException(f"the providers did not announce themselves within {timeout:g}s; logs in {root}")
