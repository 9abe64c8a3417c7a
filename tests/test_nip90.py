"""NIP-90 messages and NIP-01 events, without a network: every builder's output, signed and
verified, parses back to what went in; every parser refuses malformed input with JobInputError
(or InvalidEvent) and a message a customer can act on."""

from __future__ import annotations

import copy
import json

import pytest

from dvm_core import JobInputError
from dvm_core.protocol.encryption import decrypt, encrypter
from dvm_core.protocol.events import (InvalidEvent, Keys, _private_key, compute_event_id, parse_public_key,
                             sign_event, verify_event)
from dvm_core.protocol.nip90 import (DELETION_KIND, FEEDBACK_KIND, HANDLER_KIND, STATUSES, Feedback,
                            JobInput, JobRequest, KindDescription, Result,
                            build_feedback, build_handler_announcement, build_request, build_result,
                            deleted_event_ids, parse_feedback, parse_handler_announcement,
                            parse_job_request, parse_result, request_private_tags)

CUSTOMER = Keys.generate()
DVM = Keys.generate()
OTHER = Keys.generate()
EVENT_ID = "ab" * 32
JOB_ID = "cd" * 32
RELAY = "wss://relay.example.com"

ALL_INPUTS = [
    JobInput("https://example.com/data.csv", "url"),
    JobInput(EVENT_ID, "event", RELAY),
    JobInput(JOB_ID, "job", RELAY, "training-set"),
    JobInput("some words to count", "text", "", "prompt"),
    JobInput("plain text", "text"),
]
PARAMS = {"top": "3", "model": "tiny", "learning_rate": "0.001"}


def signed(keys: Keys, kind_content_tags: tuple[int, str, list[list[str]]], **kw) -> dict:
    kind, content, tags = kind_content_tags
    return verify_event(sign_event(keys, kind, content, tags, **kw))


def clear_request(tags_extra: list[list[str]] = (), **kw) -> dict:
    kind, content, tags = build_request(5790, ALL_INPUTS, PARAMS, **kw)
    return signed(CUSTOMER, (kind, content, tags + list(tags_extra)))


def raw_request(tags: list[list[str]], content: str = "", kind: int = 5790, keys: Keys = CUSTOMER) -> dict:
    return sign_event(keys, kind, content, tags)


# requests ---------------------------------------------------------------------------------------

def test_clear_request_round_trips_every_field():
    event = clear_request(
        [["t", "ml"], ["client", "dvm-tests", "v1"], ["x"]],
        output="application/json", bid_msats=21000, relays=[RELAY, "wss://two.example"],
        providers=[DVM.public_key, OTHER.public_key], content="please be quick",
    )
    request = parse_job_request(event)
    assert request.id == event["id"] and request.pubkey == CUSTOMER.public_key
    assert request.kind == 5790 and request.result_kind == 6790
    assert request.created_at == event["created_at"]
    assert request.inputs == tuple(ALL_INPUTS)
    assert request.inputs[1].relay == RELAY and request.inputs[1].marker == ""
    assert request.inputs[2].marker == "training-set"
    assert request.inputs[3].relay == "" and request.inputs[3].marker == "prompt"
    assert request.params == PARAMS and request.param("top") == "3"
    assert request.param("missing") is None and request.param("missing", "d") == "d"
    assert request.output == "application/json"
    assert request.bid_msats == 21000
    assert request.relays == (RELAY, "wss://two.example")
    assert request.providers == (DVM.public_key, OTHER.public_key)
    assert not request.encrypted
    assert request.content == "please be quick"
    assert request.extra_tags == (("t", "ml"), ("client", "dvm-tests", "v1"), ("x",))
    assert request.event is event


def test_input_tags_are_as_short_as_nip90_allows():
    assert JobInput("x", "text").to_tag() == ["i", "x", "text"]
    assert JobInput(EVENT_ID, "event", RELAY).to_tag() == ["i", EVENT_ID, "event", RELAY]
    assert JobInput("x", "text", "", "m").to_tag() == ["i", "x", "text", "", "m"]


def test_minimal_request_has_defaults():
    request = parse_job_request(signed(CUSTOMER, build_request(5001)))
    assert request.inputs == () and request.params == {} and request.output is None
    assert request.bid_msats is None and request.relays == () and request.providers == ()
    assert request.extra_tags == () and request.content == ""


def test_empty_tags_are_skipped():
    request = parse_job_request(raw_request([[], ["i", "hi", "text"]]))
    assert request.inputs == (JobInput("hi", "text"),)


@pytest.mark.parametrize("scheme", ["nip44", "nip04"])
def test_encrypted_request_round_trip(scheme):
    enc = encrypter(scheme, CUSTOMER.private_key, DVM.public_key)
    kind, content, tags = build_request(5790, ALL_INPUTS, PARAMS, providers=[DVM.public_key],
                                        encrypt=enc, bid_msats=5000, output="text/plain")
    event = signed(CUSTOMER, (kind, content, tags))
    public = json.dumps(event)
    for secret in ["some words to count", "training-set", "learning_rate", "0.001", "data.csv"]:
        assert secret not in public
    assert ["encrypted"] in event["tags"] and ["p", DVM.public_key] in event["tags"]
    assert not any(t[0] in ("i", "param") for t in event["tags"])
    assert ("?iv=" in event["content"]) == (scheme == "nip04")

    plaintext, detected = decrypt(DVM.private_key, CUSTOMER.public_key, event["content"])
    assert detected == scheme
    private_tags = json.loads(plaintext)
    assert private_tags == request_private_tags(ALL_INPUTS, PARAMS)
    request = parse_job_request(event, private_tags)
    assert request.encrypted
    assert request.inputs == tuple(ALL_INPUTS) and request.params == PARAMS
    assert request.bid_msats == 5000 and request.output == "text/plain"
    assert request.providers == (DVM.public_key,)
    assert request.content == ""  # the ciphertext is not passed on as the request's content
    assert request.extra_tags == ()


def test_encrypted_request_needs_exactly_one_provider():
    enc = encrypter("nip44", CUSTOMER.private_key, DVM.public_key)
    with pytest.raises(ValueError, match="exactly one provider"):
        build_request(5790, ALL_INPUTS, PARAMS, encrypt=enc)
    with pytest.raises(ValueError, match="exactly one provider"):
        build_request(5790, ALL_INPUTS, PARAMS, encrypt=enc, providers=[DVM.public_key, OTHER.public_key])


def test_build_request_refuses_a_non_request_kind():
    for kind in (4999, 6000, 7000, 1):
        with pytest.raises(ValueError, match="not a job request kind"):
            build_request(kind)


# request parser: what it refuses ----------------------------------------------------------------

ENCRYPTED_P = [["encrypted"], ["p", DVM.public_key]]


@pytest.mark.parametrize("tags, private, message", [
    ([["i", "hello"]], None, 'needs data and a type'),
    ([["i"]], None, 'needs data and a type'),
    ([["i", "hello", "blob"]], None, "input type 'blob' is not one of url, event, job, text"),
    ([["i", "hello", ""]], None, "input type '' is not one of"),
    ([["i", "not-hex", "event"]], None, "of type 'event' must be a 64-hex event id"),
    ([["i", EVENT_ID.upper(), "event"]], None, "must be a 64-hex event id"),
    ([["i", EVENT_ID[:-2], "job"]], None, "of type 'job' must be a 64-hex event id"),
    ([["i", "example.com/x.csv", "url"]], None, "must be an absolute URL"),
    ([["i", "/tmp/data.csv", "url"]], None, "must be an absolute URL"),
    ([["param", "top"]], None, 'needs a name and a value'),
    ([["param", "", "3"]], None, 'needs a name and a value'),
    ([["param"]], None, 'needs a name and a value'),
    ([["param", "top", "3"], ["param", "top", "4"]], None, "param 'top' is given more than once"),
    ([["bid", "ten"]], None, "whole number of millisats"),
    ([["bid", "-5"]], None, "whole number of millisats"),
    ([["bid", "1.5"]], None, "whole number of millisats"),
    ([["bid", ""]], None, "whole number of millisats"),
    ([["bid"]], None, "whole number of millisats"),
    ([["output"]], None, "needs a MIME type"),
    ([["p", "npub1xyz"]], None, '"p" tag must hold a 64-hex public key'),
    ([["p"]], None, '"p" tag must hold a 64-hex public key'),
    ([["p", DVM.public_key.upper()]], None, "64-hex public key"),
    ([["encrypted"]], [["i", "x", "text"]], 'must name its provider in a "p" tag'),
    (ENCRYPTED_P, None, "encrypted request without decrypted params"),
    (ENCRYPTED_P, {"i": ["x", "text"]}, "must be a JSON array of tags"),
    (ENCRYPTED_P, "i x text", "must be a JSON array of tags"),
    (ENCRYPTED_P, ["i", "x", "text"], "must be a JSON array of tags"),
    (ENCRYPTED_P, [["i", 1, "text"]], "must be a JSON array of tags"),
    (ENCRYPTED_P, [[]], "must be a JSON array of tags"),
    (ENCRYPTED_P, [["param", "top", None]], "must be a JSON array of tags"),
    # private tags are checked like public ones
    (ENCRYPTED_P, [["i", "x", "blob"]], "input type 'blob'"),
    (ENCRYPTED_P, [["param", "a", "1"], ["param", "a", "2"]], "given more than once"),
])
def test_parse_job_request_refuses(tags, private, message):
    with pytest.raises(JobInputError) as info:
        parse_job_request(raw_request(tags, "x" if private is not None else ""), private)
    assert message in str(info.value)


def test_a_public_param_repeated_in_the_private_tags_is_refused():
    with pytest.raises(JobInputError, match="given more than once"):
        parse_job_request(raw_request([["param", "top", "1"], *ENCRYPTED_P], "x"),
                          [["param", "top", "2"]])


def test_parse_job_request_refuses_a_non_request_kind():
    with pytest.raises(JobInputError, match="not a job request kind"):
        parse_job_request(raw_request([], kind=1))
    with pytest.raises(JobInputError, match="5000-5999"):
        parse_job_request(raw_request([], kind=6790))


def test_accepted_input_forms():
    request = parse_job_request(raw_request([
        ["i", "ipfs://bafy/x", "url"], ["i", "HTTPS://EXAMPLE.COM", "url"], ["i", "", "text"],
        ["bid", "0"], ["relays"], ["relays", "", RELAY],
    ]))
    assert [i.data for i in request.inputs] == ["ipfs://bafy/x", "HTTPS://EXAMPLE.COM", ""]
    assert request.bid_msats == 0 and request.relays == (RELAY,)


def test_bid_with_non_ascii_digits_is_an_invalid_request():
    with pytest.raises(JobInputError, match="whole number of millisats"):
        parse_job_request(raw_request([["bid", "²"]]))


@pytest.mark.parametrize("parse, kind, tags", [
    (parse_feedback, FEEDBACK_KIND, [["status", "success"], ["amount", "²"]]),
    (parse_result, 6790, [["e", EVENT_ID], ["amount", "²"]]),
    (parse_handler_announcement, HANDLER_KIND, [["k", "²"]]),
], ids=["feedback", "result", "announcement"])
def test_customer_parsers_skip_non_ascii_digits(parse, kind, tags):
    parse(sign_event(DVM, kind, "", tags))


@pytest.mark.parametrize("tag", [["p", DVM.public_key + "\n"], ["i", EVENT_ID + "\n", "event"]])
def test_hex_with_a_trailing_newline_is_refused(tag):
    with pytest.raises(JobInputError):
        parse_job_request(raw_request([tag]))


# feedback ----------------------------------------------------------------------------------------

def _request(**kw) -> JobRequest:
    return parse_job_request(clear_request(providers=[DVM.public_key], **kw))


@pytest.mark.parametrize("status, kwargs, expect", [
    ("payment-required", {"message": "pay first", "amount_msats": 21000, "bolt11": "lnbc210n1xyz"},
     {"message": "pay first", "amount_msats": 21000, "bolt11": "lnbc210n1xyz", "progress": None}),
    ("payment-required", {"amount_msats": 5}, {"message": "", "amount_msats": 5, "bolt11": None}),
    ("processing", {"message": "40% step 2/5", "progress": 40.4},
     {"message": "40% step 2/5", "progress": 40.0, "amount_msats": None}),
    ("processing", {"progress": 250.0}, {"progress": 100.0, "message": ""}),
    ("processing", {"progress": -3}, {"progress": 0.0}),
    ("partial", {"message": "first epoch", "content": '{"loss": 0.5}'},
     {"message": "first epoch", "content": '{"loss": 0.5}'}),
    ("error", {"message": "param top must be between 1 and 100"},
     {"message": "param top must be between 1 and 100", "content": ""}),
    ("success", {"message": "done", "amount_msats": 1000},
     {"message": "done", "amount_msats": 1000, "bolt11": None}),
])
def test_feedback_round_trip(status, kwargs, expect):
    request = _request()
    message = kwargs.pop("message", "")
    event = signed(DVM, build_feedback(request, status, message, relay_hint=RELAY, **kwargs))
    assert event["kind"] == FEEDBACK_KIND
    assert ["e", request.id, RELAY] in event["tags"] and ["p", CUSTOMER.public_key] in event["tags"]
    feedback = parse_feedback(event)
    assert isinstance(feedback, Feedback)
    assert feedback.status == status and feedback.request_id == request.id
    for name, value in expect.items():
        assert getattr(feedback, name) == value, name
    assert feedback.event is event


def test_feedback_extra_tags_are_appended():
    event = signed(DVM, build_feedback(_request(), "processing", extra_tags=[["t", "queue"]]))
    assert event["tags"][-1] == ["t", "queue"]


def test_feedback_refuses_an_unknown_status():
    for status in ("done", "PROCESSING", ""):
        with pytest.raises(ValueError, match="unknown feedback status"):
            build_feedback(_request(), status)
    assert set(STATUSES) == {"payment-required", "processing", "error", "success", "partial"}


@pytest.mark.parametrize("scheme", ["nip44", "nip04"])
def test_encrypted_feedback_hides_the_message(scheme):
    request = _request()
    enc = encrypter(scheme, DVM.private_key, CUSTOMER.public_key)
    secret = "your text 'the secret recipe' has 3 words"
    event = signed(DVM, build_feedback(request, "error", secret, encrypt=enc, amount_msats=7, progress=12))
    assert "secret recipe" not in json.dumps(event)
    assert ["status", "error"] in event["tags"] and ["encrypted"] in event["tags"]
    assert ("?iv=" in event["content"]) == (scheme == "nip04")

    unread = parse_feedback(event)  # without the key: status only
    assert unread.status == "error" and unread.message == "" and unread.content == event["content"]
    dec = lambda text: decrypt(CUSTOMER.private_key, DVM.public_key, text)[0]  # noqa: E731
    feedback = parse_feedback(event, dec)
    assert feedback.message == secret and feedback.content == secret
    assert feedback.amount_msats == 7 and feedback.progress == 12.0


def test_encrypted_partial_feedback_encrypts_its_content():
    enc = encrypter("nip44", DVM.private_key, CUSTOMER.public_key)
    event = signed(DVM, build_feedback(_request(), "partial", "ignored message",
                                       content="partial result 42", encrypt=enc))
    assert "partial result" not in json.dumps(event)
    dec = lambda text: decrypt(CUSTOMER.private_key, DVM.public_key, text)[0]  # noqa: E731
    assert parse_feedback(event, dec).content == "partial result 42"


def test_encrypted_feedback_without_a_message_has_empty_content():
    enc = encrypter("nip44", DVM.private_key, CUSTOMER.public_key)
    event = signed(DVM, build_feedback(_request(), "processing", encrypt=enc))
    assert event["content"] == ""
    assert parse_feedback(event, lambda t: pytest.fail("nothing to decrypt")).message == ""


def test_parse_feedback_tolerates_junk_tags():
    event = sign_event(DVM, FEEDBACK_KIND, "", [
        ["status", "processing"], ["progress", "lots"], ["amount", "many"], ["e"], ["e", EVENT_ID]])
    feedback = parse_feedback(event)
    assert feedback.status == "processing" and feedback.message == ""
    assert feedback.progress is None and feedback.amount_msats is None
    assert feedback.request_id == EVENT_ID


def test_parse_feedback_refuses_other_kinds():
    with pytest.raises(ValueError, match="kind-7000"):
        parse_feedback(sign_event(DVM, 6790, "", []))


# results ------------------------------------------------------------------------------------------

def test_result_round_trip():
    request = _request(bid_msats=9000)
    event = signed(DVM, build_result(request, '{"words": 5}', amount_msats=9000,
                                     bolt11="lnbc90n1abc", relay_hint=RELAY))
    assert event["kind"] == 6790
    tags = event["tags"]
    assert tags[0][0] == "request"
    assert json.loads(tags[0][1]) == request.event  # the whole request, verbatim
    assert verify_event(json.loads(tags[0][1]))
    assert ["e", request.id, RELAY] in tags and ["p", CUSTOMER.public_key] in tags
    assert [t for t in tags if t[0] == "i"] == [i.to_tag() for i in ALL_INPUTS]
    assert ["amount", "9000", "lnbc90n1abc"] in tags
    assert ["encrypted"] not in tags

    result = parse_result(event)
    assert isinstance(result, Result)
    assert result.request_id == request.id and result.provider == DVM.public_key
    assert result.content == '{"words": 5}' and result.amount_msats == 9000
    assert not result.encrypted and result.event is event


def test_result_without_amount_has_no_amount_tag():
    event = signed(DVM, build_result(_request(), "ok"))
    assert not any(t[0] == "amount" for t in event["tags"])
    assert parse_result(event).amount_msats is None


@pytest.mark.parametrize("scheme", ["nip44", "nip04"])
def test_encrypted_result_has_no_inputs_and_is_encrypted(scheme):
    enc_request = encrypter(scheme, CUSTOMER.private_key, DVM.public_key)
    event = signed(CUSTOMER, build_request(5790, ALL_INPUTS, PARAMS, providers=[DVM.public_key],
                                           encrypt=enc_request))
    plaintext, _ = decrypt(DVM.private_key, CUSTOMER.public_key, event["content"])
    request = parse_job_request(event, json.loads(plaintext))

    enc = encrypter(scheme, DVM.private_key, CUSTOMER.public_key)
    result_event = signed(DVM, build_result(request, '{"answer": "the secret recipe"}', encrypt=enc))
    assert "secret recipe" not in json.dumps(result_event)
    assert "some words to count" not in json.dumps(result_event)
    assert not any(t[0] == "i" for t in result_event["tags"])
    assert ["encrypted"] in result_event["tags"]
    assert parse_result(result_event).encrypted
    dec = lambda text: decrypt(CUSTOMER.private_key, DVM.public_key, text)[0]  # noqa: E731
    result = parse_result(result_event, dec)
    assert result.encrypted and json.loads(result.content) == {"answer": "the secret recipe"}


def test_parse_result_refuses_other_kinds():
    for kind in (FEEDBACK_KIND, 5790, 1):
        with pytest.raises(ValueError, match="not a job result"):
            parse_result(sign_event(DVM, kind, "", []))


# NIP-89 announcement, NIP-09 deletion ------------------------------------------------------------

def test_handler_announcement_round_trip():
    kinds = [
        KindDescription(5790, "text-stats", "Counts words.", {"top": "how many words"}),
        KindDescription(5800, "lora", "Fine-tunes a model.", {}),
    ]
    event = signed(DVM, build_handler_announcement(
        "dvm-1234", "My DVM", "Trains things.", kinds, extra_tags=[["t", "ai"]],
        extra_content={"picture": "https://example.com/p.png"}))
    assert event["kind"] == HANDLER_KIND
    assert ["d", "dvm-1234"] in event["tags"] and ["t", "ai"] in event["tags"]
    assert [t for t in event["tags"] if t[0] == "k"] == [["k", "5790"], ["k", "5800"]]
    content, parsed_kinds = parse_handler_announcement(event)
    assert parsed_kinds == [5790, 5800]
    assert content["name"] == "My DVM" and content["about"] == "Trains things."
    assert content["picture"] == "https://example.com/p.png"
    assert content["nip90"]["5790"] == {"name": "text-stats", "description": "Counts words.",
                                        "params": {"top": "how many words"}}
    assert content["nip90"]["5800"]["params"] == {}


def test_parse_handler_announcement_skips_junk_k_tags_and_refuses_other_kinds():
    event = sign_event(DVM, HANDLER_KIND, "", [["k", "5790"], ["k", "abc"], ["k"]])
    assert parse_handler_announcement(event) == ({}, [5790])
    with pytest.raises(ValueError, match="31990"):
        parse_handler_announcement(sign_event(DVM, 31989, "{}", []))


def test_deleted_event_ids():
    deletion = sign_event(CUSTOMER, DELETION_KIND, "changed my mind",
                          [["e", EVENT_ID], ["k", "5790"], ["e", JOB_ID], ["e"]])
    assert deleted_event_ids(deletion) == [EVENT_ID, JOB_ID]
    assert deleted_event_ids(sign_event(CUSTOMER, 1, "", [["e", EVENT_ID]])) == []
    assert deleted_event_ids({"tags": [["e", EVENT_ID]]}) == []


# events (NIP-01) ----------------------------------------------------------------------------------

def _event(**changes) -> dict:
    event = sign_event(CUSTOMER, 1, "hello", [["t", "x"]], created_at=1700000000)
    event.update(changes)
    return event


def test_sign_then_verify():
    event = _event()
    assert verify_event(event) is event
    assert event["id"] == compute_event_id(CUSTOMER.public_key, 1700000000, 1, [["t", "x"]], "hello")
    assert event["pubkey"] == CUSTOMER.public_key and len(event["sig"]) == 128


def test_sign_event_stringifies_tag_values():
    event = sign_event(CUSTOMER, 5790, "", [["bid", 1000]])
    assert event["tags"] == [["bid", "1000"]] and verify_event(event)


def test_non_ascii_content_verifies():
    assert verify_event(sign_event(CUSTOMER, 1, "zażółć 🐈 ‮", [["t", "ü"]]))


def _flip(hex_str: str, at: int = 10) -> str:
    return hex_str[:at] + ("0" if hex_str[at] != "0" else "1") + hex_str[at + 1:]


@pytest.mark.parametrize("mutate, message", [
    (lambda e: e.update(id=_flip(e["id"])), "id does not match"),
    (lambda e: e.update(content="hullo"), "id does not match"),
    (lambda e: e.update(created_at=e["created_at"] + 1), "id does not match"),
    (lambda e: e.update(tags=[["t", "y"]]), "id does not match"),
    (lambda e: e.update(kind=2), "id does not match"),
    (lambda e: e.update(sig=_flip(e["sig"])), "signature"),
    (lambda e: e.update(sig=_flip(e["sig"], 100)), "signature"),
    (lambda e: e.update(sig=sign_event(OTHER, 1, "hello", [["t", "x"]], created_at=1700000000)["sig"]),
     "invalid signature"),
    (lambda e: e.update(sig=e["sig"][:-2]), "sig must be 128"),
    (lambda e: e.update(sig=e["sig"].upper()), "sig must be 128"),
    (lambda e: e.update(id=e["id"].upper()), "64 lowercase hex"),
    (lambda e: e.update(pubkey=e["pubkey"][:-1]), "64 lowercase hex"),
    (lambda e: e.pop("id"), "'id' missing"),
    (lambda e: e.pop("pubkey"), "'pubkey' missing"),
    (lambda e: e.pop("created_at"), "'created_at' missing"),
    (lambda e: e.pop("kind"), "'kind' missing"),
    (lambda e: e.pop("tags"), "'tags' missing"),
    (lambda e: e.pop("content"), "'content' missing"),
    (lambda e: e.pop("sig"), "'sig' missing"),
    (lambda e: e.update(content=None), "'content' missing or not a str"),
    (lambda e: e.update(kind="1"), "'kind' missing or not a int"),
    (lambda e: e.update(created_at=True), "'created_at' missing or not a int"),
    (lambda e: e.update(kind=True), "'kind' missing or not a int"),
    (lambda e: e.update(created_at=1700000000.0), "'created_at'"),
    (lambda e: e.update(tags={"t": "x"}), "'tags' missing or not a list"),
    (lambda e: e.update(tags=[["t", 1]]), "every tag must be a list of strings"),
    (lambda e: e.update(tags=["t"]), "every tag must be a list of strings"),
    (lambda e: e.update(tags=[["t", None]]), "every tag must be a list of strings"),
])
def test_verify_event_refuses(mutate, message):
    event = copy.deepcopy(_event())
    mutate(event)
    with pytest.raises(InvalidEvent) as info:
        verify_event(event)
    assert message in str(info.value)


@pytest.mark.parametrize("value", [None, [], "event", 42])
def test_verify_event_refuses_non_objects(value):
    with pytest.raises(InvalidEvent, match="not a JSON object"):
        verify_event(value)


def test_relabelled_event_is_refused():
    """The same content signed by one key cannot pass as another key's event."""
    event = _event(pubkey=OTHER.public_key)
    with pytest.raises(InvalidEvent):
        verify_event(event)
    event["id"] = compute_event_id(OTHER.public_key, event["created_at"], 1, event["tags"], event["content"])
    with pytest.raises(InvalidEvent, match="invalid signature"):
        verify_event(event)


@pytest.mark.parametrize("field", ["pubkey", "sig"])
def test_verify_event_refuses_hex_with_a_trailing_newline(field):
    keys = Keys.generate()
    pubkey = keys.public_key + ("\n" if field == "pubkey" else "")
    event_id = compute_event_id(pubkey, 1700000000, 1, [], "x")
    event = sign_event(keys, 1, "x", [], created_at=1700000000)
    forged_sig = _private_key(keys.private_key).sign_schnorr(bytes.fromhex(event_id)).hex()
    event.update(id=event_id, pubkey=pubkey, sig=forged_sig + ("\n" if field == "sig" else ""))
    with pytest.raises(InvalidEvent):
        verify_event(event)


# keys -------------------------------------------------------------------------------------------

def test_keys_round_trip_through_nsec_and_hex():
    keys = Keys.generate()
    assert keys.nsec.startswith("nsec1") and keys.npub.startswith("npub1")
    assert Keys.from_secret(keys.nsec) == keys
    assert Keys.from_secret(keys.private_key) == keys
    assert Keys.from_secret(keys.private_key.upper()) == keys
    assert Keys.from_secret(f"  {keys.nsec}\n") == keys  # as read from a key file
    assert parse_public_key(keys.npub) == keys.public_key
    assert parse_public_key(keys.public_key.upper()) == keys.public_key
    assert len(keys.public_key) == 64 and keys.public_key == keys.public_key.lower()


def test_known_key_vector():
    # NIP-19's example key pair
    keys = Keys.from_secret("67dea2ed018072d675f5415ecfaed7d2597555e202d85b3d65ea4e58d2d92ffa")
    assert keys.public_key == "7e7e9c42a91bfef19fa929e5fda1b72e0ebc1a4c1141673e2794234d86addf4e"
    assert keys.npub == "npub10elfcs4fr0l0r8af98jlmgdh9c8tcxjvz9qkw038js35mp4dma8qzvjptg"
    assert keys.nsec == "nsec1vl029mgpspedva04g90vltkh6fvh240zqtv9k0t9af8935ke9laqsnlfe5"


def test_repr_hides_the_secret():
    keys = Keys.generate()
    for text in (repr(keys), str(keys), f"{keys}", repr([keys]), repr({"k": keys})):
        assert keys.private_key not in text and keys.nsec not in text
        assert keys.npub in text


@pytest.mark.parametrize("secret", ["", "hello", "ab" * 31, "zz" * 32, "npub1abc"])
def test_bad_secret_is_a_value_error(secret):
    with pytest.raises(ValueError):
        Keys.from_secret(secret)


def _bad_checksum(bech32: str) -> str:
    return bech32[:-1] + ("q" if bech32[-1] != "q" else "p")


@pytest.mark.parametrize("parse, value", [
    (Keys.from_secret, "nsec1invalid"),
    (Keys.from_secret, _bad_checksum(Keys.generate().nsec)),
    (parse_public_key, "npub1invalid"),
], ids=["nsec-garbage", "nsec-bad-checksum", "npub-garbage"])
def test_malformed_bech32_is_a_value_error(parse, value):
    with pytest.raises(ValueError):
        parse(value)


def test_encrypted_payment_required_carries_the_words_and_the_request():
    """A customer of a private job reads why and how to pay, not only an opaque creqA."""
    enc = encrypter("nip44", DVM.private_key, CUSTOMER.public_key)
    event = signed(DVM, build_feedback(_request(), "payment-required", "pay 5 sat: a nutzap",
                                       content="creqAbcdef", amount_msats=5000, encrypt=enc))
    assert "creqA" not in json.dumps(event)
    dec = lambda text: decrypt(CUSTOMER.private_key, DVM.public_key, text)[0]  # noqa: E731
    feedback = parse_feedback(event, dec)
    assert feedback.message == "pay 5 sat: a nutzap" and feedback.content == "creqAbcdef"
