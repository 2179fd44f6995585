//! The review queue on the status page: the images in each `review = true` route folder, with what the
//! model said, and the operator's verdict (the label confirmed or corrected) appended to
//! `corrections.csv` beside the results log, the file a retraining job reads. Files are read beneath
//! the pinned route folder, never through a link; what a correction records (image identity, model,
//! predicted label) comes from the image's sidecar, not from the browser.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustix::fs::{Mode, OFlags};
use serde::Serialize;

use crate::beneath;
use crate::ledger::ArchiveFolders;
use crate::vocab::{Record, sidecar_path};

/// Images listed per folder at most (newest first).
const LIST_MAX: usize = 200;
/// Images larger than this are not served to the page.
const IMAGE_MAX: u64 = 64 << 20;
const HEADER: &str = "time,path,file_id,xxh3,review_file,model,predicted,corrected\n";

/// The review folders and the corrections file; cheap to clone.
#[derive(Clone)]
pub struct Review {
    folders: ArchiveFolders,
    /// The review route folders, in config order (the page names them by position).
    paths: Arc<Vec<PathBuf>>,
    corrections: Arc<PathBuf>,
    /// The latest verdict per image (`path` + `file_id`), read from corrections.csv once, then kept.
    verdicts: Arc<Mutex<Option<HashMap<String, String>>>>,
}

#[derive(Serialize)]
pub struct Item {
    pub folder: usize,
    pub name: String,
    pub path: String,
    pub model: String,
    pub label: String,
    pub score: f64,
    /// The operator's label, once given.
    pub verdict: Option<String>,
}

fn key(r: &Record) -> String {
    format!("{} {}", r.path, r.file.map(|f| f.to_key()).unwrap_or_default())
}

impl Review {
    pub fn new(folders: ArchiveFolders, paths: Vec<PathBuf>, corrections: PathBuf) -> Review {
        Review { folders, paths: Arc::new(paths), corrections: Arc::new(corrections), verdicts: Arc::default() }
    }

    pub fn is_on(&self) -> bool {
        !self.paths.is_empty()
    }

    /// `name` in review folder `folder`, opened beneath the pinned folder without links.
    fn open(&self, folder: usize, name: &str) -> io::Result<File> {
        let path = self.paths.get(folder).ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such review folder"))?;
        if name.is_empty() || name.starts_with('.') || name.contains('/') {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a file name of the review folder"));
        }
        let pinned = self.folders.get(path).ok_or_else(|| io::Error::other("review folder not opened"))?;
        let root = pinned.root()?;
        let fd = beneath::open_beneath(&root, Path::new(name), OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK, Mode::empty())?;
        let f = File::from(fd);
        if !f.metadata()?.is_file() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"));
        }
        Ok(f)
    }

    /// The record in the sidecar of `name`, if it is one of labeld's.
    fn record(&self, folder: usize, name: &str) -> Option<Record> {
        let side = sidecar_path(Path::new(name));
        let mut bytes = Vec::new();
        self.open(folder, side.to_str()?).ok()?.take(1 << 20).read_to_end(&mut bytes).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// The image bytes of `name` (for the page's thumbnail).
    pub fn image(&self, folder: usize, name: &str) -> io::Result<Vec<u8>> {
        let f = self.open(folder, name)?;
        if f.metadata()?.len() > IMAGE_MAX {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "image too large to show"));
        }
        let mut bytes = Vec::new();
        f.take(IMAGE_MAX).read_to_end(&mut bytes)?;
        Ok(bytes)
    }

    /// Every image with a labeld sidecar in each review folder, newest first.
    pub fn list(&self) -> Vec<Item> {
        let verdicts = self.verdicts();
        let mut out = Vec::new();
        for (i, path) in self.paths.iter().enumerate() {
            let Some(root) = self.folders.get(path).and_then(|f| f.root().ok()) else { continue };
            let Ok(dir) = rustix::fs::Dir::read_from(root.as_ref()) else { continue };
            let mut names: Vec<(i64, String)> = Vec::new();
            for entry in dir.flatten() {
                let Ok(name) = std::str::from_utf8(entry.file_name().to_bytes()).map(str::to_string) else { continue };
                if name.starts_with('.') || name.ends_with(".json") {
                    continue;
                }
                let Ok(st) = rustix::fs::statat(root.as_ref(), name.as_str(), rustix::fs::AtFlags::SYMLINK_NOFOLLOW) else { continue };
                if rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::RegularFile {
                    names.push((st.st_ctime, name));
                }
            }
            names.sort_by(|a, b| b.cmp(a));
            for (_, name) in names.into_iter().take(LIST_MAX) {
                let Some(r) = self.record(i, &name) else { continue };
                let Some(top) = r.top.as_ref().and_then(|t| t.first()) else { continue };
                out.push(Item {
                    folder: i,
                    verdict: verdicts.get(&key(&r)).cloned(),
                    path: r.path.clone(),
                    model: r.model.clone(),
                    label: top.label.clone(),
                    score: top.score,
                    name,
                });
            }
        }
        out
    }

    fn verdicts(&self) -> HashMap<String, String> {
        let mut v = self.verdicts.lock().unwrap_or_else(|e| e.into_inner());
        v.get_or_insert_with(|| read_verdicts(&self.corrections)).clone()
    }

    /// Appends the operator's `label` for image `name` of review folder `folder` to corrections.csv
    /// (fsynced); `label` must be one of `labels` (the model's). Returns the row's predicted label.
    pub fn decide(&self, folder: usize, name: &str, label: &str, labels: &[String]) -> Result<String, String> {
        if !labels.iter().any(|l| l == label) {
            return Err(format!("\"{label}\" is not one of the model's labels"));
        }
        let r = self.record(folder, name).ok_or_else(|| format!("{name} is not a labelled image of the review folder"))?;
        let predicted = r.top.as_ref().and_then(|t| t.first()).map(|t| t.label.clone()).ok_or("the image has no label to correct")?;
        let here = self.paths.get(folder).map(|p| p.join(name)).unwrap_or_default();
        let time = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
        let file_id = r.file.map(|f| f.to_key()).unwrap_or_default();
        let xxh3 = r.file.and_then(|f| f.xxh3).map(|h| format!("{h:016x}")).unwrap_or_default();
        let mut row = csv::WriterBuilder::new().has_headers(false).from_writer(Vec::new());
        let fields = [time.as_str(), &r.path, &file_id, &xxh3, &here.to_string_lossy(), &r.model, &predicted, label];
        row.write_record(fields).map_err(|e| e.to_string())?;
        let bytes = row.into_inner().map_err(|e| e.to_string())?;
        let mut verdicts = self.verdicts.lock().unwrap_or_else(|e| e.into_inner());
        append(&self.corrections, &bytes).map_err(|e| format!("cannot write {}: {e}", self.corrections.display()))?;
        verdicts.get_or_insert_with(|| read_verdicts(&self.corrections)).insert(key(&r), label.to_string());
        Ok(predicted)
    }
}

/// Appends `bytes` (whole rows) to `path`, with the header when the file is new or empty, and fsyncs.
fn append(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut f = std::fs::OpenOptions::new().create(true).append(true).custom_flags_nofollow().open(path)?;
    if f.metadata()?.len() == 0 {
        f.write_all(HEADER.as_bytes())?;
    }
    f.write_all(bytes)?;
    f.sync_data()
}

trait NoFollow {
    fn custom_flags_nofollow(&mut self) -> &mut Self;
}

impl NoFollow for std::fs::OpenOptions {
    fn custom_flags_nofollow(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.custom_flags(libc::O_NOFOLLOW)
    }
}

/// The latest verdict per image in an existing corrections file.
fn read_verdicts(path: &Path) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let Ok(mut rd) = csv::ReaderBuilder::new().flexible(true).from_path(path) else { return out };
    for row in rd.records().flatten() {
        if let (Some(p), Some(id), Some(label)) = (row.get(1), row.get(2), row.get(7)) {
            out.insert(format!("{p} {id}"), label.to_string());
        }
    }
    out
}

/// Where corrections go: `corrections.csv` beside the results log.
pub fn corrections_path(csv: &Path) -> PathBuf {
    csv.with_file_name("corrections.csv")
}
