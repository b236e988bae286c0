"""Pangea's unknown list limits: learn what a list request may hold, and split what it refuses.

Pangea publishes no maximum for ``size`` on its session lists, nor for the ids in a filter such
as ``active_token_id__in``. A Pangea that silently caps a page is covered by paging with
``last``; one that *refuses* a request as too large (``ValidationError``, or any answer about the
request's shape: ``errors.AuthnRequestInvalid``) would fail every batch the same way forever. So
a refused list request is never a failure: its ids are split into smaller chunks (and its page
size cut) until Pangea accepts them, and an id that cannot be listed even alone is handed back
for a per-token check. Every session of a batch still gets Pangea's answer in the same run.

What was learned is kept per process (one :class:`Limits` per ``AuthnClient``), not across
restarts: a restarted worker pays a few refused requests once, then uses the learned limit.
``SESSION_SYNC_BULK_CHUNK`` fixes the chunk size for those who know their project's limit.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from worker import errors, metrics, wire

logger = logging.getLogger(__name__)

#: What a refusal can cut down: the filter's ids, or the page size.
IDS, SIZE = "ids", "size"

Fetch = Callable[[list[str], int, str | None], Awaitable[wire.ListedPage]]


class Limit:
    """The largest value of one quantity (``ids`` or ``size``) that one endpoint accepts, as tried.

    ``accepted`` is the largest value Pangea accepted, ``refused`` the smallest it refused; values
    in between are probed by bisection, so the exact limit is found in a few requests and used
    from then on. ``fixed`` (a setting) caps every value.
    """

    def __init__(self, endpoint: str, kind: str, *, fixed: int | None = None) -> None:
        self.endpoint = endpoint
        self.kind = kind
        self.fixed = fixed
        self.accepted = 0
        self.refused: int | None = None
        self._announced: int | None = None

    @property
    def known(self) -> int | None:
        """The limit, once found exactly (None: never refused, or still probing)."""
        if self.refused is None or self.accepted + 1 < self.refused:
            return None
        return self.accepted

    def next(self, wanted: int) -> int:
        """How many to ask for when ``wanted`` are needed: at most the limit, or a probe toward it."""
        cap = wanted if self.fixed is None else min(wanted, self.fixed)
        if self.refused is None:
            return cap
        if self.known is not None:
            return max(1, min(cap, self.known))
        probe = (self.accepted + self.refused) // 2 if self.accepted else self.refused // 2
        return max(1, min(cap, probe))

    def accept(self, value: int) -> None:
        """Pangea accepted ``value``."""
        if value > self.accepted:
            self.accepted = value
        if self.refused is not None and self.refused <= value:  # the limit moved up: learn it again
            self.refused = None
        self._announce()

    def refuse(self, value: int) -> None:
        """Pangea refused ``value`` as too large."""
        metrics.record_list_refusal(self.endpoint, self.kind)
        if self.refused is None or value < self.refused:
            self.refused = value
        if self.accepted >= value:  # the limit moved down
            self.accepted = value - 1
        self._announce()

    def _announce(self) -> None:
        limit = self.known
        if limit is None or limit == self._announced:
            return
        self._announced = limit
        metrics.record_list_limit(self.endpoint, self.kind, limit)
        what = "filter ids" if self.kind == IDS else "sessions per page"
        extra = {"action": "list_limit_learned", "endpoint": self.endpoint, "kind": self.kind, "limit": limit}
        if limit == 0:
            logger.warning(
                "Pangea refuses %s even with one of %s: checking them one by one", self.endpoint, what, extra=extra
            )
            return
        logger.warning(
            "Pangea accepts at most %d %s per request on %s; using that from now on (set SESSION_SYNC_BULK_CHUNK "
            "to skip learning it after a restart)",
            limit,
            what,
            self.endpoint,
            extra=extra,
        )


@dataclass(slots=True)
class Limits:
    """The two limits of one list endpoint."""

    ids: Limit
    size: Limit

    @classmethod
    def for_endpoint(cls, endpoint: str, *, chunk: int | None = None) -> Limits:
        """Fresh limits for ``endpoint``; ``chunk`` fixes both (SESSION_SYNC_BULK_CHUNK)."""
        return cls(ids=Limit(endpoint, IDS, fixed=chunk), size=Limit(endpoint, SIZE, fixed=chunk))


@dataclass(slots=True)
class Listed:
    """Sessions found by their active token ids, and the ids Pangea would not list even alone."""

    found: dict[str, wire.ListedSession] = field(default_factory=dict)
    #: Check these one by one (``/v2/client/token/check``): the list cannot answer for them.
    unlisted: list[str] = field(default_factory=list)


def blames(exc: errors.AuthnRequestInvalid) -> set[str]:
    """What a refusal speaks of: ``size`` (``/size``), else the ids (the filter, or nothing we can tell)."""
    kinds = {SIZE if source.startswith("/size") else IDS for source in exc.sources}
    return kinds or {IDS}


async def list_by_ids(ids: Sequence[str], *, fetch: Fetch, limits: Limits) -> Listed:
    """Every live session whose active token id is in ``ids``: chunked, paged, split when refused.

    ``fetch(chunk, size, last)`` asks for one page. Refusals about the request's shape are learned
    and split; any other failure is raised as it is (Pangea gave no answer for anyone).
    """
    listed = Listed()
    pending: deque[list[str]] = deque([list(dict.fromkeys(ids))] if ids else [])
    while pending:
        chunk = pending.popleft()
        n = limits.ids.next(len(chunk))
        if n < len(chunk):
            pending.extendleft(reversed([chunk[i : i + n] for i in range(0, len(chunk), n)]))
            continue
        try:
            await _pages(chunk, fetch=fetch, limits=limits, into=listed.found)
        except errors.AuthnRequestInvalid:
            limits.ids.refuse(len(chunk))
            if len(chunk) == 1:
                listed.unlisted.append(chunk[0])
            else:
                pending.appendleft(chunk)  # cut down by limits.ids.next on the next turn
            continue
        limits.ids.accept(len(chunk))
    return listed


async def _pages(chunk: list[str], *, fetch: Fetch, limits: Limits, into: dict[str, wire.ListedSession]) -> None:
    """Every page for one chunk of ids; a refusal of the page size alone is learned and retried smaller."""
    last: str | None = None
    while True:
        size = limits.size.next(len(chunk))
        try:
            page = await fetch(chunk, size, last)
        except errors.AuthnRequestInvalid as exc:
            if blames(exc) == {SIZE} and size > 1:
                limits.size.refuse(size)
                continue
            raise
        limits.size.accept(size)
        for item in page.sessions:
            if item.active_token_id is not None:
                into[item.active_token_id] = item
        if not page.last or not page.sessions:
            return
        last = page.last
