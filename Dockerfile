# syntax=docker/dockerfile:1
# One image for every broker-serve process; the command picks the role:
#   docker run IMAGE controller
#   docker run IMAGE proxy --host 0.0.0.0 --port 8000
#   docker run IMAGE worker
#   docker run IMAGE run examples.hello:app
# proxy/Dockerfile and workers/Dockerfile build on it with their role as the default command.
# Run it with an init process (compose `init: true`, `docker run --init`): a worker's replicas
# may leave orphans of their own to reap.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Dependencies first, in their own layer, so that a code change does not reinstall them.
WORKDIR /src
COPY pyproject.toml README.md ./
RUN mkdir broker_serve && touch broker_serve/__init__.py \
    && pip install ".[fastapi,grpc]" \
    && pip uninstall -y broker-serve
COPY broker_serve ./broker_serve
RUN pip install --no-deps . && rm -rf /src

# /app holds no copy of the package, so `broker-serve run` (which puts the working directory on
# sys.path) imports the installed one. Applications live here: the example is built in, and
# compose can mount others over it.
WORKDIR /app
COPY examples ./examples
COPY deploy/healthcheck.py ./deploy/healthcheck.py

RUN useradd --create-home --uid 10001 broker-serve
USER broker-serve

# proxy HTTP (and /-/metrics), controller metrics, proxy gRPC (when grpc_options name servicer
# functions), worker metrics
EXPOSE 8000 8265 9000 9500
ENTRYPOINT ["broker-serve"]
CMD ["--help"]
