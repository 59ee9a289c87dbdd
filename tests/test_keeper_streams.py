"""A client following a run's stream keeps it from being cancelled as orphaned."""

from __future__ import annotations

from datetime import timedelta

import httpx
import pytest
from django.db import transaction
from django.utils import timezone

from runs import keeper
from runs.models import Run, RunStatus
from runs.services import run_create
from tests.conftest import wait_until

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


def test_streaming_marks_the_run_seen(live_server_url, alice, make_chain, settings):
    settings.ORPHAN_TIMEOUT_S = 300
    chain = make_chain("demo")
    with transaction.atomic():
        # Held as running by a (pretend) worker, so no real worker takes it.
        run = run_create(api_key=alice.key, chain=chain, run_input={"topic": "x"}, metadata={})
        Run.objects.filter(pk=run.id).update(
            status=RunStatus.RUNNING,
            worker="elsewhere:1:x",
            heartbeat_at=timezone.now(),
            created_at=timezone.now() - timedelta(seconds=600),
        )
    headers = {"Authorization": f"Bearer {alice.raw_key}", "Accept": "text/event-stream"}
    with (
        httpx.Client(base_url=live_server_url, timeout=10, headers=headers) as http,
        http.stream("GET", f"/api/v1/runs/{run.id}/events") as response,
    ):
        assert response.status_code == 200
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("event:")) == "event: run.queued"
        seen = wait_until(lambda: Run.objects.get(pk=run.id).last_seen_at, 10, 0.05)
        assert timezone.now() - seen < timedelta(seconds=30)
        assert keeper.runs_cancel_orphans() == 0
    Run.objects.filter(pk=run.id).update(last_seen_at=timezone.now() - timedelta(seconds=600))
    assert keeper.runs_cancel_orphans() == 1  # nobody watching any more
    Run.objects.filter(pk=run.id).update(status=RunStatus.CANCELLED)
