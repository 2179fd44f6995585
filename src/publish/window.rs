//! The window of messages handed to the MQTT client and not yet done: which rows the broker has
//! acknowledged, in order. Acknowledgements arrive in any order; the checkpoint may move only over an
//! unbroken run of them from the oldest (invariant I10 in docs/design.md). Decisions only: the time a
//! message was written is given, not read from the clock.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use rumqttc::QoS;

use super::ledger::Position;

/// Messages handed to the client, oldest first: each gets its packet id when the event loop sends it
/// (in the order handed over), and is done when acknowledged (QoS 1/2) or sent (QoS 0).
#[derive(Default)]
pub(super) struct Window {
    entries: VecDeque<Entry>,
}

struct Entry {
    /// The outbox row it carries; `None` for presence messages.
    at: Option<Position>,
    pkid: Option<u16>,
    qos: QoS,
    done: bool,
    /// When the event loop wrote it.
    sent_at: Option<Instant>,
    /// Not sent at all (larger than `max_message_kb`).
    given_up: bool,
}

/// What became acknowledged, in order, from the front of the window.
#[derive(Default, Debug, PartialEq)]
pub(super) struct Released {
    /// Rows the broker acknowledged.
    pub rows: u64,
    /// Rows given up without being sent.
    pub refused: u64,
    pub last: Option<Position>,
    /// A presence message was among them.
    pub presence: bool,
}

impl Window {
    pub fn push(&mut self, at: Option<Position>, qos: QoS) {
        self.entries.push_back(Entry { at, pkid: None, qos, done: false, sent_at: None, given_up: false });
    }

    /// A row that is not sent (too large): done in its place in the order, so the checkpoint can pass it.
    pub fn push_given_up(&mut self, at: Position) {
        self.entries.push_back(Entry { at: Some(at), pkid: None, qos: QoS::AtMostOnce, done: true, sent_at: None, given_up: true });
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn rows_in_flight(&self) -> u64 {
        self.entries.iter().filter(|e| e.at.is_some() && !e.done).count() as u64
    }

    /// The event loop wrote the oldest message not yet written, at `now`, with packet id `pkid`.
    pub fn sent(&mut self, pkid: u16, now: Instant) -> Released {
        if let Some(e) = self.entries.iter_mut().find(|e| e.pkid.is_none() && !(e.done && e.sent_at.is_none())) {
            e.pkid = Some(pkid);
            e.done = e.qos == QoS::AtMostOnce;
            e.sent_at = Some(now);
        }
        self.release()
    }

    pub fn acknowledged(&mut self, pkid: u16) -> Released {
        if let Some(e) = self.entries.iter_mut().find(|e| e.pkid == Some(pkid) && !e.done) {
            e.done = true;
        }
        self.release()
    }

    pub fn release(&mut self) -> Released {
        let mut r = Released::default();
        while let Some(e) = self.entries.pop_front_if(|e| e.done) {
            match e.at {
                Some(at) if e.given_up => {
                    r.refused += 1;
                    r.last = Some(at);
                }
                Some(at) => {
                    r.rows += 1;
                    r.last = Some(at);
                }
                None => r.presence = true,
            }
        }
        r
    }

    pub fn first_row_in_flight(&self) -> Option<Position> {
        self.entries.iter().find(|e| e.at.is_some() && !e.done).and_then(|e| e.at)
    }

    /// The only row in flight, if it was sent less than `within` before `now`.
    pub fn lone_row_sent_within(&self, within: Duration, now: Instant) -> Option<Position> {
        let mut rows = self.entries.iter().filter(|e| e.at.is_some() && !e.done);
        let row = rows.next()?;
        if rows.next().is_some() {
            return None;
        }
        row.sent_at.filter(|t| now.saturating_duration_since(*t) < within).and(row.at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(offset: u64) -> Option<Position> {
        Some(Position { generation: 0, offset })
    }

    #[test]
    fn the_checkpoint_moves_only_over_an_unbroken_run_of_acknowledgements() {
        let t0 = Instant::now();
        let mut w = Window::default();
        w.push(None, QoS::AtLeastOnce); // presence
        for o in [10, 20, 30] {
            w.push(at(o), QoS::AtLeastOnce);
        }
        assert_eq!(w.sent(1, t0), Released::default());
        for pkid in [2, 3, 4] {
            w.sent(pkid, t0);
        }
        // Row 20 acknowledged first: nothing released while the presence message and row 10 wait.
        assert_eq!(w.acknowledged(3), Released::default());
        assert_eq!(w.acknowledged(1), Released { rows: 0, refused: 0, last: None, presence: true });
        assert_eq!(w.acknowledged(2), Released { rows: 2, refused: 0, last: at(20), presence: false });
        assert_eq!(w.rows_in_flight(), 1);
        assert_eq!(w.acknowledged(4), Released { rows: 1, refused: 0, last: at(30), presence: false });
        assert!(w.is_empty());
    }

    #[test]
    fn qos0_rows_are_done_when_sent() {
        let t0 = Instant::now();
        let mut w = Window::default();
        w.push(at(10), QoS::AtMostOnce);
        w.push(at(20), QoS::AtMostOnce);
        assert_eq!(w.sent(0, t0), Released { rows: 1, refused: 0, last: at(10), presence: false });
        assert_eq!(w.sent(0, t0), Released { rows: 1, refused: 0, last: at(20), presence: false });
    }

    #[test]
    fn a_lone_row_just_sent_is_the_suspect_of_a_drop() {
        let t0 = Instant::now();
        let mut w = Window::default();
        w.push(at(10), QoS::AtLeastOnce);
        assert_eq!(w.lone_row_sent_within(Duration::from_secs(1), t0), None, "not sent yet");
        w.sent(1, t0);
        assert_eq!(w.lone_row_sent_within(Duration::from_secs(1), t0), at(10));
        w.push(at(20), QoS::AtLeastOnce);
        w.sent(2, t0);
        assert_eq!(w.lone_row_sent_within(Duration::from_secs(1), t0), None, "two in flight: either could be it");
    }
}
