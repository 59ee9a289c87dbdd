"""Endpoints and deliveries in the Django admin, with a resend action (the API's service)."""

from __future__ import annotations

from django.contrib import admin, messages

from agentsvc.errors import ApplicationError
from webhooks import services
from webhooks.models import WebhookAttempt, WebhookDelivery, WebhookEndpoint


@admin.register(WebhookEndpoint)
class WebhookEndpointAdmin(admin.ModelAdmin):
    list_display = ("url", "owner", "enabled", "failing_since", "last_error", "created_at")
    list_filter = ("enabled",)
    search_fields = ("url", "description")
    # Secrets never show in the admin.
    exclude = ("secret", "previous_secret")
    readonly_fields = ("previous_secret_expires_at", "failing_since", "last_error")

    def has_add_permission(self, request) -> bool:
        # Endpoints are registered through the API, which shows the new secret once.
        return False


class WebhookAttemptInline(admin.TabularInline):
    model = WebhookAttempt
    extra = 0
    can_delete = False
    fields = ("number", "at", "status_code", "duration_ms", "error", "response_excerpt", "trigger")
    readonly_fields = fields

    def has_add_permission(self, request, obj=None) -> bool:
        return False


@admin.register(WebhookDelivery)
class WebhookDeliveryAdmin(admin.ModelAdmin):
    list_display = ("message", "url", "status", "attempt_count", "next_attempt_at", "last_error")
    list_filter = ("status",)
    search_fields = ("message__id", "url", "message__run__id")
    readonly_fields = [f.name for f in WebhookDelivery._meta.fields]
    inlines = [WebhookAttemptInline]
    actions = ["resend"]

    def has_add_permission(self, request) -> bool:
        return False  # deliveries come from run events

    @admin.action(description="Resend the selected deliveries")
    def resend(self, request, queryset) -> None:
        sent = 0
        for delivery in queryset:
            try:
                services.delivery_resend(delivery=delivery)
                sent += 1
            except ApplicationError as e:
                self.message_user(request, f"{delivery}: {e.detail}", messages.ERROR)
        self.message_user(request, f"{sent} delivery(ies) queued for resend.")
