//! labeld: labels images as they arrive in inbox folders.
//!
//! The pipeline, in order: `config` → `watch` → `queue` → `infer` → `sink`. Around it: `reload`
//! (SIGHUP), `health` and `systemd` (readiness, watchdog), `http` (metrics, /predict, status page),
//! `memory` (gives pages back after bursts), `progress` (terminal progress bar), `probe` (a container health check's HTTP GET). `app` wires them
//! for each command.

pub mod app;
pub mod backoff;
pub mod beneath;
pub mod config;
pub mod error;
pub mod health;
pub mod http;
pub mod infer;
pub mod job;
pub mod labelled;
pub mod ledger;
pub mod logging;
pub mod manual;
pub mod memory;
pub mod metrics;
pub mod probe;
pub mod progress;
pub mod publish;
pub mod queue;
pub mod reload;
pub mod retain;
pub mod shutdown;
pub mod sink;
pub mod systemd;
pub mod vocab;
pub mod watch;
