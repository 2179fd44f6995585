//! A progress bar with images/s on stderr, for `classify` and `run --once` over a backlog; only when
//! stderr is a terminal.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressState, ProgressStyle};

/// A bar, or `None` when stderr is not a terminal (services, pipes, tests).
pub fn bar(total: Option<u64>) -> Option<ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let pb = ProgressBar::new(total.unwrap_or(0));
    let style = ProgressStyle::with_template("{bar:32.cyan/blue} {pos}/{len} images  {rate}  eta {eta}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .with_key("rate", |s: &ProgressState, w: &mut dyn std::fmt::Write| {
            let _ = write!(w, "{:.1} img/s", s.per_sec());
        })
        .progress_chars("█▉▊▋▌▍▎▏ ");
    pb.set_style(style);
    pb.enable_steady_tick(Duration::from_millis(200));
    Some(pb)
}
