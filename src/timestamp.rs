//! PostgreSQL's timestamps: what a commit, a row's `created_at` and a
//! walsender message carry. Its own module, below every source, so the
//! live state and the polling source need nothing of the WAL decoder.

/// Microseconds since 2000-01-01 00:00:00 UTC, PostgreSQL's timestamp epoch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct PgTimestamp(pub i64);

impl PgTimestamp {
    /// Seconds between 1970-01-01 and 2000-01-01.
    const UNIX_TO_PG_EPOCH_SECS: i64 = 946_684_800;

    /// Microseconds since the Unix epoch.
    pub fn unix_micros(self) -> i64 {
        self.0
            .saturating_add(Self::UNIX_TO_PG_EPOCH_SECS * 1_000_000)
    }

    /// The PostgreSQL timestamp for a number of microseconds since the Unix epoch.
    pub fn from_unix_micros(micros: i64) -> Self {
        PgTimestamp(micros.saturating_sub(Self::UNIX_TO_PG_EPOCH_SECS * 1_000_000))
    }

    /// RFC 3339 in UTC with microseconds: `2026-11-23T08:32:03.123456Z`.
    pub fn to_rfc3339(self) -> String {
        let micros = self.unix_micros();
        let secs = micros.div_euclid(1_000_000);
        let frac = micros.rem_euclid(1_000_000);
        let days = secs.div_euclid(86_400);
        let day_secs = secs.rem_euclid(86_400);
        let (year, month, day) = civil_from_days(days);
        format!(
            "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{frac:06}Z",
            day_secs / 3600,
            day_secs / 60 % 60,
            day_secs % 60
        )
    }

    /// Now, by this machine's clock.
    pub fn now() -> Self {
        let micros = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as i64)
            .unwrap_or(0);
        Self::from_unix_micros(micros)
    }
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_print_as_rfc3339_utc() {
        assert_eq!(PgTimestamp(0).to_rfc3339(), "2000-01-01T00:00:00.000000Z");
        // 2026-11-23T08:32:03.123456Z is 1795422723.123456 s after the Unix epoch.
        let t = PgTimestamp::from_unix_micros(1_795_422_723_123_456);
        assert_eq!(t.to_rfc3339(), "2026-11-23T08:32:03.123456Z");
        assert_eq!(PgTimestamp(-1).to_rfc3339(), "1999-12-31T23:59:59.999999Z");
        assert_eq!(
            PgTimestamp::from_unix_micros(951_782_400_000_000).to_rfc3339(),
            "2000-02-29T00:00:00.000000Z"
        );
    }
}
