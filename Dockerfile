# hyperpool container image.
#
#   docker build -t hyperpool .
#   docker run --rm --stop-timeout 45 -p 6432:6432 -p 9930:9930 \
#       -v "$PWD/hyperpool.yaml:/etc/hyperpool/hyperpool.yaml:ro" -e ORIGIN_PASSWORD=... hyperpool
#
# The config is read from /etc/hyperpool/hyperpool.yaml (mount a file or a directory there). It must serve the
# HTTP endpoint on port 9930 (`metrics: {host: 0.0.0.0, port: 9930}`) for the HEALTHCHECK below, and listen on
# 0.0.0.0 to be reachable from outside the container. `${VAR}` in the config is read from the environment.
# Validate a config with the same image: `docker run --rm -v ...:/etc/hyperpool/hyperpool.yaml:ro hyperpool check-config`.
# Give the container more than shutdown_timeout to stop (docker's default is 10 s): `--stop-timeout`.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: install the package into a venv, its hot modules compiled with mypyc (setup.py, README "Speed") -
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# a C compiler for mypyc, in this stage only: the runtime stage gets the built venv and no compiler
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/hyperpool \
    && /opt/hyperpool/bin/pip install "mypy==2.4.1" "setuptools>=61" wheel
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY hyperpool ./hyperpool
# the runtime dependencies first (from pyproject.toml), so mypyc compiles against them as .ci/compiled does;
# then compile, drop the build-only packages, and fail unless every hot module came out compiled
RUN /opt/hyperpool/bin/python -c "import tomllib; \
print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && /opt/hyperpool/bin/pip install -r /tmp/requirements.txt \
    && HYPERPOOL_MYPYC=1 /opt/hyperpool/bin/pip install --no-build-isolation . \
    && /opt/hyperpool/bin/pip uninstall -y mypy ast_serialize librt mypy_extensions pathspec wheel \
    && cd / && /opt/hyperpool/bin/python -c "import hyperpool, sys; print(hyperpool.build()); \
sys.exit(hyperpool.build() != 'compiled (mypyc)')"

# --- runtime: the venv and a non-root user, nothing else -----------------------------------------------------
FROM ${PYTHON_IMAGE}
ENV PATH=/opt/hyperpool/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN groupadd --system --gid 10001 hyperpool \
    && useradd --system --uid 10001 --gid hyperpool --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin hyperpool \
    && mkdir -p /etc/hyperpool
COPY --from=build /opt/hyperpool /opt/hyperpool
# numeric, so Kubernetes' runAsNonRoot can check it
USER 10001:10001

# 6432: PostgreSQL clients; 9930: /metrics, /healthz, /readyz
EXPOSE 6432 9930
# SIGTERM: stop accepting, let running transactions finish for up to shutdown_timeout; SIGHUP: reload the config
STOPSIGNAL SIGTERM
# slim has no curl; urlopen raises (exit 1) on a refused connection, a timeout or a non-2xx answer
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9930/healthz', timeout=2)"]

# The documented command: hyperpool --config /etc/hyperpool/hyperpool.yaml run
# (arguments after the image name replace only "run", e.g. `check-config` or `passwd app`)
ENTRYPOINT ["hyperpool", "--config", "/etc/hyperpool/hyperpool.yaml"]
CMD ["run"]
