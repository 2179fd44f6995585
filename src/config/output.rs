//! `[output]`: the CSV results log. On reload: applies from the next batch (a new file gets its header).

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::absolute;
use crate::error::ConfigError;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOutput {
    #[serde(default = "default_csv")]
    csv: PathBuf,
}

impl Default for RawOutput {
    fn default() -> Self {
        RawOutput { csv: default_csv() }
    }
}

fn default_csv() -> PathBuf {
    "results.csv".into()
}

#[derive(Debug, Clone, PartialEq)]
pub struct OutputConfig {
    /// The results log: one row per image, appended.
    pub csv: PathBuf,
}

impl OutputConfig {
    pub fn describe(&self) -> String {
        format!("[output]\ncsv = {}\n", toml::Value::String(self.csv.display().to_string()))
    }
}

pub(super) fn from_raw(file: &Path, base: &Path, raw: RawOutput) -> Result<OutputConfig, ConfigError> {
    let csv = absolute(base, &raw.csv);
    if csv.is_dir() {
        return Err(ConfigError::new(file, "[output] csv", format!("{} is a directory; name a file", csv.display())));
    }
    Ok(OutputConfig { csv })
}
