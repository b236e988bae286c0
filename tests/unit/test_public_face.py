"""The declared public face: what apps may import, pinned, as httpx's ``test_exported_members`` pins its own.

A name leaving ``__all__`` breaks apps that import it; a name joining it is a promise. Either is a
decision to make here, on purpose. Every public function, class and constant a module defines must
be declared (or renamed with a leading underscore), and every declared name must resolve.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from worker import task_names

ROOT = Path(__file__).resolve().parents[2]

PUBLIC: dict[str, list[str]] = {
    "worker.sessions": [
        "DEFAULT_LOGOUT_REASON",
        "DESCRIPTIONS",
        "MAX_EMAIL_LENGTH",
        "MAX_REASON_LENGTH",
        "MAX_TOKEN_LENGTH",
        "check_reason",
        "new_handle",
        "DEFAULT_REALM",
        "HANDLE_PREFIX",
        "Authenticated",
        "AuthnError",
        "AuthnRequestRejected",
        "ConfigError",
        "InvalidUserinfo",
        "Login",
        "LoginConflict",
        "Policy",
        "SessionCreds",
        "SessionInvalid",
        "SessionSyncError",
        "Settings",
        "TokenCipher",
        "UnknownSession",
        "UserLogout",
        "authenticate",
        "create_engine",
        "default_cipher",
        "default_grace",
        "default_policy",
        "default_settings",
        "is_sqlite",
        "logout",
        "logout_user",
        "normalize_url",
        "record_login",
        "session_factory",
    ],
    "worker.errors": [
        "AuthnError",
        "AuthnOutcomeUnknown",
        "AuthnProtocolError",
        "AuthnRateLimited",
        "AuthnRejectedUs",
        "AuthnRequestInvalid",
        "AuthnRequestRejected",
        "AuthnUnavailable",
        "AuthnUnreachable",
        "ConfigError",
        "CryptoError",
        "InvalidUserinfo",
        "LoginConflict",
        "OurTokenRejected",
        "SessionInvalid",
        "SessionSyncError",
        "UnknownSession",
        "WaitTimeout",
    ],
    "worker.settings": [
        "BROKER_SCHEMES",
        "DEFAULT_BROKER_URL",
        "DEFAULT_DATABASE_URL",
        "DEFAULT_METRICS_PORT",
        "DEFAULT_QUEUE",
        "MAX_DURATION",
        "SECRET_FILES",
        "Duration",
        "Settings",
        "parse_duration",
    ],
    "worker.counts": [
        "Counts",
        "FanoutResult",
        "HousekeepingResult",
        "LogoutCounts",
        "LogoutCountsDict",
        "ResyncBatchResult",
        "SweepResult",
        "SyncCounts",
        "SyncCountsDict",
    ],
    "worker.reports": [
        "AuditEntry",
        "GuardState",
        "LastSweep",
        "SessionReport",
        "StatusReport",
    ],
    "worker.task_names": [
        "ALL",
        "CHECK_BATCH",
        "DELIVER_LOGOUTS",
        "HOUSEKEEPING",
        "RESYNC",
        "RESYNC_BATCH",
        "SWEEP",
    ],
    "worker.web": [
        "COOKIE_SETTING",
        "DEFAULT_COOKIE",
        "REALM_SETTING",
        "SCOPE_KEY",
        "TOKEN_HEADER",
        "Guard",
        "RequestAuth",
        "SessionFactory",
        "bearer_token",
        "settings_from",
    ],
    "worker.web.asgi": [
        "SessionSyncMiddleware",
        "request_credentials",
        "with_token_header",
    ],
    "worker.web.django": [
        "DATABASE_SETTING",
        "REQUEST_ATTRIBUTE",
        "SessionRequiredMixin",
        "SessionSyncMiddleware",
        "SessionUser",
        "database_alias",
        "engine",
        "guard",
        "hand_back_token",
        "logout",
        "logout_user",
        "orm_session",
        "record_login",
        "refused",
        "request_auth",
        "session_required",
        "worker_settings",
    ],
    "worker.web.drf": [
        "SessionSyncAuthentication",
    ],
    "worker.web.fastapi": [
        "dependency",
    ],
    "worker.web.flask": [
        "EXTENSION",
        "SessionSync",
        "State",
        "login_required",
    ],
    "worker.web.starlette": [
        "AUTHENTICATED",
        "RotatedTokenMiddleware",
        "SessionCredentials",
        "SessionSyncBackend",
        "SessionUser",
        "exception_handlers",
        "middleware",
    ],
}


def defined_public_names(module: str) -> set[str]:
    """The public names a module defines itself (functions, classes, assignments), read from its source."""
    path = ROOT / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = ROOT / module.replace(".", "/") / "__init__.py"
    names: set[str] = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return {n for n in names if not n.startswith("_") and n != "logger"}


@pytest.mark.parametrize("module", list(PUBLIC))
def test_exported_names_are_pinned(module: str) -> None:
    # Given the module an app imports
    exported = importlib.import_module(module).__all__
    # Then it declares exactly the names pinned here, each once
    assert sorted(exported) == sorted(PUBLIC[module])
    assert len(set(exported)) == len(exported)


@pytest.mark.parametrize("module", list(PUBLIC))
def test_every_declared_name_resolves_and_every_defined_one_is_declared(module: str) -> None:
    found = importlib.import_module(module)
    assert [n for n in found.__all__ if not hasattr(found, n)] == []
    assert sorted(defined_public_names(module) - set(found.__all__)) == [], "declare it in __all__, or make it _private"


def test_the_web_app_needs_one_import_path() -> None:
    # What the example apps use besides talking to Pangea (worker.authn) comes from worker.sessions
    from worker import sessions

    for name in ("Settings", "TokenCipher", "Policy", "SessionCreds", "create_engine", "session_factory"):
        assert name in sessions.__all__
    for name in ("SessionInvalid", "LoginConflict", "InvalidUserinfo", "UnknownSession", "AuthnError"):
        assert getattr(sessions, name) is getattr(importlib.import_module("worker.errors"), name)


def test_task_names_never_change() -> None:
    # Other languages, Flower and beat send these by name: a rename strands their messages
    assert task_names.ALL == (
        "session_sync.sweep",
        "session_sync.check_batch",
        "session_sync.resync",
        "session_sync.resync_batch",
        "session_sync.housekeeping",
        "session_sync.deliver_logouts",
    )
