"""Secrets stay secret: after logins, refreshes and revocations no table holds a token in clear."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from tests.conftest import RunningEmulator
from tests.helpers import active_token, login, moved_clock, row
from worker import models


def every_value(engine: sa.Engine) -> str:
    """Every cell of every table, as one string."""
    cells: list[str] = []
    with engine.connect() as conn:
        for table in models.Base.metadata.sorted_tables:
            for record in conn.execute(sa.select(table)):
                cells.extend(str(v) for v in record)
    return "\n".join(cells)


def test_no_plaintext_token_in_any_table(make_runtime: Any, emu: RunningEmulator) -> None:
    rt = make_runtime()
    clock = moved_clock(rt)
    # Given logins whose tokens we know, one of them refreshed and one revoked
    ids = [login(rt, emu, f"s{i}@example.com", active_ttl=4) for i in range(3)]
    seen = {active_token(rt, i) for i in ids}
    seen |= {rt.cipher.decrypt(row(rt, i).refresh_token_enc or "") for i in ids}
    rt.run(rt.client.session_invalidate(row(rt, ids[2]).pangea_session_id or ""))
    clock.advance(2.6)  # inside the refresh margin
    counts = rt.run(rt.engine.resync())
    assert counts.refreshed == 2 and counts.revoked == 1
    seen |= {active_token(rt, i) for i in ids[:2]}
    seen |= {rt.cipher.decrypt(row(rt, i).refresh_token_enc or "") for i in ids[:2]}
    assert len(seen) == 10 and all(t.startswith(("ptu_", "ptr_")) for t in seen)

    # When we read every cell of every table
    dump = every_value(rt.db_engine)

    # Then no token, old or new, active or refresh, is there in clear
    assert dump and not [t for t in seen if t in dump]
    # ... nor any token-shaped string at all
    assert "ptu_" not in dump and "ptr_" not in dump
