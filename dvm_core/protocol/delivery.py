"""Pay on delivery: the offer a provider makes once the result is ready, and the key it seals
the result under (pure code; the wire format is in docs/protocol.md, "Pay on delivery").

The customer asks with ``["param", "pay_on_delivery", <refund key>]``. When the job is done the
provider draws a fresh 32-byte preimage K, seals the result (its JSON and every file) under a
key derived from K (`seal_key`), uploads the files, and answers `payment-required` with a
`DeliveryOffer` as the content: sha256(K), the price, a NUT-18 request for ecash HTLC-locked
(NUT-14) to that hash and the job's key, the sealed result, the files' hashes and the result's
public metrics. To redeem that ecash the provider must show K to the mint, and the mint shows
it to whoever holds the proofs (NUT-07): the customer gets the key exactly when the provider
gets paid. After the locktime the customer takes unredeemed ecash back.

For a private (encrypted) request the seal key also depends on the NIP-44 conversation key of
customer and provider: the ecash's proofs (and so K, once it is spent) are public in the
customer's nutzap, and the provider's blobs may be listed by its Blossom server, so K alone
must not open a private result.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from dataclasses import dataclass, field

SEAL_LABEL = b"nip90-dvm/pay-on-delivery/v1"
MAX_SEALED_RESULT = 48 * 1024     # base64url characters of the sealed result JSON in the offer
_HEX64 = re.compile(r"[0-9a-f]{64}")


def seal_key(preimage: bytes, conversation_key: bytes | None = None) -> bytes:
    """The 32-byte key a delivery is sealed under: K itself for a public request; for a private
    one HMAC-SHA256(key = the NIP-44 conversation key, message = SEAL_LABEL || K)."""
    if not isinstance(preimage, bytes) or len(preimage) != 32:
        raise ValueError("a delivery preimage is exactly 32 bytes")
    if conversation_key is None:
        return preimage
    return hmac.new(conversation_key, SEAL_LABEL + preimage, hashlib.sha256).digest()


@dataclass(frozen=True)
class DeliveryOffer:
    """A `payment-required` feedback's content for a job paid on delivery."""

    hash: str                 # sha256(K), lower-case hex: the HTLC's hash lock
    amount: int               # the price, in `unit`
    unit: str
    locktime: int             # unix seconds: the HTLC's locktime, after which the customer reclaims
    payment_request: str      # NUT-18 creqA whose nut10 asks for the HTLC lock
    sealed_result: str        # base64url (no padding) of the result JSON sealed under the seal key
    files: list[dict] = field(default_factory=list)   # name, url, sha256, size, type: ciphertexts
    public: dict = field(default_factory=dict)         # what the result shows before payment

    def to_content(self) -> str:
        return json.dumps({"pay_on_delivery": 1, "hash": self.hash, "amount": self.amount,
                           "unit": self.unit, "locktime": self.locktime,
                           "payment_request": self.payment_request, "files": self.files,
                           "public": self.public, "sealed_result": self.sealed_result},
                          separators=(",", ":"), ensure_ascii=False)


def parse_offer(content: str) -> DeliveryOffer:
    """A `DeliveryOffer` from a feedback's (decrypted) content; ValueError saying what is wrong."""
    try:
        data = json.loads(content)
    except (ValueError, TypeError, RecursionError):
        raise ValueError("the payment request is not a pay-on-delivery offer (not JSON)") from None
    if not isinstance(data, dict) or data.get("pay_on_delivery") != 1:
        raise ValueError("the payment request is not a pay-on-delivery offer")
    hash_, amount, unit, locktime = data.get("hash"), data.get("amount"), data.get("unit"), data.get("locktime")
    creq, sealed = data.get("payment_request"), data.get("sealed_result")
    files, public = data.get("files", []), data.get("public", {})
    if not isinstance(hash_, str) or not _HEX64.fullmatch(hash_):
        raise ValueError("the offer's hash is not 64 lower-case hex characters")
    if type(amount) is not int or amount <= 0:
        raise ValueError("the offer's amount is not a whole number above 0")
    if type(locktime) is not int or locktime <= 0:
        raise ValueError("the offer's locktime is not a unix time")
    if not isinstance(unit, str) or not isinstance(creq, str) or not isinstance(sealed, str):
        raise ValueError("the offer lacks its unit, payment request or sealed result")
    if len(sealed) > MAX_SEALED_RESULT or not re.fullmatch(r"[A-Za-z0-9_-]*", sealed):
        raise ValueError("the offer's sealed result is not base64url of at most "
                         f"{MAX_SEALED_RESULT} characters")
    if not isinstance(files, list) or not all(_file_entry(f) for f in files):
        raise ValueError("the offer's files are not a list of {name, url, sha256, size}")
    if not isinstance(public, dict):
        raise ValueError("the offer's public part is not an object")
    return DeliveryOffer(hash_, amount, unit, locktime, creq, sealed, files, public)


def _file_entry(entry: object) -> bool:
    return (isinstance(entry, dict) and isinstance(entry.get("name"), str)
            and isinstance(entry.get("url"), str) and isinstance(entry.get("sha256"), str)
            and _HEX64.fullmatch(entry["sha256"]) is not None and type(entry.get("size")) is int)


def encode_sealed(blob: bytes) -> str:
    return base64.urlsafe_b64encode(blob).rstrip(b"=").decode("ascii")


def decode_sealed(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
