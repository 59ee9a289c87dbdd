"""Endpoints and deliveries in the Django admin, with a resend action (the API's service)."""

from __future__ import annotations

import uuid
from datetime import timedelta

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.helpers import ActionForm
from django.db.models import Q
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join

from agentsvc.errors import ApplicationError
from runs.admin import run_panel_register
from runs.models import Run
from webhooks import services
from webhooks.models import (
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
    WebhookMessage,
)
from webhooks.services.endpoints import endpoint_delete, endpoint_update


class ResendRangeForm(ActionForm):
    """The time range of "resend failed deliveries", beside the action menu."""

    since = forms.DateTimeField(required=False, help_text="default: 24 h ago")
    until = forms.DateTimeField(required=False, help_text="default: now")


@admin.register(WebhookEndpoint)
class WebhookEndpointAdmin(admin.ModelAdmin):
    list_display = (
        "url",
        "owner",
        "enabled",
        "disabled_reason",
        "disabled_at",
        "failing_since",
        "last_error",
        "created_at",
    )
    list_filter = ("enabled", ("disabled_at", admin.DateFieldListFilter))
    list_select_related = ("owner",)
    search_fields = ("url", "description")
    show_full_result_count = False
    # Secrets never show in the admin.
    exclude = ("secret", "previous_secret")
    readonly_fields = ("previous_secret_expires_at", "disabled_at", "failing_since", "last_error")
    action_form = ResendRangeForm
    actions = ("enable", "disable", "resend_failed")

    def has_add_permission(self, request) -> bool:
        # Endpoints are registered through the API, which shows the new secret once.
        return False

    def delete_model(self, request, obj) -> None:
        endpoint_delete(endpoint=obj)  # the API's delete, safe beside a worker's attempt

    def delete_queryset(self, request, queryset) -> None:
        for endpoint in queryset:
            endpoint_delete(endpoint=endpoint)

    @admin.action(description="Enable selected endpoints")
    def enable(self, request, queryset) -> None:
        for endpoint in queryset.filter(enabled=False):
            endpoint_update(endpoint=endpoint, enabled=True)
            self.log_change(request, endpoint, "Enabled.")
        self.message_user(request, "Selected endpoints enabled.")

    @admin.action(description="Disable selected endpoints")
    def disable(self, request, queryset) -> None:
        for endpoint in queryset.filter(enabled=True):
            endpoint_update(endpoint=endpoint, enabled=False, disabled_reason="admin")
            self.log_change(request, endpoint, "Disabled.")
        self.message_user(request, "Selected endpoints disabled.")

    @admin.action(description="Resend failed deliveries in the time range")
    def resend_failed(self, request, queryset) -> None:
        form = ResendRangeForm(request.POST)
        form.is_valid()
        until = form.cleaned_data.get("until") or timezone.now()
        since = form.cleaned_data.get("since") or until - timedelta(hours=24)
        sent = 0
        for endpoint in queryset:
            try:
                count = len(services.endpoint_recover(endpoint=endpoint, since=since, until=until))
            except ApplicationError as e:
                self.message_user(request, f"{endpoint}: {e.detail}", messages.ERROR)
                continue
            if count:
                self.log_change(
                    request, endpoint, f"Resent {count} failed deliveries from {since} to {until}."
                )
            sent += count
        self.message_user(request, f"{sent} failed delivery(ies) queued for resend.")


class WebhookAttemptInline(admin.TabularInline):
    model = WebhookAttempt
    extra = 0
    can_delete = False
    fields = (
        "number",
        "at",
        "status_code",
        "duration_ms",
        "error",
        "response_excerpt",
        "private_target",
        "trigger",
    )
    readonly_fields = fields

    def has_add_permission(self, request, obj=None) -> bool:
        return False


@admin.register(WebhookDelivery)
class WebhookDeliveryAdmin(admin.ModelAdmin):
    list_display = ("message", "url", "status", "attempt_count", "next_attempt_at", "last_error")
    list_filter = ("status",)
    list_select_related = ("message",)
    show_full_result_count = False
    search_fields = ("url",)  # shows the box; get_search_results does the search
    search_help_text = (
        "A delivery id or a run id (UUID), a webhook-id (msg_…), or part of the target URL."
    )
    readonly_fields = [f.name for f in WebhookDelivery._meta.fields]
    inlines = [WebhookAttemptInline]
    actions = ["resend"]

    def has_add_permission(self, request) -> bool:
        return False  # deliveries come from run events

    def get_search_results(self, request, queryset, search_term):
        """Ids match exactly, on their indexes: a webhook-id (the message, which is what a
        receiver logs), a delivery id or a run id. Anything else is a substring of the URL."""
        term = search_term.strip()
        if not term:
            return queryset, False
        if term.startswith("msg_"):
            return queryset.filter(message_id=term), False
        try:
            uid = uuid.UUID(term)
        except ValueError:
            return queryset.filter(url__icontains=term), False
        of_run = WebhookMessage.objects.filter(run_id=uid).values("pk")
        return queryset.filter(Q(pk=uid) | Q(message_id__in=of_run)), False

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


def run_deliveries(run: Run) -> str:
    """The deliveries of a run, on its admin page."""
    rows = WebhookDelivery.objects.filter(message__run=run).select_related("message")
    items = [
        (
            reverse("admin:webhooks_webhookdelivery_change", args=[d.pk]),
            d.message.event_type,
            d.url,
            d.status,
            d.attempt_count,
            d.next_attempt_at or "-",
            d.last_error or "-",
        )
        for d in rows.order_by("created_at")
    ]
    if not items:
        return ""
    return format_html(
        "<table><tr><th>event</th><th>url</th><th>status</th><th>attempts</th>"
        "<th>next attempt</th><th>last error</th></tr>{}</table>",
        format_html_join(
            "",
            '<tr><td><a href="{}">{}</a></td><td>{}</td><td>{}</td><td>{}</td>'
            "<td>{}</td><td>{}</td></tr>",
            items,
        ),
    )


run_panel_register(run_deliveries)
