# syntax=docker/dockerfile:1
# The AI worker image. The same image runs the worker (`ai-worker run`, the default) and the local
# platform used by docker-compose (`ai-worker platform`). No secrets are baked in: pass them at run time.

FROM python:3.11-slim AS build
WORKDIR /build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY pyproject.toml README.md ./
COPY src ./src
COPY prompts ./prompts
COPY protos ./protos
COPY models.toml ./
# Wheels for the package and all its dependencies (no `embedded` extra: the image talks to real servers).
RUN pip wheel --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SERVICE_PORT=8081
RUN groupadd --system --gid 10001 worker \
    && useradd --system --uid 10001 --gid worker --home-dir /app --shell /usr/sbin/nologin worker
WORKDIR /app
COPY --from=build /wheels /wheels
RUN pip install --no-index --find-links=/wheels ai-worker && rm -rf /wheels
COPY --chown=worker:worker prompts ./prompts
COPY --chown=worker:worker protos ./protos
USER worker:worker
# Health, readiness and Prometheus metrics of the worker.
EXPOSE 8081
ENTRYPOINT ["ai-worker"]
CMD ["run"]
