"""Nutshell (the `cashu` package), imported once and fenced off: `load()` gives its classes.

This is the only module of dvm_core that imports `cashu`, and it imports it late (`load()`),
because importing Nutshell changes the whole process: it loads `./.env` and `~/.cashu/.env` over
`os.environ`, sets `sys.tracebacklimit = 0`, replaces loguru's sinks with its own stderr sink,
reads every environment variable as a setting (`DEBUG=1` turns off TLS verification, `TOR=1`
starts a Tor daemon), its wallets print a mnemonic notice to stdout, and the aiosqlite driver
under it logs SQL parameters (the mnemonic among them) at DEBUG. `load()` undoes or fences off
each of these; the tests in tests/test_wallet.py prove it.

May import: the standard library, httpx and certifi (the shared TLS context), and, inside
`_import()` only, loguru and cashu. Nothing of dvm_core.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import tempfile
import threading
import warnings
from types import SimpleNamespace

import httpx

_classes: SimpleNamespace | None = None
_lock = threading.Lock()
_HEX_RUN = re.compile(r"[0-9a-fA-F]{32,}")


def preload() -> None:
    """Import Nutshell now (several seconds) instead of at the first payment.

    Call it at startup before other threads run: while it imports, HOME and the working
    directory that Nutshell's settings look at point to an empty temporary directory.
    """
    load()


def load() -> SimpleNamespace:
    """Nutshell's classes, imported once with their side effects undone."""
    global _classes
    if _classes is None:
        with _lock:
            if _classes is None:
                _classes = _import()
    return _classes


def _import() -> SimpleNamespace:
    environ = dict(os.environ)
    had_limit = hasattr(sys, "tracebacklimit")
    limit = getattr(sys, "tracebacklimit", None)
    stdout = sys.stdout
    real_getcwd = os.getcwd
    with tempfile.TemporaryDirectory(prefix="dvm-cashu-import-") as empty:
        try:
            # cashu.core.settings.find_env_file() loads os.getcwd()/.env, else ~/.cashu/.env, into
            # os.environ (override=True) and into the settings. Show it an empty directory as both
            # the working and the home directory; no chdir, so relative paths stay valid.
            os.environ["HOME"] = empty
            os.getcwd = lambda: empty
            with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
                # environs warns about marshmallow's __version_info__ on import
                warnings.simplefilter("ignore", DeprecationWarning)
                from loguru import logger

                from cashu.core.base import BlindedMessage, DLEQWallet, HTLCWitness, P2PKWitness, Proof
                from cashu.core.crypto import b_dhke
                from cashu.core.crypto.secp import PrivateKey, PublicKey
                from cashu.core.htlc import HTLCSecret
                from cashu.core.nuts import nut10
                from cashu.core.p2pk import SigFlags, schnorr_sign
                from cashu.core.secret import Tags
                from cashu.core.settings import settings
                from cashu.core.db import LockOptions
                from cashu.wallet.crud import (bump_secret_derivation, invalidate_proof, store_proof,
                                               update_proof)
                from cashu.wallet.errors import BalanceTooLowError
                from cashu.wallet.v1_api import LedgerAPI
                from cashu.wallet.wallet import Wallet
        finally:
            os.getcwd = real_getcwd
            os.environ.clear()
            os.environ.update(environ)
            sys.stdout = stdout
            if had_limit:
                sys.tracebacklimit = limit
            elif hasattr(sys, "tracebacklimit"):
                del sys.tracebacklimit

    # Settings came from our environment (DEBUG, TOR, HTTP_PROXY, CASHU_DIR...): take the
    # defaults instead. Everything the wallet needs is passed explicitly.
    for name, field in type(settings).model_fields.items():
        setattr(settings, name, field.get_default(call_default_factory=True))
    settings.debug = False                  # True would disable TLS checks and timeouts
    settings.tor = False                    # True would start a Tor daemon
    settings.wallet_verbose_requests = False  # True prints every request to stdout
    settings.db_backup_path = None

    # cashu.wallet's import ran logger.remove() and added an INFO sink on stderr. Send Nutshell's
    # warnings to the stdlib logger "cashu" (long hex runs, which may be proof secrets or keys,
    # are masked) and give other loguru users back loguru's default sink.
    logger.remove()
    logger.add(_loguru_to_logging, level="WARNING", filter="cashu", format="{message}")
    logger.add(sys.stderr, level="DEBUG", filter=lambda record: not record["name"].startswith("cashu"))
    # Nutshell builds a new httpx client for every call to a mint, and each one loads the CA
    # bundle again: ~65 ms of CPU that blocks the event loop. Give those clients one shared TLS
    # context; verification is unchanged.
    from cashu.wallet import v1_api
    v1_api.httpx = _SharedTLSHttpx()

    # aiosqlite (under Nutshell's SQLAlchemy) logs each statement with its parameters at DEBUG:
    # the wallet's seed and mnemonic, proof secrets. Never let a debug log level show them.
    logging.getLogger("aiosqlite").setLevel(logging.WARNING)

    class KeptClientWallet(Wallet):
        """Nutshell's Wallet keeping its HTTP client open from one call to the mint to the next.

        Each call of Nutshell's to a mint makes a new httpx client (`async_set_httpx_client`), so
        each opens a new connection (about 0.7 ms of a 20-ms swap on loopback, a TLS handshake
        over the internet) and leaves the last one's open. This wallet keeps the first client
        until it is closed; the new ones are dropped before they connect."""

        @property
        def httpx(self):
            return self.__dict__.get("_kept_httpx")

        @httpx.setter
        def httpx(self, client):
            kept = self.__dict__.get("_kept_httpx")
            if kept is None or kept.is_closed:
                self.__dict__["_kept_httpx"] = client

    return SimpleNamespace(
        Wallet=Wallet, KeptClientWallet=KeptClientWallet, Proof=Proof, P2PKWitness=P2PKWitness,
        HTLCWitness=HTLCWitness, BlindedMessage=BlindedMessage, DLEQWallet=DLEQWallet,
        HTLCSecret=HTLCSecret, SigFlags=SigFlags, Tags=Tags,
        PrivateKey=PrivateKey, PublicKey=PublicKey, b_dhke=b_dhke, nut10=nut10,
        schnorr_sign=schnorr_sign, settings=settings, BalanceTooLowError=BalanceTooLowError,
        bump_secret_derivation=bump_secret_derivation, LedgerAPI=LedgerAPI,
        invalidate_proof=invalidate_proof, store_proof=store_proof, update_proof=update_proof,
        LockOptions=LockOptions,
    )


class _SharedTLSHttpx:
    """`httpx` as Nutshell's v1_api sees it: the same module, but AsyncClient(verify=True)
    reuses one SSL context."""

    _context = None

    def __getattr__(self, name):
        return getattr(httpx, name)

    def AsyncClient(self, *args, verify=True, **kwargs):  # noqa: N802 - mirrors httpx
        if verify is True:
            if _SharedTLSHttpx._context is None:
                import ssl

                import certifi
                _SharedTLSHttpx._context = ssl.create_default_context(cafile=certifi.where())
            verify = _SharedTLSHttpx._context
        return httpx.AsyncClient(*args, verify=verify, **kwargs)


def _loguru_to_logging(message) -> None:
    record = message.record
    logging.getLogger("cashu").log(record["level"].no, "%s",
                                   _HEX_RUN.sub("[redacted]", record["message"]))
