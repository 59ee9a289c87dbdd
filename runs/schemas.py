"""Documentation-only serializers: the shapes runs/presenters.py builds by hand."""

from __future__ import annotations

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from runs.models import ChainKind, RunStatus


@extend_schema_field({"type": ["string", "object", "null"]})
class RunOutputField(serializers.JSONField):
    """Text, or the JSON object of a chain with an output_schema; null until completed."""


@extend_schema_field({"type": ["object", "null"], "additionalProperties": True})
class OutputSchemaField(serializers.JSONField):
    pass


class AgentSummary(serializers.Serializer):
    name = serializers.CharField()
    provider = serializers.CharField()
    model = serializers.CharField()
    tools = serializers.ListField(
        child=serializers.CharField(), help_text="The names of the tools the agent may call."
    )


class ChainOut(serializers.Serializer):
    name = serializers.CharField()
    version = serializers.IntegerField()
    description = serializers.CharField()
    kind = serializers.ChoiceField(
        choices=ChainKind.choices,
        help_text="agents: the file's agents in order; function, langgraph, openai_agents: "
        "the code at `entrypoint`.",
    )
    entrypoint = serializers.CharField(
        allow_null=True, help_text="A code chain's `module:attr`; null for a file chain."
    )
    source_hash = serializers.CharField(
        allow_null=True,
        help_text="SHA-256 of the entrypoint module's source when this version was published.",
    )
    agents = AgentSummary(many=True, help_text="A file chain's agents; empty for a code chain.")
    input_schema = serializers.JSONField()
    output_schema = OutputSchemaField(
        help_text="JSON Schema of a run's output, or null: the output is then text.",
    )
    timeout_s = serializers.IntegerField()
    estimated_duration_s = serializers.IntegerField()
    available = serializers.BooleanField()
    created_at = serializers.DateTimeField()


class ChainPage(serializers.Serializer):
    results = ChainOut(many=True)
    next = serializers.CharField(allow_null=True)


class RunHandle(serializers.Serializer):
    run_id = serializers.UUIDField()
    status = serializers.ChoiceField(RunStatus.choices)
    chain = serializers.CharField()
    version = serializers.IntegerField()
    created_at = serializers.DateTimeField()
    estimated_duration_s = serializers.IntegerField()
    poll_url = serializers.CharField()
    events_url = serializers.CharField()
    ws_url = serializers.CharField()


class RunBatchOut(serializers.Serializer):
    results = RunHandle(many=True, help_text="One handle per item, in the items' order.")


class RunError(serializers.Serializer):
    code = serializers.CharField()
    message = serializers.CharField()


class Progress(serializers.Serializer):
    current_agent = serializers.CharField(allow_null=True)
    agents_completed = serializers.IntegerField()
    agents_total = serializers.IntegerField()


class UsageOut(serializers.Serializer):
    input_tokens = serializers.IntegerField()
    output_tokens = serializers.IntegerField()
    total_tokens = serializers.IntegerField()


class WebhookOut(serializers.Serializer):
    url = serializers.URLField()
    events = serializers.ListField(child=serializers.CharField())


class InputRequestOut(serializers.Serializer):
    request_id = serializers.CharField(help_text="Send it back with the answer.")
    kind = serializers.ChoiceField(
        ["approval", "input"], help_text="approval: answer `approve`; input: answer `input`."
    )
    agent = serializers.CharField(
        allow_null=True, help_text="The agent it is asked before (or for); null from code."
    )
    prompt = serializers.CharField()
    schema = serializers.JSONField(
        required=False, help_text="kind input: the JSON Schema the answer's `input` must match."
    )
    tool = serializers.CharField(required=False, help_text="A tool approval: the tool called.")
    call_id = serializers.CharField(required=False, help_text="A tool approval: the call's id.")
    arguments = serializers.JSONField(
        required=False, help_text="A tool approval: the arguments the model wrote."
    )
    requested_at = serializers.DateTimeField()
    expires_at = serializers.DateTimeField(
        help_text="Unanswered by then, the run ends timed_out (input_timeout)."
    )


class RunOut(serializers.Serializer):
    run_id = serializers.UUIDField()
    chain = serializers.CharField()
    version = serializers.IntegerField()
    status = serializers.ChoiceField(RunStatus.choices)
    input = serializers.JSONField()
    output = RunOutputField(
        help_text="Text; for a chain with an output_schema, the JSON value matching it.",
    )
    error = RunError(allow_null=True)
    progress = Progress()
    usage = UsageOut()
    cost = serializers.DecimalField(max_digits=14, decimal_places=6)
    duration_ms = serializers.IntegerField(allow_null=True)
    created_at = serializers.DateTimeField()
    started_at = serializers.DateTimeField(allow_null=True)
    finished_at = serializers.DateTimeField(allow_null=True)
    cancel_requested = serializers.BooleanField()
    input_request = InputRequestOut(
        allow_null=True, help_text="What the run asks while it is input_required; else null."
    )
    metadata = serializers.DictField()
    webhook = WebhookOut(allow_null=True)
    rerun_of = serializers.UUIDField(
        allow_null=True, help_text="The run this one re-runs (POST /runs/{id}/rerun)."
    )
    schedule_id = serializers.UUIDField(
        allow_null=True, help_text="The schedule whose tick started the run (section 10)."
    )
    poll_url = serializers.CharField()
    events_url = serializers.CharField()
    ws_url = serializers.CharField()


class RunPage(serializers.Serializer):
    results = RunOut(many=True)
    next = serializers.CharField(allow_null=True)


class StreamTicketOut(serializers.Serializer):
    ticket = serializers.CharField(
        help_text="`?ticket=` on the run's SSE stream and WebSocket (or the status feed)."
    )
    expires_at = serializers.DateTimeField()
