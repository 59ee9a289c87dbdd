"""The floor for a durable accept: validate the body, INSERT the run and its queue entry in one
transaction, answer 202. Nothing else. A plain ASGI app over a psycopg async pool. `GET
/runs/{id}` is the floor for a status read: one SELECT by primary key.

Run: REF_DATABASE_URL=postgres://... daphne bench.refs.durable_accept:app
"""

from __future__ import annotations

import json
import os
import uuid

from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

DSN = os.environ["REF_DATABASE_URL"]
SCHEMA = """
CREATE TABLE IF NOT EXISTS ref_run (id uuid PRIMARY KEY, input jsonb NOT NULL,
    status text NOT NULL, created_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE IF NOT EXISTS ref_queue (id bigserial PRIMARY KEY, run_id uuid NOT NULL,
    enqueued_at timestamptz NOT NULL DEFAULT now());
"""
pool: AsyncConnectionPool | None = None


async def _pool() -> AsyncConnectionPool:
    global pool
    if pool is None:
        pool = AsyncConnectionPool(DSN, min_size=4, max_size=16, open=False)
        await pool.open()
        async with pool.connection() as conn:
            await conn.execute(SCHEMA)
    return pool


async def _body(receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def _send(send, status: int, payload: dict) -> None:
    body = json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _status(send, raw_id: str) -> None:
    """The status GET: one indexed SELECT by primary key."""
    try:
        run_id = uuid.UUID(raw_id)
    except ValueError:
        await _send(send, 404, {"error": "not found"})
        return
    async with (await _pool()).connection() as conn:
        cursor = await conn.execute(
            "SELECT status, input, created_at FROM ref_run WHERE id = %s", (run_id,)
        )
        row = await cursor.fetchone()
    if row is None:
        await _send(send, 404, {"error": "not found"})
        return
    status, run_input, created_at = row
    await _send(
        send,
        200,
        {
            "run_id": str(run_id),
            "status": status,
            "input": run_input,
            "created_at": created_at.isoformat(),
        },
    )


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    if scope["method"] == "GET" and scope["path"].startswith("/runs/"):
        await _status(send, scope["path"].removeprefix("/runs/"))
        return
    try:
        data = json.loads(await _body(receive))
        run_input = data["input"]
        if not isinstance(run_input, dict) or not isinstance(run_input.get("topic"), str):
            raise ValueError
    except (ValueError, KeyError, TypeError):
        await _send(send, 400, {"error": "invalid body"})
        return
    run_id = uuid.uuid4()
    async with (await _pool()).connection() as conn, conn.transaction():
        await conn.execute(
            "INSERT INTO ref_run (id, input, status) VALUES (%s, %s, 'queued')",
            (run_id, Jsonb(run_input)),
        )
        await conn.execute("INSERT INTO ref_queue (run_id) VALUES (%s)", (run_id,))
    await _send(send, 202, {"run_id": str(run_id), "status": "queued"})
