//! `[workers] threads` defaults from the CPU quota of labeld's cgroup, as systemd's CPUQuota= sets it.
//! Needs root and a writable cgroup file system (cgroup v2 `cpu.max`, or v1 `cpu.cfs_quota_us`).

use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_labeld");

/// A child cgroup limited to one CPU (100 ms per 100 ms); removed on drop.
struct OneCpu(PathBuf);

impl OneCpu {
    fn create() -> OneCpu {
        let name = format!("labeld-test-{}", std::process::id());
        let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers");
        let dir = if v2.exists() {
            let dir = Path::new("/sys/fs/cgroup").join(&name);
            let _ = std::fs::write("/sys/fs/cgroup/cgroup.subtree_control", "+cpu");
            std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("cannot create {} (needs root): {e}", dir.display()));
            std::fs::write(dir.join("cpu.max"), "100000 100000").expect("set cpu.max");
            dir
        } else {
            let dir = Path::new("/sys/fs/cgroup/cpu").join(&name);
            std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("cannot create {} (needs root, cgroup v1 cpu): {e}", dir.display()));
            std::fs::write(dir.join("cpu.cfs_period_us"), "100000").expect("set cpu.cfs_period_us");
            std::fs::write(dir.join("cpu.cfs_quota_us"), "100000").expect("set cpu.cfs_quota_us");
            dir
        };
        OneCpu(dir)
    }
}

impl Drop for OneCpu {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

fn resolved_threads(config: &Path, cgroup: Option<&Path>) -> usize {
    // The shell joins the cgroup, then becomes labeld.
    let join = cgroup.map(|c| format!("echo $$ > {}/cgroup.procs && ", c.display())).unwrap_or_default();
    let cmd = format!("{join}exec {BIN} check-config --config {}", config.display());
    let out = Command::new("sh").args(["-c", &cmd]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.starts_with("threads = ")).unwrap_or_else(|| panic!("{text}"));
    line["threads = ".len()..].parse().unwrap()
}

#[test]
fn threads_default_to_the_cgroup_cpu_quota() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("m.pt"), b"checked for existence only").unwrap();
    let config = dir.path().join("labeld.toml");
    std::fs::write(&config, "[model]\npath = \"m.pt\"\n[workers]\ncount = 1\n").unwrap();

    let cores = std::thread::available_parallelism().unwrap().get();
    assert!(cores >= 2, "this test needs a machine with at least 2 CPUs");
    assert_eq!(resolved_threads(&config, None), cores, "no quota: one thread per CPU");
    let one = OneCpu::create();
    assert_eq!(resolved_threads(&config, Some(&one.0)), 1, "a one-CPU quota means one thread");

    // Explicit settings win over the quota.
    std::fs::write(&config, "[model]\npath = \"m.pt\"\n[workers]\ncount = 1\nthreads = 3\n").unwrap();
    assert_eq!(resolved_threads(&config, Some(&one.0)), 3);
}
