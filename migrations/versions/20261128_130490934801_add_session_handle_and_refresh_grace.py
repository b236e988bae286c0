"""Add sessions.handle_hash (opaque cookie handles) and previous_token_hash / rotated_at (refresh grace).

Revision ID: 130490934801
Revises: 8e3c5a1f7b20
Create Date: 2026-11-28 20:03:13.623575
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "130490934801"
down_revision: str | Sequence[str] | None = "8e3c5a1f7b20"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add the handle hash, the replaced token's hash and the rotation time, with their indexes."""
    with op.batch_alter_table("sessions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("handle_hash", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("previous_token_hash", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("rotated_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index(batch_op.f("ix_sessions_handle_hash"), ["handle_hash"], unique=True)
        batch_op.create_index(batch_op.f("ix_sessions_previous_token_hash"), ["previous_token_hash"], unique=False)


def downgrade() -> None:
    """Drop them again."""
    with op.batch_alter_table("sessions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_sessions_previous_token_hash"))
        batch_op.drop_index(batch_op.f("ix_sessions_handle_hash"))
        batch_op.drop_column("rotated_at")
        batch_op.drop_column("previous_token_hash")
        batch_op.drop_column("handle_hash")
