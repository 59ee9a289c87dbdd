"""The figures of webhooks on /metrics (agentsvc/metrics.py): registered at start-up
(webhooks/apps.py)."""

from __future__ import annotations

from django.db.models import Count, Min, Q
from django.utils import timezone
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from agentsvc.metrics import ATTEMPT_OUTCOMES
from webhooks.models import AttemptTotal, DeliveryStatus, WebhookDelivery


class WebhooksCollector:
    """Attempts by outcome from the totals written with each attempt (webhooks/recording.py);
    the backlog from the pending deliveries."""

    def collect(self):
        counts = dict(AttemptTotal.objects.values_list("outcome", "attempts"))
        family = CounterMetricFamily(
            "agentsvc_webhook_attempts", "Webhook delivery attempts by outcome", labels=["outcome"]
        )
        for name in ATTEMPT_OUTCOMES:
            family.add_metric([name], counts.get(name, 0))
        yield family
        now = timezone.now()
        pending = WebhookDelivery.objects.filter(status=DeliveryStatus.PENDING).aggregate(
            n=Count("id"),
            due=Count("id", filter=Q(next_attempt_at__lte=now)),
            oldest=Min("next_attempt_at", filter=Q(next_attempt_at__lte=now)),
        )
        yield GaugeMetricFamily(
            "agentsvc_webhook_deliveries_pending",
            "Deliveries not yet succeeded or failed (waiting for a retry or under way)",
            value=pending["n"],
        )
        yield GaugeMetricFamily(
            "agentsvc_webhook_deliveries_due",
            "Pending deliveries whose attempt is due now (the backlog)",
            value=pending["due"],
        )
        yield GaugeMetricFamily(
            "agentsvc_webhook_oldest_due_age_seconds",
            "How long the oldest due delivery has waited (0: none due)",
            value=(now - pending["oldest"]).total_seconds() if pending["oldest"] else 0,
        )
