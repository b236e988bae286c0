"""The example app's own tables."""

from __future__ import annotations

from django.db import migrations, models


class Migration(migrations.Migration):
    initial = True
    dependencies: list[tuple[str, str]] = []

    operations = [
        migrations.CreateModel(
            name="Profile",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("pangea_user_id", models.CharField(max_length=64, unique=True)),
                ("email", models.CharField(max_length=320)),
                ("logins", models.PositiveIntegerField(default=0)),
            ],
        ),
        migrations.CreateModel(
            name="LogoutNote",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("session_id", models.BigIntegerField()),
                ("at", models.DateTimeField(auto_now_add=True)),
            ],
        ),
    ]
