"""Add revocation_guard: the mass-revocation guard's state (one row).

Revision ID: 5f54a10c480e
Revises: 49b7e36c2de0
Create Date: 2026-11-28 17:44:16.757036
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "5f54a10c480e"
down_revision: str | Sequence[str] | None = "49b7e36c2de0"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create revocation_guard."""
    op.create_table(
        "revocation_guard",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("tripped_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("checked", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("would_revoke", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("cleared_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_revocation_guard")),
    )


def downgrade() -> None:
    """Drop revocation_guard."""
    op.drop_table("revocation_guard")
