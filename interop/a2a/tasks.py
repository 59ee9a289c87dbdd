"""Runs as A2A shows them: a run is a task (its id the run id), its status a task state, its
events status and artifact updates, a refused start a task in state REJECTED. Hand-built protos,
one place for each shape."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from a2a.helpers.proto_helpers import new_data_part, new_text_message, new_text_part
from a2a.types.a2a_pb2 import (
    Artifact,
    Message,
    Part,
    Role,
    Task,
    TaskArtifactUpdateEvent,
    TaskState,
    TaskStatus,
    TaskStatusUpdateEvent,
)
from django.utils import timezone
from google.protobuf.timestamp_pb2 import Timestamp

from interop.calls import Problem
from runs import events as ev
from runs.models import Run, RunStatus
from runs.presenters import run_output
from runs.streams import EventRow

# The run's metadata key that keeps a contextId a client gave (none given: the run id).
CONTEXT_KEY = "a2a_context_id"
OUTPUT_ARTIFACT = "output"

STATE_OF = {
    RunStatus.QUEUED: TaskState.TASK_STATE_SUBMITTED,
    RunStatus.RUNNING: TaskState.TASK_STATE_WORKING,
    RunStatus.COMPLETED: TaskState.TASK_STATE_COMPLETED,
    RunStatus.FAILED: TaskState.TASK_STATE_FAILED,
    RunStatus.CANCELLED: TaskState.TASK_STATE_CANCELED,
    RunStatus.TIMED_OUT: TaskState.TASK_STATE_FAILED,
}
# The statuses a task state lists (tasks?status=): none for the states no run is ever in.
STATUSES_OF = {
    TaskState.TASK_STATE_SUBMITTED: [RunStatus.QUEUED],
    TaskState.TASK_STATE_WORKING: [RunStatus.RUNNING],
    TaskState.TASK_STATE_COMPLETED: [RunStatus.COMPLETED],
    TaskState.TASK_STATE_FAILED: [RunStatus.FAILED, RunStatus.TIMED_OUT],
    TaskState.TASK_STATE_CANCELED: [RunStatus.CANCELLED],
}


def context_id(run: Run) -> str:
    return str(run.metadata.get(CONTEXT_KEY) or run.id)


def _timestamp(at: datetime | None) -> Timestamp | None:
    if at is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(at)
    return stamp


def _at(iso: str) -> Timestamp:
    stamp = Timestamp()
    stamp.FromJsonString(iso)
    return stamp


def output_part(output: Any) -> Part:
    """A run's output: text as a text part, a JSON value (output_schema, code chains) as data."""
    if isinstance(output, str):
        return new_text_part(output, media_type="text/plain")
    return new_data_part(output, media_type="application/json")


def _agent_message(text: str, run_id: str, context: str) -> Message:
    return new_text_message(text, context_id=context, task_id=run_id, role=Role.ROLE_AGENT)


def _status_message(run: Run) -> Message | None:
    if run.status == RunStatus.FAILED:
        return _agent_message(run.error_message or run.error_code, str(run.id), context_id(run))
    if run.status == RunStatus.TIMED_OUT:
        text = f"The run exceeded its chain's timeout ({run.chain.timeout_s} s)."
        return _agent_message(text, str(run.id), context_id(run))
    if run.status == RunStatus.CANCELLED and run.cancel_reason:
        return _agent_message(f"Cancelled ({run.cancel_reason}).", str(run.id), context_id(run))
    return None


def input_message(run: Run) -> Message:
    """The message that started the task, as the run keeps it: its input, as data."""
    return Message(
        message_id=f"{run.id}-input",
        context_id=context_id(run),
        task_id=str(run.id),
        role=Role.ROLE_USER,
        parts=[new_data_part(run.input, media_type="application/json")],
    )


def run_task(run: Run, *, history_length: int | None = None, artifacts: bool = True) -> Task:
    """The task of a run (with its chain): state, the output as the artifact `output` once
    completed, the input message as history (unless history_length is 0), and in metadata the
    run's id, chain, version and last seq."""
    status = TaskStatus(
        state=STATE_OF[run.status],
        timestamp=_timestamp(run.finished_at or run.started_at or run.created_at),
    )
    if (message := _status_message(run)) is not None:
        status.message.CopyFrom(message)
    task = Task(id=str(run.id), context_id=context_id(run), status=status)
    if artifacts and run.status == RunStatus.COMPLETED:
        task.artifacts.append(
            Artifact(
                artifact_id=OUTPUT_ARTIFACT,
                name=OUTPUT_ARTIFACT,
                parts=[output_part(run_output(run))],
            )
        )
    if history_length is None or history_length > 0:
        task.history.append(input_message(run))
    task.metadata.update(
        {
            "run_id": str(run.id),
            "chain": run.chain.name,
            "version": run.chain.version,
            "seq": str(run.last_seq),
        }
    )
    if run.error_code:
        task.metadata.update({"error_code": run.error_code})
    if run.cancel_requested_at is not None and not run.is_terminal:
        task.metadata.update({"cancel_requested": True})
    return task


def rejected_task(problem: Problem, context: str | None) -> Task:
    """A start refused by a limit or by backpressure: a task that was never a run (it has a
    fresh id), in state REJECTED, its status message the problem's detail and its metadata the
    problem+json the REST API would answer, Retry-After as `retry_after`."""
    task_id = str(uuid.uuid4())
    context = context or task_id
    status = TaskStatus(
        state=TaskState.TASK_STATE_REJECTED,
        message=_agent_message(problem.detail, task_id, context),
        timestamp=_timestamp(timezone.now()),
    )
    task = Task(id=task_id, context_id=context, status=status)
    details = dict(problem.body)
    if "Retry-After" in problem.headers:
        details["retry_after"] = int(problem.headers["Retry-After"])
    task.metadata.update({"problem": details})
    return task


Event = Task | TaskStatusUpdateEvent | TaskArtifactUpdateEvent


def _status(
    run_id: str, context: str, row: EventRow, state: int, text: str | None = None, data=None
) -> TaskStatusUpdateEvent:
    status = TaskStatus(state=state, timestamp=_at(row.ts))
    if text is not None or data is not None:
        parts = [new_text_part(text)] if text is not None else []
        if data is not None:
            parts.append(new_data_part(data, media_type="application/json"))
        status.message.CopyFrom(
            Message(
                message_id=f"{run_id}-{row.seq}",
                context_id=context,
                task_id=run_id,
                role=Role.ROLE_AGENT,
                parts=parts,
            )
        )
    update = TaskStatusUpdateEvent(task_id=run_id, context_id=context, status=status)
    update.metadata.update({"seq": str(row.seq), "event": row.event})
    return update


def _artifact(
    run_id: str,
    context: str,
    row: EventRow,
    artifact_id: str,
    part: Part,
    *,
    name: str = "",
    append: bool,
    last: bool = False,
) -> TaskArtifactUpdateEvent:
    update = TaskArtifactUpdateEvent(
        task_id=run_id,
        context_id=context,
        artifact=Artifact(artifact_id=artifact_id, name=name, parts=[part]),
        append=append,
        last_chunk=last,
    )
    update.metadata.update({"seq": str(row.seq), "event": row.event})
    return update


def _shown(data: dict) -> dict:
    return {k: v for k, v in data.items() if k not in ("run_id", "seq", "ts")}


_WORKING = TaskState.TASK_STATE_WORKING


def event_updates(run_id: str, context: str, row: EventRow) -> list[Event]:
    """The A2A updates of one run event, each carrying the event's seq and name in its
    metadata (`seq`, `event`): agents as status messages, an agent's tokens as chunks of its
    artifact `agent-<index>` (opened again by a resumed agent's new `agent.started`), tool calls
    and progress as status messages with data, the output as the artifact `output`."""
    data, kind = row.data, row.event
    if kind == ev.RUN_QUEUED:
        return [_status(run_id, context, row, TaskState.TASK_STATE_SUBMITTED)]
    if kind == ev.RUN_STARTED:
        return [_status(run_id, context, row, _WORKING)]
    if kind == ev.AGENT_STARTED:
        artifact = f"agent-{data['index']}"
        return [
            _artifact(
                run_id, context, row, artifact, new_text_part(""), name=data["agent"], append=False
            ),
            _status(run_id, context, row, _WORKING, f"{data['agent']} started.", _shown(data)),
        ]
    if kind == ev.AGENT_OUTPUT:
        artifact = f"agent-{data['index']}"
        part = new_text_part(data["chunk"])
        return [_artifact(run_id, context, row, artifact, part, name=data["agent"], append=True)]
    if kind == ev.AGENT_COMPLETED:
        artifact = f"agent-{data['index']}"
        return [
            _artifact(
                run_id,
                context,
                row,
                artifact,
                new_text_part(""),
                name=data["agent"],
                append=True,
                last=True,
            ),
            _status(run_id, context, row, _WORKING, f"{data['agent']} done.", _shown(data)),
        ]
    if kind in (ev.AGENT_TOOL_CALL, ev.AGENT_TOOL_RESULT):
        return [_status(run_id, context, row, _WORKING, None, {"event": kind, **_shown(data)})]
    if kind == ev.RUN_PROGRESS:
        return [_status(run_id, context, row, _WORKING, data.get("message"), _shown(data))]
    if kind == ev.RUN_RESUMED:
        text = f"Resumed at agent {data['index']} (attempt {data['attempt']})."
        return [_status(run_id, context, row, _WORKING, text, _shown(data))]
    if kind == ev.RUN_COMPLETED:
        part = output_part(data["output"])
        return [
            _artifact(
                run_id,
                context,
                row,
                OUTPUT_ARTIFACT,
                part,
                name=OUTPUT_ARTIFACT,
                append=False,
                last=True,
            ),
            _status(run_id, context, row, TaskState.TASK_STATE_COMPLETED),
        ]
    if kind == ev.RUN_FAILED:
        error = data.get("error") or {}
        state = TaskState.TASK_STATE_FAILED
        return [_status(run_id, context, row, state, error.get("message"), {"error": error})]
    if kind == ev.RUN_CANCELLED:
        state = TaskState.TASK_STATE_CANCELED
        return [_status(run_id, context, row, state, f"Cancelled ({data.get('reason')}).")]
    if kind == ev.RUN_TIMED_OUT:
        text = f"The run exceeded its chain's timeout ({data.get('timeout_s')} s)."
        return [_status(run_id, context, row, TaskState.TASK_STATE_FAILED, text)]
    return []  # an event of a later version: nothing to show
