"""The operators' console for runs and chains.

Every action goes through the services the API uses (run_cancel, run_create, chain_publish) and
is recorded as a LogEntry. Run lists stay fast on large tables: related rows joined, big columns
deferred, no full count, and a capped count for the filtered one.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from functools import cached_property

from django import forms
from django.contrib import admin, messages
from django.core.paginator import Paginator
from django.db import transaction
from django.db.models import Count, Q
from django.urls import reverse
from django.utils.html import format_html, format_html_join

from agentsvc.errors import ApplicationError
from agentsvc.models import DISPLAY_PREFIX_LEN, KEY_PREFIX, ApiKey
from runs import services
from runs.chains import ChainDefinitionError, chain_definition_normalize, chain_publish
from runs.models import ACTIVE_STATUSES, Agent, Chain, Run, RunEvent

COUNT_CAP = 10_000

# What other apps show on a run's page under "Webhook deliveries" (webhooks/admin.py registers
# the run's deliveries): fn(run) -> HTML, or "" for nothing.
_run_panels: list[Callable[[Run], str]] = []


def run_panel_register(panel: Callable[[Run], str]) -> None:
    if panel not in _run_panels:
        _run_panels.append(panel)


class CappedPaginator(Paginator):
    """Counts at most COUNT_CAP rows: a filtered count over millions of runs costs as much as
    the unfiltered one that show_full_result_count = False already avoids."""

    @cached_property
    def count(self) -> int:
        return self.object_list[: COUNT_CAP + 1].count()


def _pretty(value) -> str:
    return format_html("<pre>{}</pre>", json.dumps(value, indent=2, ensure_ascii=False))


class RunEventInline(admin.TabularInline):
    model = RunEvent
    extra = 0
    can_delete = False
    fields = ("seq", "type", "created_at", "data")
    readonly_fields = fields
    ordering = ("seq",)  # newest last, as the log reads

    def has_add_permission(self, request, obj=None) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False


@admin.register(Run)
class RunAdmin(admin.ModelAdmin):
    list_display = (
        "short_id",
        "status",
        "chain",
        "owner",
        "api_key",
        "created_at",
        "duration",
        "cost",
        "tokens",
    )
    list_filter = (
        "status",
        ("chain__name", admin.AllValuesFieldListFilter),
        "owner",
        "created_at",
    )
    list_select_related = ("chain", "owner", "api_key")
    search_fields = ("id",)  # shows the box; get_search_results does the search
    search_help_text = "A run id (the full UUID), or an API key's prefix (ak_AbCdEfGh) or name."
    show_full_result_count = False
    paginator = CappedPaginator
    list_per_page = 50
    ordering = ("-created_at",)
    actions = ("cancel_selected", "rerun")
    inlines = (RunEventInline,)
    fieldsets = (
        (
            None,
            {
                "fields": (
                    ("id", "status"),
                    ("chain", "owner", "api_key"),
                    ("created_at", "started_at", "finished_at", "duration"),
                    ("attempt", "worker", "heartbeat_at", "last_seen_at"),
                    ("cancel_requested_at", "cancel_reason"),
                    "rerun_of",
                )
            },
        ),
        ("Result", {"fields": ("input_pretty", "output", ("error_code", "error_message"))}),
        (
            "Usage",
            {"fields": (("input_tokens", "output_tokens", "cost"), "metadata_pretty")},
        ),
        ("Webhook deliveries", {"fields": ("webhook_url", "deliveries")}),
    )

    def get_queryset(self, request):
        runs = super().get_queryset(request)
        match = request.resolver_match
        if match and match.url_name and match.url_name.endswith("changelist"):
            runs = runs.defer("input", "output", "metadata", "error_message", "webhook_secret")
        return runs

    def get_search_results(self, request, queryset, search_term):
        """Exact matches on indexed columns, never a LIKE over every run: a run id (the primary
        key), else the runs of the API keys with that display prefix or name (the api_key
        index)."""
        term = search_term.strip()
        if not term:
            return queryset, False
        try:
            return queryset.filter(pk=uuid.UUID(term)), False
        except ValueError:
            pass
        match = Q(name__iexact=term)
        if prefix := _key_prefix(term):
            match |= Q(prefix=prefix)
        keys = ApiKey.objects.filter(match).values("pk")
        return queryset.filter(api_key__in=keys), False

    def get_readonly_fields(self, request, obj=None):
        return [f for group in self.fieldsets for f in _flatten(group[1]["fields"])]

    def has_add_permission(self, request) -> bool:
        return False  # runs start through the API (or "re-run")

    def has_change_permission(self, request, obj=None) -> bool:
        return False  # a run's record is its event log: nothing is edited by hand

    def has_delete_permission(self, request, obj=None) -> bool:
        return False  # the keeper's retention deletes runs

    @admin.display(description="run", ordering="created_at")
    def short_id(self, run: Run) -> str:
        return str(run.id)[:8]

    @admin.display(description="duration")
    def duration(self, run: Run) -> str:
        if not (run.started_at and run.finished_at):
            return "-"
        return f"{(run.finished_at - run.started_at).total_seconds():.1f} s"

    @admin.display(description="tokens")
    def tokens(self, run: Run) -> int:
        return run.input_tokens + run.output_tokens

    @admin.display(description="input")
    def input_pretty(self, run: Run) -> str:
        return _pretty(run.input)

    @admin.display(description="metadata")
    def metadata_pretty(self, run: Run) -> str:
        return _pretty(run.metadata)

    @admin.display(description="deliveries")
    def deliveries(self, run: Run) -> str:
        parts = [html for panel in _run_panels if (html := panel(run))]
        return format_html_join("", "{}", ((part,) for part in parts)) if parts else "None"

    @admin.action(description="Cancel selected runs (queued and running)")
    def cancel_selected(self, request, queryset) -> None:
        done = 0
        for run in queryset.filter(status__in=ACTIVE_STATUSES):
            try:
                services.run_cancel(run=run, reason="admin")
            except ApplicationError as e:
                self.message_user(request, f"{run.id}: {e.detail}", messages.WARNING)
                continue
            self.log_change(request, run, "Cancelled (reason: admin).")
            done += 1
        self.message_user(request, f"{done} run(s) cancelled or asked to stop.")

    @admin.action(description="Re-run selected runs (same input, same key)")
    def rerun(self, request, queryset) -> None:
        for run in queryset.select_related("chain", "api_key"):
            if run.api_key is None or not run.api_key.is_active:
                self.message_user(
                    request, f"{run.id}: its API key is gone or revoked.", messages.ERROR
                )
                continue
            try:
                new = services.run_rerun(api_key=run.api_key, run=run)
            except ApplicationError as e:
                self.message_user(request, f"{run.id}: {e.detail}", messages.ERROR)
                continue
            self.log_change(request, run, f"Re-run as {new.id}.")
            self.log_addition(request, new, f"Re-run of {run.id}.")
            url = reverse("admin:runs_run_change", args=[new.id])
            self.message_user(
                request, format_html('{} re-run as <a href="{}">{}</a>.', run.id, url, new.id)
            )


def _key_prefix(term: str) -> str:
    """The display prefix in what an operator pastes: `ak_AbCdEfGh…` as the admin shows it, the
    prefix alone, or a whole key. "" when the term is too short to be one."""
    term = term.removeprefix(KEY_PREFIX).rstrip("….")
    return term[:DISPLAY_PREFIX_LEN] if len(term) >= DISPLAY_PREFIX_LEN else ""


def _flatten(fields) -> list[str]:
    out: list[str] = []
    for f in fields:
        out.extend(f if isinstance(f, tuple) else (f,))
    return out


# --- Chains -------------------------------------------------------------------------------


def chain_definition(chain: Chain) -> dict:
    """A version as the definition it was published from (the form's starting point)."""
    output = {"output_schema": chain.output_schema} if chain.output_schema is not None else {}
    definition = {
        "name": chain.name,
        "description": chain.description,
        "input_schema": chain.input_schema,
        **output,
        "timeout_s": chain.timeout_s,
        "estimated_duration_s": chain.estimated_duration_s,
    }
    if chain.entrypoint:
        return {
            **definition,
            "entrypoint": chain.entrypoint,
            "provider": chain.provider,
            "model": chain.model,
            "max_tokens": chain.max_tokens,
        }
    agents = []
    for a in chain.agents.order_by("position"):
        agent = {
            "name": a.name,
            "provider": a.provider,
            "model": a.model,
            "system_prompt": a.system_prompt,
            "prompt": a.prompt_template,
            "max_tokens": a.max_tokens,
            "temperature": a.temperature,
            "base_url": a.base_url,
        }
        if a.tools:
            agent["tools"] = [
                {k: t[k] for k in ("function", "name", "description", "parameters")}
                for t in a.tools
            ]
            agent["max_tool_rounds"] = a.max_tool_rounds
            agent["tool_timeout_s"] = a.tool_timeout_s
        agents.append(agent)
    return {**definition, "agents": agents}


class ChainDefinitionForm(forms.ModelForm):
    """One field, the whole definition: saving publishes it as a new version."""

    definition = forms.JSONField(
        widget=forms.Textarea(attrs={"rows": 30, "cols": 100, "style": "font-family: monospace"}),
        help_text="Saving publishes this as the next version (if it changed); runs keep the "
        "version they started on.",
    )

    class Meta:
        model = Chain
        fields: list[str] = []

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.instance.pk and not self.is_bound:
            self.initial["definition"] = chain_definition(self.instance)

    def clean_definition(self) -> dict:
        raw = self.cleaned_data["definition"]
        try:
            definition = chain_definition_normalize(raw)
        except ChainDefinitionError as e:
            raise forms.ValidationError(str(e)) from None
        if self.instance.pk and definition["name"] != self.instance.name:
            raise forms.ValidationError("A new version keeps the chain's name.")
        return raw


class AgentInline(admin.TabularInline):
    model = Agent
    extra = 0
    can_delete = False
    fields = (
        "position",
        "name",
        "provider",
        "model",
        "max_tokens",
        "temperature",
        "base_url",
        "tool_names",
    )
    readonly_fields = fields

    @admin.display(description="tools")
    def tool_names(self, agent: Agent) -> str:
        return ", ".join(t["function"] for t in agent.tools) or "-"

    def has_add_permission(self, request, obj=None) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False  # a version is immutable: runs refer to it


@admin.register(Chain)
class ChainAdmin(admin.ModelAdmin):
    form = ChainDefinitionForm
    list_display = (
        "name",
        "version",
        "kind",
        "published",
        "agent_count",
        "timeout_s",
        "created_at",
    )
    list_filter = ("published", "name")
    search_fields = ("name",)
    show_full_result_count = False
    inlines = (AgentInline,)
    readonly_fields = (
        "version",
        "published",
        "created_at",
        "versions",
        "kind",
        "entrypoint",
        "source_hash",
    )
    fieldsets = (
        (
            None,
            {
                "fields": (
                    ("version", "published", "created_at"),
                    ("kind", "entrypoint", "source_hash"),
                    "versions",
                )
            },
        ),
        ("Publish a new version", {"fields": ("definition",)}),
    )
    add_fieldsets = ((None, {"fields": ("definition",)}),)

    def get_fieldsets(self, request, obj=None):
        return self.add_fieldsets if obj is None else self.fieldsets

    def get_queryset(self, request):
        return super().get_queryset(request).annotate(agents_n=Count("agents"))

    def has_delete_permission(self, request, obj=None) -> bool:
        return False  # runs refer to versions (PROTECT)

    @admin.display(description="agents", ordering="agents_n")
    def agent_count(self, chain: Chain) -> int:
        return chain.agents_n

    @admin.display(description="all versions")
    def versions(self, chain: Chain) -> str:
        rows = Chain.objects.filter(name=chain.name).order_by("-version")
        return format_html_join(
            " · ",
            '<a href="{}">v{}</a>{}',
            (
                (
                    reverse("admin:runs_chain_change", args=[c.pk]),
                    c.version,
                    " (this)" if c.pk == chain.pk else "",
                )
                for c in rows.only("pk", "version")
            ),
        )

    def save_form(self, request, form, change):
        """Publish through chain_publish (the loader's one path) instead of editing a row."""
        with transaction.atomic():
            chain, created = chain_publish(definition=form.cleaned_data["definition"])
        request._chain_published = created
        return chain

    def save_model(self, request, obj, form, change) -> None:
        pass  # chain_publish saved it

    def save_related(self, request, form, formsets, change) -> None:
        pass  # agents are part of the version chain_publish wrote

    def construct_change_message(self, request, form, formsets, add=False):
        return [{"added" if add else "changed": {"fields": ["definition"]}}]

    def response_change(self, request, obj):
        if getattr(request, "_chain_published", False):
            self.message_user(request, f"Published {obj.name} v{obj.version}.")
        else:
            self.message_user(request, "The definition is unchanged: no new version.")
        return self.response_post_save_change(request, obj)

    def log_change(self, request, obj, message):
        if getattr(request, "_chain_published", False):
            return self.log_addition(request, obj, f"Published v{obj.version}.")
        return super().log_change(request, obj, message)
