"""Benchmark of the worker core over a real relay: request→feedback latency against the relay's
own round trip, and a burst of concurrent requests.

    .venv/bin/python tests/benchmarks/bench_core.py [--n-latency 200] [--burst 1000] ...

Prints one JSON object on stdout; progress goes to stderr. Not a pytest module (no test_
functions, and the file name does not match test_*.py).

Everything but the relay runs in this process, on one event loop: the worker (textstats
plugin only), the customer, and a bare echo responder. The relay (`nostr-relay`) runs in a
child process on 127.0.0.1, fresh for each run.

- latency: the customer publishes a kind-5790 request in the clear, addressed to the worker
  with a `p` tag, and times (perf_counter, customer side) until the first kind-7000 feedback
  for it arrives; it then waits for the result before sending the next request.
- relay round trip, in the same run and interleaved with the requests: the customer publishes
  a ping (kind 1, `p` = responder); the responder, a second RelayPool, signs and publishes a
  reply tagging the ping as soon as it receives it; timed until the customer receives the
  reply. Both paths cross the relay twice (request→worker, feedback→customer), so the ratio
  feedback / round trip is what the worker itself adds. One way: publish → responder receives.
- burst: N requests published at once (asyncio.gather in chunks); counts results in time.
- flood (`--flood N`, issue 19): N requests, a tenth of them malformed or oversized, published
  as fast as the relay takes them to a worker in a child process (`dvm run`, as systemd runs
  it: `$NOTIFY_SOCKET` is a datagram socket this script listens on, `$WATCHDOG_USEC` asks for
  a ping every second). Every request must get its answer (a result, or an error feedback for
  the bad ones and for those the worker is too busy to queue): `flood_lost` counts those that
  got none. `flood_peak_rss_mb` is the worker's peak resident memory (its VmHWM), and
  `flood_watchdog_gap_s` the largest gap between two `WATCHDOG=1` pings (an event loop held
  up by the flood shows here first).

The customer is a bare RelayPool with one standing subscription (kinds 7000/6790/1, `#p` = the
customer), as a NIP-90 client keeps; `dvm_core.customer.client.Customer` would add a REQ per job.
`--trace` adds a hop-by-hop breakdown and the event-loop time of the worker's blocking calls
(it wraps a few methods, so leave it off for the headline numbers); `--profile` runs cProfile.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import platform
import pstats
import shutil
import sys
import tempfile
import time
from pathlib import Path

try:
    import psutil
except ImportError:  # CPU accounting is left out without it
    psutil = None

from dvm_core.worker.config import load_config
from dvm_core.protocol.events import Keys, sign_event
from dvm_core.devtools.localnet import start_relay
from dvm_core.cli.logs import configure_logging
from dvm_core.protocol.nip90 import FEEDBACK_KIND, JobInput, build_request
from dvm_core.worker.plugins import plugin_manager
from dvm_core.transport.relay import RelayPool
from dvm_core.worker.worker import Worker
from benchlib import CpuMeter, eprint, loadavg, ms, percentile, reply_to  # noqa: E402

TEXT_STATS_KIND = 5790
RESULT_KIND = TEXT_STATS_KIND + 1000
PING_KIND = 1  # a regular kind: the relay stores it, as it stores requests and feedback


class HopTracer:
    """With --trace: where a request's and a ping's time goes, hop by hop (same clock).

    Wraps the worker's and the responder's relay connections (event received, before the pool
    verifies it), the worker's `_publish` (feedback signed and handed to a task) and both pools'
    `publish` (the send actually starting). Costs a dict write per event.
    """

    def __init__(self):
        self.recv: dict[str, float] = {}        # request/ping id -> worker/responder got it
        self.queued: dict[str, float] = {}      # request id -> feedback signed, publish task spawned
        self.sending: dict[str, float] = {}     # request/ping id -> reply publish started

    def install(self, worker: Worker, responder_pool: RelayPool) -> None:
        self._install_blocking(worker)
        for pool in (worker.pool, responder_pool):
            for conn in pool.relays:
                conn._on_event = self._wrap_recv(conn._on_event)
            pool.publish = self._wrap_publish(pool.publish)
        original = worker.outbox.publish

        def _publish(event, *a, **kw):
            if event["kind"] == FEEDBACK_KIND:
                ref = reply_to(event)
                if ref is not None:
                    self.queued.setdefault(ref, time.perf_counter())
            return original(event, *a, **kw)
        worker.outbox.publish = _publish

    # Calls that block the event loop the worker shares with everything else: seconds per kind.
    def _install_blocking(self, worker: Worker) -> None:
        import types

        import dvm_core.transport.relay as relay_mod
        import dvm_core.worker.runner as worker_mod
        self.blocking: dict[str, float] = {}
        self.blocking_calls: dict[str, int] = {}
        timed = self._timed
        for name in ("record_request", "set_state", "add_outgoing", "mark_published"):
            setattr(worker.store, name, timed(f"store.{name}", getattr(worker.store, name)))
        worker.outbox.sign = timed("sign_event", worker.outbox.sign)
        worker.runner._deliver = timed("deliver_result (sign+store+spawn)", worker.runner._deliver)
        real_shutil = worker_mod.shutil

        class TimedShutil(types.ModuleType):  # the worker's `shutil`, with rmtree timed
            rmtree = staticmethod(timed("rmtree(workdir)", real_shutil.rmtree))

            def __getattr__(self, name):
                return getattr(real_shutil, name)
        worker_mod.shutil = TimedShutil("shutil")
        relay_mod.verify_event = timed("verify_event (all pools)", relay_mod.verify_event)
        # workdir.mkdir: Path.mkdir, timed only for paths under the worker's jobs directory
        import pathlib
        jobs_dir = str(worker.settings.jobs_dir)
        real_mkdir = pathlib.Path.mkdir

        def mkdir(path, *a, **kw):
            if not str(path).startswith(jobs_dir):
                return real_mkdir(path, *a, **kw)
            t = time.perf_counter()
            try:
                return real_mkdir(path, *a, **kw)
            finally:
                self._add("mkdir(workdir)", time.perf_counter() - t)
        pathlib.Path.mkdir = mkdir

    def _add(self, name: str, seconds: float) -> None:
        self.blocking[name] = self.blocking.get(name, 0.0) + seconds
        self.blocking_calls[name] = self.blocking_calls.get(name, 0) + 1

    def _timed(self, name: str, fn):
        def wrapped(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self._add(name, time.perf_counter() - t)
        return wrapped

    def blocking_report(self, jobs: int) -> dict:
        """Milliseconds per job spent in each blocking call, then reset."""
        out = {name: {"ms_per_job": round(1000 * total / max(jobs, 1), 3),
                      "ms_per_call": round(1000 * total / self.blocking_calls[name], 3)}
               for name, total in sorted(self.blocking.items(), key=lambda kv: -kv[1])}
        self.blocking.clear()
        self.blocking_calls.clear()
        return out

    def _wrap_recv(self, on_event):
        def wrapped(event, url, sub_id):
            if isinstance(event, dict) and isinstance(event.get("id"), str):
                self.recv.setdefault(event["id"], time.perf_counter())
            return on_event(event, url, sub_id)
        return wrapped

    def _wrap_publish(self, publish):
        async def wrapped(event, *a, **kw):
            ref = reply_to(event)
            if ref is not None:
                self.sending.setdefault(ref, time.perf_counter())
            return await publish(event, *a, **kw)
        return wrapped


def hops(ids: list[str], sent: dict, tracer: HopTracer, back: dict, worker_side: bool) -> dict:
    """p50 of each hop, in ms, over the ids that have every timestamp."""
    legs: dict[str, list[float]] = {"relay_in": [], "server": [], "relay_out": []}
    if worker_side:
        legs.update({"recv_to_feedback_queued": [], "feedback_queued_to_send": []})
    for i in ids:
        stamps = [sent.get(i), tracer.recv.get(i), tracer.sending.get(i), back.get(i)]
        if any(x is None for x in stamps):
            continue
        t0, t1, t2, t3 = stamps
        legs["relay_in"].append(t1 - t0)
        legs["server"].append(t2 - t1)
        legs["relay_out"].append(t3 - t2)
        if worker_side and i in tracer.queued:
            legs["recv_to_feedback_queued"].append(tracer.queued[i] - t1)
            legs["feedback_queued_to_send"].append(t2 - tracer.queued[i])
    return {k: ms(percentile(v, 50)) for k, v in legs.items()}


def write_config(path: Path, relay_url: str, **settings) -> Path:
    """As tests/conftest.py writes it: a [dvm] table of JSON-encoded values."""
    values = {"relays": [relay_url], "state_dir": str(path.parent / "state"),
              "log_format": "json", **settings}
    lines = ["[dvm]"] + [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


class Timings:
    """Customer-side arrival times, keyed by the request (or ping) id."""

    def __init__(self):
        self.sent: dict[str, float] = {}
        self.feedback: dict[str, float] = {}
        self.result: dict[str, float] = {}
        self.pong: dict[str, float] = {}
        self.ping_seen: dict[str, float] = {}   # responder side, same clock
        self.errors: dict[str, str] = {}
        self.waiters: dict[tuple[str, str], asyncio.Future] = {}
        self.all_results = asyncio.Event()
        self.expected_results: set[str] = set()

    def wait(self, what: str, event_id: str) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        self.waiters[(what, event_id)] = fut
        return fut

    def _wake(self, what: str, event_id: str) -> None:
        fut = self.waiters.pop((what, event_id), None)
        if fut is not None and not fut.done():
            fut.set_result(None)

    def on_customer_event(self, event: dict, relay: str) -> None:
        now = time.perf_counter()
        ref = reply_to(event)
        if ref is None:
            return
        kind = event["kind"]
        if kind == FEEDBACK_KIND:
            if ref not in self.feedback:
                self.feedback[ref] = now
                self._wake("feedback", ref)
            status = next((t for t in event["tags"] if t and t[0] == "status"), None)
            if status and len(status) > 1 and status[1] == "error":
                self.errors[ref] = status[2] if len(status) > 2 else "error"
                self._wake("result", ref)
        elif kind == RESULT_KIND:
            if ref not in self.result:
                self.result[ref] = now
                self._wake("result", ref)
                self.expected_results.discard(ref)
                if not self.expected_results:
                    self.all_results.set()
        elif kind == PING_KIND:
            if ref not in self.pong:
                self.pong[ref] = now
                self._wake("pong", ref)


class Responder:
    """A bare echo: on a ping, sign a reply tagging it and publish it, nothing else."""

    def __init__(self, relay_url: str, timings: Timings):
        self.keys = Keys.generate()
        self.timings = timings
        self.pool = RelayPool([relay_url], self.on_event)

    def on_event(self, event: dict, relay: str):
        self.timings.ping_seen.setdefault(event["id"], time.perf_counter())
        reply = sign_event(self.keys, PING_KIND, "pong", [["e", event["id"]], ["p", event["pubkey"]]])
        return self.pool.publish(reply)  # a coroutine: the pool runs it as a task at once


async def sequential(customer: RelayPool, ckeys: Keys, worker_pk: str, responder_pk: str,
                     timings: Timings, n: int, warmup: int, text: str, timeout: float) -> dict:
    """Interleave pings and requests, one at a time, so both see the same conditions."""
    lat_fb, lat_res, rtt, oneway = [], [], [], []
    ping_ids, req_ids = [], []
    lost_fb = 0
    for i in range(warmup + n):
        # ping → responder → pong
        ping = sign_event(ckeys, PING_KIND, f"ping {i}", [["p", responder_pk]])
        pong = timings.wait("pong", ping["id"])
        t0 = time.perf_counter()
        timings.sent[ping["id"]] = t0
        published = await customer.publish(ping)
        if not any(r.ok for r in published):
            raise RuntimeError(f"relay refused ping {i}: {published}")
        await asyncio.wait_for(pong, timeout)
        if i >= warmup:
            ping_ids.append(ping["id"])
            rtt.append(timings.pong[ping["id"]] - t0)
            oneway.append(timings.ping_seen[ping["id"]] - t0)

        # request → worker → feedback (then wait for the result before the next one)
        # The text differs per request: same key, content, tags and second would be the same
        # event id, which the relay drops as a duplicate.
        kind, content, tags = build_request(TEXT_STATS_KIND, [JobInput(f"{text} {i}", "text")], {},
                                            providers=[worker_pk])
        req = sign_event(ckeys, kind, content, tags)
        fb = timings.wait("feedback", req["id"])
        res = timings.wait("result", req["id"])
        t0 = time.perf_counter()
        timings.sent[req["id"]] = t0
        published = await customer.publish(req)
        if not any(r.ok for r in published):
            raise RuntimeError(f"relay refused request {i}: {published}")
        try:
            await asyncio.wait_for(fb, timeout)
            await asyncio.wait_for(res, timeout)
        except asyncio.TimeoutError:
            lost_fb += 1
            continue
        if i >= warmup:
            req_ids.append(req["id"])
            lat_fb.append(timings.feedback[req["id"]] - t0)
            if req["id"] in timings.result:
                lat_res.append(timings.result[req["id"]] - t0)
        if (i + 1) % 50 == 0:
            eprint(f"  sequential {i + 1}/{warmup + n}")
    return {"feedback": lat_fb, "result": lat_res, "rtt": rtt, "oneway": oneway, "timeouts": lost_fb,
            "ping_ids": ping_ids, "req_ids": req_ids}


async def burst(customer: RelayPool, ckeys: Keys, worker_pk: str, timings: Timings, count: int,
                chunk: int, text: str, timeout: float) -> dict:
    requests = []
    for i in range(count):
        kind, content, tags = build_request(TEXT_STATS_KIND, [JobInput(f"{text} #{i}", "text")], {},
                                            providers=[worker_pk])
        requests.append(sign_event(ckeys, kind, content, tags))
    timings.expected_results = {r["id"] for r in requests}
    timings.all_results.clear()
    rejected: list[str] = []
    t0 = time.perf_counter()
    for start in range(0, count, chunk):
        part = requests[start:start + chunk]
        for r in part:
            timings.sent[r["id"]] = time.perf_counter()
        results = await asyncio.gather(*(customer.publish(r, timeout=60) for r in part))
        rejected += [res[0].message for res in results if not any(x.ok for x in res)]
    published_s = time.perf_counter() - t0
    eprint(f"  burst: {count} published in {published_s:.2f}s ({len(rejected)} not accepted)")
    try:
        await asyncio.wait_for(timings.all_results.wait(), timeout)
    except asyncio.TimeoutError:
        pass
    ids = [r["id"] for r in requests]
    answered = [timings.result[i] for i in ids if i in timings.result]
    end = max(answered) if answered else time.perf_counter()
    feedbacks = sum(1 for i in ids if i in timings.feedback)
    errors = sum(1 for i in ids if i in timings.errors)
    res_lat = [timings.result[i] - timings.sent[i] for i in ids if i in timings.result]
    fb_lat = [timings.feedback[i] - timings.sent[i] for i in ids if i in timings.feedback]
    return {"answered": len(answered), "seconds": end - t0, "published_seconds": published_s,
            "publish_rejected": len(rejected), "reject_reasons": sorted(set(rejected))[:5],
            "feedbacks": feedbacks, "errors": errors, "result_latency": res_lat,
            "feedback_latency": fb_lat}


FLOOD_MAX_REQUEST_BYTES = 4096
WATCHDOG_USEC = 2_000_000     # systemd's WatchdogSec=2: the worker pings every second


class WatchdogListener:
    """The systemd side of sd_notify: a datagram socket; the arrival time of each WATCHDOG=1."""

    def __init__(self, path: Path):
        import socket
        import threading
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.pings: list[float] = []
        self.ready = False
        self._stop = False
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(65536)
            except OSError:
                continue
            lines = data.decode(errors="replace").splitlines()
            if "WATCHDOG=1" in lines:
                self.pings.append(time.monotonic())
            if "READY=1" in lines:
                self.ready = True

    def largest_gap(self, since: float, until: float) -> float | None:
        """The longest time without a ping in [since, until], its ends included."""
        stamps = [since] + [t for t in self.pings if since <= t <= until] + [until]
        if len(stamps) < 3:
            return None
        return max(b - a for a, b in zip(stamps, stamps[1:]))

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.sock.close()


class RssMeter:
    """The worker process's peak resident memory: its VmHWM from /proc (the kernel's own peak),
    else the largest of psutil samples taken every 50 ms."""

    def __init__(self, pid: int):
        self.pid = pid
        self.sampled = 0
        self._task: asyncio.Task | None = None

    def _rss(self) -> int:
        if psutil is not None:
            try:
                return psutil.Process(self.pid).memory_info().rss
            except psutil.Error:
                return 0
        try:
            with open(f"/proc/{self.pid}/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            return 0

    def hwm(self) -> int | None:
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def start(self) -> None:
        async def sample():
            while True:
                self.sampled = max(self.sampled, self._rss())
                await asyncio.sleep(0.05)
        self._task = asyncio.create_task(sample())

    def peak_mb(self) -> float:
        if self._task is not None:
            self._task.cancel()
        self.sampled = max(self.sampled, self._rss())
        return round(max(self.hwm() or 0, self.sampled) / 2**20, 1)


def flood_requests(ckeys: Keys, worker_pk: str, count: int, text: str) -> tuple[list[dict], set[str]]:
    """`count` requests for the worker, every tenth one malformed or oversized (in turn: an i tag
    without a type, an unknown param, a request over max_request_bytes, content that does not
    decrypt, a param out of range). Returns them and the ids of the bad ones."""
    from dvm_core.protocol.encryption import encrypt as encrypt_content
    requests, bad = [], set()
    for i in range(count):
        tags = [["i", f"{text} ~{i}", "text"], ["p", worker_pk]]
        content = ""
        if i % 10 == 9:
            how = (i // 10) % 5
            if how == 0:
                tags[0] = ["i", f"{text} ~{i}"]
            elif how == 1:
                tags.append(["param", "colour", "red"])
            elif how == 2:
                tags[0] = ["i", ("word " * (FLOOD_MAX_REQUEST_BYTES // 4)) + str(i), "text"]
            elif how == 3:
                tags = [["encrypted"], ["p", worker_pk]]
                content = encrypt_content("nip44", ckeys.private_key, Keys.generate().public_key,
                                          json.dumps([["i", str(i), "text"]]))
            else:
                tags.append(["param", "top", "100000"])
        event = sign_event(ckeys, TEXT_STATS_KIND, content, tags)
        requests.append(event)
        if i % 10 == 9:
            bad.add(event["id"])
    return requests, bad


async def flood(relay_url: str, tmp: Path, count: int, chunk: int, text: str, timeout: float,
                max_concurrent_jobs: int) -> dict:
    """The flood against a `dvm run` child process; see the module's docstring."""
    import subprocess
    from dvm_core.state.keyfiles import write_key_file
    folder = tmp / "flood"
    folder.mkdir()
    wkeys = Keys.generate()
    write_key_file(folder / "dvm.key", wkeys)
    config = write_config(folder / "dvm.toml", relay_url, key_file=str(folder / "dvm.key"),
                          max_concurrent_jobs=max_concurrent_jobs, announce=False, log_level="warning",
                          max_request_bytes=FLOOD_MAX_REQUEST_BYTES, catchup_seconds=60)
    listener = WatchdogListener(folder / "notify.sock")
    log = open(folder / "worker.log", "ab")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "DVM_PLUGINS": "textstats",
           "NOTIFY_SOCKET": str(listener.path), "WATCHDOG_USEC": str(WATCHDOG_USEC)}
    env.pop("WATCHDOG_PID", None)
    proc = subprocess.Popen([sys.executable, "-m", "dvm_core.cli", "run", "--config", str(config)],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    customer = None
    try:
        deadline = time.monotonic() + 60
        while not listener.ready:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the flood's worker did not start; see {folder / 'worker.log'}")
            await asyncio.sleep(0.05)
        rss = RssMeter(proc.pid)
        rss.start()
        ckeys = Keys.generate()
        answers: dict[str, str] = {}   # request id -> "result" / "error"
        busy: set[str] = set()
        all_done = asyncio.Event()
        expected: set[str] = set()

        def on_event(event: dict, relay: str) -> None:
            ref = reply_to(event)
            if ref is None or ref not in expected or ref in answers:
                return
            if event["kind"] == RESULT_KIND:
                answers[ref] = "result"
            elif event["kind"] == FEEDBACK_KIND:
                status = next((t for t in event["tags"] if t and t[0] == "status"), [])
                if len(status) > 1 and status[1] == "error":
                    answers[ref] = "error"
                    if len(status) > 2 and status[2].startswith("busy"):
                        busy.add(ref)
            if len(answers) == len(expected):
                all_done.set()

        customer = RelayPool([relay_url], on_event)
        await customer.start()
        await customer.subscribe("inbox", [{"kinds": [FEEDBACK_KIND, RESULT_KIND], "#p": [ckeys.public_key],
                                            "since": int(time.time()) - 5}])
        assert await customer.wait_eose("inbox")
        eprint(f"flood: signing {count} requests ({count // 10} malformed or oversized)")
        requests, bad = flood_requests(ckeys, wkeys.public_key, count, text)
        expected.update(r["id"] for r in requests)
        rejected = 0
        started = time.monotonic()
        for start in range(0, count, chunk):
            results = await asyncio.gather(*(customer.publish(r, timeout=60) for r in requests[start:start + chunk]))
            rejected += sum(1 for res in results if not any(x.ok for x in res))
            if (start // chunk) % 10 == 9:
                eprint(f"  flood: {start + chunk}/{count} published, {len(answers)} answered")
        published = time.monotonic()
        eprint(f"flood: {count} published in {published - started:.1f}s ({rejected} not accepted)")
        try:
            await asyncio.wait_for(all_done.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        ended = time.monotonic()
        lost = [i for i in expected if i not in answers]
        good_errors = [i for i, a in answers.items() if a == "error" and i not in bad]
        bad_results = [i for i, a in answers.items() if a == "result" and i in bad]
        out = {
            "flood_requests": count,
            "flood_malformed": len(bad),
            "flood_lost": len(lost),
            "flood_peak_rss_mb": rss.peak_mb(),
            "flood_watchdog_gap_s": (round(gap, 3) if (gap := listener.largest_gap(started, ended)) is not None
                                     else None),
            "flood_watchdog_pings": len([t for t in listener.pings if started <= t <= ended]),
            "flood_publish_seconds": round(published - started, 3),
            "flood_seconds": round(ended - started, 3),
            "flood_publish_rejected": rejected,
            "flood_results": sum(1 for a in answers.values() if a == "result"),
            "flood_errors": sum(1 for a in answers.values() if a == "error"),
            "flood_busy": len(busy),
            "flood_good_refused_not_busy": len([i for i in good_errors if i not in busy]),
            "flood_bad_answered_with_result": len(bad_results),
            "flood_worker_alive": proc.poll() is None,
        }
        eprint(f"flood: {len(answers)}/{count} answered in {ended - started:.1f}s, peak RSS "
               f"{out['flood_peak_rss_mb']} MB, largest watchdog gap {out['flood_watchdog_gap_s']} s")
        return out
    finally:
        if customer is not None:
            await customer.close()
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
        listener.close()


async def main_async(args) -> dict:
    configure_logging("json", "warning")
    tmp = Path(tempfile.mkdtemp(prefix="dvm-bench-"))
    eprint(f"workdir {tmp}")
    relay = start_relay(tmp / "relay")
    eprint(f"relay {relay.url} (pid {relay.process.pid})")
    worker = responder = customer = None
    try:
        (tmp / "worker").mkdir()
        config = load_config(write_config(tmp / "worker" / "dvm.toml", relay.url,
                                          max_concurrent_jobs=args.max_concurrent_jobs,
                                          announce=False, log_level="warning"), env={})
        worker = Worker(config, Keys.generate(), plugin_manager(only=["textstats"]))
        await worker.start()
        assert await worker.pool.wait_all_connected(10), "worker did not connect"

        timings = Timings()
        responder = Responder(relay.url, timings)
        await responder.pool.start()
        await responder.pool.subscribe("pings", [{"kinds": [PING_KIND], "#p": [responder.keys.public_key],
                                                  "since": int(time.time()) - 5}])
        ckeys = Keys.generate()
        customer = RelayPool([relay.url], timings.on_customer_event)
        await customer.start()
        # One subscription for everything addressed to the customer, as a NIP-90 client keeps.
        await customer.subscribe("inbox", [{"kinds": [FEEDBACK_KIND, RESULT_KIND, PING_KIND],
                                            "#p": [ckeys.public_key], "since": int(time.time()) - 5}])
        assert await customer.wait_eose("inbox") and await responder.pool.wait_eose("pings")

        tracer = None
        if args.trace:
            tracer = HopTracer()
            tracer.install(worker, responder.pool)
        cpu = CpuMeter(relay=relay.process.pid)
        profiler = cProfile.Profile() if args.profile else None
        out: dict = {"loadavg_1m_before": loadavg()}
        if args.n_latency:
            eprint(f"sequential: {args.warmup} warm-up + {args.n_latency} measured")
            if profiler and args.profile == "latency":
                profiler.enable()
            cpu.begin()
            seq = await sequential(customer, ckeys, worker.keys.public_key, responder.keys.public_key,
                                   timings, args.n_latency, args.warmup, args.text, args.timeout)
            cpu_seq = cpu.end()
            if profiler and args.profile == "latency":
                profiler.disable()
            fb, rtt = seq["feedback"], seq["rtt"]
            out.update({
                "feedback_p50_ms": ms(percentile(fb, 50)),
                "feedback_p99_ms": ms(percentile(fb, 99)),
                "relay_rtt_p50_ms": ms(percentile(rtt, 50)),
                "relay_rtt_p99_ms": ms(percentile(rtt, 99)),
                "relay_oneway_p50_ms": ms(percentile(seq["oneway"], 50)),
                "ratio": round(percentile(fb, 50) / percentile(rtt, 50), 3),
                "result_p50_ms": ms(percentile(seq["result"], 50)),
                "result_p99_ms": ms(percentile(seq["result"], 99)),
                "n_latency": len(fb),
                "latency_timeouts": seq["timeouts"],
                "latency_cpu": cpu_seq,
            })
            if tracer is not None:
                out["hops_p50_ms"] = {
                    "ping": hops(seq["ping_ids"], timings.sent, tracer, timings.pong, False),
                    "request_feedback": hops(seq["req_ids"], timings.sent, tracer, timings.feedback, True),
                }
                out["latency_blocking"] = tracer.blocking_report(args.warmup + args.n_latency)
        if args.burst:
            eprint(f"burst: {args.burst} requests, chunks of {args.chunk}, "
                   f"max_concurrent_jobs={args.max_concurrent_jobs}")
            if profiler and args.profile == "burst":
                profiler.enable()
            cpu.begin()
            b = await burst(customer, ckeys, worker.keys.public_key, timings, args.burst, args.chunk,
                            args.text, args.burst_timeout)
            cpu_burst = cpu.end()
            if profiler and args.profile == "burst":
                profiler.disable()
            out.update({
                "burst_requests": args.burst,
                "answered": b["answered"],
                "lost": args.burst - b["answered"],
                "burst_seconds": round(b["seconds"], 3),
                "burst_jobs_per_s": round(b["answered"] / b["seconds"], 1) if b["seconds"] > 0 else None,
                "burst_publish_seconds": round(b["published_seconds"], 3),
                "burst_publish_rejected": b["publish_rejected"],
                "burst_feedbacks": b["feedbacks"],
                "burst_errors": b["errors"],
                "burst_result_p50_ms": ms(percentile(b["result_latency"], 50)),
                "burst_result_p99_ms": ms(percentile(b["result_latency"], 99)),
                "burst_feedback_p50_ms": ms(percentile(b["feedback_latency"], 50)),
                "burst_cpu": cpu_burst,
            })
            if tracer is not None:
                out["burst_blocking"] = tracer.blocking_report(args.burst)
            if b["reject_reasons"]:
                out["burst_reject_reasons"] = b["reject_reasons"]
        if args.flood:
            eprint(f"flood: {args.flood} requests to a worker process, chunks of {args.chunk}")
            out.update(await flood(relay.url, tmp, args.flood, args.chunk, args.text, args.flood_timeout,
                                   args.max_concurrent_jobs))
        out["worker_counts"] = dict(worker.counts)
        out["loadavg_1m_after"] = loadavg()
        out["cpus"] = os.cpu_count()
        out.update({
            "max_concurrent_jobs": args.max_concurrent_jobs,
            "python": platform.python_version(),
            "relay": "nostr-relay 1.14 on 127.0.0.1",
        })
        if profiler:
            stats = pstats.Stats(profiler, stream=sys.stderr)
            if args.profile_out:
                stats.dump_stats(args.profile_out)
            stats.sort_stats("cumulative").print_stats(40)
            stats.sort_stats("tottime").print_stats(30)
        return out
    finally:
        for name, obj in (("customer", customer), ("responder", responder and responder.pool)):
            if obj is not None:
                await obj.close()
        if worker is not None:
            await worker.stop(grace=2.0)
        relay.stop()
        if args.keep:
            eprint(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-latency", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--burst", type=int, default=1000)
    ap.add_argument("--chunk", type=int, default=100, help="requests published at once in the burst")
    ap.add_argument("--burst-timeout", type=float, default=120.0)
    ap.add_argument("--timeout", type=float, default=10.0, help="per sequential request")
    ap.add_argument("--flood", type=int, default=10000,
                    help="requests in the flood (a tenth malformed or oversized) to a worker process; 0: none")
    ap.add_argument("--flood-timeout", type=float, default=600.0,
                    help="seconds to wait for the flood's answers after the last is published")
    ap.add_argument("--max-concurrent-jobs", type=int, default=8)
    ap.add_argument("--text", default="some text")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (relay log, stores)")
    ap.add_argument("--trace", action="store_true",
                    help="add hops_p50_ms: per-hop timings of pings and requests (wraps a few methods)")
    ap.add_argument("--profile", choices=["latency", "burst"], default=None,
                    help="cProfile this process during that phase (printed to stderr)")
    ap.add_argument("--profile-out", default=None, help="also dump the pstats to this file")
    args = ap.parse_args()
    result = asyncio.run(main_async(args))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
