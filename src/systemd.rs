//! Speaking to systemd over `NOTIFY_SOCKET` (`Type=notify`): READY=1 once the model is loaded and
//! every inbox watched, STATUS= with queue depth and images/s, WATCHDOG=1 only while the workers make
//! progress, RELOADING=1 / STOPPING=1. Without `NOTIFY_SOCKET` nothing is sent, but the supervisor
//! still records the images of a stuck worker.

use std::collections::HashSet;
use std::thread::JoinHandle;
use std::time::Duration;

use sd_notify::NotifyState;

use crate::health::{Health, Stall};
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;
use crate::sink::SinkControl;

/// A worker step (one batch's decode, or one forward pass) taking longer than this counts as hung
/// when systemd's watchdog is off; /healthz uses it too.
pub const DEFAULT_STALL: Duration = Duration::from_secs(60);

#[derive(Clone, Copy)]
pub struct Systemd {
    enabled: bool,
}

impl Systemd {
    pub fn from_env() -> Self {
        Systemd { enabled: std::env::var_os("NOTIFY_SOCKET").is_some() }
    }

    fn send(&self, states: &[NotifyState]) {
        if self.enabled {
            if let Err(e) = sd_notify::notify(states) {
                tracing::warn!(error = %e, "cannot notify systemd");
            }
        }
    }

    pub fn ready(&self, status: &str) {
        self.send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    pub fn reloading(&self) {
        match NotifyState::monotonic_usec_now() {
            Ok(now) => self.send(&[NotifyState::Reloading, now]),
            Err(_) => self.send(&[NotifyState::Reloading]),
        }
    }

    pub fn status(&self, status: &str) {
        self.send(&[NotifyState::Status(status)]);
    }

    pub fn stopping(&self) {
        self.send(&[NotifyState::Stopping, NotifyState::Status("stopping: finishing the batch in flight")]);
    }

    /// How long a worker step may take before it counts as hung: half the watchdog interval, so
    /// systemd restarts a hung labeld within about 1.5 intervals; `DEFAULT_STALL` without a watchdog.
    pub fn stall_limit() -> Duration {
        sd_notify::watchdog_enabled().map_or(DEFAULT_STALL, |wd| wd / 2)
    }

    /// Until shutdown: checks that the workers make progress and sends STATUS= (and WATCHDOG=1 while
    /// none is stuck), every watchdog half-interval (at most every second). The images of a stuck step
    /// are handed to the sink at once for an error record, so that after the restart the watchdog
    /// causes they are not tried again.
    pub fn supervise(self, health: Health, metrics: Metrics, sink: SinkControl, shutdown: Shutdown) -> Option<JoinHandle<()>> {
        let watchdog = if self.enabled { sd_notify::watchdog_enabled() } else { None };
        let tick = watchdog.map_or(Duration::from_secs(1), |wd| (wd / 2).min(Duration::from_secs(1)));
        let limit = Self::stall_limit();
        if let Some(wd) = watchdog {
            tracing::info!(interval_ms = wd.as_millis() as u64, hung_after_ms = limit.as_millis() as u64, "systemd watchdog on");
        }
        let spawned = std::thread::Builder::new().name("supervisor".into()).spawn(move || {
            let _line = health.lifeline("supervisor", &shutdown);
            let mut reported: HashSet<(String, u64)> = HashSet::new();
            loop {
                let summary = summary(&metrics);
                let stalls = health.stalls(limit);
                for stall in &stalls {
                    if reported.insert((stall.thread.clone(), stall.since_ms)) {
                        report_hung(stall, &sink);
                    }
                }
                reported.retain(|(t, since)| stalls.iter().any(|s| &s.thread == t && s.since_ms == *since));
                match health.unhealthy(limit, metrics.in_flight()) {
                    None => self.send(&[NotifyState::Watchdog, NotifyState::Status(&summary)]),
                    Some(why) => self.send(&[NotifyState::Status(&format!("{why}; {summary}"))]),
                }
                crossbeam_channel::select! {
                    recv(shutdown.closed()) -> _ => return,
                    default(tick) => {}
                }
            }
        });
        spawned.map_err(|e| tracing::error!(error = %e, "cannot start the supervisor thread")).ok()
    }
}

/// Logs a stuck step and hands its images to the sink, which records each as not labelled.
fn report_hung(stall: &Stall, sink: &SinkControl) {
    let files: Vec<String> = stall.files.iter().map(|j| j.describe()).collect();
    tracing::error!(
        thread = %stall.thread,
        stuck_s = stall.for_.as_secs(),
        images = ?files,
        "a worker is stuck in one step: its images get an error record, and the watchdog ping is withheld so systemd restarts labeld"
    );
    if !stall.files.is_empty() {
        sink.hung(&stall.thread, stall.for_.as_secs(), stall.files.clone());
    }
}

/// "queue 3, 41.2 img/s, 1200 labelled, 2 errors" (+ "; mqtt: connected, lag 0" with `[mqtt]`)
pub fn summary(m: &Metrics) -> String {
    let mut s = format!(
        "queue {}, {:.1} img/s, {} labelled, {} errors",
        m.queue_depth(),
        m.images_per_second(),
        m.images("ok"),
        m.images("error")
    );
    if let Some(mqtt) = m.mqtt() {
        s += "; ";
        s += &mqtt.summary();
    }
    s
}
