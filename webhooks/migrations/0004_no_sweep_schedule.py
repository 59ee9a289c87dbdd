"""Deliveries are claimed by the executors' delivery pump (webhooks/pump.py), not a schedule."""

from django.db import migrations


def delete(apps, schema_editor):
    apps.get_model("django_q", "Schedule").objects.filter(name="webhooks-sweep").delete()


class Migration(migrations.Migration):
    dependencies = [("webhooks", "0003_webhookattempt_private_target")]

    operations = [migrations.RunPython(delete, migrations.RunPython.noop)]
