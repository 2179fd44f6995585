//! The roles of configured folders may not overlap: an archive folder (`done_dir`, `quarantine`) is
//! never an inbox, never inside one (but for a dot-folder, which the watcher never enters), never holds
//! one, never holds or lies inside another archive folder (one folder may serve several roles), is
//! never a link itself, and is never `/`, a top-level folder or a system folder. Paths are compared as
//! the kernel resolves them, links included, so a link cannot make two roles one folder.

use std::path::{Component, Path, PathBuf};

use super::{InboxConfig, OnDone};

/// System trees nothing of labeld's may be archived (and swept) in.
const SYSTEM: &[&str] = &[
    "/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/proc", "/run", "/sbin", "/sys", "/usr", "/var/cache",
    "/var/lib/apt", "/var/lib/dpkg", "/var/lib/systemd", "/var/log", "/var/mail", "/var/spool",
];
/// Folders that hold other programs' data, themselves (a sub-folder of labeld's own is fine).
const SHARED: &[&str] = &["/var/lib", "/var/tmp", "/home", "/root"];
/// Hidden folders of other programs' secrets, wherever they are.
const SECRET: &[&str] = &[".ssh", ".gnupg"];

/// `path` as the kernel resolves it now: its longest existing ancestor canonicalised (links followed),
/// the rest appended as written. `path` is absolute and has no `.` or `..` (the config made it so).
pub fn resolved(path: &Path) -> PathBuf {
    let mut existing = path;
    let mut rest = Vec::new();
    loop {
        if let Ok(real) = std::fs::canonicalize(existing) {
            return rest.iter().rev().fold(real, |p, c| p.join(c));
        }
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_os_string());
                existing = parent;
            }
            _ => return path.to_path_buf(),
        }
    }
}

/// Checks every archive folder of `inboxes`, and the folder of every route (`routes`: its key and
/// the fixed part of its `to`), against every inbox and every other archive folder. A route folder
/// inside an inbox would have its images labelled again. Err: (key, reason) naming both keys and paths.
pub fn check(inboxes: &[InboxConfig], routes: &[(String, PathBuf)]) -> Result<(), (String, String)> {
    let roots: Vec<(String, PathBuf)> = inboxes.iter().enumerate().map(|(i, ib)| (format!("[[inbox]] #{} path", i + 1), resolved(&ib.path))).collect();
    let mut archives: Vec<(String, PathBuf)> = Vec::new();
    let mut folders: Vec<(String, PathBuf)> = Vec::new();
    for (i, ib) in inboxes.iter().enumerate() {
        let done = match &ib.on_done {
            OnDone::Move(d) => Some(("done_dir", d)),
            _ => None,
        };
        let own = done.into_iter().chain(ib.quarantine.as_ref().map(|q| ("quarantine", q)));
        folders.extend(own.map(|(name, path)| (format!("[[inbox]] #{} {name}", i + 1), path.clone())));
    }
    folders.extend(routes.iter().cloned());
    for (key, path) in folders {
        check_one(&path, &roots).map_err(|reason| (key.clone(), reason))?;
        let real = resolved(&path);
        for (other_key, other) in &archives {
            let nested = real != *other && (real.starts_with(other) || other.starts_with(&real));
            if nested {
                return Err((key, format!(
                    "{} and {other_key} ({}) lie one inside the other; each archive folder is swept on its own: use the same folder, or folders side by side",
                    real.display(),
                    other.display()
                )));
            }
        }
        archives.push((key, real));
    }
    Ok(())
}

/// `path` may be an archive folder beside the inboxes `inbox_paths` (as configured): for a folder
/// opened after start (it was not there yet), checked again as the config check did.
pub fn check_archive_folder(path: &Path, inbox_paths: &[PathBuf]) -> Result<(), String> {
    let roots: Vec<(String, PathBuf)> = inbox_paths.iter().map(|p| (format!("the inbox {}", p.display()), resolved(p))).collect();
    check_one(path, &roots)
}

fn check_one(path: &Path, inboxes: &[(String, PathBuf)]) -> Result<(), String> {
    if let Ok(target) = std::fs::read_link(path) {
        return Err(format!(
            "{} is a symbolic link (to {}); name the folder itself: archive folders are opened without following links",
            path.display(),
            target.display()
        ));
    }
    let real = resolved(path);
    let shown = if real == path { path.display().to_string() } else { format!("{} (resolved: {})", path.display(), real.display()) };
    let depth = real.components().filter(|c| matches!(c, Component::Normal(_))).count();
    let secret = real.components().any(|c| SECRET.iter().any(|s| c.as_os_str() == *s));
    if depth <= 1 || SYSTEM.iter().any(|s| real.starts_with(s)) || SHARED.iter().any(|s| real == Path::new(s)) || secret {
        return Err(format!(
            "{shown} is / , a top-level folder or a system folder; retention could sweep it: use a folder of labeld's own, such as /var/lib/labeld/done"
        ));
    }
    for (key, inbox) in inboxes {
        if real == *inbox {
            return Err(format!("{shown} is the inbox of {key} ({}); images there are not labelled yet", inbox.display()));
        }
        if inbox.starts_with(&real) {
            return Err(format!("{shown} contains the inbox of {key} ({}); use a folder beside the inboxes, not above them", inbox.display()));
        }
        if let Ok(rel) = real.strip_prefix(inbox) {
            let hidden = rel.components().next().is_some_and(|c| c.as_os_str().as_encoded_bytes().starts_with(b"."));
            if !hidden {
                return Err(format!(
                    "{shown} is inside the inbox of {key} ({}); use a folder outside it or a dot-folder such as \".done\", which is never watched",
                    inbox.display()
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inbox(d: &Path) -> (String, PathBuf) {
        ("[[inbox]] #1 path".into(), resolved(d))
    }

    #[test]
    fn resolution_follows_links_in_the_existing_part_only() {
        let d = tempfile::tempdir().unwrap();
        let real = d.path().join("real");
        std::fs::create_dir(&real).unwrap();
        std::os::unix::fs::symlink(&real, d.path().join("link")).unwrap();
        let canon = std::fs::canonicalize(d.path()).unwrap();
        assert_eq!(resolved(&d.path().join("link/not/yet")), canon.join("real/not/yet"));
        assert_eq!(resolved(Path::new("/")), PathBuf::from("/"));
    }

    #[test]
    fn archive_folders_that_overlap_an_inbox_or_the_system_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let in1 = d.path().join("in1");
        std::fs::create_dir(&in1).unwrap();
        std::os::unix::fs::symlink(&in1, d.path().join("link-to-in1")).unwrap();
        let ibs = [inbox(&in1)];
        let refused = |p: &Path| check_one(p, &ibs).unwrap_err();
        assert!(refused(&in1).contains("is the inbox of [[inbox]] #1 path"));
        assert!(refused(&in1.join("done")).contains("inside the inbox"));
        assert!(refused(d.path()).contains("contains the inbox"));
        let e = refused(&d.path().join("link-to-in1"));
        assert!(e.contains("symbolic link"), "{e}");
        assert!(refused(&d.path().join("link-to-in1/sub")).contains("inside the inbox"), "through a link in the path");
        for sys in ["/", "/etc", "/srv", "/usr/share/x", "/proc/1", "/var/lib", "/var/log/x", "/var/lib/dpkg/x", "/root/.ssh/done", "/home"] {
            assert!(refused(Path::new(sys)).contains("system folder"), "{sys}");
        }
        check_one(&in1.join(".done"), &ibs).unwrap();
        check_one(&d.path().join("done"), &ibs).unwrap();
        check_one(Path::new("/var/lib/labeld/done"), &ibs).unwrap();
        check_one(Path::new("/home/cam/done"), &ibs).unwrap();
    }
}

#[cfg(test)]
mod nesting {
    use super::super::tests::{MINIMAL, setup};
    use super::super::*;

    #[test]
    fn archive_folders_nested_in_each_other_are_refused_and_a_shared_one_is_fine() {
        let (_dir, file) = setup();
        let e = Config::parse(&file, &format!("{MINIMAL}on_done = \"move\"\ndone_dir = \"d\"\nquarantine = \"d/q\"\n")).unwrap_err();
        assert_eq!(e.key, "[[inbox]] #1 quarantine");
        assert!(e.reason.contains("one inside the other"), "{e}");
        let shared = format!("{MINIMAL}on_done = \"move\"\ndone_dir = \"d\"\nquarantine = \"d\"\n[[inbox]]\npath = \"in2\"\nquarantine = \"d\"\n");
        Config::parse(&file, &shared).unwrap();
    }
}
