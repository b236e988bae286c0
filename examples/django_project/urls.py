"""The example's routes."""

from __future__ import annotations

from django.urls import path

from examples.django_project import views

urlpatterns = [
    path("callback", views.callback),
    path("me", views.me),
    path("profile", views.ProfileView.as_view()),
    path("api/me", views.ApiMe.as_view()),
    path("logout", views.logout),
    path("logout/everywhere", views.logout_everywhere),
]
