"""Answers to runs that wait for a person (`input_required`): an approval or an input, from the
API (`POST /runs/{id}/input`) or from staff in the admin.

An answer is one conditional write: the run's row must still be waiting on that very request.
It records the answer as the step of the wait (a `RunStep` under the request's key, so the run,
replayed by whichever executor claims it, finds the answer where it stopped), appends
`run.input_received` and `run.queued`, and takes the key's active-run slot again, as a start
does. Two answers raced from two processes: the row lock orders them and the second finds the
request gone, so exactly one is recorded.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from agentsvc import limits
from agentsvc.errors import ApplicationError
from agentsvc.models import KEY_PREFIX, ApiKey
from runs.chains import answer_validate
from runs.events import RUN_INPUT_RECEIVED, RUN_QUEUED
from runs.execution.providers import Usage
from runs.models import Run, RunStatus, RunStep
from runs.services import Append, events_write

APPROVAL = "approval"
INPUT = "input"


def answerer_of_key(key: ApiKey) -> str:
    """`by` of an answer sent with an API key: its display prefix."""
    return f"{KEY_PREFIX}{key.prefix}"


def answerer_of_staff(username: str) -> str:
    return f"staff:{username}"


def _answered(run: Run, request_id: str) -> bool:
    return RunStep.objects.filter(run=run, data__request_id=request_id).exists()


def _refused(run: Run, request_id: str) -> ApplicationError:
    """Why an answer to `request_id` cannot be taken, read after the write found nothing."""
    if _answered(run, request_id):
        return ApplicationError(
            "input_already_received",
            "This request has already been answered.",
            run_id=str(run.id),
        )
    current = Run.objects.values_list("status", "input_request").get(pk=run.pk)
    if current[0] != RunStatus.INPUT_REQUIRED:
        return ApplicationError(
            "run_not_waiting",
            f"The run is {current[0]}, not waiting for input.",
            run_id=str(run.id),
        )
    return ApplicationError("not_found", "The run has no pending request with this id.")


def run_respond(
    *,
    run: Run,
    request_id: str,
    by: str,
    approve: bool | None = None,
    answer: Any = None,
    key: ApiKey | None = None,
) -> Run:
    """Answer the run's pending request: `approve` for an approval, `answer` (validated against
    the request's schema) for an input. Returns the run as written (`queued`). `key`: the key
    that answers, if any (when it is the run's own, its slot is taken without reading it).

    409 `input_already_received` for a request answered before, 404 for an id the run does not
    wait on, 409 `run_not_waiting` for a run that waits on nothing, 400 for an answer of the
    wrong kind or one the schema refuses, 429 `concurrency_limit` when the run's key has no
    active-run slot free (nothing is recorded: answer again later)."""
    request = run.input_request if run.is_waiting else None
    if request is None or request.get("request_id") != request_id:
        raise _refused(run, request_id)
    data: dict[str, Any] = {"request_id": request_id, "by": by}
    if request["kind"] == APPROVAL:
        if approve is None or answer is not None:
            raise ApplicationError(
                "validation_error",
                "This request asks for an approval.",
                errors=[{"field": "approve", "message": "Give true or false (and no input)."}],
            )
        data["approve"] = approve
    else:
        if answer is None or approve is not None:
            raise ApplicationError(
                "validation_error",
                "This request asks for an input.",
                errors=[{"field": "input", "message": "Give the input (and no approve)."}],
            )
        answer_validate(schema=request.get("schema") or {"type": "object"}, data=answer)
        data["input"] = answer
    now = timezone.now()
    append = Append(
        run.id,
        [
            (RUN_INPUT_RECEIVED, {"request_id": request_id, "by": by}, now),
            (
                RUN_QUEUED,
                {"chain": run.chain.name, "version": run.chain.version, "reason": "input_received"},
                now,
            ),
        ],
        {
            "status": RunStatus.QUEUED,
            "input_request": None,
            "input_expires_at": None,
            "heartbeat_at": now,
            # Whoever answered is watching: the orphan check counts from now, not from before
            # the wait.
            "last_seen_at": now,
        },
        Q(status=RunStatus.INPUT_REQUIRED, input_request__request_id=request_id),
        steps=[(request["key"], run.attempt, data, Usage(0, 0), Decimal(0), now)],
    )
    with transaction.atomic():
        seq = events_write(appends=[append])[run.id]
        if seq is None:
            raise _refused(run, request_id)
        if run.api_key_id is not None:
            if key is None or key.pk != run.api_key_id:
                key = ApiKey.objects.get(pk=run.api_key_id)
            limits.active_runs_take(key=key)  # last: locks the key's row; 429 undoes it all
    for name, value in append.fields.items():
        setattr(run, name, value)
    run.last_seq = seq
    return run
