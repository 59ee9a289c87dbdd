"""Run and chain as the API shows them: hand-built dicts, one place for each shape."""

from __future__ import annotations

import json
from typing import Any

from runs.availability import chain_available
from runs.models import Chain, Run, RunEvent
from runs.timefmt import iso


def run_urls(run: Run) -> dict[str, str]:
    return {
        "poll_url": f"/api/v1/runs/{run.id}",
        "events_url": f"/api/v1/runs/{run.id}/events",
        "ws_url": f"/ws/v1/runs/{run.id}",
    }


def run_handle(run: Run) -> dict[str, Any]:
    """The answer to an accepted run: where to find it next."""
    return {
        "run_id": str(run.id),
        "status": run.status,
        "chain": run.chain.name,
        "version": run.chain.version,
        "created_at": iso(run.created_at),
        "estimated_duration_s": run.chain.estimated_duration_s,
        **run_urls(run),
    }


def run_output(run: Run) -> Any:
    """The run's output as callers see it: text, or for a chain with an output_schema and for a
    code chain the JSON value (stored as its JSON text in the same column)."""
    chain = run.chain
    if run.output is not None and (chain.output_schema is not None or chain.entrypoint):
        try:
            return json.loads(run.output)
        except ValueError:  # not written by an execution that validated it
            return run.output
    return run.output


def input_request_dict(run: Run) -> dict[str, Any] | None:
    """What a waiting run asks (the members of its `run.input_required`, and when it asked);
    None for a run that waits on nothing."""
    request = run.input_request
    if not run.is_waiting or not request:
        return None
    return {k: v for k, v in request.items() if k != "key"}


def run_dict(run: Run) -> dict[str, Any]:
    duration_ms = None
    if run.started_at and run.finished_at:
        duration_ms = int((run.finished_at - run.started_at).total_seconds() * 1000)
    return {
        "run_id": str(run.id),
        "chain": run.chain.name,
        "version": run.chain.version,
        "status": run.status,
        "input": run.input,
        "output": run_output(run),
        "error": (
            {"code": run.error_code, "message": run.error_message} if run.error_code else None
        ),
        "progress": {
            "current_agent": run.current_agent or None,
            "agents_completed": run.agents_completed,
            "agents_total": run.agents_total,
        },
        "usage": {
            "input_tokens": run.input_tokens,
            "output_tokens": run.output_tokens,
            "total_tokens": run.input_tokens + run.output_tokens,
        },
        "cost": f"{run.cost:.6f}",
        "duration_ms": duration_ms,
        "created_at": iso(run.created_at),
        "started_at": iso(run.started_at),
        "finished_at": iso(run.finished_at),
        "cancel_requested": run.cancel_requested_at is not None,
        "input_request": input_request_dict(run),
        "metadata": run.metadata,
        "webhook": (
            {"url": run.webhook_url, "events": run.webhook_events} if run.webhook_url else None
        ),
        "rerun_of": str(run.rerun_of_id) if run.rerun_of_id else None,
        "schedule_id": str(run.schedule_id) if run.schedule_id else None,
        **run_urls(run),
    }


def event_dict(event: RunEvent) -> dict[str, Any]:
    return {"seq": event.seq, "event": event.type, "data": event.data, "ts": iso(event.created_at)}


def chain_dict(chain: Chain) -> dict[str, Any]:
    return {
        "name": chain.name,
        "version": chain.version,
        "description": chain.description,
        "kind": chain.kind,
        "entrypoint": chain.entrypoint or None,
        "source_hash": chain.source_hash or None,
        "agents": [
            {
                "name": a.name,
                "provider": a.provider,
                "model": a.model,
                "tools": [t["name"] for t in a.tools],
            }
            for a in chain.agents.all()
        ],
        "input_schema": chain.input_schema,
        "output_schema": chain.output_schema,
        "timeout_s": chain.timeout_s,
        "estimated_duration_s": chain.estimated_duration_s,
        "available": chain_available(chain),
        "created_at": iso(chain.created_at),
    }
