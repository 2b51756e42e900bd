//! Whether the slot can still stream every event: a slot that is missing,
//! invalidated, or about to lose the WAL it keeps cannot, and retrying
//! never helps. The relay stops with what happened, since when, and the
//! command that brings the events back from the outbox table.

use crate::catalog::SlotSnapshot;

/// The slot's last confirmed position, and when walrelay saw it move.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LastConfirmed {
    /// What the server says (an invalidated slot keeps confirmed_flush_lsn).
    pub lsn: Option<String>,
    /// The last position walrelay saw and when (UTC, RFC 3339): from its
    /// monitor, or its record in `walrelay_slots` once the slot is gone.
    pub seen: Option<(String, String)>,
}

impl LastConfirmed {
    /// Seen at `lsn` now (`at`).
    pub fn seen(lsn: String, at: String) -> Self {
        LastConfirmed {
            lsn: Some(lsn.clone()),
            seen: Some((lsn, at)),
        }
    }
}

impl std::fmt::Display for LastConfirmed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.lsn, &self.seen) {
            (Some(lsn), Some((seen, at))) if lsn == seen => {
                write!(f, "last confirmed LSN {lsn}, seen at {at}")
            }
            (Some(lsn), Some((seen, at))) => write!(
                f,
                "last confirmed LSN {lsn}; walrelay last recorded {seen} at {at}"
            ),
            (None, Some((seen, at))) => write!(f, "last confirmed LSN {seen}, seen at {at}"),
            (Some(lsn), None) => write!(f, "last confirmed LSN {lsn}"),
            (None, None) => write!(f, "last confirmed LSN unknown"),
        }
    }
}

/// A slot the relay can no longer stream every event from.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SlotProblem {
    #[error(
        "replication slot {slot:?} does not exist ({last}): it was dropped, or this server was promoted without it, and events committed since were not streamed. Retrying cannot bring them back; recover them from the outbox table with `{}` (same --pg-url, --brokers and routing flags as run); see docs/runbooks/slot-dropped.md",
        recover_command(slot)
    )]
    Missing { slot: String, last: LastConfirmed },
    #[error(
        "replication slot {slot:?} was invalidated (wal_status {wal_status}{}; {last}): PostgreSQL removed, or is about to remove, WAL the slot still needs (max_slot_wal_keep_size), so events committed after that LSN cannot be streamed. Retrying cannot bring them back; recover them from the outbox table with `{}` (same --pg-url, --brokers and routing flags as run); see docs/runbooks/slot-lost.md",
        reason.as_deref().map(|r| format!(", reason {r}")).unwrap_or_default(),
        recover_command(slot)
    )]
    Invalidated {
        slot: String,
        wal_status: String,
        reason: Option<String>,
        last: LastConfirmed,
    },
    #[error(
        "replication slot {slot:?} on this standby was invalidated by a recovery conflict ({}; {last}): {}, so events committed after that LSN cannot be streamed from it. Retrying cannot bring them back. Fix the cause first: {}. Then recover the events from the outbox table with `{}` (same --pg-url, --primary-url, --brokers and routing flags as run); see docs/runbooks/standby-decoding.md",
        conflict.reason(),
        conflict.cause(),
        conflict.fix(),
        recover_command(slot)
    )]
    Conflict {
        slot: String,
        conflict: RecoveryConflict,
        last: LastConfirmed,
    },
}

/// Why a recovery conflict invalidated a slot on a standby.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecoveryConflict {
    /// The primary removed catalog rows the slot still needed
    /// (`rows_removed` on 17+).
    RowsRemoved,
    /// The primary's wal_level dropped below logical.
    WalLevelInsufficient,
    /// PostgreSQL 16 says only `conflicting`: one of the two above.
    Unnamed,
}

impl RecoveryConflict {
    /// The conflict a slot's invalidation reason names, if it is one.
    pub fn of(reason: &str) -> Option<Self> {
        match reason {
            "rows_removed" => Some(RecoveryConflict::RowsRemoved),
            "wal_level_insufficient" => Some(RecoveryConflict::WalLevelInsufficient),
            "conflicting" => Some(RecoveryConflict::Unnamed),
            _ => None,
        }
    }

    fn reason(self) -> &'static str {
        match self {
            RecoveryConflict::RowsRemoved => "reason rows_removed",
            RecoveryConflict::WalLevelInsufficient => "reason wal_level_insufficient",
            RecoveryConflict::Unnamed => "conflicting",
        }
    }

    fn cause(self) -> &'static str {
        match self {
            RecoveryConflict::RowsRemoved => {
                "the primary vacuumed away catalog rows the slot still needed, because it did not know the standby's slot needed them"
            }
            RecoveryConflict::WalLevelInsufficient => {
                "the primary's wal_level was lowered below logical"
            }
            RecoveryConflict::Unnamed => {
                "the primary vacuumed away catalog rows the slot still needed (it did not know the standby's slot needed them), or its wal_level was lowered below logical"
            }
        }
    }

    fn fix(self) -> &'static str {
        const FEEDBACK: &str = "on the standby, ALTER SYSTEM SET hot_standby_feedback = on and stream through a physical slot (on the primary: SELECT pg_create_physical_replication_slot('standby1'); on the standby: ALTER SYSTEM SET primary_slot_name = 'standby1'), then SELECT pg_reload_conf(), so the primary keeps the rows the standby's slots need";
        const WAL_LEVEL: &str =
            "on the primary, ALTER SYSTEM SET wal_level = logical and restart it";
        match self {
            RecoveryConflict::RowsRemoved => FEEDBACK,
            RecoveryConflict::WalLevelInsufficient => WAL_LEVEL,
            RecoveryConflict::Unnamed => {
                "on the standby, ALTER SYSTEM SET hot_standby_feedback = on and stream through a physical slot (on the primary: SELECT pg_create_physical_replication_slot('standby1'); on the standby: ALTER SYSTEM SET primary_slot_name = 'standby1'), then SELECT pg_reload_conf(); and keep wal_level = logical on the primary"
            }
        }
    }
}

/// The command that makes a new slot and publishes, from the outbox
/// table, what the lost one had not confirmed.
pub fn recover_command(slot: &str) -> String {
    format!("walrelay recover --slot {slot}")
}

/// What is wrong with the slot, from one reading of it (`None`: it does
/// not exist). `unreserved` is only warned of (see below).
pub fn assess(
    slot: &str,
    reading: Option<&SlotSnapshot>,
    last: LastConfirmed,
) -> Option<SlotProblem> {
    let Some(s) = reading else {
        return Some(SlotProblem::Missing {
            slot: slot.to_owned(),
            last,
        });
    };
    // `unreserved` is not a stop: its WAL goes at the next checkpoint
    // unless the slot moves on, and a relay that keeps streaming may move
    // it on in time (the alert on safe_wal_size pages before). Stopping
    // would make the loss certain.
    if s.wal_status.as_deref() == Some("unreserved") && s.invalidation_reason.is_none() {
        tracing::warn!(
            slot,
            "the slot's WAL is past max_slot_wal_keep_size (wal_status 'unreserved'): it is lost at the next checkpoint unless the relay catches up; see docs/runbooks/slot-near-invalidation.md"
        );
        return None;
    }
    let at_risk = matches!(s.wal_status.as_deref(), Some("lost"));
    if !at_risk && s.invalidation_reason.is_none() {
        return None;
    }
    let last = LastConfirmed {
        lsn: s.confirmed_flush_lsn.clone().or(last.lsn),
        seen: last.seen,
    };
    if let Some(conflict) = s
        .invalidation_reason
        .as_deref()
        .and_then(RecoveryConflict::of)
    {
        return Some(SlotProblem::Conflict {
            slot: slot.to_owned(),
            conflict,
            last,
        });
    }
    Some(SlotProblem::Invalidated {
        slot: slot.to_owned(),
        wal_status: s.wal_status.clone().unwrap_or_else(|| "unknown".into()),
        reason: s.invalidation_reason.clone(),
        last,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(wal_status: &str, reason: Option<&str>) -> SlotSnapshot {
        SlotSnapshot {
            slot_name: "walrelay".into(),
            wal_status: Some(wal_status.into()),
            invalidation_reason: reason.map(Into::into),
            confirmed_flush_lsn: Some("0/16B3748".into()),
            ..SlotSnapshot::default()
        }
    }

    #[test]
    fn a_reserved_or_extended_slot_is_healthy() {
        for status in ["reserved", "extended"] {
            assert_eq!(
                assess(
                    "walrelay",
                    Some(&reading(status, None)),
                    LastConfirmed::default()
                ),
                None
            );
        }
    }

    #[test]
    fn a_lost_slot_names_its_last_lsn_and_the_recover_command() {
        let last = LastConfirmed::seen("0/16B3748".into(), "2026-12-03T05:00:00Z".into());
        let problem = assess(
            "walrelay",
            Some(&reading("lost", Some("wal_removed"))),
            last,
        )
        .unwrap();
        let text = problem.to_string();
        assert!(
            text.contains("wal_status lost, reason wal_removed"),
            "{text}"
        );
        assert!(
            text.contains("0/16B3748, seen at 2026-12-03T05:00:00Z"),
            "{text}"
        );
        assert!(
            text.contains("`walrelay recover --slot walrelay`"),
            "{text}"
        );
    }

    #[test]
    fn a_conflicting_slot_stops_the_relay_and_an_unreserved_one_streams_on() {
        assert!(
            assess(
                "s",
                Some(&reading("unreserved", None)),
                LastConfirmed::default()
            )
            .is_none(),
            "streaming on may save it; stopping would lose it for sure"
        );
        assert!(
            assess(
                "s",
                Some(&reading("reserved", Some("conflicting"))),
                LastConfirmed::default()
            )
            .is_some()
        );
    }

    #[test]
    fn a_recovery_conflict_names_its_cause_the_fix_and_recover() {
        for (reason, cause, fix) in [
            (
                "rows_removed",
                "vacuumed away catalog rows",
                "hot_standby_feedback = on",
            ),
            (
                "conflicting",
                "vacuumed away catalog rows",
                "primary_slot_name",
            ),
            (
                "wal_level_insufficient",
                "wal_level was lowered",
                "wal_level = logical",
            ),
        ] {
            let text = assess(
                "walrelay",
                Some(&reading("lost", Some(reason))),
                LastConfirmed::default(),
            )
            .unwrap()
            .to_string();
            assert!(text.contains("recovery conflict"), "{text}");
            assert!(text.contains(cause), "{reason}: {text}");
            assert!(text.contains(fix), "{reason}: {text}");
            assert!(text.contains("walrelay recover --slot walrelay"), "{text}");
        }
    }

    #[test]
    fn a_missing_slot_says_so_and_names_recover() {
        let text = assess("walrelay", None, LastConfirmed::default())
            .unwrap()
            .to_string();
        assert!(text.contains("does not exist"), "{text}");
        assert!(text.contains("walrelay recover --slot walrelay"), "{text}");
    }
}
