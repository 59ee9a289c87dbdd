"""The lifecycle keeper's schedule (runs.keeper): every minute, on any worker."""

from django.db import migrations


def create(apps, schema_editor):
    Schedule = apps.get_model("django_q", "Schedule")
    Schedule.objects.update_or_create(
        name="runs-keeper",
        defaults={
            "func": "runs.tasks.keeper_pass",
            "schedule_type": "I",  # minutes; the cluster checks schedules every 30 s
            "minutes": 1,
            "repeats": -1,
        },
    )


def delete(apps, schema_editor):
    apps.get_model("django_q", "Schedule").objects.filter(name="runs-keeper").delete()


class Migration(migrations.Migration):
    dependencies = [
        ("runs", "0003_keeper_fields"),
        ("django_q", "0019_alter_task_options_alter_ormq_key_alter_ormq_lock_and_more"),
    ]

    operations = [migrations.RunPython(create, delete)]
