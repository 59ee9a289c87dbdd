"""The stream hub's wake-ups over the Redis channel layer."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from django.conf import settings as django_settings

from runs.hub import Hub
from runs.wakeup import run_group

pytestmark = pytest.mark.skipif(
    not django_settings.STREAM_WAKEUP_VIA_LAYER, reason="needs the Redis channel layer"
)


def test_wakeup_reaches_the_hub_while_a_websocket_consumer_listens(settings):
    """Every channels consumer (a WebSocket) receives on its own channel of the same layer; a
    wake-up must still ring the hub at once, not at the next database re-check."""
    settings.STREAM_RECHECK_S = 60  # only the channel layer can ring within the test

    async def scenario() -> tuple[bool, float]:
        hub = Hub()
        layer = hub.layer
        # What a WebSocket consumer does while its socket is open: wait on its own channel.
        consumer = asyncio.create_task(layer.receive(await layer.new_channel()))
        run_id = str(uuid.uuid4())
        try:
            async with hub.watch_run(run_id) as waiter:
                await asyncio.sleep(0.2)  # both receivers are waiting now
                started = time.monotonic()
                await layer.group_send(
                    run_group(run_id), {"type": "run.wake", "run": run_id, "seq": 2}
                )
                rung = await waiter.wait(3)
                return rung, time.monotonic() - started
        finally:
            for task in [consumer, *hub._tasks]:
                task.cancel()
            await asyncio.gather(consumer, *hub._tasks, return_exceptions=True)
            await layer.close_pools()

    rung, elapsed = asyncio.run(scenario())
    assert rung, "the wake-up did not reach the hub within 3 s"
    assert elapsed < 1
