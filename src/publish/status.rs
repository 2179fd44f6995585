//! How publishing is going, for `/metrics`, the status page and systemd's STATUS line.

use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use crate::metrics::{MqttFigures, PublishReport};

/// Shared between the connection (writes) and whoever reports (reads).
#[derive(Clone, Debug, Default)]
pub struct PublishStatus(Arc<Mutex<State>>);

#[derive(Debug, Default)]
struct State {
    broker: String,
    connected: bool,
    /// When the connection last came up or went down.
    since: Option<SystemTime>,
    last_error: Option<String>,
    published: u64,
    failed: u64,
    connect_failures: u64,
    pending: u64,
    lost_files: u64,
    refused: u64,
}

impl PublishStatus {
    pub fn new(broker: &str) -> Self {
        let s = PublishStatus::default();
        s.with(|st| {
            st.broker = broker.to_string();
            st.since = Some(SystemTime::now());
        });
        s
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub fn connected(&self) {
        self.with(|s| {
            s.connected = true;
            s.since = Some(SystemTime::now());
            s.last_error = None;
        });
    }

    pub fn connect_failed(&self, why: &str) {
        self.with(|s| {
            s.connect_failures += 1;
            s.last_error = Some(why.to_string());
        });
    }

    /// The connection dropped with `unacknowledged` rows in flight (they go again).
    pub fn lost(&self, why: &str, unacknowledged: u64) {
        self.with(|s| {
            s.connected = false;
            s.since = Some(SystemTime::now());
            s.last_error = Some(why.to_string());
            s.failed += unacknowledged;
        });
    }

    pub fn disconnected(&self, why: &str) {
        self.with(|s| {
            s.connected = false;
            s.last_error = Some(why.to_string());
        });
    }

    pub fn stopped(&self) {
        self.with(|s| {
            s.connected = false;
            s.since = Some(SystemTime::now());
        });
    }

    pub fn published(&self, rows: u64) {
        self.with(|s| {
            s.published += rows;
            s.pending = s.pending.saturating_sub(rows);
        });
    }

    pub fn set_pending(&self, rows: u64) {
        self.with(|s| s.pending = rows);
    }

    /// Rows given up because the broker drops the connection whenever they are sent.
    pub fn refused(&self, rows: u64) {
        self.with(|s| s.refused += rows);
    }

    pub fn set_lost_files(&self, files: u64) {
        self.with(|s| s.lost_files = files);
    }
}

impl PublishReport for PublishStatus {
    fn figures(&self) -> MqttFigures {
        self.with(|s| MqttFigures {
            connected: s.connected,
            published: s.published,
            failed: s.failed,
            connect_failures: s.connect_failures,
            pending: s.pending,
            lost_files: s.lost_files,
            refused: s.refused,
        })
    }

    fn summary(&self) -> String {
        self.with(|s| {
            if s.connected {
                format!("mqtt: connected, lag {}", s.pending)
            } else {
                let since = s.since.map(|t| humantime::format_rfc3339_seconds(t).to_string()).unwrap_or_default();
                let why = s.last_error.as_deref().map(|w| format!(" ({w})")).unwrap_or_default();
                format!("mqtt: disconnected since {since}{why}, lag {}", s.pending)
            }
        })
    }

    fn json(&self) -> serde_json::Value {
        self.with(|s| {
            serde_json::json!({
                "broker": s.broker,
                "connected": s.connected,
                "since": s.since.map(|t| humantime::format_rfc3339_seconds(t).to_string()),
                "last_error": s.last_error,
                "published": s.published,
                "failed": s.failed,
                "pending_rows": s.pending,
            })
        })
    }
}
