//! The CSV results log: one row per image, appended, flushed after every batch.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter};
use std::path::{Path, PathBuf};

use super::record::Record;

pub struct ResultLog {
    path: PathBuf,
    top_k: usize,
    writer: csv::Writer<BufWriter<File>>,
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
    /// Opens `path` for appending; writes the header if the file is new or empty.
    pub fn open(path: &Path, top_k: usize) -> std::io::Result<ResultLog> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let len = file.metadata()?.len();
        let mut writer = csv::WriterBuilder::new().from_writer(BufWriter::new(file));
        let want = header(top_k);
        if len == 0 {
            writer.write_record(&want)?;
            writer.flush()?;
        } else if let Some(existing) = first_line(path) {
            if existing != want.join(",") {
                tracing::warn!(
                    csv = %path.display(),
                    "existing results log has a different header (top_k changed?); new rows use: {}",
                    want.join(",")
                );
            }
        }
        Ok(ResultLog { path: path.to_path_buf(), top_k, writer })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn append(&mut self, r: &Record) -> std::io::Result<()> {
        let mut row: Vec<String> = vec![r.time.clone(), r.path.clone(), r.status.as_str().into()];
        let top = r.top.as_deref().unwrap_or(&[]);
        for i in 0..self.top_k {
            match top.get(i) {
                Some(t) => row.extend([t.class_id.to_string(), t.label.clone(), format!("{:.6}", t.score)]),
                None => row.extend([String::new(), String::new(), String::new()]),
            }
        }
        row.extend([format!("{:.1}", r.latency_ms), r.error.clone().unwrap_or_default(), r.model.clone()]);
        self.writer.write_record(&row)?;
        Ok(())
    }

    /// Hands buffered rows to the OS so `tail -f` and log shippers see whole rows.
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.writer.flush()
    }
}

fn first_line(path: &Path) -> Option<String> {
    let mut line = String::new();
    BufReader::new(File::open(path).ok()?).read_line(&mut line).ok()?;
    Some(line.trim_end().to_string())
}
