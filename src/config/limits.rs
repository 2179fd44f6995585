//! `[limits]`: what an image may cost before any pixel is decoded. On reload: applies from the next batch.

use std::path::Path;

use serde::Deserialize;

use crate::error::ConfigError;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    #[serde(default = "default_max_pixels")]
    max_pixels: u64,
    #[serde(default = "default_max_file_mb")]
    max_file_mb: u64,
}

impl Default for RawLimits {
    fn default() -> Self {
        RawLimits { max_pixels: default_max_pixels(), max_file_mb: default_max_file_mb() }
    }
}

fn default_max_pixels() -> u64 {
    100_000_000
}
fn default_max_file_mb() -> u64 {
    512
}

#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Width × height an image's header may claim (checked before decoding).
    pub max_pixels: u64,
    /// Files larger than this are not read.
    pub max_file_bytes: u64,
}

impl Default for Limits {
    /// The same values a config file gets when it leaves the keys out.
    fn default() -> Self {
        Limits { max_pixels: default_max_pixels(), max_file_bytes: default_max_file_mb() * 1024 * 1024 }
    }
}

impl Limits {
    pub fn describe(&self) -> String {
        format!("[limits]\nmax_pixels = {}\nmax_file_mb = {}\n", self.max_pixels, self.max_file_bytes / (1024 * 1024))
    }
}

pub(super) fn from_raw(file: &Path, raw: RawLimits) -> Result<Limits, ConfigError> {
    if raw.max_pixels == 0 {
        return Err(ConfigError::new(file, "[limits] max_pixels", "must be > 0"));
    }
    if raw.max_file_mb == 0 {
        return Err(ConfigError::new(file, "[limits] max_file_mb", "must be > 0"));
    }
    Ok(Limits { max_pixels: raw.max_pixels, max_file_bytes: raw.max_file_mb.saturating_mul(1024 * 1024) })
}
