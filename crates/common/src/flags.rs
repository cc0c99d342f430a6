//! Parsers for command-line flag values shared by every binary.

use std::time::Duration;

/// Parses a duration flag: plain seconds (`30`, `0.5`) or humantime (`30s`, `500ms`, `2m`).
pub fn parse_duration_flag(s: &str) -> Result<Duration, String> {
    if let Ok(secs) = s.parse::<f64>()
        && secs.is_finite()
        && secs >= 0.0
    {
        return Ok(Duration::from_secs_f64(secs));
    }
    humantime::parse_duration(s).map_err(|e| format!("invalid duration {s:?}: {e}"))
}

/// [`parse_duration_flag`], more than zero and less than a day (timeouts of bounded runs).
pub fn parse_bounded_duration_flag(s: &str) -> Result<Duration, String> {
    let d = parse_duration_flag(s)?;
    if d.is_zero() || d >= Duration::from_secs(86_400) {
        return Err(format!(
            "duration out of range: {s:?} (more than 0, less than a day)"
        ));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_as_seconds_or_humantime() {
        assert_eq!(parse_duration_flag("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration_flag("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration_flag("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration_flag("soon").is_err());
        assert!(parse_duration_flag("-1").is_err());
    }

    #[test]
    fn bounded_durations_refuse_zero_and_days() {
        assert_eq!(
            parse_bounded_duration_flag("500ms"),
            Ok(Duration::from_millis(500))
        );
        assert!(parse_bounded_duration_flag("0s").is_err());
        assert!(parse_bounded_duration_flag("2days").is_err());
        assert!(parse_bounded_duration_flag("-1s").is_err());
    }
}
