"""Traces: one trace per run, from the request that created it to its webhook attempts."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from agentsvc import tracing
from runs.execution.executor import run_execute
from runs.models import Run
from tests.conftest import fake
from tests.webhook_support import SECRET, deliver_all, hook_path


@pytest.fixture
def spans():
    """This test's spans, in memory; the provider is put back afterwards."""
    exporter = InMemorySpanExporter()
    previous = tracing.tracing_configure(exporter, batch=False)
    try:
        yield exporter
    finally:
        tracing.tracing_reset(previous)


def test_a_run_is_one_trace_from_request_to_webhook(
    alice, make_chain, fake_model, receiver, local_ok, spans
):
    make_chain("demo", models=[fake(tokens=3), fake(tokens=2)])
    created = alice.post(
        "/api/v1/chains/demo/runs",
        {
            "input": {"topic": "tides"},
            "webhook": {"url": receiver.base_url + hook_path(), "secret": SECRET},
        },
    )
    assert created.status_code == 202
    run = Run.objects.get(pk=created.json()["run_id"])
    assert run.trace_parent.startswith("00-")
    run_execute(run_id=run.id)
    deliver_all()

    finished = spans.get_finished_spans()
    by_name = {span.name: span for span in finished}
    request = by_name["POST api/v1/chains/<slug:name>/runs"]
    execution = by_name["run.execute"]
    agents = [by_name["agent agent0"], by_name["agent agent1"]]
    attempt = by_name["webhook.attempt"]

    assert request.kind == SpanKind.SERVER and request.parent is None
    assert request.attributes["http.route"] == "api/v1/chains/<slug:name>/runs"
    assert request.attributes["http.response.status_code"] == 202
    trace_id = request.context.trace_id
    assert f"{trace_id:032x}" in run.trace_parent
    assert {span.context.trace_id for span in [execution, *agents, attempt]} == {trace_id}
    # request -> execution -> each model call; the webhook attempt in the same trace.
    assert execution.parent.span_id == request.context.span_id
    assert execution.attributes["agentsvc.chain"] == "demo"
    assert execution.attributes["agentsvc.run.status"] == "completed"
    for agent, tokens in zip(agents, (3, 2), strict=True):
        assert agent.parent.span_id == execution.context.span_id
        assert agent.attributes["gen_ai.request.model"].startswith("fake?")
        assert agent.attributes["gen_ai.system"] == "local"
        assert agent.attributes["agentsvc.chain_version"] == run.chain.version
        assert agent.attributes["gen_ai.usage.output_tokens"] == tokens
    assert attempt.parent.span_id == request.context.span_id
    assert attempt.attributes["server.address"] == "127.0.0.1"
    assert attempt.attributes["http.response.status_code"] == 200
    assert attempt.attributes["agentsvc.webhook.attempt"] == 1
    assert attempt.attributes["agentsvc.webhook.id"].startswith("msg_")


def test_a_caller_traceparent_is_continued(alice, make_chain, spans):
    make_chain("demo")
    caller = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    alice.get("/api/v1/runs", headers={"traceparent": caller})
    (span,) = spans.get_finished_spans()
    assert f"{span.context.trace_id:032x}" == "0af7651916cd43dd8448eb211c80319c"
    assert f"{span.parent.span_id:016x}" == "b7ad6b7169203331"


def test_tracing_off_stores_no_traceparent(alice, make_chain):
    assert not tracing.enabled()
    make_chain("demo")
    run_id = alice.post("/api/v1/chains/demo/runs", {"input": {"topic": "x"}}).json()["run_id"]
    assert Run.objects.get(pk=run_id).trace_parent == ""
