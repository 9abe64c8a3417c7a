"""Worker configuration: a TOML file, with `DVM_<SETTING>` environment variables on top.

The `[dvm]` table holds the worker's settings (the fields of `Settings`); `[kinds]` renumbers
job kinds by name; `[plugins.<name>]` tables belong to plugins. See examples/dvm.toml.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(Exception):
    """A configuration that cannot work; the message says what to fix."""


@dataclass
class Settings:
    relays: list[str] = field(default_factory=list)
    key_file: str = ""              # file holding the nsec / hex key; DVM_PRIVATE_KEY overrides
    state_dir: str = "./dvm-state"  # SQLite store and job working directories
    name: str = "Training DVM"
    about: str = "Trains models for ecash over Nostr (NIP-90)."
    max_concurrent_jobs: int = 1
    job_time_limit: float = 3600.0
    max_queued_jobs: int = 100      # accepted jobs waiting for a slot; beyond: "busy", before payment
    devices: list[str] = field(default_factory=list)  # e.g. ["cuda:0", "cuda:1"]: one job per device
    stop_grace_seconds: float = 60.0  # on SIGTERM, how long running jobs may finish; then re-queued
    heartbeat_seconds: float = 600.0  # re-publish the NIP-89 announcement (with load) this often; 0: off
    catchup_seconds: int = 3600     # on a first start, how far back to look for requests
    accept_jobs_for_others: bool = False  # serve requests that name other providers in `p`
    max_request_bytes: int = 65536
    progress_interval: float = 2.0  # minimum seconds between two progress feedbacks of a job
    announce: bool = True           # publish the NIP-89 handler announcement on start
    mints: list[str] = field(default_factory=list)  # accepted Cashu mints; none: every job is free
    unit: str = "sat"
    default_price: int = 0          # sats per job for kinds with no [prices] entry and no plugin price
    input_error_fee: int = 0        # kept of a paid job that fails on the customer's data (announced)
    payment_timeout: float = 3600.0 # how long a job waits for a nutzap after payment-required
    max_unpaid_jobs: int = 100      # jobs waiting for payment at once; beyond: "busy"
    delivery_lock_seconds: int = 3600  # pay on delivery: the HTLC's lock, from the acceptance (`Runner.delivery_lock`)
    # pay on delivery: send the result as soon as the customer's ecash is checked (only this
    # worker can spend it before its locktime) and swap it at the mint afterwards; false: swap first
    deliver_before_redeem: bool = True
    mint_retry_seconds: float = 600.0  # how long to retry a mint that is down before giving up
    blob_servers: list[str] = field(default_factory=list)  # Blossom servers for result files
    # result files kept for a time (a transcript's checkpoints): how often the worker looks for
    # those whose time is up and deletes them (BUD-02), and how long it waits after a failed delete
    blob_sweep_seconds: float = 3600.0
    blob_retry_seconds: float = 3600.0
    max_download_bytes: int = 2 * 1024**3   # per input file
    download_timeout: float = 600.0
    precheck_seconds: float = 120.0  # a plugin's look at the inputs before pricing (free to the customer)
    max_prechecks: int = 2           # ...at most this many at once
    allow_private_urls: bool = False  # fetch inputs from loopback/private addresses (tests, demo)
    allowed_hosts: list[str] = field(default_factory=list)  # host names exempt from that check (a LAN blob server)
    log_format: str = "auto"        # auto, json or console
    log_level: str = "info"

    @property
    def store_path(self) -> Path:
        return Path(self.state_dir) / "dvm.sqlite3"

    @property
    def wallet_dir(self) -> Path:
        return Path(self.state_dir) / "wallet"

    @property
    def cache_dir(self) -> Path:
        return Path(self.state_dir) / "cache"

    @property
    def jobs_dir(self) -> Path:
        return Path(self.state_dir) / "jobs"

    def time_limit(self, job_kind) -> float:
        """Seconds a job of `job_kind` may run: its own limit, else `job_time_limit`."""
        return job_kind.time_limit or self.job_time_limit


@dataclass
class Config:
    settings: Settings
    raw: dict[str, Any]             # the whole TOML document, for plugins
    path: Path | None = None


def load_config(path: str | Path | None = None, env: dict[str, str] | None = None) -> Config:
    env = os.environ if env is None else env
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    table = dict(raw.get("dvm") or {})
    fields = {f.name: f for f in dataclasses.fields(Settings)}
    unknown = sorted(set(table) - set(fields))
    if unknown:
        raise ConfigError(f"unknown setting(s) in [dvm]: {', '.join(unknown)}")
    for name in fields:
        value = env.get(f"DVM_{name.upper()}")
        if value is not None:
            table[name] = value
    values = {name: _coerce(name, fields[name], value) for name, value in table.items()}
    settings = Settings(**values)
    if path is not None and not Path(settings.state_dir).is_absolute():
        settings.state_dir = str((path.parent / settings.state_dir).resolve())
    if settings.key_file and path is not None and not Path(settings.key_file).is_absolute():
        settings.key_file = str((path.parent / settings.key_file).resolve())
    _validate(settings)
    _validate_prices(raw.get("prices") or {}, settings)
    for name, slots in (raw.get("capacity") or {}).items():
        if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
            raise ConfigError(f"[capacity] {name} = {slots!r}: a kind's slots are a whole number, 1 or more")
    return Config(settings=settings, raw=raw, path=path)


def _coerce(name: str, f: dataclasses.Field, value: Any) -> Any:
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    typ = type(default)
    try:
        if typ is list:
            if isinstance(value, str):
                return [v.strip() for v in value.split(",") if v.strip()]
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                return value
            raise ValueError
        if typ is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if typ in (int, float):
            if isinstance(value, bool):
                raise ValueError
            if typ is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return typ(value)
        if not isinstance(value, str):
            raise ValueError
        return value
    except (ValueError, TypeError):
        raise ConfigError(f"setting {name!r} must be a {typ.__name__}, got {value!r}") from None


def _validate_prices(prices: dict, s: Settings) -> None:
    for name, price in prices.items():
        if isinstance(price, bool) or not isinstance(price, int) or price < 0:
            raise ConfigError(f"[prices] {name} = {price!r}: a price is a whole number of {s.unit}, 0 or more")
    if (s.default_price or any(prices.values())) and not s.mints:
        raise ConfigError("prices are set but no mints are: list the Cashu mints you accept in mints = [...]")


def _validate(s: Settings) -> None:
    for url in s.blob_servers:
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"blob server {url!r} must be an http:// or https:// URL")
    for url in s.mints:
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"mint {url!r} must be an http:// or https:// URL")
    if s.default_price < 0:
        raise ConfigError("default_price must be 0 or more")
    if not s.relays:
        raise ConfigError("no relays configured: set relays = [\"wss://…\"] in [dvm] or DVM_RELAYS")
    for url in s.relays:
        if not url.startswith(("ws://", "wss://")):
            raise ConfigError(f"relay {url!r} must be a ws:// or wss:// URL")
    if s.max_concurrent_jobs < 1:
        raise ConfigError("max_concurrent_jobs must be at least 1")
    if s.max_queued_jobs < 0:
        raise ConfigError("max_queued_jobs must be 0 or more")
    if s.blob_sweep_seconds <= 0 or s.blob_retry_seconds <= 0:
        raise ConfigError("blob_sweep_seconds and blob_retry_seconds must be positive")
    if s.job_time_limit <= 0:
        raise ConfigError("job_time_limit must be positive")
    if s.delivery_lock_seconds < 20:
        raise ConfigError("delivery_lock_seconds must be at least 20: the customer needs time to pay "
                          "and the worker to redeem before the customer may take the ecash back")
    if s.log_format not in ("auto", "json", "console"):
        raise ConfigError("log_format must be auto, json or console")
