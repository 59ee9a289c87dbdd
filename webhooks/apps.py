from django.apps import AppConfig


class WebhooksConfig(AppConfig):
    name = "webhooks"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        """Webhooks subscribe to runs: messages written with each event a webhook may subscribe
        to (the ends, a request for input), endpoints
        that keep their owners' runs watched, delivery inside the executor process."""
        from agentsvc import metrics
        from runs import events
        from runs.execution import executor
        from webhooks.metrics import WebhooksCollector
        from webhooks.pump import deliveries_pump
        from webhooks.selectors import owners_with_endpoints
        from webhooks.services import messages_create_for_events

        events.on_written(messages_create_for_events, events=events.SUBSCRIBABLE_EVENTS)
        events.on_owners_watched(owners_with_endpoints)
        executor.service_register(deliveries_pump)
        metrics.REGISTRY.register(WebhooksCollector())
