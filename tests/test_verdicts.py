"""Verdicts on providers (NIP-32 labels, kind 1985): built and read back, counted only from
trusted keys, and `dvm job submit --trust` refusing a DVM with a verdict against it before
anything is sent, against a real relay and worker."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

from dvm_core.customer import Customer
from dvm_core.protocol.events import Keys, sign_event
from dvm_core.protocol.verdicts import LABEL_KIND, NAMESPACE, build_verdict, parse_verdict
from dvm_core.state.keyfiles import write_key_file

PROVIDER = "ab" * 32
JOB = "cd" * 32


def test_a_verdict_round_trips_and_names_one_label_and_one_provider():
    keys = Keys.generate()
    event = sign_event(keys, *build_verdict(PROVIDER, "verification-failed", "segment 3: distance 0.41",
                                            job_id=JOB, kind=5750))
    verdict = parse_verdict(event)
    assert (verdict.author, verdict.provider, verdict.label, verdict.job_id, verdict.kind) == \
        (keys.public_key, PROVIDER, "verification-failed", JOB, 5750)
    assert verdict.negative and verdict.reason == "segment 3: distance 0.41"
    assert ["L", NAMESPACE] in event["tags"] and event["kind"] == LABEL_KIND
    assert not parse_verdict(sign_event(keys, *build_verdict(PROVIDER, "verification-passed", "ok"))).negative


@pytest.mark.parametrize("tags,message", [
    ([["l", "update-left-out", NAMESPACE], ["p", PROVIDER]], "namespace"),
    ([["L", "other"], ["l", "update-left-out", "other"], ["p", PROVIDER]], "namespace"),
    ([["L", NAMESPACE], ["l", "scam", NAMESPACE], ["p", PROVIDER]], "exactly one"),
    ([["L", NAMESPACE], ["l", "update-left-out", NAMESPACE]], "exactly one"),
    ([["L", NAMESPACE], ["l", "update-left-out", NAMESPACE], ["p", PROVIDER], ["p", "ef" * 32]], "exactly one"),
    ([["L", NAMESPACE], ["l", "update-left-out", NAMESPACE], ["p", "not-a-key"]], "exactly one"),
])
def test_what_is_not_a_verdict_is_refused(tags, message):
    with pytest.raises(ValueError, match=message):
        parse_verdict(sign_event(Keys.generate(), LABEL_KIND, "", tags))
    with pytest.raises(ValueError, match="unknown verdict"):
        build_verdict(PROVIDER, "scam", "")


async def test_only_verdicts_from_trusted_keys_count(relay):
    trusted, stranger = Keys.generate(), Keys.generate()
    async with Customer(trusted, [relay.url]) as a, Customer(stranger, [relay.url]) as b:
        await a.pool.wait_all_connected(10)
        await b.pool.wait_all_connected(10)
        await a.publish_verdict(PROVIDER, "update-left-out", "round 1: no change from the global model", kind=5750)
        await b.publish_verdict(PROVIDER, "verification-failed", "made up")
        await b.publish_verdict("ef" * 32, "verification-failed", "another provider")
        seen = await b.verdicts([PROVIDER], [trusted.public_key])
        assert [(v.author, v.label) for v in seen] == [(trusted.public_key, "update-left-out")]
        both = await b.verdicts([PROVIDER], [trusted.public_key, stranger.public_key])
        assert {v.label for v in both} == {"update-left-out", "verification-failed"}
        assert await b.verdicts([PROVIDER], []) == []


async def test_job_submit_with_trust_refuses_a_flagged_dvm_before_sending(workers, relay, tmp_path):
    worker = await workers.start()
    judge = Keys.generate()
    async with Customer(judge, [relay.url]) as customer:
        await customer.pool.wait_all_connected(10)
        await customer.publish_verdict(worker.keys.public_key, "verification-failed", "segment 4 did not replay")
    write_key_file(tmp_path / "me.nsec", Keys.generate())

    def submit(*trust: str, out: str):
        args = [sys.executable, "-m", "dvm_core.cli", "job", "submit", "--relay", relay.url, "--dvm",
                worker.keys.public_key, "--kind", "5790", "--text", "one two two", "--key", str(tmp_path / "me.nsec"),
                "--json", "--timeout", "60", "--out", str(tmp_path / out)]
        for key in trust:
            args += ["--trust", key]
        return subprocess.run(args, capture_output=True, text=True, timeout=120)

    refused = await asyncio.to_thread(submit, judge.public_key, out="refused")
    assert refused.returncode == 7, refused.stderr
    assert "published a verdict against this DVM: verification-failed: segment 4 did not replay" in refused.stderr
    assert json.loads(refused.stdout.splitlines()[-1])["job_id"] is None
    assert worker.store.jobs() == []   # nothing was sent
    # A verdict from a key not trusted changes nothing: the job runs.
    ran = await asyncio.to_thread(submit, Keys.generate().public_key, "self", out="ran")
    assert ran.returncode == 0, ran.stderr
    assert json.loads(ran.stdout.splitlines()[-1])["status"] == "succeeded"
