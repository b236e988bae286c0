"""The README's first command: ``session-sync demo`` on embedded defaults, no settings, no servers."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tests.acceptance import harness

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]


def test_demo_runs_on_embedded_defaults_and_reports_every_group(tmp_path: Path) -> None:
    # Given a shell with no session-sync settings at all
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("PANGEA_", "SESSION_SYNC_", "CELERY_", "DATABASE_"))
    }
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    # When a newcomer runs the demo
    result = harness.run_cli(env, tmp_path, "demo", timeout=110)
    # Then it succeeds with a table of every group against what should have happened
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    for line in ("healthy", "killed at Pangea", "about to expire", "expired, worker down", "logged out, Pangea 5xx"):
        [row] = [r for r in out.splitlines() if r.startswith(line) and r.rstrip().endswith(("OK", "WRONG"))]
        assert row.rstrip().endswith("OK"), row
    assert "every group ended as it should" in out
    # ... and it leaves nothing behind in the folder it ran from
    assert list(tmp_path.iterdir()) == []
