"""One run's execution inside an executor: its agents in order (or its code chain), each
streaming from its model, output coalesced into `agent.output` events, tool calls made between
model calls. A coroutine: it waits on the model, never holding a thread or a database
connection; its events go to the executor's group commit.

Every finished step (a model call that asked for tools, a tool call, an agent) is recorded with
its event (`RunStep`), so an execution of a run that an earlier one had started (its executor
was lost, or handed it back) does each recorded step no more: it reads the result instead.

A step may be a person's answer (`wait_for_input`): the execution stops there, the run waits
holding nothing, and the answer, recorded as that step, is read when the run is executed
again."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import httpx
from django.conf import settings
from django.db.models import Q
from opentelemetry.trace import NonRecordingSpan, Span, SpanKind, Status, StatusCode

from agentsvc import tracing
from agentsvc.parsers import BodyError, strict_loads
from runs.chains import (
    agent_context,
    agent_messages,
    output_parse,
    output_response_format,
    template_render,
)
from runs.events import (
    AGENT_COMPLETED,
    AGENT_OUTPUT,
    AGENT_STARTED,
    AGENT_TOOL_CALL,
    AGENT_TOOL_RESULT,
    RUN_CANCELLED,
    RUN_COMPLETED,
    RUN_FAILED,
    RUN_INPUT_REQUIRED,
    RUN_RESUMED,
    RUN_TIMED_OUT,
    STATUS_OF,
)
from runs.execution.claims import Claimed, claim_condition
from runs.execution.providers import (
    DeadlineExceeded,
    ProviderError,
    ToolCalls,
    Usage,
    provider_for,
)
from runs.execution.tools import ToolError, tool_call, tools_openai
from runs.models import Agent, ChainKind, RunStatus
from runs.services import Append
from runs.timefmt import iso

if TYPE_CHECKING:
    from runs.execution.executor import Executor

logger = logging.getLogger(__name__)

MILLION = Decimal(1_000_000)


def model_cost(model: str, usage: Usage) -> Decimal:
    price_in, price_out = settings.MODEL_PRICES.get(model, (Decimal(0), Decimal(0)))
    cost = (usage.input_tokens * price_in + usage.output_tokens * price_out) / MILLION
    return cost.quantize(Decimal("0.000001"))


@dataclass
class Stop:
    """Why the executor stopped an execution from outside: `cancel` (someone asked; reason
    api, admin, orphaned...), `lost` (the run is no longer ours: write nothing), `hand_back`
    (the executor is shutting down: give the run back to the queue)."""

    kind: str
    reason: str = ""


class Execution:
    def __init__(self, executor: Executor, claim: Claimed) -> None:
        self.executor = executor
        self.claim = claim
        self.run_id = claim.run_id
        self.agents = claim.agents
        self.when = claim_condition(worker=executor.id, attempt=claim.attempt)
        self.seq = claim.seq  # the last of its events known to be committed
        self.started = time.monotonic()
        elapsed = (executor.now() - claim.started_at).total_seconds()
        self.deadline = self.started - max(0.0, elapsed) + claim.timeout_s
        # What earlier executions of the run finished (a resume), and what they used: the run's
        # usage is the sum of its steps'.
        self.steps: dict[str, dict[str, Any]] = dict(claim.steps)
        self.resuming = claim.resumed
        self.input_tokens = claim.input_tokens
        self.output_tokens = claim.output_tokens
        self.cost = claim.cost
        self.stop: Stop | None = None
        # Set while the run stops to wait for input (done once written): a request asked in
        # parallel is not made, it is asked once the first is answered.
        self.waiting: asyncio.Future | None = None
        self.task: asyncio.Task | None = None
        self.http: httpx.AsyncClient  # the executor's model connections this run uses
        self.span: Span = NonRecordingSpan(None)  # the execution's span (tracing on)

    # --- Events ---------------------------------------------------------------------------

    def emit(self, event: str, data: dict[str, Any], **fields: Any) -> None:
        self.executor.writer.add(self, event, data, fields)

    async def _finish(self, event: str, data: dict[str, Any], **fields: Any) -> None:
        if event in (RUN_COMPLETED, RUN_FAILED):
            data = {**data, "duration_ms": int((time.monotonic() - self.started) * 1000)}
        now = self.executor.now()
        status = STATUS_OF[event]
        self.span.set_attribute("agentsvc.run.status", status)
        self.span.set_attribute("gen_ai.usage.input_tokens", self.input_tokens)
        self.span.set_attribute("gen_ai.usage.output_tokens", self.output_tokens)
        if event in (RUN_FAILED, RUN_TIMED_OUT):
            self.span.set_status(Status(StatusCode.ERROR, fields.get("error_code", event)))
        error = fields.get("error_code")
        logger.debug(
            "run %s%s, %s+%s tokens",
            status,
            f" ({error})" if error else "",
            self.input_tokens,
            self.output_tokens,
        )
        await self.executor.writer.add_and_wait(
            self,
            event,
            data,
            {
                "status": status,
                "finished_at": now,
                "current_agent": "",
                "input_tokens": self.input_tokens,
                "output_tokens": self.output_tokens,
                "cost": self.cost,
                **fields,
            },
        )

    async def _fail(self, code: str, message: str) -> None:
        await self._finish(
            RUN_FAILED,
            {"error": {"code": code, "message": message}},
            error_code=code,
            error_message=message,
        )

    def usage(self) -> dict[str, int]:
        return {
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "total_tokens": self.input_tokens + self.output_tokens,
        }

    # --- The run --------------------------------------------------------------------------

    async def execute(self) -> None:
        """The whole execution, a span of the trace of the request that created the run."""
        claim = self.claim
        with tracing.tracer().start_as_current_span(
            "run.execute",
            context=tracing.parent_context(claim.trace_parent),
            kind=SpanKind.CONSUMER,
            attributes={
                "agentsvc.run_id": str(self.run_id),
                "agentsvc.chain": claim.chain,
                "agentsvc.chain_version": claim.version,
                "agentsvc.attempt": claim.attempt,
            },
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            self.span = span
            await self._execute()

    async def _execute(self) -> None:
        """Every way out but `lost` writes the run's next state."""
        try:
            try:
                async with asyncio.timeout(self.deadline - time.monotonic()):
                    output = await self._body()
            except InputWait:
                return  # written: the run waits, and is no longer this execution's
            except asyncio.CancelledError:
                if self.stop is None:
                    raise  # not ours to handle: the process is going down
                asyncio.current_task().uncancel()  # handled: what follows may await
                await self._stopped()
                return
            except (TimeoutError, DeadlineExceeded):
                timeout_s = self.claim.timeout_s
                await self._finish(
                    RUN_TIMED_OUT,
                    {"timeout_s": timeout_s},
                    error_code="chain_timed_out",
                    error_message=f"The run exceeded {timeout_s} s.",
                )
                return
            except (ProviderError, RunFailure) as e:
                await self._fail(e.code, e.message)
                return
            except ChainError as e:
                await self._fail("chain_error", str(e))
                return
            except Exception:
                logger.exception("run %s: unexpected error", self.run_id)
                await self._fail("internal_error", "The run failed on an unexpected server error.")
                return
            shown: Any = output
            if self.claim.kind != ChainKind.AGENTS:  # any JSON value, kept as its JSON text
                try:
                    shown = storable(output)
                except ValueError as e:
                    await self._fail("output_invalid", f"The chain's output is {e}")
                    return
                output = json.dumps(shown, ensure_ascii=False)
            elif self.claim.output_schema is not None:
                try:
                    shown = output_parse(schema=self.claim.output_schema, text=output)
                except ValueError as e:
                    await self._fail("output_invalid", str(e))
                    return
            await self._finish(
                RUN_COMPLETED,
                {"output": shown, "usage": self.usage(), "cost": str(self.cost)},
                output=output,
            )
        except asyncio.CancelledError:
            if self.stop is None or self.stop.kind != "lost":
                raise

    async def _stopped(self) -> None:
        assert self.stop is not None
        if self.stop.kind == "cancel":
            await self._finish(RUN_CANCELLED, {"reason": self.stop.reason or "api"})
        elif self.stop.kind == "hand_back":
            await self.executor.writer.hand_back(self)
        # lost: another execution or the keeper owns the run now; write nothing

    # --- Steps: what is done is not done again ----------------------------------------------

    def step_record(
        self,
        key: str,
        data: dict[str, Any],
        event: str,
        event_data: dict[str, Any],
        *,
        usage: Usage | None = None,
        model: str = "",
        cost: Decimal | None = None,
        **fields: Any,
    ) -> None:
        """Record a finished step with its event, in the same transaction: a later execution of
        the run finds it in `steps` and does not do it again. Its usage counts here, once, at
        `model`'s prices (or at `cost`, for a step whose calls went to several models)."""
        if usage is None:
            cost = Decimal(0)
        else:
            cost = model_cost(model, usage) if cost is None else cost
            self.input_tokens += usage.input_tokens
            self.output_tokens += usage.output_tokens
            self.cost += cost
            fields.update(
                input_tokens=self.input_tokens, output_tokens=self.output_tokens, cost=self.cost
            )
        self.steps[key] = data
        self.executor.writer.add(
            self,
            event,
            event_data,
            fields,
            step=(key, self.claim.attempt, data, usage or Usage(0, 0), cost),
        )

    def resumed(self, index: int) -> None:
        """Before the first step this execution does itself, on a run an earlier execution had
        started: `run.resumed` tells readers that what followed the last finished step is void."""
        if self.resuming:
            self.resuming = False
            self.emit(
                RUN_RESUMED,
                {"index": index, "attempt": self.claim.attempt, "steps": len(self.steps)},
            )

    async def wait_for_input(
        self,
        key: str,
        *,
        kind: str,
        prompt: str,
        agent: str | None = None,
        schema: dict | None = None,
        index: int = 0,
        **shown: Any,
    ) -> dict[str, Any]:
        """A person's answer to the step `key` of the run: {"approve": bool} for kind
        "approval", {"input": {...}} (valid against `schema`) for kind "input", both with
        "request_id" and "by" (who answered). A recorded answer is returned at once (the run is
        replaying); otherwise the run stops here to wait: `run.input_required` {request_id,
        kind, agent, prompt, schema?, **shown, expires_at} and status `input_required` are
        written under the claim, and InputWait goes up through the chain's code, ending the
        execution. Once answered, the run is queued again and an execution (on any executor)
        replays it to here, where the answer is recorded. `shown` goes into the request as it
        is (`tool`, `call_id`, `arguments` of a tool approval). `index`: the agent it is asked
        before or in (for `run.resumed`)."""
        done = self.steps.get(key)
        if done is not None:
            return done
        if self.waiting is not None:
            await asyncio.shield(self.waiting)
            raise InputWait
        self.waiting = asyncio.get_running_loop().create_future()
        self.resumed(index)
        now = self.executor.now()
        expires_at = now + timedelta(
            seconds=min(self.claim.input_timeout_s, settings.INPUT_TIMEOUT_MAX_S)
        )
        request: dict[str, Any] = {
            "request_id": f"req_{uuid.uuid4().hex}",
            "kind": kind,
            "agent": agent,
            "prompt": prompt,
        }
        if schema is not None:
            request["schema"] = schema
        request.update(shown)
        request["expires_at"] = iso(expires_at)
        try:
            request = storable(request)
        except ValueError as e:
            raise RunFailure("input_request_invalid", f"The request for input is {e}") from None
        append = Append(
            self.run_id,
            [(RUN_INPUT_REQUIRED, request, now)],
            {
                "status": RunStatus.INPUT_REQUIRED,
                "worker": "",
                "current_agent": agent or "",
                "deadline_at": None,
                "heartbeat_at": now,
                "input_request": {**request, "key": key, "requested_at": iso(now)},
                "input_expires_at": expires_at,
                "input_tokens": self.input_tokens,
                "output_tokens": self.output_tokens,
                "cost": self.cost,
            },
            # Not if someone asked it to stop meanwhile: then the run is left to that.
            self.when.q() & Q(cancel_requested_at__isnull=True),
        )
        try:
            await self.executor.writer.last_write(self, append)
        finally:
            self.waiting.set_result(None)
        raise InputWait

    async def _body(self) -> Any:
        if self.claim.kind == ChainKind.AGENTS:
            return await self._file_agents()
        from runs.execution.code import code_chain_run  # the frameworks load only if used

        return await code_chain_run(self)

    async def _file_agents(self) -> str:
        outputs: dict[str, str] = {}
        answers: dict[str, Any] = {}  # the agents' asks' answers, for later prompts
        previous = ""
        for index, agent in enumerate(self.agents):
            last = index == len(self.agents) - 1
            key = f"a{index}"
            if agent.ask is not None and f"{key}/ask" in self.steps:
                answers[agent.name] = self.steps[f"{key}/ask"]["input"]
            if key not in self.steps:
                await self._agent_waits(key, index, agent, outputs, previous, answers)
                messages = agent_messages(
                    agent=agent,
                    run_input=self.claim.input,
                    outputs=outputs,
                    previous=previous,
                    answers=answers,
                )
            else:
                messages = []
            response_format = (
                output_response_format(chain_name=self.claim.chain, schema=self.claim.output_schema)
                if last and self.claim.output_schema is not None
                else None
            )
            text = await self.agent(
                key=key,
                index=index,
                agent=agent,
                messages=messages,
                response_format=response_format,
                agents_completed=index + 1,
            )
            outputs[agent.name] = previous = text
        return previous

    async def _agent_waits(
        self,
        key: str,
        index: int,
        agent: Agent,
        outputs: dict[str, str],
        previous: str,
        answers: dict[str, Any],
    ) -> None:
        """What a file agent asks a person before it runs: its approval (refused: the run
        fails input_refused) or its question (the answer goes into `answers`)."""
        wait = agent.approval or agent.ask
        if wait is None:
            return
        context = agent_context(
            run_input=self.claim.input, outputs=outputs, previous=previous, answers=answers
        )
        prompt = template_render(wait["prompt"], context)
        if agent.approval is not None:
            answer = await self.wait_for_input(
                f"{key}/approval", kind="approval", agent=agent.name, prompt=prompt, index=index
            )
            if not answer["approve"]:
                raise RunFailure(
                    "input_refused",
                    f"The approval asked before {agent.name} was refused ({answer['by']}).",
                )
        else:
            answer = await self.wait_for_input(
                f"{key}/ask",
                kind="input",
                agent=agent.name,
                prompt=prompt,
                schema=agent.ask["schema"],
                index=index,
            )
            answers[agent.name] = answer["input"]

    async def agent(
        self,
        *,
        key: str,
        index: int,
        agent: Agent,
        messages: list[dict[str, Any]],
        response_format: dict | None = None,
        **completed_fields: Any,
    ) -> str:
        """One agent to its answer: its model calls and their tool calls (the tool loop), each a
        step. The agent's answer is a step too: a finished agent is never run again."""
        done = self.steps.get(key)
        if done is not None:
            return done["output"]
        self.resumed(index)
        self.emit(AGENT_STARTED, {"agent": agent.name, "index": index}, current_agent=agent.name)
        started = time.monotonic()
        used_in = used_out = 0
        final_usage = Usage(0, 0)  # the answer's call: recorded with the agent's own step
        tools = tools_openai(agent.tools) if agent.tools else None
        by_name = {tool["name"]: tool for tool in agent.tools}
        messages = list(messages)
        with tracing.tracer().start_as_current_span(
            f"agent {agent.name}",
            kind=SpanKind.CLIENT,
            attributes={
                "agentsvc.chain": self.claim.chain,
                "agentsvc.chain_version": self.claim.version,
                "agentsvc.agent": agent.name,
                "agentsvc.agent_index": index,
                "gen_ai.system": agent.provider,
                "gen_ai.request.model": agent.model,
            },
        ) as span:
            for r in range(agent.max_tool_rounds + 1):
                round_key = f"{key}/m{r}"
                call = self.steps.get(round_key)
                if call is None:
                    call, usage = await self._model_call(
                        agent, index, messages, response_format, tools
                    )
                    if call["tool_calls"]:
                        self._tool_round(round_key, agent, index, call, usage)
                    else:
                        final_usage = usage
                used_in += call["usage"][0]
                used_out += call["usage"][1]
                if not call["tool_calls"]:
                    break
                if r == agent.max_tool_rounds:
                    raise RunFailure(
                        "tool_rounds_exceeded",
                        f"{agent.name} asked for tools after {agent.max_tool_rounds} rounds of "
                        "tool calls (max_tool_rounds).",
                    )
                messages.append(
                    {
                        "role": "assistant",
                        "content": call["text"] or None,
                        "tool_calls": [
                            {
                                "id": c["id"],
                                "type": "function",
                                "function": {"name": c["name"], "arguments": c["arguments"]},
                            }
                            for c in call["tool_calls"]
                        ],
                    }
                )
                refused = await self._tool_approvals(round_key, agent, index, by_name, call)
                results = await asyncio.gather(
                    *(
                        self._tool(f"{round_key}/t{j}", agent, index, by_name, c, refused.get(j))
                        for j, c in enumerate(call["tool_calls"])
                    )
                )
                for c, result in zip(call["tool_calls"], results, strict=True):
                    messages.append({"role": "tool", "tool_call_id": c["id"], "content": result})
                await self.executor.writer.backpressure()
            span.set_attribute("gen_ai.usage.input_tokens", used_in)
            span.set_attribute("gen_ai.usage.output_tokens", used_out)
        text = call["text"]
        self.step_record(
            key,
            {"output": text},
            AGENT_COMPLETED,
            {
                "agent": agent.name,
                "index": index,
                "duration_ms": int((time.monotonic() - started) * 1000),
                "usage": {
                    "input_tokens": used_in,
                    "output_tokens": used_out,
                    "total_tokens": used_in + used_out,
                },
            },
            usage=final_usage,
            model=agent.model,
            **completed_fields,
        )
        await self.executor.writer.backpressure()
        return text

    async def _model_call(
        self,
        agent: Agent,
        index: int,
        messages: list[dict[str, Any]],
        response_format: dict | None,
        tools: list[dict] | None,
    ) -> tuple[dict[str, Any], Usage]:
        """One model call, its text streamed as `agent.output`: what it answered, and its usage."""
        provider = provider_for(agent.provider, agent.base_url)
        coalesce_s = settings.STREAM_COALESCE_MS / 1000
        parts: list[str] = []
        pending: list[str] = []
        calls: tuple[dict[str, str], ...] = ()
        last_flush = time.monotonic()
        usage = Usage(0, 0)
        stream = provider.stream(
            client=self.http,
            model=agent.model,
            messages=messages,
            max_tokens=agent.max_tokens,
            temperature=agent.temperature,
            deadline=self.deadline,
            response_format=response_format,
            tools=tools,
        )
        try:
            async for item in stream:
                if isinstance(item, Usage):
                    usage = item
                    continue
                if isinstance(item, ToolCalls):  # the model's own text: kept as the database can
                    calls = tuple({k: text_storable(v) for k, v in c.items()} for c in item.calls)
                    continue
                item = text_storable(item)
                parts.append(item)
                pending.append(item)
                now = time.monotonic()
                if now - last_flush >= coalesce_s:
                    chunk = "".join(pending)
                    self.emit(AGENT_OUTPUT, {"agent": agent.name, "index": index, "chunk": chunk})
                    pending.clear()
                    last_flush = now
                    await self.executor.writer.backpressure()
        finally:
            await stream.aclose()  # closes the HTTP response when we stop early
        if pending:
            chunk = "".join(pending)
            self.emit(AGENT_OUTPUT, {"agent": agent.name, "index": index, "chunk": chunk})
        call = {
            "text": "".join(parts),
            "tool_calls": list(calls),
            "usage": [usage.input_tokens, usage.output_tokens],
        }
        return call, usage

    def _tool_round(
        self, key: str, agent: Agent, index: int, call: dict[str, Any], usage: Usage
    ) -> None:
        """A model call that asked for tools, recorded with its `agent.tool_call` events."""
        events = [
            {
                "agent": agent.name,
                "index": index,
                "call_id": c["id"],
                "tool": c["name"],
                "arguments": arguments_shown(c["arguments"]),
            }
            for c in call["tool_calls"]
        ]
        self.step_record(key, call, AGENT_TOOL_CALL, events[0], usage=usage, model=agent.model)
        for data in events[1:]:
            self.emit(AGENT_TOOL_CALL, data)

    async def _tool_approvals(
        self, round_key: str, agent: Agent, index: int, by_name: dict[str, dict], call: dict
    ) -> dict[int, str]:
        """Before a round's tools run: a person approves each call of a tool that needs it,
        one request at a time, in the round's order. The calls refused, and by whom."""
        refused: dict[int, str] = {}
        for j, c in enumerate(call["tool_calls"]):
            tool = by_name.get(c["name"])
            key = f"{round_key}/t{j}"
            if tool is None or not tool.get("needs_approval") or key in self.steps:
                continue
            answer = await self.wait_for_input(
                f"{key}/approval",
                kind="approval",
                agent=agent.name,
                prompt=f"{agent.name} asks to call {c['name']}.",
                index=index,
                tool=c["name"],
                call_id=c["id"],
                arguments=arguments_shown(c["arguments"]),
            )
            if not answer["approve"]:
                refused[j] = answer["by"]
        return refused

    async def _tool(
        self,
        key: str,
        agent: Agent,
        index: int,
        by_name: dict[str, dict],
        call: dict[str, str],
        refused_by: str | None = None,
    ) -> str:
        """One tool call, recorded with its `agent.tool_result`: its output, or the error the
        model reads instead (a tool that raises, times out or does not exist, or a call a
        person refused)."""
        done = self.steps.get(key)
        if done is None:
            tool = by_name.get(call["name"])
            try:
                if refused_by is not None:
                    raise ToolError("call_refused", f"A person refused this call ({refused_by}).")
                if tool is None:
                    raise ToolError("tool_unknown", f"There is no tool named {call['name']!r}.")
                done = {
                    "output": await tool_call(
                        tool=tool, arguments=call["arguments"], timeout_s=agent.tool_timeout_s
                    )
                }
            except ToolError as e:
                done = {"error": {"code": e.code, "message": text_storable(e.message)}}
            self.step_record(
                key,
                done,
                AGENT_TOOL_RESULT,
                {
                    "agent": agent.name,
                    "index": index,
                    "call_id": call["id"],
                    "tool": call["name"],
                    **done,
                },
            )
        if "error" in done:
            return json.dumps({"error": done["error"]})
        return done["output"]

    def append(self, events: list, fields: dict[str, Any]) -> Append:
        return Append(self.run_id, events, fields, self.when)


class InputWait(BaseException):
    """The run has stopped to wait for a person: raised up through the chain's code to end the
    execution. Not an Exception, so a chain's `except Exception` lets it through."""


class ChainError(Exception):
    """A code chain's own code raised: the run fails `chain_error` with what it raised."""


class RunFailure(Exception):
    """The run fails with this code and message (the chain went past one of its bounds)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def storable(value: Any) -> Any:
    """`value` as the database's JSON holds it (no NaN or infinity, no NUL, keys as text), or
    ValueError saying what is not: events and steps are written as they are given, and one
    value PostgreSQL refuses would fail the flush of every run in it."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"not JSON: {e}") from None
    try:
        return strict_loads(text.encode())
    except BodyError as e:
        raise ValueError(str(e.detail)) from None


def text_storable(text: str) -> str:
    """Model or tool text without the one character a database text cannot hold (NUL)."""
    return text.replace("\x00", "") if "\x00" in text else text


def arguments_shown(arguments: str) -> Any:
    """A tool call's arguments in its event: the JSON object the model wrote, or its text when
    it is not one (the tool's result then says why)."""
    try:
        value = strict_loads(arguments.encode()) if arguments else {}
    except BodyError:
        return text_storable(arguments)
    return value if isinstance(value, dict) else text_storable(arguments)
