"""Property-based fuzzing (Hypothesis) of the parsers that read what others send: relay events,
NIP-90 messages, pay-on-delivery offers, NIP-44/NIP-04 payloads, Cashu tokens, nutzaps, NUT-18
payment requests, NUT-10 locks and data URLs. The property is always the same: a parser answers
with its result or with its own error type, never with anything else (a KeyError, a TypeError, a
RecursionError, ... escaping a parser is what takes a worker or a customer's client down).

The strategies build structurally plausible input, not only random text, so that the deep paths
run: events of the right shape with NIP-90 tags, NIP-44 payloads that carry a valid MAC (so the
padding and UTF-8 checks run), NIP-04 payloads that reach AES, cashuA tokens of base64 JSON and
cashuB tokens of CBOR made from Hypothesis dictionaries, NUT-18 requests with HTLC locks, P2PK and
HTLC secrets, and the edges Python's own parsers have (integers past 4300 digits, nesting past the
recursion limit, lone surrogates, CBOR that is not a map).

Profiles, chosen with the environment variable HYPOTHESIS_PROFILE:

- ``ci`` (the default): 250 examples a test, derandomized (the same examples on every run), no
  example database, no deadline; the whole module takes well under a minute.
- ``long``: 2500 examples a test (FUZZ_EXAMPLES=N overrides), a fresh random seed each run
  (pytest's ``--hypothesis-seed=N`` replays one), for a few minutes of searching, e.g.

      HYPOTHESIS_PROFILE=long pytest -q tests/test_fuzz.py --hypothesis-show-statistics

Each bug the fuzzing found has a plain regression test at the end of the module, with the input.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import string

import cbor2
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from hypothesis import HealthCheck, given, settings
from hypothesis import event as note
from hypothesis import strategies as st

from dvm_core.datarefs import DataRef, parse_data_ref
from dvm_core.errors import JobInputError
from dvm_core.protocol import ecash, encryption, nip04, nip44
from dvm_core.protocol.delivery import DeliveryOffer, parse_offer
from dvm_core.protocol.ecash import (HtlcTerms, Nutzap, NutzapInfo, Token, TokenFormatError,
                                     decode_payment_request, decode_token, htlc_terms_of, lock_of,
                                     p2pk_lock, parse_nutzap, parse_nutzap_info)
from dvm_core.protocol.encryption import DecryptionError
from dvm_core.protocol.events import InvalidEvent, Keys, sign_event, verify_event
from dvm_core.protocol.nip90 import (Feedback, JobRequest, Result, parse_feedback,
                                     parse_handler_announcement, parse_job_request, parse_result)

# -- profiles --------------------------------------------------------------------------------

_COMMON = dict(deadline=None, database=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.filter_too_much])
_PROFILES = {
    "ci": settings(max_examples=250, derandomize=True, **_COMMON),
    "long": settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "2500")), derandomize=False,
                     **_COMMON),
}
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
if PROFILE not in _PROFILES:
    raise RuntimeError(f"HYPOTHESIS_PROFILE={PROFILE!r}: use one of {', '.join(_PROFILES)}")
fuzz = _PROFILES[PROFILE]


def attempt(parse, *args, allowed: type[BaseException] | tuple):
    """`parse(*args)`, or None when it raised one of `allowed` (with a message); any other
    exception propagates and fails the test, which is the point."""
    try:
        result = parse(*args)
    except allowed as exc:
        assert str(exc), f"{type(exc).__name__} without a message"
        note(f"{parse.__name__}: {type(exc).__name__}")   # --hypothesis-show-statistics
        return None
    note(f"{parse.__name__}: returned {type(result).__name__}")
    return result


# -- building blocks -------------------------------------------------------------------------

HEX = "0123456789abcdef"
hex64 = st.text(HEX, min_size=64, max_size=64)
hex128 = st.text(HEX, min_size=128, max_size=128)
pubkeys = st.sampled_from(["02", "03"]).flatmap(lambda p: hex64.map(lambda h: p + h))
keyish = st.one_of(hex64, hex64.map(str.upper), pubkeys, st.text(HEX, max_size=70))

# what Python's own parsers trip on: digit strings past int()'s 4300-digit limit, digits int()
# refuses, lone surrogates (a JSON "\ud800" escape), NUL, whitespace
number_strings = st.one_of(
    st.integers(min_value=0, max_value=2**70).map(str),
    st.integers(min_value=-10, max_value=10).map(str),
    st.sampled_from(["", "0", "-1", "+1", " 1", "1 ", "1.5", "1e3", "0x10", "²", "١٢٣", "NaN",
                     "inf", "9" * 19, "9" * 40]),
    st.sampled_from([4300, 4301, 10_000]).map(lambda n: "9" * n),   # int()'s limit is 4300 digits
)
long_digits = st.sampled_from([4301, 10_000]).map(lambda n: "9" * n)
odd_strings = st.sampled_from(["", " ", "\x00", "\ud800", "a\udfffb", "\n", "é", "\u202e",
                               "\ufeff", "null", "[]", "{}", "?iv=", "#", "%", "%zz"])
URL_STARTS = ["http://", "https://", "HTTPS://", "ftp://", "http:", "//", "http:///", "http://[",
              "http://[::1]", "http://user:pw@", "http://h:99999", "http://h:x"]
urls = st.builds(
    lambda a, b, c, d: a + b + c + d,
    st.sampled_from(URL_STARTS),
    st.one_of(st.sampled_from(["mint.example", "127.0.0.1:3338", "[::1]:80", "xn--e1a.example",
                               "Ｍint.example", "h"]), st.text(max_size=12)),
    st.one_of(st.just(""), st.just("/"), hex64.map(lambda h: "/" + h),
              hex64.map(lambda h: "/" + h + ".npz"), st.text(max_size=12)),
    st.one_of(st.just(""), hex64.map(lambda h: "#sha256=" + h),
              st.builds(lambda h, k: f"#sha256={h}&key={k}", hex64, st.text(max_size=10)),
              st.text(max_size=10).map(lambda t: "?" + t), st.text(max_size=10).map(lambda t: "#" + t)),
)


def deep_json(n: int, shape: str) -> str:
    return {"list": "[" * n + "]" * n, "dict": '{"a":' * n + "1" + "}" * n, "open": "[" * n}[shape]


# depths around the recursion limit (1000) and past it, where json.loads raises RecursionError
depths = st.one_of(st.sampled_from([1, 2, 500, 990, 1000, 1010, 2000, 100_000]),
                   st.integers(min_value=1, max_value=5000))
deep_json_texts = st.builds(deep_json, depths, st.sampled_from(["list", "dict", "open"]))

FIELDS = ["id", "pubkey", "created_at", "kind", "tags", "content", "sig", "token", "mint", "proofs",
          "unit", "memo", "amount", "secret", "C", "dleq", "e", "s", "r", "witness", "p2pk_e",
          "data", "nonce", "pay_on_delivery", "hash", "locktime", "payment_request",
          "sealed_result", "files", "public", "name", "url", "sha256", "size", "k", "d", "t", "a",
          "u", "m", "i", "p", "nut10", "nip90", "payment", "pubkeys", "refund", "sigflag"]

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-2**80, max_value=2**80),
    st.floats(), st.text(max_size=20), odd_strings, number_strings, hex64,
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(FIELDS), st.text(max_size=6)), children, max_size=5),
    ),
    max_leaves=20,
)


def json_text(values=json_values):
    """JSON text as a hostile peer sends it: of a value, broken, or nested past the limit."""
    return st.one_of(values.map(lambda v: json.dumps(v, ensure_ascii=False)),
                     values.map(json.dumps), deep_json_texts, st.text(max_size=40))


def mostly(good, bad):
    """`good` three times in four."""
    return st.one_of(good, good, good, bad)


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for key, child in value.items():
            yield from _paths(child, prefix + (key,))
    elif isinstance(value, list):
        for i, child in enumerate(value):
            yield from _paths(child, prefix + (i,))


@st.composite
def mutated(draw, valid, junk):
    """A value drawn from `valid` (which must build fresh objects: no st.just of a list or a
    dict, since this changes it in place), returned whole half the time; otherwise one node of it (a
    field, an element, a leaf) replaced by one from `junk`, or a field dropped. So every check
    of a parser gets reached with everything before it passing."""
    value = draw(valid)
    paths = [p for p in _paths(value) if p]
    if not paths or draw(st.booleans()):
        return value
    depth = draw(st.sampled_from(sorted({len(p) for p in paths})))   # top-level fields as often as leaves
    path = draw(st.sampled_from([p for p in paths if len(p) == depth]))
    parent = value
    for key in path[:-1]:
        parent = parent[key]
    if isinstance(parent, dict) and draw(st.booleans()):
        del parent[path[-1]]
    else:
        parent[path[-1]] = draw(junk)
    return value


TAG_NAMES = ["i", "param", "output", "bid", "relays", "p", "e", "encrypted", "status", "amount",
             "progress", "request", "k", "d", "proof", "u", "unit", "mint", "relay", "pubkey",
             "cashu", "pubkeys", "locktime", "refund", "sigflag", "n", ""]
VALUES = ["url", "event", "job", "text", "cashu", "pay_on_delivery", "success", "error",
          "payment-required", "processing", "partial", "SIG_INPUTS", "SIG_ALL", "sat", "msat"]
strings = st.one_of(st.text(max_size=30), st.sampled_from(TAG_NAMES + VALUES), keyish, number_strings,
                    odd_strings, urls, json_text(json_values))
tags = st.one_of(
    st.builds(lambda name, rest: [name, *rest], st.sampled_from(TAG_NAMES), st.lists(strings, max_size=5)),
    st.lists(strings, max_size=4),
)
# the tags NIP-90 parsers act on, with values of the right kind more often than not
nip90_tags = st.one_of(
    tags,
    st.builds(lambda d, t, rest: ["i", d, t, *rest], mostly(st.one_of(urls, hex64), strings),
              mostly(st.sampled_from(["url", "event", "job", "text"]), strings), st.lists(strings, max_size=3)),
    st.builds(lambda k, v: ["param", k, v], st.sampled_from(["cashu", "pay_on_delivery", "epochs", "", "lr"]),
              mostly(keyish, strings)),
    st.builds(lambda v: ["bid", v], number_strings),
    st.builds(lambda v: ["amount", *v], st.lists(number_strings, min_size=1, max_size=2)),
    st.builds(lambda v: ["k", v], number_strings),
    st.builds(lambda v: ["progress", v], number_strings),
    st.builds(lambda v: ["p", v], mostly(hex64, keyish)),
    st.builds(lambda s, m: ["status", s, m], st.sampled_from(VALUES), st.text(max_size=10)),
    st.just(["encrypted"]), st.just([]),
)
# a tag as a relay may send it: now and then not a list of strings at all
wire_tags = st.one_of(tags, st.lists(st.one_of(strings, json_scalars), max_size=4), json_values)


def events(kinds, content=st.one_of(st.text(), json_text()), tag_lists=st.lists(nip90_tags, max_size=8)):
    """Events of the shape `verify_event` lets through (what the parsers below are handed: the
    relay pool drops every event that does not verify), with any id and signature: the parsers
    never look at those."""
    return st.fixed_dictionaries({
        "id": hex64, "pubkey": hex64, "created_at": st.integers(min_value=0, max_value=2**40),
        "kind": kinds, "tags": tag_lists, "content": content, "sig": hex128,
    })


KEYS = Keys.from_secret("7f" * 32)
PEER = Keys.from_secret("3c" * 32)
CONVERSATION_KEY = nip44.get_conversation_key(KEYS.private_key, PEER.public_key)


# -- events (NIP-01) -------------------------------------------------------------------------

@st.composite
def tampered_events(draw):
    """A signed event, then perhaps one field replaced or dropped or one character of id, sig or
    pubkey changed."""
    signed = sign_event(KEYS, draw(st.integers(min_value=0, max_value=40000)), draw(st.text(max_size=50)),
                        draw(st.lists(st.lists(st.text(max_size=10), max_size=3), max_size=3)),
                        created_at=draw(st.integers(min_value=0, max_value=2**40)))
    how = draw(st.sampled_from(["none", "replace", "flip", "drop"]))
    field = draw(st.sampled_from(sorted(signed)))
    if how == "replace":
        signed[field] = draw(st.one_of(json_values, hex64, hex128, wire_tags, st.lists(wire_tags)))
    elif how == "flip" and field in ("id", "sig", "pubkey"):
        i = draw(st.integers(min_value=0, max_value=len(signed[field]) - 1))
        signed[field] = signed[field][:i] + draw(st.sampled_from(HEX + "AG\ud800")) + signed[field][i + 1:]
    elif how == "drop":
        del signed[field]
    return signed


wire_events = st.one_of(
    json_values,
    st.fixed_dictionaries({}, optional={k: st.one_of(json_values, hex64, hex128, st.lists(wire_tags))
                                        for k in ("id", "pubkey", "created_at", "kind", "tags", "content", "sig")}),
    events(st.integers(), tag_lists=st.lists(wire_tags, max_size=6)),
    tampered_events(),
)


@fuzz
@given(wire_events)
def test_verify_event_raises_only_invalid_event(wire_event):
    assert attempt(verify_event, wire_event, allowed=InvalidEvent) in (None, wire_event)


@fuzz
@given(st.integers(min_value=0, max_value=40000), st.text(), st.lists(st.lists(st.text(), max_size=4), max_size=4))
def test_a_signed_event_verifies(kind, content, tag_list):
    try:
        signed = sign_event(KEYS, kind, content, tag_list)
    except UnicodeEncodeError:   # a lone surrogate: nothing to sign
        return
    assert verify_event(signed) is signed


# -- NIP-90 ----------------------------------------------------------------------------------

@st.composite
def mutated_tags(draw, valid_tags, noise=nip90_tags):
    """A valid tag list, returned whole half the time; otherwise changed as a hostile client
    would (tags stay lists of strings, as verify_event requires): a tag dropped, a value replaced
    or added, a noise tag inserted."""
    tag_list = draw(valid_tags)
    for _ in range(draw(st.integers(min_value=0, max_value=2))):
        how = draw(st.sampled_from(["drop", "replace", "add", "insert"]))
        if how == "insert" or not tag_list:
            tag_list.insert(draw(st.integers(min_value=0, max_value=len(tag_list))), draw(noise))
            continue
        tag = tag_list[draw(st.integers(min_value=0, max_value=len(tag_list) - 1))]
        if how == "drop":
            tag_list.remove(tag)
        elif how == "replace" and tag:
            tag[draw(st.integers(min_value=0, max_value=len(tag) - 1))] = draw(strings)
        else:
            tag.append(draw(strings))
    return tag_list


request_tags = st.builds(
    lambda inputs, params, bid, rest: [*inputs, *params, *bid, *rest],
    st.lists(st.one_of(st.builds(lambda u: ["i", u, "url"], urls), st.builds(lambda h: ["i", h, "event"], hex64),
                       st.builds(lambda t: ["i", t, "text"], st.text(max_size=10))), max_size=2),
    st.lists(st.builds(lambda k, v: ["param", k, v], st.sampled_from(["epochs", "lr", "pay_on_delivery", "cashu"]),
                       st.one_of(pubkeys, st.text(max_size=5))), max_size=2, unique_by=lambda t: t[1]),
    st.lists(st.builds(lambda v: ["bid", v], st.one_of(st.integers(min_value=0, max_value=10**12).map(str),
                                                       number_strings, long_digits)), max_size=1),
    st.lists(st.sampled_from([("output", "application/json"), ("relays", "wss://relay.example"), ("t", "x")])
             .map(list), max_size=2),
)
request_kinds = st.one_of(st.integers(min_value=5000, max_value=5999), st.sampled_from([4999, 6000, 7000, 1]))
# the decrypted content of a private request: any JSON at all
private_tag_lists = st.one_of(st.none(), json_values, st.lists(nip90_tags, max_size=6),
                              st.lists(st.one_of(nip90_tags, json_values), max_size=4))


@fuzz
@given(st.one_of(events(request_kinds), events(request_kinds, tag_lists=mutated_tags(request_tags))),
       st.one_of(private_tag_lists, mutated_tags(request_tags)), st.sampled_from(["public", "private", "flag"]))
def test_parse_job_request_raises_only_job_input_error(request_event, private_tags, how):
    """`how`: a public request (its tags in the event), a private one (the event names its provider,
    the tags come decrypted from its content), or an "encrypted" flag added to whatever was drawn."""
    if how == "private":
        private_tags, request_event["tags"] = request_event["tags"], [["encrypted"], ["p", "ab" * 32]]
    elif how == "flag":
        request_event["tags"].append(["encrypted"])
    else:
        private_tags = None
    request = attempt(parse_job_request, request_event, private_tags, allowed=JobInputError)
    if request is not None:
        assert isinstance(request, JobRequest)
        assert request.bid_msats is None or (type(request.bid_msats) is int and request.bid_msats >= 0)
        assert all(isinstance(v, str) for v in request.params.values())


class Undecryptable:
    def __call__(self, content: str) -> str:
        raise DecryptionError("could not decrypt the content (nip44): invalid MAC")


decrypters = st.one_of(st.none(), st.just(Undecryptable()),
                       st.text().map(lambda text: (lambda content: text)),
                       st.builds(lambda a, b: (lambda content: a + "\n" + b), st.text(max_size=20),
                                 st.sampled_from(["creqA", "lnbc1", "creqB"]).map(lambda p: p + "x")))


@fuzz
@given(events(st.one_of(st.just(7000), st.integers(min_value=6990, max_value=7010))), decrypters, st.booleans())
def test_parse_feedback_raises_only_value_error(feedback_event, decrypt, encrypted):
    if encrypted:
        feedback_event["tags"].append(["encrypted"])
    feedback = attempt(parse_feedback, feedback_event, decrypt, allowed=ValueError)
    if feedback is not None:
        assert isinstance(feedback, Feedback) and isinstance(feedback.content, str)
        assert feedback.amount_msats is None or type(feedback.amount_msats) is int


@fuzz
@given(events(st.integers(min_value=5990, max_value=7010)), decrypters, st.booleans())
def test_parse_result_raises_only_value_error(result_event, decrypt, encrypted):
    if encrypted:
        result_event["tags"].append(["encrypted"])
    assert isinstance(attempt(parse_result, result_event, decrypt, allowed=ValueError), (Result, type(None)))


announcement_contents = st.one_of(json_text(), st.just(""), json_text(st.fixed_dictionaries(
    {}, optional={"name": json_values, "nip90": json_values, "payment": json_values})))


@fuzz
@given(events(st.sampled_from([31990, 31990, 31989, 0]), content=announcement_contents))
def test_parse_handler_announcement_raises_only_value_error(announcement):
    parsed = attempt(parse_handler_announcement, announcement, allowed=ValueError)
    if parsed is not None:
        assert all(type(k) is int for k in parsed[1])


# -- NIP-44 and NIP-04 -----------------------------------------------------------------------

def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@st.composite
def nip44_authentic(draw, conversation_key=CONVERSATION_KEY):
    """A payload whose MAC checks out under `conversation_key`, around a padded plaintext that may
    or may not be well formed (length prefix, padding size, UTF-8): decryption gets to _unpad.
    Returns (payload, the plaintext when the payload is well formed, else None)."""
    nonce = draw(st.binary(min_size=32, max_size=32))
    expected = None
    if draw(st.booleans()):
        padded = draw(st.binary(min_size=0, max_size=700))
    else:
        data = draw(st.one_of(st.text(max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass")),
                              st.binary(max_size=300)))
        declared = draw(mostly(st.just(len(data)), st.integers(min_value=0, max_value=65535)))
        size = nip44.calc_padded_len(max(len(data), 1))
        size = draw(mostly(st.just(size), st.integers(min_value=len(data), max_value=size + 64)))
        padded = declared.to_bytes(2, "big") + data + draw(st.sampled_from([b"\x00", b"\x01"])) * (size - len(data))
        if declared == len(data) == size - (size - len(data)) and data and size == nip44.calc_padded_len(len(data)):
            try:
                expected = data.decode("utf-8")
            except UnicodeDecodeError:
                pass
    chacha_key, chacha_nonce, hmac_key = nip44.get_message_keys(conversation_key, nonce)
    ciphertext = Cipher(algorithms.ChaCha20(chacha_key, bytes(4) + chacha_nonce), mode=None).encryptor().update(padded)
    mac = hmac.new(hmac_key, nonce + ciphertext, hashlib.sha256).digest()
    version = draw(mostly(st.just(2), st.sampled_from([1, 0, 255])))
    return _b64(bytes([version]) + nonce + ciphertext + mac), (expected if version == 2 else None)


base64ish = string.ascii_letters + string.digits + "+/="
nip44_payload_texts = st.one_of(
    st.text(), st.text(base64ish, min_size=120, max_size=400),
    st.binary(min_size=60, max_size=400).map(lambda b: _b64(b"\x02" + b)),
    st.binary(min_size=60, max_size=400).map(lambda b: "#" + _b64(b)),
    st.builds(lambda b, junk: _b64(b"\x02" + b).rstrip("=") + junk, st.binary(min_size=60, max_size=400),
              st.sampled_from(["", " ", "\n", "-", "_", "=", "==="])),
    nip44_authentic().map(lambda pair: pair[0]),
)


@fuzz
@given(st.one_of(nip44_payload_texts, st.binary(), json_values))
def test_nip44_decrypt_raises_only_nip44_error(payload):
    assert isinstance(attempt(nip44.decrypt, payload, CONVERSATION_KEY, allowed=nip44.Nip44Error), (str, type(None)))


@fuzz
@given(nip44_authentic())
def test_nip44_decrypt_of_authentic_payloads(pair):
    """Past the MAC: the padding and UTF-8 checks refuse with Nip44Error, and a well-formed
    plaintext comes back exactly."""
    payload, expected = pair
    plaintext = attempt(nip44.decrypt, payload, CONVERSATION_KEY, allowed=nip44.Nip44Error)
    if expected is not None:
        assert plaintext == expected


@fuzz
@given(st.text(min_size=1, max_size=500), st.binary(min_size=32, max_size=32))
def test_nip44_round_trip(plaintext, nonce):
    try:
        payload = nip44.encrypt(plaintext, CONVERSATION_KEY, nonce)
    except nip44.Nip44Error:   # lone surrogates
        return
    assert nip44.decrypt(payload, CONVERSATION_KEY) == plaintext


def _nip04_or_text(text: str) -> str:
    """A real NIP-04 payload from PEER to KEYS (the text itself when it cannot be encoded)."""
    try:
        return nip04.encrypt_to(PEER.private_key, KEYS.public_key, text)
    except nip04.Nip04Error:
        return text


nip04_payloads = st.one_of(
    # AES runs on these: whole blocks and a 16-byte iv, so padding and UTF-8 get checked
    st.builds(lambda c, iv, extra: _b64(c) + "?iv=" + _b64(iv) + extra,
              st.one_of(st.binary(max_size=80), st.integers(min_value=1, max_value=6).flatmap(
                  lambda n: st.binary(min_size=16 * n, max_size=16 * n))),
              mostly(st.binary(min_size=16, max_size=16), st.binary(max_size=24)),
              st.sampled_from(["", "", "", "?iv=", " ", "\n", "=="])),
    st.builds(lambda a, b: a + "?iv=" + b, st.text(max_size=40), st.text(max_size=40)),
    st.text(min_size=1, max_size=80).map(_nip04_or_text),
)


@fuzz
@given(st.one_of(st.just(PEER.public_key), st.just(PEER.public_key), hex64, st.text(max_size=70)),
       st.one_of(nip04_payloads, nip44_payload_texts))
def test_encryption_decrypt_raises_only_decryption_error(peer, payload):
    decrypted = attempt(encryption.decrypt, KEYS.private_key, peer, payload, allowed=DecryptionError)
    if decrypted is not None:
        assert isinstance(decrypted[0], str) and decrypted[1] in ("nip04", "nip44")


# -- Cashu: lock secrets ---------------------------------------------------------------------

def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


lock_tag_lists = st.lists(st.one_of(
    st.builds(lambda name, rest: [name, *rest], st.sampled_from(["locktime", "refund", "pubkeys", "sigflag", "n_sigs"]),
              st.lists(mostly(st.one_of(number_strings, pubkeys), json_scalars), max_size=3)),
    json_values), max_size=5)
secret_values = st.builds(
    lambda kind, body: [kind, body], mostly(st.sampled_from(["P2PK", "HTLC"]), st.sampled_from(["p2pk", "", "SIG"])),
    st.fixed_dictionaries({"nonce": hex64, "data": mostly(pubkeys, json_values), "tags": mostly(lock_tag_lists, json_values)}))
# a proof's secret: NUT-10 JSON (good or mutated), plain hex, text, JSON nested past the limit
secrets = st.one_of(mutated(secret_values, json_values).map(json.dumps), st.text(max_size=40), deep_json_texts, hex64)


def check_lock(result) -> None:
    key, locktime, refund = result
    assert key is None or isinstance(key, str)
    assert locktime is None or type(locktime) is int
    assert isinstance(refund, list) and all(isinstance(r, str) for r in refund)


@fuzz
@given(secrets)
def test_p2pk_lock_and_lock_of_never_raise(secret):
    # every proof handed to these has a string secret: decode_token and parse_nutzap see to it
    proof = {"id": "009a1f293253e41e", "amount": 1, "secret": secret, "C": "02" + "ab" * 32}
    check_lock(p2pk_lock(proof))
    check_lock(lock_of(proof))


# -- Cashu tokens ----------------------------------------------------------------------------

mint_urls = st.sampled_from(["https://mint.example", "http://127.0.0.1:3338", "HTTPS://Mint.Example:443/",
                             "https://[::1]/cashu"])
v3_proofs = st.fixed_dictionaries(
    {"id": st.sampled_from(["009a1f293253e41e", "00ad268c4d1f5826"]),
     "amount": st.integers(min_value=1, max_value=2**20), "secret": secrets, "C": pubkeys},
    optional={"dleq": st.fixed_dictionaries({"e": hex64, "s": hex64, "r": hex64}),
              "witness": st.text(max_size=10), "p2pk_e": pubkeys})
v3_tokens = st.fixed_dictionaries(
    {"token": st.lists(st.fixed_dictionaries({"mint": mint_urls,
                                              "proofs": st.lists(v3_proofs, min_size=1, max_size=3)}),
                       min_size=1, max_size=2)},
    optional={"unit": st.sampled_from(["sat", "msat", "usd"]), "memo": json_values})

# CBOR has what JSON lacks: bignums past str()'s 4300 digits, undefined, simple values, tags
cbor_edges = st.one_of(
    st.integers(min_value=4290, max_value=4500).map(lambda n: 10 ** n),   # (repr()s of the strategy
    st.integers(min_value=4290, max_value=4500).map(lambda n: -(10 ** n)),  # must not hold one)
    st.sampled_from([cbor2.undefined, cbor2.CBORSimpleValue(99), float("nan"), b"\xff" * 40]),
)
cbor_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20), st.binary(max_size=20), cbor_edges,
    st.builds(cbor2.CBORTag, st.sampled_from([0, 1, 2, 4, 30, 258, 260, 28, 29, 55799, 99999]),
              st.one_of(st.integers(), st.text(max_size=8), st.binary(max_size=8), st.lists(st.integers(), max_size=2))),
)
cbor_values = st.recursive(
    cbor_scalars,
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(st.one_of(st.sampled_from(FIELDS), st.text(max_size=4), st.integers()),
                                               children, max_size=4)),
    max_leaves=15)
v4_proofs = st.fixed_dictionaries(
    {"a": st.integers(min_value=1, max_value=2**20), "s": secrets, "c": st.binary(min_size=33, max_size=33)},
    optional={"d": st.fixed_dictionaries({"e": st.binary(min_size=32, max_size=32),
                                          "s": st.binary(min_size=32, max_size=32),
                                          "r": st.binary(min_size=32, max_size=32)}),
              "w": st.text(max_size=10), "pe": st.binary(min_size=33, max_size=33)})
v4_tokens = st.fixed_dictionaries(
    {"m": mint_urls, "u": st.sampled_from(["sat", "msat"]),
     "t": st.lists(st.fixed_dictionaries({"i": st.binary(min_size=8, max_size=8),
                                          "p": st.lists(v4_proofs, min_size=1, max_size=3)}),
                   min_size=1, max_size=2)},
    optional={"d": st.one_of(st.text(max_size=10), cbor_edges, cbor_values)})

token_texts = st.one_of(
    st.text(), st.sampled_from(["cashuA", "cashuB", "cashu:", "cashu:cashuA", "cashuB===="]),
    st.builds(lambda p, b: p + _b64url(b), st.sampled_from(["cashuA", "cashuB", "cashu:cashuB"]), st.binary(max_size=200)),
    st.builds(lambda p, t: p + t, st.sampled_from(["cashuA", "cashuB"]), st.text(max_size=60)),
    st.builds(lambda p, v: p + _b64url(json.dumps(v).encode()), st.sampled_from(["cashuA", " cashu:cashuA"]),
              st.one_of(mutated(v3_tokens, json_values), mutated(v3_tokens, json_values), json_values)),
    st.builds(lambda p, v: p + _b64url(cbor2.dumps(v)), st.sampled_from(["cashuB", "cashu:cashuB"]),
              st.one_of(mutated(v4_tokens, cbor_values), mutated(v4_tokens, cbor_values), cbor_values)),
    depths.map(lambda n: "cashuB" + _b64url(b"\x81" * n + b"\x00")),   # CBOR arrays n deep
    depths.map(lambda n: "cashuA" + _b64url(deep_json(n, "list").encode())),
    json_values,
)


def check_token(text: str) -> None:
    token = attempt(decode_token, text, allowed=TokenFormatError)
    if token is not None:
        assert isinstance(token, Token) and isinstance(token.mint, str) and isinstance(token.unit, str)
        assert token.amount > 0 and isinstance(token.memo, str)
        for proof in token.proofs:
            assert all(isinstance(proof[k], str) for k in ("id", "secret", "C"))
            check_lock(lock_of(proof))   # the cashier reads the lock of every token it is handed
        # what decodes, encodes and decodes the same (a nutzap's proofs travel as cashuA)
        again = decode_token(ecash.encode_token_a(token.mint, list(token.proofs), token.unit))
        assert again.proofs == token.proofs and again.mint == token.mint


@fuzz
@given(token_texts)
def test_decode_token_raises_only_token_format_error(text):
    check_token(text)


@fuzz
@given(st.builds(lambda p, v: p + _b64url(json.dumps(v).encode()), st.sampled_from(["cashuA", "cashu:cashuA"]),
                 mutated(v3_tokens, json_values)))
def test_decode_token_cashuA_raises_only_token_format_error(text):
    check_token(text)


@fuzz
@given(st.builds(lambda p, v: p + _b64url(cbor2.dumps(v)), st.sampled_from(["cashuB", "cashu:cashuB"]),
                 mutated(v4_tokens, cbor_values)))
def test_decode_token_cashuB_raises_only_token_format_error(text):
    check_token(text)


# -- NIP-61 nutzaps --------------------------------------------------------------------------

nutzap_noise = st.one_of(
    nip90_tags,
    st.builds(lambda proof: ["proof", proof], st.one_of(json_text(), deep_json_texts,
                                                        mutated(v3_proofs, json_values).map(json.dumps))),
    st.builds(lambda name, value: [name, value], st.sampled_from(["u", "unit", "e", "k", "p", "mint", "relay", "pubkey"]),
              st.one_of(urls, number_strings, hex64, st.text(max_size=10))),
)


@st.composite
def nutzap_tag_lists(draw):
    """A nutzap's tags (proofs, mint, zapped event and kind, recipient), some dropped, some noise."""
    good = [["proof", json.dumps(p)] for p in draw(st.lists(v3_proofs, min_size=1, max_size=3))]
    good += [["u", draw(mint_urls)], ["e", draw(hex64)], ["k", draw(number_strings)], ["p", draw(hex64)],
             ["unit", draw(st.sampled_from(["sat", "msat"]))]]
    kept = [t for t in good if draw(mostly(st.just(True), st.just(False)))]
    return draw(st.permutations(kept + draw(st.lists(nutzap_noise, max_size=3))))


@fuzz
@given(events(st.sampled_from([9321, 9321, 9321, 9322]), tag_lists=nutzap_tag_lists()))
def test_parse_nutzap_raises_only_token_format_error(nutzap_event):
    nutzap = attempt(parse_nutzap, nutzap_event, allowed=TokenFormatError)
    if nutzap is not None:
        assert isinstance(nutzap, Nutzap)
        assert nutzap.zapped_kind is None or type(nutzap.zapped_kind) is int
        for proof in nutzap.proofs:
            check_lock(lock_of(proof))   # the cashier binds a nutzap's proofs to a job by their lock


@fuzz
@given(events(st.just(10019), tag_lists=st.lists(st.one_of(
    nutzap_noise, st.builds(lambda name, rest: [name, *rest], st.sampled_from(["relay", "mint", "pubkey"]),
                            st.lists(st.one_of(urls, mint_urls, hex64, st.text(max_size=8)), max_size=3))),
    max_size=6)))
def test_parse_nutzap_info_never_raises(info_event):
    info = parse_nutzap_info(info_event)   # cashier and customer call it bare, on any verified 10019
    assert isinstance(info, NutzapInfo)


# -- NUT-18 payment requests and NUT-14 HTLC locks -------------------------------------------

htlc_nut10s = st.fixed_dictionaries({
    "k": st.just("HTLC"), "d": hex64,
    "t": st.builds(lambda keys, x_only, locktime, extra: [["pubkeys", keys[0]], ["locktime", locktime],
                                                          ["refund", keys[1][2:] if x_only else keys[1]], *extra],
                   st.lists(pubkeys, min_size=2, max_size=2, unique_by=lambda k: k[2:]), st.booleans(),
                   mostly(st.integers(min_value=1, max_value=2**40).map(str), number_strings),
                   st.lists(st.sampled_from([("sigflag", "SIG_INPUTS"), ("sigflag", "SIG_INPUTS"), ("sigflag", "SIG_ALL"),
                                             ("n_sigs", "1")]).map(list), max_size=1)),
})
cbor_strings = strings.map(lambda t: t.encode("utf-8", "replace").decode())   # CBOR text is UTF-8
# an HTLC lock of any shape: tags a list of lists, a scalar, a map...
htlc_shapes = st.fixed_dictionaries({"k": st.just("HTLC")}, optional={
    "d": st.one_of(hex64, cbor_scalars),
    "t": st.one_of(st.lists(st.lists(cbor_strings, max_size=3), max_size=4), cbor_scalars, cbor_values)})
nut10s = st.one_of(mutated(htlc_nut10s, st.one_of(cbor_values, cbor_strings)),
                   mutated(htlc_nut10s, st.one_of(cbor_values, cbor_strings)), htlc_shapes,
                   st.fixed_dictionaries({"k": st.just("P2PK"), "d": pubkeys, "t": st.builds(list)}), cbor_values)
payment_requests = st.fixed_dictionaries(
    {"i": st.text(max_size=8), "a": st.integers(min_value=1, max_value=10**6), "u": st.just("sat"),
     "s": st.booleans(), "m": st.lists(mint_urls, min_size=1, max_size=2)},
    optional={"d": st.text(max_size=10), "nut10": nut10s,
              "t": st.builds(lambda: [{"t": "nostr", "a": "nprofile1xyz", "g": [["n", "61"]]}])})


def creq(value) -> str:
    return "creqA" + _b64url(cbor2.dumps(value))


creq_texts = st.one_of(
    st.text(), st.just("creqA"),
    st.builds(lambda b: "creqA" + _b64url(b), st.binary(max_size=120)),
    st.builds(lambda t: "creqA" + t, st.text(max_size=40)),
    st.one_of(mutated(payment_requests, cbor_values), mutated(payment_requests, cbor_values), cbor_values).map(creq),
    depths.map(lambda n: "creqA" + _b64url(b"\x81" * n + b"\x00")),   # CBOR arrays n deep
)


@fuzz
@given(creq_texts)
def test_decode_payment_request_raises_only_value_error(text):
    request = attempt(decode_payment_request, text, allowed=ValueError)
    if request is not None:
        assert isinstance(request, dict)   # documented so, and the customer reads it with .get
        terms = attempt(htlc_terms_of, request.get("nut10"), allowed=ValueError)
        assert terms is None or isinstance(terms, HtlcTerms)


@fuzz
@given(st.one_of(nut10s, json_values))
def test_htlc_terms_of_raises_only_value_error(nut10):
    terms = attempt(htlc_terms_of, nut10, allowed=ValueError)
    assert terms is None or isinstance(terms, HtlcTerms)


# -- pay on delivery -------------------------------------------------------------------------

offers = st.fixed_dictionaries({
    "pay_on_delivery": st.just(1), "hash": hex64, "amount": st.integers(min_value=1, max_value=10**6),
    "unit": st.just("sat"), "locktime": st.integers(min_value=1, max_value=2**40),
    "payment_request": mostly(payment_requests.map(creq), st.text(max_size=10)),
    "sealed_result": st.text(string.ascii_letters + string.digits + "_-", max_size=40),
    "files": st.lists(st.fixed_dictionaries({"name": st.text(max_size=8), "url": urls, "sha256": hex64,
                                             "size": st.integers(min_value=0)}), max_size=2),
    "public": st.dictionaries(st.text(max_size=5), json_values, max_size=3),
})


@fuzz
@given(st.one_of(json_text(mutated(offers, json_values)), json_text(mutated(offers, json_values)), json_text()))
def test_parse_offer_raises_only_value_error(content):
    offer = attempt(parse_offer, content, allowed=ValueError)
    if offer is not None:
        assert isinstance(offer, DeliveryOffer) and type(offer.amount) is int and offer.amount > 0


# -- data references -------------------------------------------------------------------------

@fuzz
@given(st.one_of(urls, st.text(), st.builds(lambda a, b: a + b, urls, st.text(max_size=20))))
def test_parse_data_ref_raises_only_value_error(text):
    ref = attempt(parse_data_ref, text, allowed=ValueError)
    if ref is not None:
        assert isinstance(ref, DataRef) and len(ref.sha256) == 64
        assert parse_data_ref(ref.to_url()) == ref   # what it writes, it reads back the same


# -- regressions: what the fuzzing found, as plain tests --------------------------------------

KEY_A, KEY_B = "02" + "ab" * 32, "03" + "cd" * 32


def _event(kind: int, tags: list, content: str = "") -> dict:
    return {"id": "00" * 32, "pubkey": "11" * 32, "created_at": 1, "kind": kind, "tags": tags,
            "content": content, "sig": "22" * 64}


def test_regression_a_bid_past_int_digit_limit_is_a_job_input_error():
    # was ValueError from int() ("Exceeds the limit (4300 digits)"): an "internal error" refusal
    with pytest.raises(JobInputError, match="whole number of millisats"):
        parse_job_request(_event(5100, [["i", "hi", "text"], ["bid", "9" * 4301]]))


def test_regression_long_amounts_and_kinds_are_ignored_like_other_unreadable_ones():
    feedback = parse_feedback(_event(7000, [["status", "success"], ["amount", "9" * 4301]]))
    assert feedback.amount_msats is None     # was ValueError from int()
    assert parse_handler_announcement(_event(31990, [["k", "9" * 4301], ["k", "5100"]], "{}"))[1] == [5100]


def test_regression_deeply_nested_announcement_content_is_a_value_error():
    # was RecursionError (no ValueError), past the customer's `except ValueError`
    with pytest.raises(ValueError, match="nested too deeply"):
        parse_handler_announcement(_event(31990, [], deep_json(2000, "list")))


def test_regression_nutzap_with_deeply_nested_proof_is_a_token_format_error():
    # was RecursionError, past the cashier's `except TokenFormatError`
    with pytest.raises(TokenFormatError, match="not JSON"):
        parse_nutzap(_event(9321, [["proof", deep_json(2000, "list")], ["u", "https://mint.example"]]))


def test_regression_nutzap_with_a_long_kind_tag_ignores_it():
    proof = {"id": "009a1f293253e41e", "amount": 1, "secret": "s", "C": KEY_A}
    nutzap = parse_nutzap(_event(9321, [["proof", json.dumps(proof)], ["u", "https://mint.example"],
                                        ["k", "9" * 4301]]))
    assert nutzap.zapped_kind is None          # was ValueError from int()


def _secret(kind: str, body: dict | str) -> dict:
    return {"secret": json.dumps([kind, body]) if isinstance(body, dict) else f'["{kind}", {body}]'}


@pytest.mark.parametrize("proof, p2pk, lock", [
    # JSON nested past the recursion limit: was RecursionError
    ({"secret": deep_json(2000, "list")}, (None, None, []), (None, None, [])),
    # tags null: was TypeError ('NoneType' object is not iterable), for P2PK and HTLC alike
    (_secret("P2PK", {"data": KEY_A, "tags": None}), (KEY_A, None, []), (KEY_A, None, [])),
    (_secret("HTLC", {"data": "00" * 32, "tags": None}), (None, None, []), (None, None, [])),
    # a tag named by a list: was TypeError (unhashable type: 'list')
    (_secret("P2PK", {"data": KEY_A, "tags": [[["refund"], KEY_B]]}), (KEY_A, None, []), (KEY_A, None, [])),
    # locktime "", null, Infinity: was ValueError, TypeError, OverflowError; the mint reads no locktime
    (_secret("P2PK", {"data": KEY_A, "tags": [["locktime", ""]]}), (KEY_A, None, []), (KEY_A, None, [])),
    (_secret("P2PK", {"data": KEY_A, "tags": [["locktime", None]]}), (KEY_A, None, []), (KEY_A, None, [])),
    (_secret("P2PK", f'{{"data": "{KEY_A}", "tags": [["locktime", Infinity]]}}'), (KEY_A, None, []), (KEY_A, None, [])),
    (_secret("HTLC", f'{{"data": "{"00" * 32}", "tags": [["pubkeys", "{KEY_A}"], ["locktime", Infinity]]}}'),
     (None, None, []), (None, None, [])),
    # data not a string: was returned as the "key" ([]), and bind() called .lower() on it
    (_secret("P2PK", {"data": [], "tags": []}), (None, None, []), (None, None, [])),
    # refund keys that are not strings: were returned, and bind() called .lower() on them
    (_secret("P2PK", {"data": KEY_A, "tags": [["refund", 1, KEY_B]]}), (KEY_A, None, [KEY_B]), (KEY_A, None, [KEY_B])),
    # unchanged: a good P2PK lock and a good HTLC lock
    (_secret("P2PK", {"data": KEY_A, "tags": [["locktime", "1700000000"], ["refund", KEY_B]]}),
     (KEY_A, 1700000000, [KEY_B]), (KEY_A, 1700000000, [KEY_B])),
    (_secret("HTLC", {"data": "00" * 32, "tags": [["pubkeys", KEY_A], ["locktime", "5"], ["refund", KEY_B]]}),
     (None, None, []), (KEY_A, 5, [KEY_B])),
])
def test_regression_lock_readers_never_raise(proof, p2pk, lock):
    assert p2pk_lock(proof) == p2pk
    assert lock_of(proof) == lock


def test_regression_cashuB_memo_past_str_digit_limit_is_dropped():
    # was ValueError from str(memo), past the wallet's and the cashier's `except TokenFormatError`
    token = {"m": "https://mint.example", "u": "sat", "d": 10 ** 4300,
             "t": [{"i": bytes(8), "p": [{"a": 1, "s": "secret", "c": bytes(33)}]}]}
    decoded = decode_token("cashuB" + _b64url(cbor2.dumps(token)))
    assert decoded.amount == 1 and decoded.memo == ""
    token["d"] = "thanks"
    assert decode_token("cashuB" + _b64url(cbor2.dumps(token))).memo == "thanks"


@pytest.mark.parametrize("text, message", [
    ("creqA", "damaged"),                                              # was CBORDecodeEOF (an EOFError)
    ("creqA" + _b64url(b"\x81" * 500 + b"\x00"), "damaged"),           # was CBORDecodeError (nesting depth)
    ("creqA40", "not a CBOR map"),                                     # was returned: CBORSimpleValue(3)
    ("creqA" + _b64url(cbor2.dumps([1, 2])), "not a CBOR map"),        # was returned: a list (.get failed)
])
def test_regression_damaged_payment_requests_are_value_errors(text, message):
    with pytest.raises(ValueError, match=message):
        decode_payment_request(text)


def test_regression_htlc_tags_that_are_not_a_list_are_a_value_error():
    # was TypeError ('bool' object is not iterable)
    with pytest.raises(ValueError, match="not a list"):
        htlc_terms_of({"k": "HTLC", "d": "00" * 32, "t": True})
