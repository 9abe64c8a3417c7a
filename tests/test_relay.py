"""The relay transport against a real nostr-relay: OKs and their reasons, reconnects,
re-subscription, publishing through an outage, one delivery per event."""

from __future__ import annotations

import asyncio

from dvm_core.protocol.events import Keys, sign_event
from dvm_core.devtools.localnet import start_relay
from dvm_core.transport.relay import RelayConnection, RelayPool


async def test_publish_waits_for_ok_and_reports_a_rejection_reason(tmp_path):
    relay = start_relay(tmp_path / "small", max_event_size=100)
    try:
        pool = RelayPool([relay.url])
        await pool.start()
        keys = Keys.generate()
        ok = await pool.publish(sign_event(keys, 1, "short"))
        assert ok[0].ok
        # nostr-relay answers this rejection with an empty id: it must still be matched
        big = await pool.publish(sign_event(keys, 1, "x" * 500), timeout=5)
        assert not big[0].ok and "timed out" not in big[0].message
        assert big[0].message.startswith("invalid")
        again = await pool.publish(sign_event(keys, 1, "still fine"))
        assert again[0].ok
        await pool.close()
    finally:
        relay.stop()


async def test_reconnects_resubscribes_and_delivers_publishes_made_during_an_outage(tmp_path):
    workdir = tmp_path / "relay"
    relay = start_relay(workdir)
    port = int(relay.url.rsplit(":", 1)[1])
    keys = Keys.generate()
    received: list[dict] = []
    sub = RelayPool([relay.url], lambda e, r: received.append(e), min_backoff=0.1, max_backoff=0.5)
    pub = RelayPool([relay.url], min_backoff=0.1, max_backoff=0.5)
    try:
        await sub.start()
        await pub.start()
        await sub.subscribe("notes", [{"kinds": [1], "authors": [keys.public_key]}])
        await sub.wait_eose("notes")
        await pub.publish(sign_event(keys, 1, "before"))

        relay.kill()
        await asyncio.sleep(0.3)
        assert not pub.relays[0].connected
        during = asyncio.create_task(pub.publish(sign_event(keys, 1, "during the outage"), timeout=30))
        await asyncio.sleep(0.5)
        relay = start_relay(workdir, port=port)
        result = await during
        assert result[0].ok, result
        await pub.publish(sign_event(keys, 1, "after"))
        for _ in range(100):
            if {"before", "during the outage", "after"} <= {e["content"] for e in received}:
                break
            await asyncio.sleep(0.05)
        contents = [e["content"] for e in received]
        assert sorted(contents) == sorted(set(contents))  # each once, despite the replay
        assert {"before", "during the outage", "after"} <= set(contents)
    finally:
        await sub.close()
        await pub.close()
        relay.stop()


async def test_an_event_on_several_relays_is_delivered_once(relay, fresh_relay):
    keys = Keys.generate()
    received: list[tuple[str, str]] = []
    pool = RelayPool([relay.url, fresh_relay.url], lambda e, r: received.append((e["id"], r)))
    await pool.start()
    await pool.wait_all_connected(10)
    await pool.subscribe("s", [{"kinds": [1], "authors": [keys.public_key]}])
    await pool.wait_eose("s")
    event = sign_event(keys, 1, "twice")
    results = await pool.publish(event)
    assert all(r.ok for r in results) and len(results) == 2
    await asyncio.sleep(0.5)
    assert [i for i, _ in received] == [event["id"]]
    await pool.close()


async def test_forged_copy_does_not_shadow_the_real_event(relay):
    keys = Keys.generate()
    got: list[dict] = []
    pool = RelayPool([relay.url], lambda e, r: got.append(e))
    event = sign_event(keys, 1, "real")
    forged = dict(event, content="forged")
    pool._deliver(forged, relay.url, "s")
    pool._deliver(event, relay.url, "s")
    assert [e["content"] for e in got] == ["real"] and pool.invalid_events == 1


async def test_publish_to_an_unreachable_relay_times_out_with_a_reason():
    conn = RelayConnection("ws://127.0.0.1:9", lambda *a: None, min_backoff=0.1)
    conn.start()
    result = await conn.publish(sign_event(Keys.generate(), 1, "x"), timeout=0.5)
    assert not result.ok and "not connected" in result.message
    await conn.close()


async def test_an_event_the_relay_already_holds_counts_as_delivered(relay):
    """A re-sent result (the outbox after a restart) is answered `OK false "duplicate: …"` by
    some relays: NIP-01 says the relay has it, so it is not sent again and again."""
    pool = RelayPool([relay.url])
    await pool.start()
    try:
        event = sign_event(Keys.generate(), 1, "sent twice")
        first = await pool.publish(event)
        again = await pool.publish(event)
        assert first[0].ok and again[0].ok, again
    finally:
        await pool.close()


def test_publish_results_are_read_by_their_nip01_prefix():
    from dvm_core.transport.relay import PublishResult
    assert PublishResult("r", False, "invalid: event too large").refused_for_good
    assert PublishResult("r", False, "blocked: you are banned").refused_for_good
    assert not PublishResult("r", False, "rate-limited: slow down").refused_for_good
    assert not PublishResult("r", False, "error: could not store, invalid state").refused_for_good
    assert not PublishResult("r", False, "no OK from the relay within 10 s").refused_for_good
    assert PublishResult("r", False, "rate-limited: slow down").prefix == "rate-limited"
    assert PublishResult("r", True, "duplicate: have it").prefix == "duplicate"


async def test_a_reconnect_with_much_to_send_and_much_to_read_does_not_stall():
    """A relay answers a re-subscription at once (a flood's backlog of requests) while the
    connection is still sending the publishes that waited for it. If nothing read until the
    sending was done, both sides' buffers would fill, each would wait for the other, and the
    connection would stall for good, its keep-alive pings stuck behind it too (issue 19's flood
    found this: every result after a reconnect timed out with "relay not connected")."""
    import json

    import websockets

    backlog = 3000                      # the relay's answer to the REQ: ~6 MB
    events = [sign_event(Keys.generate(), 1, f"waited {i} " + "x" * 2000) for i in range(3000)]
    received: list[dict] = []

    async def relay(ws):
        async for raw in ws:
            message = json.loads(raw)
            if message[0] == "REQ":
                for i in range(backlog):   # the backlog first, as a relay answers a REQ
                    await ws.send(json.dumps(["NOTICE", f"backlog {i} " + "y" * 2000]))
                await ws.send(json.dumps(["EOSE", message[1]]))
            elif message[0] == "EVENT":
                received.append(message[1])
                await ws.send(json.dumps(["OK", message[1]["id"], True, ""]))

    server = await websockets.serve(relay, "127.0.0.1", 0, max_size=2**22, compression=None)
    port = server.sockets[0].getsockname()[1]
    conn = RelayConnection(f"ws://127.0.0.1:{port}", lambda event, url, sub: None)
    try:
        await conn.subscribe("requests", lambda: [{"kinds": [5790]}])
        # published while there is no connection yet: all sent at once when it comes
        waiting = [asyncio.create_task(conn.publish(event, timeout=30)) for event in events]
        await asyncio.sleep(0)
        conn.start()
        results = await asyncio.wait_for(asyncio.gather(*waiting), 60)
        assert all(r.ok for r in results), [r.message for r in results if not r.ok][:3]
        assert len(received) == len(events)
        assert conn.eose.get("requests") is not None and conn.eose["requests"].is_set()
    finally:
        await conn.close()
        server.close()
        await server.wait_closed()
