"""The async job pattern of the seed article: an in-memory dict and FastAPI BackgroundTasks.

The agent task is simulated by a 0.5 s sleep. Run: uvicorn bench.refs.seed_fastapi:app
"""

from __future__ import annotations

import asyncio
from uuid import uuid4

from fastapi import BackgroundTasks, FastAPI
from pydantic import BaseModel

app = FastAPI()
job_store: dict[str, dict] = {}


class TaskRequest(BaseModel):
    input: dict
    idempotency_key: str | None = None


async def run_agent_task(job_id: str, request: TaskRequest) -> None:
    await asyncio.sleep(0.5)
    job_store[job_id] = {"job_id": job_id, "status": "completed"}


@app.post("/agent/tasks", status_code=202)
async def create_task(request: TaskRequest, background_tasks: BackgroundTasks):
    job_id = str(uuid4())
    idempotency_key = request.idempotency_key or job_id
    if idempotency_key in job_store:
        existing = job_store[idempotency_key]
        return {"job_id": existing["job_id"], "status": "already_accepted"}
    job_store[idempotency_key] = {"job_id": job_id, "status": "pending"}
    background_tasks.add_task(run_agent_task, job_id, request)
    return {"job_id": job_id, "status": "pending", "poll_url": f"/agent/tasks/{job_id}"}
