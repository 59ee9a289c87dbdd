"""Schemathesis hooks of tests/test_fuzz.py (loaded through SCHEMATHESIS_HOOKS)."""

from __future__ import annotations

import uuid

import schemathesis
from schemathesis.core.parameters import ParameterLocation


@schemathesis.hook
def before_call(ctx, case, kwargs):
    """A fresh Idempotency-Key for every stateful request that would send a valid one.

    Hypothesis repeats generated values across scenarios, so a create with a repeated key
    replays an earlier scenario's answer, which may name an endpoint that scenario deleted. That
    404 is what idempotency promises, but it reads as a created resource gone missing."""
    meta = case.meta
    if (
        meta is None
        or meta.phase.name != "stateful"
        or meta.is_negative_at(ParameterLocation.HEADER)
    ):
        return
    if case.headers and "Idempotency-Key" in case.headers:
        case.headers["Idempotency-Key"] = uuid.uuid4().hex
