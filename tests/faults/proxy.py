"""A TCP proxy in front of the emulator that resets connections, as a flaky network or load balancer does.

Each chunk a client sends draws its fate: with probability ``reset_rate`` the connection is reset
(RST, no answer) either *before* the request is forwarded (Pangea performs nothing) or *after* it
was forwarded and before any byte of the answer comes back (Pangea performed it; the answer is
lost). Everything else passes through untouched.
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct
import threading
from typing import Any

from tests.conftest import free_port


class ChaosProxy:
    """Listens on 127.0.0.1:``port`` and forwards to ``upstream_port``; set ``reset_rate`` at will."""

    def __init__(self, upstream_port: int, *, seed: int = 8) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self.reset_rate = 0.0
        self.resets = {"before": 0, "after": 0}
        self._rng = random.Random(seed)
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ChaosProxy:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("proxy did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", self.port))
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            server.close()
            self._loop.close()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            _reset(client_w)
            return
        cut_answer = asyncio.Event()

        async def upstream() -> None:
            while data := await client_r.read(65536):
                fate = self._rng.random()
                if fate < self.reset_rate / 2:
                    self.resets["before"] += 1
                    raise ConnectionResetError
                up_w.write(data)
                await up_w.drain()
                if fate < self.reset_rate:
                    cut_answer.set()

        async def downstream() -> None:
            while data := await up_r.read(65536):
                if cut_answer.is_set():
                    self.resets["after"] += 1
                    raise ConnectionResetError
                client_w.write(data)
                await client_w.drain()

        tasks = [asyncio.ensure_future(upstream()), asyncio.ensure_future(downstream())]
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if any(isinstance(t.exception(), ConnectionResetError) for t in done if not t.cancelled()):
            _reset(client_w)
        else:  # one side hung up: pass that on as a normal close
            client_w.close()
        up_w.close()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST instead of FIN: SO_LINGER with a zero timeout, then abort."""
    sock: Any = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()
