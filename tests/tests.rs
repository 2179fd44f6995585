//! The integration tests: one crate, one module per area, against the real `labeld` binary on real
//! folders (and, for a few, the library). `common` holds the helpers they share. Run one area with
//! `cargo test --release --test integration <module>::` (e.g. `daemon::`).
//!
//! The inotify watch-limit tests lower machine-wide limits, so they are a crate of their own
//! (`--test watch_limit`): cargo runs test crates one after another, so nothing else is watching then.

mod common;

mod accuracy;
mod broker_harness;
mod cgroup;
mod daemon;
mod decode;
mod docs;
mod hostile_images;
mod hostile_inbox;
mod hostile_links;
mod hostile_models;
mod hostile_names;
mod hostile_output;
mod http;
mod layout;
mod lifecycle;
mod model_optimize;
mod mqtt;
mod onnx;
mod packaging;
mod preprocess_golden;
mod remote;
mod resilience;
mod retention;
mod routes;
mod service;
mod structure;
mod watch_link;
