"""A small HTTP forward proxy, run as its own process, as a corporate egress proxy would be.

``python -m tests.forward_proxy --port N --log FILE`` forwards absolute-form requests
(``POST http://host:port/path``) and tunnels ``CONNECT host:port``, one request per client
connection, and writes one line per request to ``FILE`` (``POST http://127.0.0.1:8900/v2/...``,
``CONNECT 127.0.0.1:8443``), so a test can prove every request went through it. Anything it cannot
parse gets ``400`` and is logged as ``BAD ...``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

_HOP_BY_HOP = {b"connection", b"proxy-connection", b"keep-alive", b"proxy-authorization"}


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


class Proxy:
    """The proxy's connection handler; ``log`` gets one line per request."""

    def __init__(self, log: Path) -> None:
        self.log = log

    def record(self, line: str) -> None:
        with self.log.open("a") as sink:
            sink.write(line + "\n")

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.close()
            return
        request_line, *header_lines = head[:-4].split(b"\r\n")
        try:
            method, target, _version = request_line.decode("latin-1").split(" ")
            if method == "CONNECT":
                await self._tunnel(target, reader, writer)
            else:
                await self._forward(method, target, header_lines, reader, writer)
        except (ValueError, OSError) as exc:
            self.record(f"BAD {request_line.decode('latin-1', 'replace')} ({type(exc).__name__})")
            with contextlib.suppress(Exception):
                writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                await writer.drain()
                writer.close()

    async def _tunnel(self, target: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host, _, port = target.rpartition(":")
        up_reader, up_writer = await asyncio.open_connection(host.strip("[]"), int(port))
        self.record(f"CONNECT {target}")
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await writer.drain()
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    async def _forward(
        self,
        method: str,
        target: str,
        header_lines: list[bytes],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        url = urlsplit(target)
        if url.scheme != "http" or not url.hostname:
            raise ValueError("not an absolute http:// target")
        length = 0
        headers = []
        for line in header_lines:
            name, _, value = line.partition(b":")
            if name.strip().lower() in _HOP_BY_HOP:
                continue
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
            headers.append(line)
        body = await reader.readexactly(length) if length else b""
        path = url.path or "/"
        if url.query:
            path += "?" + url.query
        up_reader, up_writer = await asyncio.open_connection(url.hostname, url.port or 80)
        self.record(f"{method} {target}")
        up_writer.write(
            f"{method} {path} HTTP/1.1\r\n".encode("latin-1")
            + b"".join(h + b"\r\n" for h in headers)
            + b"Connection: close\r\n\r\n"
            + body
        )
        await up_writer.drain()
        await _pipe(up_reader, writer)  # the server closes after its answer (Connection: close)
        up_writer.close()


async def serve(port: int, log: Path) -> None:
    """Serve on 127.0.0.1:``port`` until SIGTERM."""
    proxy = Proxy(log)
    server = await asyncio.start_server(proxy.handle, "127.0.0.1", port)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with server:
        print("proxy ready", flush=True)
        await stop.wait()


class RunningProxy:
    """A proxy process: its URL and the requests it forwarded so far."""

    def __init__(self, port: int, log: Path) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log = log

    def requests(self) -> list[str]:
        """One line per request the proxy handled, oldest first."""
        return self.log.read_text().splitlines() if self.log.exists() else []


@contextlib.contextmanager
def running_proxy(workdir: Path) -> Iterator[RunningProxy]:
    """Start the proxy as a separate process for the block; stopped whatever happens."""
    from tests.conftest import free_port

    port = free_port()
    log = workdir / "proxy.log"
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.forward_proxy", "--port", str(port), "--log", str(log)],
        cwd=root,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "proxy ready":
            raise RuntimeError(f"the proxy did not start (exit {proc.poll()})")
        yield RunningProxy(port, log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log", type=Path, required=True)
    options = parser.parse_args()
    asyncio.run(serve(options.port, options.log))
