from __future__ import annotations

import logging

from agentsvc.idempotency import idempotency_purge

logger = logging.getLogger(__name__)


def purge_expired() -> int:
    """Scheduled: delete idempotency records past IDEMPOTENCY_TTL_S."""
    deleted = idempotency_purge()
    if deleted:
        logger.info("purged %d expired idempotency records", deleted)
    return deleted
