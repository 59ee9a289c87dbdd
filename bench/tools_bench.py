"""Tool calls: runs whose first agent calls a tool, drained by one executor, against the same
chain as plain asyncio in one process; and the overhead of one tool round.

    .venv/bin/python bench/tools_bench.py [--runs 1000] [--latency-ms 100] [--tokens 10]
                                          [--rounds 10] [--samples 30] [--json PATH]

Production configuration (PostgreSQL + Redis), the fake model server, ONE executor.

1. drain: `--runs` runs of a two-agent chain, the first agent with one tool (a sync function,
   bench/refs/tools.py): model call -> tool call -> model call, then the second agent; every
   model call `--tokens` tokens at `--latency-ms`. The runs are queued 25 at a time, 250 a
   second, while the executor runs; drain is the first queueing to the last `finished_at`, start
   latency `started_at - created_at`. Reference: the same calls (httpx streaming from the same
   server, in clients of 16 connections as the executor's, the same tool) as one
   `asyncio.gather` of `--runs` coroutines in one process, no durability.
2. round: on the zero-latency model, `--samples` runs one after another of an agent that makes
   `--rounds` tool rounds, and of the same agent making none: the per-round difference of their
   median durations (`finished_at - started_at`), against the same difference for the plain
   asyncio version. What agentsvc adds per round is the recording of the call and its result
   (two durable steps and their events) and the executor's hand-offs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import (
    config_env,
    executor_command,
    executor_env,
    exit_on_sigterm,
    free_port,
    model_command,
    pct,
    processes,
    reset_database,
    wait_http,
    write_json,
)
from bench.refs.tools import lookup

TOOL = {
    "type": "function",
    "function": {
        "name": "lookup",
        "description": "Look a topic up.",
        "parameters": {
            "type": "object",
            "properties": {"topic": {"type": "string"}, "limit": {"type": "integer"}},
            "required": ["topic"],
        },
    },
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=1000)
    p.add_argument("--latency-ms", type=int, default=100)
    p.add_argument("--tokens", type=int, default=10)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--samples", type=int, default=30)
    p.add_argument("--json", help="write the results here")
    return p.parse_args()


# --- The plain asyncio reference --------------------------------------------------------------


async def _complete(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    """One streamed chat completion: its text and tool calls."""
    text, calls = [], {}
    url = f"{url}/chat/completions"
    async with client.stream("POST", url, json={**body, "stream": True}) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data:") or line.endswith("[DONE]"):
                continue
            for choice in json.loads(line[5:]).get("choices") or []:
                delta = choice.get("delta") or {}
                text.append(delta.get("content") or "")
                for piece in delta.get("tool_calls") or []:
                    call = calls.setdefault(piece["index"], {"id": "", "name": "", "arguments": ""})
                    call["id"] = piece.get("id") or call["id"]
                    call["name"] += (piece.get("function") or {}).get("name") or ""
                    call["arguments"] += (piece.get("function") or {}).get("arguments") or ""
    return {"text": "".join(text), "calls": [calls[i] for i in sorted(calls)]}


async def _agent_with_tools(client, url: str, model: str, prompt: str) -> str:
    messages = [{"role": "user", "content": prompt}]
    while True:
        answer = await _complete(
            client, url, {"model": model, "messages": messages, "tools": [TOOL]}
        )
        if not answer["calls"]:
            return answer["text"]
        messages.append(
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": c["id"],
                        "type": "function",
                        "function": {"name": c["name"], "arguments": c["arguments"]},
                    }
                    for c in answer["calls"]
                ],
            }
        )
        for c in answer["calls"]:
            output = json.dumps(lookup(**json.loads(c["arguments"])))
            messages.append({"role": "tool", "tool_call_id": c["id"], "content": output})


async def reference_run(client, url: str, first: str, second: str, topic: str) -> str:
    notes = await _agent_with_tools(client, url, first, topic)
    answer = await _complete(
        client, url, {"model": second, "messages": [{"role": "user", "content": notes}]}
    )
    return answer["text"]


async def reference_drain(url: str, first: str, second: str, n: int) -> float:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(limits=limits, timeout=120) as client:
        started = time.monotonic()
        await asyncio.gather(
            *(reference_run(client, url, first, second, f"t{i}") for i in range(n))
        )
        return time.monotonic() - started


async def reference_durations(url: str, model: str, samples: int) -> list[float]:
    async with httpx.AsyncClient(timeout=60) as client:
        out = []
        for i in range(samples):
            started = time.monotonic()
            await _agent_with_tools(client, url, model, f"t{i}")
            out.append(time.monotonic() - started)
        return out


# --- agentsvc -------------------------------------------------------------------------------------


def main() -> None:
    args = parse_args()
    exit_on_sigterm()
    tmp = Path(tempfile.mkdtemp(prefix="tools-bench-"))
    env = config_env("production", tmp / "data")
    model_port = free_port()
    url = f"http://127.0.0.1:{model_port}/v1"
    env.update(
        LOCAL_MODEL_URL=url, QUEUE_MAX="100000000", DJANGO_SETTINGS_MODULE="agentsvc.settings"
    )
    reset_database(env)
    os.environ.clear()
    os.environ.update(env)
    import django

    django.setup()
    from django.core.management import call_command
    from django.db import transaction

    from agentsvc.services import api_key_create
    from runs.chains import chain_publish
    from runs.models import Run, RunStatus
    from runs.services import run_create

    call_command("migrate", verbosity=0)
    key, _ = api_key_create(
        owner_name="bench",
        name="bench",
        requests_per_minute=100_000_000,
        runs_per_minute=100_000_000,
        tokens_per_minute=2_000_000_000,
        max_active_runs=100_000_000,
    )
    slow = f"tokens={args.tokens}&latency_ms={args.latency_ms}"
    first, second = f"fake?tools=1&{slow}&tag=first", f"fake?{slow}&tag=second"
    tool = ["bench.refs.tools:lookup"]

    def chain(name: str, agents: list[tuple[str, bool]]):
        return chain_publish(
            definition={
                "name": name,
                "timeout_s": 600,
                "agents": [
                    {
                        "name": f"a{i}",
                        "provider": "local",
                        "model": model,
                        "prompt": "{{ input.topic }} {{ previous }}",
                        **({"tools": tool, "max_tool_rounds": 100} if tools else {}),
                    }
                    for i, (model, tools) in enumerate(agents)
                ],
            }
        )[0]

    drain_chain = chain("tooled", [(first, True), (second, False)])
    rounds_chain = chain("rounds", [(f"fake?tools={args.rounds}&tokens=5", True)])
    none_chain = chain("no-rounds", [("fake?tools=0&tokens=5", True)])
    results: dict = {"config": vars(args)}

    def queue(chain_obj, n: int) -> tuple[list, float]:
        with transaction.atomic():
            ids = [
                run_create(
                    api_key=key, chain=chain_obj, run_input={"topic": f"t{i}"}, metadata={}
                ).id
                for i in range(n)
            ]
        return ids, time.time()

    def wait_done(ids: list, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while Run.objects.filter(pk__in=ids, status__in=["queued", "running"]).exists():
            if time.monotonic() > deadline:
                raise SystemExit("runs did not finish in time")
            time.sleep(0.005 if len(ids) == 1 else 0.2)

    with processes(model_command(model_port), env=env, log_dir=tmp):
        wait_http(f"{url}/models")
        ref_s = asyncio.run(reference_drain(url, first, second, args.runs))
        ref10 = asyncio.run(
            reference_durations(url, f"fake?tools={args.rounds}&tokens=5", args.samples)
        )
        ref0 = asyncio.run(reference_durations(url, "fake?tools=0&tokens=5", args.samples))
        (tmp / "x").mkdir()
        with processes(executor_command(), env=executor_env(env), log_dir=tmp / "x"):
            warm, _ = queue(none_chain, 5)
            wait_done(warm, 60)
            # Queued at a steady rate, 25 every 0.1 s (faster than the API creates them).
            ids, committed = [], time.time()
            for start in range(0, args.runs, 25):
                due = committed + start / 250
                time.sleep(max(0.0, due - time.time()))
                ids += queue(drain_chain, min(25, args.runs - start))[0]
            wait_done(ids, 600)
            rows = list(
                Run.objects.filter(pk__in=ids).values_list(
                    "status", "created_at", "started_at", "finished_at"
                )
            )
            durations = {}
            for name, chain_obj in (("rounds", rounds_chain), ("none", none_chain)):
                out = []
                for _ in range(args.samples):
                    (run_id,), _ = queue(chain_obj, 1)
                    wait_done([run_id], 60)
                    run = Run.objects.get(pk=run_id)
                    assert run.status == RunStatus.COMPLETED, run.error_message
                    out.append((run.finished_at - run.started_at).total_seconds())
                durations[name] = out
    statuses = {s for s, *_ in rows}
    drain_s = max(f.timestamp() for *_, f in rows) - committed
    starts = [(s - c).total_seconds() for _, c, s, _ in rows]
    per_round = (
        statistics.median(durations["rounds"]) - statistics.median(durations["none"])
    ) / args.rounds
    ref_round = (statistics.median(ref10) - statistics.median(ref0)) / args.rounds
    results["drain"] = {
        "statuses": sorted(statuses),
        "agentsvc_s": round(drain_s, 2),
        "reference_s": round(ref_s, 2),
        "ratio": round(drain_s / ref_s, 2),
        "start_p50_ms": round(pct(starts, 50) * 1000, 1),
        "start_p99_ms": round(pct(starts, 99) * 1000, 1),
    }
    results["round"] = {
        "agentsvc_per_round_ms": round(per_round * 1000, 2),
        "reference_per_round_ms": round(ref_round * 1000, 2),
        "overhead_per_round_ms": round((per_round - ref_round) * 1000, 2),
    }
    print(json.dumps(results, indent=2))
    write_json(args.json, results)


if __name__ == "__main__":
    main()
