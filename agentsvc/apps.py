import os

from django.apps import AppConfig


class AgentsvcConfig(AppConfig):
    name = "agentsvc"
    verbose_name = "Access"

    def ready(self) -> None:
        from agentsvc.db import close_pools_before_fork
        from agentsvc.tracing import tracing_from_settings

        os.register_at_fork(before=close_pools_before_fork)
        tracing_from_settings()
