"""Executes one run: claim it, run its agents in order, stream their output into events."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from datetime import timedelta
from decimal import Decimal

from django.conf import settings
from django.db import InterfaceError, OperationalError, connection
from django.db.models import Q
from django.utils import timezone

from runs.chains import agent_messages
from runs.models import Agent, Run, RunStatus
from runs.providers import DeadlineExceeded, ProviderError, Usage, provider_for
from runs.services import event_append

logger = logging.getLogger(__name__)

MILLION = Decimal(1_000_000)


class _Stop(Exception):
    """The run was cancelled, or is no longer ours to run."""


def model_cost(model: str, usage: Usage) -> Decimal:
    price_in, price_out = settings.MODEL_PRICES.get(model, (Decimal(0), Decimal(0)))
    cost = (usage.input_tokens * price_in + usage.output_tokens * price_out) / MILLION
    return cost.quantize(Decimal("0.000001"))


class _Heartbeat(threading.Thread):
    """Keeps heartbeat_at fresh while the run waits on a model that says nothing (retries,
    a long prompt), so the keeper takes the run as lost only when this process is gone."""

    def __init__(self, run_id, claim: str) -> None:
        super().__init__(daemon=True, name=f"heartbeat-{run_id}")
        self.run_id = run_id
        self.claim = claim
        self.stopped = threading.Event()

    def run(self) -> None:
        try:
            while not self.stopped.wait(settings.HEARTBEAT_S):
                try:
                    Run.objects.filter(
                        pk=self.run_id, status=RunStatus.RUNNING, worker=self.claim
                    ).update(heartbeat_at=timezone.now())
                except (OperationalError, InterfaceError) as e:
                    # A database blip: the next beat tries again, so a run that outlives the
                    # blip is not taken for lost while it waits on a silent model.
                    logger.warning("run %s: heartbeat failed (%s)", self.run_id, e)
        except Exception:
            logger.exception("run %s: heartbeat failed", self.run_id)
        finally:
            connection.close()

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=5)


class RunExecution:
    def __init__(self, run: Run, agents: list[Agent], claim: str) -> None:
        self.run = run
        self.agents = agents
        self.claim = claim
        self.started = time.monotonic()
        self.deadline = self.started + run.chain.timeout_s
        self.input_tokens = 0
        self.output_tokens = 0
        self.cost = Decimal(0)

    def _mine(self) -> Q:
        """Still running, still ours, and nobody asked to cancel."""
        return Q(status=RunStatus.RUNNING, worker=self.claim, cancel_requested_at__isnull=True)

    def _emit(self, event: str, data: dict, **fields) -> None:
        if (
            event_append(
                run_id=self.run.id,
                event=event,
                data=data,
                when=self._mine(),
                heartbeat_at=timezone.now(),
                **fields,
            )
            is None
        ):
            raise _Stop()

    def _finish(self, status: str, event: str, data: dict, **fields) -> None:
        now = timezone.now()
        duration_ms = int((time.monotonic() - self.started) * 1000)
        if event in ("run.completed", "run.failed"):
            data = {**data, "duration_ms": duration_ms}
        event_append(
            run_id=self.run.id,
            event=event,
            data=data,
            now=now,
            when=Q(status=RunStatus.RUNNING, worker=self.claim),
            status=status,
            finished_at=now,
            heartbeat_at=now,
            current_agent="",
            input_tokens=self.input_tokens,
            output_tokens=self.output_tokens,
            cost=self.cost,
            **fields,
        )

    def execute(self) -> None:
        beat = _Heartbeat(self.run.id, self.claim)
        beat.start()
        try:
            self._execute()
        finally:
            beat.stop()

    def _execute(self) -> None:
        try:
            output = self._agents()
        except _Stop:
            run = Run.objects.only("status", "worker", "cancel_reason").get(pk=self.run.id)
            if run.status == RunStatus.RUNNING and run.worker == self.claim:
                reason = run.cancel_reason or "api"
                self._finish(RunStatus.CANCELLED, "run.cancelled", {"reason": reason})
            return
        except DeadlineExceeded:
            self._finish(
                RunStatus.TIMED_OUT,
                "run.timed_out",
                {"timeout_s": self.run.chain.timeout_s},
                error_code="chain_timed_out",
                error_message=f"The run exceeded {self.run.chain.timeout_s} s.",
            )
            return
        except ProviderError as e:
            self._fail(e.code, e.message)
            return
        except (OperationalError, InterfaceError) as e:
            # The database went away under this execution. Failing the run would need the
            # database too, and would throw away a run the model was serving well: stop here
            # instead, as a dead worker would. The heartbeat stops with us, so the keeper finds
            # the run stale and runs it again (or fails it `worker_lost` on its retry).
            logger.warning("run %s: database unreachable, left to the keeper (%s)", self.run.id, e)
            return
        except Exception:
            logger.exception("run %s: unexpected error", self.run.id)
            self._fail("internal_error", "The run failed on an unexpected server error.")
            return
        usage = self._usage()
        self._finish(
            RunStatus.COMPLETED,
            "run.completed",
            {"output": output, "usage": usage, "cost": str(self.cost)},
            output=output,
        )

    def _fail(self, code: str, message: str) -> None:
        self._finish(
            RunStatus.FAILED,
            "run.failed",
            {"error": {"code": code, "message": message}},
            error_code=code,
            error_message=message,
        )

    def _usage(self) -> dict[str, int]:
        return {
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "total_tokens": self.input_tokens + self.output_tokens,
        }

    def _agents(self) -> str:
        outputs: dict[str, str] = {}
        previous = ""
        for index, agent in enumerate(self.agents):
            if time.monotonic() >= self.deadline:
                raise DeadlineExceeded()
            self._emit(
                "agent.started", {"agent": agent.name, "index": index}, current_agent=agent.name
            )
            agent_started = time.monotonic()
            text, usage = self._stream_agent(agent, index, outputs, previous)
            cost = model_cost(agent.model, usage)
            self.input_tokens += usage.input_tokens
            self.output_tokens += usage.output_tokens
            self.cost += cost
            outputs[agent.name] = previous = text
            self._emit(
                "agent.completed",
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
        return previous

    def _stream_agent(
        self, agent: Agent, index: int, outputs: dict[str, str], previous: str
    ) -> tuple[str, Usage]:
        provider = provider_for(agent.provider, agent.base_url)
        messages = agent_messages(
            agent=agent, run_input=self.run.input, outputs=outputs, previous=previous
        )
        coalesce_s = settings.STREAM_COALESCE_MS / 1000
        parts: list[str] = []
        pending: list[str] = []
        last_flush = time.monotonic()
        usage = Usage(0, 0)
        stream = provider.stream(
            model=agent.model,
            messages=messages,
            max_tokens=agent.max_tokens,
            temperature=agent.temperature,
            deadline=self.deadline,
        )
        try:
            for item in stream:
                if isinstance(item, Usage):
                    usage = item
                    continue
                parts.append(item)
                pending.append(item)
                now = time.monotonic()
                if now - last_flush >= coalesce_s:
                    self._emit(
                        "agent.output",
                        {"agent": agent.name, "index": index, "chunk": "".join(pending)},
                    )
                    pending.clear()
                    last_flush = now
        finally:
            stream.close()  # closes the HTTP response when we stop early
        if pending:
            self._emit(
                "agent.output", {"agent": agent.name, "index": index, "chunk": "".join(pending)}
            )
        return "".join(parts), usage


def run_execute(*, run_id: str) -> None:
    """Claim a queued run (exactly one worker wins) and execute it."""
    claim = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    try:
        run = Run.objects.select_related("chain").get(pk=run_id)
    except Run.DoesNotExist:
        logger.warning("run %s: not found", run_id)
        return
    agents = list(run.chain.agents.order_by("position"))
    now = timezone.now()
    seq = event_append(
        run_id=run.id,
        event="run.started",
        data={"agents_total": len(agents)},
        now=now,
        when=Q(status=RunStatus.QUEUED),
        status=RunStatus.RUNNING,
        worker=claim,
        started_at=now,
        heartbeat_at=now,
        deadline_at=now + timedelta(seconds=run.chain.timeout_s),
    )
    if seq is None:
        return  # cancelled while queued, or another worker has it
    RunExecution(run, agents, claim).execute()
