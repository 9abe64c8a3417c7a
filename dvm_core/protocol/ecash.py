"""Cashu ecash on Nostr, the pure parts: tokens (NUT-00), mint URLs, payment requests (NUT-18),
nutzaps and the nutzap informational event (NIP-61). No network and no Nutshell import here: the
wallet lives in `dvm_core.payments.wallet`.

`decode_token` is the one token parser: the wallet reads every payment with it too, and makes
Nutshell's proof objects from its result only where it hands proofs to Nutshell. So whatever one
part of the DVM refuses, every part refuses, with the same words.

May import: the standard library and cbor2.
"""

from __future__ import annotations

import base64
import json
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
    return Token(mint, unit or "sat", tuple(proofs), str(memo) if memo else "")


def encode_token_a(mint: str, proofs: list[dict], unit: str = "sat", memo: str = "") -> str:
    """A `cashuA` token (NUT-00 V3, JSON) from NUT-00 proofs, e.g. those of a nutzap."""
    data = {"token": [{"mint": mint, "proofs": proofs}], "unit": unit}
    if memo:
        data["memo"] = memo
    return "cashuA" + base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


def p2pk_lock(proof: dict) -> tuple[str | None, int | None, list[str]]:
    """The NUT-11 lock of a proof: (pubkey, locktime, refund pubkeys), or (None, None, [])."""
    try:
        secret = json.loads(proof["secret"])
    except (ValueError, TypeError):
        return None, None, []
    if not (isinstance(secret, list) and len(secret) == 2 and secret[0] == "P2PK" and isinstance(secret[1], dict)):
        return None, None, []
    tags = {t[0]: t[1:] for t in secret[1].get("tags", []) if isinstance(t, list) and t}
    locktime = int(tags["locktime"][0]) if tags.get("locktime") else None
    return secret[1].get("data"), locktime, list(tags.get("refund", []))


# NUT-18 ----------------------------------------------------------------------

def encode_payment_request(
    *, payment_id: str, amount: int, unit: str, mints: list[str], description: str = "",
    nostr_target: str | None = None, nostr_tags: list[list[str]] | None = None,
    lock_pubkey: str | None = None, single_use: bool = True,
) -> str:
    """A NUT-18 `creqA` payment request: CBOR, base64url, no padding."""
    request: dict = {"i": payment_id, "a": int(amount), "u": unit, "s": single_use, "m": list(mints)}
    if description:
        request["d"] = description
    if nostr_target:
        request["t"] = [{"t": "nostr", "a": nostr_target, "g": nostr_tags or [["n", "61"]]}]
    if lock_pubkey:
        request["nut10"] = {"k": "P2PK", "d": lock_pubkey, "t": []}
    return "creqA" + base64.urlsafe_b64encode(cbor2.dumps(request)).decode().rstrip("=")


def decode_payment_request(text: str) -> dict:
    if not text.startswith("creqA"):
        raise ValueError("not a NUT-18 payment request (creqA…)")
    return cbor2.loads(_b64decode(text[5:]))


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
            except ValueError:
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
        elif t[0] == "k" and t[1].isascii() and t[1].isdigit():
            kind = int(t[1])
        elif t[0] == "p" and recipient is None:
            recipient = t[1]
    if not proofs:
        raise TokenFormatError("the nutzap holds no proofs")
    if not mint:
        raise TokenFormatError("the nutzap names no mint (u tag)")
    return Nutzap(event["id"], event["pubkey"], recipient, mint, unit, tuple(proofs), zapped, kind,
                  event.get("content", ""), event)
