//! Where an image goes once its row and its sidecar are durable: an ok image per `on_done` (moved to
//! `done_dir` or deleted, with its sidecar), a failed one to its inbox's `quarantine` (with its error
//! sidecar). Nothing is moved before its record is written, so a crash can never leave an image out of
//! the inbox without a row and a sidecar (quarantine and done folders are not scanned).
//! Invariant I4 (docs/design.md): an image leaves the inbox only with a durable row and sidecar.
//!
//! The image goes first, then its sidecar, so a crash in between leaves a sidecar without its image
//! (never an image without a sidecar, which would be labelled twice). `finish` completes such
//! leftovers, and sets aside images labelled before on_done or quarantine was set (or while a crash
//! stopped it), at start and on reload.

use std::io;
use std::path::{Path, PathBuf};

use crate::vocab::{Record, Status};
use super::relocate::{self, Placing, move_sidecar, move_under, path_under};
use super::route::action_of;
use crate::config::RouteAction;
use crate::labelled;
use crate::vocab::sidecar_path;
use crate::config::{InboxConfig, OnDone};
use crate::ledger::{ArchiveFolder, ArchiveFolders};

/// The pinned archive folder for `path`.
fn folder(folders: &ArchiveFolders, path: &Path) -> io::Result<std::sync::Arc<ArchiveFolder>> {
    folders.get(path).ok_or_else(|| io::Error::other(format!("{} was not opened at start or reload", path.display())))
}

/// Archives one labelled image of `ib` (and its sidecar) per `ib.on_done`. `expect`: the device and
/// inode of the file that was labelled; another file at that path is left where it is.
pub fn apply(ib: &InboxConfig, folders: &ArchiveFolders, image: &Path, expect: Option<(u64, u64)>) -> io::Result<()> {
    match &ib.on_done {
        OnDone::Keep => Ok(()),
        OnDone::Move(dir) => {
            let done = folder(folders, dir)?;
            let dest = move_under(&ib.path, &done, image, expect)?;
            move_sidecar(&ib.path, image, &done, &dest)
        }
        OnDone::Delete => {
            relocate::remove(&ib.path, image)?;
            remove_if_present(&ib.path, &sidecar_path(image))
        }
    }
}

/// Moves one failed image of `ib` (and its error sidecar) into the inbox's quarantine, if it has one;
/// returns where the image went.
pub fn quarantine(ib: &InboxConfig, folders: &ArchiveFolders, image: &Path, expect: Option<(u64, u64)>) -> io::Result<Option<PathBuf>> {
    let Some(q) = &ib.quarantine else { return Ok(None) };
    let q = folder(folders, q)?;
    let dest = move_under(&ib.path, &q, image, expect)?;
    move_sidecar(&ib.path, image, &q, &dest)?;
    Ok(Some(dest))
}

/// Sets one labelled image of `ib` (and its sidecar) where `record` says: its route when it has one
/// (the sidecar travels with the image: moved with it, or copied beside its copy or link), else
/// `on_done`. Returns where the image (or its copy) went. With `resume` (at start and reload), a copy
/// or link a crash interrupted is found and completed instead of made twice.
/// Invariant I12 (docs/design.md): routes act after the row and the sidecar are durable.
pub fn route(ib: &InboxConfig, folders: &ArchiveFolders, image: &Path, expect: Option<(u64, u64)>, record: &Record, resume: bool) -> io::Result<Option<PathBuf>> {
    let Some(routed) = &record.route else {
        return apply(ib, folders, image, expect).map(|()| None);
    };
    let action = action_of(routed).ok_or_else(|| io::Error::other(format!("unknown route action \"{}\"", routed.action)))?;
    let how = match action {
        RouteAction::Keep => return Ok(None),
        RouteAction::Move => Placing::Move,
        RouteAction::Copy => Placing::Copy,
        RouteAction::Link => Placing::Link,
    };
    if routed.at.is_some() {
        return Ok(None); // copied or linked already
    }
    let to = PathBuf::from(routed.to.as_deref().ok_or_else(|| io::Error::other("a route without a folder"))?);
    let dest = folders
        .containing(&to)
        .ok_or_else(|| io::Error::other(format!("{} lies in no route folder opened at start or reload", to.display())))?;
    let rel_dir = to.strip_prefix(&dest.path).map_err(io::Error::other)?;
    if how == Placing::Move {
        let moved = relocate::move_into(&ib.path, &dest, image, rel_dir, expect)?;
        move_sidecar(&ib.path, image, &dest, &moved)?;
        return Ok(Some(moved));
    }
    let before = if resume { relocate::placed_before(&dest, rel_dir, image.file_name().unwrap_or_default(), record) } else { None };
    let placed = match before {
        Some((placed, true)) => placed,
        Some((placed, false)) => {
            relocate::copy_sidecar(&ib.path, image, &dest, &placed)?;
            placed
        }
        None => {
            let placed = relocate::place_into(&ib.path, &dest, image, rel_dir, expect, how)?;
            relocate::copy_sidecar(&ib.path, image, &dest, &placed)?;
            placed
        }
    };
    // Noted in the inbox's sidecar, so that no start or reload makes it again (even once retention
    // removed it from the route's folder).
    let mut noted = record.clone();
    if let Some(r) = noted.route.as_mut() {
        r.at = Some(placed.to_string_lossy().into_owned());
    }
    super::sidecar::write(&noted, &ib.path, image).map_err(|e| io::Error::other(e.to_string()))?;
    Ok(Some(placed))
}

fn remove_if_present(inbox: &Path, p: &Path) -> io::Result<()> {
    match relocate::remove(inbox, p) {
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

/// Sets aside every image of `ib` that already has its sidecar (ok → on_done, error → quarantine), and
/// finishes moves interrupted by a crash (a sidecar left behind by its image). Returns how many files
/// were handled.
/// `routed`: routes are configured (images labelled earlier may carry a route in their sidecar).
pub fn finish(ib: &InboxConfig, folders: &ArchiveFolders, routed: bool) -> usize {
    if (!ib.sets_aside() && !routed) || !ib.path.is_dir() {
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
            let image = path.with_file_name(image_name);
            if ib.wants(&image) && !image.exists() {
                if let Some(done) = follow_image(ib, folders, &image) {
                    report(path, done, &mut handled);
                }
            }
        } else if ib.wants(path) && labelled::is_labelled_under(&ib.path, path) {
            let Some(record) = read_sidecar(path) else { continue };
            let expect = record.file.map(|id| (id.dev, id.inode));
            let done = match (record.status, &record.route) {
                // Kept by its route, or copied or linked already: on_done does not apply to it.
                (Status::Ok, Some(r)) if r.at.is_some() || r.action == RouteAction::Keep.as_str() => continue,
                (Status::Ok, Some(_)) => route(ib, folders, path, expect, &record, true).map(drop),
                (Status::Ok, None) if ib.on_done != OnDone::Keep => apply(ib, folders, path, expect),
                (Status::Error, _) if ib.quarantine.is_some() => quarantine(ib, folders, path, expect).map(drop),
                _ => continue,
            };
            report(path, done, &mut handled);
        }
    }
    if handled > 0 {
        tracing::info!(inbox = %ib.path.display(), on_done = ib.on_done.as_str(), files = handled, "set aside images labelled earlier");
    }
    handled
}

/// A sidecar whose image is gone: the image was set aside and a crash came before its sidecar
/// followed. Moves it to the image (or deletes it, for on_done = "delete"); None if it is not that.
fn follow_image(ib: &InboxConfig, folders: &ArchiveFolders, image: &Path) -> Option<io::Result<()>> {
    let record = read_sidecar(image)?;
    if let Some(routed) = &record.route {
        // Only a move parts an image from its sidecar; copies and links leave both in the inbox.
        if action_of(routed) != Some(RouteAction::Move) {
            return None;
        }
        let to = PathBuf::from(routed.to.as_deref()?);
        let archive = folders.containing(&to)?;
        let dest = relocate::moved_without_sidecar(&archive, &to.join(image.file_name()?))?;
        return Some(move_sidecar(&ib.path, image, &archive, &dest));
    }
    let dir = match (record.status, &ib.on_done, &ib.quarantine) {
        (Status::Ok, OnDone::Move(dir), _) => dir,
        (Status::Ok, OnDone::Delete, _) => return Some(remove_if_present(&ib.path, &sidecar_path(image))),
        (Status::Error, _, Some(q)) => q,
        _ => return None,
    };
    let archive = folders.get(dir)?;
    let wanted = path_under(&ib.path, dir, image).ok()?;
    let dest = relocate::moved_without_sidecar(&archive, &wanted)?;
    Some(move_sidecar(&ib.path, image, &archive, &dest))
}

fn report(path: &Path, r: io::Result<()>, handled: &mut usize) {
    match r {
        Ok(()) => *handled += 1,
        Err(e) => tracing::error!(path = %path.display(), error = %e, "cannot move out of the inbox; retried at the next start"),
    }
}
