//! `on_done`: once an image has its row and its sidecar, move both to `done_dir` or delete both.
//!
//! The image goes first, then its sidecar, so a crash in between leaves a sidecar without its image
//! (never an image without a sidecar, which would be labelled twice). `finish` completes such
//! leftovers, and archives images labelled before on_done was set, at start and on reload.

use std::io;
use std::path::Path;

use super::record::{Record, Status};
use super::sidecar::{self, sidecar_path};
use crate::config::{InboxConfig, OnDone};

/// Archives one labelled image of `ib` (and its sidecar) per `ib.on_done`.
pub fn apply(ib: &InboxConfig, image: &Path) -> io::Result<()> {
    match &ib.on_done {
        OnDone::Keep => Ok(()),
        OnDone::Move(dir) => {
            let dest = super::move_under(&ib.path, dir, image)?;
            super::move_file(&sidecar_path(image), &sidecar_path(&dest))?;
            if let Some(parent) = dest.parent() {
                sidecar::sync_dir(parent)?;
            }
            Ok(())
        }
        OnDone::Delete => {
            std::fs::remove_file(image)?;
            remove_if_present(&sidecar_path(image))
        }
    }
}

fn remove_if_present(p: &Path) -> io::Result<()> {
    match std::fs::remove_file(p) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// The sidecar beside `image`, if it is a labeld result for that image.
fn read_sidecar(image: &Path) -> Option<Record> {
    let bytes = std::fs::read(sidecar_path(image)).ok()?;
    let r: Record = serde_json::from_slice(&bytes).ok()?;
    (Path::new(&r.path) == image).then_some(r)
}

/// Archives every image of `ib` that already has an ok sidecar, and finishes archiving interrupted
/// by a crash (a sidecar left behind by its image). Returns how many files were handled.
pub fn finish(ib: &InboxConfig) -> usize {
    if ib.on_done == OnDone::Keep || !ib.path.is_dir() {
        return 0;
    }
    let mut handled = 0;
    let walk = walkdir::WalkDir::new(&ib.path).follow_links(false).max_depth(if ib.recursive { usize::MAX } else { 1 });
    for entry in walk.into_iter().filter_map(Result::ok) {
        if !entry.file_type().is_file() {
            continue;
        }
        let path = entry.path();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if let Some(image_name) = name.strip_suffix(".json") {
            // A sidecar whose image is gone: the image was archived and the crash came before its sidecar.
            let image = path.with_file_name(image_name);
            if !ib.wants(&image) || image.exists() || read_sidecar(&image).is_none() {
                continue;
            }
            let done = match &ib.on_done {
                OnDone::Move(dir) => match super::path_under(&ib.path, dir, &image) {
                    Ok(dest) if dest.exists() => super::move_file(path, &sidecar_path(&dest)),
                    _ => continue,
                },
                OnDone::Delete => remove_if_present(path),
                OnDone::Keep => continue,
            };
            report(path, done, &mut handled);
        } else if ib.wants(path) && sidecar::is_labelled(path) {
            if read_sidecar(path).is_some_and(|r| r.status == Status::Ok) {
                report(path, apply(ib, path), &mut handled);
            }
        }
    }
    if handled > 0 {
        tracing::info!(inbox = %ib.path.display(), on_done = ib.on_done.as_str(), files = handled, "archived images labelled earlier");
    }
    handled
}

fn report(path: &Path, r: io::Result<()>, handled: &mut usize) {
    match r {
        Ok(()) => *handled += 1,
        Err(e) => tracing::error!(path = %path.display(), error = %e, "cannot archive"),
    }
}
