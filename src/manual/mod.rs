//! The man pages, generated from what they describe so they cannot drift: `labeld(8)` from the clap
//! command line, `labeld.toml(5)` from the annotated example config (config/labeld.toml). Written by
//! the hidden `labeld man DIR` when the .deb is built.

mod cli;
mod config;

use std::path::Path;

use clap_mangen::roff;

use crate::error::Fatal;

pub use cli::labeld_8;
pub use config::labeld_toml_5;

/// The annotated example config, the source of `labeld.toml(5)`.
pub const EXAMPLE_CONFIG: &str = include_str!("../../config/labeld.toml");

/// The version line of `labeld --version` and of both pages: crate version, git commit, libtorch.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("LABELD_GIT_COMMIT"),
    ", libtorch ",
    env!("LABELD_LIBTORCH_VERSION"),
    ")"
);

/// Writes `DIR/man8/labeld.8` and `DIR/man5/labeld.toml.5`.
pub fn write(cmd: clap::Command, dir: &Path) -> Result<(), Fatal> {
    for (sub, name, page) in [("man8", "labeld.8", labeld_8(cmd)), ("man5", "labeld.toml.5", labeld_toml_5(EXAMPLE_CONFIG))] {
        let folder = dir.join(sub);
        std::fs::create_dir_all(&folder).map_err(|e| Fatal::io(format!("cannot create {}", folder.display()), e))?;
        let file = folder.join(name);
        std::fs::write(&file, page).map_err(|e| Fatal::io(format!("cannot write {}", file.display()), e))?;
    }
    Ok(())
}

/// `roff` text without the apostrophe preamble `Roff::render` puts first, for pages built in parts.
fn body(r: &roff::Roff) -> String {
    let preamble = roff::Roff::new().render();
    let text = r.render();
    text.strip_prefix(&preamble).map(str::to_string).unwrap_or(text)
}
