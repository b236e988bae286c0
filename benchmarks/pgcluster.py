"""A private PostgreSQL cluster for one benchmark run, so its WAL, row counts and CPU are the sweep's alone.

The shared server on this machine serves other sessions' tests: its WAL position moves and its
``postgres`` processes burn CPU for them. A cluster of our own (``initdb`` into a temporary directory,
a free port, no other client) makes ``pg_current_wal_lsn()`` before and after a sweep, and the CPU of
its processes, a measurement of that sweep.

Settings (printed with each result): the ``initdb`` defaults (``shared_buffers=128MB``, ``fsync=on``,
``synchronous_commit=on``, ``full_page_writes=on``, ``wal_level=replica``, no data checksums) with
``autovacuum=off`` so no background vacuum writes WAL or takes CPU inside a measured sweep (the seed
runs ``VACUUM ANALYZE`` itself), ``listen_addresses=127.0.0.1`` on a free port, and
``pg_stat_statements`` loaded (its extension created in database ``postgres``) to count statements.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

#: Server settings beyond initdb's defaults (``-c name=value`` on the command line).
SETTINGS = {
    "autovacuum": "off",
    "listen_addresses": "127.0.0.1",
    "max_connections": "100",
    "fsync": "on",
    "synchronous_commit": "on",
    "shared_buffers": "128MB",
    "shared_preload_libraries": "pg_stat_statements",
    "pg_stat_statements.track": "top",
    "pg_stat_statements.track_utility": "off",
}
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def bindir() -> str:
    """The newest ``/usr/lib/postgresql/<major>/bin`` (or ``SESSION_SYNC_BENCH_PG_BIN``)."""
    configured = os.environ.get("SESSION_SYNC_BENCH_PG_BIN")
    if configured:
        return configured
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[-3]))
    if not found:
        raise RuntimeError("no PostgreSQL under /usr/lib/postgresql/*/bin: set SESSION_SYNC_BENCH_PG_BIN")
    return os.path.dirname(found[-1])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _as_postgres() -> dict[str, Any]:
    """``initdb`` and ``postgres`` refuse to run as root: run them as the ``postgres`` user then."""
    return {"user": "postgres", "group": "postgres"} if os.geteuid() == 0 else {}


@dataclass(frozen=True, slots=True)
class Cluster:
    """A running private server: its admin URL (database ``postgres``), data directory and postmaster pid."""

    url: str
    datadir: str
    postmaster_pid: int
    settings: dict[str, str]

    def cpu_seconds(self) -> float:
        """CPU of every process of this server so far, those already gone included.

        Live processes (postmaster's children) count their own user + system time; backends that
        exited (the sweep's connections close when it ends) are in the postmaster's ``cutime`` +
        ``cstime``, since the postmaster reaps them.
        """
        total = 0.0
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            with contextlib.suppress(OSError, IndexError, ValueError):
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                pid, ppid = int(entry), int(fields[1])
                if pid == self.postmaster_pid:
                    total += sum(int(x) for x in fields[11:15]) / _CLK_TCK  # utime stime cutime cstime
                elif ppid == self.postmaster_pid:
                    total += sum(int(x) for x in fields[11:15]) / _CLK_TCK
        return total


@contextlib.contextmanager
def private_cluster() -> Iterator[Cluster]:
    """``initdb`` a cluster into a temporary directory, start it on a free port, remove it afterwards."""
    bin_ = bindir()
    root = tempfile.mkdtemp(prefix="ssbench-pg-")
    datadir = os.path.join(root, "data")
    user = _as_postgres()
    if user:
        shutil.chown(root, "postgres", "postgres")
    subprocess.run(
        [f"{bin_}/initdb", "-D", datadir, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-instructions"],
        check=True,
        capture_output=True,
        **user,
    )
    port = _free_port()
    options = {**SETTINGS, "port": str(port), "unix_socket_directories": root}
    argv = [f"{bin_}/postgres", "-D", datadir, *(a for k, v in options.items() for a in ("-c", f"{k}={v}"))]
    log = open(os.path.join(root, "server.log"), "wb")  # closed below, after the server
    server = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, **user)
    url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    try:
        _wait_ready(bin_, port, server)
        subprocess.run(
            [
                f"{bin_}/psql",
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-q",
                "-c",
                "CREATE EXTENSION pg_stat_statements",
            ],
            check=True,
            capture_output=True,
        )
        yield Cluster(url=url, datadir=datadir, postmaster_pid=server.pid, settings=options)
    finally:
        server.terminate()  # SIGTERM: smart shutdown; our clients are gone by now
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
        shutil.rmtree(root, ignore_errors=True)


def _wait_ready(bindir: str, port: int, server: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while True:
        ready = subprocess.run(
            [f"{bindir}/pg_isready", "-h", "127.0.0.1", "-p", str(port), "-q"], check=False, capture_output=True
        )
        if ready.returncode == 0:
            return
        if server.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the private PostgreSQL server did not start (exit {server.poll()})")
        time.sleep(0.1)
