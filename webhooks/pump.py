"""Webhook delivery inside the executor process: a service it starts (webhooks/apps.py).

Due deliveries (first attempts, retries, resends, and the leases of a process that died) are
claimed from the database within WEBHOOK_POLL_S of their due time, and at once when this
process wrote them. Attempts run on WEBHOOK_CONCURRENCY threads of their own: a slow receiver
can delay other deliveries, never a run.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

from django.conf import settings
from django.db import InterfaceError, OperationalError, connection

from webhooks.services import deliveries

logger = logging.getLogger(__name__)


def _attempt(delivery_id: Any, token: Any) -> None:
    try:
        deliveries.delivery_attempt(delivery_id=delivery_id, token=token)
    except Exception:
        logger.exception("delivery %s: attempt failed", delivery_id)
    finally:
        connection.close()


async def deliveries_pump(executor: Any) -> None:
    loop = asyncio.get_running_loop()
    wake = asyncio.Event()
    deliveries.pump_register(lambda: loop.call_soon_threadsafe(wake.set))
    slots = settings.WEBHOOK_CONCURRENCY
    pool = ThreadPoolExecutor(slots, "webhook")
    in_flight: set[asyncio.Future] = set()
    try:
        while True:
            free = slots - len(in_flight)
            full = False
            if free > 0:
                try:
                    ids, token = await executor.db(deliveries.deliveries_claim_due, limit=free)
                except (OperationalError, InterfaceError) as e:
                    logger.warning("deliveries not claimed (%s)", e)
                    ids, token = [], None
                for delivery_id in ids:
                    # A fresh context each: a pool thread's own would keep the last run's fields.
                    attempt = partial(contextvars.Context().run, _attempt, delivery_id, token)
                    future = loop.run_in_executor(pool, attempt)
                    in_flight.add(future)
                    future.add_done_callback(lambda f: (in_flight.discard(f), wake.set()))
                full = len(ids) == free
            if not full:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), settings.WEBHOOK_POLL_S)
            else:
                await wake.wait()  # a slot frees up
            wake.clear()
    finally:
        deliveries.pump_register(None)
        if in_flight:  # attempts under way finish and are recorded
            await asyncio.gather(*in_flight, return_exceptions=True)
        pool.shutdown(wait=False)
