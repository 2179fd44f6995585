//! The CSV results log: one row per image, appended.
//!
//! Crash safety (invariants I1 and I3 in docs/design.md): each batch's rows go out in one `write` and
//! are fsynced before that batch's sidecars are written, so an image with a sidecar always has its row. A failed write or fsync (disk full, I/O
//! error) is cut back to the length before it (`set_len`) and the batch retried whole later, so a torn
//! row can never end up inside the file; only a crash mid-write can tear one, and only the last line,
//! which `open` cuts off (that image has no sidecar yet and is labelled again).
//!
//! Rotation: rows go to whatever file the path names now. Renamed away (logrotate `create`) or
//! replaced → reopened at the next batch (or at once on SIGHUP via `reopen`); truncated in place
//! (`copytruncate`) → appends continue at the new end, after a fresh header.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

pub use super::log_tap::{Announced, LogTap, TapView};
use crate::vocab::results_log::{Columns, header, parse_row, row};
use crate::vocab::Record;

pub struct ResultLog {
    path: PathBuf,
    columns: Columns,
    file: File,
    /// After a failed append: the length to cut the file back to before anything else is written.
    torn_after: Option<u64>,
    /// The outbox's view of this log, when results are published.
    tap: Option<LogTap>,
}

impl ResultLog {
    /// Opens `path` for appending, repairing a torn last line; writes the header if the file is new
    /// or empty. A log whose header names other columns (top_k, labels_lang or min_score changed) is
    /// renamed aside to `<name>.<time>.csv` first, so every file has one header that fits its rows.
    pub fn open(path: &Path, columns: Columns) -> std::io::Result<ResultLog> {
        ResultLog::open_tapped(path, columns, None)
    }

    /// As [`ResultLog::open`], telling `tap` (kept across reopens) about every durable append.
    pub fn open_tapped(path: &Path, columns: Columns, tap: Option<LogTap>) -> std::io::Result<ResultLog> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        set_aside_if_other_columns(path, columns)?;
        let file = OpenOptions::new().create(true).append(true).read(true).open(path)?;
        repair_torn_tail(&file, path)?;
        let mut log = ResultLog { path: path.to_path_buf(), columns, file, torn_after: None, tap };
        log.write_header_if_empty()?;
        if let Some(tap) = &log.tap {
            tap.opened(&log.file, &log.path)?;
        }
        Ok(log)
    }

    pub fn columns(&self) -> Columns {
        self.columns
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn tap(&self) -> Option<LogTap> {
        self.tap.clone()
    }

    /// Every row of the log, front to back, parsed back into records (rows that do not parse are
    /// skipped). Streams: memory does not grow with the log.
    pub fn records(&self) -> std::io::Result<impl Iterator<Item = Record> + '_> {
        let file = File::open(&self.path)?;
        // csv::Reader reads through its own buffer, a BufReader of this capacity.
        let reader = csv::ReaderBuilder::new().has_headers(false).flexible(true).buffer_capacity(64 * 1024).from_reader(file);
        let rows = reader.into_records().map_while(|row| match row {
            Ok(row) => Some(Some(row)),
            // A read error would come back at every call: stop there.
            Err(e) if e.is_io_error() => {
                tracing::warn!(error = %e, "cannot read the rest of the results log");
                None
            }
            Err(_) => Some(None),
        });
        Ok(rows.flatten().filter_map(move |row| parse_row(self.columns, &row)))
    }

    /// Appends one row per record in a single write, then fsyncs. Whole or nothing: on any error the
    /// file is cut back to its length before the write, so a retry never leaves a torn row inside.
    /// Invariant I3 (docs/design.md): the log holds only whole rows.
    pub fn append(&mut self, records: &[Record]) -> std::io::Result<()> {
        self.cut_back()?;
        self.reopen_if_rotated()?;
        let before = self.file.metadata()?.len();
        if let Some(tap) = &self.tap {
            // Announced before the first new byte lands, so the reader never takes them for old rows.
            tap.shrunk_to(before);
        }
        let mut buf = Vec::with_capacity(256 * records.len());
        if before == 0 {
            buf.extend(encode(&[header(self.columns)])?);
        }
        let rows: Vec<Vec<String>> = records.iter().map(|r| row(self.columns, r)).collect();
        buf.extend(encode(&rows)?);
        self.write_whole(&buf, before)?;
        if let Some(tap) = &self.tap {
            tap.appended(&self.file, before + buf.len() as u64, records.len() as u64);
        }
        Ok(())
    }

    /// Appends `bytes` and fsyncs; on a write or fsync error (ENOSPC, EIO…) removes what landed.
    fn write_whole(&mut self, bytes: &[u8], before: u64) -> std::io::Result<()> {
        let result = self.file.write_all(bytes).and_then(|()| self.file.sync_data());
        if result.is_err() {
            self.torn_after = Some(before);
            if let Err(e) = self.cut_back() {
                tracing::warn!(csv = %self.path.display(), error = %e, "cannot remove a partly written batch yet; retried before the next write");
            }
        }
        result
    }

    /// Cuts off what a failed write left, if anything. Until that succeeds nothing else is appended.
    fn cut_back(&mut self) -> std::io::Result<()> {
        let Some(before) = self.torn_after else { return Ok(()) };
        let now = self.file.metadata()?.len();
        // Shorter than before the write: emptied under it (copytruncate), so what is there is only ours.
        let keep = if now < before { 0 } else { before };
        self.file.set_len(keep)?;
        self.file.sync_data()?;
        self.torn_after = None;
        if now > keep {
            tracing::warn!(csv = %self.path.display(), bytes = now - keep, "removed a partly written batch; it is written again whole");
        }
        Ok(())
    }

    /// Starts writing to whatever file the path names now (SIGHUP).
    pub fn reopen(&mut self) -> std::io::Result<()> {
        // Leave the old file whole: a rotated-away log keeps no torn tail either.
        self.cut_back()?;
        let fresh = ResultLog::open_tapped(&self.path, self.columns, self.tap.clone())?;
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
            let h = encode(&[header(self.columns)])?;
            self.write_whole(&h, 0)?;
        }
        Ok(())
    }

}

/// Rows as RFC 4180 CSV lines.
fn encode(rows: &[Vec<String>]) -> std::io::Result<Vec<u8>> {
    let mut w = csv::WriterBuilder::new().from_writer(Vec::new());
    for r in rows {
        w.write_record(r)?;
    }
    w.into_inner().map_err(|e| std::io::Error::other(e.to_string()))
}

/// A non-empty log whose first line is not `columns`' header is renamed to `<stem>.<UTC time>.<ext>`.
fn set_aside_if_other_columns(path: &Path, columns: Columns) -> std::io::Result<()> {
    let mut first = String::new();
    match File::open(path) {
        Ok(f) => {
            f.take(64 * 1024).read_to_string(&mut first).ok();
        }
        Err(_) => return Ok(()),
    }
    let Some(line) = first.lines().next() else { return Ok(()) };
    let want = encode(&[header(columns)])?;
    if line.as_bytes() == want.trim_ascii_end() {
        return Ok(());
    }
    let stamp = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string().replace(':', "");
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let ext = path.extension().map(|e| format!(".{}", e.to_string_lossy())).unwrap_or_default();
    let aside = path.with_file_name(format!("{stem}.{stamp}{ext}"));
    std::fs::rename(path, &aside)?;
    tracing::warn!(
        csv = %path.display(),
        old = %aside.display(),
        "the results log's columns changed (top_k, labels_lang or min_score): the old log was renamed and a new one started"
    );
    Ok(())
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
    use crate::vocab::{Identity, Status, Top};

    fn rec(path: &str) -> Record {
        Record {
            path: path.into(),
            time: "2026-01-01T00:00:00.000Z".into(),
            model: "m".into(),
            engine: None,
            status: Status::Ok,
            top: Some(vec![Top { rank: 1, class_id: 7, label: "cock, \"rooster\"".into(), label_en: None, score: 0.5 }]),
            confident: None,
            latency_ms: 1.0,
            error: None,
            file: Some(Identity { dev: 1, inode: 2, size: 3, mtime_ns: 4, ctime_ns: 5, xxh3: None }),
            route: None,
        }
    }

    fn lines(p: &Path) -> Vec<String> {
        std::fs::read_to_string(p).unwrap().lines().map(String::from).collect()
    }

    #[test]
    fn header_once_then_quoted_rows() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.csv");
        ResultLog::open(&p, Columns::plain(1)).unwrap().append(&[rec("/a,b.jpg")]).unwrap();
        ResultLog::open(&p, Columns::plain(1)).unwrap().append(&[rec("/c.jpg")]).unwrap();
        let l = lines(&p);
        assert_eq!(l[0], "time,path,status,class1,label1,score1,latency_ms,error,model,file_id");
        assert_eq!(l[1], "2026-01-01T00:00:00.000Z,\"/a,b.jpg\",ok,7,\"cock, \"\"rooster\"\"\",0.500000,1.0,,m,1:2:3:4:5");
        assert_eq!(l.len(), 3);
    }

    #[test]
    fn rows_read_back_as_the_records_written() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.csv");
        let mut log = ResultLog::open(&p, Columns::plain(1)).unwrap();
        let mut err = rec("/bad.jpg");
        err.status = Status::Error;
        err.top = None;
        err.error = Some("cannot decode image: x, \"y\"".into());
        let all: Vec<Record> = (0..50).map(|i| rec(&format!("/{i}.jpg"))).chain([err.clone()]).collect();
        log.append(&all).unwrap();
        let back: Vec<Record> = log.records().unwrap().collect();
        assert_eq!(back.len(), 51, "the header is not a record");
        assert_eq!(back[50], err);
        assert_eq!(back[48], rec("/48.jpg"));
    }

    #[test]
    fn translated_labels_and_confidence_get_their_own_columns_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.csv");
        let cols = Columns { top_k: 1, english: true, confident: true, route: false };
        let mut log = ResultLog::open(&p, cols).unwrap();
        let mut r = rec("/a.jpg");
        r.top = Some(vec![Top { rank: 1, class_id: 281, label: "虎斑猫".into(), label_en: Some("tabby".into()), score: 0.5 }]);
        r.confident = Some(false);
        log.append(std::slice::from_ref(&r)).unwrap();
        let l = lines(&p);
        assert_eq!(l[0], "time,path,status,class1,label1,label1_en,score1,latency_ms,error,model,confident,file_id");
        assert_eq!(l[1], "2026-01-01T00:00:00.000Z,/a.jpg,ok,281,虎斑猫,tabby,0.500000,1.0,,m,false,1:2:3:4:5");
        assert_eq!(log.records().unwrap().collect::<Vec<_>>(), vec![r]);
    }

    #[test]
    fn the_route_column_comes_last_reads_back_and_a_log_without_it_still_reads() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.csv");
        let cols = Columns { top_k: 1, english: false, confident: false, route: true };
        let mut log = ResultLog::open(&p, cols).unwrap();
        let mut moved = rec("/a.jpg");
        moved.route = Some(crate::vocab::Routed { action: "move".into(), to: Some("/srv/sorted/espresso, \"x\"".into()), at: None });
        let mut kept = rec("/b.jpg");
        kept.route = Some(crate::vocab::Routed { action: "keep".into(), to: None, at: None });
        let unrouted = rec("/c.jpg");
        log.append(&[moved.clone(), kept.clone(), unrouted.clone()]).unwrap();
        let l = lines(&p);
        assert_eq!(l[0], "time,path,status,class1,label1,score1,latency_ms,error,model,file_id,route");
        assert!(l[1].ends_with(",1:2:3:4:5,\"move:/srv/sorted/espresso, \"\"x\"\"\""), "{}", l[1]);
        assert!(l[2].ends_with(",keep:"), "{}", l[2]);
        assert!(l[3].ends_with(",1:2:3:4:5,"), "{}", l[3]);
        assert_eq!(log.records().unwrap().collect::<Vec<_>>(), vec![moved, kept, unrouted.clone()]);
        // A log written before routes existed keeps its columns and its rows read back.
        let old = dir.path().join("old.csv");
        let mut log = ResultLog::open(&old, Columns::plain(1)).unwrap();
        log.append(std::slice::from_ref(&unrouted)).unwrap();
        assert_eq!(Columns::from_header(&lines(&old)[0]), Some(Columns::plain(1)));
        assert_eq!(log.records().unwrap().collect::<Vec<_>>(), vec![unrouted]);
    }

    #[test]
    fn a_log_with_other_columns_is_set_aside_not_mixed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.csv");
        ResultLog::open(&p, Columns::plain(1)).unwrap().append(&[rec("/a.jpg")]).unwrap();
        ResultLog::open(&p, Columns::plain(3)).unwrap().append(&[rec("/b.jpg")]).unwrap();
        let l = lines(&p);
        assert_eq!(l[0], header(Columns::plain(3)).join(","));
        assert_eq!(l.len(), 2);
        let aside: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().path()).filter(|x| x != &p).collect();
        assert_eq!(aside.len(), 1, "{aside:?}");
        let name = aside[0].file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with("r.") && name.ends_with(".csv"), "{name}");
        assert_eq!(lines(&aside[0]).len(), 2);
        // The same columns again: appended, nothing set aside.
        ResultLog::open(&p, Columns::plain(3)).unwrap().append(&[rec("/c.jpg")]).unwrap();
        assert_eq!(lines(&p).len(), 3);
    }

    #[test]
    fn a_torn_last_row_is_cut_off_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.csv");
        ResultLog::open(&p, Columns::plain(1)).unwrap().append(&[rec("/a.jpg")]).unwrap();
        let mut f = OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(b"2026-01-01T00:00:00.000Z,/b.jp").unwrap();
        ResultLog::open(&p, Columns::plain(1)).unwrap().append(&[rec("/c.jpg")]).unwrap();
        let l = lines(&p);
        assert_eq!(l.len(), 3, "{l:?}");
        assert!(l[2].contains("/c.jpg"));
    }

    #[test]
    fn follows_rename_rotation_and_copytruncate() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.csv");
        let mut log = ResultLog::open(&p, Columns::plain(1)).unwrap();
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

    #[test]
    fn what_a_failed_write_left_is_cut_off_before_the_next_append() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.csv");
        let mut log = ResultLog::open(&p, Columns::plain(1)).unwrap();
        log.append(&[rec("/a.jpg")]).unwrap();
        // As ENOSPC halfway through a batch leaves it: whole rows, then a torn one.
        let before = std::fs::metadata(&p).unwrap().len();
        let mut f = OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(b"2026-01-01T00:00:00.000Z,/b.jpg,ok,7,x,0.5,1.0,,m\n2026-01-01T00:00:00.000Z,\"/c,").unwrap();
        log.torn_after = Some(before);
        log.append(&[rec("/b.jpg"), rec("/c.jpg")]).unwrap();
        let paths: Vec<String> = log.records().unwrap().map(|r| r.path).collect();
        assert_eq!(paths, ["/a.jpg", "/b.jpg", "/c.jpg"]);
        // Emptied (copytruncate) between the failed write and the cut: only that write's bytes are there.
        OpenOptions::new().write(true).open(&p).unwrap().set_len(0).unwrap();
        f.write_all(b"time,pa").unwrap();
        log.torn_after = Some(before);
        log.append(&[rec("/d.jpg")]).unwrap();
        let l = lines(&p);
        assert_eq!(l.len(), 2, "{l:?}");
        assert!(l[0].starts_with("time,") && l[1].contains("/d.jpg"));
    }

    #[test]
    fn long_rows_read_back_however_many() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.csv");
        let cols = Columns { top_k: 100, english: true, confident: false, route: false };
        let mut log = ResultLog::open(&p, cols).unwrap();
        let mut r = rec(&format!("/{}/图片.jpg", "长路径".repeat(60)));
        r.top = Some((0..100).map(|i| Top { rank: i + 1, class_id: i, label: "大白鲨，食人鲨".into(), label_en: Some("great white shark".into()), score: 0.01 }).collect());
        for _ in 0..20 {
            log.append(&vec![r.clone(); 50]).unwrap();
        }
        assert!(std::fs::metadata(&p).unwrap().len() > 1000 * 4096, "rows longer than 4 KB");
        assert_eq!(log.records().unwrap().filter(|x| *x == r).count(), 1000);
    }

    #[test]
    fn a_row_that_does_not_parse_is_skipped_not_the_end_of_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.csv");
        let mut log = ResultLog::open(&p, Columns::plain(1)).unwrap();
        log.append(&[rec("/a.jpg")]).unwrap();
        OpenOptions::new().append(true).open(&p).unwrap().write_all(b"\xff\xfe,junk\n").unwrap();
        log.append(&[rec("/b.jpg")]).unwrap();
        let paths: Vec<String> = log.records().unwrap().map(|r| r.path).collect();
        assert_eq!(paths, ["/a.jpg", "/b.jpg"]);
    }
}
