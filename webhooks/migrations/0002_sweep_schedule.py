"""The schedule that picks up due deliveries (retries, lost tasks, dead workers)."""

from django.db import migrations


def create(apps, schema_editor):
    Schedule = apps.get_model("django_q", "Schedule")
    Schedule.objects.update_or_create(
        name="webhooks-sweep",
        defaults={
            "func": "webhooks.tasks.deliveries_sweep",
            "schedule_type": "I",  # minutes; the cluster checks schedules every 30 s
            "minutes": 1,
            "repeats": -1,
        },
    )


def delete(apps, schema_editor):
    apps.get_model("django_q", "Schedule").objects.filter(name="webhooks-sweep").delete()


class Migration(migrations.Migration):
    dependencies = [
        ("webhooks", "0001_initial"),
        ("django_q", "0019_alter_task_options_alter_ormq_key_alter_ormq_lock_and_more"),
    ]

    operations = [migrations.RunPython(create, delete)]
