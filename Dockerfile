# The avatar-backbone image: one image for every `avatar` command (topics, each stage, demo).
# Built from the repo root; infra/docker-compose.yml runs it once per stage.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Empty: torch comes from the default index like every other dependency. PyPI's Linux torch
# pulls in the CUDA libraries (several GB) that a CPU-only stage never loads; to leave them out,
# build with --build-arg TORCH_INDEX_URL=<a CPU-only torch wheel index> for a smaller image
ARG TORCH_INDEX_URL=""

WORKDIR /app

# Dependencies first, from pyproject.toml alone, so editing code does not reinstall torch.
COPY pyproject.toml /app/pyproject.toml
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && if [ -n "$TORCH_INDEX_URL" ]; then \
           pip install --index-url "$TORCH_INDEX_URL" "$(grep '^torch' /tmp/requirements.txt)"; \
       fi \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# The whole tree, installed in editable mode: backbone/codec.py finds schemas/ (and
# backbone/broker.py finds infra/kafka/) relative to its own file, i.e. under /app, which a
# regular install into site-packages would not carry.
COPY . /app
RUN pip install --no-deps -e . \
    && python -m compileall -q backbone processors gateway replay \
    && python -c "import backbone.codec as c; assert (c.SCHEMA_DIR / 'speech_chunk.avsc').is_file(), c.SCHEMA_DIR"

# Non-root; the code stays root-owned and read-only for it. /data is the working directory,
# where `avatar demo` writes avatar-data/ and its MP4.
RUN useradd --create-home --uid 10001 --user-group avatar \
    && mkdir /data && chown avatar:avatar /data
USER avatar
WORKDIR /data

# 9100: /metrics when AVATAR_METRICS_PORT=9100 and AVATAR_METRICS_ADDR=0.0.0.0 (see compose).
EXPOSE 9100
ENTRYPOINT ["avatar"]
CMD ["--help"]
