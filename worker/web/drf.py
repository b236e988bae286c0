"""Django REST framework: an authentication class over :mod:`worker.web.django`; DRF imported only here.

::

    REST_FRAMEWORK = {"DEFAULT_AUTHENTICATION_CLASSES": ["worker.web.drf.SessionSyncAuthentication"]}

``request.user`` is a :class:`worker.web.django.SessionUser` (override ``get_user`` for the app's own
user), ``request.auth`` the live :class:`worker.sessions.Authenticated`. A refused credential answers 401
with the RFC 6750 challenge saying why (``authenticate_header``); a request with none is anonymous.
"""

from __future__ import annotations

from typing import Any

from rest_framework import authentication, exceptions

from worker import sessions
from worker.web import django as glue

__all__ = [
    "SessionSyncAuthentication",
]

_CHALLENGE = "_session_sync_challenge"


class SessionSyncAuthentication(authentication.BaseAuthentication):  # type: ignore[misc]
    """Cookie handle or ``Authorization: Bearer``, checked locally (one indexed query, no Pangea call)."""

    def authenticate(self, request: Any) -> tuple[Any, sessions.Authenticated] | None:
        auth = glue.request_auth(request._request)
        if not auth.presented:
            return None
        found = auth.session
        if found is None:
            assert auth.error is not None
            setattr(request, _CHALLENGE, auth.error.www_authenticate)
            raise exceptions.AuthenticationFailed(auth.error.description)
        return self.get_user(found), found

    def get_user(self, session: sessions.Authenticated) -> Any:
        """The user for a live session (default: a :class:`worker.web.django.SessionUser`)."""
        return glue.SessionUser(session)

    def authenticate_header(self, request: Any) -> str:
        """The ``WWW-Authenticate`` value of a 401: why the credential was refused, else the bare challenge."""
        return str(getattr(request, _CHALLENGE, None) or glue.guard().challenge())
