"""Runs resume where they stopped: an executor killed mid-run (SIGKILL) or stopping (SIGTERM)
leaves its runs to another, which does no finished step again."""

from __future__ import annotations

import time
from collections import Counter
from decimal import Decimal

import pytest
from django.conf import settings as django_settings

from runs.chains import chain_publish
from runs.models import Run, RunEvent, RunStatus, RunStep
from tests.conftest import fake, wait_until
from tests.test_engine import requests_for
from tests.test_faults import (
    assert_clean,
    audit,
    create_runs,
    held_by,
    report_figures,
    requeued,
    roomy,
    wait_ended,
)

PRICE = "1.5:6"  # USD per million tokens in and out: costs that show a call counted twice

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


def three_agents(fake_model, name: str, first: str, second: str, third: str):
    tools = {"tools": ["tests.chaincode.tools:lookup"]}
    chain, _ = chain_publish(
        definition={
            "name": name,
            "timeout_s": 120,
            "input_schema": {"type": "object", "required": ["topic"]},
            "agents": [
                {
                    "name": f"agent{i}",
                    "provider": "local",
                    "model": model,
                    "base_url": fake_model.base_url,
                    "prompt": "{{ input.topic }} {{ previous }}",
                    **(tools if i == 0 else {}),
                }
                for i, model in enumerate((first, second, third))
            ],
        }
    )
    return chain


def in_second_agent(run_ids) -> bool:
    return Run.objects.filter(pk__in=run_ids, current_agent="agent1").count() == len(run_ids)


@pytest.mark.timeout(300)
def test_sigkill_mid_runs_resumes_at_the_unfinished_agent(
    alice, executors, fake_model, fault_report
):
    """200 three-agent runs (the first with a tool call) are in their second agent when their
    executor is killed: another finishes every run once, the first agent's model calls and its
    tool call are not made again, and each run costs what an unkilled run costs."""
    roomy(alice)
    first, second, third = fake(tools=1), fake(tokens=30, latency_ms=200), fake(tokens=3)
    chain = three_agents(fake_model, "resumed", first, second, third)
    prices = ",".join(f"{m}={PRICE}" for m in (first, second, third))
    lifecycle = {"HEARTBEAT_S": "0.3", "WORKER_LOST_AFTER_S": "2", "MODEL_PRICES": prices}
    n = 200
    started = time.monotonic()
    reference = create_runs(alice, chain, 1)
    doomed = executors(**lifecycle)
    wait_ended(reference, 60, "the reference run")
    ids = create_runs(alice, chain, n)
    wait_until(lambda: in_second_agent(ids), 90, 0.2, "every run in its second agent")
    held = held_by(doomed, ids)
    doomed.kill()
    executors(**lifecycle)
    wait_ended(ids, 120, "every run to end after the kill")
    figures = audit(ids)
    statuses = Counter(Run.objects.filter(pk__in=ids).values_list("status", flat=True))
    ref = Run.objects.get(pk=reference[0])
    totals = Counter(
        Run.objects.filter(pk__in=ids).values_list("input_tokens", "output_tokens", "cost")
    )
    first_calls = requests_for(fake_model, first)
    resumed = Counter(
        RunEvent.objects.filter(run_id__in=ids, type="run.resumed").values_list(
            "data__index", flat=True
        )
    )
    report_figures(
        fault_report,
        "kill9-resume-200",
        figures,
        started,
        held_at_kill=len(held),
        first_agent_requests=first_calls,
        resumed_at=dict(resumed),
        retried=requeued(ids, "worker_lost"),
    )
    assert len(held) == n
    assert_clean(figures)
    assert statuses == {RunStatus.COMPLETED: n}, statuses
    # The first agent's two model calls (the tool round, the answer) once per run, the
    # reference's included; its tool call once per run.
    assert first_calls == 2 * (n + 1)
    tool_results = RunEvent.objects.filter(run_id__in=ids, type="agent.tool_result").count()
    assert tool_results == n
    assert RunEvent.objects.filter(run_id__in=ids, type="agent.started", data__index=0).count() == n
    # Every run resumed once, at its second agent, and counts what the reference counts.
    assert resumed == {1: n}, resumed
    assert ref.cost > Decimal(0)
    assert totals == {(ref.input_tokens, ref.output_tokens, ref.cost): n}, totals
    # A finished step is recorded once: the first agent's, and the agents after the kill.
    keys = Counter(RunStep.objects.filter(run_id__in=ids).values_list("key", flat=True))
    assert keys == {"a0/m0": n, "a0/m0/t0": n, "a0": n, "a1": n, "a2": n}, keys
    assert set(
        RunStep.objects.filter(run_id__in=ids, key="a0").values_list("attempt", flat=True)
    ) == {1}
    assert set(
        RunStep.objects.filter(run_id__in=ids, key="a1").values_list("attempt", flat=True)
    ) == {2}


@pytest.mark.timeout(120)
def test_sigterm_hands_back_and_the_next_executor_resumes(alice, executors, fake_model):
    """SIGTERM with a short drain: the runs go back to the queue and the next executor goes on
    from the agent they were in, on the same attempt."""
    roomy(alice)
    first, second, third = fake(tools=1), fake(tokens=40, latency_ms=150), fake(tokens=3)
    chain = three_agents(fake_model, "handed", first, second, third)
    leaving = executors(WORKER_DRAIN_S="0.5")
    ids = create_runs(alice, chain, 20)
    wait_until(lambda: in_second_agent(ids), 60, 0.1, "every run in its second agent")
    leaving.terminate()
    assert requeued(ids, "worker_shutdown") == 20
    executors()
    wait_ended(ids, 60)
    assert_clean(audit(ids))
    assert requests_for(fake_model, first) == 2 * 20
    runs = Run.objects.filter(pk__in=ids)
    assert set(runs.values_list("status", "attempt")) == {(RunStatus.COMPLETED, 1)}
    assert RunEvent.objects.filter(run_id__in=ids, type="run.resumed", data__index=1).count() == 20


@pytest.mark.timeout(120)
def test_a_blocking_tool_delays_no_other_run(alice, executors, fake_model):
    """A sync tool that blocks for 5 s holds a tool thread, not the loop: a run streaming beside
    it goes on and ends first."""
    roomy(alice)
    chain, _ = chain_publish(
        definition={
            "name": "blocker",
            "timeout_s": 60,
            "input_schema": {"type": "object"},
            "agents": [
                {
                    "name": "slow",
                    "provider": "local",
                    "model": fake(tools=1),
                    "base_url": fake_model.base_url,
                    "prompt": "{{ input.topic }}",
                    "tools": ["tests.chaincode.tools:block"],
                }
            ],
        }
    )
    other = three_agents(fake_model, "beside", fake(tokens=2), fake(tokens=10), fake(tokens=2))
    executors()
    (blocked,) = create_runs(alice, chain, 1)
    wait_until(
        lambda: RunEvent.objects.filter(run_id=blocked, type="agent.tool_call").exists(),
        30,
        message="the blocking tool to be called",
    )
    (beside,) = create_runs(alice, other, 1)
    wait_ended([beside], 4.5, "the other run to end while the tool blocks")
    assert Run.objects.get(pk=beside).status == RunStatus.COMPLETED
    assert Run.objects.get(pk=blocked).status == RunStatus.RUNNING
    wait_ended([blocked], 30)
    assert Run.objects.get(pk=blocked).output.startswith("slowly found")
    assert django_settings.TOOL_THREADS > 1
