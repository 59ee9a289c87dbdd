from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("webhooks", "0002_sweep_schedule"),
    ]

    operations = [
        migrations.AddField(
            model_name="webhookattempt",
            name="private_target",
            field=models.BooleanField(default=False),
        ),
    ]
