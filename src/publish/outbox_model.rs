//! The outbox against a model, on real files with a simulated clock: random appends (rows made durable
//! by the sink's own writer), rotations (rename + new file), copytruncate, truncation without a copy,
//! deletion of rotated files and copies, rows handed out and acknowledged in and out of order through
//! the publisher's window, disconnects, checkpoint writes, crashes and clean restarts. What must hold:
//!
//! - rows are handed out in log order: after a row, the next one handed out is the next row, unless
//!   the rows between are in a generation whose file was destroyed (deleted, or emptied with no copy);
//! - after a disconnect, a clean restart or a crash, no row after the last acknowledged one is skipped
//!   (the checkpoint never passes an unacknowledged row), and a crash replays nothing before the last
//!   checkpoint written for sure;
//! - once nothing is destroyed any more, every durable row is handed out at least once, except rows of
//!   destroyed generations;
//! - a loss is reported only for a destroyed generation, at most once across restarts, and at least
//!   once when rows were lost.
//!
//! The publisher's loop is mirrored: after rows are handed out or acknowledged, or the sink appended,
//! the outbox is given the chance to write its checkpoint (`save_if_due`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use rumqttc::QoS;

use super::ledger::{COPY_WAIT, Position};
use super::outbox::Outbox;
use super::window::Window;
use crate::vocab::{Identity, Record, Status, Top};
use crate::sink::result_log::{LogTap, ResultLog};
use crate::vocab::results_log::Columns;

/// A seeded xorshift generator: every run makes the same sequences.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

fn rec(id: usize) -> Record {
    Record {
        path: format!("/in/{id}.jpg"),
        time: "2026-11-29T06:00:00.000Z".into(),
        model: "m".into(),
        engine: None,
        status: Status::Ok,
        top: Some(vec![Top { rank: 1, class_id: id % 1000, label: "x".into(), label_en: None, score: 0.5 }]),
        confident: None,
        latency_ms: 1.0,
        error: None,
        file: Some(Identity { dev: 1, inode: id as u64, size: 3, mtime_ns: 4, ctime_ns: 5, xxh3: None }),
        route: None,
    }
}

fn id_of(r: &Record) -> usize {
    r.path[4..r.path.len() - 4].parse().unwrap()
}

/// One generation of the log as the model knows it.
#[derive(Default)]
struct Gen {
    ids: Vec<usize>,
    /// Its bytes became unreachable (file deleted, or emptied with no copy).
    destroyed: bool,
}

/// What the next row handed out must be: at or after `from`, and no row from `keep` on skipped unless
/// its generation was destroyed. Exact (`from == keep`) while the outbox's acknowledged row is known;
/// after a crash it lies between the last checkpoint written for sure and the last acknowledgement.
#[derive(Debug, Clone, Copy)]
struct Expect {
    from: usize,
    keep: usize,
}

impl Expect {
    fn exactly(from: usize) -> Expect {
        Expect { from, keep: from }
    }
}

struct World {
    _dir: tempfile::TempDir,
    csv: PathBuf,
    checkpoint: PathBuf,
    log: Option<ResultLog>,
    outbox: Option<Outbox>,
    now: Instant,
    next_id: usize,
    gens: Vec<Gen>,
    /// Which generation each row is in.
    gen_of: BTreeMap<usize, usize>,
    /// Rotated files and copies beside the log, with the generation each holds.
    beside: BTreeMap<PathBuf, usize>,
    names: usize,
    handed: BTreeSet<usize>,
    /// Where the outbox's acknowledged position is: after row `acked.0` at least, `acked.1` at most
    /// (`None`: before the first row). Known exactly but after a crash.
    acked: (Option<usize>, Option<usize>),
    /// The least the outbox's acknowledged position was when a checkpoint was last written for sure
    /// (explicit save, clean restart).
    saved: Option<usize>,
    expect: Expect,
    window: Window,
    pkids: Vec<(u16, Position, usize)>,
    next_pkid: u16,
    by_position: BTreeMap<Position, usize>,
    reported: u64,
    trace: Vec<String>,
}

impl World {
    fn new(now: Instant) -> World {
        // In memory where there is a tmpfs: what is tested is the logic, and fsyncs are most of the time.
        let shm = std::path::Path::new("/dev/shm");
        let dir = if shm.is_dir() { tempfile::tempdir_in(shm) } else { tempfile::tempdir() }.unwrap();
        let csv = dir.path().join("results.csv");
        let checkpoint = dir.path().join("outbox.json");
        let mut w = World {
            _dir: dir,
            csv,
            checkpoint,
            log: None,
            outbox: None,
            now,
            next_id: 0,
            gens: vec![Gen::default()],
            gen_of: BTreeMap::new(),
            beside: BTreeMap::new(),
            names: 0,
            handed: BTreeSet::new(),
            acked: (None, None),
            saved: None,
            expect: Expect::exactly(0),
            window: Window::default(),
            pkids: Vec::new(),
            next_pkid: 1,
            by_position: BTreeMap::new(),
            reported: 0,
            trace: Vec::new(),
        };
        w.start();
        w
    }

    fn fail(&self, what: &str) -> ! {
        let gens: Vec<String> = self.gens.iter().enumerate().map(|(i, g)| format!("gen {i}: {:?}{}", g.ids, if g.destroyed { " destroyed" } else { "" })).collect();
        let beside: Vec<String> = self.beside.iter().map(|(p, g)| format!("{} holds gen {g}", p.display())).collect();
        let mut files: Vec<String> = std::fs::read_dir(self.csv.parent().unwrap())
            .unwrap()
            .map(|e| {
                let p = e.unwrap().path();
                let text = std::fs::read_to_string(&p).unwrap_or_default();
                let ids: Vec<&str> = text.lines().skip(1).filter_map(|l| l.split(',').nth(1)).collect();
                format!("{}: {} bytes, {ids:?}", p.display(), text.len())
            })
            .collect();
        files.sort();
        panic!("{what}\n{}\n{}\n{}\n{}", self.trace.join("\n"), gens.join("\n"), beside.join("\n"), files.join("\n"))
    }

    fn start(&mut self) {
        let tap = LogTap::new();
        self.log = Some(ResultLog::open_tapped(&self.csv, Columns::plain(1), Some(tap.clone())).unwrap());
        self.outbox = Some(Outbox::open(tap, &self.checkpoint, self.now).unwrap());
        self.window = Window::default();
        self.pkids.clear();
        self.by_position.clear();
    }

    fn outbox(&mut self) -> &mut Outbox {
        self.outbox.as_mut().unwrap()
    }

    fn live(&self) -> usize {
        self.gens.len() - 1
    }

    fn destroyed(&self, id: usize) -> bool {
        self.gen_of.get(&id).is_some_and(|g| self.gens[*g].destroyed)
    }

    /// What comes after a rewind to the outbox's acknowledged position.
    fn after_acked(&self) -> Expect {
        let next = |a: Option<usize>| a.map_or(0, |a| a + 1);
        Expect { from: next(self.acked.0), keep: next(self.acked.1) }
    }

    fn append(&mut self, n: usize) {
        let ids: Vec<usize> = (self.next_id..self.next_id + n).collect();
        self.next_id += n;
        self.log.as_mut().unwrap().append(&ids.iter().map(|&i| rec(i)).collect::<Vec<_>>()).unwrap();
        let live = self.live();
        for &id in &ids {
            self.gen_of.insert(id, live);
        }
        self.gens[live].ids.extend(ids);
        let now = self.now;
        self.outbox().save_if_due(now);
    }

    fn destroy(&mut self, g: usize) {
        self.gens[g].destroyed = true;
    }

    /// Hands out up to `max` rows into the window, checking their order.
    fn publish(&mut self, max: usize) -> usize {
        let now = self.now;
        let rows = self.outbox().next_rows(max, now).unwrap();
        for row in &rows {
            let id = id_of(&row.record);
            self.trace.push(format!("  handed {id} at {:?}", row.at));
            let skipped_ok = |from: usize| (from..id).all(|i| self.destroyed(i));
            let Expect { from, keep } = self.expect;
            let ok = id >= from && (id <= keep || skipped_ok(keep));
            if !ok {
                self.fail(&format!("row {id} handed out when {:?} was expected", self.expect));
            }
            self.expect = Expect::exactly(id + 1);
            self.handed.insert(id);
            self.by_position.insert(row.at, id);
            self.window.push(Some(row.at), QoS::AtLeastOnce);
            self.window.sent(self.next_pkid, now);
            self.pkids.push((self.next_pkid, row.at, id));
            self.next_pkid = self.next_pkid.wrapping_add(1).max(1);
        }
        self.outbox().save_if_due(now);
        rows.len()
    }

    /// The broker acknowledges the in-flight messages `which` picks, in any order.
    fn ack(&mut self, mut which: impl FnMut(usize) -> bool) {
        let mut i = 0;
        let mut pkids = std::mem::take(&mut self.pkids);
        pkids.retain(|(pkid, _, id)| {
            i += 1;
            if !which(i) {
                return true;
            }
            self.trace.push(format!("  broker acks {id}"));
            let released = self.window.acknowledged(*pkid);
            if let Some(at) = released.last {
                let id = self.by_position[&at];
                self.acked = (self.acked.0.max(Some(id)), self.acked.1.max(Some(id)));
                self.outbox.as_mut().unwrap().acknowledged(at);
            }
            false
        });
        self.pkids = pkids;
        let now = self.now;
        self.outbox().save_if_due(now);
    }

    fn end_life(&mut self) {
        let outbox = self.outbox.take().unwrap();
        self.reported += outbox.lost_generations();
        drop(outbox);
        self.log = None;
    }

    fn step(&mut self, rng: &mut Rng) {
        let now = self.now;
        match rng.below(20) {
            0..=4 => {
                let n = 1 + rng.below(4) as usize;
                self.trace.push(format!("append {n}"));
                self.append(n);
            }
            5..=7 => {
                let max = 1 + rng.below(6) as usize;
                self.trace.push(format!("next_rows {max}"));
                self.publish(max);
            }
            8..=9 => {
                self.trace.push("acks".into());
                let keep = rng.below(3);
                let mut r = Rng(rng.below(u64::MAX) | 1);
                self.ack(move |_| r.below(3) >= keep);
            }
            10 => {
                self.trace.push("disconnect".into());
                self.window = Window::default();
                self.pkids.clear();
                self.outbox().rewind();
                self.expect = self.after_acked();
            }
            11 if self.csv.exists() => {
                self.names += 1;
                let to = self.csv.with_file_name(format!("results.csv.{}", self.names));
                self.trace.push(format!("rotate to {}", to.display()));
                std::fs::rename(&self.csv, &to).unwrap();
                self.beside.insert(to, self.live());
                self.gens.push(Gen::default());
                if rng.below(2) == 0 {
                    self.log.as_mut().unwrap().reopen().unwrap(); // SIGHUP; else the next append notices
                    self.outbox().save_if_due(now);
                }
            }
            12 if self.csv.exists() => {
                self.names += 1;
                let to = self.csv.with_file_name(format!("results.csv.{}", self.names));
                let copy = rng.below(4) > 0;
                self.trace.push(format!("copytruncate (copy: {copy})"));
                if copy {
                    std::fs::copy(&self.csv, &to).unwrap();
                    self.beside.insert(to, self.live());
                }
                std::fs::OpenOptions::new().write(true).open(&self.csv).unwrap().set_len(0).unwrap();
                if !copy {
                    self.destroy(self.live());
                }
                self.gens.push(Gen::default());
            }
            13 if !self.beside.is_empty() => {
                let k = rng.below(self.beside.len() as u64) as usize;
                let (path, g) = self.beside.iter().nth(k).map(|(p, g)| (p.clone(), *g)).unwrap();
                self.trace.push(format!("delete {}", path.display()));
                std::fs::remove_file(&path).unwrap();
                self.beside.remove(&path);
                if !self.beside.values().any(|x| *x == g) {
                    self.destroy(g);
                }
            }
            14 => {
                let ms = rng.below(7_000);
                self.trace.push(format!("+{ms} ms"));
                self.now += Duration::from_millis(ms);
            }
            15 => {
                self.trace.push("save".into());
                self.outbox().save(now).unwrap();
                self.saved = self.acked.0;
            }
            16 if rng.below(2) == 0 => {
                self.trace.push("crash".into());
                let saved = std::fs::read_to_string(&self.checkpoint).unwrap_or_default().replace('\n', " ");
                self.trace.push(format!("    checkpoint {saved}"));
                self.end_life();
                self.start();
                self.acked.0 = self.saved;
                self.expect = self.after_acked();
            }
            16 => {
                self.trace.push("clean restart".into());
                let saved = std::fs::read_to_string(&self.checkpoint).unwrap_or_default();
                let inodes: Vec<&str> = saved.lines().filter(|l| l.contains("inode")).collect();
                self.trace.push(format!("    checkpoint before {inodes:?}"));
                self.outbox().save(now).unwrap();
                self.end_life();
                self.start();
                self.saved = self.acked.0;
                self.expect = self.after_acked();
            }
            _ => {
                self.trace.push("publisher wakes".into());
                self.outbox().save_if_due(now);
            }
        }
    }

    /// No more faults: time passes, every row is handed out and acknowledged.
    fn drain(&mut self) {
        self.trace.push("drain".into());
        self.now += COPY_WAIT + Duration::from_secs(1);
        for _ in 0..10_000 {
            let n = self.publish(7);
            self.ack(|_| true);
            if n == 0 {
                let now = self.now;
                match self.outbox().read_deadline() {
                    Some(t) => self.now = self.now.max(t),
                    None => {
                        self.outbox().save_if_due(now);
                        return;
                    }
                }
            }
        }
        self.fail("the outbox never ran dry");
    }

    fn check(&mut self) {
        let lost: Vec<usize> = (0..self.next_id).filter(|id| !self.handed.contains(id)).collect();
        for &id in &lost {
            if !self.destroyed(id) {
                self.fail(&format!("row {id} was never handed out and its file is there"));
            }
        }
        let pending = self.outbox().pending();
        if pending != 0 {
            self.fail(&format!("{pending} rows still pending after the drain"));
        }
        let reported = self.reported + self.outbox.as_ref().unwrap().lost_generations();
        let may = self.gens.iter().filter(|g| g.destroyed).count() as u64;
        if reported > may {
            self.fail(&format!("{reported} losses reported, at most {may} generations were lost"));
        }
        if !lost.is_empty() && reported == 0 {
            self.fail(&format!("rows {lost:?} lost and no loss reported"));
        }
    }
}

#[test]
fn model_random_rotations_truncations_deletions_acks_and_crashes() {
    let runs: u64 = std::env::var("LABELD_MODEL_RUNS").ok().and_then(|s| s.parse().ok()).unwrap_or(300);
    let only: Option<u64> = std::env::var("LABELD_MODEL_SEED").ok().and_then(|s| s.parse().ok());
    for seed in only.map_or(1..=runs, |s| s..=s) {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let mut w = World::new(Instant::now());
        w.trace.push(format!("seed {seed}"));
        let steps = 20 + rng.below(60);
        for _ in 0..steps {
            w.step(&mut rng);
            let d = w.outbox.as_ref().map(|o| o.describe()).unwrap_or_default();
            w.trace.push(format!("    [{d}]"));
        }
        w.drain();
        w.check();
    }
}
