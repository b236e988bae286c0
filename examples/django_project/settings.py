"""Settings of the example Django project: the database from ``DATABASE_URL``, as the worker reads it."""

from __future__ import annotations

import os
from typing import Any

import django
import sqlalchemy as sa


def database(url: str) -> dict[str, Any]:
    """Django's ``DATABASES["default"]`` for a SQLAlchemy-style URL (``sqlite:///...`` or ``postgresql://...``)."""
    parsed = sa.make_url(url)
    if parsed.get_backend_name() == "sqlite":
        options: dict[str, Any] = {"timeout": 30}
        if django.VERSION >= (5, 1):  # take the write lock up front, so concurrent writers wait instead of failing
            options["transaction_mode"] = "IMMEDIATE"
        return {"ENGINE": "django.db.backends.sqlite3", "NAME": parsed.database, "OPTIONS": options}
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": parsed.database,
        "USER": parsed.username or "",
        "PASSWORD": parsed.password or "",
        "HOST": parsed.host or "",
        "PORT": str(parsed.port or ""),
    }


SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-only-not-secret")
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
USE_TZ = True
ROOT_URLCONF = "examples.django_project.urls"
INSTALLED_APPS = ["examples.django_project"]
DATABASES = {"default": database(os.environ.get("DATABASE_URL", "sqlite:///session-sync.db"))}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
# No CSRF middleware in this API-style example: the cookie is SameSite=Lax and Bearer clients send no cookie.
MIDDLEWARE = ["worker.web.django.SessionSyncMiddleware"]

# session-sync: any worker variable may be set here too (it wins over the environment).
SESSION_SYNC_REALM = "example"

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": ["worker.web.drf.SessionSyncAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "UNAUTHENTICATED_USER": None,  # no django.contrib.auth in this project
}
