"""A worker process killed with SIGKILL mid-run: the keeper hands the run to another worker,
and fails it with `worker_lost` when the retry's worker is killed too."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from runs import keeper
from runs.models import Run, RunEvent, RunStatus
from runs.services import run_create
from tests.conftest import ExecutorProcess, fake, wait_until

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


def kill_mid_run(executor: ExecutorProcess, run: Run) -> None:
    """SIGKILL once the run is streaming output, then let its heartbeat go stale."""
    after = Run.objects.get(pk=run.id).last_seq  # output of this attempt, not an earlier one
    wait_until(
        lambda: RunEvent.objects.filter(run=run, type="agent.output", seq__gt=after).exists(),
        60,
        message="output streaming",
    )
    executor.kill()
    outputs = RunEvent.objects.filter(run=run, type="agent.output").count()
    assert Run.objects.get(pk=run.id).status == RunStatus.RUNNING
    # Nothing more arrives from the dead worker; its heartbeat is now as old as the keeper
    # needs (instead of waiting WORKER_LOST_AFTER_S).
    Run.objects.filter(pk=run.id).update(heartbeat_at=timezone.now() - timedelta(hours=1))
    assert RunEvent.objects.filter(run=run, type="agent.output").count() == outputs


def slow_run(alice, make_chain) -> Run:
    chain = make_chain("demo", models=[fake(tokens=40, latency_ms=100)], timeout_s=60)
    return run_create(api_key=alice.key, chain=chain, run_input={"topic": "tides"}, metadata={})


def test_killed_worker_run_is_retried_on_another_and_completes(alice, make_chain, executors):
    first = executors()
    run = slow_run(alice, make_chain)
    kill_mid_run(first, run)
    assert keeper.runs_recover_lost()["retried"] == 1
    assert Run.objects.get(pk=run.id).status == RunStatus.QUEUED
    executors()
    wait_until(
        lambda: Run.objects.get(pk=run.id).status not in (RunStatus.QUEUED, RunStatus.RUNNING),
        60,
        message="the retry to finish",
    )
    run.refresh_from_db()
    assert run.status == RunStatus.COMPLETED and run.attempt == 2
    assert len(run.output.split()) == 40
    types = list(RunEvent.objects.filter(run=run).order_by("seq").values_list("type", flat=True))
    assert types.count("run.started") == 2 and types[-1] == "run.completed"


def test_killed_worker_on_the_retry_ends_failed_worker_lost(alice, make_chain, executors):
    run = slow_run(alice, make_chain)
    kill_mid_run(executors(), run)
    assert keeper.runs_recover_lost()["retried"] == 1
    kill_mid_run(executors(), run)
    assert keeper.runs_recover_lost()["failed"] == 1
    run.refresh_from_db()
    assert run.status == RunStatus.FAILED and run.error_code == "worker_lost"
    last = RunEvent.objects.filter(run=run).order_by("seq").last()
    assert last.type == "run.failed" and last.data["error"]["code"] == "worker_lost"
