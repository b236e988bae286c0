"""An example Django project over ``worker.web.django``: hosted login, protected views, logout in ``atomic()``.

Run it against the emulator (the FastAPI example's docstring shows the code exchange)::

    session-sync emulator & session-sync db upgrade
    export DJANGO_SETTINGS_MODULE=examples.django_project.settings
    python -m django migrate && python -m django runserver 8000

Routes: ``/callback?code=pmc_...`` (``&style=bearer`` returns the active token instead of setting the
cookie), ``/me`` (``session_required``), ``/profile`` (``SessionRequiredMixin``), ``/api/me`` (Django
REST framework), ``POST /logout``, ``POST /logout/everywhere`` (every session of the user). The
callback and the logout write the app's own rows in the same ``transaction.atomic()`` as the
session and its outbox row.
"""
