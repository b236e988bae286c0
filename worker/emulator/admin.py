"""EmulatorAdmin: a small synchronous client for the emulator's admin surface (tests, demos, benchmarks)."""

from __future__ import annotations

from collections.abc import Mapping
from types import TracebackType
from typing import Any

import httpx


class EmulatorAdminError(RuntimeError):
    """Raised when the emulator refuses an admin request; the message is its explanation."""


class EmulatorAdmin:
    """Logs users in, sets faults, reads counters and resets a running emulator at ``base_url``."""

    def __init__(self, base_url: str, *, timeout: float = 10.0) -> None:
        self._http = httpx.Client(base_url=base_url, timeout=timeout)

    def login(
        self,
        email: str,
        *,
        active_ttl: float = 3600,
        refresh_ttl: float = 86400,
        profile: Mapping[str, str] | None = None,
    ) -> str:
        """A one-time ``pmc_`` code for a new session of ``email``, to exchange at ``/v2/client/userinfo``."""
        body: dict[str, Any] = {"email": email, "active_ttl": active_ttl, "refresh_ttl": refresh_ttl}
        if profile is not None:
            body["profile"] = dict(profile)
        return str(self._call("POST", "/emulator/login", body)["code"])

    def seed(
        self,
        count: int,
        *,
        start: int = 0,
        active_ttl: float = 3600,
        refresh_ttl: float = 86400,
        key: str = "bench",
        created_at: float | None = None,
    ) -> dict[str, Any]:
        """Create sessions ``start`` … ``start + count - 1`` at once; their secrets are ``store.seeded(i, key=key)``.

        ``created_at`` (epoch seconds, default now) is when their tokens were minted: a benchmark that
        seeds its own database with the same times finds every expiry unchanged.
        """
        body: dict[str, Any] = {
            "count": count,
            "start": start,
            "active_ttl": active_ttl,
            "refresh_ttl": refresh_ttl,
            "key": key,
        }
        if created_at is not None:
            body["created_at"] = created_at
        return dict(self._call("POST", "/emulator/seed", body))

    def faults(self, **faults: Any) -> None:
        """Set faults (``worker.emulator.faults``): latency, error and its rate, paths, http_codes; none: clear."""
        self._call("POST", "/emulator/faults", faults)

    def clear_faults(self) -> None:
        """Remove every fault."""
        self._call("POST", "/emulator/faults", {})

    def stats(self) -> dict[str, Any]:
        """``{"requests": {"<path>": {"<http status>": count}}}`` since the last reset, and
        ``"in_flight": {"<path>": count}`` of the requests received and not yet answered."""
        return dict(self._call("GET", "/emulator/stats"))

    def config(self, **rules: str) -> dict[str, str]:
        """Set the rules Pangea does not document: ``rotation``, ``active_tokens`` (none: read them)."""
        if not rules:
            return dict(self._call("GET", "/emulator/config"))
        return dict(self._call("POST", "/emulator/config", rules))

    def ended(self, session_ids: list[str]) -> dict[str, dict[str, str]]:
        """How each named session ended (``session/invalidate``, ``client/session/logout``, ``expired``...), when."""
        return dict(self._call("POST", "/emulator/ended", {"session_ids": session_ids}))

    def reset(self) -> None:
        """Forget every session, code, counter and fault."""
        self._call("POST", "/emulator/reset", {})

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> EmulatorAdmin:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _call(self, method: str, path: str, body: object = None) -> Any:
        response = self._http.request(method, path, json=body)
        if response.status_code == 400:
            raise EmulatorAdminError(str(response.json().get("error", response.text)))
        response.raise_for_status()
        return response.json()
