"""Schedules in the operators' console: list, pause, resume and delete, through the API's
services, each recorded as a LogEntry."""

from __future__ import annotations

from django.contrib import admin

from schedules.models import Schedule
from schedules.services import schedule_delete, schedule_pause, schedule_resume


@admin.register(Schedule)
class ScheduleAdmin(admin.ModelAdmin):
    list_display = (
        "id",
        "owner",
        "chain",
        "timing",
        "paused",
        "next_run_at",
        "last_run_at",
        "last_error_code",
        "last_error_at",
    )
    list_filter = ("paused", "chain")
    list_select_related = ("owner",)
    search_fields = ("chain", "owner__name")
    show_full_result_count = False
    # Read-only (pause, resume and delete are the actions); the webhook secret never shows.
    exclude = ("webhook_secret",)
    readonly_fields = [f.name for f in Schedule._meta.fields if f.name != "webhook_secret"]
    actions = ("pause", "resume")

    def has_add_permission(self, request) -> bool:
        return False  # created through the API, with the key whose limits its runs count against

    def has_change_permission(self, request, obj=None) -> bool:
        return False  # read-only; pause, resume and delete are the actions

    def delete_model(self, request, obj) -> None:
        schedule_delete(schedule=obj)

    def delete_queryset(self, request, queryset) -> None:
        for schedule in queryset:
            schedule_delete(schedule=schedule)

    @admin.display(description="timing")
    def timing(self, schedule: Schedule) -> str:
        if schedule.cron:
            return f"{schedule.cron} ({schedule.timezone})"
        return f"every {schedule.interval_s} s"

    @admin.action(description="Pause selected schedules")
    def pause(self, request, queryset) -> None:
        paused = 0
        for schedule in queryset.filter(paused=False):
            schedule_pause(schedule=schedule)
            self.log_change(request, schedule, "Paused.")
            paused += 1
        self.message_user(request, f"{paused} schedule(s) paused.")

    @admin.action(description="Resume selected schedules")
    def resume(self, request, queryset) -> None:
        resumed = 0
        for schedule in queryset.filter(paused=True):
            schedule_resume(schedule=schedule)
            self.log_change(request, schedule, "Resumed.")
            resumed += 1
        self.message_user(request, f"{resumed} schedule(s) resumed.")
