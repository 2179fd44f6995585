//! The words every stage uses, at the bottom of the crate: it imports no other module of labeld. A
//! file version's identity, the record of one image's result (sidecar, CSV row, MQTT message), where a
//! sidecar goes, the results log's columns and rows, and the outbox checkpoint's format.

pub mod checkpoint;
pub mod identity;
pub mod record;
pub mod results_log;
pub mod sidecar;

pub use identity::Identity;
pub use record::{Record, Routed, Status, Top};
pub use sidecar::{sidecar_name, sidecar_path};
