# syntax=docker/dockerfile:1
# The AI worker image. The same image runs the worker (`ai-worker run`, the default) and the local
# platform used by docker-compose (`ai-worker platform`). No secrets are baked in: pass them at run time.
# Outside a container the worker's HTTP endpoint listens on 127.0.0.1; in here it must be reachable from
# outside the container, so SERVICE_HOST is 0.0.0.0.

FROM python:3.11-slim AS build
WORKDIR /build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY pyproject.toml README.md ./
COPY src ./src
COPY prompts ./prompts
COPY protos ./protos
COPY models.toml ./
# Wheels for the package and all its dependencies (no `embedded` extra: the image talks to real servers). The
# `tracing-otlp` extra lets TRACING_ENABLED=true export spans over OTLP; tracing stays off unless it is set.
RUN pip wheel --wheel-dir /wheels '.[tracing-otlp]'

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SERVICE_HOST=0.0.0.0 \
    SERVICE_PORT=8081
RUN groupadd --system --gid 10001 worker \
    && useradd --system --uid 10001 --gid worker --home-dir /app --shell /usr/sbin/nologin worker
WORKDIR /app
COPY --from=build /wheels /wheels
RUN pip install --no-index --find-links=/wheels 'ai-worker[tracing-otlp]' && rm -rf /wheels
COPY --chown=worker:worker prompts ./prompts
COPY --chown=worker:worker protos ./protos
USER worker:worker
# Health, readiness and Prometheus metrics of the worker.
EXPOSE 8081
# Liveness, not readiness: /health answers whenever the worker's event loop does. An orchestrator restarts
# an unhealthy container, and restarting cures a stuck process but not a MongoDB or Kafka outage: checking
# /ready here would turn every outage into a restart loop. /ready is for readiness probes and monitoring
# (docker-compose.yml uses it for the worker's status). The image's other command, `platform`, has no
# /health: compose gives it its own check.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('SERVICE_PORT', '8081'), timeout=4)"]
ENTRYPOINT ["ai-worker"]
CMD ["run"]
