"""LangGraph chains through the real executor, with the real packages, against the fake model
server: in-process (`run_execute`) for what a run of a graph shows, and real executor processes
killed mid-run for its resume from the checkpoints in PostgreSQL."""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from decimal import Decimal

import psycopg
import pytest
from django.core.management import call_command
from psycopg.rows import dict_row

from runs.chains import chain_publish
from runs.execution.code import entrypoint_load
from runs.models import Chain, ChainKind, Run, RunEvent, RunStatus, RunStep
from runs.services import run_cancel, run_create
from tests.conftest import fake, process_env, wait_until
from tests.test_engine import execute, requests_for

PRICES = (Decimal("1000"), Decimal("3000"))  # USD per million tokens, in and out


@pytest.fixture
def local_is_fake(settings, fake_model):
    """The `local` provider is the fake model (chainkit.chat_model reads it at each call).

    Each in-process run has an event loop of its own (run_execute), while langchain-openai
    keeps one HTTP client per base URL for the process: its connections belong to the loop of
    the run before, closed by now, so each test starts without them."""
    from langchain_openai.chat_models import _client_utils

    _client_utils._cached_async_httpx_client.cache_clear()
    settings.PROVIDERS = {
        **settings.PROVIDERS,
        "local": {"base_url": fake_model.base_url, "api_key_env": ""},
    }


def graph_chain(graph: str, timeout_s: int = 60) -> Chain:
    chain, _ = chain_publish(
        definition={
            "name": f"graph-{graph}",
            "entrypoint": f"tests.chaincode.graphs:{graph}",
            "timeout_s": timeout_s,
        }
    )
    return chain


def start(alice, chain: Chain, run_input: dict) -> Run:
    return run_create(api_key=alice.key, chain=chain, run_input=run_input, metadata={})


def log(run: Run) -> list[tuple[str, dict]]:
    return [(e.type, e.data) for e in RunEvent.objects.filter(run=run).order_by("seq")]


def of(run: Run, kind: str) -> list[dict]:
    return [data for type_, data in log(run) if type_ == kind]


def checkpoint(run: Run):
    """The run's last checkpoint in PostgreSQL (LangGraph's saver reads it), or None."""
    from langgraph.checkpoint.postgres import PostgresSaver

    url = process_env()["DATABASE_URL"]
    with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
        return PostgresSaver(conn).get_tuple({"configurable": {"thread_id": str(run.id)}})


def test_nodes_are_agents(alice, local_is_fake, settings, fake_model):
    researcher, writer = fake(tokens=3), fake(tokens=40)
    settings.MODEL_PRICES = {**settings.MODEL_PRICES, researcher: PRICES}
    settings.STREAM_COALESCE_MS = 0  # every token its own agent.output
    chain = graph_chain("brief")
    assert chain.kind == ChainKind.LANGGRAPH
    run = execute(
        start(
            alice, chain, {"topic": "tides", "researcher_model": researcher, "writer_model": writer}
        )
    )
    assert run.status == RunStatus.COMPLETED, run.error_message
    events = log(run)
    types = [t for t, _ in events]
    assert types[:3] == ["run.queued", "run.started", "agent.started"]
    assert types[-1] == "run.completed"
    started = of(run, "agent.started")
    assert [(d["agent"], d["index"]) for d in started] == [("researcher", 0), ("writer", 1)]
    completed = of(run, "agent.completed")
    assert [(d["agent"], d["index"]) for d in completed] == [("researcher", 0), ("writer", 1)]
    assert [d["usage"]["output_tokens"] for d in completed] == [3, 40]
    # Tokens stream as they come, each in its agent.
    chunks = {0: "", 1: ""}
    for data in of(run, "agent.output"):
        chunks[data["index"]] += data["chunk"]
    assert len(of(run, "agent.output")) >= 40
    output = of(run, "run.completed")[0]["output"]
    assert output == {
        "topic": "tides",
        "researcher_model": researcher,
        "writer_model": writer,
        "notes": chunks[0],
        "brief": chunks[1],
    }
    assert chunks[0] == "Facts: tides alpha" and len(chunks[1].split()) == 40
    # Each node is a step with its usage; the run's usage and cost are theirs.
    steps = {s.key: s for s in RunStep.objects.filter(run=run)}
    assert set(steps) == {"g1/researcher", "g2/writer"}
    assert steps["g1/researcher"].data == {"agent": "researcher", "index": 0}
    assert run.output_tokens == 43 == sum(s.output_tokens for s in steps.values())
    assert run.input_tokens == sum(d["usage"]["input_tokens"] for d in completed) > 0
    researcher_in = completed[0]["usage"]["input_tokens"]
    assert (
        run.cost
        == steps["g1/researcher"].cost
        == (researcher_in * 1000 + 3 * 3000) / Decimal(1_000_000)
    )
    assert requests_for(fake_model, researcher) == requests_for(fake_model, writer) == 1
    assert checkpoint(run) is None  # the run ended: its checkpoints are deleted


def test_tool_calls_of_a_tool_node(alice, local_is_fake, fake_model, settings):
    settings.STREAM_COALESCE_MS = 0
    # The assistant's model asks for both tools at once, then answers from their results.
    assistant, summary = fake(tools=1, parallel=2), fake(tokens=4)
    run_input = {
        "messages": [{"role": "user", "content": "tides"}],
        "model": assistant,
        "writer_model": summary,
    }
    run = execute(start(alice, graph_chain("tooled"), run_input))
    assert run.status == RunStatus.COMPLETED, run.error_message
    started = [(d["agent"], d["index"]) for d in of(run, "agent.started")]
    assert started == [("assistant", 0), ("tools", 1), ("assistant", 2), ("summary", 3)]
    calls = of(run, "agent.tool_call")
    assert [(c["agent"], c["index"], c["tool"]) for c in calls] == [
        ("tools", 1, "almanac"),
        ("tools", 1, "torn_page"),
    ]
    assert calls[0]["arguments"] == {"topic": "tides"}
    results = {r["call_id"]: r for r in of(run, "agent.tool_result")}
    assert set(results) == {c["call_id"] for c in calls}
    assert results[calls[0]["call_id"]]["output"] == "tides rise twice a day"
    assert results[calls[1]["call_id"]]["error"] == {
        "code": "tool_error",
        "message": "LookupError: no page on tides",
    }
    types = [t for t, _ in log(run)]
    assert types.index("agent.tool_call") < types.index("agent.tool_result")
    # The output is the final state, its messages in LangChain's dict form.
    output = of(run, "run.completed")[0]["output"]
    assert [m["type"] for m in output["messages"]] == ["human", "ai", "tool", "tool", "ai"]
    assert output["messages"][1]["data"]["tool_calls"][0]["name"] == "almanac"
    # The sync node's tokens (from its thread) stream too.
    summary_chunks = [d["chunk"] for d in of(run, "agent.output") if d["agent"] == "summary"]
    assert len(summary_chunks) == 4 and "".join(summary_chunks) == output["brief"]
    # Both of the assistant's calls count, and the summary's.
    usage = [d["usage"] for d in of(run, "agent.completed")]
    assert run.output_tokens == sum(u["output_tokens"] for u in usage)
    assert usage[1]["output_tokens"] == 0  # the tools node calls no model
    assert requests_for(fake_model, assistant) == 2


def test_tasks_sent_to_a_node_and_a_subgraph(alice, local_is_fake, fake_model):
    model = fake(tokens=2)
    run = execute(start(alice, graph_chain("fans"), {"topic": "tides", "model": model}))
    assert run.status == RunStatus.COMPLETED, run.error_message
    # Three tasks of one node in one super-step: three agents, indexed in the order they start.
    started = [(d["agent"], d["index"]) for d in of(run, "agent.started")]
    assert started == [("part", 0), ("part", 1), ("part", 2), ("inner", 3)]
    outputs = Counter(d["index"] for d in of(run, "agent.output"))
    assert set(outputs) == {0, 1, 2}  # the subgraph calls no model
    steps = dict(RunStep.objects.filter(run=run).values_list("key", "output_tokens"))
    assert steps == {"g1/part/0": 2, "g1/part/1": 2, "g1/part/2": 2, "g2/inner": 0}
    assert run.output_tokens == 6 and requests_for(fake_model, model) == 3
    output = of(run, "run.completed")[0]["output"]
    assert len(output["parts"]) == 3 and output["brief"] == " / ".join(output["parts"])


def test_a_graph_that_loops_fails_at_its_recursion_limit(alice, local_is_fake):
    run = execute(start(alice, graph_chain("loops"), {}))
    assert run.status == RunStatus.FAILED
    assert run.error_code == "graph_recursion_limit"
    assert "within 5 super-steps" in run.error_message
    assert of(run, "run.failed")[0]["error"]["code"] == "graph_recursion_limit"
    assert len(of(run, "agent.completed")) == 5


def test_a_node_that_raises_fails_the_run(alice, local_is_fake):
    run_input = {"topic": "tides", "researcher_model": fake(tokens=3)}
    run = execute(start(alice, graph_chain("broken"), run_input))
    assert run.status == RunStatus.FAILED
    assert (run.error_code, run.error_message) == ("chain_error", "ValueError: the graph's own bug")
    # What the graph did before it failed is in the log, and counts.
    assert [d["agent"] for d in of(run, "agent.started")] == ["researcher", "explode"]
    assert [d["agent"] for d in of(run, "agent.completed")] == ["researcher"]
    assert run.output_tokens == 3


def test_a_graph_that_interrupts_fails(alice, local_is_fake):
    run = execute(start(alice, graph_chain("asks"), {"topic": "tides"}))
    assert run.status == RunStatus.FAILED
    assert run.error_code == "graph_interrupted"


def test_the_run_timeout_stops_the_graph(alice, local_is_fake):
    writer = fake(tokens=100, latency_ms=100)  # ten seconds of tokens
    run_input = {"topic": "tides", "researcher_model": fake(tokens=2), "writer_model": writer}
    began = time.monotonic()
    run = execute(start(alice, graph_chain("brief", timeout_s=1), run_input))
    assert run.status == RunStatus.TIMED_OUT
    assert time.monotonic() - began < 5  # the writer's model call was stopped, not waited for
    assert of(run, "agent.started")[-1]["agent"] == "writer"
    assert of(run, "agent.completed")[-1]["agent"] == "researcher"


def test_the_example_chain_loads_and_runs(alice, local_is_fake, capsys, monkeypatch):
    # Its model is made when the module is imported, on the provider's settings of then: an
    # import by an earlier test (loading chains/code.yaml) would keep the default server.
    monkeypatch.delitem(sys.modules, "chains.examples.langgraph_brief", raising=False)
    entrypoint_load.cache_clear()
    call_command("loadchains", "chains/code.yaml")
    chain = Chain.objects.get(name="langgraph-brief")
    assert chain.kind == ChainKind.LANGGRAPH
    assert chain.entrypoint == "chains.examples.langgraph_brief:graph"
    run = execute(start(alice, chain, {"topic": "tides"}))
    assert run.status == RunStatus.COMPLETED, run.error_message
    assert [d["agent"] for d in of(run, "agent.completed")] == ["researcher", "writer"]
    assert [c["tool"] for c in of(run, "agent.tool_call")] == ["outline"]
    output = of(run, "run.completed")[0]["output"]
    assert output["topic"] == "tides" and output["brief"]


# --- Real executor processes: cancelling a run, resuming one killed mid-run ---------------------


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_cancelling_a_run_stops_its_graph(alice, executors, fake_model):
    executors(LOCAL_MODEL_URL=fake_model.base_url)
    writer = fake(tokens=100, latency_ms=100)  # ten seconds of tokens
    run_input = {"topic": "tides", "researcher_model": fake(tokens=2), "writer_model": writer}
    run = start(alice, graph_chain("brief"), run_input)

    def writing() -> bool:
        return RunEvent.objects.filter(run=run, type="agent.output", data__agent="writer").exists()

    wait_until(writing, 30, message="the writer's first tokens")
    assert checkpoint(run) is not None  # the researcher's super-step
    run_cancel(run=run, reason="api")
    wait_until(lambda: Run.objects.get(pk=run.pk).status == RunStatus.CANCELLED, 5)
    run.refresh_from_db()
    assert (run.finished_at - run.cancel_requested_at).total_seconds() < 2
    assert of(run, "run.cancelled")[0]["reason"] == "api"
    wait_until(lambda: checkpoint(run) is None, 5, message="its checkpoints deleted")


# 50 graph runs killed in their second node by default; LANGGRAPH_FAULT_RUNS=200 for the bench's.
FAULT_RUNS = int(os.environ.get("LANGGRAPH_FAULT_RUNS", "50"))


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(300)
@pytest.mark.parametrize("fault", ["sigkill", "sigterm"])
def test_executor_stopped_holding_graph_runs(alice, executors, fake_model, fault):
    """An executor holding FAULT_RUNS LangGraph runs in their second node is killed (SIGKILL:
    the survivor finds it lost) or stopped (SIGTERM, no drain: it hands them back). The
    survivor resumes each from its last checkpoint: every run completes once, the first node's
    model gets each run's request once, and each run's usage and cost equal those of a run
    nobody stopped."""
    from tests.test_faults import held_by, requeued, roomy, wait_ended

    roomy(alice)
    # Ten seconds in the writer: the survivor is up (a few seconds) before any run ends.
    researcher, writer = fake(tokens=3), fake(tokens=25, latency_ms=400)
    prices = ",".join(f"{m}={PRICES[0]}:{PRICES[1]}" for m in (researcher, writer))
    env = {
        "LOCAL_MODEL_URL": fake_model.base_url,
        "MODEL_PRICES": prices,
        "HEARTBEAT_S": "0.5",
        "WORKER_LOST_AFTER_S": "3",
        "WORKER_DRAIN_S": "0",
    }
    chain = graph_chain("brief", timeout_s=120)
    models = {"researcher_model": researcher, "writer_model": writer}
    ids = [start(alice, chain, {"topic": f"t{i}", **models}).id for i in range(FAULT_RUNS)]
    doomed = executors(**env)

    def in_writer() -> bool:
        writing = RunEvent.objects.filter(
            run_id__in=ids, type="agent.started", data__agent="writer"
        ).count()
        return writing == FAULT_RUNS and requests_for(fake_model, writer) == FAULT_RUNS

    wait_until(in_writer, 90, 0.2, "every run in its writer")
    assert len(held_by(doomed, ids)) == FAULT_RUNS
    survivor = executors(**env)
    if fault == "sigkill":
        doomed.kill()
    else:
        doomed.terminate()
    wait_ended(ids, 120)
    # Lost, a run is retried (its next attempt); handed back, the same attempt goes on.
    reason, attempt = {"sigkill": ("worker_lost", 2), "sigterm": ("worker_shutdown", 1)}[fault]
    assert requeued(ids, reason) == FAULT_RUNS

    runs = list(Run.objects.filter(pk__in=ids))
    assert Counter(r.status for r in runs) == {RunStatus.COMPLETED: FAULT_RUNS}
    assert {r.attempt for r in runs} == {attempt}
    # The researcher's model got each run's request once: the survivor did not run it again.
    assert requests_for(fake_model, researcher) == FAULT_RUNS
    assert requests_for(fake_model, writer) == 2 * FAULT_RUNS
    for run in runs:
        seqs = list(RunEvent.objects.filter(run=run).order_by("seq").values_list("seq", flat=True))
        assert seqs == list(range(1, len(seqs) + 1))
        types = [t for t, _ in log(run)]
        assert [t for t in types if t.startswith("run.") and t != "run.queued"] == [
            "run.started",
            "run.started",
            "run.resumed",
            "run.completed",
        ], (run.id, types)
        resumed = of(run, "run.resumed")[0]
        assert (resumed["index"], resumed["attempt"], resumed["steps"]) == (1, attempt, 1)
        after = types[types.index("run.resumed") :]
        assert after.count("agent.started") == after.count("agent.completed") == 1
        assert [d["index"] for d in of(run, "agent.started")] == [0, 1, 1]
    # An unkilled run of the same graph costs the same.
    reference = start(alice, chain, {"topic": "tx", **models})
    wait_ended([reference.id], 60)
    reference.refresh_from_db()
    assert reference.status == RunStatus.COMPLETED and reference.attempt == 1
    assert reference.cost > 0
    usage = {(r.input_tokens, r.output_tokens, r.cost) for r in runs}
    assert usage == {(reference.input_tokens, reference.output_tokens, reference.cost)}
    assert survivor.alive()
    # Resumed or not, an ended run's checkpoints are deleted.
    wait_until(lambda: not any(checkpoint(r) for r in runs), 30, message="checkpoints deleted")
