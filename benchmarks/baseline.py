"""The baseline sweep: what a user writes by hand, run as its own process like ``session-sync sweep --once``.

    DATABASE_URL=... PANGEA_BASE_URL=... SESSION_SYNC_ENCRYPTION_KEYS=... python -m benchmarks.baseline

The official ``pangea-sdk``'s ``token_endpoints.check`` for each due session, one at a time, and one
``UPDATE`` + ``COMMIT`` per row. Prints its counts as one JSON object, as ``sweep --once --json`` does.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa

from worker import crypto, emulator


def sweep_by_hand(db_url: str, base_url: str, key: str) -> dict[str, int]:
    """Every due session checked by the SDK, one UPDATE and COMMIT per row; the counts."""
    from pangea.config import PangeaConfig
    from pangea.exceptions import PangeaAPIException
    from pangea.services import AuthN

    from worker import db as dbmod

    authn = AuthN(emulator.DEFAULT_SERVICE_TOKEN, config=PangeaConfig(base_url_template=base_url))
    cipher = crypto.TokenCipher([key])
    engine = dbmod.create_engine(db_url)
    kept = revoked = 0
    with engine.connect() as conn:
        due = conn.execute(
            sa.text(
                "SELECT id, active_token_enc FROM sessions WHERE state = 'active' AND next_check_at <= now()"
                " ORDER BY next_check_at"
            )
        ).all()
        conn.commit()
        for session_id, token_enc in due:
            now = datetime.now(UTC)
            try:
                result = authn.client.token_endpoints.check(cipher.decrypt(token_enc)).result
                assert result is not None
                conn.execute(
                    sa.text(
                        "UPDATE sessions SET last_checked_at = :now, next_check_at = :next, updated_at = :now,"
                        " active_expires_at = :expire, version = version + 1 WHERE id = :id"
                    ),
                    {"now": now, "next": now + timedelta(minutes=5), "expire": result.expire, "id": session_id},
                )
                kept += 1
            except PangeaAPIException as exc:
                if exc.response.status != "InvalidToken":
                    raise
                conn.execute(
                    sa.text(
                        "UPDATE sessions SET state = 'revoked', end_reason = 'invalid_token', ended_at = :now,"
                        " version = version + 1 WHERE id = :id"
                    ),
                    {"now": now, "id": session_id},
                )
                revoked += 1
            conn.commit()
    engine.dispose()
    return {"checked": kept + revoked, "kept": kept, "revoked": revoked}


def main() -> None:
    """Run once from the environment the benchmark sets, print the counts."""
    env = os.environ
    counts = sweep_by_hand(env["DATABASE_URL"], env["PANGEA_BASE_URL"], env["SESSION_SYNC_ENCRYPTION_KEYS"])
    print(json.dumps(counts), flush=True)


if __name__ == "__main__":
    main()
