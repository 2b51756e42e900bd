# Multi-stage build: the Rust toolchain builds walrelay (with librdkafka,
# which the rdkafka crate compiles from source), a slim Debian runs it.
FROM rust:1-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake libssl-dev zlib1g-dev pkg-config \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY benches benches
RUN cargo build --release --locked --bin walrelay

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 zlib1g \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/walrelay /usr/local/bin/walrelay
# Inside a container the HTTP server must listen beyond loopback.
ENV WALRELAY_HTTP_ADDR=0.0.0.0:9187
EXPOSE 9187
USER 65532:65532
ENTRYPOINT ["walrelay"]
CMD ["run"]
