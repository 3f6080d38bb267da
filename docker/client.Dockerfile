# The key holder's local proxy: it mounts the client bundle (key, tokenizer,
# template) read-only at /bundle and talks to the blind server. Configured
# by the EE_* variables below (override them with -e, or append flags).
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p ee-cli --bin ee

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 ee
COPY --from=build /src/target/release/ee /usr/local/bin/ee
COPY docker/proxy-entrypoint.sh /usr/local/bin/proxy-entrypoint
EXPOSE 8080
# Inside the container it listens on all interfaces; compose publishes it
# on 127.0.0.1 only, since the proxy serves plaintext.
ENV EE_BUNDLE=/bundle \
    EE_SERVER_URL=http://server:8000 \
    EE_PROXY_LISTEN=0.0.0.0:8080
# Starts as root only to copy the bundle readable for uid 10001, then runs
# as it (see the script).
ENTRYPOINT ["proxy-entrypoint"]
