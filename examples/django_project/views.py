"""The example's views: each shows one piece of ``worker.web.django``."""

from __future__ import annotations

import asyncio
from typing import Any

from django import http, views
from django.db import transaction
from django.db.models import F
from django.views.decorators.http import require_GET, require_POST
from rest_framework import request as drf_request
from rest_framework import response as drf_response
from rest_framework import views as drf_views

from examples.django_project.models import LogoutNote, Profile
from worker import authn, sessions
from worker.web import django as session_sync


async def _exchange(code: str) -> sessions.SessionCreds:
    async with authn.AuthnClient.from_settings(session_sync.worker_settings()) as client:
        return await client.userinfo(code)


def _describe(session: sessions.Authenticated) -> dict[str, Any]:
    checked = session.last_checked_at.isoformat() if session.last_checked_at else None
    return {"user_id": session.user_id, "email": session.email, "last_checked_at": checked}


@require_GET
def callback(request: http.HttpRequest) -> http.HttpResponse:
    """Where Pangea's hosted login redirects: exchange the code, record the login with the app's profile."""
    try:
        creds = asyncio.run(_exchange(request.GET.get("code", "")))
    except sessions.AuthnRequestRejected:
        return http.JsonResponse({"detail": "the login code is not valid"}, status=400)
    except sessions.AuthnError:
        return http.JsonResponse({"detail": "Pangea AuthN did not answer"}, status=502)
    with transaction.atomic():  # the profile and the session commit together
        profile, _ = Profile.objects.get_or_create(
            pangea_user_id=creds.active_token.identity, defaults={"email": creds.active_token.email}
        )
        Profile.objects.filter(pk=profile.pk).update(logins=F("logins") + 1)
        login = session_sync.record_login(creds.to_userinfo())
    body: dict[str, Any] = {"user_id": login.user_id, "email": login.email}
    if request.GET.get("style") == "bearer":  # the guide's style: the client keeps Pangea's active token
        return http.JsonResponse(body | {"access_token": creds.active_token.token, "token_type": "Bearer"})
    answer = http.JsonResponse(body)  # server-side style: only an opaque handle leaves the server
    cookie = session_sync.guard().cookie
    answer.set_cookie(cookie, login.handle, httponly=True, samesite="Lax", secure=request.is_secure())
    return answer


@require_GET
@session_sync.session_required
def me(request: http.HttpRequest) -> http.HttpResponse:
    """A protected view (decorator)."""
    return http.JsonResponse(_describe(request.session_sync.require()))  # type: ignore[attr-defined]


class ProfileView(session_sync.SessionRequiredMixin, views.View):
    """A protected class-based view (mixin), reading the app's own table."""

    def get(self, request: http.HttpRequest) -> http.HttpResponse:
        session = request.session_sync.require()  # type: ignore[attr-defined]
        profile = Profile.objects.get(pangea_user_id=session.user_id)
        return http.JsonResponse({"email": profile.email, "logins": profile.logins})


class ApiMe(drf_views.APIView):
    """A Django REST framework view: ``request.user`` and ``request.auth`` come from SessionSyncAuthentication."""

    def get(self, request: drf_request.Request) -> drf_response.Response:
        return drf_response.Response({"user_id": request.user.user_id, "email": request.auth.email})


@require_POST
@session_sync.session_required
def logout(request: http.HttpRequest) -> http.HttpResponse:
    """End the local session; the worker's outbox logs it out at Pangea.

    ``?fail=1`` fails after the logout, inside the same ``atomic()`` block, to show that nothing is
    then queued, noted or ended.
    """
    session = request.session_sync.require()  # type: ignore[attr-defined]
    with transaction.atomic():
        LogoutNote.objects.create(session_id=session.id)
        session_sync.logout(session.id)
        if request.GET.get("fail"):
            raise RuntimeError("failing on purpose, after the logout, inside the transaction")
    answer = http.JsonResponse({"logged_out": True})
    answer.delete_cookie(session_sync.guard().cookie)
    return answer


@require_POST
@session_sync.session_required
def logout_everywhere(request: http.HttpRequest) -> http.HttpResponse:
    """End every session of the user here, and at Pangea (one ``/v2/session/logout``)."""
    session = request.session_sync.require()  # type: ignore[attr-defined]
    with transaction.atomic():
        ended = session_sync.logout_user(session.user_id)
    answer = http.JsonResponse({"logged_out": list(ended.session_ids)})
    answer.delete_cookie(session_sync.guard().cookie)
    return answer
