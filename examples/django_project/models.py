"""The example app's own tables, written in the same transactions as session-sync's."""

from __future__ import annotations

from django.db import models


class Profile(models.Model):
    """One row per Pangea user who logged in here: the app's own write at login."""

    pangea_user_id = models.CharField(max_length=64, unique=True)
    email = models.CharField(max_length=320)
    logins = models.PositiveIntegerField(default=0)


class LogoutNote(models.Model):
    """The app's own write at logout: it commits, or rolls back, with the logout and its outbox row."""

    session_id = models.BigIntegerField()
    at = models.DateTimeField(auto_now_add=True)
