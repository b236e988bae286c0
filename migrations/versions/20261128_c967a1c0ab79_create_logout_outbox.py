"""Create logout_outbox: logouts owed to Pangea, delivered at least once.

Revision ID: c967a1c0ab79
Revises: 5082f1301099
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "c967a1c0ab79"
down_revision: str | Sequence[str] | None = "5082f1301099"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create logout_outbox."""
    op.create_table(
        "logout_outbox",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("session_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column("user_id", sa.String(length=64), nullable=False),
        sa.Column("token_enc", sa.Text(), nullable=True),
        sa.Column("state", sa.String(length=16), server_default="pending", nullable=False),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("claimed_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("claim_token", sa.String(length=64), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("dead_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_logout_outbox")),
        sa.ForeignKeyConstraint(
            ["session_id"],
            ["sessions.id"],
            name=op.f("fk_logout_outbox_session_id_sessions"),
            ondelete="SET NULL",
        ),
        sa.CheckConstraint("kind IN ('session', 'user')", name=op.f("ck_logout_outbox_kind")),
        sa.CheckConstraint("state IN ('pending', 'delivered', 'dead')", name=op.f("ck_logout_outbox_state")),
        sa.CheckConstraint(
            "kind = 'user' OR state <> 'pending' OR token_enc IS NOT NULL", name=op.f("ck_logout_outbox_token")
        ),
        sa.CheckConstraint(
            "(state <> 'delivered' OR delivered_at IS NOT NULL) AND (state <> 'dead' OR dead_at IS NOT NULL)",
            name=op.f("ck_logout_outbox_finished"),
        ),
        sqlite_autoincrement=True,
    )
    op.create_index(op.f("ix_logout_outbox_session_id"), "logout_outbox", ["session_id"])
    op.create_index(
        op.f("ix_logout_outbox_next_attempt_at"),
        "logout_outbox",
        ["next_attempt_at"],
        postgresql_where=sa.text("state = 'pending'"),
        sqlite_where=sa.text("state = 'pending'"),
    )


def downgrade() -> None:
    """Drop logout_outbox (its indexes go with it)."""
    op.drop_table("logout_outbox")
