"""Helpers shared by the payment tests: a funded customer, a paid worker, claiming nutzaps."""

from __future__ import annotations

import asyncio

from dvm_core.customer.client import Customer
from dvm_core.protocol.ecash import decode_token
from dvm_core.protocol.events import Keys

FUNDS = 100
PRICE = 5


async def funded_customer(tmp_path, mint_url: str, relay_url: str, amount: int = FUNDS) -> Customer:
    """A customer with `amount` sat at the mint; its wallet's P2PK key is its Nostr key, so it
    can redeem the change and refunds locked to it. Close with `close_customer`."""
    from dvm_core.payments.wallet import EcashWallet
    keys = Keys.generate()
    wallet = EcashWallet(directory=tmp_path / f"customer-wallet-{keys.public_key[:8]}",
                         accepted_mints=[mint_url], p2pk_private_key=keys.private_key)
    await wallet.mint_from_lightning(amount, mint_url)
    customer = Customer(keys, [relay_url])
    await customer.__aenter__()
    await customer.pool.wait_all_connected(10)
    customer.wallet = wallet
    return customer


async def close_customer(customer: Customer) -> None:
    await customer.__aexit__(None, None, None)
    await customer.wallet.close()


async def paid_worker(workers, mint, price: int = PRICE, **settings):
    mints = settings.pop("mints", [mint.url])
    return await workers.start(mints=mints, prices={"text-stats": price}, **settings)


async def provider_balance(worker) -> int:
    return await worker.cashier.wallet.total_balance()


async def redeemed_balance(worker, expected: int, timeout: float = 15.0) -> int:
    """The provider's balance once it reaches `expected` (or after `timeout`): a job paid on
    delivery is answered once its ecash is checked, and the swap at the mint follows."""
    for _ in range(int(timeout / 0.1)):
        balance = await provider_balance(worker)
        if balance == expected:
            return balance
        await asyncio.sleep(0.1)
    return await provider_balance(worker)


async def claim_nutzaps(customer, expected: int, timeout: float = 15.0) -> int:
    """Redeem the change/refund nutzaps sent to the customer; returns their total."""
    total = 0
    for _ in range(int(timeout / 0.25)):
        zaps = await customer.nutzaps_received(timeout=2)
        if sum(decode_token(z.token()).amount for z in zaps) >= expected:
            for zap in zaps:
                got = await customer.wallet.receive(zap.token(), min_amount=1, require_lock=True)
                total += got.amount
            return total
        await asyncio.sleep(0.25)
    return total
