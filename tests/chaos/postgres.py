"""A PostgreSQL server of the soak's own: initdb into a temporary directory, on a free port.

The soak stops and starts PostgreSQL on purpose. Doing that to the machine's cluster (as
``pg_ctlcluster`` did) breaks every other test using it at the time, on a developer's machine and
on a CI machine alike, so the soak runs its own server from Debian's binaries
(``/usr/lib/postgresql/*/bin``), listening on 127.0.0.1 only, and removes it afterwards.

PostgreSQL will not run as root: when the tests do (CI, a container), the server runs as the
``postgres`` account (``runuser``) from a directory that account owns. Durability is off
(``fsync``, ``full_page_writes``): a crash of the test machine loses nothing anyone needs, and a
restart by the soak is a clean ``pg_ctl stop -m fast``, which loses nothing either.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.conftest import free_port, require
from worker import db as dbmod

#: The server's settings: enough connections for the fleet (each worker process and its children
#: keep a pool), nothing written to disk that a test would wait for.
SERVER_OPTIONS = (
    "-c listen_addresses=127.0.0.1 -c max_connections=300 -c fsync=off -c synchronous_commit=off"
    " -c full_page_writes=off -c shared_buffers=32MB"
)
DATABASE = "test"


def binaries() -> Path | None:
    """The newest installed PostgreSQL's ``bin`` directory (Debian's layout), or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(found[-1]).parent if found else None


class PrivatePostgres:
    """One PostgreSQL server in a temporary directory; :meth:`stop` and :meth:`start` at will."""

    def __init__(self) -> None:
        found = binaries()
        if found is None:
            raise FileNotFoundError("PostgreSQL's server binaries are not installed (/usr/lib/postgresql/*/bin)")
        self.bin = found
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="session-sync-chaos-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self._as: list[str] = []
        if os.geteuid() == 0:
            account = pwd.getpwnam("postgres")  # Debian's server package makes it
            os.chown(self.root, account.pw_uid, account.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]
        self.admin_url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{DATABASE}"
        self._pg("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")

    def _pg(self, program: str, *args: str, timeout: float = 60) -> None:
        argv = [*self._as, str(self.bin / program), *args]
        done = subprocess.run(argv, cwd=self.root, capture_output=True, text=True, timeout=timeout, check=False)
        if done.returncode != 0:
            log = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
            raise RuntimeError(f"{program} {' '.join(args)} failed:\n{done.stdout}{done.stderr}{log}")

    def start(self) -> None:
        """Start the server and wait until it accepts connections (the socket stays in our directory)."""
        options = f"-p {self.port} -k {self.root} {SERVER_OPTIONS}"
        self._pg("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: ``fast`` ends every connection and shuts down cleanly, as a restart would."""
        self._pg("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def create_database(self) -> str:
        """Make and migrate the database the soak's workers use; its URL."""
        engine = sa.create_engine(self.admin_url, isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                conn.execute(sa.text(f'CREATE DATABASE "{DATABASE}"'))
        finally:
            engine.dispose()
        dbmod.upgrade(self.url)
        return self.url

    def close(self) -> None:
        """Stop the server (if it runs) and remove its directory."""
        if (self.data / "postmaster.pid").exists():
            try:
                self.stop("immediate")
            except (RuntimeError, subprocess.TimeoutExpired):
                time.sleep(1)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def own_postgres() -> Iterator[PrivatePostgres]:
    """A PostgreSQL server of the test's own, its database migrated; removed afterwards.

    ``SESSION_SYNC_CHAOS_KEEP=1`` leaves it running (its URL is printed), to read a replay's rows.
    """
    require(binaries() is not None, "PostgreSQL's server binaries are not installed (/usr/lib/postgresql/*/bin)")
    server = PrivatePostgres()
    keep = os.environ.get("SESSION_SYNC_CHAOS_KEEP") == "1"
    try:
        server.start()
        server.create_database()
        yield server
    finally:
        if keep:
            print(f"\nchaos: PostgreSQL kept at {server.url} (data in {server.root})")
        else:
            server.close()
