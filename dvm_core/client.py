"""The customer's side of NIP-90: send a job request, follow its feedback, get the result.

Used by `dvm demo`, the tests and the example scripts; any other NIP-90 client works as well.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
from pathlib import Path
from typing import AsyncIterator, Callable

from .ecash import NUTZAP_KIND, build_nutzap, decode_payment_request, decode_token, parse_nutzap
from .encryption import Scheme, decrypt, encrypter
from .events import Keys, sign_event
from .nip90 import (DELETION_KIND, FEEDBACK_KIND, Feedback, JobInput, Result, build_request,
                    parse_feedback, parse_result)
from .relay import RelayPool


class JobFailed(Exception):
    """The provider answered with an `error` feedback."""

    def __init__(self, feedback: Feedback):
        super().__init__(feedback.message or "the provider reported an error")
        self.feedback = feedback


class Customer:
    def __init__(self, keys: Keys, relays: list[str]):
        self.keys = keys
        self.pool = RelayPool(relays, self._on_event)
        self._queues: dict[str, asyncio.Queue] = {}
        self._schemes: dict[str, tuple[Scheme | None, str | None]] = {}

    async def __aenter__(self) -> "Customer":
        await self.pool.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.pool.close()

    def _on_event(self, event: dict, relay: str) -> None:
        for t in event["tags"]:
            if len(t) >= 2 and t[0] == "e" and t[1] in self._queues:
                self._queues[t[1]].put_nowait(event)
                return

    def _decrypter(self, request_id: str, event: dict) -> Callable[[str], str] | None:
        scheme, provider = self._schemes.get(request_id, (None, None))
        if scheme is None:
            return None
        return lambda text: decrypt(self.keys.private_key, event["pubkey"], text)[0]

    async def submit(
        self, kind: int, inputs: list[JobInput] = (), params: dict[str, str] | None = None, *,
        provider: str | None = None, encrypt: Scheme | None = "nip44", bid_msats: int | None = None,
        output: str | None = None, cashu: str | None = None,
    ) -> dict:
        """Sign and publish a job request; returns the request event. Encrypted (NIP-44 by
        default) when a provider is named; `encrypt=None` sends it in the clear. `cashu`: a
        token paying for the job (inside the encrypted params, or a public tag)."""
        if encrypt and not provider:
            raise ValueError("an encrypted request needs the provider's public key")
        enc = encrypter(encrypt, self.keys.private_key, provider) if encrypt else None
        kind_, content, tags = build_request(
            kind, list(inputs), params or {}, output=output, bid_msats=bid_msats,
            providers=[provider] if provider else [], encrypt=enc, cashu=cashu)
        event = sign_event(self.keys, kind_, content, tags)
        self._queues[event["id"]] = asyncio.Queue()
        self._schemes[event["id"]] = (encrypt, provider)
        await self.pool.subscribe(f"job-{event['id'][:16]}", [
            {"kinds": [FEEDBACK_KIND, kind + 1000], "#e": [event["id"]]}])
        results = await self.pool.publish(event)
        if not any(r.ok for r in results):
            raise RuntimeError("no relay accepted the request: "
                               + "; ".join(f"{r.relay}: {r.message}" for r in results))
        return event

    async def updates(self, request: dict, timeout: float = 600.0) -> AsyncIterator[Feedback | Result]:
        """Feedback and results for `request` as they arrive; ends after a result or an error."""
        queue = self._queues[request["id"]]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"no result for job {request['id'][:12]} within {timeout:g}s")
            try:
                event = await asyncio.wait_for(queue.get(), remaining)
            except asyncio.TimeoutError:
                continue
            dec = self._decrypter(request["id"], event)
            if event["kind"] == FEEDBACK_KIND:
                feedback = parse_feedback(event, dec)
                yield feedback
                if feedback.status == "error":
                    return
            else:
                yield parse_result(event, dec)
                return

    async def result(self, request: dict, timeout: float = 600.0,
                     on_feedback: Callable[[Feedback], None] | None = None) -> Result:
        """Wait for the result; raises JobFailed on an error feedback."""
        async for update in self.updates(request, timeout):
            if isinstance(update, Result):
                return update
            if on_feedback:
                on_feedback(update)
            if update.status == "error":
                raise JobFailed(update)
        raise RuntimeError("unreachable")

    async def pay_with_nutzap(self, request: dict, feedback: Feedback, wallet) -> dict:
        """Answer a `payment-required` feedback: a NIP-61 nutzap of the amount asked, on the
        first accepted mint, P2PK-locked to the key in its NUT-18 request."""
        creq = decode_payment_request(feedback.content)
        token = decode_token(await wallet.send(int(creq["a"]), mint=creq["m"][0],
                                               lock_to=creq["nut10"]["d"]))
        kind, content, tags = build_nutzap(token.mint, list(token.proofs), feedback.event["pubkey"],
                                           unit=token.unit, zapped_event=request["id"],
                                           zapped_kind=request["kind"], comment="payment")
        event = sign_event(self.keys, kind, content, tags)
        results = await self.pool.publish(event)
        if not any(r.ok for r in results):
            raise RuntimeError("no relay accepted the nutzap")
        return event

    async def nutzaps_received(self, timeout: float = 5.0) -> list:
        """Nutzaps sent to this customer (change and refunds), parsed."""
        events = await self.pool.query([{"kinds": [NUTZAP_KIND], "#p": [self.keys.public_key]}], timeout)
        return [parse_nutzap(e) for e in events]

    async def cancel(self, request: dict, reason: str = "") -> None:
        event = sign_event(self.keys, DELETION_KIND, reason,
                           [["e", request["id"]], ["k", str(request["kind"])]])
        await self.pool.publish(event)


def result_json(result: Result) -> dict:
    return json.loads(result.content)


async def upload_dataset(path: Path, servers: list[str], keys: Keys, *, encrypt: bool = True) -> str:
    """Put a file on Blossom servers for a job; returns the data URL to send as a `url` input.

    With `encrypt` (the default) the file is encrypted with a fresh key first and the key rides
    in the URL's fragment, so send that URL only inside an encrypted request."""
    from .blobcrypt import encrypt_file
    from .blossom import BlossomClient
    from .datarefs import DataRef
    client = BlossomClient(servers, keys)
    key = None
    if encrypt:
        sealed = Path(tempfile.mkdtemp(prefix="dvm-upload-")) / (path.name + ".sealed")
        key = await asyncio.to_thread(encrypt_file, path, sealed)
        path = sealed
    try:
        blob = await client.upload(path, "application/octet-stream")
    finally:
        if encrypt:
            shutil.rmtree(path.parent, ignore_errors=True)
    return DataRef(blob.url, blob.sha256, key).to_url()


async def download_artifacts(result: Result, dest: Path, *, allow_private: bool = False,
                             max_bytes: int = 10 * 1024**3) -> list[Path]:
    """Fetch every file listed in a result, check its sha256, decrypt it, save it in `dest`."""
    from .blobcrypt import decrypt_file
    from .fetch import fetch
    dest.mkdir(parents=True, exist_ok=True)
    saved = []
    for entry in result_json(result).get("artifacts", []):
        name = Path(entry["name"]).name  # never a path from the provider
        with tempfile.TemporaryDirectory(prefix="dvm-download-") as tmp:
            path = await fetch(entry["url"], entry["sha256"], Path(tmp), cache_dir=None,
                               max_bytes=max_bytes, allow_private=allow_private)
            target = dest / name
            if entry.get("key"):
                await asyncio.to_thread(decrypt_file, path, target, entry["key"])
            else:
                shutil.move(str(path), target)
        saved.append(target)
    return saved
