//! Where an image's sidecar is: `a.jpg` → `a.jpg.json` beside it (a shortened, stable name when that
//! would be too long for the file system).

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

/// The longest file name Linux file systems take (NAME_MAX).
const NAME_MAX: usize = 255;

/// `a.jpg` → `a.jpg.json`. A name too long for that (over 250 bytes) gets
/// `<its first 233 bytes>~<16 hex of a hash of the whole name>.json`, which always fits and is the same
/// at every start.
pub fn sidecar_path(image: &Path) -> PathBuf {
    let name = image.file_name().unwrap_or_default();
    image.with_file_name(sidecar_name(name))
}

pub fn sidecar_name(name: &OsStr) -> OsString {
    let bytes = name.as_bytes();
    if bytes.len() + ".json".len() <= NAME_MAX {
        let mut s = name.to_owned();
        s.push(".json");
        return s;
    }
    let keep = NAME_MAX - ".json".len() - 17;
    // Cut on a UTF-8 boundary where the name is UTF-8, so the sidecar name stays readable.
    let mut cut = keep;
    while cut > 0 && std::str::from_utf8(&bytes[..cut]).is_err() && std::str::from_utf8(bytes).is_ok() {
        cut -= 1;
    }
    let mut out = bytes[..cut].to_vec();
    out.extend(format!("~{:016x}.json", fnv1a(bytes)).into_bytes());
    OsString::from_vec(out)
}

/// FNV-1a, 64 bit: stable across builds and machines (unlike std's hasher).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sidecar_sits_beside_the_image_with_json_appended() {
        assert_eq!(sidecar_path(Path::new("/in/a.jpg")), PathBuf::from("/in/a.jpg.json"));
        assert_eq!(sidecar_path(Path::new("/in/b.tar.png")), PathBuf::from("/in/b.tar.png.json"));
    }

    #[test]
    fn a_name_too_long_for_a_sidecar_gets_a_short_stable_one() {
        let long = format!("/in/{}.jpg", "é".repeat(124)); // 252 bytes
        let side = sidecar_path(Path::new(&long));
        let name = side.file_name().unwrap().as_bytes();
        assert!(name.len() <= NAME_MAX, "{}", name.len());
        assert!(side.to_str().is_some(), "cut on a character boundary");
        assert!(side.to_string_lossy().ends_with(".json"));
        assert_eq!(side, sidecar_path(Path::new(&long)));
        let other = format!("/in/{}.png", "é".repeat(124));
        assert_ne!(side, sidecar_path(Path::new(&other)));
    }
}
