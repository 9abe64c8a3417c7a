"""Cashu ecash on Nostr, the pure parts: tokens (NUT-00), mint URLs, payment requests (NUT-18),
nutzaps and the nutzap informational event (NIP-61). No network and no Nutshell import here: the
wallet lives in `dvm_core.payments.wallet`.

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
    """A string that is not a Cashu token we can read."""


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



def _b64decode(text: str) -> bytes:
    text = text.strip()
    return base64.urlsafe_b64decode(text.replace("+", "-").replace("/", "_") + "=" * (-len(text) % 4))


def decode_token(token: str) -> Token:
    """Decode a `cashuA` (JSON) or `cashuB` (CBOR) token without contacting its mint."""
    token = token.strip()
    try:
        if token.startswith("cashuA"):
            data = json.loads(_b64decode(token[6:]))
            entries = data["token"]
            if len(entries) != 1:
                raise TokenFormatError("a token must hold ecash of exactly one mint")
            mint, proofs = entries[0]["mint"], entries[0]["proofs"]
            unit, memo = data.get("unit", "sat"), data.get("memo") or ""
            proofs = [dict(p) for p in proofs]
        elif token.startswith("cashuB"):
            data = cbor2.loads(_b64decode(token[6:]))
            mint, unit, memo = data["m"], data.get("u", "sat"), data.get("d") or ""
            proofs = []
            for keyset in data["t"]:
                keyset_id = keyset["i"].hex()
                for p in keyset["p"]:
                    proof = {"id": keyset_id, "amount": int(p["a"]), "secret": p["s"], "C": p["c"].hex()}
                    if p.get("d"):
                        proof["dleq"] = {k: v.hex() for k, v in p["d"].items()}
                    if p.get("w"):
                        proof["witness"] = p["w"]
                    proofs.append(proof)
        else:
            raise TokenFormatError("not a Cashu token: it must start with cashuA or cashuB")
    except TokenFormatError:
        raise
    except Exception:
        raise TokenFormatError("the token is damaged or truncated and cannot be decoded") from None
    if not proofs:
        raise TokenFormatError("the token holds no proofs")
    for p in proofs:
        if not isinstance(p.get("secret"), str) or not isinstance(p.get("amount"), int) or p["amount"] <= 0:
            raise TokenFormatError("the token holds a malformed proof")
    try:
        mint = normalize_mint_url(str(mint))
    except ValueError:
        raise TokenFormatError("the token names no valid mint URL") from None
    return Token(mint, str(unit), tuple(proofs), str(memo))


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
