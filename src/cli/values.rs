//! Values of flags that are more than a number or a name: durations and
//! sizes, with errors that say what is expected.

use std::time::Duration;

/// `65536`, `64KiB`, `64MiB`, `1GiB` (or KB, MB, GB as powers of 1000); at
/// least 1 KiB.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size; use a number of bytes or one with KiB, MiB or GiB, such as 64MiB"))?;
    let factor: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        other => {
            return Err(format!(
                "{text:?}: unknown unit {other:?}; use B, KiB, MiB or GiB (or KB, MB, GB)"
            ));
        }
    };
    let bytes = value
        .checked_mul(factor)
        .ok_or_else(|| format!("{text:?} is too large"))?;
    if bytes < 1024 {
        return Err(format!("{text:?} is below the smallest window of 1KiB"));
    }
    Ok(bytes)
}

/// `500ms`, `1s`, `2m`, `1h`; a bare number is seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().map_err(|_| {
        format!("{text:?} is not a duration; use a number with ms, s, m or h, such as 500ms or 30s")
    })?;
    let seconds = match unit.trim() {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        other => {
            return Err(format!(
                "{text:?}: unknown unit {other:?}; use ms, s, m or h"
            ));
        }
    };
    // from_secs_f64 panics past u64::MAX seconds; say so instead.
    Duration::try_from_secs_f64(seconds).map_err(|_| {
        format!("{text:?} is too long a duration; use at most a few years, such as 30s or 1h")
    })
}

/// A retention (`--retain`): a whole number with s, m, h or d, such as
/// 24h or 7d. A unit is required: a bare `24` is more likely meant as
/// hours than seconds, so it is refused rather than guessed.
pub fn parse_retention(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let hint = "use a whole number with s, m, h or d, such as 24h or 7d";
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    if number.is_empty() {
        return Err(format!("{text:?} is not a retention; {hint}"));
    }
    let value: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is too large; {hint}"))?;
    let factor = match unit.trim() {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "" => return Err(format!("{text:?} has no unit; {hint}")),
        other => return Err(format!("{text:?}: unknown unit {other:?}; {hint}")),
    };
    if value == 0 {
        return Err(format!(
            "{text:?}: a retention of zero would delete rows as soon as they are confirmed; {hint}, or leave --retain out to keep every row"
        ));
    }
    let seconds = value
        .checked_mul(factor)
        .ok_or_else(|| format!("{text:?} is too large; {hint}"))?;
    Ok(Duration::from_secs(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retentions_need_a_whole_number_and_a_unit() {
        assert_eq!(parse_retention("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_retention("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse_retention("90s"), Ok(Duration::from_secs(90)));
        for (bad, says) in [
            ("24", "no unit"),
            ("0h", "zero"),
            ("-1h", "not a retention"),
            ("1.5h", "unknown unit"),
            ("3w", "unknown unit"),
            ("soon", "not a retention"),
            ("99999999999999999999d", "too large"),
        ] {
            let err = parse_retention(bad).unwrap_err();
            assert!(err.contains(says) && err.contains("24h"), "{bad}: {err}");
        }
    }

    #[test]
    fn sizes_take_binary_and_decimal_units() {
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("2KB"), Ok(2000));
        assert!(parse_size("12").unwrap_err().contains("1KiB"));
        assert!(
            parse_size("3 parsecs")
                .unwrap_err()
                .contains("unknown unit")
        );
        assert!(parse_size("lots").unwrap_err().contains("not a size"));
    }

    #[test]
    fn durations_take_units_and_say_which_are_known() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(
            parse_duration("soon")
                .unwrap_err()
                .contains("not a duration")
        );
        assert!(
            parse_duration("3 weeks")
                .unwrap_err()
                .contains("unknown unit")
        );
        assert!(
            parse_duration("99999999999999999999999h")
                .unwrap_err()
                .contains("too long")
        );
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn parse_duration_never_panics(text in "\\PC*") {
                let _ = parse_duration(&text);
            }

            #[test]
            fn parse_duration_never_panics_on_numbers_with_units(
                number in "[0-9.]{0,40}",
                unit in prop::sample::select(vec!["", "ms", "s", "m", "h", "x"]),
            ) {
                let _ = parse_duration(&format!("{number}{unit}"));
            }

            #[test]
            fn whole_seconds_read_back(secs in 0u64..1_000_000_000) {
                prop_assert_eq!(parse_duration(&format!("{secs}s")), Ok(Duration::from_secs(secs)));
            }

            #[test]
            fn parse_size_never_panics(text in "\\PC*") {
                let _ = parse_size(&text);
            }

            #[test]
            fn parse_size_never_panics_on_numbers_with_units(
                number in "[0-9]{0,30}",
                unit in prop::sample::select(vec!["", "B", "KiB", "MiB", "GiB", "KB", "MB", "GB", "x"]),
            ) {
                let _ = parse_size(&format!("{number}{unit}"));
            }

            #[test]
            fn sizes_read_back_in_kib(kib in 1u64..(1 << 40)) {
                prop_assert_eq!(parse_size(&format!("{kib}KiB")), Ok(kib << 10));
            }
        }
    }
}
