# One image for every session-sync service in docker-compose.yml: worker, beat, Flower, migrate, emulator.
# Built the way a user installs it: a wheel, not an editable checkout (the migrations ship inside it).

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY worker ./worker
COPY migrations ./migrations
RUN pip wheel --no-deps --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=build /wheels /wheels
# [flower] for the dashboard service, [emulator] for uvloop/httptools under the emulator.
RUN set -e; wheel="$(ls /wheels/pangea_session_sync-*.whl)"; pip install "${wheel}[flower,emulator]" \
 && rm -rf /wheels \
 && useradd --system --uid 10001 --create-home --home-dir /var/lib/session-sync session-sync

# Not root (Celery warns against it); beat keeps its schedule file in the working directory.
USER session-sync
WORKDIR /var/lib/session-sync
EXPOSE 8900 19808 5555
CMD ["celery", "-A", "worker", "worker", "--loglevel=INFO", "--hostname=session-sync@%h"]
