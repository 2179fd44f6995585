//! The outbox's ledger: which log generations still hold rows the broker has not acknowledged, where
//! reading and acknowledging stand, how many rows are pending, when the checkpoint is due to be
//! written and when an emptied generation's copy is given up. Decisions only: it is told what the sink
//! announced, what a read found, what the broker acknowledged and what time it is; opening, reading and
//! writing files is the outbox's (`outbox.rs`). Invariant I10 (docs/design.md) lives here: the
//! acknowledged position moves forward only in [`Ledger::acknowledged`], and over generations that
//! hold nothing unacknowledged.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::sink::result_log::Announced;
use crate::vocab::checkpoint::{self, Checkpoint, GenerationMark};

/// The checkpoint is written at most this often while acknowledgements stream in (a generation that
/// begins, ends or is lost is written at once).
pub const SAVE_EVERY: Duration = Duration::from_millis(100);
/// A checkpoint that could not be written is tried again this much later.
pub const SAVE_RETRY: Duration = Duration::from_secs(1);
/// How long an emptied generation's copy (logrotate `copytruncate`) may take to appear beside the log:
/// it is looked for when the emptying is noticed (logrotate copies first), and once more this much later.
pub const COPY_WAIT: Duration = Duration::from_secs(5);

/// Where a row ends in the outbox: hand it back to the outbox's `acknowledged` once the broker has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    /// Which log generation (a file, or a file's life between two truncations), in the order written.
    pub generation: u64,
    /// Byte offset just after the row in that generation's file.
    pub offset: u64,
}

/// Where a generation's bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The outbox holds the file.
    Held,
    /// Emptied in place: its copy is to be looked for beside the log at `look_at`.
    AwaitingCopy { since: Instant, look_at: Instant },
    /// Given up: its unread rows are not published.
    Lost,
}

/// One log generation the outbox still has rows of (or may be asked to read again).
#[derive(Debug, Clone)]
pub struct Generation {
    pub number: u64,
    /// How to find it again after a restart (what goes into the checkpoint).
    pub mark: GenerationMark,
    /// The sink's epoch while this is the file it writes; `None` once the generation has ended.
    pub epoch: Option<u64>,
    /// Where its rows end: what the sink made durable (live), or its final length.
    pub end: u64,
    pub source: Source,
}

/// What the outbox should do next to hand out rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Read rows of generation `number` from byte `from` up to `to`; answer with [`Ledger::read`].
    Read { number: u64, from: u64, to: u64 },
    /// Look for the copy of emptied generation `number`; answer with [`Ledger::copy_found`] or
    /// [`Ledger::copy_missing`].
    FindCopy { number: u64 },
    /// Nothing to hand out now: every durable row is out, or a copy is waited for (see [`Ledger::deadline`]).
    Wait,
}

/// What a sink announcement did to the ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// A generation the ledger did not know; the outbox keeps its file unless it was emptied already.
    New { number: u64, emptied: bool },
    /// The live generation grew.
    Grew,
    /// A generation ended (rotated away); `emptied`: in place, so its file no longer holds its bytes.
    Ended { number: u64, emptied: bool },
}

/// What a read of a generation came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Read {
    /// Reading moved on (rows, or lines passed over).
    Moved,
    /// The live file ends before what the sink made durable: ask the sink's tap whether it was emptied.
    LiveEndsShort,
    /// An ended generation ends in a partial row of this many bytes: it now ends before it.
    PartialTail { bytes: u64 },
}

#[derive(Debug)]
pub struct Ledger {
    /// From the generation of the last acknowledged row to the live one.
    generations: VecDeque<Generation>,
    next_number: u64,
    acked: Position,
    read: Position,
    /// Rows handed out and not yet acknowledged: only their positions, to count what an ack covers.
    in_flight: VecDeque<Position>,
    pending: u64,
    /// The sink's count of rows appended, when `pending` was last brought up to date.
    tap_rows: u64,
    dirty: bool,
    /// What changed is the list of generations: written without waiting for [`SAVE_EVERY`].
    urgent: bool,
    saved_at: Option<Instant>,
    failed_at: Option<Instant>,
    /// When the ledger was made: a checkpoint never written is due since then.
    since: Instant,
    /// [`Ledger::start_at`] has placed the acknowledged position; until then nothing moves it.
    started: bool,
    lost: u64,
}

impl Ledger {
    /// An empty ledger at `now`; `tap_rows` is the sink's count of rows appended so far.
    pub fn new(tap_rows: u64, now: Instant) -> Ledger {
        Ledger {
            generations: VecDeque::new(),
            next_number: 0,
            acked: Position { generation: 0, offset: 0 },
            read: Position { generation: 0, offset: 0 },
            in_flight: VecDeque::new(),
            pending: 0,
            tap_rows,
            dirty: true,
            urgent: true,
            saved_at: None,
            failed_at: None,
            since: now,
            started: false,
            lost: 0,
        }
    }

    /// Adds a generation after the others (at start: one found from the checkpoint or announced).
    pub fn push(&mut self, mark: GenerationMark, epoch: Option<u64>, end: u64, source: Source) -> u64 {
        let number = self.next_number;
        self.next_number += 1;
        self.generations.push_back(Generation { number, mark, epoch, end, source });
        number
    }

    /// A generation of the checkpoint that cannot be found at start: counted lost.
    pub fn lost_at_start(&mut self) {
        self.lost += 1;
        self.urgent_change();
    }

    /// At start: rows up to `at` are acknowledged; reading starts there.
    pub fn start_at(&mut self, at: Position) {
        self.started = true;
        self.acked = at;
        self.generations.retain(|g| g.number >= at.generation);
        self.pass_acknowledged_generations();
        self.read = self.acked;
    }

    pub fn generations(&self) -> impl Iterator<Item = &Generation> {
        self.generations.iter()
    }

    pub fn generation(&self, number: u64) -> Option<&Generation> {
        self.index_of(number).map(|i| &self.generations[i])
    }

    pub fn acked(&self) -> Position {
        self.acked
    }

    /// What the sink announced about one of its files at `now`; `live`: the one it writes now.
    pub fn announced(&mut self, a: &Announced, live: bool, now: Instant) -> Change {
        let Some(i) = self.generations.iter().position(|g| g.epoch == Some(a.epoch)) else {
            let mark = GenerationMark { dev: a.dev, inode: a.inode, fingerprint: a.fingerprint, path: a.path.clone(), len: a.durable };
            let source = if a.emptied { Source::AwaitingCopy { since: now, look_at: now } } else { Source::Held };
            let number = self.push(mark, live.then_some(a.epoch), a.durable, source);
            self.urgent_change();
            self.pass_acknowledged_generations();
            return Change::New { number, emptied: a.emptied };
        };
        let g = &mut self.generations[i];
        g.end = a.durable;
        g.mark.len = a.durable;
        g.mark.path = a.path.clone();
        // While a log is young its fingerprint grows with it. Until it covers a row, the checkpoint
        // could not tell this generation from a later life of the same file (a header is all they
        // share), so a checkpoint naming it is written at once.
        let print_grew = a.fingerprint.is_some() && a.fingerprint != g.mark.fingerprint;
        if a.fingerprint.is_some() {
            g.mark.fingerprint = a.fingerprint;
        }
        if live {
            if print_grew {
                self.urgent_change();
            }
            return Change::Grew;
        }
        g.epoch = None;
        if a.emptied {
            g.source = Source::AwaitingCopy { since: now, look_at: now };
        }
        let number = g.number;
        self.urgent_change();
        self.pass_acknowledged_generations();
        Change::Ended { number, emptied: a.emptied }
    }

    /// The sink has appended `rows` rows in all so far.
    pub fn tap_rows(&mut self, rows: u64) {
        self.pending += rows.saturating_sub(self.tap_rows);
        self.tap_rows = rows;
    }

    /// Rows after the checkpoint (handed out or not), with the sink's count of rows appended now.
    pub fn pending(&self, tap_rows: u64) -> u64 {
        self.pending + tap_rows.saturating_sub(self.tap_rows)
    }

    /// Rows after the checkpoint, counted from the files.
    pub fn set_pending(&mut self, rows: u64) {
        self.pending = rows;
    }

    /// Generations given up on (gone before their rows were published).
    pub fn lost(&self) -> u64 {
        self.lost
    }

    /// What to do next to hand out the rows after the last one handed out, at `now`.
    pub fn next(&mut self, now: Instant) -> Step {
        loop {
            let Some(i) = self.index_of(self.read.generation) else { return Step::Wait };
            let g = &self.generations[i];
            if self.read.offset >= g.end {
                if g.epoch.is_some() {
                    return Step::Wait;
                }
                let Some(next) = self.generations.get(i + 1) else { return Step::Wait };
                self.read = Position { generation: next.number, offset: 0 };
                continue;
            }
            return match g.source {
                Source::Held => Step::Read { number: g.number, from: self.read.offset, to: g.end },
                Source::AwaitingCopy { look_at, .. } if now >= look_at => Step::FindCopy { number: g.number },
                Source::AwaitingCopy { .. } | Source::Lost => Step::Wait,
            };
        }
    }

    /// A read of generation `number` from `from` handed out rows ending at `rows` and stopped at `next`.
    pub fn read(&mut self, number: u64, from: u64, rows: &[u64], next: u64) -> Read {
        let Some(i) = self.index_of(number) else { return Read::Moved };
        if next > from {
            let at = Position { generation: number, offset: from };
            if self.read == at {
                self.read.offset = next;
                self.in_flight.extend(rows.iter().map(|&offset| Position { generation: number, offset }));
                // Only a header or lines passed over, with nothing unacknowledged before them: there is
                // no row there to wait for, and a restart need not look for this file for them.
                if rows.is_empty() && self.in_flight.is_empty() && self.acked == at {
                    self.acked = self.read;
                    self.dirty = true;
                    self.pass_acknowledged_generations();
                }
            }
            return Read::Moved;
        }
        let g = &mut self.generations[i];
        if g.epoch.is_some() {
            return Read::LiveEndsShort;
        }
        let bytes = g.end.saturating_sub(from);
        g.end = from;
        self.pass_acknowledged_generations();
        Read::PartialTail { bytes }
    }

    /// Generation `number`, ended, was found emptied in place at `now` (its file is shorter than its
    /// rows): its copy is to be looked for.
    pub fn emptied(&mut self, number: u64, now: Instant) {
        let Some(i) = self.index_of(number) else { return };
        let g = &mut self.generations[i];
        if g.source == Source::Held && g.epoch.is_none() {
            g.source = Source::AwaitingCopy { since: now, look_at: now };
            self.urgent_change();
        }
    }

    /// The copy of emptied generation `number` was found: its identity, where, and its length.
    pub fn copy_found(&mut self, number: u64, dev: u64, inode: u64, path: std::path::PathBuf, len: u64) {
        let Some(i) = self.index_of(number) else { return };
        let g = &mut self.generations[i];
        (g.mark.dev, g.mark.inode, g.mark.path, g.mark.len, g.end, g.source) = (dev, inode, path, len, len, Source::Held);
        self.urgent_change();
        self.pass_acknowledged_generations();
    }

    /// No copy of emptied generation `number` beside the log at `now`. Within [`COPY_WAIT`] it is
    /// looked for once more at the end of it; after that it is given up: returns the bytes of it not
    /// yet handed out, which are not published.
    pub fn copy_missing(&mut self, number: u64, now: Instant) -> Option<u64> {
        let i = self.index_of(number)?;
        let read = self.read;
        let g = &mut self.generations[i];
        let Source::AwaitingCopy { since, .. } = g.source else { return None };
        if now < since + COPY_WAIT {
            g.source = Source::AwaitingCopy { since, look_at: since + COPY_WAIT };
            return None;
        }
        let unread = if read.generation == number { g.end.saturating_sub(read.offset) } else { g.end };
        (g.source, g.end) = (Source::Lost, 0);
        self.lost += 1;
        self.urgent_change();
        self.pass_acknowledged_generations();
        Some(unread)
    }

    /// Rows handed out but not acknowledged are handed out again (after a disconnect): reading
    /// restarts at the last acknowledged position.
    pub fn rewind(&mut self) {
        self.read = self.acked;
        self.in_flight.clear();
    }

    /// The broker has the row ending at `at` and every row handed out before it. Invariant I10
    /// (docs/design.md): this is the only place the acknowledged position moves forward over rows.
    pub fn acknowledged(&mut self, at: Position) {
        if at <= self.acked {
            return;
        }
        while self.in_flight.front().is_some_and(|p| *p <= at) {
            self.in_flight.pop_front();
            self.pending = self.pending.saturating_sub(1);
        }
        self.acked = at;
        self.generations.retain(|g| g.number >= at.generation);
        self.dirty = true;
        self.pass_acknowledged_generations();
    }

    /// An ended generation whose every row is acknowledged holds nothing for the checkpoint: the
    /// acknowledged position moves to the start of the next one, so that a restart does not look for a
    /// file it has no use for (and does not call it lost when it is gone).
    fn pass_acknowledged_generations(&mut self) {
        while self.started
            && let [first, second, ..] = &self.generations.make_contiguous()[..]
        {
            if first.number != self.acked.generation || first.epoch.is_some() || self.acked.offset < first.end {
                break;
            }
            self.acked = Position { generation: second.number, offset: 0 };
            if self.read < self.acked {
                self.read = self.acked;
            }
            // Rows of a lost generation handed out and not acknowledged: the checkpoint has passed them.
            while self.in_flight.front().is_some_and(|p| *p < self.acked) {
                self.in_flight.pop_front();
                self.pending = self.pending.saturating_sub(1);
            }
            self.generations.pop_front();
            self.dirty = true;
        }
    }

    /// The checkpoint as it should be on disk now.
    pub fn checkpoint(&self) -> Checkpoint {
        Checkpoint {
            version: checkpoint::VERSION,
            generations: self.generations.iter().filter(|g| g.source != Source::Lost).map(|g| g.mark.clone()).collect(),
            offset: self.acked.offset,
        }
    }

    /// Something about the checkpoint on disk is not as last written (removed, replaced): write it.
    pub fn rewrite(&mut self) {
        self.urgent_change();
    }

    pub fn is_dirty(&self) -> bool {
        self.dirty
    }

    /// Whether the checkpoint is to be written at `now`.
    pub fn save_due(&self, now: Instant) -> bool {
        self.save_at().is_some_and(|t| now >= t)
    }

    /// The checkpoint was written at `now`.
    pub fn saved(&mut self, now: Instant) {
        (self.dirty, self.urgent, self.saved_at, self.failed_at) = (false, false, Some(now), None);
    }

    /// Writing the checkpoint failed at `now`.
    pub fn save_failed(&mut self, now: Instant) {
        self.failed_at = Some(now);
    }

    /// When the checkpoint is next due to be written (held back by [`SAVE_EVERY`], or after a failure),
    /// if it has changed.
    pub fn deadline(&self) -> Option<Instant> {
        self.save_at()
    }

    /// When reading may go on without anything else happening: the copy of the emptied generation
    /// being read is to be looked for again.
    pub fn read_deadline(&self) -> Option<Instant> {
        let g = &self.generations[self.index_of(self.read.generation)?];
        match g.source {
            Source::AwaitingCopy { look_at, .. } if self.read.offset < g.end => Some(look_at),
            _ => None,
        }
    }

    fn save_at(&self) -> Option<Instant> {
        if !self.dirty {
            return None;
        }
        let throttled = match self.saved_at {
            Some(t) if !self.urgent => Some(t + SAVE_EVERY),
            _ => None,
        };
        let retry = self.failed_at.map(|t| t + SAVE_RETRY);
        match (throttled, retry) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => Some(a.or(b).unwrap_or_else(|| self.saved_at.unwrap_or(self.since))),
        }
    }

    fn urgent_change(&mut self) {
        self.dirty = true;
        self.urgent = true;
    }

    fn index_of(&self, number: u64) -> Option<usize> {
        self.generations.iter().position(|g| g.number == number)
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::sync::Arc;

    use super::*;

    /// What the sink says about its file `epoch` (inode `epoch` too), `durable` bytes long.
    fn said(epoch: u64, durable: u64, emptied: bool) -> Announced {
        Announced {
            epoch,
            file: Arc::new(std::fs::File::open("/dev/null").unwrap()),
            path: PathBuf::from("/log/results.csv"),
            dev: 1,
            inode: epoch,
            opened_len: 0,
            durable,
            fingerprint: None,
            emptied,
        }
    }

    fn at(generation: u64, offset: u64) -> Position {
        Position { generation, offset }
    }

    /// A ledger on one live file, read up to `read` with rows ending at `rows`.
    fn reading(t0: Instant, rows: &[u64]) -> Ledger {
        let mut l = Ledger::new(0, t0);
        l.announced(&said(0, 10, false), true, t0);
        l.start_at(at(0, 10));
        let end = *rows.last().unwrap();
        l.announced(&said(0, end, false), true, t0);
        l.tap_rows(rows.len() as u64);
        assert_eq!(l.next(t0), Step::Read { number: 0, from: 10, to: end });
        assert_eq!(l.read(0, 10, rows, end), Read::Moved);
        l
    }

    #[test]
    fn the_checkpoint_moves_only_over_acknowledged_rows_and_reading_restarts_there() {
        let t0 = Instant::now();
        let mut l = reading(t0, &[20, 30, 40]);
        assert_eq!((l.next(t0), l.pending(3)), (Step::Wait, 3));
        l.acknowledged(at(0, 20));
        assert_eq!((l.checkpoint().offset, l.pending(3)), (20, 2));
        l.acknowledged(at(0, 15)); // older than what is acknowledged: nothing moves back
        assert_eq!(l.acked(), at(0, 20));
        l.rewind();
        assert_eq!(l.next(t0), Step::Read { number: 0, from: 20, to: 40 });
    }

    #[test]
    fn a_rotated_generation_fully_acknowledged_leaves_the_checkpoint_so_a_restart_does_not_miss_it() {
        let t0 = Instant::now();
        let mut l = reading(t0, &[20, 30]);
        l.acknowledged(at(0, 30));
        assert_eq!(l.checkpoint().generations.len(), 1, "live: its next rows go after offset 30");
        l.announced(&said(0, 30, false), false, t0); // renamed away
        l.announced(&said(1, 10, false), true, t0); // the new file, its header
        assert_eq!(l.acked(), at(1, 0));
        let c = l.checkpoint();
        assert_eq!((c.generations.len(), c.generations[0].inode, c.offset), (1, 1, 0));
        // Its header read, with nothing unacknowledged: no row there to wait for.
        assert_eq!(l.next(t0), Step::Read { number: 1, from: 0, to: 10 });
        assert_eq!(l.read(1, 0, &[], 10), Read::Moved);
        assert_eq!(l.acked(), at(1, 10));
    }

    #[test]
    fn an_emptied_generation_s_copy_is_looked_for_at_once_then_once_more_after_copy_wait_then_given_up() {
        let t0 = Instant::now();
        let mut l = reading(t0, &[20]);
        l.announced(&said(0, 30, true), false, t0); // emptied in place with a row unread
        l.announced(&said(1, 10, false), true, t0);
        assert_eq!(l.next(t0), Step::FindCopy { number: 0 });
        assert_eq!(l.copy_missing(0, t0), None, "not yet given up");
        assert_eq!((l.next(t0), l.read_deadline()), (Step::Wait, Some(t0 + COPY_WAIT)));
        let late = t0 + COPY_WAIT;
        assert_eq!(l.next(late), Step::FindCopy { number: 0 });
        assert_eq!(l.copy_missing(0, late), Some(10), "the unread row's bytes");
        assert_eq!(l.lost(), 1);
        assert_eq!(l.next(late), Step::Read { number: 1, from: 0, to: 10 });
        assert!(l.checkpoint().generations.iter().all(|g| g.inode != 0), "a lost generation is not looked for again");
    }

    #[test]
    fn a_copy_found_is_read_to_its_own_end() {
        let t0 = Instant::now();
        let mut l = reading(t0, &[20]);
        l.announced(&said(0, 30, true), false, t0);
        assert_eq!(l.next(t0), Step::FindCopy { number: 0 });
        l.copy_found(0, 1, 77, PathBuf::from("/log/results.csv.1"), 30);
        assert_eq!(l.next(t0), Step::Read { number: 0, from: 20, to: 30 });
        assert_eq!(l.checkpoint().generations[0].inode, 77);
    }

    #[test]
    fn acknowledgements_are_written_at_most_every_save_every_but_a_new_generation_at_once() {
        let t0 = Instant::now();
        let mut l = reading(t0, &[20, 30, 40]);
        assert!(l.save_due(t0), "never written");
        l.saved(t0);
        assert_eq!(l.deadline(), None, "nothing to write");
        l.acknowledged(at(0, 20));
        assert!(!l.save_due(t0));
        assert_eq!(l.deadline(), Some(t0 + SAVE_EVERY));
        assert!(l.save_due(t0 + SAVE_EVERY));
        l.announced(&said(1, 10, false), true, t0); // a rotation: written at once
        assert!(l.save_due(t0));
        l.save_failed(t0);
        assert_eq!(l.deadline(), Some(t0 + SAVE_RETRY), "a failed write is tried again a second later");
        assert!(!l.save_due(t0 + SAVE_RETRY - Duration::from_millis(1)));
        assert!(l.save_due(t0 + SAVE_RETRY));
    }

    #[test]
    fn a_rotated_generation_ending_in_a_partial_row_ends_before_it() {
        let t0 = Instant::now();
        let mut l = reading(t0, &[20]);
        l.announced(&said(0, 35, false), false, t0);
        l.announced(&said(1, 10, false), true, t0);
        assert_eq!(l.next(t0), Step::Read { number: 0, from: 20, to: 35 });
        assert_eq!(l.read(0, 20, &[], 20), Read::PartialTail { bytes: 15 });
        assert_eq!(l.next(t0), Step::Read { number: 1, from: 0, to: 10 });
    }
}
