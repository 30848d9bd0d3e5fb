//! Duration strings of the task spec: "250ms", "10s", "5m", "2h", "1d", or sums like "1m30s".

use std::time::Duration;

/// A duration string that does not parse; the message says what is allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseDurationError {
    #[error("invalid duration {input:?}: expected a number and a unit (ms, s, m, h, d), like \"250ms\", \"10s\" or \"1m30s\"")]
    Syntax { input: String },
    #[error("invalid duration {input:?}: at most 366d")]
    TooLong { input: String },
}

/// Parses a duration string.
pub fn parse(input: &str) -> Result<Duration, ParseDurationError> {
    let err = || ParseDurationError::Syntax {
        input: input.to_string(),
    };
    let too_long = || ParseDurationError::TooLong {
        input: input.to_string(),
    };
    let s = input.trim();
    if s.is_empty() {
        return Err(err());
    }

    let mut total_ms: u128 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(err());
        }
        let value: u128 = rest[..digits].parse().map_err(|_| err())?;
        rest = &rest[digits..];

        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit_ms: u128 = match &rest[..unit_len] {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return Err(err()),
        };
        rest = &rest[unit_len..];
        total_ms = total_ms
            .checked_add(value.checked_mul(unit_ms).ok_or_else(too_long)?)
            .ok_or_else(too_long)?;
    }

    // Nothing in a task spec needs more than a year; larger values are typos.
    if total_ms > 366 * 86_400_000 {
        return Err(too_long());
    }
    Ok(Duration::from_millis(total_ms as u64))
}

/// Formats a duration the way the spec writes them ("1m30s", "250ms").
pub fn format(d: Duration) -> String {
    let mut ms = d.as_millis();
    if ms == 0 {
        return "0s".to_string();
    }
    let mut out = String::new();
    for (unit, size) in [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1_000),
    ] {
        if ms >= size {
            out.push_str(&format!("{}{unit}", ms / size));
            ms %= size;
        }
    }
    if ms > 0 {
        out.push_str(&format!("{ms}ms"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_single_and_compound_units() {
        assert_eq!(parse("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse("2h").unwrap(), Duration::from_secs(7200));
        assert_eq!(parse("1m30s").unwrap(), Duration::from_secs(90));
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            "",
            "10",
            "s",
            "10 s",
            "-1s",
            "1.5s",
            "10y",
            "99999999999999999999d",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} should not parse");
        }
        let long = parse("9999h").unwrap_err().to_string();
        assert!(long.contains("at most 366d"), "{long}");
    }

    #[test]
    fn format_round_trips() {
        for s in ["250ms", "10s", "1m30s", "2h", "1d1h1m1s1ms"] {
            assert_eq!(format(parse(s).unwrap()), s);
        }
    }
}
