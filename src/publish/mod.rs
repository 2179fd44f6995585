//! Publishing: every row of the results log leaves the box through an MQTT broker. The log itself is the
//! outbox (`outbox`), read from a checkpoint that moves only when the broker has acknowledged a row; the
//! connection (`mqtt`) runs on its own thread, so labelling never waits for the broker.

pub mod checkpoint;
pub mod ledger;
pub mod message;
pub mod mqtt;
pub mod outbox;
#[cfg(test)]
mod outbox_model;
pub mod status;
mod window;

use std::thread::JoinHandle;
use std::time::Duration;

use crate::config::Config;
use crate::error::Fatal;
use crate::health::Lifeline;
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;
use crate::sink::result_log::LogTap;
use message::Messages;
use mqtt::{Drain, Settings};
use outbox::Outbox;
use status::PublishStatus;

/// The publishing stage: owns the outbox and the broker connection's thread.
pub struct Publisher {
    handle: JoinHandle<()>,
    stop: Shutdown,
    status: PublishStatus,
}

impl Publisher {
    /// With `[mqtt]`: opens the outbox on the log the sink writes (announced through `tap`) and starts
    /// publishing from its checkpoint. `once`: a clean stop publishes until caught up.
    pub fn start(config: &Config, tap: LogTap, metrics: &Metrics, lifeline: Lifeline, once: bool) -> Result<Option<Publisher>, Fatal> {
        let Some(m) = &config.mqtt else { return Ok(None) };
        let outbox = Outbox::open(tap, &m.checkpoint, std::time::Instant::now()).map_err(|e| {
            Fatal::io(format!("cannot open the MQTT outbox checkpoint {} ([mqtt] checkpoint)", m.checkpoint.display()), e)
        })?;
        let status = PublishStatus::new(&m.url);
        status.set_pending(outbox.pending());
        metrics.observe_mqtt(std::sync::Arc::new(status.clone()));
        let settings = Settings {
            mqtt: m.clone(),
            messages: Messages::new(m, &config.inboxes),
            model: config.model.name.clone(),
            precision: config.model.precision.as_str().to_string(),
            drain: if once { Drain::UntilCaughtUp(Duration::from_secs(5)) } else { Drain::For(Duration::from_secs(2)) },
        };
        let stop = Shutdown::new();
        let (thread_stop, thread_status) = (stop.clone(), status.clone());
        let handle = std::thread::Builder::new()
            .name("publisher".into())
            .spawn(move || {
                let _line = lifeline;
                let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot start the publisher's runtime; nothing is published");
                        return;
                    }
                };
                runtime.block_on(mqtt::run(outbox, settings, thread_status, thread_stop));
            })
            .map_err(|e| Fatal::io("cannot start the publisher thread", e))?;
        Ok(Some(Publisher { handle, stop, status }))
    }

    /// After the sink has written its last row: publishes what it can within the drain rule, says
    /// offline, saves the checkpoint.
    pub fn finish(self) -> PublishStatus {
        self.stop.trigger();
        if self.handle.join().is_err() {
            tracing::error!("the publisher thread panicked; unpublished rows stay in the outbox");
        }
        self.status
    }
}
