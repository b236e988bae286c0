"""Add rate_limit_buckets: the outbound rate limit's shared bucket when the database holds it.

``SESSION_SYNC_RATE_LIMIT_STORE=database`` (the default on PostgreSQL with a broker that is not
Redis) takes tokens from one row per Pangea project, a grant at a time (worker.ratelimit).

Revision ID: 3b8f0c6d2e41
Revises: 7d1c4e2a9b30
Create Date: 2026-12-02 05:40:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "3b8f0c6d2e41"
down_revision: str | Sequence[str] | None = "7d1c4e2a9b30"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create rate_limit_buckets."""
    op.create_table(
        "rate_limit_buckets",
        sa.Column("bucket", sa.String(length=64), nullable=False),
        sa.Column("tokens", sa.Double(), nullable=False),
        sa.Column("refilled_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("bucket", name=op.f("pk_rate_limit_buckets")),
    )


def downgrade() -> None:
    """Drop rate_limit_buckets."""
    op.drop_table("rate_limit_buckets")
