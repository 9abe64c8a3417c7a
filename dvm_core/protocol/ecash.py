"""Cashu ecash on Nostr, the pure parts: tokens (NUT-00), mint URLs, payment requests (NUT-18,
with a P2PK or an HTLC lock), the NUT-14 hash lock, nutzaps and the nutzap informational event
(NIP-61). No network and no Nutshell import here: the
wallet lives in `dvm_core.payments.wallet`.

`decode_token` is the one token parser: the wallet reads every payment with it too, and makes
Nutshell's proof objects from its result only where it hands proofs to Nutshell. So whatever one
part of the DVM refuses, every part refuses, with the same words.

May import: the standard library and cbor2.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import cbor2

NUTZAP_KIND = 9321
NUTZAP_INFO_KIND = 10019

_DEFAULT_PORTS = {"http": 80, "https": 443}


class TokenFormatError(ValueError):
    """A string that is not a Cashu token we can read. From `decode_token`, the message is a
    sentence for the customer."""


def normalize_mint_url(url: str) -> str:
    """The one form of a mint's URL, to compare and store: `HTTPS://Mint.Example:443/` and
    `https://mint.example` are the same mint.

    Lower-case scheme and host, no default port, no trailing slash; the path keeps its case, and
    http and https stay different mints. Raises ValueError for anything but an http(s) URL of a
    host, and for one with credentials, a query or a fragment (cashu-ts refuses those too).
    """
    text = url.strip() if isinstance(url, str) else ""
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:
        port = -1
    if scheme not in _DEFAULT_PORTS or not parts.hostname or port == -1 or "@" in parts.netloc \
            or "?" in text or "#" in text:
        raise ValueError(f"not a mint URL: {url!r}")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    if port is not None and port != _DEFAULT_PORTS[scheme]:
        host = f"{host}:{port}"
    return f"{scheme}://{host}{parts.path.rstrip('/')}"


def normalize_mint_url_or_keep(url: str) -> str:
    """`normalize_mint_url(url)`, or `url` as written (stripped) when it is not a mint URL: for
    mints that others name (nutzaps, announcements), where a bad URL must still be kept, and
    compare unequal to every good one."""
    try:
        return normalize_mint_url(url)
    except ValueError:
        return url.strip() if isinstance(url, str) else url


@dataclass(frozen=True)
class Token:
    """A decoded token: one mint (normalised), one unit, NUT-00 JSON proofs."""

    mint: str
    unit: str
    proofs: tuple[dict, ...]
    memo: str = ""

    @property
    def amount(self) -> int:
        return sum(int(p["amount"]) for p in self.proofs)


NOT_A_TOKEN = "This is not a Cashu token (it should start with cashuA or cashuB)."
DAMAGED = "The Cashu token is damaged or incomplete; please copy the whole token again."


def _b64decode(text: str) -> bytes:
    text = text.strip()
    return base64.urlsafe_b64decode(text.replace("+", "-").replace("/", "_") + "=" * (-len(text) % 4))


def _proof(keyset_id, amount, secret, c, dleq, witness, p2pk_e) -> dict:
    """A NUT-00 proof; ValueError unless each field has the type Nutshell's `Proof` requires."""
    if not all(isinstance(v, str) for v in (keyset_id, secret, c)):
        raise ValueError("a proof's id, secret and C are strings")
    proof = {"id": keyset_id, "amount": amount, "secret": secret, "C": c}
    if dleq:
        proof["dleq"] = {k: dleq[k] for k in ("e", "s", "r")}
        if not all(isinstance(v, str) for v in proof["dleq"].values()):
            raise ValueError("a DLEQ proof's e, s and r are strings")
    for name, value in (("witness", witness), ("p2pk_e", p2pk_e)):
        if value:
            if not isinstance(value, str):
                raise ValueError(f"a proof's {name} is a string")
            proof[name] = value
    return proof


def _read_v3(raw: bytes) -> tuple[list, object, object, list[dict]]:
    """cashuA: JSON, {"token": [{"mint", "proofs"}, ...], "unit", "memo"}."""
    data = json.loads(raw)
    entries = data["token"]
    if not isinstance(entries, list) or not entries:
        raise ValueError("no token entries")
    proofs = [_proof(p["id"], p["amount"], p["secret"], p["C"], p.get("dleq"), p.get("witness"),
                     p.get("p2pk_e"))
              for entry in entries for p in entry.get("proofs") or []]
    return [entry.get("mint") for entry in entries], data.get("unit"), data.get("memo"), proofs


def _read_v4(raw: bytes) -> tuple[list, object, object, list[dict]]:
    """cashuB: CBOR, {"m": mint, "u": unit, "d": memo, "t": [{"i": keyset id, "p": proofs}]}."""
    data = cbor2.loads(raw)
    proofs = []
    for keyset in data["t"]:
        for p in keyset["p"]:
            dleq = {k: p["d"][k].hex() for k in ("e", "s", "r")} if p.get("d") else None
            proofs.append(_proof(keyset["i"].hex(), p["a"], p["s"], p["c"].hex(), dleq, p.get("w"),
                                 p["pe"].hex() if p.get("pe") else None))
    return [data["m"]], data["u"], data.get("d"), proofs


def decode_token(token: str) -> Token:
    """Decode a `cashuA` (V3, JSON) or `cashuB` (V4, CBOR) token, bare or as a `cashu:` URI,
    without contacting its mint. Raises TokenFormatError with a sentence for the customer."""
    text = token.strip() if isinstance(token, str) else ""
    if text.startswith("cashu:"):
        text = text[len("cashu:"):]
    if not text.startswith(("cashuA", "cashuB")):
        raise TokenFormatError(NOT_A_TOKEN)
    try:
        read = _read_v3 if text.startswith("cashuA") else _read_v4
        mints, unit, memo, proofs = read(_b64decode(text[6:]))
        if unit is not None and not isinstance(unit, str):
            raise ValueError("the unit is not a string")
    except Exception:
        raise TokenFormatError(DAMAGED) from None
    if not proofs:
        raise TokenFormatError("The Cashu token contains no proofs, so it is worth nothing.")
    if any(not m or not isinstance(m, str) for m in mints) or len(set(mints)) != 1:
        raise TokenFormatError("The Cashu token must come from exactly one mint.")
    try:
        mint = normalize_mint_url(mints[0])
    except ValueError:
        raise TokenFormatError("The Cashu token names no valid mint URL.") from None
    secrets = [p["secret"] for p in proofs]
    if len(set(secrets)) != len(secrets):
        raise TokenFormatError("The Cashu token contains the same proof twice.")
    if any(type(p["amount"]) is not int or p["amount"] <= 0 for p in proofs):
        raise TokenFormatError("The Cashu token contains a proof with an invalid amount.")
    # NUT-00's memo is text; anything else is dropped (str() of a CBOR bignum past 4300 digits
    # raises ValueError, and of a CBOR tag or a nested list it is no memo)
    return Token(mint, unit or "sat", tuple(proofs), memo if isinstance(memo, str) else "")


def encode_token_a(mint: str, proofs: list[dict], unit: str = "sat", memo: str = "") -> str:
    """A `cashuA` token (NUT-00 V3, JSON) from NUT-00 proofs, e.g. those of a nutzap."""
    data = {"token": [{"mint": mint, "proofs": proofs}], "unit": unit}
    if memo:
        data["memo"] = memo
    return "cashuA" + base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


def _nut10_secret(proof: dict, kind: str) -> tuple[dict, dict[str, list]] | None:
    """The body of a proof's NUT-10 secret of `kind` ("P2PK", "HTLC") and its tags by name, or
    None. The secret is whoever made the token's to write: anything malformed (not JSON, nested
    past the recursion limit, tags that are not lists with a string name) is no lock here."""
    try:
        secret = json.loads(proof["secret"])
    except (ValueError, TypeError, RecursionError):
        return None
    if not (isinstance(secret, list) and len(secret) == 2 and secret[0] == kind and isinstance(secret[1], dict)):
        return None
    tags = secret[1].get("tags", [])
    tags = {t[0]: t[1:] for t in tags if isinstance(t, list) and t and isinstance(t[0], str)} \
        if isinstance(tags, list) else {}
    return secret[1], tags


def _locktime(tags: dict[str, list]) -> int | None:
    """A lock's locktime tag as an int (None when absent); ValueError when it is not a number."""
    try:
        return int(tags["locktime"][0]) if tags.get("locktime") else None
    except (ValueError, TypeError, OverflowError):   # "soon", null, Infinity, 5000 digits
        raise ValueError("not a locktime") from None


def p2pk_lock(proof: dict) -> tuple[str | None, int | None, list[str]]:
    """The NUT-11 lock of a proof: (pubkey, locktime, refund pubkeys), or (None, None, []) (also
    for a P2PK secret whose `data` is not a string: the mint refuses it). A locktime that is not a
    number is no locktime, as the mint reads it (Nutshell's `parse_int_tag`)."""
    found = _nut10_secret(proof, "P2PK")
    if found is None or not isinstance(found[0].get("data"), str):
        return None, None, []
    body, tags = found
    try:
        locktime = _locktime(tags)
    except ValueError:
        locktime = None
    return body["data"], locktime, [r for r in tags.get("refund", []) if isinstance(r, str)]


def lock_of(proof: dict) -> tuple[str | None, int | None, list[str]]:
    """The key a proof is locked to, its locktime and refund keys: a P2PK lock's `data`, or an
    HTLC's one `pubkeys` key (the one who redeems it with the preimage); (None, None, []) for a
    proof with no such lock (plain, or an HTLC any key or several keys could redeem)."""
    key, locktime, refund = p2pk_lock(proof)
    if key is not None:
        return key, locktime, refund
    found = _nut10_secret(proof, "HTLC")
    if found is None:
        return None, None, []
    tags = found[1]
    pubkeys = tags.get("pubkeys") or []
    if len(pubkeys) != 1 or not isinstance(pubkeys[0], str):
        return None, None, []
    try:
        locktime = _locktime(tags)
    except ValueError:
        return None, None, []
    return pubkeys[0], locktime, [r for r in tags.get("refund", []) if isinstance(r, str)]


# NUT-14 ----------------------------------------------------------------------

_HEX64 = re.compile(r"[0-9a-f]{64}")
_KEY = re.compile(r"0[23][0-9a-f]{64}")


def htlc_hash(preimage: bytes) -> str:
    """The NUT-14 hash lock of a preimage: sha256 of its 32 raw bytes (not of its hex), as 64
    lower-case hex. The mint accepts only 32-byte preimages, so other lengths are refused here
    rather than turning into ecash that nobody can redeem by the hash path."""
    if not isinstance(preimage, bytes) or len(preimage) != 32:
        raise ValueError("an HTLC preimage is exactly 32 bytes")
    return hashlib.sha256(preimage).hexdigest()


def _lock_key(key: str) -> str:
    """A key as a lock names it: compressed (66 hex, lower case); a 64-hex x-only (Nostr) key
    stands for "02" + x. Only the shape is checked here (no curve code in the protocol layer);
    the wallet runs the mint's own parser before it pays or accepts."""
    key = key.strip().lower() if isinstance(key, str) else ""
    if _HEX64.fullmatch(key):
        key = "02" + key
    if not _KEY.fullmatch(key):
        raise ValueError(f"not a compressed public key: {key!r}")
    return key


@dataclass(frozen=True)
class HtlcTerms:
    """What an HTLC payment (NUT-14) for one job is locked with: the hash of the job's preimage,
    the one key that redeems with the preimage (the job's key), the locktime (unix seconds) after
    which the refund key, and only it, may take the ecash back.

    In a payment request, `locktime` is the one asked for; when a provider checks a token against
    its terms (`EcashWallet.receive(htlc=...)`) it is the earliest locktime it accepts. SIG_INPUTS
    always: with SIG_ALL only the first proof carries the preimage, so checkstate would not show
    it for the others. Keys are normalised to compressed form; ValueError for a malformed field.
    """

    hash: str
    pubkey: str
    locktime: int
    refund_key: str

    def __post_init__(self) -> None:
        if not isinstance(self.hash, str) or not _HEX64.fullmatch(self.hash):
            # the mint's parser refuses upper case: such ecash could never be spent at all
            raise ValueError("an HTLC hash is 64 lower-case hex characters")
        if type(self.locktime) is not int or self.locktime <= 0:
            raise ValueError("an HTLC locktime is a positive unix time in seconds")
        object.__setattr__(self, "pubkey", _lock_key(self.pubkey))
        object.__setattr__(self, "refund_key", _lock_key(self.refund_key))
        if self.pubkey[2:] == self.refund_key[2:]:
            raise ValueError("the HTLC's receiver and refund keys must differ")

    def tags(self) -> list[list[str]]:
        """The NUT-10 tags of the lock, in the secret and in a NUT-18 `nut10` alike."""
        return [["pubkeys", self.pubkey], ["locktime", str(self.locktime)],
                ["refund", self.refund_key], ["sigflag", "SIG_INPUTS"]]


def htlc_terms_of(nut10: object) -> HtlcTerms | None:
    """The `HtlcTerms` of a NUT-18 `nut10` option, or None when it is not an HTLC lock. Raises
    ValueError for an HTLC lock we would not pay: other tags, several or no receiver keys, no
    locktime, no refund key (the ecash would become anyone's after the locktime), SIG_ALL."""
    if not isinstance(nut10, dict) or nut10.get("k") != "HTLC":
        return None
    tags: dict[str, list] = {}
    if not isinstance(nut10.get("t") or [], list):
        raise ValueError(f"an HTLC lock's tags are not a list but a {type(nut10.get('t')).__name__}")
    for tag in nut10.get("t") or []:
        if not isinstance(tag, list) or not tag or not all(isinstance(v, str) for v in tag) \
                or tag[0] in tags:
            raise ValueError(f"malformed HTLC tag: {tag!r}")
        tags[tag[0]] = tag[1:]
    if set(tags) - {"pubkeys", "locktime", "refund", "sigflag"}:
        raise ValueError(f"unsupported HTLC tags: {sorted(set(tags))}")
    if tags.get("sigflag", ["SIG_INPUTS"]) != ["SIG_INPUTS"]:
        raise ValueError("an HTLC payment must be SIG_INPUTS")
    for name in ("pubkeys", "locktime", "refund"):
        if len(tags.get(name, [])) != 1:
            raise ValueError(f"an HTLC payment request names exactly one {name}")
    locktime = tags["locktime"][0]
    if not (locktime.isascii() and locktime.isdigit()):
        raise ValueError(f"not a locktime: {locktime!r}")
    return HtlcTerms(hash=nut10.get("d"), pubkey=tags["pubkeys"][0], locktime=int(locktime),
                     refund_key=tags["refund"][0])


# NUT-18 ----------------------------------------------------------------------

def encode_payment_request(
    *, payment_id: str, amount: int, unit: str, mints: list[str], description: str = "",
    nostr_target: str | None = None, nostr_tags: list[list[str]] | None = None,
    lock_pubkey: str | None = None, htlc: HtlcTerms | None = None, single_use: bool = True,
) -> str:
    """A NUT-18 `creqA` payment request: CBOR, base64url, no padding. Its `nut10` asks for a
    P2PK lock to `lock_pubkey` or for the HTLC lock `htlc` (not both)."""
    if lock_pubkey and htlc is not None:
        raise ValueError("a payment request asks for one lock: P2PK or HTLC")
    request: dict = {"i": payment_id, "a": int(amount), "u": unit, "s": single_use, "m": list(mints)}
    if description:
        request["d"] = description
    if nostr_target:
        request["t"] = [{"t": "nostr", "a": nostr_target, "g": nostr_tags or [["n", "61"]]}]
    if lock_pubkey:
        request["nut10"] = {"k": "P2PK", "d": lock_pubkey, "t": []}
    elif htlc is not None:
        request["nut10"] = {"k": "HTLC", "d": htlc.hash, "t": htlc.tags()}
    return "creqA" + base64.urlsafe_b64encode(cbor2.dumps(request)).decode().rstrip("=")


def decode_payment_request(text: str) -> dict:
    """The fields of a NUT-18 `creqA` request as sent; `htlc_terms_of(request.get("nut10"))`
    reads an HTLC lock from it."""
    if not text.startswith("creqA"):
        raise ValueError("not a NUT-18 payment request (creqA…)")
    try:
        request = cbor2.loads(_b64decode(text[5:]))
    except (ValueError, cbor2.CBORError) as exc:   # cbor2's EOF and nesting errors are no ValueError
        raise ValueError(f"the NUT-18 payment request is damaged: {exc}") from None
    if not isinstance(request, dict):
        raise ValueError("the NUT-18 payment request is not a CBOR map")
    return request


# NIP-61 ----------------------------------------------------------------------

def build_nutzap_info(relays: list[str], mints: list[str], units: list[str], p2pk_pubkey: str
                      ) -> tuple[int, str, list[list[str]]]:
    """Kind 10019: where and how to send this key ecash. `p2pk_pubkey` must not be the identity key."""
    tags = [["relay", r] for r in relays] + [["mint", m, *units] for m in mints]
    tags.append(["pubkey", p2pk_pubkey])
    return NUTZAP_INFO_KIND, "", tags


@dataclass(frozen=True)
class NutzapInfo:
    relays: tuple[str, ...]
    mints: dict[str, tuple[str, ...]]
    p2pk_pubkey: str | None


def parse_nutzap_info(event: dict) -> NutzapInfo:
    relays, mints, pubkey = [], {}, None
    for t in event.get("tags", []):
        if len(t) >= 2 and t[0] == "relay":
            relays.append(t[1])
        elif len(t) >= 2 and t[0] == "mint":
            mints[normalize_mint_url_or_keep(t[1])] = tuple(t[2:]) or ("sat",)
        elif len(t) >= 2 and t[0] == "pubkey":
            pubkey = t[1]
    return NutzapInfo(tuple(relays), mints, pubkey)


@dataclass(frozen=True)
class Nutzap:
    event_id: str
    sender: str
    recipient: str | None
    mint: str
    unit: str
    proofs: tuple[dict, ...]
    zapped_event: str | None
    zapped_kind: int | None
    comment: str = ""
    event: dict = field(repr=False, compare=False, default_factory=dict)

    def token(self) -> str:
        return encode_token_a(self.mint, list(self.proofs), self.unit)


def build_nutzap(mint: str, proofs: list[dict], recipient: str, *, unit: str = "sat",
                 zapped_event: str | None = None, zapped_kind: int | None = None,
                 comment: str = "", relay_hint: str = "") -> tuple[int, str, list[list[str]]]:
    tags = [["proof", json.dumps(p, separators=(",", ":"))] for p in proofs]
    tags.append(["u", mint])
    if unit != "sat":
        tags.append(["unit", unit])
    if zapped_event:
        tags.append(["e", zapped_event, relay_hint])
    if zapped_kind is not None:
        tags.append(["k", str(zapped_kind)])
    tags.append(["p", recipient])
    return NUTZAP_KIND, comment, tags


def parse_nutzap(event: dict) -> Nutzap:
    """A kind-9321 nutzap; raises TokenFormatError when its proofs or mint are unreadable."""
    if event.get("kind") != NUTZAP_KIND:
        raise TokenFormatError("not a kind-9321 nutzap")
    proofs, mint, unit, zapped, kind, recipient = [], None, "sat", None, None, None
    for t in event["tags"]:
        if len(t) < 2:
            continue
        if t[0] == "proof":
            try:
                proof = json.loads(t[1])
            except (ValueError, RecursionError):
                raise TokenFormatError("a nutzap proof tag is not JSON") from None
            if not isinstance(proof, dict) or not isinstance(proof.get("secret"), str):
                raise TokenFormatError("a nutzap proof tag is not a Cashu proof")
            proofs.append(proof)
        elif t[0] == "u":
            mint = normalize_mint_url_or_keep(t[1])
        elif t[0] == "unit":
            unit = t[1]
        elif t[0] == "e" and zapped is None:
            zapped = t[1]
        elif t[0] == "k" and t[1].isascii() and t[1].isdigit() and len(t[1]) <= 100:  # int()'s limit: 4300
            kind = int(t[1])
        elif t[0] == "p" and recipient is None:
            recipient = t[1]
    if not proofs:
        raise TokenFormatError("the nutzap holds no proofs")
    if not mint:
        raise TokenFormatError("the nutzap names no mint (u tag)")
    return Nutzap(event["id"], event["pubkey"], recipient, mint, unit, tuple(proofs), zapped, kind,
                  event.get("content", ""), event)
