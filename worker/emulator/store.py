"""The emulator's state and Pangea's session rules: codes, sessions, tokens, and their indexes.

No I/O and no clock of its own: every operation takes ``now`` (epoch seconds), so the rules can be
read and tested as data in, data out. Lookups are O(1) dict hits, so the store can hold millions of
sessions (:meth:`Store.seed` fills it for benchmarks).

The session model, read from Pangea's docs and examples (``pangea-authn.md`` §3.7):

- A session is listed by its ``pmt_`` id: the ``session_id`` that invalidate takes. Refresh tokens
  are of ``type`` ``session``; active tokens are ``user``.
- Rotation rule, one of :data:`ROTATIONS` (Pangea documents none of them; ``pangea-authn.md`` marks
  this INFERRED, so the emulator plays each and the worker must be right under all):

  - ``session-id`` (the default): the session *is* its refresh-token record. A refresh mints a new
    ``ptr_`` secret and a new active token, but the refresh token's *id* stays the session's id.
  - ``new-refresh-id``: the first refresh token's id is the session's id; every rotation mints a
    refresh token with a new id, while the session keeps its own.
  - ``distinct-session-id``: the session's id is its own, never any token's id.

  The spent ``ptr_`` is forgotten at once (``InvalidToken``); the new refresh token lives
  ``refresh_ttl`` from now (sliding).
- Active tokens are opaque ``ptu_`` secrets, or JWTs (``active_tokens="jwt"``: ES256, signed with the
  key ``/v2/client/jwks`` serves, about a kilobyte long, as a project that issues JWTs hands out).
- The previous active token stays valid until its own expiry (a client whose refresh answer was
  lost can go on using it); ``active_token_id`` filters match the *current* active token only.
- No token outlives its session: an active token expires at the latest with the refresh token.
- Ending a session (logout, invalidate) forgets all its tokens: they answer ``InvalidToken``.
- Expired tokens answer ``ExpiredToken`` for :data:`GRACE` seconds, then are forgotten.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import os
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

#: Status of a token that Pangea does not know (never existed, spent, or its session ended).
INVALID = "InvalidToken"
#: Status of a token that Pangea knows but whose time is up.
EXPIRED = "ExpiredToken"
#: How long an expired session or token is remembered (answering ExpiredToken), in seconds.
GRACE = 3600.0
#: Lifetime of a one-time login code, in seconds ("short-lived"; Pangea publishes no number).
CODE_TTL = 600.0
#: The rotation rules the emulator can play (see the module docstring); the first is the default.
ROTATIONS = ("session-id", "new-refresh-id", "distinct-session-id")
#: The kinds of active token it can mint.
ACTIVE_TOKENS = ("opaque", "jwt")


def new_id(prefix: str) -> str:
    """A fresh Pangea-shaped id: ``prefix`` + 32 characters of lowercase base32."""
    return prefix + base64.b32encode(os.urandom(20)).decode("ascii").lower()


def stable_id(prefix: str, seed: str) -> str:
    """A Pangea-shaped id derived from ``seed``: the same seed always gives the same id."""
    digest = hashlib.sha256(seed.encode("utf-8")).digest()[:20]
    return prefix + base64.b32encode(digest).decode("ascii").lower()


@dataclass(frozen=True, slots=True)
class Seeded:
    """The ids and secrets of seeded session number ``index`` (see :func:`seeded`)."""

    index: int
    email: str
    session_id: str
    active_id: str
    active_secret: str = field(repr=False)
    refresh_secret: str = field(repr=False)


def seeded(index: int, *, key: str = "bench") -> Seeded:
    """Seeded session ``index``: every id and secret derived from ``key`` and the index.

    ``POST /emulator/seed`` mints sessions with these, so a benchmark can write the same sessions
    into its own database without a login per session or a big answer from the emulator.
    """
    seed = f"{key}:{index}"
    return Seeded(
        index=index,
        email=f"user{index}@{key}.example",
        session_id=stable_id("pmt_", seed + ":session"),
        active_id=stable_id("pmt_", seed + ":active"),
        active_secret=stable_id("ptu_", seed + ":active-secret"),
        refresh_secret=stable_id("ptr_", seed + ":refresh-secret"),
    )


class Rejected(Exception):
    """Raised when a token, code or session id is unknown (InvalidToken) or expired (ExpiredToken)."""

    def __init__(self, status: str) -> None:
        super().__init__(status)
        self.status = status


@dataclass(slots=True, eq=False, kw_only=True)
class Token:
    """One token: its secret, its ``pmt_`` id, its type (``user`` or ``session``) and its times."""

    secret: str = field(repr=False)
    id: str
    type: str
    created_at: float
    expire: float
    session: Session = field(repr=False)


@dataclass(slots=True, eq=False, kw_only=True)
class Session:
    """A login session of one user; ``refresh`` and ``active`` are its current tokens."""

    id: str
    identity: str
    email: str
    profile: dict[str, str]
    created_at: float
    active_ttl: float
    refresh_ttl: float
    refresh: Token = field(init=False, repr=False)
    active: Token = field(init=False, repr=False)
    retired: list[Token] = field(default_factory=list, repr=False)  # earlier active tokens

    def tokens(self) -> Iterator[Token]:
        """Every token of this session that may still be looked up."""
        yield self.refresh
        yield self.active
        yield from self.retired


@dataclass(frozen=True, slots=True, kw_only=True)
class Code:
    """A one-time login code, as the hosted login page's redirect would hand it over."""

    email: str
    active_ttl: float
    refresh_ttl: float
    profile: dict[str, str]
    expire: float


class Store:
    """All sessions, codes and tokens of one emulator, with O(1) indexes.

    ``rotation`` and ``active_tokens`` choose the rules it plays (:data:`ROTATIONS`,
    :data:`ACTIVE_TOKENS`); ``sign`` turns JWT claims into a signed JWT (needed for ``jwt``).
    """

    def __init__(
        self,
        *,
        rotation: str = ROTATIONS[0],
        active_tokens: str = ACTIVE_TOKENS[0],
        sign: Callable[[dict[str, object]], str] | None = None,
    ) -> None:
        self.sign = sign
        self.configure(rotation=rotation, active_tokens=active_tokens)
        self.reset()

    def configure(self, *, rotation: str, active_tokens: str) -> None:
        """Choose the rotation rule and the kind of active token for sessions minted from now on."""
        if rotation not in ROTATIONS:
            raise ValueError(f"rotation must be one of {', '.join(ROTATIONS)}")
        if active_tokens not in ACTIVE_TOKENS:
            raise ValueError(f"active_tokens must be one of {', '.join(ACTIVE_TOKENS)}")
        if active_tokens == "jwt" and self.sign is None:
            raise ValueError("JWT active tokens need a signing key")
        self.rotation = rotation
        self.active_tokens = active_tokens

    def reset(self) -> None:
        """Forget everything."""
        self.sessions: dict[str, Session] = {}
        self.by_secret: dict[str, Token] = {}
        self.by_active_id: dict[str, Session] = {}
        self.by_user: dict[str, dict[str, Session]] = {}
        self.codes: dict[str, Code] = {}
        self._code_queue: deque[tuple[float, str]] = deque()  # all codes share one TTL: FIFO = expiry order
        self._expiry: list[tuple[float, str]] = []  # heap of (refresh expiry, session id); stale entries skipped
        #: Refresh tokens spent by a rotation, and how often one was presented again (must stay 0).
        self.spent: set[str] = set()
        self.refresh_reused = 0
        #: How and when each ended session ended (``session id -> (how, time)``): what a soak that
        #: finds a session gone asks, to tell who ended it.
        self.ended: dict[str, tuple[str, float]] = {}

    # --- login ---------------------------------------------------------------------------------

    def issue_code(
        self, email: str, *, active_ttl: float, refresh_ttl: float, profile: dict[str, str], now: float
    ) -> str:
        """A one-time ``pmc_`` code that :meth:`exchange_code` turns into a new session."""
        self.purge(now)
        code = new_id("pmc_")
        self.codes[code] = Code(
            email=email, active_ttl=active_ttl, refresh_ttl=refresh_ttl, profile=profile, expire=now + CODE_TTL
        )
        self._code_queue.append((now + CODE_TTL, code))
        return code

    def exchange_code(self, code: str, now: float) -> Session:
        """The new session behind a login code; the code works once."""
        self.purge(now)
        found = self.codes.pop(code, None)
        if found is None:
            raise Rejected(INVALID)
        if found.expire <= now:
            raise Rejected(EXPIRED)
        return self.create_session(
            found.email, active_ttl=found.active_ttl, refresh_ttl=found.refresh_ttl, profile=found.profile, now=now
        )

    def create_session(
        self, email: str, *, active_ttl: float, refresh_ttl: float, profile: dict[str, str], now: float
    ) -> Session:
        """A new live session for ``email`` (the user id ``pui_`` is derived from the email)."""
        session = Session(
            id=new_id("pmt_"),
            identity=stable_id("pui_", email.lower()),
            email=email,
            profile=profile,
            created_at=now,
            active_ttl=active_ttl,
            refresh_ttl=refresh_ttl,
        )
        self.sessions[session.id] = session
        self.by_user.setdefault(session.identity, {})[session.id] = session
        self._mint_refresh(session, now, first=True)
        self._mint_active(session, now, first=True)
        return session

    def seed(
        self, count: int, *, start: int, active_ttl: float, refresh_ttl: float, now: float, key: str = "bench"
    ) -> None:
        """Create sessions ``start`` … ``start + count - 1`` with the ids and secrets of :func:`seeded`."""
        for index in range(start, start + count):
            ids = seeded(index, key=key)
            session = Session(
                id=ids.session_id,
                identity=stable_id("pui_", ids.email),
                email=ids.email,
                profile={},
                created_at=now,
                active_ttl=active_ttl,
                refresh_ttl=refresh_ttl,
            )
            if session.id in self.sessions:
                raise ValueError(f"session {index} of {key!r} is already seeded")
            self.sessions[session.id] = session
            self.by_user.setdefault(session.identity, {})[session.id] = session
            self._mint_refresh(session, now, first=True, secret=ids.refresh_secret)
            self._mint_active(session, now, first=True, secret=ids.active_secret, token_id=ids.active_id)

    # --- token rules ---------------------------------------------------------------------------

    def lookup(self, secret: str, now: float) -> Token:
        """The live token behind ``secret``; Rejected(InvalidToken | ExpiredToken) otherwise."""
        token = self.by_secret.get(secret)
        if token is None:
            raise Rejected(INVALID)
        if token.expire <= now:
            raise Rejected(EXPIRED)
        return token

    def refresh(self, secret: str, user_token: str | None, now: float) -> Session:
        """Rotate a session's tokens with its refresh token, which is spent by the call.

        ``user_token`` is optional; if it names a token of *another* session the call is refused
        (InvalidToken). An unknown or expired ``user_token`` is accepted: it is usually the
        session's own expired active token.
        """
        self.purge(now)
        if secret in self.spent:
            self.refresh_reused += 1
        token = self.lookup(secret, now)
        if token.type != "session":
            raise Rejected(INVALID)
        session = token.session
        if user_token is not None:
            other = self.by_secret.get(user_token)
            if other is not None and other.session is not session:
                raise Rejected(INVALID)
        del self.by_secret[secret]
        self.spent.add(secret)
        self._mint_refresh(session, now)
        self._mint_active(session, now)
        return session

    def session(self, session_id: str, now: float) -> Session:
        """The live session with this id; Rejected otherwise."""
        session = self.sessions.get(session_id)
        if session is None:
            raise Rejected(INVALID)
        if session.refresh.expire <= now:
            raise Rejected(EXPIRED)
        return session

    def end(self, session: Session, *, how: str, now: float) -> None:
        """End a session: forget it and every one of its tokens (``how`` and ``now`` are journaled)."""
        self.ended[session.id] = (how, now)
        for token in session.tokens():
            self.by_secret.pop(token.secret, None)
        self.by_active_id.pop(session.active.id, None)
        self.sessions.pop(session.id, None)
        mine = self.by_user.get(session.identity)
        if mine is not None:
            mine.pop(session.id, None)
            if not mine:
                del self.by_user[session.identity]

    def logout_user(self, identity: str, now: float) -> int:
        """End every session of a user; how many there were (0 is fine: idempotent)."""
        mine = list(self.by_user.get(identity, {}).values())
        for session in mine:
            self.end(session, how="session/logout", now=now)
        return len(mine)

    def purge(self, now: float) -> None:
        """Forget codes and sessions that expired more than :data:`GRACE` seconds ago (amortized O(log n))."""
        codes = self._code_queue
        while codes and codes[0][0] <= now:
            self.codes.pop(codes.popleft()[1], None)
        heap = self._expiry
        while heap and heap[0][0] + GRACE <= now:
            _, session_id = heapq.heappop(heap)
            session = self.sessions.get(session_id)
            if session is not None and session.refresh.expire + GRACE <= now:
                self.end(session, how="expired", now=now)

    # --- minting -------------------------------------------------------------------------------

    def _jwt(self, session: Session, token_id: str, now: float, expire: float) -> str:
        """A signed JWT active token, with the claims a hosted-login project puts in one."""
        assert self.sign is not None
        claims: dict[str, object] = {
            "iss": "https://authn.emulator.pangea.test",
            "aud": "session-sync-emulator",
            "sub": session.identity,
            "jti": token_id,
            "sid": session.id,
            "iat": int(now),
            "nbf": int(now),
            "exp": int(expire),
            "email": session.email,
            "type": "user",
            "profile": session.profile or {"first_name": "Pat", "last_name": "Example", "locale": "en-US"},
            "scopes": ["openid", "profile", "email", "offline_access"],
            # Real ones carry the login's context too; enough of it to be a realistic kilobyte.
            "amr": ["pwd", "otp"],
            "login": {"provider": "password", "ip": "203.0.113.7", "user_agent": "Mozilla/5.0 (X11; Linux x86_64)"},
            "nonce": new_id("pn_"),
        }
        return self.sign(claims)

    def _mint_refresh(self, session: Session, now: float, *, first: bool = False, secret: str | None = None) -> None:
        keeps_session_id = self.rotation == "session-id" or (first and self.rotation == "new-refresh-id")
        token = Token(
            secret=secret or new_id("ptr_"),
            id=session.id if keeps_session_id else new_id("pmt_"),
            type="session",
            created_at=now,
            expire=now + session.refresh_ttl,
            session=session,
        )
        session.refresh = token
        self.by_secret[token.secret] = token
        heapq.heappush(self._expiry, (token.expire, session.id))

    def _mint_active(
        self,
        session: Session,
        now: float,
        *,
        first: bool = False,
        secret: str | None = None,
        token_id: str | None = None,
    ) -> None:
        token_id = token_id or new_id("pmt_")
        expire = min(now + session.active_ttl, session.refresh.expire)
        if secret is None:
            secret = self._jwt(session, token_id, now, expire) if self.active_tokens == "jwt" else new_id("ptu_")
        token = Token(secret=secret, id=token_id, type="user", created_at=now, expire=expire, session=session)
        if not first:
            old = session.active
            self.by_active_id.pop(old.id, None)
            keep = [t for t in session.retired if t.expire + GRACE > now]
            for gone in session.retired:
                if gone.expire + GRACE <= now:
                    self.by_secret.pop(gone.secret, None)
            session.retired = [*keep, old]
        session.active = token
        self.by_secret[token.secret] = token
        self.by_active_id[token.id] = session
