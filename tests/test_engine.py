"""The execution engine, in-process, against the fake model server over real sockets."""

from __future__ import annotations

import time
from decimal import Decimal

import httpx
import pytest

from runs.execution.executor import run_execute
from runs.models import Run, RunEvent, RunStatus
from runs.services import run_create
from tests.conftest import fake, free_port


def start(alice, chain, topic="tides") -> Run:
    return run_create(api_key=alice.key, chain=chain, run_input={"topic": topic}, metadata={})


def execute(run: Run) -> Run:
    run_execute(run_id=str(run.id))
    run.refresh_from_db()
    return run


def events(run: Run) -> list[RunEvent]:
    return list(RunEvent.objects.filter(run=run).order_by("seq"))


def requests_for(fake_model, model: str) -> int:
    return httpx.get(fake_model.base_url.replace("/v1", "/_stats")).json().get(model, 0)


def test_three_agent_run_completes(alice, make_chain, fake_model):
    chain = make_chain("demo", models=[fake(tokens=4), fake(tokens=6), fake(tokens=8)])
    run = execute(start(alice, chain))
    assert run.status == RunStatus.COMPLETED
    assert run.agents_completed == 3 and run.current_agent == ""
    assert run.started_at and run.finished_at and run.finished_at >= run.started_at
    assert len(run.output.split()) == 8
    assert run.output_tokens == 4 + 6 + 8
    assert run.input_tokens > 0
    evs = events(run)
    assert [e.seq for e in evs] == list(range(1, len(evs) + 1))
    types = [e.type for e in evs]
    assert types[:3] == ["run.queued", "run.started", "agent.started"]
    assert types[-1] == "run.completed"
    assert types.count("agent.started") == types.count("agent.completed") == 3
    final = evs[-1].data
    assert final["output"] == run.output
    assert final["usage"]["output_tokens"] == 18
    assert final["usage"]["total_tokens"] == run.input_tokens + 18
    assert final["duration_ms"] >= 0 and final["cost"] == "0.000000"
    completed = [e.data for e in evs if e.type == "agent.completed"]
    assert [c["usage"]["output_tokens"] for c in completed] == [4, 6, 8]
    assert [c["index"] for c in completed] == [0, 1, 2]


def test_agents_see_earlier_outputs(alice, make_chain):
    # The fake echoes its prompt; each prompt includes {{ previous }}.
    chain = make_chain("demo", models=[fake(), fake()])
    run = execute(start(alice, chain, topic="lighthouses"))
    first = next(e.data for e in events(run) if e.type == "agent.output")
    assert "lighthouses" in first["chunk"]
    assert run.output.count("lighthouses") == 2


def test_output_chunks_rebuild_the_text(alice, make_chain):
    chain = make_chain("demo", models=[fake(tokens=40, latency_ms=2)])
    run = execute(start(alice, chain))
    chunks = [e.data["chunk"] for e in events(run) if e.type == "agent.output"]
    assert "".join(chunks) == run.output
    assert all(e.data["agent"] == "agent0" for e in events(run) if e.type == "agent.output")


def test_fast_tokens_are_coalesced(alice, make_chain, settings):
    settings.STREAM_COALESCE_MS = 50
    chain = make_chain("demo", models=[fake(tokens=200)])
    run = execute(start(alice, chain))
    outputs = [e for e in events(run) if e.type == "agent.output"]
    assert 1 <= len(outputs) < 20
    assert run.output_tokens == 200


def test_slow_tokens_are_sent_one_by_one(alice, make_chain, settings):
    settings.STREAM_COALESCE_MS = 50
    chain = make_chain("demo", models=[fake(tokens=5, latency_ms=80)])
    run = execute(start(alice, chain))
    assert len([e for e in events(run) if e.type == "agent.output"]) == 5


def test_cost_uses_price_table(alice, make_chain, settings):
    model = fake(tokens=10)
    settings.MODEL_PRICES = {model: (Decimal("1.00"), Decimal("2.00"))}
    chain = make_chain("demo", models=[model])
    run = execute(start(alice, chain))
    expected = (Decimal(run.input_tokens) * 1 + Decimal(10) * 2) / Decimal(1_000_000)
    assert run.cost == expected.quantize(Decimal("0.000001"))
    assert run.cost > 0
    assert events(run)[-1].data["cost"] == f"{run.cost:.6f}"


def test_missing_usage_is_estimated(alice, make_chain):
    chain = make_chain("demo", models=[fake(tokens=8, no_usage=1)])
    run = execute(start(alice, chain))
    assert run.status == RunStatus.COMPLETED
    assert run.output_tokens > 0 and run.input_tokens > 0


@pytest.mark.parametrize(
    "opts, code, expected_requests",
    [
        ({"fail": 500}, "provider_error", 3),
        ({"fail": 503}, "provider_unavailable", 3),
        ({"fail": 429, "retry_after": 0}, "provider_rate_limited", 3),
        ({"fail": 401}, "provider_auth_failed", 1),
        ({"fail": 400}, "provider_error", 1),
        ({"malformed": 1, "tokens": 5}, "invalid_provider_response", 1),
        ({"drop": 1, "tokens": 5}, "invalid_provider_response", 1),
    ],
)
def test_provider_failures(alice, make_chain, fake_model, settings, opts, code, expected_requests):
    settings.PROVIDER_MAX_RETRIES = 2
    settings.PROVIDER_RETRY_MAX_WAIT_S = 0.05
    model = fake(**opts)
    chain = make_chain("demo", models=[model, fake(tokens=3)])
    run = execute(start(alice, chain))
    assert run.status == RunStatus.FAILED
    assert run.error_code == code
    assert run.error_message
    assert requests_for(fake_model, model) == expected_requests
    final = events(run)[-1]
    assert final.type == "run.failed"
    assert final.data["error"] == {"code": code, "message": run.error_message}
    assert run.agents_completed == 0


def test_retry_then_success(alice, make_chain, fake_model, settings):
    settings.PROVIDER_MAX_RETRIES = 2
    model = fake(fail=429, fail_times=1, retry_after=0, tokens=4)
    chain = make_chain("demo", models=[model])
    run = execute(start(alice, chain))
    assert run.status == RunStatus.COMPLETED
    assert requests_for(fake_model, model) == 2
    assert run.output_tokens == 4


def test_unreachable_provider(alice, make_chain, settings):
    settings.PROVIDER_MAX_RETRIES = 1
    settings.PROVIDER_RETRY_MAX_WAIT_S = 0.05
    chain = make_chain("demo", base_url=f"http://127.0.0.1:{free_port()}/v1")
    run = execute(start(alice, chain))
    assert (run.status, run.error_code) == (RunStatus.FAILED, "provider_unavailable")


def test_hanging_provider_read_timeout(alice, make_chain, settings):
    settings.PROVIDER_READ_TIMEOUT_S = 0.5
    chain = make_chain("demo", models=[fake(hang=1, tokens=5)], timeout_s=30)
    run = execute(start(alice, chain))
    assert (run.status, run.error_code) == (RunStatus.FAILED, "provider_timeout")


def test_chain_timeout_while_streaming(alice, make_chain):
    chain = make_chain("demo", models=[fake(tokens=100, latency_ms=30)], timeout_s=1)
    run = execute(start(alice, chain))
    assert run.status == RunStatus.TIMED_OUT
    assert run.error_code == "chain_timed_out"
    final = events(run)[-1]
    assert final.type == "run.timed_out" and final.data["timeout_s"] == 1
    assert run.output is None
    assert run.output_tokens == 0  # the unfinished agent's usage is unknown


def test_chain_timeout_while_model_hangs(alice, make_chain, settings):
    settings.PROVIDER_READ_TIMEOUT_S = 60
    chain = make_chain("demo", models=[fake(hang=1, tokens=5)], timeout_s=1)
    run = execute(start(alice, chain))
    assert run.status == RunStatus.TIMED_OUT
    assert (run.finished_at - run.started_at).total_seconds() < 5


def test_second_claim_does_nothing(alice, make_chain, fake_model):
    model = fake(tokens=3)
    chain = make_chain("demo", models=[model])
    run = execute(start(alice, chain))
    before = events(run)
    execute(run)
    assert events(run) == before
    assert requests_for(fake_model, model) == 1


def test_cancelled_before_start_is_not_executed(alice, make_chain, fake_model):
    from runs.services import run_cancel

    model = fake(tokens=3)
    chain = make_chain("demo", models=[model])
    run = start(alice, chain)
    run_cancel(run=run, reason="api")
    run = execute(run)
    assert run.status == RunStatus.CANCELLED
    assert requests_for(fake_model, model) == 0


def test_prompts_are_not_html_escaped(alice, make_chain):
    chain = make_chain("demo", models=[fake(), fake()])
    run = execute(start(alice, chain, topic='Tom\'s <b>R&D</b> "notes"'))
    assert 'Tom\'s <b>R&D</b> "notes"' in run.output
    assert "&#x27;" not in run.output and "&amp;" not in run.output


@pytest.mark.django_db(transaction=True)
def test_heartbeat_goes_on_while_the_model_is_silent(alice, make_chain, settings):
    """A model that sends nothing for a while must not make the run look lost."""
    import threading

    from django.db import connection

    settings.HEARTBEAT_S = 0.1
    settings.PROVIDER_READ_TIMEOUT_S = 1.5
    chain = make_chain("demo", models=[fake(hang=1, tokens=5)], timeout_s=30)
    # Not enqueued: only this test executes it.
    run = Run.objects.create(
        owner=alice.key.owner, api_key=alice.key, chain=chain, input={"topic": "x"}, agents_total=1
    )
    beats = []

    def watch():
        try:
            for _ in range(12):
                time.sleep(0.1)
                beats.append(Run.objects.values_list("heartbeat_at", flat=True).get(pk=run.id))
        finally:
            connection.close()

    watcher = threading.Thread(target=watch)
    watcher.start()
    execute(run)
    watcher.join()
    assert run.error_code == "provider_timeout"
    # Refreshed several times during 1.5 s in which the model sent nothing after its first token.
    assert len({b for b in beats if b is not None}) >= 3
