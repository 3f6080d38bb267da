# The blind server. It gets the server artifact only (mounted at
# /models/server.gguf), never a client bundle.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p ee-server --bin ee-server

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends curl ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 ee
COPY --from=build /src/target/release/ee-server /usr/local/bin/ee-server
COPY config/server.toml /etc/ee/server.toml
USER ee
EXPOSE 8000
# One source of truth: these variables, overridable with -e (a flag after
# the image name still wins, as everywhere).
ENV EE_LISTEN=0.0.0.0:8000 \
    EE_MODEL=/models/server.gguf
HEALTHCHECK --interval=5s --timeout=3s --start-period=60s CMD curl -fsS http://127.0.0.1:8000/health || exit 1
ENTRYPOINT ["ee-server", "--config", "/etc/ee/server.toml"]
