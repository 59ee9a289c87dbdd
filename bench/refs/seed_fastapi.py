"""The async job pattern of the seed article: an in-memory dict and FastAPI BackgroundTasks.

By default the agent task is simulated by a 0.5 s sleep (run creation only measures the accept).
With SEED_MODEL_URL set (an OpenAI-compatible base URL, e.g. http://127.0.0.1:8089/v1), the task
is a chain of SEED_AGENTS (default 2) agents called in order, each one streamed chat completion
of SEED_MODEL (default `fake?tokens=10&latency_ms=100`) whose prompt is the previous agent's
output: the shape of an agentsvc two-agent chain, on one shared httpx.AsyncClient, in the one
process, with no bound on how many run at once.

Run: uvicorn bench.refs.seed_fastapi:app. Run creation (bench/create_throughput.py) serves it
with daphne like agentsvc; bench/inflight_bench.py with uvicorn, since daphne kills an
application instance, background tasks and all, 10 s after its response.
The job entries carry wall-clock times (created, started, finished) and GET /_bench/stats sums
them up for bench/inflight_bench.py; nothing else reads them.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from uuid import uuid4

import httpx
from fastapi import BackgroundTasks, FastAPI
from pydantic import BaseModel

app = FastAPI()
job_store: dict[str, dict] = {}

MODEL_URL = os.environ.get("SEED_MODEL_URL", "")
MODEL = os.environ.get("SEED_MODEL", "fake?tokens=10&latency_ms=100")
AGENTS = int(os.environ.get("SEED_AGENTS", "2"))
_client: httpx.AsyncClient | None = None


class TaskRequest(BaseModel):
    input: dict
    idempotency_key: str | None = None


async def call_model(prompt: str) -> str:
    global _client
    if _client is None:
        _client = httpx.AsyncClient(
            base_url=MODEL_URL,
            timeout=60,
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
        )
    body = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": prompt}]}
    parts = []
    async with _client.stream("POST", "/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[6:]).get("choices", []):
                parts.append(choice.get("delta", {}).get("content") or "")
    return "".join(parts)


async def run_agent_task(job_id: str, request: TaskRequest) -> None:
    started = time.time()
    if MODEL_URL:
        previous = str(request.input.get("topic", ""))
        for _ in range(AGENTS):
            previous = await call_model(previous)
    else:
        await asyncio.sleep(0.5)
    created = job_store.get(job_id, {}).get("created")
    job_store[job_id] = {
        "job_id": job_id,
        "status": "completed",
        "created": created,
        "started": started,
        "finished": time.time(),
    }


@app.post("/agent/tasks", status_code=202)
async def create_task(request: TaskRequest, background_tasks: BackgroundTasks):
    job_id = str(uuid4())
    idempotency_key = request.idempotency_key or job_id
    if idempotency_key in job_store:
        existing = job_store[idempotency_key]
        return {"job_id": existing["job_id"], "status": "already_accepted"}
    job_store[idempotency_key] = {"job_id": job_id, "status": "pending", "created": time.time()}
    background_tasks.add_task(run_agent_task, job_id, request)
    return {"job_id": job_id, "status": "pending", "poll_url": f"/agent/tasks/{job_id}"}


@app.get("/agent/tasks/{job_id}")
async def get_task(job_id: str):
    return job_store.get(job_id, {"job_id": job_id, "status": "unknown"})


@app.get("/_bench/stats")
async def stats():
    """For the benchmark: completed jobs and their times (wall clock, seconds)."""
    done = [j for j in job_store.values() if j.get("status") == "completed"]
    return {
        "jobs": len(job_store),
        "completed": len(done),
        "times": [[j["created"], j["started"], j["finished"]] for j in done],
    }
