"""PooledTransport: httpx's own transport, split into small connection pools, for many requests in flight.

httpcore's connection pool re-examines every connection (and, for idle ones, asks the socket whether
it is readable) each time a request is queued or finished, and counts the idle ones once *per
connection*: per request that is O(connections²). With the hundred connections a worker keeps open
to Pangea at 50 ms per answer, the pool alone cost several milliseconds of CPU per request
(``docs/benchmarks.md``: 5.1 ms of worker CPU per token check with one pool of 32, most of it there).

Here each request goes to the shard with the fewest requests in flight; every shard is an ordinary
``httpx.AsyncHTTPTransport`` of at most :data:`DEFAULT_SHARD_SIZE` connections, so the bookkeeping
stays O(shard size²) whatever the total. Errors, timeouts and streaming are httpx's, untouched.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx

#: Connections per shard: small enough that httpcore's per-request bookkeeping is cheap.
DEFAULT_SHARD_SIZE = 1


class PooledTransport(httpx.AsyncBaseTransport):
    """Up to ``max_connections`` HTTP/1.1 keep-alive connections, in shards of ``shard_size``."""

    def __init__(self, *, max_connections: int, shard_size: int = DEFAULT_SHARD_SIZE, **options: Any) -> None:
        shards = max(1, math.ceil(max_connections / shard_size))
        size = math.ceil(max_connections / shards)
        limits = httpx.Limits(max_connections=size, max_keepalive_connections=size)
        # One TLS context for all shards: building one loads the CA bundle (about 15 ms each).
        options.setdefault("verify", httpx.create_ssl_context())
        self._shards = [httpx.AsyncHTTPTransport(limits=limits, **options) for _ in range(shards)]
        self._busy = [0] * shards

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` on the least busy shard; the shard counts it until the body is closed."""
        busy = self._busy
        index = busy.index(min(busy))
        busy[index] += 1
        release = _once(lambda: busy.__setitem__(index, busy[index] - 1))
        try:
            response = await self._shards[index].handle_async_request(request)
        except BaseException:
            release()
            raise
        assert isinstance(response.stream, httpx.AsyncByteStream)
        return httpx.Response(
            status_code=response.status_code,
            headers=response.headers,
            stream=_Released(response.stream, release),
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        """Close every shard's connections."""
        for shard in self._shards:
            await shard.aclose()


class _Released(httpx.AsyncByteStream):
    """A response body that tells its shard when it is closed."""

    def __init__(self, stream: httpx.AsyncByteStream, release: Callable[[], None]) -> None:
        self._stream = stream
        self._release = release

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._stream:
            yield chunk

    async def aclose(self) -> None:
        try:
            await self._stream.aclose()
        finally:
            self._release()


def _once(action: Callable[[], None]) -> Callable[[], None]:
    done = False

    def run() -> None:
        nonlocal done
        if not done:
            done = True
            action()

    return run
