"""Structured logs: LOG_FORMAT, request ids on every response, and request_id / run_id /
key_prefix on every line written while serving a request or executing a run."""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import re
import uuid

import httpx
import pytest
from asgiref.sync import async_to_sync, sync_to_async
from django.test import Client

from agentsvc import logs
from runs.execution.executor import Db
from tests.conftest import ExecutorProcess, fake, process_env, start_web, wait_until
from tests.test_security import _settings_in_a_child

HEX32 = re.compile(r"[0-9a-f]{32}")


DAPHNE_ACCESS = re.compile(r'^\S+ - - \[[^]]+\] "')


def json_lines(text: str) -> list[dict]:
    """Every line of a JSON-format log, parsed (a line that is not JSON fails the test), but
    daphne's access log: daphne writes it to stdout itself, not through logging (README)."""
    return [
        json.loads(line)
        for line in text.splitlines()
        if line.strip() and not DAPHNE_ACCESS.match(line)
    ]


# --- Settings -------------------------------------------------------------------------------


def test_log_format_is_parsed_strictly():
    done = _settings_in_a_child(LOG_FORMAT="xml")
    assert done.returncode != 0
    assert "ImproperlyConfigured" in done.stderr and "LOG_FORMAT" in done.stderr
    assert _settings_in_a_child(LOG_FORMAT="JSON").returncode == 0
    bad = _settings_in_a_child(OTEL_EXPORTER_OTLP_ENDPOINT="collector:4318")
    assert bad.returncode != 0 and "OTEL_EXPORTER_OTLP_ENDPOINT" in bad.stderr


def _record(message: str = "hello", **extra) -> logging.LogRecord:
    record = logging.LogRecord("agentsvc.test", logging.INFO, __file__, 1, message, (), None)
    for name, value in extra.items():
        setattr(record, name, value)
    return record


def test_both_formats_carry_the_context_fields():
    context = logs.ContextFilter()
    with logs.log_context(request_id="req-1", key_prefix="AbCd1234"):
        record = _record()
        context.filter(record)
    plain = logs.PlainFormatter("%(levelname)s %(name)s %(message)s").format(record)
    assert plain == "INFO agentsvc.test hello request_id=req-1 key_prefix=AbCd1234"
    line = json.loads(logs.JsonFormatter().format(record))
    assert line["message"] == "hello" and line["level"] == "INFO"
    assert line["logger"] == "agentsvc.test" and line["time"]
    assert line["request_id"] == "req-1" and line["key_prefix"] == "AbCd1234"
    assert "run_id" not in line
    # Outside any request or run: no fields, nothing appended.
    bare = _record()
    context.filter(bare)
    assert logs.PlainFormatter("%(message)s").format(bare) == "hello"


def test_json_lines_leave_out_the_request_object():
    """Django logs 4xx/5xx with the request as an `extra`; its text is the full URL, query
    string and all (where a misplaced key would be)."""
    line = json.loads(
        logs.JsonFormatter().format(_record("Unauthorized", request="GET /x?api_key=ak_s3cret"))
    )
    assert "ak_s3cret" not in json.dumps(line)


# --- Request ids -----------------------------------------------------------------------------


def test_request_id_is_echoed_replaced_or_made(alice):
    given = alice.get("/api/v1/runs", headers={"X-Request-ID": "client.abc-123_X"})
    assert given.status_code == 200 and given["X-Request-ID"] == "client.abc-123_X"
    made = alice.get("/api/v1/runs")
    assert HEX32.fullmatch(made["X-Request-ID"])
    for bad in ("has space", "x" * 129, "semi;colon", ""):
        replaced = alice.get("/api/v1/runs", headers={"X-Request-ID": bad})
        assert replaced.status_code == 200
        assert HEX32.fullmatch(replaced["X-Request-ID"]), bad
    # Errors too: a problem+json answer, a 404 outside the API, the metrics.
    problem = Client().get("/api/v1/runs", headers={"X-Request-ID": "oops-1"})
    assert problem.status_code == 401 and problem["X-Request-ID"] == "oops-1"
    assert problem["Content-Type"].startswith("application/problem+json")
    assert Client().get("/nowhere", headers={"X-Request-ID": "nf"})["X-Request-ID"] == "nf"


def test_the_request_context_ends_with_the_request(alice):
    alice.get("/api/v1/runs", headers={"X-Request-ID": "gone-after"})
    assert logs.current() == {}


# --- Context propagation ---------------------------------------------------------------------


def test_context_crosses_the_thread_hops():
    """asgiref's sync_to_async copies the context to the thread and back (the sync views, the
    authentication of streams); run_in_executor does not, so the executor's Db passes it."""

    async def scenario() -> dict:
        seen: dict = {}
        logs.bind(request_id="hop-1")
        seen["sync_to_async"] = await sync_to_async(logs.current, thread_sensitive=False)()
        # A value set in the thread comes back (key_prefix, set by authentication).
        await sync_to_async(lambda: logs.bind(key_prefix="KeyPre12"), thread_sensitive=False)()
        seen["back"] = logs.current()

        async def run_task() -> None:
            logs.bind(run_id="run-1")  # inside the task, as the executor does
            db = Db(1)
            try:
                seen["db_thread"] = await db(lambda: logs.current())
                plain = await asyncio.get_running_loop().run_in_executor(db.pool, logs.current)
                seen["plain_executor"] = plain
            finally:
                db.close()

        await asyncio.create_task(run_task())
        seen["after_task"] = logs.current()
        return seen

    seen = contextvars.copy_context().run(async_to_sync(scenario))  # nothing leaks out
    assert seen["sync_to_async"] == {"request_id": "hop-1"}
    assert seen["back"] == {"request_id": "hop-1", "key_prefix": "KeyPre12"}
    assert seen["db_thread"] == {"request_id": "hop-1", "key_prefix": "KeyPre12", "run_id": "run-1"}
    assert "run_id" not in seen["plain_executor"]  # why Db copies the context
    assert "run_id" not in seen["after_task"]  # a run's id stays in its task


# --- Real processes ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_json_logs_of_a_web_and_an_executor_process(alice, make_chain, tmp_path):
    """daphne (sync views in their thread hop, an SSE stream on the loop) and an executor, with
    LOG_FORMAT=json: every line is JSON, the request's lines carry its id and the key's prefix,
    the run's lines its run_id, and no line carries the key."""
    make_chain("demo", models=[fake(tokens=3)])
    env = process_env(
        LOG_FORMAT="json",
        LOG_LEVEL="DEBUG",
        Q_CLUSTER_NAME=f"agentsvc-test-jsonlogs-{uuid.uuid4().hex[:8]}",
    )
    web, url = start_web(env, tmp_path / "web.log")
    executor = ExecutorProcess(tmp_path / "executor.log", LOG_FORMAT="json", LOG_LEVEL="DEBUG")
    auth = {"Authorization": f"Bearer {alice.raw_key}"}
    try:
        with httpx.Client(base_url=url, timeout=30) as http:
            created = http.post(
                "/api/v1/chains/demo/runs",
                json={"input": {"topic": "tides"}},
                headers={**auth, "X-Request-ID": "create-1"},
            )
            assert created.headers["X-Request-ID"] == "create-1"
            run_id = created.json()["run_id"]
            wait_until(
                lambda: (
                    http.get(f"/api/v1/runs/{run_id}", headers=auth).json()["status"] == "completed"
                ),
                30,
            )
            with http.stream(
                "GET",
                f"/api/v1/runs/{run_id}/events",
                headers={**auth, "Accept": "text/event-stream", "X-Request-ID": "stream-1"},
            ) as stream:
                assert stream.headers["X-Request-ID"] == "stream-1"
                stream.read()
        wait_until(lambda: f'"run_id": "{run_id}"' in executor.output(), 10)
    finally:
        web.stop()
        executor.terminate()
    web_lines, executor_lines = json_lines(web.output()), json_lines(executor.output())
    prefix = alice.key.prefix
    for request_id in ("create-1", "stream-1"):
        access = [
            line
            for line in web_lines
            if line.get("request_id") == request_id and line["logger"] == "agentsvc.access"
        ]
        assert access and access[0]["key_prefix"] == prefix, (request_id, web_lines[-20:])
    run_lines = [line for line in executor_lines if line.get("run_id") == run_id]
    assert any(line["logger"] == "runs.execution.run" for line in run_lines), executor_lines[-20:]
    assert all(line["key_prefix"] == prefix for line in run_lines)
    for text in (web.output(), executor.output()):
        assert alice.raw_key not in text
    print("sample executor line:", json.dumps(run_lines[-1]))
