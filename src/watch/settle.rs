//! The settle timer: files that arrived without a close-after-write event (hard links, polling, some
//! network copies, files still changing at start-up) are ready once their size and mtime have held
//! still for the inbox's `settle_ms`. A decision only: it is told what a path looks like and what time
//! it is, and answers which paths are due and when to look again; the stat and the end-marker read
//! are the caller's (`look.rs`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

/// What a look at a path saw (never through a link).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    File { len: u64, mtime: Option<SystemTime> },
    Folder,
    /// A link, FIFO, socket or device (its kind, for the log).
    Other(&'static str),
    Gone,
}

/// A file whose settle time is over but whose format says it is cut short may be a writer pausing
/// between chunks: it gets ten settle intervals, and at least this long, before it is labelled as broken.
const MIN_PATIENCE: Duration = Duration::from_secs(5);
/// A file still changing, or waiting for its end marker, is looked at again no sooner than this.
const MIN_RECHECK: Duration = Duration::from_millis(100);

/// Files waiting for their size and mtime to stop changing.
#[derive(Default)]
pub struct Settler {
    pending: HashMap<PathBuf, Pending>,
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    len: u64,
    mtime: Option<SystemTime>,
    /// Since when size and mtime have been as above.
    since: Instant,
    settle: Duration,
    /// When to look at it next.
    check_at: Instant,
}

impl Pending {
    fn new(len: u64, mtime: Option<SystemTime>, settle: Duration, now: Instant) -> Pending {
        Pending { len, mtime, since: now, settle, check_at: now + settle }
    }

    fn patience(&self) -> Duration {
        (self.settle * 10).max(MIN_PATIENCE)
    }

    fn recheck_after(&self) -> Duration {
        self.settle.max(MIN_RECHECK)
    }
}

/// What became of a path whose check time came.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// Unchanged for its settle interval: ready (it has left the settler).
    Due,
    /// Still changing, or not looked at yet: it stays.
    Waiting,
    /// Unchanged for its settle interval, but within its patience: ready only if the format's end
    /// marker is there. Answer with [`Settler::end_marker`].
    EndMarker,
    /// Gone, or no longer a regular file: it has left the settler.
    Dropped,
}

impl Settler {
    /// Notes activity on `path`, seen as `seen` at `now`: a file whose size or mtime differ from what
    /// was noted starts its quiet time again; anything that is not a regular file leaves.
    pub fn observe(&mut self, path: PathBuf, seen: Seen, settle: Duration, now: Instant) {
        let Seen::File { len, mtime } = seen else {
            self.pending.remove(&path);
            return;
        };
        let entry = self.pending.entry(path).or_insert_with(|| Pending::new(len, mtime, settle, now));
        if entry.len != len || entry.mtime != mtime {
            *entry = Pending::new(len, mtime, settle, now);
        }
    }

    pub fn forget(&mut self, path: &Path) {
        self.pending.remove(path);
    }

    /// Forgets everything at and under `dir` (a folder that left the inbox).
    pub fn forget_under(&mut self, dir: &Path) {
        self.pending.retain(|p, _| !p.starts_with(dir));
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// When the earliest pending path is to be looked at: the deadline its owner waits for.
    pub fn next_check(&self) -> Option<Instant> {
        self.pending.values().map(|p| p.check_at).min()
    }

    /// The paths to look at now (their check time came), each to be answered with [`Settler::check`].
    pub fn to_check(&self, now: Instant) -> Vec<PathBuf> {
        self.pending.iter().filter(|(_, p)| p.check_at <= now).map(|(path, _)| path.clone()).collect()
    }

    /// Decides on `path` from a fresh look at it.
    pub fn check(&mut self, path: &Path, seen: Seen, now: Instant) -> Check {
        let Some(p) = self.pending.get_mut(path) else { return Check::Dropped };
        let Seen::File { len, mtime } = seen else {
            self.pending.remove(path);
            return Check::Dropped;
        };
        if len != p.len || mtime != p.mtime {
            *p = Pending { check_at: now + p.recheck_after(), ..Pending::new(len, mtime, p.settle, now) };
            return Check::Waiting;
        }
        let quiet = now.saturating_duration_since(p.since);
        if quiet < p.settle {
            p.check_at = p.since + p.settle;
            return Check::Waiting;
        }
        if quiet < p.patience() {
            return Check::EndMarker;
        }
        self.pending.remove(path);
        Check::Due
    }

    /// The answer to [`Check::EndMarker`]: `complete` is whether the file's end marker is there
    /// (`None`: its format has none to check). Returns whether the path is due (it has then left).
    pub fn end_marker(&mut self, path: &Path, complete: Option<bool>, now: Instant) -> bool {
        let Some(p) = self.pending.get_mut(path) else { return false };
        if complete == Some(false) {
            p.check_at = (now + p.recheck_after()).min(p.since + p.patience()).max(now);
            return false;
        }
        self.pending.remove(path);
        true
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;

    const SETTLE: Duration = Duration::from_millis(200);

    fn file(len: u64, mtime_ms: u64) -> Seen {
        Seen::File { len, mtime: Some(SystemTime::UNIX_EPOCH + Duration::from_millis(mtime_ms)) }
    }

    #[test]
    fn a_file_is_due_once_its_size_and_mtime_held_still_for_settle() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let p = PathBuf::from("/in/a.jpg");
        let mut s = Settler::default();
        s.observe(p.clone(), file(2, 0), SETTLE, at(0));
        assert_eq!(s.next_check(), Some(at(200)));
        assert!(s.to_check(at(199)).is_empty());
        // Still growing when looked at: the quiet time starts again.
        assert_eq!(s.to_check(at(200)), [p.clone()]);
        assert_eq!(s.check(&p, file(4, 150), at(200)), Check::Waiting);
        assert_eq!(s.next_check(), Some(at(400)));
        // An event in between that sees the same size and mtime does not restart it.
        s.observe(p.clone(), file(4, 150), SETTLE, at(300));
        assert_eq!(s.check(&p, file(4, 150), at(400)), Check::EndMarker);
        assert!(s.end_marker(&p, None, at(400)));
        assert!(s.is_empty() && s.next_check().is_none());
    }

    #[test]
    fn a_file_cut_short_waits_for_its_end_marker_within_its_patience() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let p = PathBuf::from("/in/a.jpg");
        let mut s = Settler::default();
        s.observe(p.clone(), file(2, 0), SETTLE, at(0));
        assert_eq!(s.check(&p, file(2, 0), at(200)), Check::EndMarker);
        assert!(!s.end_marker(&p, Some(false), at(200)));
        assert_eq!(s.next_check(), Some(at(400)), "looked at again one settle interval later");
        assert_eq!(s.check(&p, file(2, 0), at(4_900)), Check::EndMarker);
        assert!(!s.end_marker(&p, Some(false), at(4_900)));
        assert_eq!(s.next_check(), Some(at(5_000)), "no later than the end of its patience");
        assert_eq!(s.check(&p, file(2, 0), at(5_000)), Check::Due, "labelled as broken then");
    }

    #[test]
    fn a_file_that_vanishes_or_turns_into_something_else_leaves() {
        let now = Instant::now();
        let mut s = Settler::default();
        let (a, b, c) = (PathBuf::from("/in/a.jpg"), PathBuf::from("/in/sub/b.jpg"), PathBuf::from("/in/c.jpg"));
        for p in [&a, &b, &c] {
            s.observe(p.clone(), file(1, 0), Duration::ZERO, now);
        }
        assert_eq!(s.check(&a, Seen::Gone, now), Check::Dropped);
        assert_eq!(s.check(&c, Seen::Other("FIFO"), now), Check::Dropped);
        s.forget_under(Path::new("/in/sub"));
        assert!(s.is_empty());
        s.observe(a.clone(), Seen::Other("symbolic link (not followed)"), SETTLE, now);
        assert!(s.is_empty(), "never noted");
    }

    /// A seeded xorshift generator: the model test's runs are the same at every run.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    /// A file in the simulated inbox.
    #[derive(Debug, Clone, Copy)]
    struct SimFile {
        len: u64,
        mtime_ms: u64,
        /// Its end marker is there.
        complete: bool,
        /// Not a regular file (replaced by a FIFO or link).
        other: bool,
        /// When its size or mtime last changed (simulated clock, ms).
        changed_ms: u64,
    }

    /// Random writes (with or without an event), mtime changes, deletions, replacement by a FIFO,
    /// folders leaving and time passing, against what must hold: a path is due only while it is a
    /// regular file that has not changed for its settle interval (and, cut short, for its patience);
    /// never twice without activity in between; and once activity stops, every file noted and still
    /// there is due within its patience.
    #[test]
    fn model_random_activity_against_what_must_hold() {
        let paths: Vec<PathBuf> = ["/in/a.jpg", "/in/b.png", "/in/sub/c.jpg", "/in/sub/d.gif"].iter().map(PathBuf::from).collect();
        for seed in 1..=500u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
            let t0 = Instant::now();
            let settle = Duration::from_millis([0, 50, 200, 1_000][rng.below(4) as usize]);
            let patience = (settle * 10).max(MIN_PATIENCE).as_millis() as u64;
            let mut s = Settler::default();
            let mut fs: BTreeMap<PathBuf, SimFile> = BTreeMap::new();
            // Paths the settler was told about, still there as they were noted or changed silently
            // since: each must become due.
            let mut noted: BTreeSet<PathBuf> = BTreeSet::new();
            let mut now_ms = 0u64;
            let mut trace = Vec::new();
            let seen = |fs: &BTreeMap<PathBuf, SimFile>, p: &Path| match fs.get(p) {
                None => Seen::Gone,
                Some(f) if f.other => Seen::Other("FIFO"),
                Some(f) => Seen::File { len: f.len, mtime: Some(SystemTime::UNIX_EPOCH + Duration::from_millis(f.mtime_ms)) },
            };
            // The watcher's loop: wakes at the settler's deadline and looks at what is to be checked.
            let run_until = |s: &mut Settler, fs: &BTreeMap<PathBuf, SimFile>, noted: &mut BTreeSet<PathBuf>, now_ms: &mut u64, until: u64, trace: &mut Vec<String>| {
                loop {
                    let next = s.next_check().map(|t| t.duration_since(t0).as_millis() as u64);
                    match next {
                        Some(n) if n <= until => *now_ms = (*now_ms).max(n),
                        _ => break,
                    }
                    let now = t0 + Duration::from_millis(*now_ms);
                    let checked = s.to_check(now);
                    assert!(!checked.is_empty(), "seed {seed}: woken at its deadline with nothing to check\n{trace:#?}");
                    for p in checked {
                        let due = match s.check(&p, seen(fs, &p), now) {
                            Check::Due => true,
                            Check::EndMarker => s.end_marker(&p, fs.get(&p).map(|f| f.complete), now),
                            Check::Waiting | Check::Dropped => false,
                        };
                        if due {
                            trace.push(format!("{now_ms} due {}", p.display()));
                            let f = fs.get(&p).copied();
                            let f = f.unwrap_or_else(|| panic!("seed {seed}: a deleted file is due\n{trace:#?}"));
                            assert!(!f.other, "seed {seed}: a FIFO is due\n{trace:#?}");
                            let quiet = *now_ms - f.changed_ms;
                            assert!(quiet >= settle.as_millis() as u64, "seed {seed}: due after {quiet} ms quiet\n{trace:#?}");
                            assert!(f.complete || quiet >= patience, "seed {seed}: cut short and due after {quiet} ms\n{trace:#?}");
                            assert!(noted.remove(&p), "seed {seed}: due twice, or after it was deleted\n{trace:#?}");
                        }
                    }
                }
                *now_ms = (*now_ms).max(until);
            };
            for _ in 0..60 {
                let p = paths[rng.below(paths.len() as u64) as usize].clone();
                let now = t0 + Duration::from_millis(now_ms);
                match rng.below(8) {
                    0..=2 => {
                        // A write: the file grows; with an event (the settler is told) or without.
                        let f = fs.entry(p.clone()).or_insert(SimFile { len: 0, mtime_ms: 0, complete: false, other: false, changed_ms: now_ms });
                        f.len += 1 + rng.below(100);
                        f.mtime_ms = now_ms;
                        f.complete = rng.below(3) > 0;
                        f.other = false;
                        f.changed_ms = now_ms;
                        let event = rng.below(4) > 0 || !noted.contains(&p);
                        trace.push(format!("{now_ms} write {} event={event}", p.display()));
                        if event {
                            s.observe(p.clone(), seen(&fs, &p), settle, now);
                            noted.insert(p);
                        }
                    }
                    3 => {
                        // Only the mtime moves (`touch`), no event.
                        if let Some(f) = fs.get_mut(&p) {
                            f.mtime_ms = now_ms + 1;
                            f.changed_ms = now_ms;
                            trace.push(format!("{now_ms} touch {}", p.display()));
                        }
                    }
                    4 => {
                        // Deleted, the event seen or lost.
                        fs.remove(&p);
                        noted.remove(&p);
                        if rng.below(2) == 0 {
                            s.forget(&p);
                        }
                        trace.push(format!("{now_ms} delete {}", p.display()));
                    }
                    5 => {
                        if let Some(f) = fs.get_mut(&p) {
                            f.other = true;
                            f.changed_ms = now_ms;
                            noted.remove(&p);
                            trace.push(format!("{now_ms} fifo {}", p.display()));
                        }
                    }
                    6 if rng.below(4) == 0 => {
                        // The sub-folder moved out of the inbox: its files are no longer ours.
                        let sub = Path::new("/in/sub");
                        fs.retain(|q, _| !q.starts_with(sub));
                        s.forget_under(sub);
                        noted.retain(|q| !q.starts_with(sub));
                        trace.push(format!("{now_ms} folder left"));
                    }
                    _ => {
                        let step = rng.below(1_500);
                        trace.push(format!("{now_ms} +{step} ms"));
                        let until = now_ms + step;
                        run_until(&mut s, &fs, &mut noted, &mut now_ms, until, &mut trace);
                    }
                }
            }
            // Quiet from now on: everything still noted and still a regular file is due within its patience.
            let end = now_ms + patience + settle.as_millis() as u64 + MIN_RECHECK.as_millis() as u64;
            run_until(&mut s, &fs, &mut noted, &mut now_ms, end, &mut trace);
            let left: Vec<_> = noted.iter().collect();
            assert!(left.is_empty(), "seed {seed}: never due: {left:?}\n{trace:#?}");
            assert!(s.is_empty(), "seed {seed}: the settler still holds {} paths", s.len());
        }
    }
}
