from django.db import migrations, models
from django.db.models import Count, Q


def count_active_runs(apps, schema_editor):
    ApiKey = apps.get_model("agentsvc", "ApiKey")
    active = Q(run__status__in=["queued", "running"])
    for key in ApiKey.objects.annotate(n=Count("run", filter=active)).filter(n__gt=0):
        ApiKey.objects.filter(pk=key.pk).update(active_runs=key.n)


class Migration(migrations.Migration):
    dependencies = [
        ("agentsvc", "0004_token_ledger"),
        ("runs", "0004_keeper_schedule"),
    ]

    operations = [
        migrations.AddField(
            model_name="apikey",
            name="active_runs",
            field=models.PositiveIntegerField(default=0, editable=False),
        ),
        migrations.RunPython(count_active_runs, migrations.RunPython.noop),
    ]
