"""The web app's process: ``worker.sessions`` and the framework glue load nothing heavy, read settings once,
and a logout's kick lands on our own queue without importing our Celery app.

Shown the way the issue asks, with ``python -X importtime`` in a fresh interpreter, and with a
real logout against a real Redis broker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest
import redis

from tests.conftest import RunningEmulator
from tests.helpers import env_for
from worker import db as dbmod
from worker import task_names
from worker.settings import DEFAULT_QUEUE

#: What a web process must not load by importing worker.sessions or worker.web.
HEAVY = ("celery", "kombu", "httpx", "httpcore", "tenacity", "prometheus_client", "alembic", "redis", "uvicorn")


def imported_modules(code: str, env: dict[str, str] | None = None) -> set[str]:
    """Every module a fresh interpreter imports while running ``code``, from ``-X importtime``."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=60,
        check=True,
    )
    names = set()
    for line in proc.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip())
    assert "worker.sessions" in names or "worker" in names, proc.stderr[-2000:]
    return names


@pytest.mark.parametrize("module", ["worker.sessions", "worker.web"])
def test_importing_the_web_api_loads_nothing_heavy(module: str) -> None:
    # Given a web process with a broker configured, as in production
    env = {"CELERY_BROKER_URL": "redis://127.0.0.1:6379/0"}
    # When it imports the API (and the framework glue)
    names = imported_modules(f"import {module}", env)
    # Then no Celery, kombu, httpx, tenacity, prometheus_client or Alembic came with it
    heavy = sorted(n for n in names if n.split(".")[0] in HEAVY)
    assert heavy == [], heavy


@pytest.mark.redis
def test_a_logout_reads_settings_once_and_kicks_our_queue_without_our_celery_app(
    tmp_path: Path, emu: RunningEmulator, redis_url: str
) -> None:
    # Given a migrated database, a real login's userinfo, and the web app's environment
    url = f"sqlite:///{tmp_path / 'app.db'}"
    dbmod.upgrade(url)
    code = emu.admin.login("ann@example.com")
    answer = httpx.post(
        f"{emu.base_url}/v2/client/userinfo",
        json={"code": code},
        headers={"Authorization": f"Bearer {emu.client_token}"},
        timeout=10,
    ).json()
    (tmp_path / "userinfo.json").write_text(json.dumps(answer))
    env = env_for(url, emu, broker=redis_url)
    del env["PANGEA_AUTHN_TOKEN"]  # this web app never calls Pangea: no token in its environment
    script = textwrap.dedent(f"""
        import json, sys
        from worker import settings
        calls = []
        original = settings.Settings.from_env.__func__
        settings.Settings.from_env = classmethod(lambda cls, env=None: calls.append(1) or original(cls, env))
        from worker import db, sessions
        userinfo = json.load(open({str(tmp_path / "userinfo.json")!r}))
        factory = db.session_factory(db.create_engine({url!r}))
        for _ in range(3):
            with factory.begin() as s:
                sid = sessions.record_login(s, userinfo).id if _ == 0 else sid
                sessions.authenticate(s, sid)
        with factory.begin() as s:
            sessions.logout(s, sid)
        print(json.dumps({{"from_env": len(calls), "celery_app": "worker.celery" in sys.modules,
                           "httpx": "httpx" in sys.modules, "tenacity": "tenacity" in sys.modules}}))
    """)
    # When the app logs in once, authenticates three times and logs out (the kick fires after commit)
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env={**os.environ, **env}, timeout=60
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    # Then settings were parsed once, and neither our Celery app nor the HTTP stack was loaded
    assert seen == {"from_env": 1, "celery_app": False, "httpx": False, "tenacity": False}
    # And the kick is waiting on our own queue, not on Celery's default one
    broker = redis.Redis.from_url(redis_url)
    [message] = broker.lrange(DEFAULT_QUEUE, 0, -1)
    assert json.loads(message)["headers"]["task"] == task_names.DELIVER_LOGOUTS
    assert broker.llen("celery") == 0
