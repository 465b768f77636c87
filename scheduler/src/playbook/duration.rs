//! Durations as marketers write them: `30s`, `15m`, `72h`, `3d`, `1h30m`, `500ms`.

use std::time::Duration;

/// Parses a playbook duration. Months and years are refused: their length varies,
/// and humantime would silently take an average.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let invalid = || format!("invalid duration {text:?} (expected e.g. 30s, 15m, 72h, 3d)");
    let trimmed = text.trim();
    let calendar_unit = trimmed.contains('M') || trimmed.contains('y') || trimmed.contains("mon");
    if trimmed.is_empty() || calendar_unit || !trimmed.starts_with(|c: char| c.is_ascii_digit()) {
        return Err(invalid());
    }
    humantime::parse_duration(trimmed).map_err(|_| invalid())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_marketer_units() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("72h"), Ok(Duration::from_secs(72 * 3600)));
        assert_eq!(parse_duration("3d"), Ok(Duration::from_secs(3 * 86400)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("200ms"), Ok(Duration::from_millis(200)));
    }

    #[test]
    fn refuses_garbage_and_calendar_units() {
        for bad in ["3x", "", "d", "-3d", "1M", "1y", "2months", "3 days later"] {
            let err = parse_duration(bad).unwrap_err();
            assert!(err.contains("expected e.g. 30s"), "{bad}: {err}");
        }
    }
}
