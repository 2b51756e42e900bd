//! `walrelay status`: the replication slots, their lag and retained WAL, for a person
//! (a table, optionally refreshed in place) or a script (`--json`).

use crate::catalog::{self, SlotSnapshot};
use crate::sql::SqlClient;

/// Bytes in IEC units: `1.5 MiB`.
pub fn human_bytes(bytes: i64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes.unsigned_abs() as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    let sign = if bytes < 0 { "-" } else { "" };
    if unit == 0 {
        format!("{sign}{value:.0} B")
    } else {
        format!("{sign}{value:.1} {}", UNITS[unit])
    }
}

/// The slots as a table; on PostgreSQL 17+ with their failover state and
/// since when an inactive slot has been unused.
pub fn render_table(slots: &[SlotSnapshot]) -> String {
    let failover = slots.iter().any(|s| s.failover.is_some());
    let inactive_since = slots.iter().any(|s| s.inactive_since.is_some());
    let yes_no = |v: Option<bool>| match v {
        Some(true) => "yes".to_owned(),
        Some(false) => "no".to_owned(),
        None => "-".to_owned(),
    };
    let mut header = vec![
        "SLOT".to_owned(),
        "ACTIVE".into(),
        "PID".into(),
        "CONFIRMED LSN".into(),
        "RESTART LSN".into(),
        "LAG".into(),
        "RETAINED WAL".into(),
        "WAL STATUS".into(),
    ];
    if failover {
        header.extend(["FAILOVER".into(), "SYNCED".into()]);
    }
    if inactive_since {
        header.push("INACTIVE SINCE".into());
    }
    let mut rows = vec![header];
    for s in slots {
        let mut row = vec![
            s.slot_name.clone(),
            if s.active { "yes" } else { "no" }.into(),
            s.active_pid.map_or("-".into(), |p| p.to_string()),
            s.confirmed_flush_lsn.clone().unwrap_or_else(|| "-".into()),
            s.restart_lsn.clone().unwrap_or_else(|| "-".into()),
            s.lag_bytes.map_or("-".into(), human_bytes),
            s.retained_wal_bytes.map_or("-".into(), human_bytes),
            match (&s.wal_status, &s.invalidation_reason) {
                (Some(status), Some(reason)) => format!("{status} ({reason})"),
                (Some(status), None) => status.clone(),
                (None, _) => "-".into(),
            },
        ];
        if failover {
            row.extend([yes_no(s.failover), yes_no(s.synced)]);
        }
        if inactive_since {
            row.push(s.inactive_since.clone().unwrap_or_else(|| "-".into()));
        }
        rows.push(row);
    }
    let columns = rows[0].len();
    let widths: Vec<usize> = (0..columns)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    if slots.is_empty() {
        out.push_str("(no replication slots)\n");
    }
    out
}

/// Prints once, or every two seconds with `watch`.
pub async fn run(
    client: &SqlClient,
    slot: Option<&str>,
    json: bool,
    watch: bool,
) -> anyhow::Result<()> {
    loop {
        let slots = catalog::slots(client, slot).await?;
        if json {
            println!("{}", serde_json::to_string_pretty(&slots)?);
        } else {
            if watch {
                // Clear the screen and go home, so the table refreshes in place.
                print!("\x1b[H\x1b[2J");
            }
            print!("{}", render_table(&slots));
        }
        if !watch {
            return Ok(());
        }
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_secs(2)) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_print_in_iec_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(5 * 1024 * 1024 * 1024), "5.0 GiB");
        assert_eq!(human_bytes(-2048), "-2.0 KiB");
    }

    #[test]
    fn table_has_a_row_per_slot_and_aligned_columns() {
        let table = render_table(&[SlotSnapshot {
            slot_name: "walrelay".into(),
            active: true,
            active_pid: Some(42),
            wal_status: Some("reserved".into()),
            lag_bytes: Some(2048),
            retained_wal_bytes: Some(10 * 1024 * 1024),
            confirmed_flush_lsn: Some("0/1A2B3C".into()),
            restart_lsn: Some("0/1A0000".into()),
            ..Default::default()
        }]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("SLOT      ACTIVE  PID"));
        assert!(lines[1].contains("walrelay  yes     42"));
        assert!(lines[1].contains("2.0 KiB"));
        assert!(lines[1].contains("10.0 MiB"));
        assert!(lines[1].ends_with("reserved"));
    }

    #[test]
    fn failover_and_synced_columns_appear_when_the_server_has_them() {
        let table = render_table(&[SlotSnapshot {
            slot_name: "walrelay".into(),
            wal_status: Some("reserved".into()),
            failover: Some(true),
            synced: Some(false),
            ..Default::default()
        }]);
        let lines: Vec<&str> = table.lines().collect();
        assert!(
            lines[0].ends_with("WAL STATUS  FAILOVER  SYNCED"),
            "{table}"
        );
        assert!(lines[1].ends_with("reserved    yes       no"), "{table}");
    }

    #[test]
    fn an_invalidated_slot_says_why_and_an_inactive_one_since_when() {
        let table = render_table(&[
            SlotSnapshot {
                slot_name: "old".into(),
                wal_status: Some("lost".into()),
                invalidation_reason: Some("wal_removed".into()),
                inactive_since: Some("2026-11-25T10:00:00Z".into()),
                ..Default::default()
            },
            SlotSnapshot {
                slot_name: "walrelay".into(),
                active: true,
                wal_status: Some("reserved".into()),
                ..Default::default()
            },
        ]);
        let lines: Vec<&str> = table.lines().collect();
        assert!(
            lines[0].ends_with("WAL STATUS          INACTIVE SINCE"),
            "{table}"
        );
        assert!(
            lines[1].ends_with("lost (wal_removed)  2026-11-25T10:00:00Z"),
            "{table}"
        );
        assert!(lines[2].ends_with("reserved            -"), "{table}");
    }
}
