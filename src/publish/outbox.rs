//! The durable outbox: the CSV results log itself, read from a checkpoint (log generation + byte offset)
//! that moves forward only when the broker has acknowledged the rows before it. Rows are read from the
//! file, never held in memory beyond what is in flight, so a long outage costs disk (the log), not RAM.
//!
//! SKELETON: the API the MQTT connection (`mqtt.rs`) drives. Bodies to be written.

use std::io;
use std::path::{Path, PathBuf};

use crate::sink::record::Record;
use crate::sink::result_log::LogTap;

/// Where a row ends in the outbox: hand it back to [`Outbox::acknowledged`] once the broker has the row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    /// Which log generation (a file, or a file's life between two truncations), in the order written.
    pub generation: u64,
    /// Byte offset just after the row in that generation's file.
    pub offset: u64,
}

/// One row of the log, parsed back (with that generation's own header: old columns stay readable).
#[derive(Debug, Clone)]
pub struct OutRow {
    pub record: Record,
    pub at: Position,
}

pub struct Outbox {
    _private: (),
}

impl Outbox {
    /// Opens the outbox for the log the sink writes (announced through `tap`), with its checkpoint at
    /// `checkpoint`. No checkpoint yet: starts at the end of the log as the sink found it at start (rows
    /// written before publishing was configured are not published; logged once). A checkpoint naming a
    /// generation that was rotated away: that file is found beside the log and read to its end first.
    pub fn open(tap: LogTap, checkpoint: &Path) -> io::Result<Outbox> {
        let _ = (tap, checkpoint);
        todo!()
    }

    /// Up to `max` rows after the last row handed out, in log order; empty when every durable row has
    /// been handed out.
    pub fn next_rows(&mut self, max: usize) -> io::Result<Vec<OutRow>> {
        let _ = max;
        todo!()
    }

    /// Rows handed out but not acknowledged are handed out again (after a disconnect): reading restarts
    /// at the last acknowledged position.
    pub fn rewind(&mut self) {
        todo!()
    }

    /// The broker has the row ending at `at` and every row handed out before it. The checkpoint moves
    /// there (written to disk at most every 100 ms, and by [`Outbox::save`]).
    pub fn acknowledged(&mut self, at: Position) {
        let _ = at;
        todo!()
    }

    /// Writes the checkpoint now if it moved (temp file, fsync, rename, directory fsync).
    pub fn save(&mut self) -> io::Result<()> {
        todo!()
    }

    /// Rows in the log after the checkpoint (handed out or not).
    pub fn pending(&self) -> u64 {
        todo!()
    }

    /// Resolves when the sink has made more rows durable (or at once if some are unread).
    pub async fn changed(&self) {
        todo!()
    }

    pub fn checkpoint_path(&self) -> PathBuf {
        todo!()
    }
}
