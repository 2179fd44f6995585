//! The durable outbox: the CSV results log itself, read from a checkpoint (log generation + byte offset)
//! that moves forward only when the broker has acknowledged the rows before it
//! (invariants I9 and I10 in docs/design.md). Rows are read from the
//! file, never held in memory beyond what is in flight, so a long outage costs disk (the log), not RAM.
//!
//! A *generation* is one file's content from its first byte until it is rotated away or emptied in
//! place. The sink announces its generations through a [`LogTap`]; the outbox reads each with its own
//! header (so rows written before a columns change keep their columns), the live one only up to what the
//! sink made durable. A generation that ended while rows in it were unpublished is read to its end
//! before the next: through the handle the sink kept (renamed away), or from logrotate's copy found
//! beside the log by its fingerprint (emptied in place). After a restart the checkpoint names the
//! generations by (dev, inode, fingerprint) and they are found the same way.
//!
//! What to read, what is acknowledged and when the checkpoint is due are the [`Ledger`]'s decisions;
//! this file does the reads, the look-ups beside the log and the checkpoint writes. Every call that
//! needs the time takes it as `now`.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use super::checkpoint;
use super::ledger::{Change, Ledger, Read as ReadOutcome, Source, Step};
pub use super::ledger::Position;
use crate::sink::result_log::{Announced, LogTap};
use crate::vocab::Record;
use crate::vocab::checkpoint::{Checkpoint, GenerationMark};
use crate::vocab::results_log::{Columns, FINGERPRINT_LEN, parse_row};

/// How much of a file its header line may take.
const MAX_HEADER: u64 = 64 * 1024;

/// One row of the log, parsed back (with that generation's own header: old columns stay readable).
#[derive(Debug, Clone)]
pub struct OutRow {
    pub record: Record,
    pub at: Position,
}

/// The file of a generation the ledger holds, and what its header says.
#[derive(Default)]
struct Held {
    /// `None` while an emptied generation's copy is not found yet, and once it is lost.
    file: Option<Arc<File>>,
    columns: Option<Columns>,
    /// Its first line is not one of labeld's headers (said once).
    bad_header: bool,
}

impl Held {
    fn of(file: Option<Arc<File>>) -> Held {
        Held { file, columns: None, bad_header: false }
    }

    /// The columns its header line names (read once, when the header is there).
    fn columns(&mut self, end: u64, path: &Path) -> Option<Columns> {
        if self.columns.is_none() && !self.bad_header {
            let file = self.file.as_ref()?;
            match header_columns(file, end) {
                Header::Columns(c) => self.columns = Some(c),
                Header::NotYet => {}
                Header::Other => {
                    self.bad_header = true;
                    tracing::warn!(csv = %path.display(), "the results log's first line is not a labeld header; its rows cannot be published");
                }
            }
        }
        self.columns
    }
}

pub struct Outbox {
    tap: LogTap,
    checkpoint: PathBuf,
    ledger: Ledger,
    /// The files of the generations in the ledger, by generation number.
    held: BTreeMap<u64, Held>,
    /// (dev, inode, length) of the checkpoint as last written: one removed or changed behind labeld's
    /// back is written again.
    written: Option<(u64, u64, u64)>,
    /// Saving fails (read-only folder…): said once per streak, not at every attempt.
    save_failing: bool,
}

impl Outbox {
    /// Opens the outbox for the log the sink writes (announced through `tap`), with its checkpoint at
    /// `checkpoint`. No checkpoint yet: starts at the end of the log as the sink found it at start (rows
    /// written before publishing was configured are not published; logged once). A checkpoint naming a
    /// generation that was rotated away: that file is found beside the log and read to its end first.
    pub fn open(tap: LogTap, checkpoint: &Path, now: Instant) -> io::Result<Outbox> {
        let view = tap.take();
        let Some(live) = view.live.clone() else {
            return Err(io::Error::other("the results log is not open yet: the outbox is opened after the sink starts"));
        };
        let mut outbox = Outbox {
            tap,
            checkpoint: checkpoint.to_path_buf(),
            ledger: Ledger::new(view.rows, now),
            held: BTreeMap::new(),
            written: None,
            save_failing: false,
        };
        let announced: Vec<Announced> = view.retired.into_iter().chain([live]).collect();
        match load_or_warn(checkpoint) {
            Some(c) => outbox.resume(&c, &announced, now),
            None => outbox.start_fresh(&announced, now),
        }
        outbox.recount()?;
        outbox.save(now)?;
        Ok(outbox)
    }

    /// Up to `max` rows after the last row handed out, in log order; empty when every durable row has
    /// been handed out (or a copy of an emptied log is waited for: see [`Outbox::deadline`]).
    pub fn next_rows(&mut self, max: usize, now: Instant) -> io::Result<Vec<OutRow>> {
        self.sync_tap(now);
        let mut out = Vec::new();
        while out.len() < max {
            match self.ledger.next(now) {
                Step::Wait => break,
                Step::FindCopy { number } => self.find_copy(number, now),
                Step::Read { number, from, to } => {
                    let Some(g) = self.ledger.generation(number) else { break };
                    let (live, path) = (g.epoch, g.mark.path.clone());
                    let held = self.held.entry(number).or_default();
                    let columns = held.columns(to, &path);
                    let Some(file) = held.file.clone() else { break };
                    let mut rows = Vec::new();
                    let next = read_rows(&file, columns, from, to, max - out.len(), |record, offset| {
                        rows.push(OutRow { record, at: Position { generation: number, offset } });
                    })?;
                    // Emptied in place while we read: those bytes may be the next generation's. Read again.
                    if live.is_some() && self.tap.peek().live.map(|l| l.epoch) != live {
                        self.sync_tap(now);
                        continue;
                    }
                    if next == from && live.is_none() && file.metadata()?.len() < to {
                        // Emptied in place before it was rotated away (copytruncate, then a rename with
                        // nothing written between): its rows are in the copy, if anywhere.
                        self.ledger.emptied(number, now);
                        continue;
                    }
                    let ends: Vec<u64> = rows.iter().map(|r| r.at.offset).collect();
                    match self.ledger.read(number, from, &ends, next) {
                        ReadOutcome::Moved => out.extend(rows),
                        ReadOutcome::LiveEndsShort => {
                            // Ends short of what the sink made durable: emptied in place, not written since.
                            if self.tap.check_emptied() {
                                self.sync_tap(now);
                                continue;
                            }
                            break;
                        }
                        ReadOutcome::PartialTail { bytes } => {
                            tracing::warn!(csv = %path.display(), bytes, "a rotated results log ends in a partial row; it is not published");
                        }
                    }
                }
            }
        }
        self.forget_passed();
        Ok(out)
    }

    /// Rows handed out but not acknowledged are handed out again (after a disconnect): reading restarts
    /// at the last acknowledged position.
    pub fn rewind(&mut self) {
        self.ledger.rewind();
    }

    /// The broker has the row ending at `at` and every row handed out before it. The checkpoint moves
    /// there; it is written by [`Outbox::save_if_due`] (at most every 100 ms) or [`Outbox::save`].
    /// Invariant I10 (docs/design.md): see [`Ledger::acknowledged`].
    pub fn acknowledged(&mut self, at: Position) {
        self.ledger.acknowledged(at);
        self.forget_passed();
    }

    /// Writes the checkpoint now if it moved (temp file, fsync, rename, directory fsync).
    pub fn save(&mut self, now: Instant) -> io::Result<()> {
        self.sync_tap(now);
        if !self.ledger.is_dirty() && !self.checkpoint_intact() {
            tracing::warn!(checkpoint = %self.checkpoint.display(), "the MQTT checkpoint was removed or changed behind labeld's back; writing it again");
            self.ledger.rewrite();
        }
        if !self.ledger.is_dirty() {
            return Ok(());
        }
        if let Err(e) = checkpoint::store(&self.checkpoint, &self.ledger.checkpoint()) {
            self.ledger.save_failed(now);
            return Err(e);
        }
        self.ledger.saved(now);
        self.written = std::fs::metadata(&self.checkpoint).ok().map(|m| (m.dev(), m.ino(), m.len()));
        Ok(())
    }

    /// Takes in what the sink announced and writes the checkpoint if the ledger says it is due, with
    /// a failure said once per streak (and its end), not at every attempt.
    pub fn save_if_due(&mut self, now: Instant) {
        self.sync_tap(now);
        if self.ledger.save_due(now) {
            self.save_or_warn(now);
        }
    }

    /// [`Outbox::save`], with a failure said once per streak (and its end), not at every attempt.
    pub fn save_or_warn(&mut self, now: Instant) {
        match self.save(now) {
            Ok(()) if self.save_failing => {
                self.save_failing = false;
                tracing::info!(checkpoint = %self.checkpoint.display(), "the MQTT checkpoint is saved again");
            }
            Ok(()) => {}
            Err(e) if !self.save_failing => {
                self.save_failing = true;
                tracing::warn!(checkpoint = %self.checkpoint.display(), error = %e, "cannot save the MQTT checkpoint; retrying every second (said once): rows since the last saved one are published again after a restart");
            }
            Err(_) => {}
        }
    }

    /// When [`Outbox::save_if_due`] has a checkpoint to write without anything else happening (a write
    /// held back, or one that failed).
    pub fn deadline(&self) -> Option<Instant> {
        self.ledger.deadline()
    }

    /// When [`Outbox::next_rows`] may hand out more without the sink announcing anything (the copy of
    /// an emptied log is to be looked for again).
    pub fn read_deadline(&self) -> Option<Instant> {
        self.ledger.read_deadline()
    }

    /// Rows in the log after the checkpoint (handed out or not).
    pub fn pending(&self) -> u64 {
        self.ledger.pending(self.tap.peek().rows)
    }

    /// Log generations given up on (a rotated file deleted or compressed before its rows were published).
    pub fn lost_generations(&self) -> u64 {
        self.ledger.lost()
    }

    /// The sink's announcements: [`LogTap::changed`] resolves when it made more rows durable or moved to
    /// another file.
    pub fn tap(&self) -> LogTap {
        self.tap.clone()
    }

    pub fn checkpoint_path(&self) -> PathBuf {
        self.checkpoint.clone()
    }

    /// No checkpoint: rows from the end of the log as the sink found it are published.
    fn start_fresh(&mut self, announced: &[Announced], now: Instant) {
        let last = announced[announced.len() - 1].epoch;
        let mut first = None;
        for a in announced {
            let number = self.take_announced(a, a.epoch == last, now);
            first.get_or_insert(number);
        }
        let first = first.unwrap_or_default();
        let opened_len = announced[0].opened_len;
        let path = announced[0].path.clone();
        let mut rows = 0u64;
        let held = self.held.entry(first).or_default();
        if let Some(file) = held.file.clone() {
            let columns = held.columns(opened_len, &path);
            if let Err(e) = read_rows(&file, columns, 0, opened_len, usize::MAX, |_, _| rows += 1) {
                tracing::warn!(csv = %path.display(), error = %e, "cannot count the rows already in the results log");
            }
        }
        tracing::info!(csv = %path.display(), "publishing rows written from now on; {rows} earlier rows in {} are not published", path.display());
        self.ledger.start_at(Position { generation: first, offset: opened_len });
    }

    /// Finds the checkpoint's generations (the sink's open files first, then beside the log); the
    /// sink's generations after them follow.
    fn resume(&mut self, c: &Checkpoint, announced: &[Announced], now: Instant) {
        let live_path = announced[announced.len() - 1].path.clone();
        let last_epoch = announced[announced.len() - 1].epoch;
        let writing: Vec<(u64, u64)> = announced.iter().map(|a| (a.dev, a.inode)).collect();
        let mut used = 0;
        let mut first_found = None;
        for (i, mark) in c.generations.iter().enumerate() {
            // A later generation of the same file: this one is an earlier life of it, emptied in place,
            // whose rows can only be in a copy (the file's first bytes, a header, say nothing).
            let emptied = c.generations[i + 1..].iter().any(|m| (m.dev, m.inode) == (mark.dev, mark.inode));
            // Only the checkpoint's last generation can be the file the sink writes now: one before it
            // has ended, and a file at the log's path with its inode is a new file that reuses it.
            let last = i + 1 == c.generations.len();
            let held = announced[used..].iter().position(|a| {
                !emptied
                    && (last || a.epoch != last_epoch)
                    && a.dev == mark.dev
                    && a.inode == mark.inode
                    && !a.emptied
                    && mark.fingerprint.is_none_or(|f| f.matches(&a.file, a.durable))
            });
            let number = if let Some(j) = held {
                let a = &announced[used + j];
                used += j + 1;
                let mut m = GenerationMark { dev: a.dev, inode: a.inode, fingerprint: a.fingerprint, path: a.path.clone(), len: a.durable };
                m.fingerprint = a.fingerprint.or(mark.fingerprint);
                let number = self.ledger.push(m, (a.epoch == last_epoch).then_some(a.epoch), a.durable, Source::Held);
                self.held.insert(number, Held::of(Some(a.file.clone())));
                number
            } else if let Some((path, file)) = find_beside(mark, &live_path, emptied, &writing) {
                let Ok(meta) = file.metadata() else { continue };
                tracing::info!(csv = %path.display(), "unpublished rows in a rotated results log: published first");
                let len = meta.len();
                let m = GenerationMark { dev: meta.dev(), inode: meta.ino(), fingerprint: mark.fingerprint, path, len };
                let number = self.ledger.push(m, None, len, Source::Held);
                self.held.insert(number, Held::of(Some(Arc::new(file))));
                number
            } else {
                let unpublished = if i == 0 { mark.len.saturating_sub(c.offset) } else { mark.len };
                tracing::error!(csv = %mark.path.display(), bytes = unpublished, "a results log with unpublished rows is gone (deleted, compressed, or moved out of its folder or renamed to a name not starting with the log's name, before it was published); those rows are not published");
                self.ledger.lost_at_start();
                continue;
            };
            first_found.get_or_insert((i, number));
        }
        let mut first_announced = None;
        for a in &announced[used..] {
            let number = self.take_announced(a, a.epoch == last_epoch, now);
            first_announced.get_or_insert(number);
        }
        let at = match first_found {
            Some((0, number)) => Position { generation: number, offset: c.offset },
            Some((_, number)) => Position { generation: number, offset: 0 },
            None => Position { generation: first_announced.unwrap_or_default(), offset: 0 },
        };
        self.ledger.start_at(at);
        self.forget_passed();
    }

    /// Hands one announcement to the ledger and keeps the file of a generation new to it.
    fn take_announced(&mut self, a: &Announced, live: bool, now: Instant) -> u64 {
        match self.ledger.announced(a, live, now) {
            Change::New { number, emptied } => {
                self.held.insert(number, Held::of((!emptied).then(|| a.file.clone())));
                number
            }
            Change::Ended { number, emptied } => {
                if emptied && let Some(h) = self.held.get_mut(&number) {
                    h.file = None;
                }
                number
            }
            Change::Grew => 0,
        }
    }

    /// Takes in what the sink announced since the last look: new durable ends, ended and new generations.
    fn sync_tap(&mut self, now: Instant) {
        let view = self.tap.take();
        let live_epoch = view.live.as_ref().map(|l| l.epoch);
        for a in view.retired.iter().chain(view.live.as_ref()) {
            self.take_announced(a, Some(a.epoch) == live_epoch, now);
        }
        self.ledger.tap_rows(view.rows);
    }

    /// Looks for the copy of emptied generation `number` beside the log; gives it up when the ledger says so.
    fn find_copy(&mut self, number: u64, now: Instant) {
        let live_path = self.ledger.generations().last().map(|g| g.mark.path.clone()).unwrap_or_default();
        let Some(g) = self.ledger.generation(number) else { return };
        let mark = g.mark.clone();
        let writing: Vec<(u64, u64)> = self.ledger.generations().filter(|g| g.epoch.is_some()).map(|g| (g.mark.dev, g.mark.inode)).collect();
        if let Some((path, file)) = find_beside(&mark, &live_path, true, &writing) {
            tracing::info!(csv = %path.display(), "rows of the results log emptied by copytruncate: published from its copy");
            let meta = file.metadata().ok();
            let len = meta.as_ref().map_or(0, |m| m.len());
            let (dev, inode) = meta.map_or((mark.dev, mark.inode), |m| (m.dev(), m.ino()));
            self.held.insert(number, Held::of(Some(Arc::new(file))));
            self.ledger.copy_found(number, dev, inode, path, len);
            return;
        }
        if let Some(bytes) = self.ledger.copy_missing(number, now) {
            tracing::error!(
                csv = %mark.path.display(),
                bytes,
                "the results log was emptied in place (copytruncate) and no copy of it is beside it; its unpublished rows are not published"
            );
            if let Err(e) = self.recount() {
                tracing::warn!(error = %e, "cannot count the rows left to publish");
            }
        }
    }

    /// Counts the rows after the checkpoint, reading them from the files.
    fn recount(&mut self) -> io::Result<()> {
        let acked = self.ledger.acked();
        let mut rows = 0u64;
        let gens: Vec<(u64, u64, PathBuf, bool)> =
            self.ledger.generations().map(|g| (g.number, g.end, g.mark.path.clone(), g.source == Source::Held)).collect();
        for (number, end, path, readable) in gens {
            let from = if number == acked.generation { acked.offset } else { 0 };
            let held = self.held.entry(number).or_default();
            let columns = held.columns(end, &path);
            if let (Some(file), true, true) = (held.file.clone(), readable, from < end) {
                read_rows(&file, columns, from, end, usize::MAX, |_, _| rows += 1)?;
            }
        }
        self.ledger.set_pending(rows);
        Ok(())
    }

    /// Lets go of the files of generations the ledger no longer holds.
    fn forget_passed(&mut self) {
        let first = self.ledger.generations().next().map_or(u64::MAX, |g| g.number);
        self.held.retain(|n, _| *n >= first);
    }

    /// The ledger's generations, for a failing test to show.
    #[cfg(test)]
    pub(super) fn describe(&self) -> String {
        let gens: Vec<String> = self
            .ledger
            .generations()
            .map(|g| format!("#{} epoch {:?} end {} {:?} ino {}", g.number, g.epoch, g.end, g.source, g.mark.inode))
            .collect();
        format!("acked {:?}; {}", self.ledger.acked(), gens.join("; "))
    }

    /// Whether the checkpoint file is still the one last written (not removed, replaced or truncated).
    fn checkpoint_intact(&self) -> bool {
        let Some(written) = self.written else { return true };
        std::fs::metadata(&self.checkpoint).is_ok_and(|m| (m.dev(), m.ino(), m.len()) == written)
    }
}


/// The checkpoint, or `None` (start fresh) when there is none or it cannot be used; a bad one is kept
/// beside as `<name>.bad` for the operator.
fn load_or_warn(path: &Path) -> Option<Checkpoint> {
    match checkpoint::load(path) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "outbox checkpoint unusable");
            let bad = path.with_file_name(format!("{}.bad", path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()));
            if std::fs::rename(path, &bad).is_ok() {
                tracing::warn!(kept = %bad.display(), "the unusable checkpoint was kept here");
            }
            tracing::warn!(
                checkpoint = %path.display(),
                "PUBLISHING RESTARTS FROM THE END OF THE RESULTS LOG: rows not published before this start are not published"
            );
            None
        }
    }
}

/// A file beside the log (or where `mark` was last seen) that holds `mark`'s generation: the same
/// (dev, inode) and first bytes (renamed away), else the same first bytes (a copy). Regular files only,
/// links are not followed; names start with the log's file stem. `other_inode`: the mark's own inode is
/// not it (it was emptied in place). Never a file the sink writes (`writing`): those are matched by
/// the caller, and the live log starts with the same header as every copy. A copy is known by its first bytes only if they hold a row: every
/// log starts with the same header, so a generation fingerprinted with nothing but its header is known
/// by its length too.
fn find_beside(mark: &GenerationMark, live: &Path, other_inode: bool, writing: &[(u64, u64)]) -> Option<(PathBuf, File)> {
    let mut candidates = Vec::new();
    for place in [mark.path.as_path(), live] {
        let (Some(dir), Some(stem)) = (place.parent(), place.file_stem()) else { continue };
        let stem = stem.to_string_lossy().into_owned();
        let Ok(entries) = std::fs::read_dir(if dir.as_os_str().is_empty() { Path::new(".") } else { dir }) else { continue };
        for entry in entries.flatten() {
            let path = entry.path();
            let named = entry.file_name().to_string_lossy().starts_with(&stem);
            let Ok(meta) = std::fs::symlink_metadata(&path) else { continue };
            if named && meta.is_file() && !candidates.iter().any(|(p, _): &(PathBuf, _)| *p == path) {
                candidates.push((path, meta));
            }
        }
    }
    let same_inode = |m: &std::fs::Metadata| m.dev() == mark.dev && m.ino() == mark.inode;
    let writes = |m: &std::fs::Metadata| writing.contains(&(m.dev(), m.ino()));
    let by_inode = candidates.iter().filter(|(_, m)| !other_inode && same_inode(m) && !writes(m));
    let by_content = candidates.iter().filter(|(_, m)| !same_inode(m) && !writes(m) && mark.fingerprint.is_some());
    for (path, meta) in by_inode.chain(by_content) {
        let Ok(file) = OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(path) else { continue };
        let Ok(now) = file.metadata() else { continue };
        if now.dev() != meta.dev() || now.ino() != meta.ino() {
            continue;
        }
        let copy = !same_inode(&now);
        if mark.fingerprint.is_none_or(|f| f.matches(&file, now.len()) && (!copy || names_a_row(&file, f.len) || now.len() == f.len)) {
            return Some((path.clone(), file));
        }
    }
    None
}

/// Whether the first `len` bytes of `file` hold a whole line after the header.
fn names_a_row(file: &File, len: u64) -> bool {
    let mut head = vec![0; len.min(FINGERPRINT_LEN) as usize];
    file.read_exact_at(&mut head, 0).is_ok() && head.iter().filter(|b| **b == b'\n').count() >= 2
}

enum Header {
    Columns(Columns),
    /// The first line is not complete yet.
    NotYet,
    Other,
}

/// What `file`'s first line says about its rows.
fn header_columns(file: &File, available: u64) -> Header {
    let mut head = Vec::new();
    let limit = available.min(MAX_HEADER);
    if (ReadAt { file, pos: 0, end: limit }).read_to_end(&mut head).is_err() {
        return Header::NotYet;
    }
    let Some(end) = head.iter().position(|b| *b == b'\n') else {
        return if limit < MAX_HEADER { Header::NotYet } else { Header::Other };
    };
    match std::str::from_utf8(&head[..end]).ok().and_then(Columns::from_header) {
        Some(c) => Header::Columns(c),
        None => Header::Other,
    }
}

/// Parses rows of `file` from byte `from` up to `end`, giving each (at most `max`) with the offset just
/// after it to `each`; returns where reading stopped. Lines that do not parse are passed over; a last
/// row without its line end is not a row yet.
fn read_rows(file: &File, columns: Option<Columns>, from: u64, end: u64, max: usize, mut each: impl FnMut(Record, u64)) -> io::Result<u64> {
    let source = ReadAt { file, pos: from, end };
    let mut reader = csv::ReaderBuilder::new().has_headers(false).flexible(true).buffer_capacity(64 * 1024).from_reader(source);
    let mut row = csv::StringRecord::new();
    let (mut next, mut taken) = (from, 0);
    while taken < max {
        let result = reader.read_record(&mut row);
        let at = from + reader.position().byte();
        match result {
            Ok(false) => break,
            Ok(true) => {
                if at == reader.get_ref().pos && !ends_a_line(file, at)? {
                    break;
                }
                next = at;
                if let Some(record) = columns.and_then(|c| parse_row(c, &row)) {
                    each(record, at);
                    taken += 1;
                }
            }
            Err(e) if e.is_io_error() => return Err(io::Error::other(format!("cannot read the results log: {e}"))),
            // A line that is not CSV (bytes that are not UTF-8): passed over, never a stop.
            Err(_) => next = at,
        }
    }
    Ok(next)
}

fn ends_a_line(file: &File, at: u64) -> io::Result<bool> {
    let mut last = [0u8];
    Ok(at > 0 && file.read_at(&mut last, at - 1)? == 1 && last[0] == b'\n')
}

/// Reads `file` from `pos` up to `end` with positioned reads (the sink's handle is shared: no seeking).
struct ReadAt<'a> {
    file: &'a File,
    pos: u64,
    end: u64,
}

impl Read for ReadAt<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = usize::try_from(self.end.saturating_sub(self.pos)).unwrap_or(usize::MAX).min(buf.len());
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use super::super::ledger::{COPY_WAIT, SAVE_EVERY};
    use crate::vocab::{Identity, Status, Top};
    use crate::sink::result_log::ResultLog;
    use std::io::Write;
    use std::time::Duration;

    fn rec(i: usize) -> Record {
        Record {
            path: format!("/in/{i}, \"x\".jpg"),
            time: "2026-11-29T06:00:00.000Z".into(),
            model: "m".into(),
            engine: None,
            status: Status::Ok,
            top: Some(vec![Top { rank: 1, class_id: i % 1000, label: "cock".into(), label_en: None, score: 0.5 }]),
            confident: None,
            latency_ms: 1.5,
            error: None,
            file: Some(Identity { dev: 1, inode: i as u64, size: 3, mtime_ns: 4, ctime_ns: 5, xxh3: None }),
            route: None,
        }
    }

    fn recs(r: std::ops::Range<usize>) -> Vec<Record> {
        r.map(rec).collect()
    }

    /// A box: its log folder, the sink's log (through a tap) and the outbox's checkpoint.
    struct Place {
        _dir: tempfile::TempDir,
        csv: PathBuf,
        checkpoint: PathBuf,
    }

    impl Place {
        fn new() -> Place {
            let dir = tempfile::tempdir().unwrap();
            let csv = dir.path().join("results.csv");
            let checkpoint = dir.path().join("outbox.json");
            Place { _dir: dir, csv, checkpoint }
        }

        /// A (re)started labeld: the sink's log, then the outbox on it.
        fn start(&self) -> (ResultLog, Outbox) {
            self.start_with(Columns::plain(1))
        }

        fn start_with(&self, columns: Columns) -> (ResultLog, Outbox) {
            let tap = LogTap::new();
            let log = ResultLog::open_tapped(&self.csv, columns, Some(tap.clone())).unwrap();
            (log, Outbox::open(tap, &self.checkpoint, Instant::now()).unwrap())
        }

        fn beside(&self, name: &str) -> PathBuf {
            self.csv.with_file_name(name)
        }
    }

    /// Every row the outbox hands out now, `max` at a time, acknowledged as they come.
    fn publish_all(outbox: &mut Outbox, max: usize) -> Vec<OutRow> {
        publish_all_at(outbox, max, Instant::now())
    }

    fn publish_all_at(outbox: &mut Outbox, max: usize, now: Instant) -> Vec<OutRow> {
        let mut all = Vec::new();
        loop {
            let rows = outbox.next_rows(max, now).unwrap();
            let Some(last) = rows.last() else { return all };
            outbox.acknowledged(last.at);
            all.extend(rows);
        }
    }

    fn numbers(rows: &[OutRow]) -> Vec<usize> {
        rows.iter().map(|r| r.record.path[4..].split(',').next().unwrap().parse().unwrap()).collect()
    }

    #[test]
    fn rows_come_out_in_order_resume_after_the_last_ack_and_again_after_rewind() {
        let place = Place::new();
        // Rows written before publishing was configured are not published.
        ResultLog::open(&place.csv, Columns::plain(1)).unwrap().append(&recs(100..103)).unwrap();
        let (mut log, mut outbox) = place.start();
        assert_eq!((outbox.pending(), outbox.next_rows(10, Instant::now()).unwrap().len()), (0, 0));
        log.append(&recs(0..10)).unwrap();
        assert_eq!(outbox.pending(), 10);
        let first = outbox.next_rows(4, Instant::now()).unwrap();
        assert_eq!(numbers(&first), [0, 1, 2, 3]);
        assert_eq!(first[0].record, rec(0), "parsed back as written");
        assert!(first.windows(2).all(|w| w[0].at < w[1].at));
        outbox.acknowledged(first[1].at);
        assert_eq!(outbox.pending(), 8);
        assert_eq!(numbers(&outbox.next_rows(2, Instant::now()).unwrap()), [4, 5]);
        outbox.rewind();
        let again = outbox.next_rows(100, Instant::now()).unwrap();
        assert_eq!(numbers(&again), [2, 3, 4, 5, 6, 7, 8, 9]);
        outbox.acknowledged(again[2].at);
        outbox.save(Instant::now()).unwrap();
        drop((log, outbox));

        let (mut log, mut outbox) = place.start();
        assert_eq!(outbox.pending(), 5);
        log.append(&recs(10..12)).unwrap();
        assert_eq!(numbers(&publish_all(&mut outbox, 3)), [5, 6, 7, 8, 9, 10, 11]);
        assert_eq!(outbox.pending(), 0);
    }

    #[test]
    fn a_line_that_does_not_parse_is_passed_over() {
        let place = Place::new();
        let (mut log, mut outbox) = place.start();
        log.append(&recs(0..2)).unwrap();
        OpenOptions::new().append(true).open(&place.csv).unwrap().write_all(b"\xff\xfe,junk\nnot,a,row\n").unwrap();
        log.append(&recs(2..4)).unwrap();
        assert_eq!(numbers(&publish_all(&mut outbox, 1)), [0, 1, 2, 3]);
        assert_eq!(outbox.pending(), 0);
    }

    #[test]
    fn a_kill_replays_only_rows_after_the_last_saved_checkpoint_and_skips_none() {
        let place = Place::new();
        let (mut log, mut outbox) = place.start();
        log.append(&recs(0..10)).unwrap();
        let rows = outbox.next_rows(100, Instant::now()).unwrap();
        let later = Instant::now() + SAVE_EVERY;
        outbox.acknowledged(rows[2].at);
        outbox.save_if_due(later); // saved: the last save (at open) is SAVE_EVERY old
        for r in &rows[3..7] {
            outbox.acknowledged(r.at);
            outbox.save_if_due(later + Duration::from_millis(10)); // within SAVE_EVERY of that save: in memory only
        }
        assert!(outbox.deadline().is_some_and(|d| d == later + SAVE_EVERY), "the held-back save has its time");
        drop((log, outbox)); // kill -9: no save
        let (_log, mut outbox) = place.start();
        assert_eq!(numbers(&publish_all(&mut outbox, 100)), (3..10).collect::<Vec<_>>());
    }

    #[test]
    fn rows_left_in_a_renamed_away_log_come_first_once() {
        let place = Place::new();
        let (mut log, mut outbox) = place.start();
        log.append(&recs(0..5)).unwrap();
        let handed = outbox.next_rows(2, Instant::now()).unwrap();
        outbox.acknowledged(handed[1].at);
        std::fs::rename(&place.csv, place.beside("results.csv.1")).unwrap();
        log.reopen().unwrap(); // SIGHUP after logrotate `create`
        log.append(&recs(5..8)).unwrap();
        let rest = publish_all(&mut outbox, 2);
        assert_eq!(numbers(&rest), [2, 3, 4, 5, 6, 7]);
        assert!(rest[2].at.generation < rest[3].at.generation);
        assert_eq!(outbox.pending(), 0);
        outbox.save(Instant::now()).unwrap();
        drop((log, outbox));
        let (_log, mut outbox) = place.start();
        assert!(publish_all(&mut outbox, 10).is_empty(), "nothing twice");
    }

    #[test]
    fn logs_rotated_during_an_outage_are_remembered_by_save_and_survive_a_kill() {
        let place = Place::new();
        let (mut log, mut outbox) = place.start();
        log.append(&recs(0..3)).unwrap();
        // The broker is down: nothing is read; the log is rotated twice (`create` + SIGHUP).
        for (r, keep) in [(3..5, false), (5..7, true)] {
            if keep {
                std::fs::rename(place.beside("results.csv.1"), place.beside("results.csv.2")).unwrap();
            }
            std::fs::rename(&place.csv, place.beside("results.csv.1")).unwrap();
            log.reopen().unwrap();
            log.append(&recs(r)).unwrap();
        }
        // The publisher's periodic save, also while disconnected: without it the middle log is not
        // in the checkpoint and its rows are not found after the kill.
        outbox.save(Instant::now()).unwrap();
        drop((log, outbox)); // kill -9
        let (_log, mut outbox) = place.start();
        assert_eq!(outbox.pending(), 7);
        assert_eq!(numbers(&publish_all(&mut outbox, 2)), [0, 1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn a_log_rotated_while_stopped_is_found_beside_and_read_to_its_end() {
        let place = Place::new();
        let (mut log, mut outbox) = place.start();
        log.append(&recs(0..5)).unwrap();
        let handed = outbox.next_rows(2, Instant::now()).unwrap();
        outbox.acknowledged(handed[1].at);
        outbox.save(Instant::now()).unwrap();
        drop((log, outbox));
        std::fs::rename(&place.csv, place.beside("results.csv-20261129")).unwrap();
        let (mut log, mut outbox) = place.start();
        log.append(&recs(5..8)).unwrap();
        assert_eq!(outbox.pending(), 6);
        assert_eq!(numbers(&publish_all(&mut outbox, 4)), [2, 3, 4, 5, 6, 7]);
        assert_eq!(outbox.lost_generations(), 0);
    }

    #[test]
    fn rows_not_yet_read_when_the_log_is_emptied_in_place_come_from_the_copy() {
        let place = Place::new();
        let (mut log, mut outbox) = place.start();
        log.append(&recs(0..5)).unwrap();
        assert_eq!(numbers(&outbox.next_rows(2, Instant::now()).unwrap()), [0, 1]);
        // logrotate `copytruncate`: copy, then empty the live file; the sink goes on writing to it.
        std::fs::copy(&place.csv, place.beside("results.csv.1")).unwrap();
        OpenOptions::new().write(true).open(&place.csv).unwrap().set_len(0).unwrap();
        log.append(&recs(5..8)).unwrap();
        let rest = publish_all(&mut outbox, 100);
        assert_eq!(numbers(&rest), [2, 3, 4, 5, 6, 7]);
        assert_eq!(rest[3].record, rec(5));
        outbox.save(Instant::now()).unwrap();
        drop((log, outbox));
        let (_log, mut outbox) = place.start();
        assert!(publish_all(&mut outbox, 10).is_empty(), "nothing twice");
    }

    #[test]
    fn a_log_emptied_in_place_while_idle_is_read_from_the_copy_without_waiting_for_the_sink() {
        let place = Place::new();
        let (mut log, mut outbox) = place.start();
        log.append(&recs(0..5)).unwrap();
        let handed = outbox.next_rows(2, Instant::now()).unwrap();
        std::fs::copy(&place.csv, place.beside("results.csv.1")).unwrap();
        OpenOptions::new().write(true).open(&place.csv).unwrap().set_len(0).unwrap();
        // A disconnect: the two rows handed out before are read again, from the copy.
        outbox.rewind();
        let again = publish_all(&mut outbox, 100);
        assert_eq!(numbers(&again), [0, 1, 2, 3, 4]);
        assert_eq!(again[1].at, handed[1].at, "same positions as before the rotation");
        log.append(&recs(5..7)).unwrap();
        assert_eq!(numbers(&publish_all(&mut outbox, 100)), [5, 6]);
        let l = std::fs::read_to_string(&place.csv).unwrap();
        assert!(l.starts_with("time,") && l.lines().count() == 3, "{l}");
    }

    #[test]
    fn a_log_emptied_in_place_then_reopened_on_sighup_is_a_new_generation() {
        let place = Place::new();
        let (mut log, mut outbox) = place.start();
        log.append(&recs(0..5)).unwrap();
        assert_eq!(numbers(&outbox.next_rows(2, Instant::now()).unwrap()), [0, 1]);
        std::fs::copy(&place.csv, place.beside("results.csv.1")).unwrap();
        OpenOptions::new().write(true).open(&place.csv).unwrap().set_len(0).unwrap();
        log.reopen().unwrap(); // a postrotate `kill -HUP`: the same file, its header written again
        log.append(&recs(5..7)).unwrap();
        assert_eq!(numbers(&publish_all(&mut outbox, 100)), [2, 3, 4, 5, 6]);
    }

    #[test]
    fn a_log_emptied_in_place_while_stopped_is_read_from_the_copy() {
        let place = Place::new();
        let (mut log, mut outbox) = place.start();
        log.append(&recs(0..5)).unwrap();
        let handed = outbox.next_rows(2, Instant::now()).unwrap();
        outbox.acknowledged(handed[1].at);
        outbox.save(Instant::now()).unwrap();
        drop((log, outbox));
        std::fs::copy(&place.csv, place.beside("results.csv.1")).unwrap();
        OpenOptions::new().write(true).open(&place.csv).unwrap().set_len(0).unwrap();
        let (mut log, mut outbox) = place.start();
        log.append(&recs(5..7)).unwrap();
        assert_eq!(numbers(&publish_all(&mut outbox, 100)), [2, 3, 4, 5, 6]);
        assert_eq!(outbox.lost_generations(), 0);
    }

    #[test]
    fn rows_written_before_a_columns_change_keep_their_columns() {
        let place = Place::new();
        let tap = LogTap::new();
        let mut log = ResultLog::open_tapped(&place.csv, Columns::plain(1), Some(tap.clone())).unwrap();
        let mut outbox = Outbox::open(tap.clone(), &place.checkpoint, Instant::now()).unwrap();
        log.append(&recs(0..3)).unwrap();
        // A reload with another top_k: the old log is set aside by rename, a new one started.
        let wide = Columns { top_k: 3, english: false, confident: true, route: false };
        let mut log = ResultLog::open_tapped(&place.csv, wide, log.tap()).unwrap();
        let mut r = rec(3);
        r.confident = Some(true);
        log.append(std::slice::from_ref(&r)).unwrap();
        let rows = publish_all(&mut outbox, 100);
        assert_eq!(numbers(&rows), [0, 1, 2, 3]);
        assert_eq!(rows[0].record, rec(0));
        assert_eq!(rows[3].record, r);
    }

    #[test]
    fn a_corrupt_checkpoint_starts_afresh_and_is_kept_aside() {
        let place = Place::new();
        std::fs::write(&place.checkpoint, b"{\"version\": 1, \"generati").unwrap();
        let (mut log, mut outbox) = place.start();
        log.append(&recs(0..3)).unwrap();
        assert_eq!(numbers(&publish_all(&mut outbox, 100)), [0, 1, 2]);
        assert!(place.beside("outbox.json.bad").exists());
        assert!(checkpoint::load(&place.checkpoint).unwrap().is_some(), "a fresh checkpoint replaced it");
    }

    #[test]
    fn a_rotated_log_deleted_while_stopped_is_counted_lost_and_publishing_goes_on() {
        let place = Place::new();
        let (mut log, mut outbox) = place.start();
        log.append(&recs(0..5)).unwrap();
        let handed = outbox.next_rows(2, Instant::now()).unwrap();
        outbox.acknowledged(handed[1].at);
        outbox.save(Instant::now()).unwrap();
        drop((log, outbox));
        std::fs::rename(&place.csv, place.beside("results.csv.1")).unwrap();
        std::fs::remove_file(place.beside("results.csv.1")).unwrap();
        let (mut log, mut outbox) = place.start();
        assert_eq!(outbox.lost_generations(), 1);
        log.append(&recs(5..8)).unwrap();
        assert_eq!(numbers(&publish_all(&mut outbox, 100)), [5, 6, 7]);
    }

    #[test]
    fn a_log_emptied_in_place_without_a_copy_is_given_up_after_a_wait_not_waited_for_forever() {
        let place = Place::new();
        let (mut log, mut outbox) = place.start();
        log.append(&recs(0..5)).unwrap();
        let t0 = Instant::now();
        outbox.next_rows(2, t0).unwrap();
        OpenOptions::new().write(true).open(&place.csv).unwrap().set_len(0).unwrap();
        log.append(&recs(5..7)).unwrap();
        assert!(outbox.next_rows(100, t0).unwrap().is_empty(), "the copy may still appear");
        let again = outbox.read_deadline().expect("a time to look for the copy again");
        assert!(again >= t0 + COPY_WAIT && again <= Instant::now() + COPY_WAIT, "{:?}", again - t0);
        assert!(outbox.next_rows(100, again - Duration::from_millis(1)).unwrap().is_empty(), "not given up before");
        assert_eq!(numbers(&publish_all_at(&mut outbox, 100, again)), [5, 6]);
        assert_eq!((outbox.lost_generations(), outbox.pending()), (1, 0));
        assert_eq!(outbox.read_deadline(), None);
    }

    #[test]
    fn the_tap_wakes_the_publisher_when_rows_become_durable_and_keeps_a_wake_up_until_taken() {
        use std::future::Future;
        use std::task::{Context, Poll, Waker};
        let place = Place::new();
        let (mut log, mut outbox) = place.start();
        let tap = outbox.tap();
        // Polled once: whether a wake-up is there now, without waiting for one.
        let woken = || matches!(std::pin::pin!(tap.changed()).poll(&mut Context::from_waker(Waker::noop())), Poll::Ready(()));
        woken(); // the sink's open
        assert!(!woken(), "nothing new");
        log.append(&recs(0..1)).unwrap();
        assert!(woken(), "a row made durable");
        assert!(!woken(), "taken");
        log.append(&recs(1..3)).unwrap();
        log.append(&recs(3..4)).unwrap();
        assert!(woken(), "kept while nobody waited");
        assert_eq!(numbers(&outbox.next_rows(10, Instant::now()).unwrap()), [0, 1, 2, 3]);
        std::fs::rename(&place.csv, place.beside("results.csv.1")).unwrap();
        log.reopen().unwrap();
        assert!(woken(), "a new file");
    }

    #[test]
    fn a_backlog_of_100000_rows_is_read_from_the_file() {
        let place = Place::new();
        let (mut log, outbox) = place.start();
        for b in 0..100 {
            log.append(&recs(b * 1000..(b + 1) * 1000)).unwrap();
        }
        assert_eq!(outbox.pending(), 100_000);
        drop(outbox);
        let opened = Instant::now();
        let mut outbox = Outbox::open(log.tap().unwrap(), &place.checkpoint, Instant::now()).unwrap();
        let open_s = opened.elapsed().as_secs_f64();
        assert_eq!(outbox.pending(), 100_000, "counted from the file at open");
        let hwm = || std::fs::read_to_string("/proc/self/status").unwrap_or_default().lines().find(|l| l.starts_with("VmHWM")).map(String::from);
        let before = hwm();
        let started = Instant::now();
        let mut next = 0;
        loop {
            let rows = outbox.next_rows(100, Instant::now()).unwrap();
            let Some(last) = rows.last() else { break };
            assert_eq!(numbers(&rows), (next..next + rows.len()).collect::<Vec<_>>());
            next += rows.len();
            outbox.acknowledged(last.at);
        }
        eprintln!("open (counting the backlog) {open_s:.2} s; 100000 rows out in {:.2} s; peak RSS before {before:?}, after {:?}", started.elapsed().as_secs_f64(), hwm());
        assert_eq!((next, outbox.pending()), (100_000, 0));
    }
}
