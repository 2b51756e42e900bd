//! The bodies of walrelay's commands; `cli.rs` parses flags and calls them.

pub mod check;
pub mod check_failover;
pub mod check_kafka;
pub mod check_result;
pub mod check_standby;
pub mod config;
pub mod inbox;
pub mod replay;
pub mod run;
pub mod setup;
pub mod status;
pub mod tail;
