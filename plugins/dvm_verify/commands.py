"""`dvm verify RESULT`: spot-check a training result against its signed transcript.

    dvm verify dvm-result --data digits_train.npz --local                  # replay here
    dvm verify dvm-result --data digits_train.npz --relay wss://… --dvm npub1… \\
        --blossom https://… --wallet-dir wallet --mint https://…           # hire a verifier DVM
    dvm verify llm-result --data train.jsonl --model model.zip --local     # an LLM fine-tuning's

Exit status: 0 every check matched, 3 a check did not (the provider cheated in that segment, or
the replay is not bit-identical on this machine: see ``--tolerance``), 1 the result could not be
checked.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import click

MISMATCH_EXIT = 3


@click.command("verify")
@click.argument("result", type=click.Path(exists=True, file_okay=False))
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False),
              help="The training set you sent with the job (the same file).")
@click.option("--checks", type=click.IntRange(1, 1000), default=3, show_default=True,
              help="Segments to check, drawn at random without replacement.")
@click.option("--seed", type=int, default=None, help="Seed of the draw (default: a random one, printed).")
@click.option("--local", is_flag=True, help="Replay the segments on this machine.")
@click.option("--model", type=click.Path(exists=True),
              help="An LLM job's base model: the archive the job was sent (or, replaying here, its folder); "
                   "a hub model named by the transcript is taken from the hub cache (here) or by the verifier.")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False),
              help="The initial weights the job was sent, if any (an image classifier's step 0 is checked "
                   "against them).")
@click.option("--request", "order_file", type=click.Path(exists=True, dir_okay=False),
              help="What was ordered: OUT/request.json of `dvm job submit` (default: RESULT/request.json, "
                   "if there). The transcript must train what it says.")
@click.option("--provider", help="The npub (or hex) that must have signed the transcript.")
@click.option("--allow-unsigned", is_flag=True, help="Check a transcript that is not signed (a test's).")
@click.option("--tolerance", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Largest relative distance of the state (the weights and each optimizer moment apart) "
                   "that still matches (0: bit-identical).")
@click.option("--relay", "relays", multiple=True, help="Relay URL, to hire a verifier DVM (repeatable).")
@click.option("--dvm", help="The verifier DVM's npub or hex key (a provider serving kind 5753).")
@click.option("--kind", type=click.IntRange(5000, 5999), default=5753, show_default=True)
@click.option("--blossom", "servers", multiple=True, help="Blob server for the uploads (repeatable).")
@click.option("--wallet-dir", type=click.Path(file_okay=False), help="The wallet that pays the verifier.")
@click.option("--mint", "mints", multiple=True, help="The wallet's mint(s).")
@click.option("--key", "key_file", type=click.Path(dir_okay=False), help="Your nsec key file (default: a fresh key).")
@click.option("--max-price", type=click.IntRange(0), default=None,
              help="Most sats paid per check; needed for a verifier that prices checks by their segment.")
@click.option("--timeout", type=float, default=600, show_default=True, help="Seconds to wait for each check.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--publish-verdict", is_flag=True,
              help="Sign with --key and publish to --relay a verdict on the transcript's signer (NIP-32, "
                   "kind 1985): verification-failed or verification-passed, which `--trust` reads.")
def verify_command(result, data, checks, seed, local, model, weights, order_file, provider, allow_unsigned, tolerance,
                   relays, dvm, kind, servers, wallet_dir, mints, key_file, max_price, timeout, as_json,
                   publish_verdict) -> None:
    """Spot-check RESULT (a result folder with transcript.json and its checkpoints): replay
    segments picked at random and say whether each lands where the provider said."""
    import secrets

    from dvm_core.cli.logs import configure_logging

    from dvm_core import JobInputError

    from dvm_core.transcripts import structure_problems

    from .checks import (Report, VerifyError, check_local, check_returned_weights, open_result, order_problems,
                         pick_segments)

    configure_logging("console", "warning")   # stdout is the report's (one JSON object with --json)
    if seed is None:
        seed = secrets.randbelow(2**31)
    if publish_verdict and not (relays and key_file):
        raise click.ClickException("--publish-verdict needs --relay and --key (the verdict is signed by you)")
    try:
        folder = open_result(Path(result), provider, allow_unsigned=allow_unsigned)
        if publish_verdict and folder.signer is None:
            raise VerifyError("--publish-verdict: the transcript is not signed, so there is no provider to judge")
        problems = structure_problems(folder.transcript)
        order_path = Path(order_file) if order_file else Path(result) / "request.json"
        if not problems and order_path.exists():
            try:
                order = json.loads(order_path.read_text())
            except ValueError:
                raise VerifyError(f"{order_path} is not JSON") from None
            problems = order_problems(folder.transcript, order if isinstance(order, dict) else {}, folder.job_id)
        elif not problems and not as_json:
            click.echo(f"no {order_path.name} in {result} (--request): the transcript's params are not compared "
                       "with what was ordered")
        picked = [] if problems else pick_segments(folder.transcript, checks, seed)
        if problems:
            if not as_json:
                click.echo("the transcript does not describe the training that was ordered and done, so no "
                           "segment is replayed: "
                           + "; ".join(problems[:5]))
        elif not as_json:
            signer = f"signed by {folder.signer}" if folder.signer else "NOT signed"
            click.echo(f"transcript: {len(folder.transcript['checkpoints']) - 1} segments, {signer}; "
                       f"checking {len(picked)} (seed {seed}): "
                       + ", ".join(f"[{a}, {b})" for a, b in picked))

        def say(verdict: dict) -> None:
            if not as_json:
                a, b = verdict["segment"]
                words = "match" if verdict["match"] else "MISMATCH"
                distance = "n/a" if verdict["distance"] is None else f"{verdict['distance']:.3g}"
                got = f"{verdict['got_sha256'][:16]}…" if verdict.get("got_sha256") else "nothing"
                click.echo(f"  [{a}, {b}): {words}, distance {distance}, expected {verdict['expected_sha256'][:16]}…, "
                           f"got {got} ({verdict['by']})" + (f": {verdict['reason']}" if verdict.get("reason") else ""))

        if problems:
            entries = folder.transcript["checkpoints"]
            report = Report(len(entries) - 1 if isinstance(entries, list) else 0, signer=folder.signer,
                            problems=problems)
        elif local:
            if dvm:
                raise click.ClickException("--local replays here: leave out --dvm")
            report = check_local(folder, Path(data), picked, tolerance=tolerance,
                                 model=Path(model) if model else None, weights=Path(weights) if weights else None,
                                 on_verdict=say)
        else:
            missing = [n for n, v in (("--relay", relays), ("--dvm", dvm), ("--blossom", servers),
                                      ("--wallet-dir", wallet_dir)) if not v]
            if missing:
                raise click.ClickException(f"missing {', '.join(missing)} (or use --local)")
            report = asyncio.run(_remote(list(relays), dvm, kind, folder, Path(data), picked, list(servers),
                                         Path(wallet_dir), list(mints), key_file, tolerance, max_price, timeout,
                                         say, Path(model) if model else None, Path(weights) if weights else None))
        if not problems:
            report.weights = check_returned_weights(folder)
    except (VerifyError, JobInputError) as exc:
        raise click.ClickException(str(exc)) from None
    if not as_json:
        for w in report.weights:
            if w.get("error") and not w.get("got_sha256"):
                click.echo(f"returned weights ({w['file']}): {w['error']}")
            elif w["match"] is None:
                click.echo(f"returned weights: {w['file']} is not in the folder: not checked against the transcript")
            elif w["match"]:
                click.echo(f"returned weights: {w['file']} matches the transcript ({w['expected_sha256'][:16]}…)")
            else:
                click.echo(f"returned weights: {w['file']} DOES NOT MATCH the transcript: expected "
                           f"{w['expected_sha256'][:16]}…, got {(w['got_sha256'] or w.get('error', '?'))[:60]}")
    summary = report.to_dict() | {"seed": seed}
    if publish_verdict:
        summary["verdict"] = asyncio.run(_publish_verdict(list(relays), key_file, folder, report, seed))
    if as_json:
        click.echo(json.dumps(summary))
    else:
        wrong = [w["file"] for w in report.weights if w["match"] is False]
        if report.problems:
            click.echo("FAILED: the transcript does not describe the training ordered (above).")
            sys.exit(MISMATCH_EXIT)
        click.echo(f"{'PASSED' if report.passed else 'FAILED'}: {sum(v['match'] for v in report.verdicts)}/"
                   f"{len(report.verdicts)} segments match"
                   + (f"; the returned {', '.join(wrong)} not the transcript's" if wrong else "") + ". Had the provider cheated in one segment of "
                   f"{report.segments}, these checks would have caught it with probability "
                   f"{summary['catch_probability_one_segment']:.2f}; in a tenth of them, "
                   f"{summary['catch_probability_tenth']:.2f}.")
    sys.exit(0 if report.passed else MISMATCH_EXIT)


async def _publish_verdict(relays, key_file, folder, report, seed) -> dict:
    """The verdict on the transcript's signer, signed with the customer's key and published."""
    from dvm_core.customer import Customer, read_key_file

    from .checks import job_kind_of

    label = "verification-passed" if report.passed else "verification-failed"
    failed = [v for v in report.verdicts if not v["match"]]
    reason = ("the transcript does not describe the training ordered: " + "; ".join(report.problems[:3])) if report.problems \
        else (f"{len(report.verdicts) - len(failed)}/{len(report.verdicts)} replayed segments of "
              f"{report.segments} matched (seed {seed})"
              + "".join(f"; [{v['segment'][0]}, {v['segment'][1]}) did not: {v.get('reason') or 'distance ' + str(v['distance'])}"
                        for v in failed[:3]))
    async with Customer(read_key_file(key_file), relays) as customer:
        event = await customer.publish_verdict(folder.signer, label, reason, job_id=folder.job_id,
                                               kind=job_kind_of(folder.transcript))
    return {"label": label, "event_id": event["id"], "provider": folder.signer, "reason": reason}


async def _remote(relays, dvm, kind, folder, data, picked, servers, wallet_dir, mints, key_file, tolerance,
                  max_price, timeout, say, model=None, weights=None):
    from dvm_core.customer import Customer, EcashWallet, load_or_create_p2pk_key, read_key_file
    from dvm_core.protocol.events import Keys, parse_public_key

    from .checks import check_remote

    try:
        verifier = parse_public_key(dvm)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    keys = read_key_file(key_file) if key_file else Keys.generate()
    wallet = EcashWallet(directory=wallet_dir, accepted_mints=mints,
                         p2pk_private_key=load_or_create_p2pk_key(wallet_dir / "p2pk.key"))
    try:
        async with Customer(keys, relays) as customer:
            return await check_remote(customer, wallet, verifier, folder, data, picked, servers, kind=kind,
                                      tolerance=tolerance, max_price=max_price, timeout=timeout, model=model, weights=weights,
                                      on_verdict=say)
    finally:
        await wallet.close()
