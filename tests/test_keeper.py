"""The lifecycle keeper, in-process: each check reaches the right end state, exactly once."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from django.db import connection
from django.db.models import Q
from django.utils import timezone

from agentsvc.models import TokenWindow
from runs import keeper
from runs.execution.executor import run_execute
from runs.models import Run, RunEvent, RunStatus
from runs.services import event_append, run_create
from tests.conftest import fake
from webhooks.models import WebhookAttempt, WebhookDelivery, WebhookEndpoint, WebhookMessage

LONG_AGO = timedelta(hours=2)


def start(alice, chain, **kwargs) -> Run:
    return run_create(
        api_key=alice.key, chain=chain, run_input={"topic": "tides"}, metadata={}, **kwargs
    )


def as_lost(run: Run, *, attempt: int = 1, worker: str = "deadhost:1:abcd") -> Run:
    """The state a worker killed mid-run leaves: running, its last event long ago."""
    then = timezone.now() - LONG_AGO
    Run.objects.filter(pk=run.id).update(
        status=RunStatus.RUNNING,
        worker=worker,
        attempt=attempt,
        started_at=then,
        heartbeat_at=then,
        deadline_at=timezone.now() + timedelta(hours=1),
        current_agent="agent0",
    )
    run.refresh_from_db()
    return run


def types(run: Run) -> list[str]:
    return list(RunEvent.objects.filter(run=run).order_by("seq").values_list("type", flat=True))


def test_lost_worker_run_is_retried_and_completes(alice, make_chain):
    run = as_lost(start(alice, make_chain("demo", models=[fake(tokens=4)])))
    assert keeper.runs_recover_lost()["retried"] == 1
    run.refresh_from_db()
    assert (run.status, run.attempt, run.worker) == (RunStatus.QUEUED, 2, "")
    requeued = RunEvent.objects.filter(run=run).order_by("seq").last()
    assert requeued.type == "run.queued"
    assert requeued.data["attempt"] == 2 and requeued.data["reason"] == "worker_lost"
    # The old worker's writes no longer match its claim token.
    assert (
        event_append(
            run_id=run.id,
            event="agent.output",
            data={"chunk": "late"},
            when=Q(status=RunStatus.RUNNING, worker="deadhost:1:abcd"),
        )
        is None
    )
    run_execute(run_id=str(run.id))  # another worker takes the retry
    run.refresh_from_db()
    assert run.status == RunStatus.COMPLETED and len(run.output.split()) == 4
    assert types(run)[-1] == "run.completed"


@pytest.mark.django_db(transaction=True)
def test_lost_worker_on_the_retry_fails_with_worker_lost(alice, make_chain):
    chain = make_chain("demo", models=[fake(tokens=4)])
    run = start(alice, chain, webhook={"url": "https://hooks.example.com/in"})
    ledger = TokenWindow.objects.filter(api_key=alice.key, window=run.tokens_window)
    assert ledger.get().used == run.tokens_reserved
    run = as_lost(run, attempt=2)
    assert keeper.runs_recover_lost() == {"retried": 0, "failed": 1, "cancelled": 0}
    run.refresh_from_db()
    assert run.status == RunStatus.FAILED and run.error_code == "worker_lost"
    assert run.finished_at is not None and run.current_agent == ""
    last = RunEvent.objects.filter(run=run).order_by("seq").last()
    assert last.type == "run.failed" and last.data["error"]["code"] == "worker_lost"
    # Through event_append: the webhook message is written and the reservation settled.
    message = WebhookMessage.objects.get(run=run)
    assert message.event_type == "run.failed"
    assert message.payload["data"]["error"]["code"] == "worker_lost"
    assert ledger.get().used == 0
    # Nothing more to do on the next pass.
    assert keeper.runs_recover_lost() == {"retried": 0, "failed": 0, "cancelled": 0}


def test_fresh_heartbeat_is_left_alone(alice, make_chain, settings):
    run = as_lost(start(alice, make_chain("demo")))
    Run.objects.filter(pk=run.id).update(heartbeat_at=timezone.now())
    assert keeper.runs_recover_lost() == {"retried": 0, "failed": 0, "cancelled": 0}
    assert Run.objects.get(pk=run.id).status == RunStatus.RUNNING


def test_lost_worker_of_a_cancelled_run_ends_cancelled(alice, make_chain):
    run = as_lost(start(alice, make_chain("demo")))
    Run.objects.filter(pk=run.id).update(cancel_requested_at=timezone.now(), cancel_reason="api")
    assert keeper.runs_recover_lost()["cancelled"] == 1
    run.refresh_from_db()
    assert run.status == RunStatus.CANCELLED and types(run)[-1] == "run.cancelled"


def test_run_past_its_deadline_and_grace_times_out(alice, make_chain, settings):
    settings.RUN_GRACE_S = 30
    chain = make_chain("demo", timeout_s=60)
    late, in_grace = start(alice, chain), start(alice, chain)
    now = timezone.now()
    for run, deadline in ((late, now - timedelta(seconds=31)), (in_grace, now)):
        as_lost(run)
        Run.objects.filter(pk=run.id).update(heartbeat_at=now, deadline_at=deadline)
    assert keeper.runs_time_out() == 1
    late.refresh_from_db()
    assert late.status == RunStatus.TIMED_OUT and late.error_code == "chain_timed_out"
    assert RunEvent.objects.filter(run=late).order_by("seq").last().data["timeout_s"] == 60
    assert Run.objects.get(pk=in_grace.id).status == RunStatus.RUNNING


def _age(run: Run, seconds: float) -> None:
    Run.objects.filter(pk=run.id).update(created_at=timezone.now() - timedelta(seconds=seconds))


def test_unwatched_run_without_webhook_is_cancelled_as_orphaned(alice, bob, make_chain, settings):
    settings.ORPHAN_TIMEOUT_S = 300
    chain = make_chain("demo")
    orphan, hooked, young = (
        start(alice, chain),
        start(alice, chain, webhook={"url": "https://a.example.com/h"}),
        start(alice, chain),
    )
    running = as_lost(start(alice, chain))
    Run.objects.filter(pk=running.id).update(heartbeat_at=timezone.now())
    for run in (orphan, hooked, running):
        _age(run, 301)
    _age(young, 200)
    assert keeper.runs_cancel_orphans() == 2
    orphan.refresh_from_db()
    assert orphan.status == RunStatus.CANCELLED and orphan.cancel_reason == "orphaned"
    assert RunEvent.objects.filter(run=orphan).order_by("seq").last().data["reason"] == "orphaned"
    # A running one is asked to stop; its worker ends it with the reason at its next event.
    running.refresh_from_db()
    assert running.cancel_reason == "orphaned" and running.cancel_requested_at is not None
    assert Run.objects.get(pk=hooked.id).status == RunStatus.QUEUED
    assert Run.objects.get(pk=young.id).status == RunStatus.QUEUED
    # A run whose owner has an enabled endpoint will be told about: kept.
    bobs = start(bob, chain)
    _age(bobs, 301)
    WebhookEndpoint.objects.create(owner=bob.key.owner, url="https://b.example.com", secret="s")
    assert keeper.runs_cancel_orphans() == 0


def test_polling_keeps_a_run_from_being_orphaned(alice, make_chain, settings):
    settings.ORPHAN_TIMEOUT_S = 300
    chain = make_chain("demo")
    polled, paged, ignored = start(alice, chain), start(alice, chain), start(alice, chain)
    for run in (polled, paged, ignored):
        _age(run, 301)
    assert alice.get(f"/api/v1/runs/{polled.id}").status_code == 200
    assert alice.get(f"/api/v1/runs/{paged.id}/events").status_code == 200
    seen = Run.objects.get(pk=polled.id).last_seen_at
    assert seen is not None and Run.objects.get(pk=paged.id).last_seen_at is not None
    # Within the resolution a second poll writes nothing.
    assert alice.get(f"/api/v1/runs/{polled.id}").status_code == 200
    assert Run.objects.get(pk=polled.id).last_seen_at == seen
    assert keeper.runs_cancel_orphans() == 1
    assert Run.objects.get(pk=ignored.id).cancel_reason == "orphaned"
    assert Run.objects.get(pk=polled.id).status == RunStatus.QUEUED


def test_silent_executors_are_forgotten(db, settings):
    from runs.models import Executor

    settings.WORKER_LOST_AFTER_S = 30
    now = timezone.now()
    for name, age in (("gone", 301), ("alive", 10)):
        Executor.objects.create(
            id=name,
            host="h",
            pid=1,
            started_at=now,
            heartbeat_at=now - timedelta(seconds=age),
            capacity=10,
        )
    assert keeper.executors_forget() == 1
    ours = Executor.objects.filter(id__in=["gone", "alive"])
    assert list(ours.values_list("id", flat=True)) == ["alive"]


def test_retention_deletes_old_runs_with_events_and_webhook_payloads(alice, make_chain, settings):
    settings.RUN_RETENTION_DAYS = 30
    chain = make_chain("demo", models=[fake(tokens=2)])
    old, recent = start(alice, chain), start(alice, chain)
    active_old = start(alice, chain)
    for run in (old, recent):
        run_execute(run_id=str(run.id))
    Run.objects.filter(pk__in=[old.id, active_old.id]).update(
        created_at=timezone.now() - timedelta(days=31)
    )
    Run.objects.filter(pk=old.id).update(finished_at=timezone.now() - timedelta(days=31))
    message = WebhookMessage.objects.create(
        id=WebhookMessage.new_id(),
        run=old,
        event_type="run.completed",
        seq=9,
        payload={},
        created_at=timezone.now(),
    )
    delivery = WebhookDelivery.objects.create(
        message=message, url="https://x.example.com", status="succeeded"
    )
    WebhookAttempt.objects.create(
        delivery=delivery, number=1, at=timezone.now(), duration_ms=1, trigger="auto"
    )
    assert keeper.runs_delete_expired() == 1
    assert not Run.objects.filter(pk=old.id).exists()
    assert not RunEvent.objects.filter(run_id=old.id).exists()
    assert not WebhookMessage.objects.exists() and not WebhookAttempt.objects.exists()
    assert Run.objects.filter(pk__in=[recent.id, active_old.id]).count() == 2


@pytest.mark.django_db(transaction=True)
def test_two_keepers_act_once(alice, make_chain):
    """Both keepers see the same lost run; only one conditional write can win."""
    run = as_lost(start(alice, make_chain("demo")))
    barrier = threading.Barrier(2)
    results: list[dict] = []

    def keep():
        try:
            barrier.wait()
            results.append(keeper.runs_recover_lost())
        finally:
            connection.close()

    threads = [threading.Thread(target=keep) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r["retried"] for r in results) == [0, 1]
    run.refresh_from_db()
    assert run.attempt == 2 and run.status == RunStatus.QUEUED
    assert types(run).count("run.queued") == 2  # the first queueing and the one retry


def test_keeper_pass_reports_and_is_scheduled(db):
    from django_q.models import Schedule

    assert set(keeper.keeper_pass()) >= {"timed_out", "worker_lost_failed", "orphaned", "deleted"}
    schedule = Schedule.objects.get(name="runs-keeper")
    assert (schedule.func, schedule.minutes, schedule.repeats) == ("runs.tasks.keeper_pass", 1, -1)


def test_an_invoke_wait_marks_the_run_seen(alice, make_chain):
    from runs.services import run_wait

    run = start(alice, make_chain("demo"))
    assert run_wait(run_id=run.id, timeout_s=0.1).status == RunStatus.QUEUED
    assert Run.objects.get(pk=run.id).last_seen_at is not None
