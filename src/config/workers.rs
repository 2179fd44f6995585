//! `[workers]`: how many inference workers, with how many threads each, and how batches form. On
//! reload: `max_batch` and `max_delay_ms` apply from the next batch; `count`, `threads` and `queue`
//! at the next restart (`restart_only`).

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::error::ConfigError;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWorkers {
    count: Option<usize>,
    threads: Option<usize>,
    #[serde(default = "default_max_batch")]
    max_batch: usize,
    #[serde(default = "default_max_delay_ms")]
    max_delay_ms: u64,
    #[serde(default = "default_queue")]
    queue: usize,
}

impl Default for RawWorkers {
    fn default() -> Self {
        RawWorkers { count: None, threads: None, max_batch: default_max_batch(), max_delay_ms: default_max_delay_ms(), queue: default_queue() }
    }
}

fn default_max_batch() -> usize {
    8
}
fn default_max_delay_ms() -> u64 {
    20
}
fn default_queue() -> usize {
    1024
}

#[derive(Debug, Clone, PartialEq)]
pub struct WorkersConfig {
    pub count: usize,
    /// Intra-op threads per worker while others may be busy.
    pub threads: usize,
    /// Intra-op threads for a lone image (see `infer::layout`); `threads` when that is set explicitly.
    pub threads_alone: usize,
    pub max_batch: usize,
    pub max_delay: Duration,
    pub queue: usize,
}

impl WorkersConfig {
    /// The keys a reload cannot change in a running process: (count, threads, threads_alone, queue).
    pub fn restart_only(&self) -> (usize, usize, usize, usize) {
        (self.count, self.threads, self.threads_alone, self.queue)
    }

    /// `self` with the restart-only keys of `running`.
    pub fn keeping_restart_only(self, running: &WorkersConfig) -> WorkersConfig {
        WorkersConfig { count: running.count, threads: running.threads, threads_alone: running.threads_alone, queue: running.queue, ..self }
    }

    pub fn describe(&self) -> String {
        let alone = if self.threads_alone != self.threads { format!("   # {} for a lone image", self.threads_alone) } else { String::new() };
        format!(
            "[workers]\ncount = {}\nthreads = {}{alone}\nmax_batch = {}\nmax_delay_ms = {}\nqueue = {}\n",
            self.count,
            self.threads,
            self.max_batch,
            self.max_delay.as_millis(),
            self.queue
        )
    }
}

/// CPUs this process may use: the cgroup CPU quota (v2 `cpu.max`, v1 `cpu.cfs_quota_us`; systemd's
/// CPUQuota= sets it) when one is set, else the CPUs it may run on. The standard library reads both.
pub fn cpu_budget() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

pub(super) fn from_raw(file: &Path, w: RawWorkers) -> Result<WorkersConfig, ConfigError> {
    let err = |key: &str, reason: String| ConfigError::new(file, format!("[workers] {key}"), reason);
    // Two workers overlap one image's decoding with another's inference.
    let count = w.count.unwrap_or(cpu_budget().min(2));
    if count == 0 || count > 64 {
        return Err(err("count", format!("must be 1..=64, got {count}")));
    }
    let threads = w.threads.unwrap_or_else(|| (cpu_budget() / count).max(1));
    let threads_alone = if w.threads.is_some() { threads } else { cpu_budget().max(threads) };
    if threads == 0 || threads > 256 {
        return Err(err("threads", format!("must be 1..=256, got {threads}")));
    }
    if w.max_batch == 0 || w.max_batch > 256 {
        return Err(err("max_batch", format!("must be 1..=256, got {}", w.max_batch)));
    }
    if w.max_delay_ms > 10_000 {
        return Err(err("max_delay_ms", format!("must be at most 10000, got {}", w.max_delay_ms)));
    }
    if w.queue == 0 || w.queue > 1_000_000 {
        return Err(err("queue", format!("must be 1..=1000000, got {}", w.queue)));
    }
    Ok(WorkersConfig { count, threads, threads_alone, max_batch: w.max_batch, max_delay: Duration::from_millis(w.max_delay_ms), queue: w.queue })
}

#[cfg(test)]
mod tests {
    use super::super::tests::{MINIMAL, setup};
    use super::super::*;

    #[test]
    fn out_of_range_numbers_name_their_key() {
        let (_dir, file) = setup();
        for (extra, key) in [
            ("[workers]\nmax_batch = 0\n", "[workers] max_batch"),
            ("[workers]\nqueue = 0\n", "[workers] queue"),
            ("[workers]\ncount = 0\n", "[workers] count"),
        ] {
            let e = Config::parse(&file, &format!("{MINIMAL}{extra}")).unwrap_err();
            assert_eq!(e.key, key, "{e}");
        }
    }

    #[test]
    fn a_reload_keeps_the_running_count_threads_and_queue() {
        let (_dir, file) = setup();
        let running = Config::parse(&file, &format!("{MINIMAL}[workers]\ncount = 1\nthreads = 2\nqueue = 10\n")).unwrap().workers;
        let next = Config::parse(&file, &format!("{MINIMAL}[workers]\ncount = 2\nthreads = 1\nqueue = 20\nmax_batch = 3\n")).unwrap().workers;
        assert_ne!(running.restart_only(), next.restart_only());
        let applied = next.keeping_restart_only(&running);
        assert_eq!(applied.restart_only(), running.restart_only());
        assert_eq!(applied.max_batch, 3);
    }
}
