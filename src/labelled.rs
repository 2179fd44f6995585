//! Whether an image already has its result: a sidecar beside it that describes the file as it is now.
//! Read by the watcher (skip what is labelled), the sink (complete what a crash interrupted) and the
//! archive step; never through a link.

use std::path::Path;

use crate::beneath::Beneath;
use crate::vocab::{Identity, Record, sidecar_path};

/// The identity a sidecar records, if it exists, is a regular file and parses.
pub fn recorded_identity(root: &Path, image: &Path) -> Option<Identity> {
    let side = sidecar_path(image);
    let (bytes, _) = Beneath::new(root, &side).ok()?.read(1 << 20).ok()?;
    let record: Record = serde_json::from_slice(&bytes).ok()?;
    record.file
}

/// True when `image` has a sidecar describing the file as it is now (same device, inode, size, mtime
/// and ctime). Sidecars written before labeld recorded identities count when at least as new as the
/// image. Neither the image nor the sidecar is followed through a link.
pub fn is_labelled_under(root: &Path, image: &Path) -> bool {
    let Ok(img) = Beneath::new(root, image).and_then(|b| b.metadata()) else {
        return false;
    };
    if !img.is_file() {
        return false;
    }
    let side = sidecar_path(image);
    let Ok((bytes, side_id)) = Beneath::new(root, &side).map_err(|_| ()).and_then(|b| b.read(1 << 20).map_err(|_| ())) else {
        return false;
    };
    match serde_json::from_slice::<Record>(&bytes) {
        Ok(Record { file: Some(id), .. }) => {
            let now = Identity::of(&img);
            id == now || (id.differs_only_in_ctime(&now) && id.xxh3.is_some() && same_bytes(root, image, id))
        }
        // An older sidecar without an identity: judged by time, as labeld did before.
        _ => side_id.mtime_ns >= Identity::of(&img).mtime_ns,
    }
}

/// The file's bytes hash as the sidecar recorded (read only when nothing but its ctime changed).
fn same_bytes(root: &Path, image: &Path, id: Identity) -> bool {
    Beneath::new(root, image).ok().and_then(|b| b.read(id.size).ok()).is_some_and(|(_, now)| now.xxh3 == id.xxh3)
}

/// `is_labelled_under` with the image's own folder as the root: for callers that do not know the inbox.
pub fn is_labelled(image: &Path) -> bool {
    is_labelled_under(image.parent().unwrap_or(Path::new("/")), image)
}

