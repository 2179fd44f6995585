//! Speaking to systemd over `NOTIFY_SOCKET` (`Type=notify`): READY=1 once the model is loaded and
//! every inbox watched, STATUS= with queue depth and images/s, WATCHDOG=1 only while the workers make
//! progress, RELOADING=1 / STOPPING=1. Without `NOTIFY_SOCKET` every call is a no-op.

use std::thread::JoinHandle;
use std::time::Duration;

use sd_notify::NotifyState;

use crate::health::Health;
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;

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

    /// Sends STATUS= (and WATCHDOG=1 while no worker is stuck) until shutdown.
    pub fn supervise(self, health: Health, metrics: Metrics, shutdown: Shutdown) -> Option<JoinHandle<()>> {
        if !self.enabled {
            return None;
        }
        let watchdog = sd_notify::watchdog_enabled();
        let tick = watchdog.map_or(Duration::from_secs(2), |wd| (wd / 2).min(Duration::from_secs(2)));
        let limit = Self::stall_limit();
        if let Some(wd) = watchdog {
            tracing::info!(interval_ms = wd.as_millis() as u64, hung_after_ms = limit.as_millis() as u64, "systemd watchdog on");
        }
        let spawned = std::thread::Builder::new().name("systemd".into()).spawn(move || {
            let mut was_stuck = false;
            while !shutdown.is_triggered() {
                let summary = summary(&metrics);
                match health.stalled(limit) {
                    None => {
                        if was_stuck {
                            tracing::info!("workers are making progress again");
                            was_stuck = false;
                        }
                        self.send(&[NotifyState::Watchdog, NotifyState::Status(&summary)]);
                    }
                    Some((thread, secs)) => {
                        if !was_stuck {
                            tracing::error!(
                                thread = %thread,
                                stuck_s = secs.as_secs(),
                                "a worker has been stuck in one step too long: withholding the watchdog ping so systemd restarts labeld"
                            );
                            was_stuck = true;
                        }
                        let status = format!("{thread} stuck for {} s; {summary}", secs.as_secs());
                        self.send(&[NotifyState::Status(&status)]);
                    }
                }
                std::thread::sleep(tick);
            }
        });
        spawned.map_err(|e| tracing::error!(error = %e, "cannot start the systemd notifier")).ok()
    }
}

/// "queue 3, 41.2 img/s, 1200 labelled, 2 errors"
pub fn summary(m: &Metrics) -> String {
    format!(
        "queue {}, {:.1} img/s, {} labelled, {} errors",
        m.queue_depth(),
        m.images_per_second(),
        m.images("ok"),
        m.images("error")
    )
}
