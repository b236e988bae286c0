"""PooledTransport: httpx's own transport, split into small connection pools, for many requests in flight.

httpcore's connection pool re-examines every connection (and, for idle ones, asks the socket whether
it is readable) each time a request is queued or finished, and counts the idle ones once *per
connection*: per request that is O(connections²). With the hundred connections a worker keeps open
to Pangea at 50 ms per answer, the pool alone cost several milliseconds of CPU per request
(``docs/benchmarks.md``: 5.1 ms of worker CPU per token check with one pool of 32, most of it there).

Here each request goes to the shard with the fewest requests in flight; every shard is an ordinary
``httpx.AsyncHTTPTransport`` of at most :data:`DEFAULT_SHARD_SIZE` connections, so the bookkeeping
stays O(shard size²) whatever the total. Errors, timeouts and streaming are httpx's, untouched.

Proxies: the standard variables, read with httpx's own helpers (see :class:`PooledTransport`).
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import httpx
from httpx._utils import URLPattern, get_environment_proxies

#: Connections per shard: small enough that httpcore's per-request bookkeeping is cheap.
DEFAULT_SHARD_SIZE = 1

_Origin = tuple[str, str, int | None]


def environment_proxies() -> dict[URLPattern, str | None]:
    """``HTTP(S)_PROXY`` / ``ALL_PROXY`` / ``NO_PROXY`` as httpx reads them, in httpx's matching order.

    The same helpers ``httpx.AsyncClient(trust_env=True)`` uses (``NO_PROXY`` entries map to None:
    go direct), so a proxy set for the app's own httpx clients is honoured here alike.
    """
    return dict(sorted((URLPattern(pattern), proxy) for pattern, proxy in get_environment_proxies().items()))


class PooledTransport(httpx.AsyncBaseTransport):
    """Up to ``max_connections`` HTTP/1.1 keep-alive connections, in shards of ``shard_size``.

    With ``trust_env`` (the default) it honours the standard proxy variables, like httpx's own
    client: each origin is matched once against :func:`environment_proxies`, then every request
    to it takes one dict lookup to its pool (direct or through its proxy). The CA bundle comes from
    ``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` when set (``httpx.create_ssl_context``), else certifi's.
    """

    def __init__(
        self,
        *,
        max_connections: int,
        shard_size: int = DEFAULT_SHARD_SIZE,
        trust_env: bool = True,
        proxies: Mapping[URLPattern, str | None] | None = None,
        **options: Any,
    ) -> None:
        # One TLS context for all shards: building one loads the CA bundle (about 15 ms each).
        options.setdefault("verify", httpx.create_ssl_context(trust_env=trust_env))
        self._options = options
        self._max_connections = max_connections
        self._shard_size = shard_size
        self._proxies = dict(proxies) if proxies is not None else environment_proxies() if trust_env else {}
        self._pools: dict[str | None, _Shards] = {}
        self._routes: dict[_Origin, _Shards] = {}

    def proxy_for(self, url: httpx.URL) -> str | None:
        """The proxy a request to ``url`` goes through (None: straight to the server)."""
        for pattern, proxy in self._proxies.items():
            if pattern.matches(url):
                return proxy
        return None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` on the least busy shard of its origin's pool."""
        url = request.url
        pool = self._routes.get((url.scheme, url.host, url.port))
        if pool is None:
            pool = self._route(url)
        return await pool.handle_async_request(request)

    def _route(self, url: httpx.URL) -> _Shards:
        proxy = self.proxy_for(url)
        pool = self._pools.get(proxy)
        if pool is None:
            options = dict(self._options)
            if proxy is not None:
                options["proxy"] = httpx.Proxy(proxy)
            pool = self._pools[proxy] = _Shards(self._max_connections, self._shard_size, options)
        self._routes[(url.scheme, url.host, url.port)] = pool
        return pool

    async def aclose(self) -> None:
        """Close every pool's connections."""
        for pool in self._pools.values():
            await pool.aclose()


class _Shards:
    """One pool: ``max_connections`` split into shards of ``shard_size``; each request goes to the least busy."""

    def __init__(self, max_connections: int, shard_size: int, options: dict[str, Any]) -> None:
        shards = max(1, math.ceil(max_connections / shard_size))
        size = math.ceil(max_connections / shards)
        limits = httpx.Limits(max_connections=size, max_keepalive_connections=size)
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
