# walrelay's image: a Rust toolchain builds the binary (librdkafka, which
# the rdkafka crate compiles from source, included), a slim Debian runs it.
#
#   docker build -t registry.example.com/walrelay:0.1.0 .
#   docker push registry.example.com/walrelay:0.1.0
#
# Both bases are pinned to a release; pin them to a digest as well where
# your policy asks for it (`docker buildx imagetools inspect rust:1.95.0-bookworm`).
FROM rust:1.95.0-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake libssl-dev zlib1g-dev pkg-config \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Dependencies first, in a layer of their own: librdkafka and the other
# crates are built again only when Cargo.toml or Cargo.lock change, not on
# every change to walrelay's code.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src benches \
 && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
 && echo 'fn main() {}' > benches/decode.rs && echo 'fn main() {}' > benches/relay.rs \
 && cargo build --release --locked --bin walrelay \
 && rm -rf src benches
COPY src src
COPY benches benches
# The placeholder's build outputs are older than the real sources; touch
# them so cargo rebuilds walrelay itself.
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked --bin walrelay \
 && strip target/release/walrelay

FROM debian:12-slim
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
