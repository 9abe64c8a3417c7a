"""Finding DVMs: who offers a job kind, on what terms, and how busy they are.

Read from the relays a customer uses: each DVM's NIP-89 announcement (kind 31990: its kinds,
their params as JSON Schemas, its payment terms, its load) and its NIP-61 kind 10019 (the mints
it takes and its wallet key). Only events whose signature checked count (the relay pool drops
the others), and of the replaceable events a relay returns, the newest of each author wins: a
relay that keeps an old announcement cannot bring back old prices.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from dvm_core.protocol.ecash import NUTZAP_INFO_KIND, normalize_mint_url_or_keep, parse_nutzap_info
from dvm_core.protocol.nip90 import HANDLER_KIND, parse_handler_announcement
from dvm_core.transport.relay import RelayPool


@dataclass(frozen=True)
class DvmInfo:
    """One DVM as its own newest announcement and kind 10019 describe it."""

    pubkey: str
    name: str
    about: str
    kinds: dict[int, dict]          # kind -> name, description, params, params_schema
    announced_at: int               # the announcement's created_at: re-published with each heartbeat
    payment: dict = field(default_factory=dict)    # NIP-89 `payment`: unit, mints, prices, pricing...
    status: dict = field(default_factory=dict)     # NIP-89 `status`: queued, running, slots, updated
    wallet_mints: tuple[str, ...] = ()             # kind 10019's mints
    wallet_pubkey: str | None = None               # kind 10019's P2PK key
    announcement: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def npub(self) -> str:
        from pynostr.key import PublicKey
        return PublicKey.from_hex(self.pubkey).bech32()

    @property
    def mints(self) -> tuple[str, ...]:
        """The mints the DVM takes: its kind 10019's, else its announcement's."""
        announced = tuple(normalize_mint_url_or_keep(m) for m in self.payment.get("mints") or ()
                          if isinstance(m, str))
        return self.wallet_mints or announced

    def to_json(self) -> dict:
        return {"pubkey": self.pubkey, "npub": self.npub, "name": self.name, "about": self.about,
                "announced_at": self.announced_at, "age_seconds": max(0, int(time.time()) - self.announced_at),
                "kinds": {str(k): v for k, v in sorted(self.kinds.items())}, "payment": self.payment,
                "status": self.status, "mints": list(self.mints), "wallet_pubkey": self.wallet_pubkey}


def newest_per_author(events: list[dict]) -> dict[str, dict]:
    """The newest event of each author (ties: the lowest id, as NIP-01 says for replaceables)."""
    newest: dict[str, dict] = {}
    for event in events:
        have = newest.get(event["pubkey"])
        if have is None or (event["created_at"], have["id"]) > (have["created_at"], event["id"]):
            newest[event["pubkey"]] = event
    return newest


def _dvm_info(event: dict, wallet: dict | None) -> DvmInfo | None:
    try:
        content, kinds = parse_handler_announcement(event)
    except ValueError:
        return None
    if not isinstance(content, dict):
        return None
    described = content.get("nip90") if isinstance(content.get("nip90"), dict) else {}
    by_kind = {}
    for kind in kinds:
        about = described.get(str(kind))
        by_kind[kind] = about if isinstance(about, dict) else {}
    info = parse_nutzap_info(wallet) if wallet is not None else None

    def text(value) -> str:
        return value if isinstance(value, str) else ""
    return DvmInfo(
        pubkey=event["pubkey"], name=text(content.get("name")), about=text(content.get("about")),
        kinds=by_kind, announced_at=int(event["created_at"]),
        payment=content["payment"] if isinstance(content.get("payment"), dict) else {},
        status=content["status"] if isinstance(content.get("status"), dict) else {},
        wallet_mints=tuple(info.mints) if info else (), wallet_pubkey=info.p2pk_pubkey if info else None,
        announcement=event)


async def find_dvms(relays: list[str], *, kind: int | None = None, provider: str | None = None,
                    timeout: float = 5.0) -> list[DvmInfo]:
    """The DVMs announced on `relays` (those offering `kind`, or only `provider`), newest
    announcement first."""
    pool = RelayPool(list(relays))
    try:
        if not await pool.start(wait=timeout):
            raise ConnectionError(f"no relay answered within {timeout:g}s: {', '.join(relays)}")
        handler: dict = {"kinds": [HANDLER_KIND]}
        if kind is not None:
            handler["#k"] = [str(kind)]
        if provider is not None:
            handler["authors"] = [provider]
        announcements = newest_per_author([e for e in await pool.query([handler], timeout)
                                           if e["kind"] == HANDLER_KIND
                                           and provider in (None, e["pubkey"])])
        if not announcements:
            return []
        wallets = newest_per_author([e for e in await pool.query(
            [{"kinds": [NUTZAP_INFO_KIND], "authors": sorted(announcements)}], timeout)
            if e["kind"] == NUTZAP_INFO_KIND and e["pubkey"] in announcements])
    finally:
        await pool.close()
    found = []
    for pubkey, event in announcements.items():
        info = _dvm_info(event, wallets.get(pubkey))
        # The relay filtered by the `k` tag; a relay that did not (or lied) is checked here.
        if info is not None and (kind is None or kind in info.kinds):
            found.append(info)
    return sorted(found, key=lambda d: d.announced_at, reverse=True)
