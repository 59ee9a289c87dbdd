"""Shared pieces of the webhook tests: the receiver, a finished run, a delivery driver."""

from __future__ import annotations

import base64
import time
import uuid

import pytest
from django.utils import timezone

from runs.execution.executor import run_execute
from runs.models import Run
from runs.services import run_create
from tests.conftest import fake
from tests.fakes.webhook_receiver import start_in_thread
from webhooks.models import DeliveryStatus, WebhookDelivery
from webhooks.services import delivery_attempt

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()


@pytest.fixture(scope="session")
def receiver():
    server = start_in_thread()
    yield server
    server.shutdown()


@pytest.fixture
def local_ok(settings):
    """The receiver lives on 127.0.0.1: lift the SSRF guard for loopback, shorten retries."""
    settings.WEBHOOK_ALLOWED_NETWORKS = ["127.0.0.0/8"]
    settings.WEBHOOK_RETRY_SCHEDULE_S = [0.05, 0.05, 0.05]
    return settings


def hook_path(**opts) -> str:
    opts.setdefault("tag", uuid.uuid4().hex[:8])
    return "/hook?" + "&".join(f"{k}={v}" for k, v in opts.items())


def finished_run(alice, make_chain, webhook: dict | None = None, **model) -> Run:
    chain = make_chain("demo", models=[fake(**(model or {"tokens": 3}))])
    run = run_create(
        api_key=alice.key,
        chain=chain,
        run_input={"topic": "tides"},
        metadata={"customer": "c1"},
        webhook=webhook,
    )
    run_execute(run_id=str(run.id))
    run.refresh_from_db()
    return run


def deliver_all(timeout: float = 10) -> None:
    """Play the worker: attempt every due delivery until none is pending."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pending = WebhookDelivery.objects.filter(status=DeliveryStatus.PENDING)
        if not pending.exists():
            return
        for delivery in pending.filter(next_attempt_at__lte=timezone.now()):
            delivery_attempt(delivery_id=delivery.id)
        time.sleep(0.02)
    raise AssertionError("deliveries still pending")
