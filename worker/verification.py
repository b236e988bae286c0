"""When Pangea last vouched for a session: the one rule, as SQL, for the worker and the app alike.

A routine check writes no session row (``worker.models.CheckGroup``), so ``sessions.last_checked_at``
alone is not the answer. The answer is the later of

- the row's own record, ``coalesce(last_checked_at, created_at)`` (a login is Pangea's word too), and
- for a session on its group's schedule (``next_check_at IS NULL``), the group's: the start of the
  round in progress if the round's cursor has passed the session (``(bucket, id) <= cursor``), else
  the start of the last completed round (``verified_at``).

Why that is true: every way onto a group's schedule is a write that sets ``last_checked_at`` to the
time of Pangea's answer (or is a login, recorded in ``created_at``), so a group time earlier than that
never wins; a session whose check failed or changed something leaves the group's schedule in the same
write. ``worker.sessions``, the engine's reads, ``status --session`` and the PostgreSQL function
``session_sync_judge`` read it so; the README's "Database contract" gives it to other languages.
"""

from __future__ import annotations

from datetime import datetime
from typing import cast

import sqlalchemy as sa

from worker import models

__all__ = ["group_vouched_at", "last_checked_at", "vouched_at"]

_S = cast(sa.Table, models.LocalSession.__table__)
_G = cast(sa.Table, models.CheckGroup.__table__)


def group_vouched_at(sessions: sa.FromClause | None = None) -> sa.ScalarSelect[object]:
    """The group's word on a session of ``sessions`` (default: the table), NULL if it has none yet."""
    s = sessions if sessions is not None else _S
    g = _G.alias("vouching_group")
    passed = sa.and_(
        g.c.cursor_id.is_not(None),
        sa.or_(s.c.bucket < g.c.cursor_bucket, sa.and_(s.c.bucket == g.c.cursor_bucket, s.c.id <= g.c.cursor_id)),
    )
    return (
        sa.select(sa.case((passed, g.c.round_started_at), else_=g.c.verified_at))
        .where(g.c.lo <= s.c.bucket, s.c.bucket < g.c.hi)
        .scalar_subquery()
    )


def vouched_at(sessions: sa.FromClause | None = None) -> sa.ColumnElement[datetime]:
    """When Pangea last vouched for a session of ``sessions`` (default: the table): never NULL."""
    s = sessions if sessions is not None else _S
    own = sa.func.coalesce(s.c.last_checked_at, s.c.created_at)
    group = group_vouched_at(s)
    later = sa.case((sa.and_(s.c.next_check_at.is_(None), group > own), group), else_=own)
    return sa.type_coerce(later, models.UtcDateTime())


def last_checked_at(sessions: sa.FromClause | None = None) -> sa.ColumnElement[datetime]:
    """``last_checked_at`` as the app reads it: when Pangea last vouched, NULL if not since the login."""
    s = sessions if sessions is not None else _S
    group = group_vouched_at(s)
    own = sa.func.coalesce(s.c.last_checked_at, s.c.created_at)
    later = sa.case((sa.and_(s.c.next_check_at.is_(None), group > own), group), else_=s.c.last_checked_at)
    return sa.type_coerce(later, models.UtcDateTime())
