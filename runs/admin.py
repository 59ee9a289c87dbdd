"""The operators' console for runs and chains.

Every action goes through the services the API uses (run_cancel, run_create, run_respond,
chain_publish) and is recorded as a LogEntry. Run lists stay fast on large tables: related rows
joined, big columns deferred, no full count, and a capped count for the filtered one.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from functools import cached_property

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db import transaction
from django.db.models import Count, Q
from django.db.models.fields.json import KT
from django.http import HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join

from agentsvc.errors import ApplicationError
from agentsvc.models import DISPLAY_PREFIX_LEN, KEY_PREFIX, ApiKey
from runs import inputs, services
from runs.chains import ChainDefinitionError, chain_definition_normalize, chain_publish
from runs.models import ACTIVE_STATUSES, Agent, Chain, Run, RunEvent, RunStatus
from runs.timefmt import iso

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


class WaitingFilter(admin.SimpleListFilter):
    """Runs waiting for a person, by how long they have waited (their request's requested_at,
    RFC 3339 UTC text, compares in time order)."""

    title = "waiting for input"
    parameter_name = "waiting"
    AGES = {"any": None, "1h": timedelta(hours=1), "1d": timedelta(days=1)}

    def lookups(self, request, model_admin):
        return (("any", "waiting"), ("1h", "waiting over 1 hour"), ("1d", "waiting over 1 day"))

    def queryset(self, request, queryset):
        if self.value() not in self.AGES:
            return queryset
        waiting = queryset.filter(status=RunStatus.INPUT_REQUIRED)
        age = self.AGES[self.value()]
        if age is None:
            return waiting
        cutoff = iso(timezone.now() - age)
        return waiting.alias(asked=KT("input_request__requested_at")).filter(asked__lt=cutoff)


def _waited(run: Run) -> str:
    """How long a waiting run has waited, for people: "3 h 12 min", "40 s"."""
    asked = datetime.fromisoformat(run.input_request["requested_at"])
    seconds = int((timezone.now() - asked).total_seconds())
    if seconds < 60:
        return f"{seconds} s"
    minutes = seconds // 60
    if minutes < 60:
        return f"{minutes} min"
    hours = minutes // 60
    return f"{hours} h {minutes % 60} min" if hours < 48 else f"{hours // 24} days"


class AnswerForm(forms.Form):
    """Staff's answer to a request: approve or refuse an approval; an input as JSON."""

    input = forms.JSONField(
        required=False,
        widget=forms.Textarea(attrs={"rows": 8, "cols": 80, "style": "font-family: monospace"}),
        help_text="A JSON object matching the request's schema.",
    )


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
        "waiting_for",
        "cost",
        "tokens",
    )
    list_filter = (
        "status",
        WaitingFilter,
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
    actions = ("cancel_selected", "rerun", "approve_selected", "refuse_selected")
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
        ("Waiting for input", {"fields": ("input_request_pretty",)}),
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

    @admin.display(description="waiting")
    def waiting_for(self, run: Run) -> str:
        return _waited(run) if run.is_waiting and run.input_request else "-"

    @admin.display(description="request")
    def input_request_pretty(self, run: Run) -> str:
        if not run.is_waiting or not run.input_request:
            return "-"
        request = {k: v for k, v in run.input_request.items() if k != "key"}
        url = reverse("admin:runs_run_answer", args=[run.pk])
        return format_html(
            '{}<p>Waiting for {}. <a class="button" href="{}">Answer this request</a></p>',
            _pretty(request),
            _waited(run),
            url,
        )

    def get_urls(self):
        answer = path(
            "<uuid:run_id>/answer/",
            self.admin_site.admin_view(self.answer_view),
            name="runs_run_answer",
        )
        return [answer, *super().get_urls()]

    def _respond(self, request, run: Run, **answer) -> bool:
        """Answer as the staff user (recorded as `staff:<username>`); False with a message
        when the service refuses."""
        request_id = run.input_request["request_id"]
        try:
            inputs.run_respond(
                run=run,
                request_id=request_id,
                by=inputs.answerer_of_staff(request.user.get_username()),
                **answer,
            )
        except ApplicationError as e:
            errors = "; ".join(f"{x['field']}: {x['message']}" for x in e.extra.get("errors", []))
            detail = f"{e.detail} {errors}".strip()
            self.message_user(request, f"{run.id}: {detail}", messages.ERROR)
            return False
        shown = json.dumps(answer.get("answer")) if "answer" in answer else answer
        self.log_change(request, run, f"Answered {request_id}: {shown}.")
        return True

    def answer_view(self, request, run_id):
        """Approve, refuse or answer a waiting run's request."""
        run = get_object_or_404(Run.objects.select_related("chain"), pk=run_id)
        if not self.has_view_permission(request, run):
            raise PermissionDenied
        change_url = reverse("admin:runs_run_change", args=[run.pk])
        waiting = run.is_waiting and run.input_request
        form = AnswerForm(request.POST or None)
        if request.method == "POST" and waiting:
            done = False
            kind = run.input_request["kind"]
            if kind == inputs.APPROVAL and request.POST.get("approve") in ("yes", "no"):
                done = self._respond(request, run, approve=request.POST["approve"] == "yes")
            elif kind == inputs.INPUT and form.is_valid():
                done = self._respond(request, run, answer=form.cleaned_data["input"])
            if done:
                self.message_user(request, f"{run.id}: answered; the run is queued again.")
                return HttpResponseRedirect(change_url)
        context = {
            **self.admin_site.each_context(request),
            "title": f"Answer run {str(run.id)[:8]}",
            "opts": self.model._meta,
            "run": run,
            "waiting": bool(waiting),
            "request_shown": _pretty(
                {k: v for k, v in (run.input_request or {}).items() if k != "key"}
            ),
            "kind": (run.input_request or {}).get("kind"),
            "form": form,
            "change_url": change_url,
        }
        return TemplateResponse(request, "admin/runs/run/answer.html", context)

    @admin.action(description="Approve selected runs' approval requests")
    def approve_selected(self, request, queryset) -> None:
        self._answer_selected(request, queryset, approve=True)

    @admin.action(description="Refuse selected runs' approval requests")
    def refuse_selected(self, request, queryset) -> None:
        self._answer_selected(request, queryset, approve=False)

    def _answer_selected(self, request, queryset, *, approve: bool) -> None:
        done = 0
        for run in queryset.filter(status=RunStatus.INPUT_REQUIRED).select_related("chain"):
            if run.input_request.get("kind") != inputs.APPROVAL:
                self.message_user(
                    request,
                    f"{run.id}: asks for an input; answer it on its page.",
                    messages.WARNING,
                )
                continue
            done += self._respond(request, run, approve=approve)
        verb = "approved" if approve else "refused"
        self.message_user(request, f"{done} request(s) {verb}.")

    @admin.display(description="metadata")
    def metadata_pretty(self, run: Run) -> str:
        return _pretty(run.metadata)

    @admin.display(description="deliveries")
    def deliveries(self, run: Run) -> str:
        parts = [html for panel in _run_panels if (html := panel(run))]
        return format_html_join("", "{}", ((part,) for part in parts)) if parts else "None"

    @admin.action(description="Cancel selected runs (queued, running or waiting for input)")
    def cancel_selected(self, request, queryset) -> None:
        done = 0
        for run in queryset.filter(status__in=[*ACTIVE_STATUSES, RunStatus.INPUT_REQUIRED]):
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
    default_wait = Chain._meta.get_field("input_timeout_s").default
    if chain.input_timeout_s != default_wait:
        output["input_timeout_s"] = chain.input_timeout_s
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
                {
                    k: t[k]
                    for k in ("function", "name", "description", "parameters", "needs_approval")
                    if k in t
                }
                for t in a.tools
            ]
            agent["max_tool_rounds"] = a.max_tool_rounds
            agent["tool_timeout_s"] = a.tool_timeout_s
        for wait in ("approval", "ask"):
            if getattr(a, wait) is not None:
                agent[wait] = getattr(a, wait)
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
