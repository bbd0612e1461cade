# syntax=docker/dockerfile:1
# consensus-engine: the Pub/Sub push receiver for Cloud Run (infra/cloudrun/service.yaml).
# Both stages use the same base so the venv's interpreter symlink resolves in the final image.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Dependencies get their own layer, keyed on pyproject.toml alone, so a code-only change
# reuses it: install the project once against an empty package, then drop that package.
COPY pyproject.toml ./
RUN mkdir app \
    && touch app/__init__.py \
    && pip install . \
    && pip uninstall --yes consensus-engine \
    && rm -rf app build ./*.egg-info
# Runtime dependencies only (no dev extra). README.md is only the package's long description;
# setuptools warns and goes on without it.
COPY app/ app/
RUN pip install --no-deps .

FROM ${PYTHON_IMAGE} AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    PORT=8080
# A fixed numeric uid so runAsNonRoot-style policies can check it without /etc/passwd.
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin app
WORKDIR /app
COPY --from=builder /opt/venv /opt/venv
# Code stays root-owned and read-only for the service user. `app/` is also installed in the
# venv; this copy is the one imported (uvicorn and alembic.ini put /app first on sys.path)
# and lets `alembic upgrade head` find alembic/ and alembic.ini from /app.
COPY alembic.ini ./
COPY alembic/ alembic/
COPY app/ app/
USER 10001:10001
EXPOSE 8080
# `exec` makes uvicorn PID 1, so Cloud Run's SIGTERM reaches it; 8 s of graceful shutdown
# fits in the 10 s Cloud Run allows. ENV (production) comes from the service manifest.
CMD ["sh", "-c", "exec uvicorn app.main:app --host 0.0.0.0 --port ${PORT:-8080} --timeout-graceful-shutdown 8"]
