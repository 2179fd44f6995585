//! `[retention]`: how long labelled images kept in `done_dir` and `quarantine` live. Raw TOML in, a
//! checked `RetentionConfig` out; a section that sets no limit at all is an error (exit 2 naming it),
//! not a sweeper that never removes anything.

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::error::ConfigError;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRetention {
    max_age_days: Option<u64>,
    min_free_mb: Option<u64>,
    min_free_percent: Option<f64>,
    #[serde(default = "default_interval_s")]
    interval_s: u64,
}

fn default_interval_s() -> u64 {
    300
}

/// When images in done and quarantine folders are removed, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct RetentionConfig {
    /// Images whose modification time is older than this are removed.
    pub max_age: Option<Duration>,
    /// While the file system holding a folder has less free space than this, the oldest images go.
    pub min_free_bytes: Option<u64>,
    /// The same as a share of the file system's size, 0 < p < 100.
    pub min_free_percent: Option<f64>,
    /// Time between sweeps.
    pub interval: Duration,
}

const DAY_S: u64 = 86_400;

pub(super) fn from_raw(file: &Path, raw: RawRetention) -> Result<RetentionConfig, ConfigError> {
    let err = |key: &str, reason: String| ConfigError::new(file, format!("[retention] {key}"), reason);
    if raw.max_age_days.is_none() && raw.min_free_mb.is_none() && raw.min_free_percent.is_none() {
        return Err(ConfigError::new(
            file,
            "[retention]",
            "sets no limit: set max_age_days, min_free_mb or min_free_percent (or remove the section)",
        ));
    }
    if let Some(d) = raw.max_age_days.filter(|d| !(1..=36_500).contains(d)) {
        return Err(err("max_age_days", format!("must be 1..=36500, got {d}")));
    }
    if let Some(mb) = raw.min_free_mb.filter(|mb| !(1..=100_000_000).contains(mb)) {
        return Err(err("min_free_mb", format!("must be 1..=100000000, got {mb}")));
    }
    if let Some(p) = raw.min_free_percent.filter(|p| !(p.is_finite() && *p > 0.0 && *p < 100.0)) {
        return Err(err("min_free_percent", format!("must be above 0 and below 100, got {p}")));
    }
    if !(10..=86_400).contains(&raw.interval_s) {
        return Err(err("interval_s", format!("must be 10..=86400, got {}", raw.interval_s)));
    }
    Ok(RetentionConfig {
        max_age: raw.max_age_days.map(|d| Duration::from_secs(d * DAY_S)),
        min_free_bytes: raw.min_free_mb.map(|mb| mb * 1024 * 1024),
        min_free_percent: raw.min_free_percent,
        interval: Duration::from_secs(raw.interval_s),
    })
}

impl RetentionConfig {
    /// The `[retention]` section as `check-config` prints it.
    pub fn describe(&self) -> String {
        let mut s = "[retention]\n".to_string();
        if let Some(age) = self.max_age {
            s += &format!("max_age_days = {}\n", age.as_secs() / DAY_S);
        }
        if let Some(b) = self.min_free_bytes {
            s += &format!("min_free_mb = {}\n", b / (1024 * 1024));
        }
        if let Some(p) = self.min_free_percent {
            s += &format!("min_free_percent = {}\n", toml::Value::Float(p));
        }
        s + &format!("interval_s = {}\n", self.interval.as_secs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<RetentionConfig, ConfigError> {
        let raw: RawRetention = toml::from_str(text).unwrap();
        from_raw(Path::new("/etc/labeld.toml"), raw)
    }

    #[test]
    fn limits_are_checked_and_one_is_required() {
        let e = parse("interval_s = 60\n").unwrap_err();
        assert_eq!(e.key, "[retention]");
        let c = parse("max_age_days = 30\n").unwrap();
        assert_eq!((c.max_age, c.interval), (Some(Duration::from_secs(30 * DAY_S)), Duration::from_secs(300)));
        let c = parse("min_free_mb = 512\nmin_free_percent = 5.5\n").unwrap();
        assert_eq!((c.min_free_bytes, c.min_free_percent, c.max_age), (Some(512 << 20), Some(5.5), None));
        for (text, key) in [
            ("max_age_days = 0\n", "[retention] max_age_days"),
            ("min_free_mb = 0\n", "[retention] min_free_mb"),
            ("min_free_percent = 100\n", "[retention] min_free_percent"),
            ("min_free_percent = 0.0\n", "[retention] min_free_percent"),
            ("max_age_days = 1\ninterval_s = 9\n", "[retention] interval_s"),
            ("max_age_days = 1\ninterval_s = 86401\n", "[retention] interval_s"),
        ] {
            assert_eq!(parse(text).unwrap_err().key, key, "{text}");
        }
    }

    #[test]
    fn the_description_reads_back_as_the_same_section() {
        let c = parse("max_age_days = 90\nmin_free_percent = 10\ninterval_s = 60\n").unwrap();
        let text = c.describe();
        assert_eq!(text, "[retention]\nmax_age_days = 90\nmin_free_percent = 10.0\ninterval_s = 60\n");
        assert_eq!(parse(text.trim_start_matches("[retention]\n")).unwrap(), c);
    }
}
