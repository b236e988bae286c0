"""Serve an example app in a subprocess, on the test's database and the emulator, for tests over real HTTP."""

from __future__ import annotations

import importlib.util
import os
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.acceptance.harness import ROOT, wait_for
from tests.conftest import RunningEmulator, require
from tests.helpers import env_for

#: The grace period the example apps run with (seconds), short so a test can outlive it.
GRACE = 2.0


def app_env(db_url: str, emu: RunningEmulator, home: Path, **extra: str) -> dict[str, str]:
    """An example app's environment: the same variables as the worker's, and only a client token."""
    process = {"PATH": os.environ.get("PATH", ""), "HOME": str(home), "PYTHONPATH": str(ROOT)}
    settings = {"SESSION_SYNC_REFRESH_GRACE": f"{GRACE}s", "SESSION_SYNC_REFRESH_MARGIN": "10s"}
    # an app needs only a client token
    return process | env_for(db_url, emu, token=emu.client_token, broker=None) | settings | extra


def require_modules(*names: str) -> None:
    """Skip (fail in CI) unless the example's framework packages are installed (they come with ``.[test]``)."""
    missing = [name for name in names if importlib.util.find_spec(name) is None]
    require(not missing, f"{', '.join(missing)} not installed (pip install -e '.[test]')")


def _up(url: str) -> bool:
    try:
        httpx.get(url, timeout=1)
        return True
    except httpx.HTTPError:
        return False


@contextmanager
def serve(argv: Sequence[str], env: dict[str, str], port: int, log: Path) -> Iterator[str]:
    """Run ``argv`` until it answers on ``port``; yield its base URL; stop it afterwards."""
    with log.open("wb") as out:
        proc = subprocess.Popen(list(argv), cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_for(lambda: _up(url) or proc.poll() is not None, timeout=30, what="example app up")
            assert proc.poll() is None, log.read_text()
            yield url
        finally:
            proc.terminate()
            proc.wait(timeout=10)
