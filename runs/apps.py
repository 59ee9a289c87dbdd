from django.apps import AppConfig


class RunsConfig(AppConfig):
    name = "runs"

    def ready(self) -> None:
        from agentsvc import health
        from runs.availability import models_readiness
        from runs.selectors import executors_alive

        health.check_register("executors", executors_alive, required=True)
        health.models_check_register(models_readiness)
