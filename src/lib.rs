//! labeld: labels images as they arrive in inbox folders.
//!
//! The pipeline, in order: `config` → `watch` → `queue` → `infer` → `sink`. `app` wires the stages
//! for each command.

pub mod app;
pub mod config;
pub mod error;
pub mod infer;
pub mod metrics;
pub mod queue;
pub mod shutdown;
pub mod sink;
pub mod watch;
