"""LangGraph chains: a chain owner's compiled graph, run inside an execution.

The run's input is the graph's input state and its final state is the run's output, made JSON
(`state_json`: LangChain messages in their own dict form, `message_to_dict`). Nodes are agents:
one callback handler per run (`_Tracker`) turns what LangChain reports of the graph into the
run's events: a node of the graph starting and ending (`agent.started` / `agent.completed`,
`index` in the order nodes start in the run), its model calls' tokens (`agent.output`,
coalesced every STREAM_COALESCE_MS like a file agent's) and usage, its tools (`agent.tool_call`
/ `agent.tool_result`: a ToolNode's, or a `@tool` the node calls). A subgraph is one agent, the
node that runs it.

Resume. Checkpoints go to PostgreSQL (`AsyncPostgresSaver`, thread_id = the run's id) with
durability "sync", so a super-step is saved before the next starts, and a node that finished
has its writes saved as it ends (LangGraph's pending writes). A run retried after its executor
was lost (or handed back) continues from its last checkpoint (`astream(None)`): a node that
finished is not run again, and its model calls are not made again.

Each finished node's usage counts once. The node is a step (`g{step}/{node}`, with its usage and
cost) queued as it ends, before LangGraph has its writes; the savers write nothing of a run
before the run's queued steps are committed, so the run's log is never behind its checkpoints:
- killed before the step commits: no checkpoint has the node's writes; it runs again and counts
  then;
- killed after the step commits and before LangGraph saved its writes: it runs again, and does
  not count again (its key is in `steps`);
- killed after its writes are saved: it does not run again.

A run's checkpoints are deleted when it ends (completed, failed, cancelled, timed out), not
when its execution stops for another to resume it. On SQLite (the embedded default) they are
kept in memory (`InMemorySaver`) and dropped with the execution: a run does not resume in
another process there.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any
from uuid import UUID

import psycopg
import pydantic
from django.conf import settings
from django.db import connection
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import BaseMessage, ToolMessage, message_to_dict
from langchain_core.outputs import ChatGeneration, LLMResult
from langchain_core.runnables import ensure_config
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
from langgraph.constants import TAG_HIDDEN
from langgraph.errors import GraphBubbleUp, GraphRecursionError
from langgraph.pregel import Pregel
from psycopg.conninfo import make_conninfo
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from runs.events import (
    AGENT_COMPLETED,
    AGENT_OUTPUT,
    AGENT_STARTED,
    AGENT_TOOL_CALL,
    AGENT_TOOL_RESULT,
)
from runs.execution.providers import Usage
from runs.execution.run import RunFailure, model_cost, storable, text_storable
from runs.execution.tools import output_text

if TYPE_CHECKING:
    from runs.execution.run import Execution

logger = logging.getLogger(__name__)

RESOURCE = "langgraph"  # the executor's GraphCheckpoints, in Executor.resources
ERROR_MAX_CHARS = 1000
# Django's own OPTIONS of a PostgreSQL database, not connection parameters.
_DJANGO_OPTIONS = {"pool", "server_side_binding", "isolation_level", "assume_role"}
_set_up: set[str] = set()  # databases whose checkpoint tables this process has set up


async def graph_run(execution: Execution, graph: Pregel) -> Any:
    """Run the graph to its end, or a resumed run from its last checkpoint: its final state."""
    checkpoints = execution.executor.resources.get(RESOURCE)
    if checkpoints is None:
        checkpoints = execution.executor.resources[RESOURCE] = GraphCheckpoints()
    runnable, saver = await checkpoints.graph(graph)
    tracker = _Tracker(execution, checkpoints)
    config: Any = {"configurable": {"thread_id": tracker.thread_id}, "callbacks": [tracker]}
    begun = execution.claim.resumed and await saver.aget_tuple(config) is not None
    state: Any = None
    ended = True  # the run ends with this execution: nothing will resume from its checkpoints
    try:
        async for state in runnable.astream(  # noqa: B007 (the last one is the output)
            None if begun else execution.claim.input,
            config,
            stream_mode="values",
            durability="sync",
        ):
            pass
    except asyncio.CancelledError:
        # Cancelled or timed out, the run ends; lost or handed back, another execution resumes it.
        stop = execution.stop
        ended = (stop is not None and stop.kind == "cancel") or (
            time.monotonic() >= execution.deadline
        )
        raise
    except GraphRecursionError:
        limit = ensure_config(runnable.config)["recursion_limit"]
        raise RunFailure(
            "graph_recursion_limit",
            f"The graph did not reach its end within {limit} super-steps (its recursion_limit).",
        ) from None
    except (RunFailure, psycopg.Error):  # the latter: its checkpoints could not be written
        raise
    except Exception as e:
        raise RunFailure("chain_error", f"{type(e).__name__}: {e}"[:ERROR_MAX_CHARS]) from e
    finally:
        checkpoints.commits.pop(tracker.thread_id, None)
        if ended or not checkpoints.durable:  # in memory, nothing resumes a run in any case
            checkpoints.forget(saver, tracker.thread_id)
    if isinstance(state, dict) and "__interrupt__" in state:
        raise RunFailure(
            "graph_interrupted",
            "The graph called interrupt(): a run cannot be resumed with an answer.",
        )
    return state_json(state)


class GraphCheckpoints:
    """An executor's checkpointers, made on first use. On PostgreSQL: a pool of
    LANGGRAPH_DB_POOL_MAX connections and as many savers over it (a saver does one thing at a
    time: it holds a lock around each of its statements), which runs take in turn. On SQLite:
    one InMemorySaver. A graph gets one copy per saver, with the saver as its checkpointer; the
    owner's graph object is left as it is."""

    def __init__(self) -> None:
        self.savers: list[BaseCheckpointSaver] = []
        self.durable = False
        self.pool: AsyncConnectionPool | None = None
        self.copies: dict[int, tuple[Pregel, list[Pregel]]] = {}
        # Each run's last queued step, as the future of its commit (thread_id -> future).
        self.commits: dict[str, asyncio.Future] = {}
        self.forgetting: set[asyncio.Task] = set()  # checkpoints of ended runs being deleted
        self._lock = asyncio.Lock()
        self._turn = 0

    async def graph(self, graph: Pregel) -> tuple[Pregel, BaseCheckpointSaver]:
        if not self.savers:
            async with self._lock:
                if not self.savers:
                    await self._open()
        entry = self.copies.get(id(graph))
        if entry is None or entry[0] is not graph:
            copies = [graph.copy(update={"checkpointer": saver}) for saver in self.savers]
            entry = self.copies[id(graph)] = (graph, copies)
        self._turn = (self._turn + 1) % len(self.savers)
        return entry[1][self._turn], self.savers[self._turn]

    async def _open(self) -> None:
        if connection.vendor != "postgresql":
            self.savers = [InMemorySaver()]
            return
        size = settings.LANGGRAPH_DB_POOL_MAX
        pool = AsyncConnectionPool(
            _conninfo(),
            min_size=1,
            max_size=size,
            # What AsyncPostgresSaver needs of its connections; no prepared statements (they
            # cost the loop more than they save the server here, and poolers refuse them).
            kwargs={"autocommit": True, "prepare_threshold": None, "row_factory": dict_row},
            configure=_no_commit_wait,
            name="langgraph-checkpoints",
            open=False,
        )
        await pool.open(wait=True)
        try:
            savers = [_DurableSaver(pool, self.commits) for _ in range(size)]
            if pool.conninfo not in _set_up:
                await savers[0].setup()  # creates or migrates the checkpoint tables
                _set_up.add(pool.conninfo)
        except BaseException:
            await pool.close()
            raise
        self.pool, self.durable, self.savers = pool, True, savers

    def forget(self, saver: BaseCheckpointSaver, thread_id: str) -> None:
        """Delete the checkpoints of a run that ended, in the background (its end does not
        wait; killed before, they stay)."""
        if not self.durable:
            saver.delete_thread(thread_id)
            return
        task = asyncio.get_running_loop().create_task(saver.adelete_thread(thread_id))
        self.forgetting.add(task)
        task.add_done_callback(self._forgotten)

    def _forgotten(self, task: asyncio.Task) -> None:
        self.forgetting.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.warning("checkpoints of a run not deleted: %s", task.exception())

    async def aclose(self) -> None:
        await asyncio.gather(*self.forgetting, return_exceptions=True)
        if self.pool is not None:
            await self.pool.close()


class _DurableSaver(AsyncPostgresSaver):
    """Writes nothing of a run (checkpoint or pending writes) before the run's queued steps are
    committed: what LangGraph will not run again has its usage in the run's log first."""

    def __init__(self, pool: AsyncConnectionPool, commits: dict[str, asyncio.Future]) -> None:
        super().__init__(pool)
        self.commits = commits

    async def _steps_committed(self, config: Any) -> None:
        future = self.commits.get(config["configurable"]["thread_id"])
        if future is not None and await asyncio.shield(future) is None:
            raise asyncio.CancelledError  # the run is no longer this execution's: write nothing

    async def aput(self, config, checkpoint, metadata, new_versions):  # type: ignore[override]
        await self._steps_committed(config)
        return await super().aput(config, checkpoint, metadata, new_versions)

    async def aput_writes(self, config, writes, task_id, task_path=""):  # type: ignore[override]
        await self._steps_committed(config)
        await super().aput_writes(config, writes, task_id, task_path)


async def _no_commit_wait(conn: psycopg.AsyncConnection) -> None:
    """A checkpoint's commit does not wait for its WAL flush, which is most of a write's time
    (a saver made about 300 writes a second waiting for it, 3,000 without), and every run waits
    for its checkpoint at each super-step. A database crash may lose the last checkpoints,
    never a step of the run's log that one of them depends on: the log commits synchronously,
    and before them, so its flush covers what came earlier. A run resumed from an older
    checkpoint does some nodes again, and counts them once (their keys are in `steps`)."""
    await conn.execute("SET synchronous_commit = off")


def _conninfo() -> str:
    db = settings.DATABASES["default"]
    params = {
        "dbname": db.get("NAME"),
        "user": db.get("USER"),
        "password": db.get("PASSWORD"),
        "host": db.get("HOST"),
        "port": db.get("PORT"),
        **{k: v for k, v in db.get("OPTIONS", {}).items() if k not in _DJANGO_OPTIONS},
    }
    return make_conninfo("", **{k: v for k, v in params.items() if v not in (None, "")})


# --- What the graph does, as the run's events and steps --------------------------------------


@dataclass
class _Node:
    """A node of the graph running in this execution: one agent."""

    name: str
    index: int
    key: str  # its step
    ns: str  # its task's checkpoint namespace, "name:task_id"
    started: float
    usage: dict[str, list[int]] = field(default_factory=dict)  # model -> [input, output]
    pending: list[str] = field(default_factory=list)  # tokens not yet in an agent.output
    flushed: float = 0.0


class _Tracker(BaseCallbackHandler):
    """LangChain's callbacks of one run's graph, as the run's events and steps.

    It runs inline, where LangChain reports (the graph's coroutines, or the thread of a sync
    node or tool); what comes from another thread is handed to the event loop, in order."""

    run_inline = True
    raise_error = True

    def __init__(self, execution: Execution, checkpoints: GraphCheckpoints) -> None:
        self.execution = execution
        self.checkpoints = checkpoints
        self.thread_id = str(execution.run_id)
        self.loop = asyncio.get_running_loop()
        self.loop_thread = threading.get_ident()
        self.coalesce_s = settings.STREAM_COALESCE_MS / 1000
        self.root: UUID | None = None  # the graph's own run
        self.nodes: dict[UUID, _Node] = {}  # a node's run -> the node
        self.tasks: dict[str, _Node] = {}  # a task's checkpoint namespace -> its node
        self.calls: dict[UUID, tuple[_Node, str]] = {}  # a model call -> its node and model
        self.tools: dict[UUID, tuple[_Node, str, str]] = {}  # a tool run -> node, call id, name
        done = list(execution.steps.values())  # nodes an earlier execution finished
        self.next_index = 1 + max((d["index"] for d in done), default=-1)
        self.completed = len(done)

    # LangChain streams a model called with ainvoke/invoke to a handler with these two methods
    # (a runtime-checked protocol), so a node's tokens arrive as they are made.
    def tap_output_aiter(self, run_id: UUID, output: Any) -> Any:
        return output

    def tap_output_iter(self, run_id: UUID, output: Any) -> Any:
        return output

    def _soon(self, fn: Callable[..., None], *args: Any) -> None:
        if threading.get_ident() == self.loop_thread:
            fn(*args)
        else:
            self.loop.call_soon_threadsafe(fn, *args)

    def _node_of(self, metadata: dict[str, Any] | None) -> _Node | None:
        """The node that a model call or tool runs in (inside a subgraph: the parent's node)."""
        ns = (metadata or {}).get("langgraph_checkpoint_ns")
        return self.tasks.get(ns.split("|", 1)[0]) if ns else None

    # --- Nodes ----------------------------------------------------------------------------

    def on_chain_start(
        self,
        serialized: Any,
        inputs: Any,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if self.root is None and parent_run_id is None:
            self.root = run_id
        elif (
            parent_run_id == self.root
            and metadata
            and kwargs.get("name") == metadata.get("langgraph_node")
            and TAG_HIDDEN not in (tags or ())
        ):
            self._soon(self._node_start, run_id, metadata)

    def _node_start(self, run_id: UUID, metadata: dict[str, Any]) -> None:
        ns = metadata["langgraph_checkpoint_ns"]
        node = self.tasks.get(ns)
        if node is None:
            name = metadata["langgraph_node"]
            key = _step_key(metadata)
            done = self.execution.steps.get(key)
            if done is not None:  # finished, but its writes were not saved: it runs again
                index = done["index"]
            else:
                index = self.next_index
                self.next_index += 1
            node = _Node(name=name, index=index, key=key, ns=ns, started=time.monotonic())
            self.tasks[ns] = node
            self.execution.resumed(index)
            self.execution.emit(AGENT_STARTED, {"agent": name, "index": index}, current_agent=name)
        # else: the same task again (its retry policy), the same agent
        self.nodes[run_id] = node

    def on_chain_end(self, outputs: Any, *, run_id: UUID, **kwargs: Any) -> None:
        self._soon(self._node_end, run_id)

    def on_chain_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self._soon(self._node_failed, run_id)

    def _node_end(self, run_id: UUID) -> None:
        node = self.nodes.pop(run_id, None)
        if node is None:
            return
        del self.tasks[node.ns]
        self._flush(node)
        used_in = sum(u[0] for u in node.usage.values())
        used_out = sum(u[1] for u in node.usage.values())
        data = {
            "agent": node.name,
            "index": node.index,
            "duration_ms": int((time.monotonic() - node.started) * 1000),
            "usage": {
                "input_tokens": used_in,
                "output_tokens": used_out,
                "total_tokens": used_in + used_out,
            },
        }
        execution = self.execution
        if node.key in execution.steps:  # counted by the execution that recorded it
            execution.emit(AGENT_COMPLETED, data)
            return
        self.completed += 1
        execution.step_record(
            node.key,
            {"agent": node.name, "index": node.index},
            AGENT_COMPLETED,
            data,
            usage=Usage(used_in, used_out),
            cost=sum((model_cost(model, Usage(*u)) for model, u in node.usage.items()), Decimal(0)),
            agents_completed=self.completed,
        )
        if self.checkpoints.durable:
            commit = execution.executor.writer.committed(execution.run_id)
            self.checkpoints.commits[self.thread_id] = commit

    def _node_failed(self, run_id: UUID) -> None:
        node = self.nodes.pop(run_id, None)
        if node is not None:
            self._flush(node)

    # --- Model calls ----------------------------------------------------------------------

    def on_chat_model_start(
        self,
        serialized: Any,
        messages: Any,
        *,
        run_id: UUID,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self._soon(self._call_start, run_id, metadata, kwargs.get("invocation_params"))

    def on_llm_start(
        self,
        serialized: Any,
        prompts: Any,
        *,
        run_id: UUID,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self._soon(self._call_start, run_id, metadata, kwargs.get("invocation_params"))

    def _call_start(self, run_id: UUID, metadata: dict | None, params: dict | None) -> None:
        node = self._node_of(metadata)
        if node is not None:
            # The model the chain asked for (what MODEL_PRICES knows), else the answer's.
            model = (metadata or {}).get("ls_model_name") or (params or {}).get("model") or ""
            self.calls[run_id] = (node, str(model))

    def on_llm_new_token(self, token: str, *, run_id: UUID, **kwargs: Any) -> None:
        if token:
            self._soon(self._token, run_id, token)

    def _token(self, run_id: UUID, token: str) -> None:
        call = self.calls.get(run_id)
        if call is None:
            return
        node = call[0]
        node.pending.append(token)
        now = time.monotonic()
        if now - node.flushed >= self.coalesce_s:
            self._flush(node, now)

    def on_llm_end(self, response: LLMResult, *, run_id: UUID, **kwargs: Any) -> None:
        self._soon(self._call_end, run_id, response)

    def on_llm_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self._soon(self._call_end, run_id, None)

    def _call_end(self, run_id: UUID, response: LLMResult | None) -> None:
        call = self.calls.pop(run_id, None)
        if call is None:
            return
        node, model = call
        self._flush(node)
        if response is not None:
            usage, answered = _usage(response)
            used = node.usage.setdefault(model or answered, [0, 0])
            used[0] += usage.input_tokens
            used[1] += usage.output_tokens

    def _flush(self, node: _Node, now: float | None = None) -> None:
        if node.pending:
            chunk = text_storable("".join(node.pending))
            node.pending.clear()
            self.execution.emit(
                AGENT_OUTPUT, {"agent": node.name, "index": node.index, "chunk": chunk}
            )
        node.flushed = now if now is not None else time.monotonic()

    # --- Tools ----------------------------------------------------------------------------

    def on_tool_start(
        self,
        serialized: Any,
        input_str: str,
        *,
        run_id: UUID,
        metadata: dict[str, Any] | None = None,
        inputs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        name = (serialized or {}).get("name") or kwargs.get("name") or ""
        call_id = kwargs.get("tool_call_id") or str(run_id)
        arguments = inputs if inputs is not None else input_str
        self._soon(self._tool_start, run_id, metadata, str(name), str(call_id), arguments)

    def _tool_start(
        self, run_id: UUID, metadata: dict | None, name: str, call_id: str, arguments: Any
    ) -> None:
        node = self._node_of(metadata)
        if node is None:
            return
        self.tools[run_id] = (node, call_id, name)
        self.execution.emit(
            AGENT_TOOL_CALL,
            {
                "agent": node.name,
                "index": node.index,
                "call_id": call_id,
                "tool": name,
                "arguments": _shown(arguments),
            },
        )

    def on_tool_end(self, output: Any, *, run_id: UUID, **kwargs: Any) -> None:
        self._soon(self._tool_end, run_id, output, None)

    def on_tool_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self._soon(self._tool_end, run_id, None, error)

    def _tool_end(self, run_id: UUID, output: Any, error: BaseException | None) -> None:
        tool = self.tools.pop(run_id, None)
        if tool is None or isinstance(error, GraphBubbleUp):  # an interrupt: not a result
            return
        node, call_id, name = tool
        data: dict[str, Any] = {
            "agent": node.name,
            "index": node.index,
            "call_id": call_id,
            "tool": name,
        }
        if error is not None:
            message = text_storable(f"{type(error).__name__}: {error}"[:ERROR_MAX_CHARS])
            data["error"] = {"code": "tool_error", "message": message}
        else:
            data["output"] = output_text(
                output.content if isinstance(output, ToolMessage) else output
            )
        self.execution.emit(AGENT_TOOL_RESULT, data)


def _shown(arguments: Any) -> Any:
    """A tool call's arguments in its event, as the database's JSON holds them."""
    try:
        return storable(json.loads(json.dumps(state_json(arguments), default=str)))
    except ValueError:
        return text_storable(str(arguments))


def _step_key(metadata: dict[str, Any]) -> str:
    """A node's step: its super-step and name, and for a task sent to it (`Send`) its place
    among them. The same in every execution of the run: it depends on the checkpoint it starts
    from, not on which execution runs it."""
    key = f"g{metadata['langgraph_step']}/{metadata['langgraph_node']}"
    path = metadata.get("langgraph_path") or ()
    if len(path) > 1 and isinstance(path[1], int):
        key += f"/{path[1]}"
    return key


def _usage(response: LLMResult) -> tuple[Usage, str]:
    """A model call's usage (LangChain's `usage_metadata`, else the provider's `token_usage`)
    and the model that answered."""
    for generations in response.generations:
        for generation in generations:
            if isinstance(generation, ChatGeneration):
                message = generation.message
                answered = str(message.response_metadata.get("model_name") or "")
                usage = getattr(message, "usage_metadata", None)
                if usage:
                    return Usage(usage["input_tokens"], usage["output_tokens"]), answered
    output = response.llm_output or {}
    counts = output.get("token_usage") or {}
    return (
        Usage(int(counts.get("prompt_tokens") or 0), int(counts.get("completion_tokens") or 0)),
        str(output.get("model_name") or ""),
    )


def state_json(value: Any) -> Any:
    """A graph state as JSON values: messages in LangChain's dict form ({"type", "data"},
    `messages_from_dict` reads them back), pydantic models and dataclasses as dicts of their
    fields. Anything else is left to the run's JSON check (`output_invalid`)."""
    if isinstance(value, BaseMessage):
        return message_to_dict(value)
    if isinstance(value, dict):
        return {str(k): state_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [state_json(v) for v in value]
    if isinstance(value, pydantic.BaseModel):
        return {name: state_json(getattr(value, name)) for name in type(value).model_fields}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: state_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return value
