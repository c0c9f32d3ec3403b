# replica-proxy: a read-replica caching proxy for Chroma.
#   docker build -t replica-proxy .
#   docker run -p 8000:8000 -v $PWD/tokens.toml:/etc/replica-proxy/tokens.toml:ro \
#     replica-proxy serve --primary http://chroma:8000 --tokens-file /etc/replica-proxy/tokens.toml
# (It listens on 0.0.0.0 in the container, so it refuses to start without tokens_file unless
# given --allow-unauthenticated: Chroma 1.5.9 checks no credentials of its own.)
FROM python:3.11-slim AS build
WORKDIR /src
# hnswlib builds from source (patched to release the GIL while loading: vendor/hnswlib).
RUN apt-get update && apt-get install -y --no-install-recommends build-essential patch \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
COPY vendor ./vendor
RUN bash vendor/hnswlib/install.sh /opt/venv/bin/python
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY index ./index
COPY sync ./sync
RUN /opt/venv/bin/pip install --no-cache-dir .

FROM python:3.11-slim
RUN useradd --create-home --uid 10001 proxy \
    && mkdir /data && chown proxy /data
COPY --from=build /opt/venv /opt/venv
USER proxy
WORKDIR /home/proxy
ENV PATH=/opt/venv/bin:$PATH \
    REPLICA_PROXY_LISTEN=0.0.0.0:8000 \
    REPLICA_PROXY_DATA_DIR=/data \
    PYTHONUNBUFFERED=1
EXPOSE 8000
VOLUME ["/data"]
# /readyz would take a replica out of rotation when the primary is down; /healthz only says the
# process is alive, which is what a restart decision needs.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD python -c "import urllib.request,os; urllib.request.urlopen('http://127.0.0.1:' + os.environ['REPLICA_PROXY_LISTEN'].rsplit(':',1)[1] + '/healthz', timeout=2)"
ENTRYPOINT ["replica-proxy"]
CMD ["serve"]
