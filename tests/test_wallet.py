"""dvm_core.payments.wallet against real Nutshell mints (FakeWallet backend) on loopback: no mocks.

Tokens are tampered with the way an attacker would: decode the cashuB CBOR, change a field,
encode it again.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import socket
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import cbor2
import coincurve
import pytest
from bolt11 import Bolt11, MilliSatoshi, TagChar
from bolt11 import Tags as Bolt11Tags
from bolt11 import encode as bolt11_encode

from dvm_core.devtools.localnet import start_mint
from dvm_core.payments.wallet import COUNTER_BLOCK, EcashWallet
from dvm_core.payments.wallet_types import PaymentError, Received

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fee_mint(tmp_path_factory):
    """A second mint, charging 1 sat per input (1000 ppk)."""
    service = start_mint(tmp_path_factory.mktemp("fee-mint"), input_fee_ppk=1000)
    yield service
    service.stop()


@pytest.fixture
async def wallets(tmp_path):
    """make(name, mints, **kwargs) -> EcashWallet in tmp_path/name, closed after the test."""
    opened: list[EcashWallet] = []

    def make(name: str, mints: list[str], **kwargs) -> EcashWallet:
        wallet = EcashWallet(tmp_path / name, mints, **kwargs)
        opened.append(wallet)
        return wallet

    yield make
    for wallet in opened:
        await wallet.close()


@pytest.fixture
async def customer(wallets, mint):
    wallet = wallets("customer", [mint.url])
    assert await wallet.mint_from_lightning(100, mint.url) == 100
    return wallet


@pytest.fixture
def provider(wallets, mint):
    return wallets("provider", [mint.url + "/"], p2pk_private_key=keys_by_parity()[0])


def decode_b(token: str) -> dict:
    raw = token[len("cashuB"):]
    return cbor2.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))


def encode_b(obj: dict) -> str:
    return "cashuB" + base64.urlsafe_b64encode(cbor2.dumps(obj)).decode().rstrip("=")


def keys_by_parity() -> tuple[str, str]:
    """(even-Y secret, odd-Y secret), fresh each call."""
    even = odd = None
    while even is None or odd is None:
        key = coincurve.PrivateKey()
        if key.public_key.format()[0] == 2:
            even = even or key.secret.hex()
        else:
            odd = odd or key.secret.hex()
    return even, odd


def xonly(secret_hex: str) -> str:
    return coincurve.PrivateKey(bytes.fromhex(secret_hex)).public_key.format()[1:].hex()


async def refused(coro, *words: str, retryable: bool = False) -> PaymentError:
    with pytest.raises(PaymentError) as caught:
        await coro
    error = caught.value
    assert error.retryable is retryable, error.customer_message
    for word in words:
        assert word in error.customer_message, error.customer_message
    return error


async def test_payment_arrives_and_balances_add_up(customer, provider, mint):
    token = await customer.send(21)
    assert token.startswith("cashuB")
    info = provider.inspect(token)
    assert (info.mint, info.unit, info.amount, info.has_dleq) == (mint.url, "sat", 21, True)

    received = await provider.receive(token, min_amount=21)

    assert received == Received(amount=21, fee=0, mint=mint.url, unit="sat", token_id=info.token_id)
    assert await customer.balance() == {mint.url: 79}
    assert await provider.balance() == {mint.url: 21}
    assert await customer.total_balance() + await provider.total_balance() == 100
    assert await customer.check_spent(token)
    # the same token again: the mint says spent, and that is final
    await refused(provider.receive(token, min_amount=21), "already spent")
    assert await provider.total_balance() == 21


async def test_receives_take_fresh_secrets_across_sends_and_restarts(customer, wallets, mint, tmp_path):
    """Receiving derives its outputs' secrets from counter blocks kept in memory (_take_counters);
    Nutshell's own swaps (a send) and a reopened wallet must never derive the same secrets: the
    mint would refuse outputs it already signed."""
    marks = []
    provider = wallets("provider", [mint.url])
    for i in range(3):
        await provider.receive(await customer.send(3), min_amount=3, before_swap=marks.append)
        if i == 0:
            client = provider._wallets[mint.url].httpx  # one HTTP client for every call to the mint
    paid_out = await provider.send(4)                    # Nutshell's split, its own counter
    assert provider._wallets[mint.url].httpx is client and not client.is_closed
    await provider.close()
    assert client.is_closed
    again = wallets("provider", [mint.url])              # the same files: a restart
    for _ in range(3):
        await again.receive(await customer.send(2), min_amount=2, before_swap=marks.append)
    await again.receive(paid_out, min_amount=4)          # our own ecash back, through a swap
    assert await again.balance() == {mint.url: 15}
    counters = [m["counter"] for m in marks]
    assert counters == sorted(counters) and len(set(counters)) == 6
    assert counters[3] >= counters[0] + COUNTER_BLOCK    # the first block's rest was skipped


async def test_sent_proofs_are_reserved_and_never_sent_twice(customer, provider):
    tokens = [await customer.send(30) for _ in range(3)]
    assert len({provider.inspect(t).token_id for t in tokens}) == 3
    assert await customer.total_balance() == 10
    await refused(customer.send(11), "Not enough ecash")
    for token in tokens:
        assert (await provider.receive(token, min_amount=30)).amount == 30


async def test_garbage_truncated_and_empty_tokens_are_refused(customer, provider):
    token = await customer.send(8)
    body = decode_b(token)
    no_keysets = encode_b({**body, "t": []})
    no_proofs = encode_b({**body, "t": [{**body["t"][0], "p": []}]})
    empty_v3 = "cashuA" + base64.urlsafe_b64encode(json.dumps({"token": []}).encode()).decode()
    cases = {
        "": "not a Cashu token",
        "hello world": "not a Cashu token",
        "cashuB!!!not-base64": "damaged or incomplete",
        token[: len(token) // 2]: "damaged or incomplete",
        token[:-3]: "damaged or incomplete",
        no_keysets: "contains no proofs",
        no_proofs: "contains no proofs",
        empty_v3: "damaged or incomplete",
    }
    for bad, words in cases.items():
        with pytest.raises(PaymentError) as caught:
            provider.inspect(bad)
        assert words in caught.value.customer_message and not caught.value.retryable
        await refused(provider.receive(bad, min_amount=1), words)
    assert not await customer.check_spent(token)


async def test_token_from_a_mint_not_accepted_is_refused_without_connecting(
        customer, provider, wallets, fee_mint):
    # A port that listens but that nobody should ever connect to: any connection would wait
    # in its backlog, where accept() finds it.
    trap = socket.socket()
    trap.bind(("127.0.0.1", 0))
    trap.listen(8)
    trap.setblocking(False)
    trap_url = f"http://127.0.0.1:{trap.getsockname()[1]}"
    token = await customer.send(5)
    rewritten = encode_b({**decode_b(token), "m": trap_url})

    started = time.monotonic()
    await refused(provider.receive(rewritten, min_amount=5), "does not accept", trap_url)
    assert time.monotonic() - started < 1
    with pytest.raises(BlockingIOError):
        trap.accept()
    trap.close()
    assert not any(trap_url.split(":")[-1] in p.name for p in provider.directory.iterdir())

    # a real token of a real second mint
    stranger = wallets("stranger", [fee_mint.url])
    await stranger.mint_from_lightning(10, fee_mint.url)
    await refused(provider.receive(await stranger.send(4), min_amount=4), "does not accept",
                  fee_mint.url)
    assert not await customer.check_spent(token)


async def test_wrong_unit_is_refused(customer, provider):
    token = await customer.send(5)
    as_usd = encode_b({**decode_b(token), "u": "usd"})
    await refused(provider.receive(as_usd, min_amount=5), "in usd", "paid in sat")
    assert not await customer.check_spent(token)


async def test_underpayment_is_refused_and_the_token_stays_with_the_customer(customer, provider):
    token = await customer.send(21)
    await refused(provider.receive(token, min_amount=22), "worth 21 sat", "price is 22 sat")
    assert not await customer.check_spent(token)
    # the customer takes it back
    assert (await customer.receive(token, min_amount=21)).amount == 21
    assert await customer.total_balance() == 100


async def test_token_without_dleq_is_refused_and_not_redeemed(customer, provider):
    token = await customer.send(21)   # 16 + 4 + 1: three proofs
    body = decode_b(token)
    assert len(body["t"][0]["p"]) == 3
    for strip in ([0, 1, 2], [2]):    # Nutshell stops checking at the first proof without DLEQ
        stripped = decode_b(token)
        for index in strip:
            del stripped["t"][0]["p"][index]["d"]
        bad = encode_b(stripped)
        assert not provider.inspect(bad).has_dleq
        await refused(provider.receive(bad, min_amount=21), "no DLEQ")
    assert not await customer.check_spent(token)


@pytest.mark.parametrize("field", ["e", "s", "r"])
async def test_tampered_dleq_is_refused_and_not_redeemed(customer, provider, field):
    token = await customer.send(21)
    body = decode_b(token)
    dleq = body["t"][0]["p"][-1]["d"]     # the last proof: all of them must be checked
    value = bytearray(dleq[field])
    value[-1] ^= 0x01                     # one hex character changes
    dleq[field] = bytes(value)
    await refused(provider.receive(encode_b(body), min_amount=21), "DLEQ proof does not verify")
    assert not await customer.check_spent(token)
    assert (await provider.receive(token, min_amount=21)).amount == 21   # the original is fine


@pytest.mark.parametrize("parity", ["even", "odd"])
async def test_p2pk_locked_to_our_key_is_redeemed(customer, wallets, mint, parity):
    even, odd = keys_by_parity()
    key = even if parity == "even" else odd
    assert coincurve.PrivateKey(bytes.fromhex(key)).public_key.format()[0] == (2 if parity == "even" else 3)
    provider = wallets("provider", [mint.url], p2pk_private_key=key)
    x = xonly(key)
    assert provider.p2pk_pubkey == "02" + x       # advertised even-Y form, whatever the key's parity

    # how a sender may write our key: compressed as advertised, x-only (Nostr), "03" + x
    for lock in (provider.p2pk_pubkey, x, "03" + x):
        token = await customer.send(8, lock_to=lock)
        conditions = provider.inspect(token).conditions
        assert all(c is not None and c.kind == "P2PK" for c in conditions)
        received = await provider.receive(token, min_amount=8, require_lock=True)
        assert received.amount == 8
        assert await customer.check_spent(token)
    assert await provider.total_balance() == 24


async def test_p2pk_locked_to_another_key_is_refused_and_not_redeemed(customer, provider):
    somebody = xonly(keys_by_parity()[1])
    token = await customer.send(8, lock_to=somebody)
    await refused(provider.receive(token, min_amount=8), "locked to another key")
    assert not await customer.check_spent(token)
    # and a plain token where a lock is required
    plain = await customer.send(8)
    await refused(provider.receive(plain, min_amount=8, require_lock=True), "must be P2PK-locked")
    assert not await customer.check_spent(plain)


async def test_conditions_the_worker_cannot_meet_are_refused_before_asking_the_mint(
        customer, provider):
    token = await customer.send(8)
    other = "02" + xonly(keys_by_parity()[0])
    cases = {
        json.dumps(["HTLC", {"nonce": "ab" * 16, "data": "00" * 32}]): "HTLC condition",
        json.dumps(["P2PK", {"nonce": "ab" * 16, "data": provider.p2pk_pubkey,
                             "tags": [["pubkeys", other], ["n_sigs", "2"]]}]): "needs 2 signatures",
        json.dumps(["P2PK", {"nonce": "ab" * 16, "data": 7}]): "malformed spending condition",
    }
    for secret, words in cases.items():
        body = decode_b(token)
        body["t"][0]["p"][0]["s"] = secret
        await refused(provider.receive(encode_b(body), min_amount=8), words)
    assert not await customer.check_spent(token)


async def test_lock_that_expires_too_soon_is_refused(customer, provider):
    now = int(time.time())
    short = await customer.send(8, lock_to=provider.p2pk_pubkey, locktime=now + 60,
                                refund_to=xonly(keys_by_parity()[0]))
    assert provider.inspect(short).conditions[0].locktime == now + 60
    await refused(provider.receive(short, min_amount=8, require_lock=True, min_locktime=now + 3600),
                  "lock expires", "take it back")
    assert not await customer.check_spent(short)
    long = await customer.send(8, lock_to=provider.p2pk_pubkey, locktime=now + 7200)
    received = await provider.receive(long, min_amount=8, require_lock=True, min_locktime=now + 3600)
    assert received.amount == 8


async def test_refund_locked_to_the_customers_nostr_key(customer, provider, wallets, mint):
    await provider.receive(await customer.send(30), min_amount=30)
    nostr_secret = keys_by_parity()[1]                  # odd Y: the case Nutshell gets wrong
    nostr_pubkey = xonly(nostr_secret)

    refund = await provider.send(12, lock_to=nostr_pubkey)

    assert provider.inspect(refund).conditions[0].pubkeys == ("02" + nostr_pubkey,)
    assert await provider.total_balance() == 18
    thief = wallets("thief", [mint.url])
    await refused(thief.receive(refund, min_amount=12), "locked to another key")
    owner = wallets("owner", [mint.url], p2pk_private_key=nostr_secret)
    assert (await owner.receive(refund, min_amount=12)).amount == 12


async def test_a_lock_to_the_nostr_key_is_redeemed_with_also_key_by_any_wallet(customer, provider, wallets, mint):
    """`also_key` (a customer collecting refunds a DVM locked to "02" + its Nostr key): a wallet
    with another P2PK key of its own, and one with none, sign those locks with it. SIG_ALL to
    that key is refused before the mint is asked (only the wallet's own key gets SIG_ALL
    signatures, from Nutshell)."""
    await provider.receive(await customer.send(30), min_amount=30)
    nostr_secret = keys_by_parity()[1]
    nostr_pubkey = xonly(nostr_secret)
    own_key = wallets("own-key", [mint.url], p2pk_private_key=keys_by_parity()[0])
    no_key = wallets("no-key", [mint.url])
    for wallet in (own_key, no_key):
        refund = await provider.send(6, lock_to=nostr_pubkey)
        await refused(wallet.receive(refund, min_amount=6, require_lock=True), "locked to another key")
        assert (await wallet.receive(refund, min_amount=6, require_lock=True, also_key=nostr_secret)).amount == 6
    sig_all = decode_b(await provider.send(6, lock_to=nostr_pubkey))
    secret = json.loads(sig_all["t"][0]["p"][0]["s"])
    secret[1]["tags"] = [["sigflag", "SIG_ALL"]]
    sig_all["t"][0]["p"][0]["s"] = json.dumps(secret)
    await refused(no_key.receive(encode_b(sig_all), min_amount=6, also_key=nostr_secret), "SIG_ALL")
    with pytest.raises(ValueError):
        await no_key.receive(refund, min_amount=6, also_key=nostr_secret, job_id="ab" * 32)


async def test_mint_fees_are_counted_before_and_after_the_swap(wallets, fee_mint):
    payer = wallets("payer", [fee_mint.url])
    await payer.mint_from_lightning(100, fee_mint.url)
    shop = wallets("shop", [fee_mint.url])
    token = await payer.send(8)                         # one proof: the swap costs 1 sat
    assert shop.inspect(token).proof_count == 1
    await refused(shop.receive(token, min_amount=8), "fee of 1 sat", "price of 8 sat")
    assert not await payer.check_spent(token)
    received = await shop.receive(token, min_amount=7)
    assert (received.amount, received.fee) == (7, 1)
    assert await shop.total_balance() == 7


async def test_mint_outage_is_retryable_and_the_token_survives(wallets, tmp_path):
    service = start_mint(tmp_path / "mint")
    port = int(service.url.rsplit(":", 1)[1])
    try:
        customer = wallets("customer", [service.url])
        provider = wallets("provider", [service.url])
        await customer.mint_from_lightning(50, service.url)
        await provider.receive(await customer.send(5), min_amount=5)   # keysets now loaded
        token = await customer.send(20)

        service.stop()
        error = await refused(provider.receive(token, min_amount=20), "unreachable",
                              retryable=True)
        assert service.url in error.customer_message

        service = start_mint(tmp_path / "mint", port=port)
        assert not await customer.check_spent(token)
        assert (await provider.receive(token, min_amount=20)).amount == 20
        assert await provider.total_balance() == 25
    finally:
        service.stop()


def external_invoice(amount_sat: int) -> str:
    """A signed bolt11 invoice of some other Lightning node (FakeWallet "pays" any invoice).

    Not a quote of the same mint: FakeWallet marks its own invoices paid at once, and a mint
    refuses to melt a quote that is already paid.
    """
    tags = Bolt11Tags()
    tags.add(TagChar.payment_hash, os.urandom(32).hex())
    tags.add(TagChar.payment_secret, os.urandom(32).hex())
    tags.add(TagChar.description, "dvm test")
    invoice = Bolt11(currency="bc", amount_msat=MilliSatoshi(amount_sat * 1000),
                     date=int(time.time()), tags=tags)
    return bolt11_encode(invoice, coincurve.PrivateKey().secret.hex())


async def test_melt_pays_a_lightning_invoice(customer, provider, mint):
    await provider.receive(await customer.send(40), min_amount=40)

    result = await provider.melt(external_invoice(10))

    assert (result["state"], result["amount"], result["mint"]) == ("paid", 10, mint.url)
    assert 0 <= result["fee_paid"] <= 2                  # FakeWallet reserves 2 sat, returns change
    assert await provider.total_balance() == 40 - 10 - result["fee_paid"]
    await refused(provider.melt(external_invoice(100)), "Not enough ecash")


async def test_invoices_fund_the_wallet(wallets, mint):
    payee = wallets("payee", [mint.url])
    invoice = await payee.create_invoice(10, mint.url)
    assert invoice.bolt11.startswith("lnbc") and invoice.amount == 10
    assert await payee.claim_invoice(invoice, timeout=10) == 10
    assert await payee.balance() == {mint.url: 10}


async def test_wallet_files_are_private_and_creation_prints_nothing(customer, wallets, mint,
                                                                   capsys, caplog):
    caplog.set_level(logging.DEBUG)
    fresh = wallets("fresh", [mint.url])
    await fresh.balance()                       # creates the database: Nutshell prints here
    assert capsys.readouterr().out == ""
    for wallet in (customer, fresh):
        assert stat.S_IMODE(wallet.directory.stat().st_mode) == 0o700
        files = list(wallet.directory.iterdir())
        assert any(f.name.endswith(".sqlite3") for f in files)
        for path in files:
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    mnemonic = next(iter(fresh._wallets.values())).mnemonic
    assert mnemonic not in caplog.text and mnemonic.split()[0]
    assert not hasattr(sys, "tracebacklimit")


def test_importing_nutshell_leaves_the_process_alone(tmp_path, mint):
    """In a fresh interpreter: .env files, env variables, tracebacklimit, stdout and loguru."""
    workdir = tmp_path / "cwd"
    home = tmp_path / "home"
    (home / ".cashu").mkdir(parents=True)
    workdir.mkdir()
    (workdir / ".env").write_text("TOR=TRUE\nDEBUG=TRUE\nWALLET_VERBOSE_REQUESTS=TRUE\n"
                                  "JUNK_FROM_DOTENV=1\n")
    (home / ".cashu" / ".env").write_text("JUNK_FROM_HOME=1\nTOR=TRUE\n")
    script = textwrap.dedent("""
        import asyncio, json, logging, os, sys
        before = dict(os.environ)
        seen = []
        class Keep(logging.Handler):
            def emit(self, record):
                seen.append(record.getMessage())
        logging.getLogger("cashu").addHandler(Keep())
        logging.getLogger("cashu").setLevel(logging.DEBUG)

        from dvm_core.payments import nutshell
        from dvm_core.payments.wallet import COUNTER_BLOCK, EcashWallet

        async def main():
            wallet = EcashWallet("wallet", [sys.argv[1]])
            balance = await wallet.balance()         # creates the wallet database
            await wallet.mint_from_lightning(4, sys.argv[1])
            await wallet.close()
            return balance

        balance = asyncio.run(main())
        cashu = nutshell.load()
        from cashu.core.secret import Tags
        Tags([["locktime", "soon"]]).get_tag_int("locktime")     # Nutshell logs a warning
        sys.stderr.write("RESULT " + json.dumps({
            "environ_unchanged": dict(os.environ) == before,
            "junk": [k for k in os.environ if k.startswith("JUNK")],
            "tracebacklimit": hasattr(sys, "tracebacklimit"),
            "tor": cashu.settings.tor, "debug": cashu.settings.debug,
            "verbose": cashu.settings.wallet_verbose_requests,
            "cashu_log": seen, "balance": balance,
        }) + "\\n")
    """)
    env = {**os.environ, "HOME": str(home), "DEBUG": "TRUE", "PYTHONPATH": str(REPO)}
    env.pop("PYTHONTRACEBACKLIMIT", None)
    done = subprocess.run([sys.executable, "-c", script, mint.url], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    result = json.loads(done.stderr.split("RESULT ", 1)[1])
    assert result["environ_unchanged"]
    assert result["junk"] == []
    assert not result["tracebacklimit"]
    assert (result["tor"], result["debug"], result["verbose"]) == (False, False, False)
    assert result["cashu_log"] == ["Tag locktime is not an integer"]
    assert result["balance"] == {mint.url: 0}
    # nothing from loguru on stderr either
    assert "| WARNING |" not in done.stderr and "| INFO |" not in done.stderr
