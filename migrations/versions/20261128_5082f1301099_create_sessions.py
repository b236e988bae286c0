"""Create sessions: local sessions, their encrypted tokens, and the due-scan index.

Revision ID: 5082f1301099
Revises:
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "5082f1301099"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create sessions."""
    op.create_table(
        "sessions",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("user_id", sa.String(length=64), nullable=False),
        sa.Column("email", sa.String(length=320), nullable=False),
        sa.Column("pangea_session_id", sa.String(length=64), nullable=True),
        sa.Column("active_token_id", sa.String(length=64), nullable=False),
        sa.Column("active_token_enc", sa.Text(), nullable=False),
        sa.Column("refresh_token_enc", sa.Text(), nullable=True),
        sa.Column("active_token_hash", sa.String(length=64), nullable=False),
        sa.Column("active_expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("refresh_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("state", sa.String(length=16), server_default="active", nullable=False),
        sa.Column("end_reason", sa.String(length=64), nullable=True),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("last_checked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("next_check_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("claimed_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("claim_token", sa.String(length=64), nullable=True),
        sa.Column("failures", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("uncertain", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("version", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sessions")),
        sa.CheckConstraint("state IN ('active', 'logged_out', 'revoked')", name=op.f("ck_sessions_state")),
        sa.CheckConstraint(
            "(state = 'active' AND end_reason IS NULL AND ended_at IS NULL)"
            " OR (state <> 'active' AND end_reason IS NOT NULL AND ended_at IS NOT NULL)",
            name=op.f("ck_sessions_ended"),
        ),
        sqlite_autoincrement=True,
    )
    op.create_index(op.f("ix_sessions_user_id"), "sessions", ["user_id"])
    op.create_index(op.f("ix_sessions_pangea_session_id"), "sessions", ["pangea_session_id"], unique=True)
    op.create_index(op.f("ix_sessions_active_token_id"), "sessions", ["active_token_id"])
    op.create_index(op.f("ix_sessions_active_token_hash"), "sessions", ["active_token_hash"], unique=True)
    op.create_index(
        op.f("ix_sessions_next_check_at"),
        "sessions",
        ["next_check_at"],
        postgresql_where=sa.text("state = 'active'"),
        sqlite_where=sa.text("state = 'active'"),
    )


def downgrade() -> None:
    """Drop sessions (its indexes go with it)."""
    op.drop_table("sessions")
