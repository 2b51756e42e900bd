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

/// The slots as a table.
pub fn render_table(slots: &[SlotSnapshot]) -> String {
    let mut rows = vec![[
        "SLOT".to_owned(),
        "ACTIVE".into(),
        "PID".into(),
        "CONFIRMED LSN".into(),
        "RESTART LSN".into(),
        "LAG".into(),
        "RETAINED WAL".into(),
        "WAL STATUS".into(),
    ]];
    for s in slots {
        rows.push([
            s.slot_name.clone(),
            if s.active { "yes" } else { "no" }.into(),
            s.active_pid.map_or("-".into(), |p| p.to_string()),
            s.confirmed_flush_lsn.clone().unwrap_or_else(|| "-".into()),
            s.restart_lsn.clone().unwrap_or_else(|| "-".into()),
            s.lag_bytes.map_or("-".into(), human_bytes),
            s.retained_wal_bytes.map_or("-".into(), human_bytes),
            s.wal_status.clone().unwrap_or_else(|| "-".into()),
        ]);
    }
    let widths: Vec<usize> = (0..8)
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
}
