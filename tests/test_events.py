from __future__ import annotations

import threading

import pytest
from django.db import connection

from runs.models import Run, RunEvent
from runs.services import event_append


@pytest.mark.django_db(transaction=True)
def test_parallel_appends_stay_gapless(alice, make_chain):
    """Eight connections append at once: seq is 1..n, no gap, no duplicate."""
    chain = make_chain("demo")
    run = Run.objects.create(owner=alice.key.owner, chain=chain, input={})
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def append(worker: int) -> None:
        try:
            barrier.wait()
            for i in range(15):
                event_append(run_id=run.id, event="test.event", data={"worker": worker, "i": i})
        except BaseException as e:
            errors.append(e)
        finally:
            connection.close()

    threads = [threading.Thread(target=append, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    seqs = list(RunEvent.objects.filter(run=run).order_by("seq").values_list("seq", flat=True))
    assert seqs == list(range(1, 121))
    run.refresh_from_db()
    assert run.last_seq == 120
    for event in RunEvent.objects.filter(run=run):
        assert event.data["seq"] == event.seq


def test_conditional_append_changes_nothing_when_condition_fails(alice, make_chain):
    from django.db.models import Q

    chain = make_chain("demo")
    run = Run.objects.create(owner=alice.key.owner, chain=chain, input={})
    assert (
        event_append(
            run_id=run.id, event="x", data={}, when=Q(status="running"), status="completed"
        )
        is None
    )
    run.refresh_from_db()
    assert (run.status, run.last_seq) == ("queued", 0)
    assert not RunEvent.objects.filter(run=run).exists()
