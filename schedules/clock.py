"""The ticks, on the executors' clock: a service every executor process runs (schedules/apps.py).

Every SCHEDULE_POLL_S each executor fires the ticks that are due (schedules.services), on its
database threads; after a full batch, the next one at once. Any number of executors may look at
once: each tick is claimed by one of them. With no executor up nothing ticks, and nothing could
run; the first one back fires each schedule's missed ticks as one.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from django.conf import settings
from django.db import InterfaceError, OperationalError

from schedules.services import DUE_BATCH, schedules_fire_due

logger = logging.getLogger(__name__)


async def schedules_clock(executor: Any) -> None:
    while True:
        full = False
        try:
            done = await executor.db(schedules_fire_due)
        except (OperationalError, InterfaceError) as e:
            logger.warning("schedules not fired (%s)", e)
        except Exception:
            logger.exception("schedules not fired")  # the clock goes on; the ticks stay due
        else:
            if done["started"] or done["refused"]:
                logger.info("schedules: %s", ", ".join(f"{k}={v}" for k, v in done.items() if v))
            full = sum(done.values()) >= DUE_BATCH  # more may be due: the next pass at once
        if not full:
            await asyncio.sleep(settings.SCHEDULE_POLL_S)
