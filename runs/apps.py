from django.apps import AppConfig


class RunsConfig(AppConfig):
    name = "runs"

    def ready(self) -> None:
        from agentsvc import health
        from runs import events
        from runs.selectors import executors_alive
        from runs.totals import run_totals_add

        health.check_register("executors", executors_alive, required=True)
        events.on_terminal(run_totals_add)
