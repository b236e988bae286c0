"""The one error tree of pangea-session-sync.

::

    SessionSyncError
      ConfigError            a setting is missing or malformed (names the variable)
      CryptoError            a stored token cannot be decrypted with any configured key
      AuthnError             no usable answer from Pangea; never revokes anything
        AuthnUnavailable     timeout, connection error, 5xx
          AuthnUnreachable     the request never reached Pangea (safe to repeat)
          AuthnOutcomeUnknown  the request may have been performed but its answer was lost
        AuthnRateLimited     429 / TooManyRequests; .retry_after
        AuthnRejectedUs      Unauthorized: our own token is wrong
          OurTokenRejected     ... during a sweep or a resync, which stopped there and changed nothing
        AuthnProtocolError   not Pangea's answer: the body, the envelope, an unknown status, Success not under 200
        AuthnRequestRejected Pangea refused the request itself (ValidationError, NotFound, ...)
          AuthnRequestInvalid  ... for its shape (ValidationError, result.errors, HTTP 413): .sources
      InvalidUserinfo        from sessions.record_login: the payload is not Pangea's userinfo
      LoginConflict          from sessions.record_login: its tokens belong to an ended or other session
      SessionInvalid         from sessions.authenticate; .www_authenticate
      UnknownSession         from sessions.logout / logout_user: no such local session or user
      WaitTimeout            from the CLI's --wait: the tasks did not all finish in time (says which, and where)

Pangea's *answers* about a user token (``InvalidToken``, ``ExpiredToken``) are not errors: the
AuthN client returns them as values. Only values may revoke a session (design invariant 1).
No message in this tree ever contains a token.
"""

from __future__ import annotations

__all__ = [
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
]


class SessionSyncError(Exception):
    """Unexpected session-sync error."""

    def __init__(self, *args: object) -> None:
        # The docstring is the default message; passing args to Exception keeps them picklable.
        super().__init__(*(args or ((self.__doc__ or "").strip(),)))


class ConfigError(SessionSyncError):
    """Raised when a setting is missing or malformed; the message names the variable."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(variable, problem)
        self.variable = variable
        self.problem = problem

    def __str__(self) -> str:
        return f"{self.variable}: {self.problem}"


class CryptoError(SessionSyncError):
    """Raised when a stored token cannot be decrypted with any configured key."""


class AuthnError(SessionSyncError):
    """No usable answer from Pangea AuthN; never a reason to revoke a session."""

    def __init__(self, message: str = "", *, path: str = "", request_id: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())
        self.path = path
        self.request_id = request_id

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild, (type(self), str(self), self.__dict__))


def _rebuild(cls: type[AuthnError], message: str, state: dict[str, object]) -> AuthnError:
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    err.__dict__.update(state)
    return err


class AuthnUnavailable(AuthnError):
    """Raised when Pangea could not be reached or answered with a server error (timeout, connection, 5xx)."""


class AuthnUnreachable(AuthnUnavailable):
    """Raised when the request never reached Pangea (connection refused, connect timeout)."""


class AuthnOutcomeUnknown(AuthnUnavailable):
    """Raised when a non-idempotent request may have been performed but its answer was lost."""


class AuthnRateLimited(AuthnError):
    """Raised when Pangea answered TooManyRequests (HTTP 429); ``retry_after`` is in seconds, if given."""

    def __init__(
        self,
        message: str = "",
        *,
        path: str = "",
        request_id: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, path=path, request_id=request_id)
        self.retry_after = retry_after


class AuthnRejectedUs(AuthnError):
    """Raised when Pangea answered Unauthorized: our own PANGEA_AUTHN_TOKEN is wrong or lacks rights."""


class OurTokenRejected(AuthnRejectedUs):
    """Raised when Pangea refused our own token during a sweep or a resync: it stopped, nothing was changed."""


class AuthnProtocolError(AuthnError):
    """Raised when the response is not plainly Pangea's answer.

    Not JSON, not labelled JSON, too large, wrong types, a status we do not know, or Success under
    an HTTP code other than 200. Never a verdict; retried later like any other missing answer.
    """


class AuthnRequestRejected(AuthnError):
    """Raised when Pangea refused the request itself (ValidationError, NotFound, ...); ``status`` names it."""

    def __init__(
        self,
        message: str = "",
        *,
        path: str = "",
        request_id: str | None = None,
        status: str = "",
    ) -> None:
        super().__init__(message, path=path, request_id=request_id)
        self.status = status


class AuthnRequestInvalid(AuthnRequestRejected):
    """Raised when Pangea (or a proxy before it) refused the request's shape.

    ``ValidationError``, any answer carrying ``result.errors``, or HTTP 413/414/431 with no envelope.
    ``sources`` holds the JSON pointers into the request that Pangea blamed (``/size``,
    ``/filter/active_token_id__in``), if it said. A list request refused this way is split
    (worker.list_limits), never a failure of the batch.
    """

    def __init__(
        self,
        message: str = "",
        *,
        path: str = "",
        request_id: str | None = None,
        status: str = "",
        sources: tuple[str, ...] = (),
    ) -> None:
        super().__init__(message, path=path, request_id=request_id, status=status)
        self.sources = sources


class InvalidUserinfo(SessionSyncError, ValueError):
    """Raised when record_login is handed something that is not Pangea's userinfo; nothing is written."""


class LoginConflict(SessionSyncError):
    """Raised when record_login is handed a login whose tokens already belong to a session that ended (or to a
    different one); nothing is written and the caller's transaction stays usable. ``session_id``: that session."""

    def __init__(self, message: str = "", *, session_id: int | None = None) -> None:
        super().__init__(*((message,) if message else ()))
        self.session_id = session_id

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_conflict, (str(self), self.session_id))


def _rebuild_conflict(message: str, session_id: int | None) -> LoginConflict:
    return LoginConflict(message, session_id=session_id)


class SessionInvalid(SessionSyncError):
    """Raised when a local session cannot authenticate a request; carries the RFC 6750 header value."""

    status_code = 401

    def __init__(self, description: str, *, realm: str = "session-sync", reason: str = "unknown") -> None:
        super().__init__(description)
        self.description = description
        self.realm = realm
        self.reason = reason

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_invalid, (self.description, self.realm, self.reason))

    @property
    def www_authenticate(self) -> str:
        """The ``WWW-Authenticate`` value, e.g. ``Bearer realm="x", error="invalid_token", ...``.

        The realm is an RFC 7230 quoted-string (``"`` and ``\\`` escaped, control characters dropped).
        RFC 6750 allows neither ``"`` nor ``\\`` in ``error_description`` (``%x20-21 / %x23-5B /
        %x5D-7E``), escaped or not, so they become ``'`` and ``/`` and anything else outside that
        set is dropped. A request that sent no credentials (``reason="missing"``) gets no error code
        (RFC 6750 section 3.1).
        """
        realm = "".join(c for c in self.realm if " " <= c <= "~" or c == "\t")
        challenge = 'Bearer realm="{}"'.format(realm.replace("\\", "\\\\").replace('"', '\\"'))
        if self.reason == "missing":
            return challenge
        description = "".join(c for c in self.description.replace('"', "'").replace("\\", "/") if " " <= c <= "~")
        return f'{challenge}, error="invalid_token", error_description="{description}"'


def _rebuild_invalid(description: str, realm: str, reason: str) -> SessionInvalid:
    return SessionInvalid(description, realm=realm, reason=reason)


class UnknownSession(SessionSyncError, LookupError):
    """Raised when a logout names a local session id (or a user id) that has no local session."""


class WaitTimeout(SessionSyncError, TimeoutError):
    """Raised when the tasks did not all finish in time; the message says which are still out, and where."""
