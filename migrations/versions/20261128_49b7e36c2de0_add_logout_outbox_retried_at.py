"""Add logout_outbox.retried_at: when an operator put a dead letter back, so its age counts from then.

Revision ID: 49b7e36c2de0
Revises: d5336c941983
Create Date: 2026-11-28 17:36:03.716787
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "49b7e36c2de0"
down_revision: str | Sequence[str] | None = "d5336c941983"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add logout_outbox.retried_at."""
    with op.batch_alter_table("logout_outbox", schema=None) as batch_op:
        batch_op.add_column(sa.Column("retried_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    """Drop logout_outbox.retried_at."""
    with op.batch_alter_table("logout_outbox", schema=None) as batch_op:
        batch_op.drop_column("retried_at")
