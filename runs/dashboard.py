"""The operators' live dashboard: a page, its counters and its cancel button, for staff only.

The page is rendered once with the newest runs, the runs waiting for a person (apart: they
may wait for days, and someone has to answer them in the admin) and the counters; dashboard.js
then follows the status feed and a run's event stream over the WebSockets the API serves (a
staff session is a credential there), re-reads the counters, and cancels through run_cancel
like the admin does.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from django.contrib import admin
from django.contrib.admin.views.decorators import staff_member_required
from django.http import JsonResponse
from django.shortcuts import render
from django.utils import timezone
from django.views.decorators.http import require_GET, require_POST

from agentsvc.errors import ApplicationError, exception_problem, problem_response
from runs import selectors, services
from runs.models import Run
from runs.timefmt import iso

RECENT_RUNS = 50
WAITING_RUNS = 50


@staff_member_required
@require_GET
def dashboard(request):
    return render(
        request,
        "dashboard.html",
        {
            "runs": [run_row(run) for run in selectors.run_recent_list(limit=RECENT_RUNS)],
            "waiting": _waiting_rows(),
            "counts": selectors.run_counts(now=timezone.now()),
            "recent_runs": RECENT_RUNS,
        },
    )


def _waiting_rows() -> list[dict[str, Any]]:
    return [waiting_row(run) for run in selectors.run_waiting_list(limit=WAITING_RUNS)]


def waiting_row(run: Run) -> dict[str, Any]:
    """A row of the waiting runs' table: what the run asks, since when, until when."""
    request = run.input_request or {}
    return {
        "run_id": str(run.id),
        "chain": run.chain.name,
        "version": run.chain.version,
        "owner": run.owner.name,
        "kind": request.get("kind"),
        "agent": request.get("agent"),
        "tool": request.get("tool"),
        "prompt": request.get("prompt", ""),
        "requested_at": request.get("requested_at"),
        "expires_at": request.get("expires_at"),
    }


def run_row(run: Run) -> dict[str, Any]:
    """A table row as dashboard.js draws it (the feed's frames carry the same names)."""
    return {
        "run_id": str(run.id),
        "chain": run.chain.name,
        "version": run.chain.version,
        "owner": run.owner.name,
        "status": run.status,
        "progress": {
            "current_agent": run.current_agent or None,
            "agents_completed": run.agents_completed,
            "agents_total": run.agents_total,
        },
        "usage": {"total_tokens": run.input_tokens + run.output_tokens},
        "created_at": iso(run.created_at),
        "cancel_requested": run.cancel_requested_at is not None,
    }


@staff_member_required
@require_GET
def state(request):
    """Counters and newest runs: re-read when the page (re)connects and as feed frames arrive,
    so the counters stay exact and a run created while the feed was down still shows."""
    return JsonResponse(
        {
            "counts": selectors.run_counts(now=timezone.now()),
            "runs": [run_row(run) for run in selectors.run_recent_list(limit=RECENT_RUNS)],
            "waiting": _waiting_rows(),
        }
    )


@staff_member_required
@require_GET
def series(request):
    """The charts' data (runs per minute by status, queue wait and age), re-read every few
    seconds by the page."""
    return JsonResponse(selectors.run_series(now=timezone.now()))


@staff_member_required
@require_POST
def run_cancel(request, run_id: UUID):
    """Cancel a queued run, or ask a running one to stop; logged as the admin action is."""
    run = Run.objects.filter(pk=run_id).first()
    if run is None:
        return problem_response(request, "not_found", "No such run.")
    try:
        run = services.run_cancel(run=run, reason="admin")
    except ApplicationError as e:
        return exception_problem(request, e)
    admin.site.get_model_admin(Run).log_change(
        request, run, "Cancelled from the dashboard (reason: admin)."
    )
    return JsonResponse(
        {"run_id": str(run.id), "status": run.status, "cancel_requested": True},
        status=200 if run.is_terminal else 202,
    )
