//! The CSV results log's words: which columns a row has, the header naming them, a record as a row
//! and a row parsed back (by the sink's read-back at start and the MQTT outbox), and the fingerprint
//! that tells one log file from another (the outbox's checkpoint keeps it).

use std::fs::File;
use std::os::unix::fs::FileExt;

use serde::{Deserialize, Serialize};

use super::{Identity, Record, Routed, Status, Top};

/// Which columns a row has: `top_k` (class, label, score) groups, plus `labelN_en` after each label
/// when labels are translated, plus a trailing `confident` with `[model] min_score`, then `file_id`
/// (the identity of the file version the row describes, `dev:inode:size:mtime_ns:ctime_ns`), then,
/// with `[[route]]`, `route` (where the image went, `<action>:<folder>`) at the very end, so that
/// readers of the older columns find every one where it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Columns {
    pub top_k: usize,
    pub english: bool,
    pub confident: bool,
    pub route: bool,
}

impl Columns {
    pub fn plain(top_k: usize) -> Self {
        Columns { top_k, english: false, confident: false, route: false }
    }

    fn per_rank(&self) -> usize {
        if self.english { 4 } else { 3 }
    }

    fn len(&self) -> usize {
        3 + self.per_rank() * self.top_k + 3 + usize::from(self.confident) + 1 + usize::from(self.route)
    }

    /// Where `file_id` is.
    fn file_id_at(&self) -> usize {
        self.len() - 1 - usize::from(self.route)
    }

    /// The columns a log's header line names; `None` for a line that is not one of labeld's headers.
    pub fn from_header(line: &str) -> Option<Columns> {
        let names: Vec<&str> = line.trim_end_matches(['\r', '\n']).split(',').collect();
        let english = names.contains(&"label1_en");
        let confident = names.contains(&"confident");
        let route = names.last() == Some(&"route");
        let per = if english { 4 } else { 3 };
        let ranked = names.len().checked_sub(3 + 3 + usize::from(confident) + 1 + usize::from(route))?;
        if ranked % per != 0 {
            return None;
        }
        let c = Columns { top_k: ranked / per, english, confident, route };
        (header(c) == names).then_some(c)
    }
}

pub fn header(c: Columns) -> Vec<String> {
    let mut h = vec!["time".to_string(), "path".into(), "status".into()];
    for i in 1..=c.top_k {
        h.extend([format!("class{i}"), format!("label{i}")]);
        if c.english {
            h.push(format!("label{i}_en"));
        }
        h.push(format!("score{i}"));
    }
    h.extend(["latency_ms".to_string(), "error".into(), "model".into()]);
    if c.confident {
        h.push("confident".into());
    }
    h.push("file_id".into());
    if c.route {
        h.push("route".into());
    }
    h
}

/// The CSV fields of `r` in the columns `c`.
pub fn row(c: Columns, r: &Record) -> Vec<String> {
    let mut row: Vec<String> = vec![r.time.clone(), r.path.clone(), r.status.as_str().into()];
    let top = r.top.as_deref().unwrap_or(&[]);
    for i in 0..c.top_k {
        let t = top.get(i);
        row.push(t.map(|t| t.class_id.to_string()).unwrap_or_default());
        row.push(t.map(|t| t.label.clone()).unwrap_or_default());
        if c.english {
            row.push(t.and_then(|t| t.label_en.clone()).unwrap_or_default());
        }
        row.push(t.map(|t| format!("{:.6}", t.score)).unwrap_or_default());
    }
    row.extend([format!("{:.1}", r.latency_ms), r.error.clone().unwrap_or_default(), r.model.clone()]);
    if c.confident {
        row.push(r.confident.map(|c| c.to_string()).unwrap_or_default());
    }
    row.push(r.file.map(Identity::to_key).unwrap_or_default());
    if c.route {
        row.push(r.route.as_ref().map(Routed::to_field).unwrap_or_default());
    }
    row
}

/// A log row parsed back with the columns of the log it is in; `None` for the header and for rows that
/// do not fit them.
pub fn parse_row(c: Columns, row: &csv::StringRecord) -> Option<Record> {
    let (k, per) = (c.top_k, c.per_rank());
    if row.len() != c.len() || row.get(0) == Some("time") {
        return None;
    }
    let status = match row.get(2)? {
        "ok" => Status::Ok,
        "error" => Status::Error,
        _ => return None,
    };
    let mut top = Vec::new();
    for i in 0..k {
        let at = 3 + per * i;
        let (class, label) = (row.get(at)?, row.get(at + 1)?);
        if class.is_empty() {
            continue;
        }
        let label_en = c.english.then(|| row.get(at + 2).unwrap_or_default().to_string());
        let score = row.get(at + per - 1)?;
        top.push(Top { rank: i + 1, class_id: class.parse().ok()?, label: label.to_string(), label_en, score: score.parse().ok()? });
    }
    let tail = 3 + per * k;
    let error = row.get(tail + 1).filter(|e| !e.is_empty()).map(String::from);
    let confident = if c.confident { row.get(tail + 3).and_then(|v| v.parse().ok()) } else { None };
    let file = row.get(c.file_id_at()).and_then(Identity::from_key);
    let route = if c.route { row.get(c.len() - 1).and_then(Routed::from_field) } else { None };
    Some(Record {
        time: row.get(0)?.to_string(),
        path: row.get(1)?.to_string(),
        status,
        top: (status == Status::Ok).then_some(top),
        confident,
        latency_ms: row.get(tail)?.parse().ok()?,
        error,
        model: row.get(tail + 2)?.to_string(),
        engine: None,
        file,
        route,
    })
}

/// How many bytes at the start of a log identify its content (with the file's dev and inode).
pub const FINGERPRINT_LEN: u64 = 4096;


/// The content identity of a log file: xxh3-64 of its first `len` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    pub len: u64,
    pub xxh3: u64,
}

impl Fingerprint {
    /// Of the first `min(FINGERPRINT_LEN, available)` bytes of `file`; `None` for an empty one.
    pub fn of(file: &File, available: u64) -> std::io::Result<Option<Fingerprint>> {
        let len = available.min(FINGERPRINT_LEN);
        if len == 0 {
            return Ok(None);
        }
        let mut buf = vec![0; len as usize];
        file.read_exact_at(&mut buf, 0)?;
        Ok(Some(Fingerprint { len, xxh3: xxhash_rust::xxh3::xxh3_64(&buf) }))
    }

    /// Whether `file` (of which `available` bytes count) starts with the bytes this fingerprint was taken of.
    pub fn matches(&self, file: &File, available: u64) -> bool {
        available >= self.len && Fingerprint::of(file, self.len).ok().flatten().is_some_and(|f| f == *self)
    }
}

