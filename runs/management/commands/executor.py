"""`python manage.py executor`: the process that runs the chains (runs/execution/executor.py)."""

from __future__ import annotations

from django.conf import settings
from django.core.management.base import BaseCommand

from runs.execution.executor import executor_main


class Command(BaseCommand):
    help = "Execute queued runs, up to RUN_CONCURRENCY at once; SIGTERM drains and hands back."

    def add_arguments(self, parser):
        parser.add_argument(
            "--concurrency",
            type=int,
            default=None,
            help="runs in flight at most (default: RUN_CONCURRENCY)",
        )

    def handle(self, *args, **options):
        capacity = options["concurrency"] or settings.RUN_CONCURRENCY
        executor_main(capacity=capacity, threads=settings.EXECUTOR_DB_THREADS)
