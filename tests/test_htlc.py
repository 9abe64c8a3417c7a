"""Pay on delivery with NUT-14 HTLC ecash (docs/design/pay-on-delivery.md), against a real
Nutshell mint (FakeWallet) on loopback: no mocks.

The customer locks a payment to the hash of a key K and to the job's key, with its own refund
key; the provider can redeem only by showing K to the mint, which then hands K to the customer;
a provider that never redeems leaves the customer to take the money back after the locktime.
"""

from __future__ import annotations

import asyncio
import json
import os
import time

import pytest

from dvm_core.payments import nutshell
from dvm_core.payments.wallet import EcashWallet
from dvm_core.protocol.ecash import (HtlcTerms, decode_payment_request, decode_token,
                                     encode_payment_request, encode_token_a, htlc_hash,
                                     htlc_terms_of)
from tests import test_wallet
from tests.test_wallet import decode_b, encode_b, keys_by_parity, refused, xonly

wallets = test_wallet.wallets     # the fixture: make(name, mints, **kwargs) -> EcashWallet

HOUR = 3600


@pytest.fixture
async def customer(wallets, mint) -> EcashWallet:
    wallet = wallets("customer", [mint.url], p2pk_private_key=keys_by_parity()[0])
    assert await wallet.mint_from_lightning(100, mint.url) == 100
    return wallet


@pytest.fixture
def provider(wallets, mint) -> EcashWallet:
    return wallets("provider", [mint.url], p2pk_private_key=keys_by_parity()[1])


def job(provider: EcashWallet, customer: EcashWallet, lasts: float = HOUR) -> tuple[str, bytes, HtlcTerms]:
    """A fresh job: (its id, the provider's key K, the terms of its payment)."""
    job_id = os.urandom(32).hex()
    key = os.urandom(32)
    terms = HtlcTerms(hash=htlc_hash(key), pubkey=provider.job_lock_pubkey(job_id),
                      locktime=int(time.time() + lasts), refund_key=customer.p2pk_pubkey)
    return job_id, key, terms


async def nutshell_proofs(wallet: EcashWallet, token: str) -> tuple[object, list]:
    """Nutshell's own wallet and the token's proofs, to ask the mint what our wallet would not."""
    info = decode_token(token)
    raw = await wallet._online(info.mint)
    proofs = [nutshell.load().Proof.from_dict(dict(p)) for p in info.proofs]
    await raw._expand_short_keyset_ids(proofs)
    return raw, proofs


def test_htlc_terms_and_payment_requests():
    key = bytes(range(32))
    assert htlc_hash(key) == "630dcd2966c4336691125448bbb25b4ff412a49c732db2c8abc1b8581bd710dd"
    for bad in (key[:31], key + b"\0", key.hex().encode(), key.hex()):
        with pytest.raises(ValueError, match="32 bytes"):
            htlc_hash(bad)
    job_key, refund = "03" + "11" * 32, "ab" * 32             # an x-only Nostr key: "02" + x
    terms = HtlcTerms(htlc_hash(key), job_key, 1_900_000_000, refund)
    assert terms.refund_key == "02" + refund
    creq = encode_payment_request(payment_id="j", amount=21, unit="sat", mints=["http://m"], htlc=terms)
    nut10 = decode_payment_request(creq)["nut10"]
    assert nut10 == {"k": "HTLC", "d": terms.hash, "t": [
        ["pubkeys", job_key], ["locktime", "1900000000"], ["refund", "02" + refund],
        ["sigflag", "SIG_INPUTS"]]}
    assert htlc_terms_of(nut10) == terms
    # the P2PK request is unchanged, and holds no HTLC terms
    p2pk = decode_payment_request(encode_payment_request(
        payment_id="j", amount=21, unit="sat", mints=["http://m"], lock_pubkey=job_key))
    assert p2pk["nut10"] == {"k": "P2PK", "d": job_key, "t": []} and htlc_terms_of(p2pk["nut10"]) is None
    with pytest.raises(ValueError, match="one lock"):
        encode_payment_request(payment_id="j", amount=1, unit="sat", mints=[], lock_pubkey=job_key,
                               htlc=terms)
    with pytest.raises(ValueError, match="lower-case"):
        HtlcTerms(terms.hash.upper(), job_key, 1_900_000_000, refund)   # unspendable at the mint
    with pytest.raises(ValueError, match="differ"):
        HtlcTerms(terms.hash, job_key, 1_900_000_000, "02" + "11" * 32)
    refused_requests = {
        "SIG_INPUTS": [["sigflag", "SIG_ALL"]],
        "one refund": [],                                         # anyone's after the locktime
        "one pubkeys": [["pubkeys", job_key, "02" + "22" * 32]],
        "unsupported": [["n_sigs", "1"]],
    }
    for words, change in refused_requests.items():
        tags = {t[0]: t for t in terms.tags()}
        if not change:
            del tags["refund"]
        tags.update({t[0]: t for t in change})
        with pytest.raises(ValueError, match=words):
            htlc_terms_of({"k": "HTLC", "d": terms.hash, "t": list(tags.values())})


async def test_provider_redeems_and_the_customer_reads_the_key_from_the_mint(customer, provider, mint):
    job_id, key, terms = job(provider, customer)
    token = await customer.send_htlc(21, mint.url, terms)
    assert await customer.balance() == {mint.url: 79}
    conditions = provider.inspect(token).conditions
    assert all(c.kind == "HTLC" and c.hash == terms.hash and c.pubkeys == (terms.pubkey,)
               and c.refund == (customer.p2pk_pubkey,) and not c.sig_all for c in conditions)
    assert len({p["secret"] for p in decode_token(token).proofs}) == len(conditions) > 1
    assert await customer.htlc_preimage(token) is None          # unspent: nothing to read yet

    marks: list[dict] = []
    received = await provider.receive(token, min_amount=21, job_id=job_id, htlc=terms,
                                      preimage=key, before_swap=marks.append)

    assert (received.amount, received.fee) == (21, 0)
    assert await provider.total_balance() == 21
    assert await customer.htlc_preimage(token) == key           # from the mint alone
    # the crash-safety mark of the swap works for HTLC too: NUT-09 finds that swap
    assert len(marks) == 1
    assert await provider.recover_swap(mint.url, marks) == (True, 0)
    await refused(provider.receive(token, min_amount=21, job_id=job_id, htlc=terms, preimage=key),
                  "already spent")
    await refused(customer.reclaim_htlc(token), "only after its locktime", retryable=True)


async def test_the_mint_refuses_a_redeem_without_the_key_or_the_job_signature(customer, provider, mint):
    job_id, key, terms = job(provider, customer)
    token = await customer.send_htlc(8, mint.url, terms)
    c = nutshell.load()
    job_key = c.PrivateKey(bytes.fromhex(provider._job_secret(job_id)))
    base_key = c.PrivateKey(bytes.fromhex(provider._p2pk_secret))

    def witness(preimage: str | None, signer) -> object:
        def sign(proof):
            signatures = [c.schnorr_sign(proof.secret.encode(), signer).hex()] if signer else []
            return c.HTLCWitness(preimage=preimage, signatures=signatures).model_dump_json()
        return sign

    attempts = {
        "HTLC preimage does not match": witness(os.urandom(32).hex(), job_key),
        "no signatures in proof": witness(key.hex(), None),
        "signature threshold not met": witness(key.hex(), base_key),   # not the job's key
        "no HTLC preimage provided": witness(None, job_key),
    }
    for error, make in attempts.items():
        raw, proofs = await nutshell_proofs(provider, token)
        for proof in proofs:
            proof.witness = make(proof)
        with pytest.raises(Exception, match=error):
            await raw.redeem(proofs)
    assert not await customer.check_spent(token)
    assert await customer.htlc_preimage(token) is None
    # our wallet does not even try with a key that is not the preimage of the hash
    with pytest.raises(ValueError, match="preimage"):
        await provider.receive(token, min_amount=8, job_id=job_id, htlc=terms, preimage=os.urandom(32))
    with pytest.raises(ValueError, match="job_id"):
        await provider.receive(token, min_amount=8, job_id=os.urandom(32).hex(), htlc=terms,
                               preimage=key)
    assert (await provider.receive(token, min_amount=8, job_id=job_id, htlc=terms,
                                   preimage=key)).amount == 8


async def test_customer_reclaims_after_the_locktime_and_not_before(customer, provider, mint):
    job_id, key, terms = job(provider, customer, lasts=4)
    token = await customer.send_htlc(13, mint.url, terms)

    await refused(customer.reclaim_htlc(token), "only after its locktime", retryable=True)
    raw, proofs = await nutshell_proofs(customer, token)   # Nutshell signs with the refund key
    with pytest.raises(Exception, match="no HTLC preimage provided"):
        await raw.redeem(proofs)                           # the mint says no before the locktime too
    assert not await customer.check_spent(token)
    stranger = EcashWallet(customer.directory.parent / "stranger", [mint.url],
                           p2pk_private_key=keys_by_parity()[0])
    await refused(stranger.reclaim_htlc(token), "refund key is not this wallet's key")
    await stranger.close()

    await asyncio.sleep(max(0.0, terms.locktime - time.time()) + 1.5)   # the mint's clock, strictly
    received = await customer.reclaim_htlc(token)

    assert received.amount == 13
    assert await customer.total_balance() == 100
    assert await customer.htlc_preimage(token) is None        # spent, but by the refund key
    await refused(provider.receive(token, min_amount=13, job_id=job_id, htlc=terms, preimage=key),
                  "already spent")


async def test_a_partly_redeemed_token_gives_the_key_and_the_rest_back(customer, provider, mint):
    job_id, key, terms = job(provider, customer, lasts=4)
    token = await customer.send_htlc(3, mint.url, terms)            # 2 + 1
    proofs = sorted(decode_token(token).proofs, key=lambda p: p["amount"])
    assert [p["amount"] for p in proofs] == [1, 2]
    part = encode_token_a(mint.url, [proofs[1]])
    assert (await provider.receive(part, min_amount=2, job_id=job_id, htlc=terms,
                                   preimage=key)).amount == 2
    assert await customer.htlc_preimage(token) == key
    await asyncio.sleep(max(0.0, terms.locktime - time.time()) + 1.5)
    assert (await customer.reclaim_htlc(token)).amount == 1            # only the unspent proof
    assert await customer.total_balance() == 98
    await refused(customer.reclaim_htlc(token), "already spent")


def tampered(token: str, change) -> str:
    """The token with each proof's secret changed by `change(secret as JSON)`; the DLEQ proofs
    no longer match, which only the mint-side checks would notice."""
    body = decode_b(token)
    for keyset in body["t"]:
        for proof in keyset["p"]:
            secret = json.loads(proof["s"])
            change(secret[1])
            proof["s"] = json.dumps(secret)
    return encode_b(body)


def set_tag(name: str, *values: str):
    def change(fields: dict) -> None:
        fields["tags"] = [t for t in fields.get("tags", []) if t[0] != name] + ([[name, *values]] if values else [])
    return change


async def test_htlc_tokens_not_as_asked_are_refused_before_any_swap(customer, provider, mint):
    job_id, key, terms = job(provider, customer)
    other_key = "02" + xonly(keys_by_parity()[0])
    later = terms.locktime + 60
    honest = {   # tokens the customer's wallet makes, with other terms than the provider asked
        "locked to another hash": HtlcTerms(htlc_hash(os.urandom(32)), terms.pubkey, later, terms.refund_key),
        "this job's key": HtlcTerms(terms.hash, provider.job_lock_pubkey(os.urandom(32).hex()), later,
                                    terms.refund_key),
        "refund key must be": HtlcTerms(terms.hash, terms.pubkey, later, other_key),
        "lock expires": HtlcTerms(terms.hash, terms.pubkey, terms.locktime - 60, terms.refund_key),
    }
    tokens = {words: await customer.send_htlc(8, mint.url, t) for words, t in honest.items()}
    good = await customer.send_htlc(8, mint.url, terms)
    tokens.update({
        "price is 9": good,
        "refund key must be ": tampered(good, set_tag("refund")),          # none: anyone's after T
        "SIG_ALL": tampered(good, set_tag("sigflag", "SIG_ALL")),
        "alone": tampered(good, set_tag("pubkeys", terms.pubkey, other_key)),
        "must be HTLC-locked": await customer.send(8),
        "must be HTLC-locked ": await customer.send(8, lock_to=terms.pubkey),
    })
    fresh = EcashWallet(provider.directory.parent / "fresh-provider", [mint.url],
                        p2pk_private_key=provider._p2pk_secret)
    for words, token in tokens.items():
        price = 9 if words == "price is 9" else 8
        await refused(fresh.receive(token, min_amount=price, job_id=job_id, htlc=terms, preimage=key),
                      words.strip())
    assert fresh._wallets == {}            # no Nutshell wallet opened: the mint was never asked
    for token in tokens.values():
        assert not await customer.check_spent(token)
    assert (await fresh.receive(good, min_amount=8, job_id=job_id, htlc=terms, preimage=key)).amount == 8
    await fresh.close()
    # without HTLC terms, an HTLC token is not ours to redeem
    await refused(provider.receive(tokens["this job's key"], min_amount=8, job_id=job_id),
                  "HTLC condition")


async def test_short_and_full_keyset_ids_both_work(customer, provider, mint):
    job_id, key, terms = job(provider, customer)
    token = await customer.send_htlc(5, mint.url, terms)
    body = decode_b(token)
    full = (await customer._online(mint.url)).keyset_id
    assert full.startswith("01") and len(full) == 66
    # Nutshell, like cashu-ts v4, writes a v2 keyset id in its 16-hex short form in a cashuB token
    assert body["t"][0]["i"].hex() == full[:16]
    body["t"][0]["i"] = bytes.fromhex(full)
    long = encode_b(body)
    assert await customer.htlc_preimage(long) is None
    assert (await provider.receive(long, min_amount=5, job_id=job_id, htlc=terms,
                                   preimage=key)).amount == 5
    assert await customer.htlc_preimage(token) == key         # checkstate needs only the secrets
