"""Interop: pay on delivery (NUT-14 HTLC ecash, docs/design/pay-on-delivery.md) between our
Python wallet and a stock JavaScript wallet, cashu-ts 4.8 (tests/js/cashu_htlc.mjs), against a
real Nutshell mint (FakeWallet) on loopback: no mocks.

Both ways round: a cashu-ts customer pays our NUT-18 HTLC payment request, our provider redeems
with the key K, and cashu-ts reads K back from the mint (NUT-07); our customer locks a payment
to a cashu-ts provider's key, which redeems with K, and our wallet reads K from the mint.

Needs Node.js and `make js` (npm install in tests/js); without them these tests fail, they do
not skip, so a missing setup is never mistaken for a pass.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time

import pytest

from dvm_core.payments import nutshell
from dvm_core.protocol.ecash import (HtlcTerms, decode_payment_request, decode_token,
                                     encode_payment_request, htlc_hash, htlc_terms_of)
from tests import test_htlc, test_wallet
from tests.test_js_client import JS_DIR

wallets = test_wallet.wallets      # the fixtures: make(name, mints, **kwargs) -> EcashWallet,
customer = test_htlc.customer      # a customer with 100 sat and a P2PK (refund) key,
provider = test_htlc.provider      # a provider with a P2PK key, from which job keys derive

SCRIPT = JS_DIR / "cashu_htlc.mjs"
HOUR = 3600


def node_and_cashu_ts() -> str:
    """As `test_js_client.node_and_modules`, for the one package this script needs."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("Node.js (`node`) is not on PATH: install Node.js 20.19 or later, then run `make js`")
    if not (JS_DIR / "node_modules" / "@cashu" / "cashu-ts" / "package.json").is_file():
        pytest.fail("tests/js/node_modules/@cashu/cashu-ts is missing: run `make js`")
    return node


async def js(node: str, command: str, timeout: float = 30.0, **args) -> dict:
    """Run one command of cashu_htlc.mjs; its one JSON line, which must say ok."""
    proc = await asyncio.create_subprocess_exec(
        node, str(SCRIPT), command, json.dumps(args), cwd=JS_DIR,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        pytest.fail(f"cashu_htlc.mjs {command} did not exit within {timeout:g} s")
    lines = out.decode().strip().splitlines()
    assert proc.returncode == 0 and len(lines) == 1, \
        f"cashu_htlc.mjs {command} exited {proc.returncode}\nstdout: {out.decode()[-3000:]}\n" \
        f"stderr: {err.decode()[-3000:]}"
    answer = json.loads(lines[0])
    assert answer.pop("ok") is True, f"cashu_htlc.mjs {command}: {answer['error']}"
    return answer


async def test_cashu_ts_pays_an_htlc_request_and_reads_the_key_from_the_mint(provider, mint):
    node = node_and_cashu_ts()
    refund = await js(node, "keygen")                        # the JS customer's refund key
    job_id, key = os.urandom(32).hex(), os.urandom(32)
    terms = HtlcTerms(hash=htlc_hash(key), pubkey=provider.job_lock_pubkey(job_id),
                      locktime=int(time.time()) + HOUR, refund_key=refund["pubkey"])
    creq = encode_payment_request(payment_id=job_id[:16], amount=21, unit="sat",
                                  mints=[mint.url], htlc=terms)
    assert htlc_terms_of(decode_payment_request(creq)["nut10"]) == terms

    paid = await js(node, "pay", mint=mint.url, creq=creq, extra=10)

    # cashu-ts read the lock from the request as we wrote it (PaymentRequest.toP2PKOptions)
    assert paid["options"] == {"pubkey": [terms.pubkey], "hashlock": terms.hash,
                               "locktime": terms.locktime, "refundKeys": [terms.refund_key]}, \
        paid["options"]
    assert (paid["amount"], paid["change"]) == (21, 10)
    assert all(paid["dleq"]), paid   # the mint's DLEQ proofs check out in cashu-ts
    token = paid["token"]
    info = provider.inspect(token)
    assert token.startswith("cashuB") and info.has_dleq
    assert (info.mint, info.unit, info.amount) == (mint.url, "sat", 21)
    # cashu-ts holds the mint's full v2 keyset id, and writes its 16-hex short form in cashuB
    assert all(len(i) == 66 and i.startswith("01") for i in paid["ids"]), paid["ids"]
    assert [p["id"] for p in decode_token(token).proofs] == [i[:16] for i in paid["ids"]]
    assert len(info.conditions) > 1        # several proofs (16 + 4 + 1), each with its own lock
    for cond in info.conditions:
        assert cond.kind == "HTLC" and cond.hash == terms.hash and not cond.sig_all
        assert cond.pubkeys == (terms.pubkey,) and cond.refund == (terms.refund_key,)
        assert cond.locktime == terms.locktime
    assert (await js(node, "preimage", mint=mint.url, token=token)) == {
        "states": ["UNSPENT"] * len(info.conditions), "preimage": None}

    # the mint itself refuses cashu-ts's HTLC proofs with the job key's signature but a wrong key
    c = nutshell.load()
    job_key = c.PrivateKey(bytes.fromhex(provider._job_secret(job_id)))
    raw, proofs = await test_htlc.nutshell_proofs(provider, token)
    for proof in proofs:
        proof.witness = c.HTLCWitness(
            preimage=os.urandom(32).hex(),
            signatures=[c.schnorr_sign(proof.secret.encode(), job_key).hex()]).model_dump_json()
    with pytest.raises(Exception, match="HTLC preimage does not match"):
        await raw.redeem(proofs)

    received = await provider.receive(token, min_amount=21, job_id=job_id, htlc=terms,
                                      preimage=key)

    assert (received.amount, received.fee, received.mint) == (21, 0, mint.url)
    assert await provider.total_balance() == 21
    # cashu-ts learns K from the mint alone: checkstate, getHTLCWitnessPreimage, verifyHTLCHash
    assert (await js(node, "preimage", mint=mint.url, token=token)) == {
        "states": ["SPENT"] * len(info.conditions), "preimage": key.hex()}


async def test_cashu_ts_redeems_our_htlc_token_with_the_key(customer, mint):
    node = node_and_cashu_ts()
    receiver = await js(node, "keygen")                      # the JS provider's lock key
    key = os.urandom(32)
    terms = HtlcTerms(hash=htlc_hash(key), pubkey=receiver["pubkey"],
                      locktime=int(time.time()) + HOUR, refund_key=customer.p2pk_pubkey)
    token = await customer.send_htlc(13, mint.url, terms)
    assert await customer.balance() == {mint.url: 87}
    assert await customer.htlc_preimage(token) is None

    got = await js(node, "redeem", mint=mint.url, token=token, privkey=receiver["privkey"],
                   preimage=key.hex(), wrong_preimage=os.urandom(32).hex())

    assert "HTLC preimage does not match" in got["wrong_error"], got   # the mint said no first
    assert got["amount"] == 13
    assert await customer.check_spent(token)
    assert await customer.htlc_preimage(token) == key          # what cashu-ts showed the mint
    assert await customer.total_balance() == 87
