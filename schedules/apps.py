from django.apps import AppConfig


class SchedulesConfig(AppConfig):
    name = "schedules"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        """The ticks fire on the executors' clock: a service of every executor process."""
        from runs.execution import executor
        from schedules.clock import schedules_clock

        executor.service_register(schedules_clock)
