"""Send a text-stats job to a DVM, pay it if asked, and print its progress and result.

    python examples/customer/text_stats_job.py --relay ws://127.0.0.1:7447 --dvm npub1… "some text"
    python examples/customer/text_stats_job.py ... --wallet-dir W --mint URL --max-price 10

The request is NIP-44-encrypted to the DVM unless --clear is given. When the DVM asks for
payment, the request is checked (signed by that DVM, the amount it announces, locked to this job's
key) and paid from --wallet-dir with a NIP-61 nutzap, up to --max-price; change and refunds come
back to the same wallet.
"""

import argparse
import asyncio
import json
from pathlib import Path

from dvm_core.customer import Customer, PaymentDeclined
from dvm_core.protocol.events import Keys, parse_public_key
from dvm_core.protocol.nip90 import JobInput, Result


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("text")
    parser.add_argument("--relay", action="append", required=True)
    parser.add_argument("--dvm", required=True, help="the DVM's npub or hex public key")
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--clear", action="store_true", help="send the request unencrypted")
    parser.add_argument("--wallet-dir", help="a wallet to pay from (see `dvm wallet mint`)")
    parser.add_argument("--mint", action="append", default=[], help="the wallet's mint(s)")
    parser.add_argument("--max-price", type=int, default=10, help="pay at most this many sat")
    args = parser.parse_args()

    wallet = None
    if args.wallet_dir:
        from dvm_core.customer import EcashWallet, load_or_create_p2pk_key
        directory = Path(args.wallet_dir)
        wallet = EcashWallet(directory, args.mint, p2pk_private_key=load_or_create_p2pk_key(directory / "p2pk.key"))
    try:
        async with Customer(Keys.generate(), args.relay) as customer:
            if wallet is not None:
                await customer.publish_wallet_info(wallet)   # where change and refunds go
            request = await customer.submit(
                5790, [JobInput(args.text, "text")], {"top": str(args.top)},
                provider=parse_public_key(args.dvm), encrypt=None if args.clear else "nip44")
            print(f"sent job {request['id']}")
            async for update in customer.updates(request, timeout=120):
                if isinstance(update, Result):
                    print(json.dumps(json.loads(update.content), indent=2))
                    break
                print(f"  {update.status}: {update.message}")
                if update.status == "error":
                    return 1
                if update.status == "payment-required":
                    if wallet is None:
                        print("  this DVM asks for payment: give --wallet-dir and --mint to pay")
                        await customer.cancel(request, "no wallet to pay with")
                        return 2
                    try:
                        await customer.pay_with_nutzap(request, update, wallet, max_price=args.max_price)
                    except PaymentDeclined as exc:
                        print(f"  not paying: {exc}")
                        await customer.cancel(request, str(exc))
                        return 2
                    print(f"  paid {update.amount_msats // 1000} sat with a nutzap")
            if wallet is not None:
                back = await customer.collect_nutzaps(wallet, timeout=2)
                print(f"balance: {await wallet.total_balance()} sat" + (f" ({back} sat came back)" if back else ""))
            return 0
    finally:
        if wallet is not None:
            await wallet.close()


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
