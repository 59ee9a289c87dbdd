from __future__ import annotations

import uuid

from django.db import models
from django.db.models import Q

from agentsvc.models import ApiKey, Owner
from runs.events import TERMINAL_EVENTS  # noqa: F401 - re-exported for callers


class ChainKind(models.TextChoices):
    AGENTS = "agents"  # the file's `agents:`, run one after another
    FUNCTION = "function"  # an async function (ctx, input) -> output
    LANGGRAPH = "langgraph"  # a compiled LangGraph graph
    OPENAI_AGENTS = "openai_agents"  # an OpenAI Agents SDK Agent


class Chain(models.Model):
    """One version of a chain. Publishing a change adds a row with the next version."""

    name = models.SlugField(max_length=100)
    kind = models.CharField(max_length=16, choices=ChainKind.choices, default=ChainKind.AGENTS)
    # Code chains: `module:attr`, and the SHA-256 of the module's source when published (part
    # of the definition's hash, so a changed module is a new version).
    entrypoint = models.CharField(max_length=300, blank=True)
    source_hash = models.CharField(max_length=64, blank=True)
    # Code chains: the provider and model their agents use unless they name one, and the tokens
    # a run reserves of its key's budget (a file chain reserves its agents' max_tokens).
    provider = models.CharField(max_length=50, blank=True)
    model = models.CharField(max_length=200, blank=True)
    max_tokens = models.PositiveIntegerField(default=0)
    version = models.PositiveIntegerField()
    description = models.TextField(blank=True)
    input_schema = models.JSONField(default=dict)
    # JSON Schema of the run's output: the last agent is asked for JSON matching it (OpenAI
    # `response_format` json_schema), and the run's output is the parsed value. Null: text.
    output_schema = models.JSONField(null=True, blank=True)
    timeout_s = models.PositiveIntegerField(default=120)
    # How long a run of this version waits for a person's answer (approval or input) before the
    # keeper ends it timed_out (input_timeout); at most INPUT_TIMEOUT_MAX_S.
    input_timeout_s = models.PositiveIntegerField(default=86400)
    estimated_duration_s = models.PositiveIntegerField(default=30)
    published = models.BooleanField(default=True)
    # SHA-256 of the canonical definition: loading an unchanged file adds no version.
    definition_hash = models.CharField(max_length=64)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["name", "version"], name="chain_name_version_uniq"),
            models.CheckConstraint(condition=Q(version__gte=1), name="chain_version_positive"),
            models.CheckConstraint(condition=Q(timeout_s__gte=1), name="chain_timeout_positive"),
        ]
        ordering = ["name", "-version"]

    def __str__(self) -> str:
        return f"{self.name} v{self.version}"


class Agent(models.Model):
    chain = models.ForeignKey(Chain, on_delete=models.CASCADE, related_name="agents")
    position = models.PositiveIntegerField()
    name = models.SlugField(max_length=100)
    provider = models.CharField(max_length=50)
    model = models.CharField(max_length=200)
    system_prompt = models.TextField(blank=True)
    # Django template syntax over {input, outputs, previous}.
    prompt_template = models.TextField()
    max_tokens = models.PositiveIntegerField(default=512)
    temperature = models.FloatField(default=0.7)
    # Optional per-agent server; the API key still comes from the provider's environment variable.
    base_url = models.URLField(blank=True)
    # Python callables the model may call: [{name, function: "module:attr", description,
    # parameters: JSON Schema}], and the bounds of its tool loop.
    tools = models.JSONField(default=list, blank=True)
    max_tool_rounds = models.PositiveIntegerField(default=8)
    tool_timeout_s = models.FloatField(default=30)
    # What a person is asked before the agent runs: `approval` {prompt} (refused: the run fails
    # input_refused) or `ask` {prompt, schema} (the answer reaches the prompt as
    # {{ answers.<name> }}). Prompts are templates over the agent prompt's context.
    approval = models.JSONField(null=True, blank=True)
    ask = models.JSONField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["chain", "position"], name="agent_chain_position_uniq"),
            models.UniqueConstraint(fields=["chain", "name"], name="agent_chain_name_uniq"),
        ]
        ordering = ["chain", "position"]

    def __str__(self) -> str:
        return f"{self.chain} #{self.position} {self.name}"


class RunStatus(models.TextChoices):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"
    # Stopped at a step boundary until a person answers (Run.input_request); holds no executor,
    # no active-run slot of its key and no token reservation beyond what it used.
    INPUT_REQUIRED = "input_required"


# Runs that hold an active-run slot of their key and an executor's attention (or wait for one).
ACTIVE_STATUSES = frozenset({RunStatus.QUEUED, RunStatus.RUNNING})
TERMINAL_STATUSES = frozenset(
    {RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED, RunStatus.TIMED_OUT}
)


class Run(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(Owner, on_delete=models.CASCADE, related_name="runs")
    api_key = models.ForeignKey(ApiKey, on_delete=models.SET_NULL, null=True, blank=True)
    chain = models.ForeignKey(Chain, on_delete=models.PROTECT, related_name="runs")
    status = models.CharField(max_length=16, choices=RunStatus.choices, default=RunStatus.QUEUED)

    input = models.JSONField(default=dict)
    output = models.TextField(null=True, blank=True)  # noqa: DJ001 - null until completed
    metadata = models.JSONField(default=dict, blank=True)
    error_code = models.CharField(max_length=64, blank=True)
    error_message = models.TextField(blank=True)

    current_agent = models.CharField(max_length=100, blank=True)
    agents_completed = models.PositiveIntegerField(default=0)
    agents_total = models.PositiveIntegerField(default=0)

    input_tokens = models.PositiveIntegerField(default=0)
    output_tokens = models.PositiveIntegerField(default=0)
    cost = models.DecimalField(max_digits=14, decimal_places=6, default=0)

    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    deadline_at = models.DateTimeField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    worker = models.CharField(max_length=100, blank=True)
    # 1 for the first execution; the keeper retries a run whose worker was lost once (2).
    attempt = models.PositiveSmallIntegerField(default=1)
    # When a client last polled or streamed the run (runs/seen.py); the keeper cancels runs
    # without a webhook that nobody watches.
    last_seen_at = models.DateTimeField(null=True, blank=True)

    cancel_requested_at = models.DateTimeField(null=True, blank=True)
    cancel_reason = models.CharField(max_length=16, blank=True)

    # While the run waits for a person (input_required): what it asks, {request_id, key (the
    # step the answer is recorded as), kind, agent, prompt, schema?, tool?, arguments?,
    # requested_at, expires_at}, and when the keeper ends it unanswered. Null otherwise.
    input_request = models.JSONField(null=True, blank=True)
    input_expires_at = models.DateTimeField(null=True, blank=True)

    # Tokens this run reserved against its key's per-minute budget, and in which window.
    tokens_reserved = models.PositiveIntegerField(default=0)
    tokens_window = models.PositiveBigIntegerField(default=0)

    # The last event number handed out; incremented under the row lock, so seq is gapless.
    last_seq = models.PositiveIntegerField(default=0)

    # The run this one re-runs (POST /runs/{id}/rerun, the admin's Re-run), if any. Its index
    # (Django's, on every foreign key) serves the SET NULL when retention deletes the original.
    rerun_of = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="reruns"
    )

    # The schedule whose tick started the run (schedules/), if any. A plain column, not a
    # foreign key: runs outlive a deleted schedule and still list by its id, and the runs app
    # does not depend on the schedules app (which depends on it).
    schedule_id = models.UUIDField(null=True, blank=True)

    webhook_url = models.URLField(max_length=2000, blank=True)
    webhook_secret = models.CharField(max_length=200, blank=True)
    webhook_events = models.JSONField(default=list, blank=True)

    # The W3C traceparent of the request that created the run (tracing on): its execution, model
    # calls and webhook attempts are spans of that trace.
    trace_parent = models.CharField(max_length=55, blank=True, default="")

    class Meta:
        indexes = [
            # GET /runs: an owner's runs newest first, keyset-paginated on (created_at, id).
            models.Index(fields=["owner", "-created_at", "-id"], name="run_owner_created_idx"),
            # Filtered lists and operator views by status.
            models.Index(fields=["owner", "status", "-created_at"], name="run_owner_status_idx"),
            # The active-runs limit counts a key's queued and running runs.
            models.Index(
                fields=["api_key", "status"],
                name="run_key_active_idx",
                condition=Q(status__in=["queued", "running"]),
            ),
            # Workers and the reaper find queued and running runs.
            models.Index(
                fields=["status", "heartbeat_at"],
                name="run_active_idx",
                condition=Q(status__in=["queued", "running"]),
            ),
            # An executor's heartbeat and its cancellation check: its running runs.
            models.Index(
                fields=["worker"],
                name="run_worker_running_idx",
                condition=Q(status="running"),
            ),
            # GET /runs?schedule=: an owner's runs of one schedule newest first, keyset-paginated.
            models.Index(
                fields=["owner", "schedule_id", "-created_at", "-id"],
                name="run_owner_schedule_idx",
                condition=Q(schedule_id__isnull=False),
            ),
            # The keeper's expiry of unanswered requests, and the operators' list of waiting runs
            # (soonest to expire first); only waiting runs are in it.
            models.Index(
                fields=["input_expires_at"],
                name="run_input_waiting_idx",
                condition=Q(status="input_required"),
            ),
            # The admin's run list: every owner's runs newest first.
            models.Index(fields=["-created_at"], name="run_created_idx"),
            # Retention: the keeper deletes finished runs oldest first.
            models.Index(
                fields=["finished_at"],
                name="run_finished_idx",
                condition=Q(finished_at__isnull=False),
            ),
        ]
        constraints = [
            models.CheckConstraint(
                condition=Q(status__in=[s.value for s in RunStatus]), name="run_status_valid"
            ),
        ]

    def __str__(self) -> str:
        return str(self.id)

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @property
    def is_waiting(self) -> bool:
        return self.status == RunStatus.INPUT_REQUIRED


class Executor(models.Model):
    """A live executor process: its heartbeat says it is alive (readiness, the dashboard), and
    its id is the `worker` of every run it holds."""

    id = models.CharField(max_length=100, primary_key=True)
    host = models.CharField(max_length=255)
    pid = models.PositiveIntegerField()
    started_at = models.DateTimeField()
    heartbeat_at = models.DateTimeField()
    capacity = models.PositiveIntegerField()
    in_flight = models.PositiveIntegerField(default=0)
    draining = models.BooleanField(default=False)

    def __str__(self) -> str:
        return self.id


class RunEvent(models.Model):
    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="events")
    seq = models.PositiveIntegerField()
    type = models.CharField(max_length=32)
    data = models.JSONField()
    created_at = models.DateTimeField()

    class Meta:
        constraints = [
            # Readers page by (run, seq > cursor); the constraint's index serves that query.
            models.UniqueConstraint(fields=["run", "seq"], name="runevent_run_seq_uniq"),
        ]
        ordering = ["run", "seq"]

    def __str__(self) -> str:
        return f"{self.run_id}#{self.seq} {self.type}"


class RunStep(models.Model):
    """A step of a run that finished: a model call, a tool call, an agent, a code chain's step
    or a graph's super-step. Written in the transaction of the step's events, so a run resumed
    by another execution starts at the first step that is not here, and every step's usage
    counts once (the run's totals are the sum of its steps')."""

    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="steps")
    # Where the step is in the run: "a0" (the first agent), "a0/m1" (its second model call),
    # "a0/m1/t0" (that call's first tool call), "c2:draft" (a code chain's third step).
    key = models.CharField(max_length=200)
    attempt = models.PositiveSmallIntegerField()
    data = models.JSONField()
    input_tokens = models.PositiveIntegerField(default=0)
    output_tokens = models.PositiveIntegerField(default=0)
    cost = models.DecimalField(max_digits=14, decimal_places=6, default=0)
    created_at = models.DateTimeField()

    class Meta:
        constraints = [
            # A step finishes once; the constraint's index serves the resume's read by run.
            models.UniqueConstraint(fields=["run", "key"], name="runstep_run_key_uniq"),
        ]

    def __str__(self) -> str:
        return f"{self.run_id} {self.key}"


class RunTotal(models.Model):
    """What /metrics counts of finished runs, by chain, status and duration bucket: added to in
    the transaction of the runs' terminal events (runs/totals.py), never lowered. Retention
    deletes runs, not these, so the counters built from them only go up."""

    chain = models.CharField(max_length=100)
    status = models.CharField(max_length=16)
    # The upper bound of the duration bucket ("0.5", "+Inf"; "" for runs that never started),
    # so a change of buckets leaves old rows readable.
    le = models.CharField(max_length=16)
    runs = models.BigIntegerField(default=0)
    duration_s = models.FloatField(default=0)
    input_tokens = models.BigIntegerField(default=0)
    output_tokens = models.BigIntegerField(default=0)
    cost = models.DecimalField(max_digits=20, decimal_places=6, default=0)

    class Meta:
        constraints = [
            # The upsert's conflict target; /metrics reads the whole (small) table.
            models.UniqueConstraint(fields=["chain", "status", "le"], name="runtotal_key_uniq"),
        ]

    def __str__(self) -> str:
        return f"{self.chain} {self.status} le={self.le}: {self.runs}"
