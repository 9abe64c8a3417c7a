"""Send a text-stats job to a DVM and print its progress and result.

    python examples/customer/text_stats_job.py --relay ws://127.0.0.1:7447 --dvm npub1… "some text"

The request is NIP-44-encrypted to the DVM unless --clear is given.
"""

import argparse
import asyncio
import json

from dvm_core.client import Customer, JobFailed
from dvm_core.events import Keys, parse_public_key
from dvm_core.nip90 import JobInput


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("text")
    parser.add_argument("--relay", action="append", required=True)
    parser.add_argument("--dvm", required=True, help="the DVM's npub or hex public key")
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--clear", action="store_true", help="send the request unencrypted")
    args = parser.parse_args()

    async with Customer(Keys.generate(), args.relay) as customer:
        request = await customer.submit(
            5790, [JobInput(args.text, "text")], {"top": str(args.top)},
            provider=parse_public_key(args.dvm), encrypt=None if args.clear else "nip44")
        print(f"sent job {request['id']}")
        try:
            result = await customer.result(
                request, timeout=120, on_feedback=lambda f: print(f"  {f.status}: {f.message}"))
        except JobFailed as exc:
            print(f"job failed: {exc}")
            return 1
        print(json.dumps(json.loads(result.content), indent=2))
        return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
