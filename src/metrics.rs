//! Metric names, each described once. Labels stay low-cardinality: slot,
//! topic, error kind.

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};

pub const SLOT_LAG_BYTES: &str = "walrelay_slot_lag_bytes";
pub const SLOT_RETAINED_WAL_BYTES: &str = "walrelay_slot_retained_wal_bytes";
pub const SLOT_ACTIVE: &str = "walrelay_slot_active";
pub const SLOT_SAFE_WAL_SIZE_BYTES: &str = "walrelay_slot_safe_wal_size_bytes";
pub const MAX_SLOT_WAL_KEEP_SIZE_BYTES: &str = "walrelay_max_slot_wal_keep_size_bytes";
pub const VERIFIED_LSN: &str = "walrelay_publication_verified_lsn";
pub const SLOT_WAL_STATUS: &str = "walrelay_slot_wal_status";
pub const SLOT_WRITE_LAG_SECONDS: &str = "walrelay_slot_write_lag_seconds";
pub const SLOT_FLUSH_LAG_SECONDS: &str = "walrelay_slot_flush_lag_seconds";
pub const MONITOR_ERRORS_TOTAL: &str = "walrelay_monitor_errors_total";
pub const EVENTS_PUBLISHED_TOTAL: &str = "walrelay_events_published_total";
pub const PUBLISH_ERRORS_TOTAL: &str = "walrelay_publish_errors_total";
pub const DEAD_LETTERS_TOTAL: &str = "walrelay_dead_letters_total";
pub const EVENTS_IN_FLIGHT: &str = "walrelay_events_in_flight";
pub const IN_FLIGHT_BYTES: &str = "walrelay_in_flight_bytes";
pub const COMMIT_TO_ACK_SECONDS: &str = "walrelay_commit_to_ack_seconds";
pub const KAFKA_COMMIT_SECONDS: &str = "walrelay_kafka_commit_seconds";
pub const CONFIRMED_LSN: &str = "walrelay_confirmed_lsn";
pub const REPLICATION_CONNECTED: &str = "walrelay_replication_connected";
pub const RECONNECTS_TOTAL: &str = "walrelay_reconnects_total";
pub const LAST_ACK_TIMESTAMP_SECONDS: &str = "walrelay_last_ack_timestamp_seconds";
pub const TRANSACTIONS_TOTAL: &str = "walrelay_transactions_total";
pub const WINDOW_FULL_TOTAL: &str = "walrelay_window_full_total";
pub const HEARTBEAT_LATENCY_SECONDS: &str = "walrelay_heartbeat_latency_seconds";
pub const HEARTBEAT_ERRORS_TOTAL: &str = "walrelay_heartbeat_errors_total";
pub const WAITING_FOR_BROKER: &str = "walrelay_waiting_for_broker";
pub const EVENTS_SKIPPED_TOTAL: &str = "walrelay_events_skipped_total";
pub const PARTITION_RECOVERIES_TOTAL: &str = "walrelay_partition_recoveries_total";
pub const PARTITION_RECOVERY_SECONDS: &str = "walrelay_partition_recovery_seconds";
pub const PARTITIONS_AT_LEAST_ONCE_TOTAL: &str = "walrelay_partitions_at_least_once_total";
pub const PARTITION_UNAVAILABLE_SINCE: &str =
    "walrelay_partition_unavailable_since_timestamp_seconds";
pub const PARTITIONS_UNAVAILABLE: &str = "walrelay_partitions_unavailable";
pub const SLOT_RELEASES_TOTAL: &str = "walrelay_slot_releases_total";
pub const POLL_BATCHES_TOTAL: &str = "walrelay_poll_batches_total";
pub const POLL_ROW_FAILURES_TOTAL: &str = "walrelay_poll_row_failures_total";
pub const POLL_ROWS_NUMBERED_TOTAL: &str = "walrelay_poll_rows_numbered_total";
pub const OUTBOX_PENDING_ROWS: &str = "walrelay_outbox_pending_rows";
pub const OUTBOX_FAILING_ROWS: &str = "walrelay_outbox_failing_rows";
pub const OUTBOX_OLDEST_PENDING_SECONDS: &str = "walrelay_outbox_oldest_pending_seconds";
pub const INBOX_RECORDS_CONSUMED_TOTAL: &str = "walrelay_inbox_records_consumed_total";
pub const INBOX_RECORDS_STORED_TOTAL: &str = "walrelay_inbox_records_stored_total";
pub const INBOX_DUPLICATES_SKIPPED_TOTAL: &str = "walrelay_inbox_duplicates_skipped_total";
pub const INBOX_DEAD_LETTERS_TOTAL: &str = "walrelay_inbox_dead_letters_total";
pub const INBOX_CONSUMER_LAG_RECORDS: &str = "walrelay_inbox_consumer_lag_records";
pub const INBOX_REBALANCES_TOTAL: &str = "walrelay_inbox_rebalances_total";
pub const INBOX_BATCH_SECONDS: &str = "walrelay_inbox_batch_seconds";
pub const INBOX_PRODUCED_TO_STORED_SECONDS: &str = "walrelay_inbox_produced_to_stored_seconds";
pub const INBOX_TOPIC_RESETS_TOTAL: &str = "walrelay_inbox_topic_resets_total";
pub const POLL_CLAIM_SECONDS: &str = "walrelay_poll_claim_seconds";
pub const POLL_SETTLE_SECONDS: &str = "walrelay_poll_settle_seconds";
pub const IN_FLIGHT_LIMIT_EVENTS: &str = "walrelay_in_flight_limit_events";
pub const IN_FLIGHT_LIMIT_BYTES: &str = "walrelay_in_flight_limit_bytes";
pub const STATE: &str = "walrelay_state";
pub const INFO: &str = "walrelay_info";
pub const RETENTION_DELETED_TOTAL: &str = "walrelay_retention_deleted_total";
pub const RETENTION_OLDEST_ROW_AGE_SECONDS: &str = "walrelay_retention_oldest_row_age_seconds";
pub const RETENTION_PASSES_TOTAL: &str = "walrelay_retention_passes_total";
pub const RETENTION_ERRORS_TOTAL: &str = "walrelay_retention_errors_total";
pub const RETENTION_SECONDS: &str = "walrelay_retention_seconds";

/// Registers every metric's help text and unit with the recorder.
pub fn describe() {
    describe_gauge!(
        SLOT_LAG_BYTES,
        Unit::Bytes,
        "pg_current_wal_lsn() (on a standby, pg_last_wal_replay_lsn()) - confirmed_flush_lsn of the slot"
    );
    describe_gauge!(
        SLOT_RETAINED_WAL_BYTES,
        Unit::Bytes,
        "pg_current_wal_lsn() (on a standby, the replay position) - restart_lsn: WAL the slot keeps on disk"
    );
    describe_gauge!(SLOT_ACTIVE, "1 when a walsender holds the slot");
    describe_gauge!(
        SLOT_SAFE_WAL_SIZE_BYTES,
        Unit::Bytes,
        "WAL that can still be written before the slot is in danger of losing required WAL (safe_wal_size; -1 when unlimited)"
    );
    describe_gauge!(
        MAX_SLOT_WAL_KEEP_SIZE_BYTES,
        Unit::Bytes,
        "the server's max_slot_wal_keep_size (-1 when unlimited): what safe_wal_size counts down from"
    );
    describe_gauge!(
        VERIFIED_LSN,
        "the WAL position up to which the publication was last seen publishing every insert of the outbox: the relay confirms nothing past it"
    );
    describe_gauge!(
        SLOT_WAL_STATUS,
        "1 for the slot's current wal_status (reserved, extended, unreserved, lost)"
    );
    describe_gauge!(
        SLOT_WRITE_LAG_SECONDS,
        Unit::Seconds,
        "walsender write_lag from pg_stat_replication"
    );
    describe_gauge!(
        SLOT_FLUSH_LAG_SECONDS,
        Unit::Seconds,
        "walsender flush_lag from pg_stat_replication"
    );
    describe_counter!(MONITOR_ERRORS_TOTAL, "slot monitor queries that failed");
    describe_counter!(EVENTS_PUBLISHED_TOTAL, "events acknowledged by Kafka");
    describe_counter!(PUBLISH_ERRORS_TOTAL, "failed deliveries, by kind");
    describe_counter!(
        DEAD_LETTERS_TOTAL,
        "records sent to the dead-letter topic, by reason kind"
    );
    describe_gauge!(EVENTS_IN_FLIGHT, "events produced and not yet acknowledged");
    describe_gauge!(
        IN_FLIGHT_BYTES,
        Unit::Bytes,
        "bytes of events produced and not yet acknowledged"
    );
    describe_histogram!(
        COMMIT_TO_ACK_SECONDS,
        Unit::Seconds,
        "PostgreSQL commit time to broker acknowledgement"
    );
    describe_gauge!(
        CONFIRMED_LSN,
        "last flush LSN sent to PostgreSQL, as a number"
    );
    describe_gauge!(REPLICATION_CONNECTED, "1 while streaming from the slot");
    describe_counter!(RECONNECTS_TOTAL, "replication reconnect attempts");
    describe_gauge!(
        LAST_ACK_TIMESTAMP_SECONDS,
        Unit::Seconds,
        "Unix time of the last acknowledged event"
    );
    describe_counter!(TRANSACTIONS_TOTAL, "transactions received from the slot");
    describe_gauge!(
        PARTITION_UNAVAILABLE_SINCE,
        Unit::Seconds,
        "Unix time since which the partition has had no leader and its records have waited outside transactions (0 once it has one again)"
    );
    describe_gauge!(
        PARTITIONS_UNAVAILABLE,
        "partitions with no leader whose records wait"
    );
    describe_counter!(
        WINDOW_FULL_TOTAL,
        "times the in-flight window filled and reading WAL paused"
    );
    describe_gauge!(
        HEARTBEAT_LATENCY_SECONDS,
        Unit::Seconds,
        "last heartbeat: emitted by pg_logical_emit_message to confirmed to PostgreSQL"
    );
    describe_counter!(
        HEARTBEAT_ERRORS_TOTAL,
        "heartbeats that could not be emitted"
    );
    describe_gauge!(
        WAITING_FOR_BROKER,
        "1 while the relay has let go of the slot because the broker acknowledged nothing for --broker-stall-timeout"
    );
    describe_counter!(
        EVENTS_SKIPPED_TOTAL,
        "events not published because their partition already holds them (exactly-once)"
    );
    describe_histogram!(
        KAFKA_COMMIT_SECONDS,
        Unit::Seconds,
        "time each Kafka transaction commit call took, from the call to its answer, a retry counted apart (exactly-once): a transaction's records are readable to read_committed consumers only once its commit went through"
    );
    describe_counter!(
        PARTITION_RECOVERIES_TOTAL,
        "partition tails scanned for records already in the log (exactly-once)"
    );
    describe_histogram!(
        PARTITION_RECOVERY_SECONDS,
        Unit::Seconds,
        "time to scan a partition's tail, from the first record for it to its ledger"
    );
    describe_counter!(
        PARTITIONS_AT_LEAST_ONCE_TOTAL,
        "where exactly once fell back to at least once, by reason: a partition tail read in part (lookback), trimmed (truncated), hidden by an open transaction, out of order (disorder) or unreadable, or a polling batch whose claim was lost (claim_lost)"
    );
    describe_counter!(
        SLOT_RELEASES_TOTAL,
        "replication sessions ended on purpose so PostgreSQL is not held, by reason (broker, server_stopping)"
    );
    describe_counter!(
        POLL_BATCHES_TOTAL,
        "batches of rows claimed by the polling source"
    );
    describe_counter!(
        POLL_ROW_FAILURES_TOTAL,
        "polled rows that could not be published and wait for their next attempt"
    );
    describe_counter!(
        POLL_ROWS_NUMBERED_TOTAL,
        "rows that came in without a sequence number (insert trigger bypassed) and were numbered by the relay"
    );
    describe_gauge!(
        OUTBOX_PENDING_ROWS,
        "rows of the outbox table not yet published (polling source)"
    );
    describe_gauge!(
        OUTBOX_FAILING_ROWS,
        "rows of the outbox table not yet published that failed at least once (polling source)"
    );
    describe_gauge!(
        OUTBOX_OLDEST_PENDING_SECONDS,
        Unit::Seconds,
        "age of the oldest row of the outbox table not yet published (polling source)"
    );
    describe_counter!(
        INBOX_RECORDS_CONSUMED_TOTAL,
        "records the inbox consumed from Kafka (including those dropped as already stored after a seek)"
    );
    describe_counter!(
        INBOX_RECORDS_STORED_TOTAL,
        "records the inbox stored as new rows"
    );
    describe_counter!(
        INBOX_DUPLICATES_SKIPPED_TOTAL,
        "records the inbox skipped because their id was already stored"
    );
    describe_counter!(
        INBOX_DEAD_LETTERS_TOTAL,
        "records the inbox put in its dead-letter table, by kind"
    );
    describe_gauge!(
        INBOX_CONSUMER_LAG_RECORDS,
        "records between the inbox's next offset and the partition's high watermark, per topic and partition"
    );
    describe_counter!(
        INBOX_REBALANCES_TOTAL,
        "partition assignments and revocations the inbox's group made"
    );
    describe_histogram!(
        INBOX_BATCH_SECONDS,
        Unit::Seconds,
        "time to store one batch in PostgreSQL (rows, dead letters and offsets in one transaction)"
    );
    describe_histogram!(
        INBOX_PRODUCED_TO_STORED_SECONDS,
        Unit::Seconds,
        "a record's Kafka timestamp to its row committed in the inbox"
    );
    describe_counter!(
        INBOX_TOPIC_RESETS_TOTAL,
        "partitions the inbox read again from their log's start because their topic was made again or their log truncated (--on-topic-reset earliest)"
    );
    describe_histogram!(
        POLL_CLAIM_SECONDS,
        Unit::Seconds,
        "time to claim a batch of outbox rows (polling source)"
    );
    describe_histogram!(
        POLL_SETTLE_SECONDS,
        Unit::Seconds,
        "time to delete or mark a batch's rows and commit, after the broker acknowledged them (polling source)"
    );
    describe_gauge!(
        IN_FLIGHT_LIMIT_EVENTS,
        "most events in flight at once: the window (--max-in-flight-events), or the batch (polling source, inbox)"
    );
    describe_gauge!(
        IN_FLIGHT_LIMIT_BYTES,
        Unit::Bytes,
        "most bytes of events in flight at once (--max-in-flight-bytes)"
    );
    describe_gauge!(
        STATE,
        "1 for what the process does now: starting, active (streaming, polling, consuming), standby, waiting_for_broker, reconnecting"
    );
    describe_gauge!(
        INFO,
        "always 1: the source (wal, poll, inbox), the delivery guarantee and the version, as labels"
    );
    describe_counter!(
        RETENTION_DELETED_TOTAL,
        "outbox rows deleted by retention (--retain): older than the retention and confirmed to PostgreSQL"
    );
    describe_gauge!(
        RETENTION_OLDEST_ROW_AGE_SECONDS,
        Unit::Seconds,
        "age of the oldest row left in the outbox table after a retention pass; above --retain, rows wait for confirmation"
    );
    describe_counter!(
        RETENTION_PASSES_TOTAL,
        "retention passes completed (every table pruned as far as it may be)"
    );
    describe_counter!(
        RETENTION_ERRORS_TOTAL,
        "retention passes that failed (logged; the next pass tries again)"
    );
    describe_gauge!(
        RETENTION_SECONDS,
        Unit::Seconds,
        "the retention (--retain): confirmed rows older than this are deleted"
    );
}

/// Every metric name walrelay exports, for checks of dashboards and alerts.
pub const ALL: &[&str] = &[
    SLOT_LAG_BYTES,
    SLOT_RETAINED_WAL_BYTES,
    SLOT_ACTIVE,
    SLOT_SAFE_WAL_SIZE_BYTES,
    MAX_SLOT_WAL_KEEP_SIZE_BYTES,
    VERIFIED_LSN,
    SLOT_WAL_STATUS,
    SLOT_WRITE_LAG_SECONDS,
    SLOT_FLUSH_LAG_SECONDS,
    MONITOR_ERRORS_TOTAL,
    EVENTS_PUBLISHED_TOTAL,
    PUBLISH_ERRORS_TOTAL,
    DEAD_LETTERS_TOTAL,
    EVENTS_IN_FLIGHT,
    IN_FLIGHT_BYTES,
    COMMIT_TO_ACK_SECONDS,
    KAFKA_COMMIT_SECONDS,
    CONFIRMED_LSN,
    REPLICATION_CONNECTED,
    RECONNECTS_TOTAL,
    LAST_ACK_TIMESTAMP_SECONDS,
    TRANSACTIONS_TOTAL,
    WINDOW_FULL_TOTAL,
    HEARTBEAT_LATENCY_SECONDS,
    HEARTBEAT_ERRORS_TOTAL,
    WAITING_FOR_BROKER,
    SLOT_RELEASES_TOTAL,
    EVENTS_SKIPPED_TOTAL,
    PARTITION_RECOVERIES_TOTAL,
    PARTITION_RECOVERY_SECONDS,
    PARTITIONS_AT_LEAST_ONCE_TOTAL,
    POLL_BATCHES_TOTAL,
    POLL_ROW_FAILURES_TOTAL,
    POLL_ROWS_NUMBERED_TOTAL,
    OUTBOX_PENDING_ROWS,
    OUTBOX_FAILING_ROWS,
    OUTBOX_OLDEST_PENDING_SECONDS,
    INBOX_RECORDS_CONSUMED_TOTAL,
    INBOX_RECORDS_STORED_TOTAL,
    INBOX_DUPLICATES_SKIPPED_TOTAL,
    INBOX_DEAD_LETTERS_TOTAL,
    INBOX_CONSUMER_LAG_RECORDS,
    INBOX_REBALANCES_TOTAL,
    INBOX_BATCH_SECONDS,
    INBOX_PRODUCED_TO_STORED_SECONDS,
    INBOX_TOPIC_RESETS_TOTAL,
    POLL_CLAIM_SECONDS,
    POLL_SETTLE_SECONDS,
    IN_FLIGHT_LIMIT_EVENTS,
    IN_FLIGHT_LIMIT_BYTES,
    STATE,
    INFO,
    RETENTION_DELETED_TOTAL,
    RETENTION_OLDEST_ROW_AGE_SECONDS,
    RETENTION_PASSES_TOTAL,
    RETENTION_ERRORS_TOTAL,
    RETENTION_SECONDS,
];
