from django.apps import AppConfig


class RunsConfig(AppConfig):
    name = "runs"

    def ready(self) -> None:
        from agentsvc import health, idempotency, metrics
        from runs import events, lane
        from runs.availability import models_readiness
        from runs.metrics import RunsCollector, StreamsCollector
        from runs.presenters import run_handle
        from runs.selectors import executors_alive
        from runs.totals import run_totals_add

        health.check_register("executors", executors_alive, required=True)
        health.models_check_register(models_readiness)
        idempotency.abandoned_answer_register(
            lambda record: (run_handle(record.run), f"/api/v1/runs/{record.run_id}")
        )
        events.on_written(run_totals_add)
        metrics.REGISTRY.register(RunsCollector())
        metrics.REGISTRY.register(StreamsCollector())
        lane.register()
