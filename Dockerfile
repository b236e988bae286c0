# One image for every session-sync service in docker-compose.yml: worker, beat, Flower, migrate, emulator.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY worker ./worker
COPY migrations ./migrations
# Editable, so migrations/ and pyproject.toml stay beside the package where `session-sync db upgrade` finds them.
RUN pip install -e . \
 && useradd --system --uid 10001 --create-home --home-dir /var/lib/session-sync session-sync

# Not root (Celery warns against it); beat keeps its schedule file in the working directory.
USER session-sync
WORKDIR /var/lib/session-sync
EXPOSE 8900 19808 5555
CMD ["celery", "-A", "worker", "worker", "--loglevel=INFO"]
