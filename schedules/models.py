"""Scheduled runs: a chain, an input and a timing (cron in a time zone, or an interval)."""

from __future__ import annotations

import uuid

from django.db import models
from django.db.models import Q

from agentsvc.models import ApiKey, Owner


class Schedule(models.Model):
    """Each tick starts an ordinary run with the key that created the schedule.

    The tick due is `next_run_at`: whoever moves it on with a conditional UPDATE (from the value
    it read) starts the run, in the same transaction, so a tick runs once however many executors
    look at it. Paused: no next run."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(Owner, on_delete=models.CASCADE, related_name="schedules")
    # The key whose limits every tick's run counts against; a revoked or deleted key's ticks are
    # refused (and recorded).
    api_key = models.ForeignKey(ApiKey, on_delete=models.SET_NULL, null=True, blank=True)
    # By name: each tick runs the chain's newest published version, or `version` when pinned.
    chain = models.SlugField(max_length=100)
    version = models.PositiveIntegerField(null=True, blank=True)
    # Exactly one of cron (five fields, in `timezone`) and interval_s.
    cron = models.CharField(max_length=200, blank=True)
    timezone = models.CharField(max_length=64, blank=True)
    interval_s = models.PositiveIntegerField(null=True, blank=True)

    input = models.JSONField(default=dict)
    metadata = models.JSONField(default=dict, blank=True)
    webhook_url = models.URLField(max_length=2000, blank=True)
    webhook_secret = models.CharField(max_length=200, blank=True)
    webhook_events = models.JSONField(default=list, blank=True)

    paused = models.BooleanField(default=False)
    next_run_at = models.DateTimeField(null=True, blank=True)
    # The latest tick that started a run, and the latest tick refused (a limit, a chain gone, a
    # revoked key): its problem code, detail and time; cleared by the next tick that starts one.
    last_run_at = models.DateTimeField(null=True, blank=True)
    last_run_id = models.UUIDField(null=True, blank=True)
    last_error_code = models.CharField(max_length=64, blank=True)
    last_error = models.CharField(max_length=500, blank=True)
    last_error_at = models.DateTimeField(null=True, blank=True)

    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        indexes = [
            # GET /schedules: an owner's schedules newest first, keyset-paginated.
            models.Index(fields=["owner", "-created_at", "-id"], name="schedule_owner_created_idx"),
            # The executors' clock: active schedules whose tick is due, soonest first.
            models.Index(
                fields=["next_run_at"], name="schedule_due_idx", condition=Q(paused=False)
            ),
        ]
        constraints = [
            models.CheckConstraint(
                condition=(Q(cron="") & Q(interval_s__isnull=False))
                | (~Q(cron="") & Q(interval_s__isnull=True)),
                name="schedule_cron_xor_interval",
            ),
            # An active schedule always has its next tick, so the clock can never lose it.
            models.CheckConstraint(
                condition=Q(paused=True) | Q(next_run_at__isnull=False),
                name="schedule_active_has_next_run",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.chain} {self.cron or f'every {self.interval_s} s'}"
