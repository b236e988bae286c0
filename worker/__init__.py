"""pangea-session-sync: keeps a web app's local sessions true to Pangea AuthN.

Importing this package starts nothing: the Celery app lives in ``worker.celery``
(found by ``celery -A worker``), the web-app API in ``worker.sessions``.
"""

from __future__ import annotations

__version__ = "0.1.0"
