# The key holder's local proxy: it mounts the client bundle (key, tokenizer,
# template) read-only at /bundle and talks to the blind server.
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
USER ee
EXPOSE 8080
ENV EE_SERVER_URL=http://server:8000
ENTRYPOINT ["sh", "-c", "exec ee proxy --bundle /bundle --server \"$EE_SERVER_URL\" --listen 0.0.0.0:8080"]
