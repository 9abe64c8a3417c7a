"""The hostile-input catalogue (issue 19): every kind of bad input a customer can send, in one
table, run against ONE worker process (`dvm run`, with a real relay and a real Cashu mint).

Each case is a row of `CASES`: its id, its category, how it is built (a function that returns the
signed request event, and for nutzaps what is sent after the request), the words the customer's
feedback must hold, and the words the worker's log line about that request must hold. A case
whose `feedback` is None is one the worker ignores by design (not addressed to it, dated in the
future, a nutzap that cannot be read): it gets no answer, only its log line where one is due.

After the whole table the same process (same pid, never restarted) answers a normal paid job and
a normal merge, and its log holds no internal error (no handler that failed, no traceback).

The plugin kinds that are slow on CPU (LLM fine-tuning, image training) are only sent inputs that
are refused before any training: at parse, at the probe of their URLs or in their precheck."""

from __future__ import annotations

import asyncio
import base64
import functools
import http.server
import io
import json
import os
import shutil
import struct
import tarfile
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable

import numpy as np
import pytest

from dvm_core.datarefs import sha256_file
from dvm_core.payments.wallet import EcashWallet
from dvm_core.protocol import nip44
from dvm_core.protocol.ecash import build_nutzap, decode_payment_request, decode_token
from dvm_core.protocol.encryption import decrypt, encrypt
from dvm_core.protocol.events import Keys, sign_event
from dvm_core.protocol.nip90 import FEEDBACK_KIND, JobInput, build_request, parse_feedback, parse_result

from dvm_core.devtools.localnet import start_blob_server_process

from .conftest import REPO, WorkerProcess
from .test_archives import _huge_header_tar, make_tar, make_zip, patch_zip_sizes, tar_special
from .test_bad_input import Probe
from .test_bad_payments import decode_b, encode_a, encode_b

TEXT_KIND, IMAGE_KIND, LLM_KIND, MERGE_KIND = 5790, 5750, 5751, 5752
PRICE = 5
MAX_REQUEST_BYTES = 20000
MAX_DOWNLOAD_BYTES = 8 << 20
PRECHECK_SECONDS = 20
PLUGINS = "textstats,image-classifier,llm-finetune,fedavg"
PRIVATE = "same"   # a private request's reason is logged too, with the customer's strings masked


# --- the worker, its files and the customer's side -------------------------------------------------

class Files:
    """A web server on loopback that the worker may fetch from only by the name `localhost`
    (its `allowed_hosts`): the same server by any address form is a private address."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        files = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(root), **kwargs)

            def do_GET(self):
                if self.path.startswith("/redirect-to-loopback"):
                    self.send_response(302)
                    self.send_header("Location", f"http://127.0.0.1:{files.port}/train.npz")
                    self.end_headers()
                    return
                super().do_GET()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def put(self, name: str, data: bytes) -> str:
        """Serve `data` as `name`; returns its data URL (with its sha256)."""
        path = self.root / name
        path.write_bytes(data)
        return self.url(name)

    def url(self, name: str, host: str = "localhost", sha256: str | None = None) -> str:
        path = self.root / name
        digest = sha256 or (sha256_file(path) if path.exists() else "ab" * 32)
        return f"http://{host}:{self.port}/{name}#sha256={digest}"

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    served = Files(tmp_path_factory.mktemp("served"))
    build_assets(served, tmp_path_factory.mktemp("assets"))
    yield served
    served.close()


@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    service = start_blob_server_process(tmp_path_factory.mktemp("blobs"))
    yield service
    service.stop()


@pytest.fixture(scope="module")
def hostile_worker(tmp_path_factory, relay, mint, files, blobs):
    """One `dvm run` for the whole catalogue: text-stats (paid), image-classifier, llm-finetune
    and fedavg (free), fetching only from `localhost`; this checkout's plugins."""
    keys = Keys.generate()
    worker = WorkerProcess(
        tmp_path_factory.mktemp("hostile-worker"), relay.url, keys,
        mints=[mint.url], max_request_bytes=MAX_REQUEST_BYTES, max_download_bytes=MAX_DOWNLOAD_BYTES,
        precheck_seconds=PRECHECK_SECONDS, allowed_hosts=["localhost"], payment_timeout=600,
        mint_retry_seconds=2, download_timeout=30, blob_servers=[blobs.url],
        prices={"text-stats": PRICE},
        plugins={"image-classifier": {"sats_per_million_sample_epochs": 0},
                 "llm-finetune": {"sats_per_million_tokens": 0},
                 "fedavg": {"sats_per_gb": 0}})
    worker.keys = keys
    path = os.pathsep.join([str(REPO), str(REPO / "plugins"), os.environ.get("PYTHONPATH", "")])
    worker.start(env={"DVM_PLUGINS": PLUGINS, "PYTHONPATH": path})
    worker.wait_log("worker ready", timeout=60)
    worker.pid = worker.proc.pid
    yield worker
    worker.stop()


@dataclass
class Env:
    """What a case's builder has: the customer (`probe`), the worker, the files, the mint."""

    probe: Probe
    worker: WorkerProcess
    files: Files
    mint_url: str
    tmp_path: Path
    _wallet: EcashWallet | None = None

    @property
    def dvm(self) -> str:
        return self.worker.keys.public_key

    def clear(self, kind: int, inputs: list[JobInput], params: dict | None = None, *, cashu: str | None = None,
              extra: list[list[str]] = ()) -> dict:
        """A request in the clear, addressed to the worker (the log then shows the reason)."""
        _, content, tags = build_request(kind, inputs, params or {}, providers=[self.dvm], cashu=cashu)
        return self.probe.sign(tags + list(extra), content, kind=kind)

    def private(self, kind: int, inputs: list[JobInput], params: dict | None = None, scheme: str = "nip44",
                cashu: str | None = None) -> dict:
        enc = functools.partial(encrypt, scheme, self.probe.keys.private_key, self.dvm)
        _, content, tags = build_request(kind, inputs, params or {}, providers=[self.dvm], encrypt=enc,
                                         cashu=cashu)
        return self.probe.sign(tags, content, kind=kind)

    def raw(self, tags: list[list[str]], content: str = "", kind: int = TEXT_KIND, **fields) -> dict:
        tags = tags + [["p", self.dvm]]
        if fields:
            return sign_event(self.probe.keys, kind, content, tags, **fields)
        return self.probe.sign(tags, content, kind=kind)

    async def wallet(self) -> EcashWallet:
        if self._wallet is None:
            self._wallet = EcashWallet(self.tmp_path / "wallet", [self.mint_url],
                                       p2pk_private_key=self.probe.keys.private_key)
            await self._wallet.mint_from_lightning(20, self.mint_url)
        return self._wallet

    async def token(self, amount: int = PRICE, **lock) -> str:
        return await (await self.wallet()).send(amount, mint=self.mint_url, **lock)

    def nutzap(self, token: str, request: dict) -> dict:
        decoded = decode_token(token)
        kind, content, tags = build_nutzap(decoded.mint, list(decoded.proofs), self.dvm, unit=decoded.unit,
                                           zapped_event=request["id"], zapped_kind=request["kind"])
        return sign_event(self.probe.keys, kind, content, tags)


@dataclass(frozen=True)
class Case:
    id: str
    category: str
    build: Callable[[Env], Awaitable[dict]]     # the signed request
    feedback: str | None                        # in the customer's feedback; None: no answer
    log: str | None                             # in the worker's log line about the request
    status: str = "error"                       # the feedback's status
    pay: Callable[[Env, dict, dict], Awaitable[dict]] | None = None   # a nutzap answering payment-required


CASES: list[Case] = []


def case(id: str, category: str, feedback: str | None, log: str | None = "same", **kw):
    """Register the decorated builder as a case; `log="same"`: the log holds the feedback's words."""
    def register(build):
        async def built(env):
            out = build(env)
            return await out if asyncio.iscoroutine(out) else out
        CASES.append(Case(id, category, built, feedback, feedback if log == "same" else log, **kw))
        return build
    return register


TEXT = [JobInput("the cat and the hat", "text")]


def url_input(url: str, marker: str = "") -> list[JobInput]:
    return [JobInput(url, "url", "", marker)]


# --- events: tags, JSON content, kinds, dates, size ---------------------------------------------------

for _id, _tags, _words in [
    ("i-tag-without-type", [["i", "hello"]], 'an "i" tag needs data and a type'),
    ("unknown-input-type", [["i", "hello", "blob"]], "input type 'blob' is not one of url, event, job, text"),
    ("event-input-not-hex", [["i", "nope", "event"]], "an input of type 'event' must be a 64-hex event id"),
    ("url-input-not-absolute", [["i", "www.example.com/a.txt", "url"]], "an input of type 'url' must be an absolute URL"),
    ("param-without-value", [["i", "hi", "text"], ["param", "top"]], 'a "param" tag needs a name and a value'),
    ("param-given-twice", [["i", "hi", "text"], ["param", "top", "1"], ["param", "top", "2"]],
     "param 'top' is given more than once"),
    ("bid-not-a-number", [["i", "hi", "text"], ["bid", "ten sats"]], 'the "bid" tag must be a whole number of millisats'),
    ("bid-unicode-digit", [["i", "hi", "text"], ["bid", "²"]], 'the "bid" tag must be a whole number of millisats'),
    ("p-tag-npub", [["i", "hi", "text"], ["p", "npub1notahexkey"]], 'a "p" tag must hold a 64-hex public key'),
    ("no-input", [], "send the text to analyse as an input of type 'text'"),
    ("unknown-param", [["i", "hi", "text"], ["param", "colour", "red"]], "unknown param(s) colour for kind 5790"),
    ("param-out-of-range", [["i", "hi", "text"], ["param", "top", "1000"]], "param top must be between 1 and 100"),
    ("param-not-a-number", [["i", "hi", "text"], ["param", "top", "three"]], "must be numbers"),
]:
    case(_id, "events", _words)(lambda env, tags=_tags: env.raw(tags))


@case("oversized-request", "events", f"this DVM accepts at most {MAX_REQUEST_BYTES}: send large inputs by URL")
def _(env):
    return env.raw([["i", "word " * 5000, "text"]])


@case("oversized-encrypted-request", "events", f"this DVM accepts at most {MAX_REQUEST_BYTES}")
def _(env):   # refused before it is decrypted: the reason is not private
    return env.private(TEXT_KIND, [JobInput("word " * 5000, "text")])


@case("dated-in-the-future", "events", None, log="request dated in the future ignored")
def _(env):
    return env.raw([["i", "hi", "text"]], created_at=int(time.time()) + 3 * 3600)


@case("dated-long-ago", "events", None, log=None)
def _(env):
    # Older than the worker's subscription's `since`: the relay never hands it over, so the
    # worker neither answers nor logs it (a customer whose clock is a month slow hears nothing).
    return env.raw([["i", "hi", "text"]], created_at=int(time.time()) - 30 * 86400)


@case("kind-no-plugin-serves", "events", None, log=None)
def _(env):
    return env.raw([["i", "hello", "text"]], kind=5791)


@case("kind-1-note-mentioning-the-dvm", "events", None, log=None)
def _(env):
    return env.raw([], "hello", kind=1)


@case("encrypted-for-another-dvm", "events", None, log=None)
def _(env):
    other = Keys.generate().public_key
    content = encrypt("nip44", env.probe.keys.private_key, other, json.dumps([["i", "hi", "text"]]))
    return env.probe.sign([["encrypted"], ["p", other]], content)


# --- encrypted payloads ---------------------------------------------------------------------------

def _nip44_payload(env, padded: bytes, *, mac_ok: bool = True, version: int = 2) -> str:
    """A NIP-44 v2 payload of `padded` (padding as given) to the worker, its MAC right or not."""
    key = nip44.get_conversation_key(env.probe.keys.private_key, env.dvm)
    nonce = os.urandom(32)
    chacha_key, chacha_nonce, hmac_key = nip44.get_message_keys(key, nonce)
    ciphertext = nip44._chacha20(chacha_key, chacha_nonce, padded)
    mac = nip44._hmac_aad(hmac_key, ciphertext, nonce)
    if not mac_ok:
        mac = bytes([mac[0] ^ 1]) + mac[1:]
    return base64.b64encode(bytes([version]) + nonce + ciphertext + mac).decode()


def _nip04_payload(env, padded: bytes) -> str:
    """A NIP-04 payload of `padded` (no PKCS#7 padding added) to the worker."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    from pynostr.key import PrivateKey
    secret = PrivateKey(bytes.fromhex(env.probe.keys.private_key)).compute_shared_secret(env.dvm)
    iv = os.urandom(16)
    encryptor = Cipher(algorithms.AES(secret), modes.CBC(iv)).encryptor()
    body = encryptor.update(padded) + encryptor.finalize()
    return f"{base64.b64encode(body).decode()}?iv={base64.b64encode(iv).decode()}"


def _encrypted(env, content: str) -> dict:
    return env.probe.sign([["encrypted"], ["p", env.dvm]], content)


_PLAIN = json.dumps([["i", "hello", "text"]]).encode()
_NIP44_GOOD_PAD = len(_PLAIN).to_bytes(2, "big") + _PLAIN + bytes(nip44.calc_padded_len(len(_PLAIN)) - len(_PLAIN))

for _id, _make, _words in [
    ("nip44-garbage", lambda env: "this is not ciphertext at all", "could not decrypt the content (nip44)"),
    ("nip44-empty", lambda env: "", "could not decrypt the content (nip44): invalid payload length 0"),
    ("nip44-bad-base64", lambda env: "A" * 99 + "!" * 33, "could not decrypt the content (nip44): invalid base64"),
    ("nip44-unknown-version", lambda env: _nip44_payload(env, _NIP44_GOOD_PAD, version=3),
     "could not decrypt the content (nip44): unknown encryption version 3"),
    ("nip44-bad-mac", lambda env: _nip44_payload(env, _NIP44_GOOD_PAD, mac_ok=False),
     "could not decrypt the content (nip44): invalid MAC"),
    ("nip44-bad-padding", lambda env: _nip44_payload(env, (5000).to_bytes(2, "big") + _NIP44_GOOD_PAD[2:]),
     "could not decrypt the content (nip44): invalid padding"),
    ("nip44-wrong-key", lambda env: encrypt("nip44", env.probe.keys.private_key, Keys.generate().public_key,
                                            _PLAIN.decode()), "could not decrypt the content (nip44): invalid MAC"),
    ("nip04-garbage", lambda env: "bm90IGEgcmVhbCBwYXlsb2Fk?iv=AAAAAAAAAAAAAAAAAAAAAA==",
     "could not decrypt the content (nip04)"),
    ("nip04-bad-base64", lambda env: "Zm9v?iv=bad base64!", "could not decrypt the content (nip04): invalid base64"),
    ("nip04-short-iv", lambda env: base64.b64encode(bytes(16)).decode() + "?iv=AAAA",
     "could not decrypt the content (nip04): NIP-04 iv must be 16 bytes"),
    ("nip04-bad-padding", lambda env: _nip04_payload(env, _PLAIN[:16] + bytes(16)),
     "could not decrypt the content (nip04): bad padding"),
]:
    case(_id, "encrypted", _words)(lambda env, make=_make: _encrypted(env, make(env)))


@case("nip04-wrong-key", "encrypted", "could not decrypt the content (nip04)", log="rejected")
def _(env):
    # NIP-04 has no MAC: a wrong key reads as bad padding, bad UTF-8, or (rarely) junk that is not JSON
    return _encrypted(env, encrypt("nip04", env.probe.keys.private_key, Keys.generate().public_key,
                                   _PLAIN.decode()))


for _id, _plaintext, _words in [
    ("decrypted-not-json", "top=3, text=hello", "the decrypted content is not JSON"),
    ("decrypted-json-object", '{"i": ["hello", "text"]}', "encrypted content must be a JSON array of tags"),
    ("decrypted-number-in-tag", '[["i", "hello", "text"], ["param", "top", 3]]',
     "encrypted content must be a JSON array of tags"),
    ("decrypted-json-nested-deep", "[" * 3000 + "]" * 3000, "the decrypted content is not JSON"),
]:
    case(_id, "encrypted", _words, log=PRIVATE)(
        lambda env, text=_plaintext: _encrypted(env, encrypt("nip44", env.probe.keys.private_key, env.dvm, text)))


# --- tokens and nutzaps -------------------------------------------------------------------------

@case("token-garbage", "tokens", "not a Cashu token")
def _(env):
    return env.clear(TEXT_KIND, TEXT, cashu="hello, here is my money")


@case("token-truncated", "tokens", "damaged or incomplete")
async def _(env):
    token = await env.token()
    return env.clear(TEXT_KIND, TEXT, cashu=token[: len(token) // 2])


@case("token-without-proofs", "tokens", "no proofs")
def _(env):
    return env.clear(TEXT_KIND, TEXT, cashu=encode_a({"token": [{"mint": env.mint_url, "proofs": []}], "unit": "sat"}))


@case("token-wrong-mint", "tokens", "does not accept ecash from the mint http://127.0.0.1:9")
async def _(env):
    return env.private(TEXT_KIND, TEXT, cashu=encode_b({**decode_b(await env.token()), "m": "http://127.0.0.1:9"}))


@case("token-spent", "tokens", "already spent")
async def _(env):
    token = await env.token()
    await (await env.wallet()).receive(token, min_amount=PRICE)
    return env.private(TEXT_KIND, TEXT, cashu=token)


@case("token-wrong-unit", "tokens", "in usd")
async def _(env):
    return env.private(TEXT_KIND, TEXT, cashu=encode_b({**decode_b(await env.token()), "u": "usd"}))


@case("token-too-little", "tokens", f"worth 3 sat, but the price is {PRICE} sat; it was not redeemed")
async def _(env):
    return env.private(TEXT_KIND, TEXT, cashu=await env.token(3))


@case("token-unlocked-in-a-public-request", "tokens", "The token is not locked and was in a public event")
async def _(env):
    return env.clear(TEXT_KIND, TEXT, cashu=await env.token())


@case("token-locked-to-another-key", "tokens", "locked to another key")
async def _(env):
    return env.clear(TEXT_KIND, TEXT, cashu=await env.token(lock_to="02" + Keys.generate().public_key))


@case("token-without-dleq", "tokens", "no DLEQ proofs")
async def _(env):
    body = decode_b(await env.token())
    for proof in body["t"][0]["p"]:
        del proof["d"]
    return env.private(TEXT_KIND, TEXT, cashu=encode_b(body))


def _lock_of(feedback: dict) -> str:
    return decode_payment_request(parse_feedback(feedback).content)["nut10"]["d"]


async def _nutzap_too_little(env, request, asked):
    return env.nutzap(await env.token(3, lock_to=_lock_of(asked)), request)


async def _nutzap_wrong_lock(env, request, asked):
    return env.nutzap(await env.token(PRICE, lock_to="02" + Keys.generate().public_key), request)


async def _nutzap_wrong_mint(env, request, asked):
    token = encode_b({**decode_b(await env.token(PRICE, lock_to=_lock_of(asked))), "m": "http://127.0.0.1:9"})
    return env.nutzap(token, request)


async def _nutzap_garbage(env, request, asked):
    return sign_event(env.probe.keys, 9321, "", [["proof", "{not json"], ["u", env.mint_url], ["e", request["id"]],
                                                  ["p", env.dvm]])


for _id, _pay, _words, _log in [
    ("nutzap-too-little", _nutzap_too_little, "worth 3 sat", "a nutzap did not pay its job"),
    ("nutzap-locked-to-another-key", _nutzap_wrong_lock, "locked to", "a nutzap did not pay its job"),
    ("nutzap-wrong-mint", _nutzap_wrong_mint, "does not accept ecash from the mint", "a nutzap did not pay its job"),
    ("nutzap-unreadable", _nutzap_garbage, None, "unreadable nutzap"),
]:
    case(_id, "nutzaps", _words, log=_log, status="payment-required", pay=_pay)(
        lambda env: env.clear(TEXT_KIND, TEXT))


# --- URLs ---------------------------------------------------------------------------------------------

def _image_job(env, url: str) -> dict:
    return env.clear(IMAGE_KIND, url_input(url))


for _id, _host, _words in [
    ("url-loopback-ipv4", "127.0.0.1", "refusing to download from 127.0.0.1: a loopback address"),
    ("url-loopback-ipv6", "[::1]", "refusing to download from ::1: a loopback address"),
    ("url-ipv4-mapped-ipv6", "[::ffff:127.0.0.1]", "a loopback address"),
    ("url-nat64", "[64:ff9b::7f00:1]", "a loopback address"),
    ("url-private-10", "10.1.2.3", "refusing to download from 10.1.2.3: a private address"),
    ("url-private-192-168", "192.168.1.1", "a private address"),
    ("url-cloud-metadata", "169.254.169.254", "refusing to download from 169.254.169.254: a link-local address"),
    ("url-carrier-grade-nat", "100.64.0.1", "a private address"),
    ("url-unspecified", "0.0.0.0", "refusing to download from 0.0.0.0: an unspecified address"),
    ("url-decimal-ipv4", "2130706433", "a loopback address"),
    ("url-hex-ipv4", "0x7f000001", "a loopback address"),
    ("url-userinfo-trick", "localhost@127.0.0.1", "a loopback address"),
]:
    case(_id, "urls", _words)(lambda env, host=_host: _image_job(env, env.files.url("train.npz", host=host)))


for _id, _url, _words in [
    ("url-ftp-scheme", "ftp://example.com/train.npz#sha256=" + "ab" * 32, "a data URL must be http:// or https://"),
    ("url-file-scheme", "file:///etc/passwd#sha256=" + "ab" * 32, "a data URL must be http:// or https://"),
    ("url-without-sha256", "https://example.com/train.npz", "give the sha256 of the data"),
]:
    case(_id, "urls", _words)(lambda env, url=_url: _image_job(env, url))


@case("url-redirect-to-loopback", "urls", "a loopback address")
def _(env):
    return _image_job(env, env.files.url("redirect-to-loopback", sha256=sha256_file(env.files.root / "train.npz")))


@case("url-sha256-mismatch", "urls", "the file's sha256 is")
def _(env):
    return _image_job(env, env.files.url("train.npz", sha256="00" * 32))


@case("url-404", "urls", "the server answered 404")
def _(env):
    return _image_job(env, env.files.url("nothing-here.npz"))


@case("url-too-big", "urls", f"more than the {MAX_DOWNLOAD_BYTES} bytes allowed")
def _(env):
    return _image_job(env, env.files.url("big.npz"))


@case("url-html-page", "urls", "got an HTML page, not the data")
def _(env):
    return _image_job(env, env.files.url("page.npz"))


# --- archives, npz files (the image classifier's training set) -----------------------------------------

ARCHIVES = [
    ("zip-traversal", "'..'"),
    ("zip-absolute-path", "absolute path"),
    ("zip-symlink", "is a symlink"),
    ("zip-ratio-bomb", "zip bomb"),
    ("zip-declared-huge", "more than"),
    ("zip-encrypted-member", "is encrypted"),
    ("zip-truncated", "corrupt or truncated"),
    ("tar-traversal", "'..'"),
    ("tar-symlink", "symlink"),
    ("tar-hardlink", "hardlink"),
    ("tar-device-file", "device file"),
    ("tar-fifo", "FIFO"),
    ("tar-gz-ratio-bomb", "zip bomb"),
    ("tar-gnu-long-name-bomb", "a tar header declares"),
    ("tar-pax-header-bomb", "a tar header declares"),
    ("not-an-archive", "neither an .npz file"),
]
for _name, _words in ARCHIVES:
    case(_name, "archives", _words)(lambda env, name=_name: _image_job(env, env.files.url(name)))

NPZ = [
    ("npz-pickled-objects", "holds Python objects"),
    ("npz-float-images", "must be uint8"),
    ("npz-one-dimensional-images", "must be N×H×W"),
    ("npz-labels-length-mismatch", "the labels do not match the images"),
    ("npz-float-labels", "must hold integer labels"),
    ("npz-without-labels", "has no array 'y'"),
    ("npz-one-class", "class"),
    ("npz-truncated", "corrupt or truncated"),
]
for _name, _words in NPZ:
    case(_name, "npz", _words)(lambda env, name=_name: _image_job(env, env.files.url(name + ".npz")))


# --- safetensors headers (fedavg merges them) ----------------------------------------------------------

SAFETENSORS = [
    ("st-shorter-than-8-bytes", "shorter than 8 bytes"),
    ("st-huge-header-length", "does not fit the file"),
    ("st-header-not-json", "its header is not JSON"),
    ("st-header-nested-deep", "nests JSON too deeply"),
    ("st-header-not-an-object", "not a JSON object"),
    ("st-negative-dims", "tensor 'w' has a malformed header entry"),
    ("st-overflowing-dims", "tensor 'w' has data offsets [0, 16] that do not match its shape"),
    ("st-offsets-out-of-range", "do not match its shape [2, 2]"),
    ("st-unknown-dtype", "has dtype"),
    ("st-overlapping-tensors", "overlap"),
]
for _name, _words in SAFETENSORS:
    case(_name, "safetensors", _words)(lambda env, name=_name: env.clear(MERGE_KIND, [
        JobInput(env.files.url("good.safetensors"), "url", "", "update:10"),
        JobInput(env.files.url(name + ".safetensors"), "url", "", "update:10")]))


# --- model folders, JSONL, chat templates (the LLM fine-tune's precheck) ---------------------------------

def _llm_job(env, model: str, data: str = "chat.jsonl") -> dict:
    return env.clear(LLM_KIND, [JobInput(env.files.url(data), "url"),
                                JobInput(env.files.url(model), "url", "", "model")],
                     {"max_seq_length": "64"})


MODELS = [
    ("model-shard-index-outside-the-folder", "names shards that are not safetensors files of the model folder"),
    ("model-without-config", "config.json"),
    ("model-pickle-weights-only", "only pickle weights"),
    ("model-remote-code", "needs its own Python code"),
    ("model-negative-tensor-dims", "extra.safetensors is not a safetensors file"),
    ("model-archive-traversal", "the model archive cannot be used"),
]
for _name, _words in MODELS:
    case(_name, "model folders", _words)(lambda env, name=_name: _llm_job(env, name + ".zip"))

JSONL = [
    ("jsonl-not-json", "line 2: not valid JSON"),
    ("jsonl-not-an-object", "line 2: each line must be a JSON object"),
    ("jsonl-not-utf8", "line 2: not UTF-8"),
    ("jsonl-unknown-field", "unknown field(s) 'label'"),
    ("jsonl-missing-completion", "field 'completion' is missing"),
    ("jsonl-unknown-role", "unknown role 'wizard'"),
    ("jsonl-no-examples", "holds no examples"),
    ("jsonl-huge-line", "longer than max_seq_length"),
    ("jsonl-nested-deep", "line 1: JSON nested too deeply"),
]
for _name, _words in JSONL:
    case(_name, "jsonl", _words)(lambda env, name=_name: _llm_job(env, "model.zip", name + ".jsonl"))

TEMPLATES = [
    ("template-unterminated", "chat template cannot render conversation 1: TemplateSyntaxError"),
    ("template-sandbox-escape", "chat template cannot render conversation 1: SecurityError"),
    ("template-raises", "this template refuses to render"),
    ("template-endless-loop", "the model's chat template took longer than"),
]
for _name, _words in TEMPLATES:
    case(_name, "chat templates", _words)(lambda env, name=_name: _llm_job(env, name + ".zip"))


# --- building the files -------------------------------------------------------------------------------

def _npz(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _safetensors(header: dict | bytes, body: bytes = b"", length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + body


def build_assets(files: Files, tmp: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (8, 8, 8), dtype=np.uint8)
    y = np.array([0, 1] * 4)
    files.put("train.npz", _npz(x=x, y=y))
    files.put("page.npz", b"<!doctype html><html><body>Not found</body></html>" + b" " * 100)
    with open(files.root / "big.npz", "wb") as f:
        f.truncate(MAX_DOWNLOAD_BYTES + 1)

    # archives
    def put_archive(name, build):
        path = build(tmp / name)
        shutil.copyfile(path, files.root / name)

    put_archive("zip-traversal", lambda p: make_zip(p, {"a/ok.png": b"fine", "../evil.png": b"pwned"}))
    put_archive("zip-absolute-path", lambda p: make_zip(p, {"a/ok.png": b"fine", "/etc/evil.png": b"pwned"}))

    def zip_symlink(path):
        with zipfile.ZipFile(path, "w") as zf:
            info = zipfile.ZipInfo("a/link.png")
            info.create_system = 3
            info.external_attr = (0o120777) << 16
            zf.writestr(info, "/etc/passwd")
        return path
    put_archive("zip-symlink", zip_symlink)
    put_archive("zip-ratio-bomb", lambda p: make_zip(p, {"a/zeros.png": b"\0" * 5_000_000}))
    files.put("zip-declared-huge", patch_zip_sizes(
        make_zip(tmp / "plain1.zip", {"a/a.png": b"x" * 100}).read_bytes(), uncompressed=0xFFFF0000))
    files.put("zip-encrypted-member", patch_zip_sizes(
        make_zip(tmp / "plain2.zip", {"a/a.png": b"x" * 100}).read_bytes(), flags=0x1))
    files.put("zip-truncated", make_zip(tmp / "plain3.zip", {"a/a.png": os.urandom(5000),
                                                             "b/b.png": os.urandom(5000)}).read_bytes()[:6000])
    put_archive("tar-traversal", lambda p: make_tar(p, [("a/ok.png", b"fine"), ("a/../../evil.png", b"pwned")]))
    put_archive("tar-symlink", lambda p: make_tar(p, [("a/ok.png", b"fine"),
                                                      tar_special("a/link.png", tarfile.SYMTYPE, linkname="/etc/passwd")]))
    put_archive("tar-hardlink", lambda p: make_tar(p, [("a/ok.png", b"fine"),
                                                       tar_special("a/hard.png", tarfile.LNKTYPE, linkname="/etc/passwd")]))
    put_archive("tar-device-file", lambda p: make_tar(p, [("a/ok.png", b"fine"),
                                                          tar_special("a/dev", tarfile.CHRTYPE, devmajor=1, devminor=3)]))
    put_archive("tar-fifo", lambda p: make_tar(p, [("a/ok.png", b"fine"), tar_special("a/fifo", tarfile.FIFOTYPE)]))
    put_archive("tar-gz-ratio-bomb", lambda p: make_tar(p, [("a/zeros.png", b"\0" * 5_000_000)]))
    put_archive("tar-gnu-long-name-bomb", lambda p: _huge_header_tar(p, b"L", 64 << 20))
    put_archive("tar-pax-header-bomb", lambda p: _huge_header_tar(p, b"x", 64 << 20))
    files.put("not-an-archive", b"just some text, not a dataset at all\n" * 30)

    # npz
    files.put("npz-pickled-objects.npz", _npz(x=np.array([{"a": 1}, None], dtype=object), y=np.array([0, 1])))
    files.put("npz-float-images.npz", _npz(x=x.astype(np.float64), y=y))
    files.put("npz-one-dimensional-images.npz", _npz(x=np.arange(8, dtype=np.uint8), y=y))
    files.put("npz-labels-length-mismatch.npz", _npz(x=x, y=np.array([0, 1, 0])))
    files.put("npz-float-labels.npz", _npz(x=x, y=y.astype(np.float32) + 0.5))
    files.put("npz-without-labels.npz", _npz(x=x))
    files.put("npz-one-class.npz", _npz(x=x, y=np.zeros(8, dtype=np.int64)))
    files.put("npz-truncated.npz", _npz(x=x, y=y)[:300])

    # safetensors
    good = {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}
    files.put("good.safetensors", _safetensors(good, struct.pack("<4f", 1, 2, 3, 4)))
    files.put("st-shorter-than-8-bytes.safetensors", b"\x10\x00")
    files.put("st-huge-header-length.safetensors", _safetensors(good, bytes(16), length=1 << 62))
    files.put("st-header-not-json.safetensors", _safetensors(b"{this is not json}", bytes(16)))
    files.put("st-header-nested-deep.safetensors", _safetensors(b"[" * 100_000 + b"]" * 100_000))
    files.put("st-header-not-an-object.safetensors", _safetensors(b"[1, 2, 3]"))
    files.put("st-negative-dims.safetensors", _safetensors(
        {"w": {"dtype": "F32", "shape": [-2, -2], "data_offsets": [0, 16]}}, bytes(16)))
    files.put("st-overflowing-dims.safetensors", _safetensors(
        {"w": {"dtype": "F32", "shape": [1 << 40, 1 << 40], "data_offsets": [0, 16]}}, bytes(16)))
    files.put("st-offsets-out-of-range.safetensors", _safetensors(
        {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [1 << 40, (1 << 40) + 16]}}, bytes(16)))
    files.put("st-unknown-dtype.safetensors", _safetensors(
        {"w": {"dtype": "Q99", "shape": [2, 2], "data_offsets": [0, 16]}}, bytes(16)))
    files.put("st-overlapping-tensors.safetensors", _safetensors(
        {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
         "v": {"dtype": "F32", "shape": [2, 2], "data_offsets": [8, 24]}}, bytes(24)))

    # model folders, JSONL and chat templates
    _build_llm_assets(files, tmp)


def _build_llm_assets(files: Files, tmp: Path) -> None:
    from .test_llm_finetune import save_model_folder, zip_folder

    model = save_model_folder(tmp / "model")
    shutil.copyfile(zip_folder(model, tmp / "model.zip"), files.root / "model.zip")

    def variant(name: str, change) -> None:
        folder = tmp / name
        shutil.copytree(model, folder)
        change(folder)
        shutil.copyfile(zip_folder(folder, tmp / f"{name}.zip"), files.root / f"{name}.zip")

    def edit_json(folder: Path, name: str, change) -> None:
        data = json.loads((folder / name).read_text())
        change(data)
        (folder / name).write_text(json.dumps(data))

    def template(text: str):
        def change(folder: Path) -> None:
            jinja = folder / "chat_template.jinja"
            if jinja.exists():
                jinja.write_text(text)
            else:
                edit_json(folder, "tokenizer_config.json", lambda d: d.__setitem__("chat_template", text))
        return change

    variant("model-shard-index-outside-the-folder", lambda f: (f / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {"lm_head.weight": "../../other-job/model.safetensors"}})))
    variant("model-without-config", lambda f: (f / "config.json").unlink())

    def pickle_only(folder):
        (folder / "model.safetensors").unlink()
        (folder / "pytorch_model.bin").write_bytes(b"\x80\x04\x95 a pickle")
    variant("model-pickle-weights-only", pickle_only)
    variant("model-remote-code", lambda f: edit_json(f, "config.json", lambda d: d.__setitem__(
        "auto_map", {"AutoModelForCausalLM": "modeling_evil.EvilModel"})))
    variant("model-negative-tensor-dims", lambda f: (f / "extra.safetensors").write_bytes(_safetensors(
        {"x": {"dtype": "F32", "shape": [-1000000, 4], "data_offsets": [0, 16]}}, bytes(16))))
    with zipfile.ZipFile(files.root / "model-archive-traversal.zip", "w") as zf:
        zf.writestr("model/config.json", "{}")
        zf.writestr("../../outside.txt", "pwned")

    variant("template-unterminated", template("{% for m in messages %}{{ m['content'] }}"))
    variant("template-sandbox-escape", template("{{ ''.__class__.__mro__[1].__subclasses__() }}"))
    variant("template-raises", template("{{ raise_exception('this template refuses to render') }}"))
    variant("template-endless-loop", template(
        "{% for a in range(100000) %}{% for b in range(100000) %}{% for c in range(100000) %}"
        "{% endfor %}{% endfor %}{% endfor %}{{ messages[0]['content'] }}"))

    chat = {"messages": [{"role": "user", "content": "what does the cat say?"},
                         {"role": "assistant", "content": "the cat says tac."}]}
    line = json.dumps(chat) + "\n"
    files.put("chat.jsonl", (line * 20).encode())
    files.put("jsonl-not-json.jsonl", (line + '{"messages": [\n').encode())
    files.put("jsonl-not-an-object.jsonl", (line + '["messages"]\n').encode())
    files.put("jsonl-not-utf8.jsonl", line.encode() + b'{"text": "\xff"}\n')
    files.put("jsonl-unknown-field.jsonl", b'{"text": "a cat", "label": 1}\n')
    files.put("jsonl-missing-completion.jsonl", b'{"prompt": "a cat"}\n')
    files.put("jsonl-unknown-role.jsonl", b'{"messages": [{"role": "wizard", "content": "hi"}]}\n')
    files.put("jsonl-no-examples.jsonl", b"\n\n\n")
    files.put("jsonl-huge-line.jsonl", b'{"messages": [{"role": "user", "content": "' + b"cat " * 250_000
              + b'"}, {"role": "assistant", "content": "ok"}]}\n')
    files.put("jsonl-nested-deep.jsonl", b"[" * 200_000 + b"]" * 200_000 + b"\n")


# --- running a case -----------------------------------------------------------------------------------

def worker_log(worker: WorkerProcess) -> list[dict]:
    lines = []
    for line in worker.log.read_text(errors="replace").splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            lines.append({"event": line, "not_json": True})
    return lines


def log_lines_about(worker: WorkerProcess, *ids: str) -> list[dict]:
    return [line for line in worker_log(worker)
            if any(line.get(key) in ids for key in ("job_id", "event_id", "nutzap"))]


async def wait_log_about(worker: WorkerProcess, ids: tuple[str, ...], words: str, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        lines = log_lines_about(worker, *ids)
        for line in lines:
            if words in " ".join(str(value) for value in line.values()):
                return line
        if time.monotonic() > deadline:
            raise AssertionError(f"no log line about {ids[0][:12]} says {words!r}: {lines}")
        await asyncio.sleep(0.05)


def _message(probe: Probe, reply: dict) -> tuple[str, str]:
    feedback = parse_feedback(reply, lambda text: decrypt(probe.keys.private_key, reply["pubkey"], text)[0])
    return feedback.status, feedback.message


async def next_answer(probe: Probe, event: dict, statuses: tuple[str, ...], skip: int = 0,
                      timeout: float = 45.0) -> tuple[dict, str, str]:
    """The first reply to `event` after the first `skip` whose status is in `statuses` (or a result)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for reply in probe.replies[event["id"]][skip:]:
            if reply["kind"] != FEEDBACK_KIND:
                return reply, "result", reply["content"]
            status, message = _message(probe, reply)
            if status in statuses:
                return reply, status, message
        await asyncio.sleep(0.02)
    raise AssertionError(f"no {statuses} answer to {event['id'][:12]} in {timeout}s: "
                         f"{[_message(probe, r) for r in probe.replies[event['id']]]}")


@pytest.fixture
async def env(hostile_worker, files, mint, relay, tmp_path):
    async with Probe(relay.url) as probe:
        made = Env(probe, hostile_worker, files, mint.url, tmp_path)
        yield made
        if made._wallet is not None:
            await made._wallet.close()


def test_the_catalogue_is_big_enough():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 60, len(ids)
    assert {c.category for c in CASES} >= {"events", "encrypted", "tokens", "nutzaps", "urls", "archives", "npz",
                                           "safetensors", "model folders", "jsonl", "chat templates"}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_hostile_input(case: Case, env: Env):
    worker, probe = env.worker, env.probe
    event = await case.build(env)
    await probe.send(event)
    ids: tuple[str, ...] = (event["id"],)
    if case.pay is not None:
        asked, status, message = await next_answer(probe, event, ("payment-required",))
        seen = len(probe.replies[event["id"]])
        nutzap = await case.pay(env, event, asked)
        [answer] = await probe.pool.publish(nutzap)
        assert answer.ok, answer.message
        ids += (nutzap["id"],)
        if case.feedback is None:
            await asyncio.sleep(1.0)
            assert len(probe.replies[event["id"]]) == seen, "an unreadable nutzap was answered"
        else:
            _, status, message = await next_answer(probe, event, (case.status, "error"), skip=seen)
            assert status == case.status, message
            assert case.feedback in message, message
            assert "Still waiting for payment" in message, message
    elif case.feedback is None:
        await probe.assert_quiet(event)
    else:
        reply, status, message = await next_answer(probe, event, (case.status,))
        assert status == case.status, message
        assert case.feedback in message, message
        assert ["p", probe.keys.public_key] in reply["tags"]
    if case.log is not None:
        await wait_log_about(worker, ids, case.log)
    else:
        await asyncio.sleep(0.2)
        assert log_lines_about(worker, *ids) == []
    assert worker.proc.poll() is None, f"the worker died: {worker.log.read_text()[-3000:]}"
    assert worker.proc.pid == worker.pid


async def test_after_the_catalogue_the_same_worker_answers_normal_jobs(env: Env):
    """Last in the module: the process that took every case above serves a paid job and a merge."""
    worker, probe = env.worker, env.probe
    assert worker.proc.poll() is None and worker.proc.pid == worker.pid
    paid = env.private(TEXT_KIND, TEXT, cashu=await env.token())
    await probe.send(paid)
    reply, status, content = await next_answer(probe, paid, ())
    assert status == "result", content
    result = parse_result(reply, lambda t: decrypt(probe.keys.private_key, reply["pubkey"], t)[0])
    assert json.loads(result.content)["words"] == 5

    merge = env.clear(MERGE_KIND, [JobInput(env.files.url("good.safetensors"), "url", "", "update:1"),
                                   JobInput(env.files.url("good.safetensors"), "url", "", "update:3")])
    await probe.send(merge)
    _, status, content = await next_answer(probe, merge, ())
    assert status == "result", content
    assert json.loads(content)["inputs"] == 2

    log = worker_log(worker)
    internal = [line for line in log if line.get("level") in ("error", "critical") or "Traceback" in json.dumps(line)
                or line.get("not_json")]
    assert internal == [], internal[:5]
    assert worker.proc.poll() is None and worker.proc.pid == worker.pid
