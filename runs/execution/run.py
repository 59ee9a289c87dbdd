"""One run's execution inside an executor: its agents in order, each streaming from its model,
output coalesced into `agent.output` events. A coroutine: it waits on the model, never holding
a thread or a database connection; its events go to the executor's group commit."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import httpx
from django.conf import settings
from opentelemetry.trace import NonRecordingSpan, Span, SpanKind, Status, StatusCode

from agentsvc import tracing
from runs.chains import agent_messages, output_parse, output_response_format
from runs.events import (
    AGENT_COMPLETED,
    AGENT_OUTPUT,
    AGENT_STARTED,
    RUN_CANCELLED,
    RUN_COMPLETED,
    RUN_FAILED,
    RUN_TIMED_OUT,
    STATUS_OF,
)
from runs.execution.claims import Claimed, claim_condition
from runs.execution.providers import DeadlineExceeded, ProviderError, Usage, provider_for
from runs.models import Agent
from runs.services import Append

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
        self.input_tokens = 0
        self.output_tokens = 0
        self.cost = Decimal(0)
        self.stop: Stop | None = None
        self.task: asyncio.Task | None = None
        self.http: httpx.AsyncClient  # the executor's model connections this run uses
        self.span: Span = NonRecordingSpan(None)  # the execution's span (tracing on)

    # --- Events ---------------------------------------------------------------------------

    def _emit(self, event: str, data: dict[str, Any], **fields: Any) -> None:
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
                    output = await self._agents()
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
            except ProviderError as e:
                await self._fail(e.code, e.message)
                return
            except Exception:
                logger.exception("run %s: unexpected error", self.run_id)
                await self._fail("internal_error", "The run failed on an unexpected server error.")
                return
            shown: Any = output
            if self.claim.output_schema is not None:
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

    async def _agents(self) -> str:
        outputs: dict[str, str] = {}
        previous = ""
        for index, agent in enumerate(self.agents):
            self._emit(
                AGENT_STARTED, {"agent": agent.name, "index": index}, current_agent=agent.name
            )
            agent_started = time.monotonic()
            last = index == len(self.agents) - 1
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
                text, usage = await self._stream_agent(agent, index, outputs, previous, last=last)
                span.set_attribute("gen_ai.usage.input_tokens", usage.input_tokens)
                span.set_attribute("gen_ai.usage.output_tokens", usage.output_tokens)
            self.input_tokens += usage.input_tokens
            self.output_tokens += usage.output_tokens
            self.cost += model_cost(agent.model, usage)
            outputs[agent.name] = previous = text
            self._emit(
                AGENT_COMPLETED,
                {
                    "agent": agent.name,
                    "index": index,
                    "duration_ms": int((time.monotonic() - agent_started) * 1000),
                    "usage": {
                        "input_tokens": usage.input_tokens,
                        "output_tokens": usage.output_tokens,
                        "total_tokens": usage.input_tokens + usage.output_tokens,
                    },
                },
                agents_completed=index + 1,
                input_tokens=self.input_tokens,
                output_tokens=self.output_tokens,
                cost=self.cost,
            )
            await self.executor.writer.backpressure()
        return previous

    async def _stream_agent(
        self, agent: Agent, index: int, outputs: dict[str, str], previous: str, *, last: bool
    ) -> tuple[str, Usage]:
        provider = provider_for(agent.provider, agent.base_url)
        messages = agent_messages(
            agent=agent, run_input=self.claim.input, outputs=outputs, previous=previous
        )
        coalesce_s = settings.STREAM_COALESCE_MS / 1000
        parts: list[str] = []
        pending: list[str] = []
        last_flush = time.monotonic()
        usage = Usage(0, 0)
        stream = provider.stream(
            client=self.http,
            model=agent.model,
            messages=messages,
            max_tokens=agent.max_tokens,
            temperature=agent.temperature,
            deadline=self.deadline,
            response_format=(
                output_response_format(chain_name=self.claim.chain, schema=self.claim.output_schema)
                if last and self.claim.output_schema is not None
                else None
            ),
        )
        try:
            async for item in stream:
                if isinstance(item, Usage):
                    usage = item
                    continue
                parts.append(item)
                pending.append(item)
                now = time.monotonic()
                if now - last_flush >= coalesce_s:
                    chunk = "".join(pending)
                    self._emit(AGENT_OUTPUT, {"agent": agent.name, "index": index, "chunk": chunk})
                    pending.clear()
                    last_flush = now
                    await self.executor.writer.backpressure()
        finally:
            await stream.aclose()  # closes the HTTP response when we stop early
        if pending:
            chunk = "".join(pending)
            self._emit(AGENT_OUTPUT, {"agent": agent.name, "index": index, "chunk": chunk})
        return "".join(parts), usage

    def append(self, events: list, fields: dict[str, Any]) -> Append:
        return Append(self.run_id, events, fields, self.when)
