"""A local Pangea AuthN: the session endpoints, wire-compatible with ``pangea-sdk`` and Pangea's OpenAPI spec.

For tests, demos and benchmarks; state lives in memory. ``session-sync emulator`` runs it::

    from worker import emulator
    emulator.serve(port=8900, service_token=emulator.DEFAULT_SERVICE_TOKEN,
                   client_token=emulator.DEFAULT_CLIENT_TOKEN)

Modules: ``store`` (state and session rules), ``listing`` (session list filters and cursor),
``validation`` (request bodies), ``wire`` (envelope and objects), ``handlers`` (endpoints),
``faults`` (injected faults), ``app`` (the ASGI app and admin surface), ``admin`` (its client).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from worker.emulator.admin import EmulatorAdmin, EmulatorAdminError
from worker.emulator.app import Emulator, create_app

__all__ = [
    "DEFAULT_CLIENT_TOKEN",
    "DEFAULT_SERVICE_TOKEN",
    "Emulator",
    "EmulatorAdmin",
    "EmulatorAdminError",
    "create_app",
    "serve",
]

#: Development service token (``pts_`` + 32 base32 characters); never a real Pangea credential.
DEFAULT_SERVICE_TOKEN: Final = "pts_sessionsyncemulatorservicetoken2"
#: Development client token (``pcl_`` + 32 base32 characters); valid on ``/v2/client/*`` only.
DEFAULT_CLIENT_TOKEN: Final = "pcl_sessionsyncemulatorclienttoken22"


def serve(
    *,
    host: str = "127.0.0.1",
    port: int = 8900,
    service_token: str = DEFAULT_SERVICE_TOKEN,
    client_token: str = DEFAULT_CLIENT_TOKEN,
    http_codes: Mapping[str, int] | None = None,
    max_size: int | None = None,
    max_filter_ids: int | None = None,
    **rules: str,
) -> None:
    """Run the emulator under uvicorn until interrupted (blocking); ``rules``: see :func:`create_app`.

    No access log (it would cost more than the emulator itself under a benchmark). A request held by a
    ``Timeout`` fault delays a stop by at most five seconds.
    """
    import uvicorn  # only the server needs it

    app = create_app(
        service_token=service_token,
        client_token=client_token,
        http_codes=http_codes,
        max_size=max_size,
        max_filter_ids=max_filter_ids,
        **rules,
    )
    uvicorn.run(app, host=host, port=port, access_log=False, timeout_graceful_shutdown=5)
