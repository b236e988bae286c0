"""Set sessions' fillfactor to 70 on PostgreSQL, so a claim updates its row in place (a HOT update).

Every check writes a session row twice: the claim (``claimed_until``, ``claim_token``: no index) and
the outcome (``next_check_at``: indexed). With full pages the claim's new row version lands on
another page and every one of the table's six indexes gets a new entry; with room left on the page
it is a heap-only tuple and no index is touched. Measured on 100,000 sessions: a 500-row claim went
from 17 ms to 7 ms of server time (``docs/benchmarks.md``). Pages written before this revision keep
their fill until they are rewritten (``VACUUM FULL``, pg_repack) or pruned by later updates.

Revision ID: 8e3c5a1f7b20
Revises: 5f54a10c480e
Create Date: 2026-11-28 21:05:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "8e3c5a1f7b20"
down_revision: str | Sequence[str] | None = "5f54a10c480e"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: Share of each heap page that inserts fill, leaving the rest for in-place (HOT) updates.
FILLFACTOR = 70


def upgrade() -> None:
    """ALTER TABLE sessions SET (fillfactor = 70) on PostgreSQL; nothing elsewhere."""
    if op.get_context().dialect.name == "postgresql":
        op.execute(f"ALTER TABLE sessions SET (fillfactor = {FILLFACTOR})")


def downgrade() -> None:
    """Back to the default fillfactor (100)."""
    if op.get_context().dialect.name == "postgresql":
        op.execute("ALTER TABLE sessions RESET (fillfactor)")
