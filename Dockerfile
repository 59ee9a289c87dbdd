# The service's image: web (the default command), executor and worker all run from it.
#   docker build -t agentsvc:latest .        (or podman build; not built by CI)
# BASE: a Debian-based Python 3.11 with venv (python:3.11-slim, or Debian bookworm's python3
# with python3-venv). llama.cpp and the SmolLM2 model are in the image, so `manage.py serve`
# (the embedded default) runs in it too.
ARG BASE=python:3.11-slim

FROM ${BASE} AS builder
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
ENV PATH=/opt/venv/bin:$PATH PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv && pip install --upgrade pip
WORKDIR /app
# The dependencies and the llama.cpp build (for the CPU family, only what the model server
# loads: scripts/llama-wheel, as `make run` builds it) in a layer that only pyproject.toml and
# the build's script change.
COPY pyproject.toml README.md ./
COPY scripts/llama-wheel scripts/llama-lean.cmake scripts/
RUN mkdir agentsvc runs webhooks schedules \
    && touch agentsvc/__init__.py runs/__init__.py webhooks/__init__.py schedules/__init__.py \
    && scripts/llama-wheel pip /tmp/wheels && rm -rf /tmp/wheels \
    && pip install '.[local]' \
    && pip uninstall -y agentsvc
COPY . .
# Editable: the code runs from /app, beside manage.py, templates/ and chains/.
RUN pip install --no-deps -e . && python -m compileall -q agentsvc runs webhooks schedules

FROM ${BASE}
# OpenMP, which the llama.cpp build links against.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin agentsvc \
    && mkdir /data && chown agentsvc /data
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /app /app
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 DATA_DIR=/data
USER agentsvc
WORKDIR /app
EXPOSE 8000
CMD ["daphne", "-b", "0.0.0.0", "-p", "8000", "--proxy-headers", "agentsvc.asgi:application"]
