"""The worker's log: JSON lines of one shape, each line of a job carrying its `job_id` (also from
plugin threads and library loggers), a summary line per job, and nothing of an encrypted
request's private content."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time

import pytest
import structlog

from dvm_core import JobInputError, JobKind, JobResult, hookimpl
from dvm_core.customer.client import JobFailed, result_json
from dvm_core.cli.logs import configure_logging
from dvm_core.protocol.nip90 import JobInput
from dvm_core.worker.plugins import check, plugin_manager

KIND = 5790
NOISY = ("websockets", "asyncio", "httpx", "urllib3")


class JsonLog:
    def __init__(self, stream: io.StringIO):
        self.stream = stream

    @property
    def text(self) -> str:
        return self.stream.getvalue()

    def lines(self) -> list[dict]:
        out = []
        for raw in self.text.splitlines():
            line = json.loads(raw)  # every line is one JSON object
            assert isinstance(line, dict), raw
            out.append(line)
        return out

    def for_job(self, job_id: str) -> list[dict]:
        return [line for line in self.lines() if line.get("job_id") == job_id]

    async def wait_for(self, event: str, timeout: float = 5.0, **fields) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for line in self.lines():
                if line["event"] == event and all(line.get(k) == v for k, v in fields.items()):
                    return line
            if time.monotonic() > deadline:
                raise AssertionError(f"no {event!r} line with {fields} in the log:\n{self.text[-3000:]}")
            await asyncio.sleep(0.02)


@pytest.fixture
def json_log():
    """configure_logging("json") into a StringIO, at debug level; the old setup is put back."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    saved_levels = {name: logging.getLogger(name).level for name in NOISY}
    saved_structlog = structlog.get_config()
    stream = io.StringIO()
    configure_logging("json", "debug", stream=stream)
    [handler] = root.handlers
    # The worker's module-level loggers would otherwise be cached with this configuration for
    # the rest of the session; rendering is the same either way.
    structlog.configure(cache_logger_on_first_use=False)
    yield JsonLog(stream)
    root.removeHandler(handler)
    for h in saved_handlers:  # pytest manages its own capture handlers per test phase
        if not type(h).__module__.startswith("_pytest") and h not in root.handlers:
            root.addHandler(h)
    root.setLevel(saved_level)
    for name, level in saved_levels.items():
        logging.getLogger(name).setLevel(level)
    structlog.configure(**saved_structlog)


SHAPE = {"event", "level", "logger", "timestamp"}


def _assert_shape(line: dict) -> None:
    assert SHAPE <= set(line), line
    assert line["timestamp"].endswith("Z") and "T" in line["timestamp"]  # ISO 8601, UTC
    assert line["level"] in ("debug", "info", "warning", "error", "critical")


# the job's lines -------------------------------------------------------------------------------

async def test_job_lines_carry_the_job_id_and_end_with_a_summary(json_log, workers, customer):
    worker = await workers.start()
    request = await customer.submit(KIND, [JobInput("the cat and the hat", "text")], {"top": "1"},
                                    provider=worker.keys.public_key, encrypt=None)
    result = await customer.result(request, timeout=20)
    assert result_json(result)["words"] == 5
    summary = await json_log.wait_for("job finished", job_id=request["id"])
    assert summary["outcome"] == "succeeded" and summary["error"] is None
    assert summary["kind"] == KIND and summary["job_kind"] == "text-stats"
    assert summary["encrypted"] is False
    assert isinstance(summary["seconds"], float) and 0 <= summary["seconds"] < 20
    assert summary["metrics"]["words"] == 5  # the plugin's metrics
    assert 0 <= summary["metrics"]["run_seconds"] <= summary["seconds"]
    assert summary["level"] == "info" and summary["logger"] == "dvm.worker"
    for line in json_log.lines():
        _assert_shape(line)
        if request["id"] in json.dumps(line):  # a line about this job says so with job_id
            assert line.get("job_id") == request["id"], line
    # lines of the worker itself carry no job id
    ready = await json_log.wait_for("worker ready")
    assert "job_id" not in ready and ready["npub"] == worker.keys.npub


async def test_a_rejected_request_is_logged_with_its_job_id(json_log, workers, customer):
    worker = await workers.start()
    request = await customer.submit(KIND, [JobInput("x", "text")], {"top": "1000"},
                                    provider=worker.keys.public_key, encrypt=None)
    with pytest.raises(JobFailed, match="between 1 and 100"):
        await customer.result(request, timeout=20)
    line = await json_log.wait_for("request rejected", job_id=request["id"])
    assert line["level"] == "warning" and line["reason"] == "param top must be between 1 and 100"


async def test_a_failed_job_summary_says_why(json_log, workers, customer):
    worker = await workers.start(job_time_limit=0.5)
    request = await customer.submit(KIND, [JobInput("x", "text")], {"work_seconds": "5"},
                                    provider=worker.keys.public_key)
    with pytest.raises(JobFailed, match="time limit"):
        await customer.result(request, timeout=20)
    summary = await json_log.wait_for("job finished", job_id=request["id"])
    assert summary["outcome"] == "failed" and "time limit of 0.5 s" in summary["error"]
    assert summary["encrypted"] is True and summary["seconds"] >= 0.5


# plugin threads and library loggers --------------------------------------------------------------

def _logging_run(ctx, job):
    ctx.log.info("plugin step", step=1)
    structlog.get_logger("thirdparty.trainer").info("unbound structlog logger")
    logging.getLogger("thirdparty.lib").warning("stdlib logger in the job's thread: %s", "epoch 1")
    return JobResult({"ok": True})


async def _async_logging_run(ctx, job):
    ctx.log.info("plugin step", step=1)
    logging.getLogger("thirdparty.lib").warning("stdlib logger on the loop: %s", "epoch 1")
    return JobResult({"ok": True})


def _failing_run(ctx, job):
    raise RuntimeError("plugin exploded")


class LoggingPlugin:
    @hookimpl
    def register_job_kinds(self, register):
        register(JobKind(kind=5860, name="log-sync", description="d", run=_logging_run, params=None))
        register(JobKind(kind=5861, name="log-async", description="d", run=_async_logging_run, params=None))
        register(JobKind(kind=5862, name="log-fail", description="d", run=_failing_run, params=None))


@pytest.fixture
async def logging_worker(workers):
    pm = plugin_manager(only=[])
    pm.register(LoggingPlugin(), name="logging-plugin")
    check(pm)
    return await workers.start(pm=pm)


@pytest.mark.parametrize("kind", [5860, 5861], ids=["thread", "async"])
async def test_plugin_and_library_lines_carry_the_job_id(json_log, logging_worker, customer, kind):
    request = await customer.submit(kind, [JobInput("x", "text")], provider=logging_worker.keys.public_key)
    await customer.result(request, timeout=20)
    await json_log.wait_for("job finished", job_id=request["id"])
    step = await json_log.wait_for("plugin step")
    assert step["job_id"] == request["id"] and step["kind"] == kind and step["step"] == 1
    library = next(line for line in json_log.lines() if line["logger"] == "thirdparty.lib")
    assert library["job_id"] == request["id"] and library["level"] == "warning"
    assert library["event"].endswith("epoch 1")  # %-formatting applied
    if kind == 5860:
        unbound = await json_log.wait_for("unbound structlog logger")
        assert unbound["job_id"] == request["id"] and unbound["logger"] == "thirdparty.trainer"
    for line in json_log.lines():
        _assert_shape(line)


async def test_a_plugin_crash_is_one_json_line_with_the_traceback(json_log, logging_worker, customer):
    request = await customer.submit(5862, [JobInput("x", "text")], provider=logging_worker.keys.public_key)
    with pytest.raises(JobFailed, match="internal error while running the job"):
        await customer.result(request, timeout=20)
    line = await json_log.wait_for("job failed in its plugin", job_id=request["id"])
    assert line["level"] == "error" and line["plugin"] == "logging-plugin"
    assert "Traceback" in line["exception"] and "RuntimeError: plugin exploded" in line["exception"]
    summary = await json_log.wait_for("job finished", job_id=request["id"])
    assert summary["outcome"] == "failed"


def test_library_messages_come_out_as_json_lines_of_the_same_shape(json_log):
    structlog.get_logger("dvm.test").warning("from structlog", detail=1)
    logging.getLogger("websockets.client").warning("connection to %s lost", "ws://x")
    logging.getLogger("websockets.client").info("websockets info is below its level")
    logging.getLogger("asyncio").debug("asyncio debug is below its level")
    logging.getLogger("some.library").info("a library at info")
    with structlog.contextvars.bound_contextvars(job_id="ab" * 32):
        logging.getLogger("accelerate").warning("inside a job")
    try:
        raise ValueError("library failure")
    except ValueError:
        logging.getLogger("httpx").exception("request failed")

    lines = json_log.lines()  # every line parses as JSON
    for line in lines:
        _assert_shape(line)
    mine = {"dvm.test", "websockets.client", "asyncio", "some.library", "accelerate", "httpx"}
    by_event = {line["event"]: line for line in lines if line["logger"] in mine}
    assert set(by_event) == {"from structlog", "connection to ws://x lost", "a library at info",
                             "inside a job", "request failed"}  # not the two below their level
    assert by_event["from structlog"]["detail"] == 1
    ws = by_event["connection to ws://x lost"]
    assert ws["logger"] == "websockets.client" and ws["level"] == "warning"
    assert set(ws) == SHAPE  # the same keys as a structlog line with no fields of its own
    assert by_event["a library at info"]["logger"] == "some.library"
    assert by_event["inside a job"]["job_id"] == "ab" * 32
    failed = by_event["request failed"]
    assert failed["level"] == "error" and "ValueError: library failure" in failed["exception"]


# private content stays out of the log -----------------------------------------------------------

SECRET_TEXT = "purple-elephant-7391 dances at midnight"
SECRET_VALUES = ["tangerine-param-5517", "zebra-param-2264"]


class EchoPlugin:
    @hookimpl
    def register_job_kinds(self, register):
        def parse(request):
            if request.param("fail") == "yes":
                raise JobInputError("this request asked to fail")
            return request

        def run(ctx, request):
            return JobResult({"echo": [i.data for i in request.inputs], "params": request.params},
                             metrics={"inputs": len(request.inputs)})

        register(JobKind(kind=5863, name="echo", description="d", run=run, parse=parse, params=None))


@pytest.mark.parametrize("scheme", ["nip44", "nip04"])
async def test_encrypted_inputs_and_params_never_reach_the_log(json_log, workers, customer, scheme):
    pm = plugin_manager(only=["textstats"])
    pm.register(EchoPlugin(), name="echo")
    worker = await workers.start(pm=pm)
    provider = worker.keys.public_key
    params = {"label": SECRET_VALUES[0], "note": SECRET_VALUES[1]}

    ok = await customer.submit(5863, [JobInput(SECRET_TEXT, "text")], params, provider=provider, encrypt=scheme)
    result = await customer.result(ok, timeout=20)
    assert result_json(result)["echo"] == [SECRET_TEXT]  # the worker did read them
    refused = await customer.submit(5863, [JobInput(SECRET_TEXT, "text")], {**params, "fail": "yes"},
                                    provider=provider, encrypt=scheme)
    bad_value = await customer.submit(KIND, [JobInput(SECRET_TEXT, "text")], {"top": SECRET_VALUES[0]},
                                      provider=provider, encrypt=scheme)
    bad_tag = await customer.submit(KIND, [JobInput(SECRET_TEXT, "blob")], {},
                                    provider=provider, encrypt=scheme)
    for request, message in [(refused, "asked to fail"), (bad_value, "must be numbers"),
                              (bad_tag, "is not one of")]:
        with pytest.raises(JobFailed, match=message):
            await customer.result(request, timeout=20)

    summary = await json_log.wait_for("job finished", job_id=ok["id"])
    assert summary["encrypted"] is True and summary["metrics"]["inputs"] == 1
    for request in (refused, bad_value):
        await json_log.wait_for("request rejected", job_id=request["id"])
    assert json_log.for_job(bad_tag["id"])

    text = json_log.text
    for secret in [SECRET_TEXT, "purple-elephant", *SECRET_VALUES]:
        assert secret not in text, f"{secret!r} is in the log"


@pytest.mark.parametrize("inputs, params", [
    ([JobInput("x", "text")], {"secret-name-4471": "v"}),
    ([JobInput("x", "secret-type-4471")], {}),
], ids=["unknown-param-name", "unknown-input-type"])
async def test_private_tag_strings_of_an_encrypted_request_stay_out_of_the_log(
        json_log, workers, customer, inputs, params):
    worker = await workers.start()
    request = await customer.submit(KIND, inputs, params, provider=worker.keys.public_key)
    with pytest.raises(JobFailed, match="secret-.*-4471"):  # the customer is told, encrypted
        await customer.result(request, timeout=20)
    await json_log.wait_for("request rejected", job_id=request["id"])
    assert "4471" not in json_log.text
