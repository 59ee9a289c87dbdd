from __future__ import annotations

import logging

from agentsvc.idempotency import idempotency_purge
from agentsvc.limits import tokens_purge

logger = logging.getLogger(__name__)


def purge_expired() -> int:
    """Scheduled: delete idempotency records past IDEMPOTENCY_TTL_S and old token windows. A
    line in the log only when something was deleted."""
    windows = tokens_purge()
    deleted = idempotency_purge()
    if deleted or windows:
        logger.info(
            "purged %d expired idempotency records and %d old token windows", deleted, windows
        )
    return deleted
