"""The A2A request handler: each method of `a2a-sdk`'s RequestHandler as a call of the run
services, through `interop.calls` (the REST API's steps). The SDK's dispatchers (HTTP+JSON,
JSON-RPC) parse, check the protocol version and required fields, and answer; this module turns
a message into a run start and a run back into a task."""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import AsyncGenerator, Callable
from datetime import UTC
from typing import Any

from a2a.server.context import ServerCallContext
from a2a.server.request_handlers.request_handler import RequestHandler, validate_request_params
from a2a.types.a2a_pb2 import (
    AgentCard,
    AuthenticationInfo,
    CancelTaskRequest,
    DeleteTaskPushNotificationConfigRequest,
    GetExtendedAgentCardRequest,
    GetTaskPushNotificationConfigRequest,
    GetTaskRequest,
    ListTaskPushNotificationConfigsRequest,
    ListTaskPushNotificationConfigsResponse,
    ListTasksRequest,
    ListTasksResponse,
    Message,
    SendMessageRequest,
    SubscribeToTaskRequest,
    Task,
    TaskPushNotificationConfig,
)
from a2a.utils.errors import (
    A2AError,
    ContentTypeNotSupportedError,
    InternalError,
    InvalidParamsError,
    InvalidRequestError,
    TaskNotCancelableError,
    TaskNotFoundError,
    UnsupportedOperationError,
)
from django.conf import settings
from google.protobuf.json_format import MessageToDict
from rest_framework.exceptions import ValidationError

from agentsvc.db import db_async
from agentsvc.errors import ApplicationError
from interop import calls
from interop.a2a import cards
from interop.a2a.tasks import (
    CONTEXT_KEY,
    STATUSES_OF,
    context_id,
    event_updates,
    rejected_task,
    run_task,
)
from interop.selectors import task_page
from runs.api import create_body
from runs.models import Chain, Run
from runs.stream_limits import stream_lease
from runs.streams import follow_run, parse_after

# The push notification config a run's webhook is: one per task, always this id.
PUSH_CONFIG_ID = "webhook"
PUSH_SCHEME = "StandardWebhooks"
RESUME_HEADER = "last-event-id"
SKILL_KEY = "skill"
# How long a cancel waits for a running task to stop before answering it as it is then
# (WORKING, with cancel_requested in its metadata).
CANCEL_WAIT_S = 5
DEFAULT_PAGE = 50
MAX_PAGE = 100

_ERRORS: dict[str, type[A2AError]] = {
    "not_found": TaskNotFoundError,
    "validation_error": InvalidParamsError,
    "idempotency_key_reused": InvalidRequestError,
    "run_not_cancellable": TaskNotCancelableError,
}


def a2a_error(exc: Exception, path: str) -> A2AError:
    """The A2A error of an exception, from its problem+json answer: the problem's detail as
    the message; its code, type and status (and Retry-After, and the field errors, which the SDK
    also turns into a google.rpc.BadRequest) in ErrorInfo's metadata."""
    if isinstance(exc, A2AError):
        return exc
    problem = calls.problem_of(exc, path)
    data: dict[str, Any] = {
        "code": problem.code,
        "type": problem.body["type"],
        "status": str(problem.status),
    }
    if "Retry-After" in problem.headers:
        data["retry_after"] = problem.headers["Retry-After"]
    if problem.body.get("errors"):
        data["errors"] = problem.body["errors"]
    return _ERRORS.get(problem.code, InternalError)(message=problem.detail, data=data)


def _invalid(field: str, message: str, detail: str = "The request is not valid.") -> A2AError:
    return a2a_error(
        ApplicationError("validation_error", detail, errors=[{"field": field, "message": message}]),
        "",
    )


def _required(params: SendMessageRequest) -> None:
    """The REQUIRED fields of a send that the start reads, refused as the SDK's
    validate_request_params refuses them (same fields, same messages). That check walks every
    field of the request, input values included, by reflection: a sixth of a send's CPU, so the
    two send methods check these instead; every other method takes the SDK's check."""
    errors = []
    if not params.HasField("message"):
        errors.append({"field": "message", "message": "Field is required."})
    else:
        message = params.message
        if not message.message_id:
            errors.append({"field": "message.message_id", "message": "Field is required."})
        if not message.role:
            errors.append({"field": "message.role", "message": "Field is required."})
        if not message.parts:
            errors.append(
                {"field": "message.parts", "message": "Field must contain at least one element."}
            )
    if errors:
        raise InvalidParamsError(message="Validation failed", data={"errors": errors})


def _caller(context: ServerCallContext) -> calls.Caller:
    return context.state["caller"]


def _mapped(method: Callable) -> Callable:
    """Every error of a handler method leaves as the A2A error of its problem."""
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream(self, params, context: ServerCallContext):
            inner = method(self, params, context)
            try:
                async for item in inner:
                    yield item
            except Exception as exc:
                raise a2a_error(exc, _caller(context).path) from exc
            finally:
                await inner.aclose()

        return stream

    @functools.wraps(method)
    async def unary(self, params, context: ServerCallContext):
        try:
            return await method(self, params, context)
        except Exception as exc:
            raise a2a_error(exc, _caller(context).path) from exc

    return unary


def _whole(value: Any) -> Any:
    """JSON as the client sent it: protobuf's Value holds every number as a double, so a whole
    number comes back as 3.0; it is 3 again here."""
    if isinstance(value, float) and value.is_integer() and math.isfinite(value):
        return int(value) if abs(value) < 2**53 else value
    if isinstance(value, dict):
        return {k: _whole(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_whole(v) for v in value]
    return value


def _run_input(message: Message, chain: Chain) -> tuple[dict, dict[str, str]]:
    """The run input a message carries, and where each input field came from: one data part
    (a JSON object), or one text part for a chain whose input is one required string."""
    data, text = [], []
    for i, part in enumerate(message.parts):
        if part.HasField("data"):
            data.append(i)
        elif part.HasField("text"):
            text.append(i)
        else:
            raise ContentTypeNotSupportedError(
                message="This agent takes a data part (the chain's input, a JSON object) or, "
                "for a chain whose input is one string, a text part; not files."
            )
    field = cards.text_field(chain)
    if len(data) == 1 and not text:
        i = data[0]
        value = _whole(MessageToDict(message.parts[i].data))
        if not isinstance(value, dict):
            raise _invalid(f"message.parts[{i}].data", "Must be a JSON object (the chain's input).")
        return value, {"input": f"message.parts[{i}].data"}
    if len(text) == 1 and not data and field is not None:
        i = text[0]
        return {field: message.parts[i].text}, {f"input.{field}": f"message.parts[{i}].text"}
    wanted = "one data part" + (f" or one text part (its {field!r})" if field else "")
    raise _invalid("message.parts", f"Send {wanted}: the chain's input.")


def _accepts(modes: list[str], offered: list[str]) -> bool:
    if not modes:
        return True
    for mode in modes:
        kind = mode.split(";")[0].strip().lower()
        for offer in offered:
            if kind in ("*/*", offer) or (kind.endswith("/*") and offer.startswith(kind[:-1])):
                return True
    return False


async def _push_webhook(config: TaskPushNotificationConfig, field: str) -> dict:
    """A push notification config as a run webhook: the url, and the Standard Webhooks secret
    in `authentication.credentials` (scheme `StandardWebhooks`); the SSRF guard applies."""
    if config.token:
        raise _invalid(f"{field}.token", "Not used: notifications are signed with the credentials.")
    scheme = config.authentication.scheme if config.HasField("authentication") else ""
    if scheme.lower() != PUSH_SCHEME.lower():
        raise _invalid(
            f"{field}.authentication.scheme",
            f"Must be {PUSH_SCHEME}: the credentials are a Standard Webhooks secret (whsec_...).",
        )
    try:
        return await calls.webhook_valid(config.url, config.authentication.credentials)
    except ValidationError as exc:
        names = {"url": f"{field}.url", "secret": f"{field}.authentication.credentials"}
        raise calls.fields_renamed(exc, names) from None


def _push_config(run: Run) -> TaskPushNotificationConfig:
    """A run's webhook as its push notification config (the secret is never shown)."""
    return TaskPushNotificationConfig(
        id=PUSH_CONFIG_ID,
        task_id=str(run.id),
        url=run.webhook_url,
        authentication=AuthenticationInfo(scheme=PUSH_SCHEME),
    )


class ChainsRequestHandler(RequestHandler):
    """A2A on the run services; the chain is the one the path names (the caller's), or on the
    service's endpoint the one `metadata.skill` names."""

    async def _start(
        self, params: SendMessageRequest, context: ServerCallContext
    ) -> tuple[Run | None, Task | None]:
        """(run, None) for a started run, (None, task) for a start refused by a limit or by
        backpressure: a task in state REJECTED with the reason."""
        caller = _caller(context)
        _required(params)
        message = params.message
        if message.task_id:
            run = await calls.run_find(caller, message.task_id, _chain_name(caller))
            raise UnsupportedOperationError(
                message="The task has ended; send a message without taskId to start a new one."
                if run.is_terminal
                else "The task takes no further messages while it runs."
            )
        metadata = _whole(MessageToDict(params.metadata)) if params.HasField("metadata") else {}
        chain = caller.chain
        if chain is None:
            name = metadata.pop(SKILL_KEY, None)
            if not isinstance(name, str) or not name:
                raise _invalid(
                    f"metadata.{SKILL_KEY}",
                    "Name the chain (a skill of the service's agent card).",
                )
            try:
                chain = await calls.chain_named(caller, name)
            except ApplicationError as exc:
                raise _invalid(f"metadata.{SKILL_KEY}", exc.detail) from None
        if not _accepts(
            list(params.configuration.accepted_output_modes), cards.output_modes(chain)
        ):
            raise ContentTypeNotSupportedError(
                message=f"This chain answers {', '.join(cards.output_modes(chain))}."
            )
        run_input, names = _run_input(message, chain)
        if message.context_id:
            metadata[CONTEXT_KEY] = message.context_id
        try:
            data = dict(create_body({"input": run_input, "metadata": metadata}))
        except ValidationError as exc:
            raise calls.fields_renamed(exc, names) from None
        config = params.configuration
        if config.HasField("task_push_notification_config"):
            field = "configuration.taskPushNotificationConfig"
            data["webhook"] = await _push_webhook(config.task_push_notification_config, field)
        try:
            run, _ = await calls.run_start(
                caller, chain=chain, data=data, fingerprinted=lambda: MessageToDict(params)
            )
        except ApplicationError as exc:
            if exc.code in calls.REFUSED_STARTS:
                return None, rejected_task(calls.problem_of(exc, caller.path), message.context_id)
            if exc.code == "validation_error":
                raise calls.fields_renamed(exc, names) from None
            raise
        return run, None

    @_mapped
    async def on_message_send(self, params: SendMessageRequest, context: ServerCallContext):
        run, rejected = await self._start(params, context)
        if rejected is not None:
            return rejected
        if not params.configuration.return_immediately:
            run = await calls.run_wait(run, calls.invoke_wait_s())
        return run_task(run, history_length=_history(params.configuration))

    @_mapped
    async def on_message_send_stream(
        self, params: SendMessageRequest, context: ServerCallContext
    ) -> AsyncGenerator:
        try:
            lease = await stream_lease(_caller(context).key.pk)
        except ApplicationError as exc:
            yield rejected_task(calls.problem_of(exc, _caller(context).path), None)
            return
        try:
            run, rejected = await self._start(params, context)
            if rejected is not None:
                yield rejected
                return
            yield run_task(run, history_length=_history(params.configuration))
            async for update in _follow(run, after=run.last_seq):
                yield update
        finally:
            await lease.release()

    @validate_request_params
    @_mapped
    async def on_subscribe_to_task(
        self, params: SubscribeToTaskRequest, context: ServerCallContext
    ) -> AsyncGenerator:
        caller = _caller(context)
        run = await calls.run_find(caller, params.id, _chain_name(caller))
        raw = context.state["headers"].get(RESUME_HEADER)
        after = parse_after(raw)
        if after is None:
            raise _invalid("Last-Event-ID", "Must be a whole number (an event seq).")
        if raw is None:
            if run.is_terminal:
                raise UnsupportedOperationError(
                    message="The task has ended. To read the events you missed, send "
                    "Last-Event-ID: <the last seq you saw>."
                )
            after = run.last_seq
        lease = await stream_lease(caller.key.pk)
        try:
            yield run_task(run)
            async for update in _follow(run, after=after):
                yield update
        finally:
            await lease.release()

    @validate_request_params
    @_mapped
    async def on_get_task(self, params: GetTaskRequest, context: ServerCallContext) -> Task:
        caller = _caller(context)
        run = await calls.run_find(caller, params.id, _chain_name(caller))
        length = params.history_length if params.HasField("history_length") else None
        return run_task(run, history_length=length)

    @validate_request_params
    @_mapped
    async def on_list_tasks(
        self, params: ListTasksRequest, context: ServerCallContext
    ) -> ListTasksResponse:
        caller = _caller(context)
        size = params.page_size if params.HasField("page_size") else DEFAULT_PAGE
        if not 1 <= size <= MAX_PAGE:
            raise _invalid("pageSize", f"Must be an integer from 1 to {MAX_PAGE}.")
        statuses = None
        if params.status:
            statuses = STATUSES_OF.get(params.status, [])
        after = None
        if params.HasField("status_timestamp_after"):
            after = params.status_timestamp_after.ToDatetime(tzinfo=UTC)
        try:
            runs, next_cursor, total = await db_async(task_page)(
                owner=caller.key.owner,
                chain=_chain_name(caller),
                statuses=statuses,
                context_key=CONTEXT_KEY,
                context=params.context_id or None,
                updated_after=after,
                cursor=params.page_token or None,
                limit=size,
            )
        except ApplicationError as exc:
            raise calls.fields_renamed(exc, {"cursor": "pageToken"}) from None
        length = params.history_length if params.HasField("history_length") else None
        tasks = [
            run_task(run, history_length=length, artifacts=params.include_artifacts) for run in runs
        ]
        return ListTasksResponse(
            tasks=tasks, next_page_token=next_cursor or "", page_size=size, total_size=total
        )

    @validate_request_params
    @_mapped
    async def on_cancel_task(self, params: CancelTaskRequest, context: ServerCallContext) -> Task:
        caller = _caller(context)
        run = await calls.run_find(caller, params.id, _chain_name(caller))
        run = await calls.run_cancel(run, "api")
        if not run.is_terminal:  # running: asked to stop, which takes an executor a moment
            run = await calls.run_wait(run, CANCEL_WAIT_S)
        return run_task(run)

    @validate_request_params
    @_mapped
    async def on_create_task_push_notification_config(
        self, params: TaskPushNotificationConfig, context: ServerCallContext
    ) -> TaskPushNotificationConfig:
        caller = _caller(context)
        run = await calls.run_find(caller, params.task_id, _chain_name(caller))
        webhook = await _push_webhook(params, "config")
        if not await calls.run_webhook_set(run, webhook):
            raise UnsupportedOperationError(
                message="The task has ended: no notification would be sent."
            )
        run.webhook_url = webhook["url"]
        return _push_config(run)

    async def _configured(self, task_id: str, config_id: str, context) -> Run:
        caller = _caller(context)
        run = await calls.run_find(caller, task_id, _chain_name(caller))
        if config_id != PUSH_CONFIG_ID or not run.webhook_url:
            raise TaskNotFoundError(message="No such push notification config.")
        return run

    @validate_request_params
    @_mapped
    async def on_get_task_push_notification_config(
        self, params: GetTaskPushNotificationConfigRequest, context: ServerCallContext
    ) -> TaskPushNotificationConfig:
        return _push_config(await self._configured(params.task_id, params.id, context))

    @validate_request_params
    @_mapped
    async def on_list_task_push_notification_configs(
        self, params: ListTaskPushNotificationConfigsRequest, context: ServerCallContext
    ) -> ListTaskPushNotificationConfigsResponse:
        caller = _caller(context)
        run = await calls.run_find(caller, params.task_id, _chain_name(caller))
        configs = [_push_config(run)] if run.webhook_url else []
        return ListTaskPushNotificationConfigsResponse(configs=configs)

    @validate_request_params
    @_mapped
    async def on_delete_task_push_notification_config(
        self, params: DeleteTaskPushNotificationConfigRequest, context: ServerCallContext
    ) -> None:
        caller = _caller(context)
        run = await calls.run_find(caller, params.task_id, _chain_name(caller))
        if params.id == PUSH_CONFIG_ID and run.webhook_url:
            await calls.run_webhook_set(run, None)  # an ended run has nothing more to send

    async def on_get_extended_agent_card(
        self, params: GetExtendedAgentCardRequest, context: ServerCallContext
    ) -> AgentCard:
        raise UnsupportedOperationError(message="This agent has no extended card.")


def _chain_name(caller: calls.Caller) -> str | None:
    return caller.chain.name if caller.chain is not None else None


def _history(configuration) -> int:
    """A send's answer echoes the message it was sent only when historyLength asks for it."""
    return configuration.history_length if configuration.HasField("history_length") else 0


async def _follow(run: Run, *, after: int) -> AsyncGenerator:
    """The run's updates after seq `after`, from its durable event log, until its end: the
    SSE stream's reader (subscribed before it reads, each event once and in order)."""
    run_id, context = str(run.id), context_id(run)
    async for rows in follow_run(run, after, idle_s=settings.SSE_PING_S):
        for row in rows or ():  # None: idle; sse-starlette sends its own pings
            for update in event_updates(run_id, context, row):
                yield update
