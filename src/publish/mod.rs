//! Publishing: every row of the results log leaves the box through an MQTT broker, from a durable outbox.

pub mod checkpoint;
pub mod outbox;
