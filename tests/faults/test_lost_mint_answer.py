"""The mint performs the swap and its answer is lost: the job runs once and nothing is lost.

A real Nutshell mint behind a loopback proxy that throws away the answer to the worker's swap.
The worker's retry is told "already spent"; it asks the mint for its outputs again (NUT-09
restore, the secrets come from its seed) and counts the payment as made.
"""

from __future__ import annotations

import pytest

from dvm_core.customer.client import result_json
from dvm_core.protocol.ecash import build_nutzap, decode_payment_request, decode_token
from dvm_core.protocol.events import sign_event
from dvm_core.protocol.nip90 import JobInput

from ..paying import PRICE, close_customer, funded_customer, paid_worker, provider_balance
from .proxy import DroppingProxy

KIND = 5790


@pytest.fixture
async def proxy(mint):
    proxy = await DroppingProxy(mint.url).start()
    yield proxy
    await proxy.close()


@pytest.mark.parametrize("mode", ["encrypted", "nutzap"])
async def test_a_swap_whose_answer_is_lost_pays_the_job_once(workers, proxy, relay, tmp_path, mode):
    customer = await funded_customer(tmp_path, proxy.url, relay.url)
    try:
        worker = await paid_worker(workers, proxy)   # the worker knows the mint by the proxy's URL
        before = await customer.wallet.total_balance()
        if mode == "encrypted":
            token = await customer.wallet.send(PRICE, mint=proxy.url)
            proxy.drop_answer_to(b"POST /v1/swap")
            request = await customer.submit(KIND, [JobInput("lost answer", "text")], {},
                                            provider=worker.keys.public_key, cashu=token)
        else:
            request = await customer.submit(KIND, [JobInput("lost answer", "text")], {},
                                            provider=worker.keys.public_key)
            asked = await anext(customer.updates(request, timeout=20))
            assert asked.status == "payment-required"
            creq = decode_payment_request(asked.content)
            token = decode_token(await customer.wallet.send(PRICE, mint=proxy.url, lock_to=creq["nut10"]["d"]))
            proxy.drop_answer_to(b"POST /v1/swap")
            kind, content, tags = build_nutzap(token.mint, list(token.proofs), worker.keys.public_key,
                                               zapped_event=request["id"], zapped_kind=KIND)
            await customer.pool.publish(sign_event(customer.keys, kind, content, tags))
        assert result_json(await customer.result(request, timeout=40))["words"] == 2
        assert proxy.dropped == 1
        assert worker.counts["succeeded"] == 1 and worker.counts["failed"] == 0
        assert worker.store.payment_for_job(request["id"])["state"] == "consumed"
        # The ecash the lost answer carried is back in the provider's wallet.
        assert await provider_balance(worker) == PRICE
        assert await customer.wallet.total_balance() == before - PRICE
    finally:
        await close_customer(customer)
