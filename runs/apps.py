from django.apps import AppConfig


class RunsConfig(AppConfig):
    name = "runs"

    def ready(self) -> None:
        from agentsvc import health
        from runs.selectors import executors_alive

        health.check_register("executors", executors_alive, required=True)
