"""The MCP server (`mcp`'s low-level Server): every published chain a tool. `tools/call`
starts a run through `interop.calls` (the REST API's steps) and answers its output, sending
progress per agent and the agents' tokens as log messages from the run's durable event log;
a call the client cancels (it closes the response stream) cancels its run."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import warnings
from typing import Any

import mcp_types as types
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel import Server
from mcp.shared.exceptions import MCPDeprecationWarning, MCPError
from rest_framework.exceptions import ValidationError

from agentsvc.db import db_async
from agentsvc.errors import ApplicationError
from interop import calls
from interop.a2a.cards import service_version
from runs import events as ev
from runs import selectors
from runs.api import create_body
from runs.models import Chain, Run, RunStatus
from runs.presenters import run_output
from runs.stream_limits import stream_lease
from runs.streams import follow_run

logger = logging.getLogger(__name__)

# Token chunks go out as log messages (notifications/message), a capability the 2026-07-28
# revision deprecates (SEP-2577); the SDK warns on every use. Only clients that opt in get them.
warnings.filterwarnings("ignore", category=MCPDeprecationWarning, module=__name__)

LOGGER = "agentsvc.run"
META = "agentsvc/"  # the prefix of this server's _meta keys
PAGE = 100
# Events sent as log messages: what an agent says and does, and a code chain's progress.
LOGGED = frozenset({ev.AGENT_OUTPUT, ev.AGENT_TOOL_CALL, ev.AGENT_TOOL_RESULT, ev.RUN_PROGRESS})


def _caller(ctx: ServerRequestContext) -> calls.Caller:
    return ctx.request.scope["agentsvc.caller"]


def chain_tool(chain: Chain) -> types.Tool:
    """A chain as a tool: its input schema; its output schema when it has one."""
    return types.Tool(
        name=chain.name,
        description=chain.description or f"The chain {chain.name}, version {chain.version}.",
        input_schema=chain.input_schema or {"type": "object"},
        output_schema=chain.output_schema,
        meta={f"{META}version": chain.version, f"{META}kind": chain.kind},
    )


async def list_tools(
    ctx: ServerRequestContext, params: types.PaginatedRequestParams | None
) -> types.ListToolsResult:
    try:
        chains, next_cursor = await db_async(selectors.chain_page)(
            cursor=params.cursor if params else None, limit=PAGE
        )
    except ApplicationError as exc:
        raise MCPError(types.INVALID_PARAMS, exc.detail, _problem(exc, ctx)) from None
    return types.ListToolsResult(tools=[chain_tool(c) for c in chains], next_cursor=next_cursor)


def _problem(exc: Exception, ctx: ServerRequestContext) -> dict:
    return calls.problem_of(exc, _caller(ctx).path).body


def _refused(exc: Exception, ctx: ServerRequestContext) -> types.CallToolResult:
    """A call the run services refuse (an input the schema rejects, a limit, backpressure): a
    tool error the model can read, with the problem+json the REST API would answer in _meta."""
    problem = calls.problem_of(exc, _caller(ctx).path)
    text = problem.detail
    for error in problem.body.get("errors", []):
        text += f"\n- {error['field']}: {error['message']}"
    return types.CallToolResult(
        content=[types.TextContent(text=text)],
        is_error=True,
        meta={f"{META}problem": problem.body},
    )


def _result(run: Run) -> types.CallToolResult:
    """An ended run as the call's result: its output (structured for a JSON object), or a
    tool error saying how it ended."""
    meta: dict[str, Any] = {f"{META}run_id": str(run.id), f"{META}status": run.status}
    if run.status != RunStatus.COMPLETED:
        if run.status == RunStatus.FAILED:
            text = f"The run failed ({run.error_code}): {run.error_message}"
            meta[f"{META}error"] = {"code": run.error_code, "message": run.error_message}
        elif run.status == RunStatus.TIMED_OUT:
            text = f"The run exceeded its chain's timeout ({run.chain.timeout_s} s)."
        else:
            text = f"The run was cancelled ({run.cancel_reason or 'api'})."
        return types.CallToolResult(
            content=[types.TextContent(text=text)], is_error=True, meta=meta
        )
    output = run_output(run)
    if isinstance(output, str):
        return types.CallToolResult(content=[types.TextContent(text=output)], meta=meta)
    return types.CallToolResult(
        content=[types.TextContent(text=json.dumps(output, ensure_ascii=False))],
        structured_content=output if isinstance(output, dict) else None,
        meta=meta,
    )


def _shown(data: dict) -> dict:
    return {k: v for k, v in data.items() if k not in ("run_id", "ts")}


async def _follow(ctx: ServerRequestContext, run: Run) -> None:
    """Progress and log messages from the run's events until it ends: progress 0 at its
    start, then the number of agents done (of agents_total, when the chain has a fixed list)."""
    total = run.agents_total or None
    async for rows in follow_run(run, run.last_seq, idle_s=30):
        for row in rows or ():
            if row.event == ev.RUN_STARTED:
                await ctx.session.report_progress(0, total, "started")
            elif row.event == ev.AGENT_COMPLETED:
                done = row.data["index"] + 1
                await ctx.session.report_progress(done, total, f"{row.data['agent']} done")
            elif row.event in LOGGED:
                data = {"event": row.event, **_shown(row.data)}
                await ctx.session.send_log_message(
                    "info", data, logger=LOGGER, related_request_id=ctx.request_id
                )


async def call_tool(
    ctx: ServerRequestContext, params: types.CallToolRequestParams
) -> types.CallToolResult:
    caller = _caller(ctx)
    try:
        chain = await calls.chain_named(caller, params.name)
    except ApplicationError:
        raise MCPError(types.INVALID_PARAMS, f"Unknown tool: {params.name[:64]}") from None
    try:
        data = dict(create_body({"input": params.arguments or {}, "metadata": {}}))
    except ValidationError as exc:
        return _refused(calls.fields_renamed(exc, {"input": "arguments"}), ctx)
    try:
        lease = await stream_lease(caller.key.pk)
    except ApplicationError as exc:
        return _refused(exc, ctx)
    try:
        try:
            run, _ = await calls.run_start(
                caller,
                chain=chain,
                data=data,
                fingerprinted=lambda: {"name": params.name, "arguments": params.arguments},
            )
        except ApplicationError as exc:
            if exc.code == "validation_error":
                exc = calls.fields_renamed(exc, {"input": "arguments"})
            return _refused(exc, ctx)
        try:
            await _follow(ctx, run)
        except asyncio.CancelledError:
            # The client cancelled the call (closed its stream): the run goes too.
            await asyncio.shield(_cancel(run))
            raise
        return _result(await calls.run_reload(run.id))
    finally:
        await asyncio.shield(lease.release())


async def _cancel(run: Run) -> None:
    try:
        with contextlib.suppress(ApplicationError):  # it ended on its own meanwhile
            await calls.run_cancel(run, "disconnect")
    except Exception:
        logger.exception("run %s: cancel on a cancelled tool call failed", run.id)


def mcp_server() -> Server:
    return Server(
        "agentsvc",
        version=service_version(),
        instructions="Each tool is an agent chain: calling it runs the chain and answers its "
        "output; progress comes per agent, the agents' text as log messages.",
        on_list_tools=list_tools,
        on_call_tool=call_tool,
    )
