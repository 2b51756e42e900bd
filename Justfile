# walrelay's everyday commands. `just --list` shows them.

# Start PostgreSQL, a local broker, walrelay and a demo writer; print the dashboard URL.
start:
    scripts/start

# Stop everything `just start` started.
stop:
    scripts/stop

# Run every test against a real PostgreSQL and a real broker.
test:
    scripts/test

# The long chaos run on Apache Kafka: 100,000 events, 20 relay kills, 3 broker kill -9s, a PostgreSQL restart; then, in a three-broker cluster, the partition leader killed, a follower paused, and eight broker kill -9s under load. Reports lost and doubled events (0 and 0).
chaos:
    WALRELAY_CHAOS_EVENTS=100000 WALRELAY_CHAOS_KILLS=20 cargo test --release --test faults chaos -- --nocapture
    cargo test --release --test cluster -- --nocapture --test-threads 1
    cargo test --release --test exactly_once repeated_broker_crashes -- --include-ignored --nocapture

# Benchmarks: walrelay (exactly once, at least once) against pg_recvlogical: drain, latency, CPU, RSS, start, kill -9.
bench *ARGS:
    scripts/bench {{ARGS}}

# The table of docs/performance.md: walrelay against Debezium's connector and Outbox Event Router, side by side (about 25 minutes).
bench-debezium *ARGS:
    scripts/bench --peer debezium {{ARGS}}

# A smoke run of the side-by-side benchmark with small sizes (a few minutes).
bench-quick *ARGS:
    scripts/bench --quick --peer debezium {{ARGS}}

# Retention (run --retain): rows pruned per second, and what pruning costs a saturated stream; docs/retention.md has the numbers.
bench-retention *ARGS:
    scripts/bench-retention {{ARGS}}

# Decoding from a standby (PostgreSQL 16+): the primary's commit rate under a saturated writer while walrelay decodes from the standby, against from the primary; docs/performance.md has the numbers.
bench-standby *ARGS:
    scripts/bench-standby {{ARGS}}

# Build the container image without a Docker engine (buildah): target/walrelay-image.tar, checked to run the binary.
image *ARGS:
    scripts/image {{ARGS}}

# Record pgoutput fixtures from a real PostgreSQL.
record-fixtures:
    scripts/record-fixtures

# Fuzz the pgoutput decoder, seeded with the recorded fixtures (installs cargo-fuzz).
fuzz SECONDS="600":
    command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
    mkdir -p fuzz/corpus/decode && cp tests/fixtures/pgoutput/*.bin fuzz/corpus/decode/
    cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run decode corpus/decode -- -max_total_time={{SECONDS}}
