"""A job's inputs and the context its plugin runs in.

`probe` looks at every url input before any work or payment (it answers, it is not an HTML
page, it is not announced larger than the limit); `fetch` downloads one for a running job
(verified against its sha256, cached, decrypted, retried before a paid job is given up);
`job_context` builds the `JobContext` a plugin's function gets, whose downloads go through
the worker's event loop.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Callable, Iterable

import structlog

from dvm_core.datarefs import DataRef, parse_data_ref
from dvm_core.jobs import JobContext, JobError, JobInputError
from dvm_core.protocol.nip90 import JobRequest

from .config import Settings

log = structlog.get_logger("dvm.worker")

FETCH_ATTEMPTS = 3           # tries of a paid job's input download before it is refunded
FETCH_RETRY_SECONDS = 2.0


async def probe(settings: Settings, refs: Iterable[DataRef]) -> None:
    """Before any work or payment: every url input answers, is not an HTML page and is not
    announced larger than the limit. Raises JobInputError."""
    from dvm_core.transport.fetch import FetchError, probe as probe_url
    for ref in refs:
        try:
            await probe_url(ref.url, max_bytes=settings.max_download_bytes,
                            allow_private=settings.allow_private_urls, allowed_hosts=settings.allowed_hosts)
        except FetchError as exc:
            raise JobInputError(str(exc)) from None


async def fetch(settings: Settings, ref: DataRef, into: Path, attempts: int = 0,
                max_bytes: int | None = None) -> Path:
    """Download a url input for a running job: verified, cached, decrypted if need be; at most
    `max_bytes` (and never more than the worker's `max_download_bytes`)."""
    from dvm_core.transport.blobcrypt import BlobDecryptError, decrypt_file
    from dvm_core.transport.fetch import FetchError, fetch as fetch_url
    s = settings
    attempts = attempts or FETCH_ATTEMPTS
    limit = s.max_download_bytes if max_bytes is None else min(max_bytes, s.max_download_bytes)
    for attempt in range(1, attempts + 1):
        # The job is paid: a server that is briefly down is tried again before the job is
        # given up (and refunded).
        try:
            path = await fetch_url(ref.url, ref.sha256, into, cache_dir=s.cache_dir,
                                   max_bytes=limit, timeout=s.download_timeout,
                                   allow_private=s.allow_private_urls, allowed_hosts=s.allowed_hosts)
            break
        except FetchError as exc:
            if attempt == attempts:
                tries = f" after {attempt} tries" if attempt > 1 else ""
                raise JobError(f"could not fetch an input{tries}: {exc}") from None
            log.warning("fetching an input failed; trying again", url=ref.url[:80], error=str(exc))
            await asyncio.sleep(FETCH_RETRY_SECONDS * attempt)
    if ref.key is None:
        return path
    plain = into / f"{ref.sha256}.plain"
    try:
        await asyncio.to_thread(decrypt_file, path, plain, ref.key)
    except BlobDecryptError as exc:
        raise JobInputError(f"could not decrypt {ref.url}: {exc}") from None
    return plain


def job_context(settings: Settings, config: dict, request: JobRequest, workdir: Path, limit: float, *,
                refs: dict[str, DataRef], device: str | None = None,
                report: Callable[[float, str], None] = lambda percent, message: None,
                fetch_attempts: int = 0, **bind) -> JobContext:
    """The context a plugin's function runs in, from a worker thread: downloads go through
    this event loop (`fetch`, with the inputs' references as the intake parsed them), progress
    through `report`."""
    loop = asyncio.get_running_loop()

    def fetcher(url: str, into: Path, max_bytes: int | None = None) -> Path:
        try:
            ref = refs.get(url) or parse_data_ref(url)
        except ValueError as exc:
            raise JobInputError(str(exc)) from None
        return asyncio.run_coroutine_threadsafe(
            fetch(settings, ref, into, attempts=fetch_attempts, max_bytes=max_bytes), loop).result()

    return JobContext(
        job_id=request.id, request=request, workdir=workdir,
        log=log.bind(job_id=request.id, kind=request.kind, **bind),
        deadline=time.monotonic() + limit, report=report, config=config, device=device,
        fetcher=fetcher)
