//! The CSV results log: one row per image, appended.
//!
//! Crash safety: each batch's rows go out in one `write` and are fsynced before that batch's sidecars
//! are written, so an image with a sidecar always has its row. A row torn by a crash can only be the
//! last line; `open` cuts it off (that image has no sidecar yet and is labelled again).
//!
//! Rotation: rows go to whatever file the path names now. Renamed away (logrotate `create`) or
//! replaced → reopened at the next batch (or at once on SIGHUP via `reopen`); truncated in place
//! (`copytruncate`) → appends continue at the new end, after a fresh header.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::record::{Record, Status, Top};

pub struct ResultLog {
    path: PathBuf,
    top_k: usize,
    file: File,
}

pub fn header(top_k: usize) -> Vec<String> {
    let mut h = vec!["time".to_string(), "path".into(), "status".into()];
    for i in 1..=top_k {
        h.extend([format!("class{i}"), format!("label{i}"), format!("score{i}")]);
    }
    h.extend(["latency_ms".to_string(), "error".into(), "model".into()]);
    h
}

impl ResultLog {
    /// Opens `path` for appending, repairing a torn last line; writes the header if the file is new
    /// or empty.
    pub fn open(path: &Path, top_k: usize) -> std::io::Result<ResultLog> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new().create(true).append(true).read(true).open(path)?;
        repair_torn_tail(&file, path)?;
        let mut log = ResultLog { path: path.to_path_buf(), top_k, file };
        log.write_header_if_empty()?;
        log.warn_on_header_mismatch();
        Ok(log)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The last `n` rows of the log, parsed back into records (rows that do not parse are skipped).
    pub fn last_records(&self, n: usize) -> Vec<Record> {
        let Ok(mut f) = File::open(&self.path) else { return Vec::new() };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let tail_len = len.min((n as u64 + 1) * 2048);
        if f.seek(SeekFrom::Start(len - tail_len)).is_err() {
            return Vec::new();
        }
        let mut tail = Vec::new();
        if f.read_to_end(&mut tail).is_err() {
            return Vec::new();
        }
        if tail_len < len {
            // Started mid-row: drop the partial first line.
            let cut = tail.iter().position(|b| *b == b'\n').map_or(tail.len(), |i| i + 1);
            tail.drain(..cut);
        }
        let mut r = csv::ReaderBuilder::new().has_headers(false).flexible(true).from_reader(&tail[..]);
        let rows: Vec<csv::StringRecord> = r.records().filter_map(Result::ok).collect();
        let start = rows.len().saturating_sub(n);
        rows[start..].iter().filter_map(|row| self.parse_row(row)).collect()
    }

    fn parse_row(&self, row: &csv::StringRecord) -> Option<Record> {
        let k = self.top_k;
        if row.len() != 3 + 3 * k + 3 || row.get(0) == Some("time") {
            return None;
        }
        let status = match row.get(2)? {
            "ok" => Status::Ok,
            "error" => Status::Error,
            _ => return None,
        };
        let mut top = Vec::new();
        for i in 0..k {
            let (c, l, sc) = (row.get(3 + 3 * i)?, row.get(4 + 3 * i)?, row.get(5 + 3 * i)?);
            if c.is_empty() {
                continue;
            }
            top.push(Top { rank: i + 1, class_id: c.parse().ok()?, label: l.to_string(), score: sc.parse().ok()? });
        }
        let error = row.get(4 + 3 * k).filter(|e| !e.is_empty()).map(String::from);
        Some(Record {
            time: row.get(0)?.to_string(),
            path: row.get(1)?.to_string(),
            status,
            top: (status == Status::Ok).then_some(top),
            latency_ms: row.get(3 + 3 * k)?.parse().ok()?,
            error,
            model: row.get(5 + 3 * k)?.to_string(),
        })
    }

    /// Appends one row per record in a single write, then fsyncs.
    pub fn append(&mut self, records: &[Record]) -> std::io::Result<()> {
        self.reopen_if_rotated()?;
        let mut buf = Vec::with_capacity(256 * records.len());
        if self.file.metadata()?.len() == 0 {
            buf.extend(self.encode(&[header(self.top_k)])?);
        }
        let rows: Vec<Vec<String>> = records.iter().map(|r| self.row(r)).collect();
        buf.extend(self.encode(&rows)?);
        self.file.write_all(&buf)?;
        self.file.sync_data()
    }

    /// Starts writing to whatever file the path names now (SIGHUP).
    pub fn reopen(&mut self) -> std::io::Result<()> {
        let fresh = ResultLog::open(&self.path, self.top_k)?;
        *self = fresh;
        tracing::info!(csv = %self.path.display(), "results log reopened");
        Ok(())
    }

    fn reopen_if_rotated(&mut self) -> std::io::Result<()> {
        let ours = self.file.metadata()?;
        let same = std::fs::metadata(&self.path).is_ok_and(|m| m.dev() == ours.dev() && m.ino() == ours.ino());
        if !same {
            self.reopen()?;
        }
        Ok(())
    }

    fn write_header_if_empty(&mut self) -> std::io::Result<()> {
        if self.file.metadata()?.len() == 0 {
            let h = self.encode(&[header(self.top_k)])?;
            self.file.write_all(&h)?;
            self.file.sync_data()?;
        }
        Ok(())
    }

    fn warn_on_header_mismatch(&self) {
        let want = header(self.top_k).join(",");
        let mut first = String::new();
        if let Ok(f) = File::open(&self.path) {
            let _ = f.take(4096).read_to_string(&mut first);
        }
        let first = first.lines().next().unwrap_or("");
        if first != want {
            tracing::warn!(
                csv = %self.path.display(),
                "results log has a different header (top_k changed?); new rows use: {want}"
            );
        }
    }

    fn row(&self, r: &Record) -> Vec<String> {
        let mut row: Vec<String> = vec![r.time.clone(), r.path.clone(), r.status.as_str().into()];
        let top = r.top.as_deref().unwrap_or(&[]);
        for i in 0..self.top_k {
            match top.get(i) {
                Some(t) => row.extend([t.class_id.to_string(), t.label.clone(), format!("{:.6}", t.score)]),
                None => row.extend([String::new(), String::new(), String::new()]),
            }
        }
        row.extend([format!("{:.1}", r.latency_ms), r.error.clone().unwrap_or_default(), r.model.clone()]);
        row
    }

    fn encode(&self, rows: &[Vec<String>]) -> std::io::Result<Vec<u8>> {
        let mut w = csv::WriterBuilder::new().from_writer(Vec::new());
        for r in rows {
            w.write_record(r)?;
        }
        w.into_inner().map_err(|e| std::io::Error::other(e.to_string()))
    }
}

/// Cuts a partial last line (left by a crash mid-write) back to the last complete row.
fn repair_torn_tail(file: &File, path: &Path) -> std::io::Result<()> {
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(());
    }
    let mut f = file.try_clone()?;
    let tail_len = len.min(64 * 1024);
    f.seek(SeekFrom::Start(len - tail_len))?;
    let mut tail = Vec::with_capacity(tail_len as usize);
    f.read_to_end(&mut tail)?;
    if tail.last() == Some(&b'\n') {
        return Ok(());
    }
    let keep = match tail.iter().rposition(|b| *b == b'\n') {
        Some(i) => len - tail_len + i as u64 + 1,
        None if tail_len == len => 0,
        None => return Ok(()), // one enormous line: not ours to judge
    };
    file.set_len(keep)?;
    file.sync_data()?;
    tracing::warn!(csv = %path.display(), bytes = len - keep, "removed a partial last row left by an interrupted write");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(path: &str) -> Record {
        Record {
            path: path.into(),
            time: "2026-01-01T00:00:00.000Z".into(),
            model: "m".into(),
            status: Status::Ok,
            top: Some(vec![Top { rank: 1, class_id: 7, label: "cock, \"rooster\"".into(), score: 0.5 }]),
            latency_ms: 1.0,
            error: None,
        }
    }

    fn lines(p: &Path) -> Vec<String> {
        std::fs::read_to_string(p).unwrap().lines().map(String::from).collect()
    }

    #[test]
    fn header_once_then_quoted_rows() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.csv");
        ResultLog::open(&p, 1).unwrap().append(&[rec("/a,b.jpg")]).unwrap();
        ResultLog::open(&p, 1).unwrap().append(&[rec("/c.jpg")]).unwrap();
        let l = lines(&p);
        assert_eq!(l[0], "time,path,status,class1,label1,score1,latency_ms,error,model");
        assert_eq!(l[1], "2026-01-01T00:00:00.000Z,\"/a,b.jpg\",ok,7,\"cock, \"\"rooster\"\"\",0.500000,1.0,,m");
        assert_eq!(l.len(), 3);
    }

    #[test]
    fn rows_read_back_as_the_records_written() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.csv");
        let mut log = ResultLog::open(&p, 1).unwrap();
        let mut err = rec("/bad.jpg");
        err.status = Status::Error;
        err.top = None;
        err.error = Some("cannot decode image: x, \"y\"".into());
        let all: Vec<Record> = (0..50).map(|i| rec(&format!("/{i}.jpg"))).chain([err.clone()]).collect();
        log.append(&all).unwrap();
        let back = log.last_records(3);
        assert_eq!(back.len(), 3);
        assert_eq!(back[2], err);
        assert_eq!(back[0], rec("/48.jpg"));
    }

    #[test]
    fn a_torn_last_row_is_cut_off_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.csv");
        ResultLog::open(&p, 1).unwrap().append(&[rec("/a.jpg")]).unwrap();
        let mut f = OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(b"2026-01-01T00:00:00.000Z,/b.jp").unwrap();
        ResultLog::open(&p, 1).unwrap().append(&[rec("/c.jpg")]).unwrap();
        let l = lines(&p);
        assert_eq!(l.len(), 3, "{l:?}");
        assert!(l[2].contains("/c.jpg"));
    }

    #[test]
    fn follows_rename_rotation_and_copytruncate() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.csv");
        let mut log = ResultLog::open(&p, 1).unwrap();
        log.append(&[rec("/1.jpg")]).unwrap();
        // logrotate `create`: rename away, new empty file at the path.
        std::fs::rename(&p, dir.path().join("r.csv.1")).unwrap();
        std::fs::write(&p, b"").unwrap();
        log.append(&[rec("/2.jpg")]).unwrap();
        assert_eq!(lines(&dir.path().join("r.csv.1")).len(), 2);
        let l = lines(&p);
        assert_eq!((l.len(), l[0].starts_with("time,")), (2, true), "{l:?}");
        // logrotate `copytruncate`: same file, emptied.
        OpenOptions::new().write(true).open(&p).unwrap().set_len(0).unwrap();
        log.append(&[rec("/3.jpg")]).unwrap();
        let l = lines(&p);
        assert_eq!(l.len(), 2, "{l:?}");
        assert!(l[0].starts_with("time,") && l[1].contains("/3.jpg"));
    }
}
