//! The systemd unit and the Debian package, checked with Debian's own tools.

use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_labeld");
const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// `systemd-analyze verify` on a unit file, with its ExecStart binary pointed at `bin` (verify
/// insists the binary exists, and /usr/bin/labeld is only there once the package is installed).
fn verify_unit(unit: &Path, bin: &Path, dir: &Path) {
    let text = std::fs::read_to_string(unit).unwrap();
    assert!(text.contains("ExecStart=/usr/bin/labeld run --config /etc/labeld/labeld.toml"), "{text}");
    let copy = dir.join("labeld.service");
    std::fs::write(&copy, text.replace("ExecStart=/usr/bin/labeld", &format!("ExecStart={}", bin.display()))).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&copy)
        .output()
        .expect("run systemd-analyze (Debian package systemd, installed by scripts/setup-system.sh)");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.trim().is_empty(), "systemd-analyze verify:\n{err}");
}

#[test]
fn the_unit_passes_systemd_analyze_verify_and_is_hardened() {
    let dir = tempfile::tempdir().unwrap();
    let unit = Path::new(ROOT).join("systemd/labeld.service");
    verify_unit(&unit, Path::new(BIN), dir.path());
    let text = std::fs::read_to_string(&unit).unwrap();
    for want in [
        "Type=notify",
        "WatchdogSec=",
        "Restart=on-failure",
        "RestartPreventExitStatus=2",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "User=labeld",
        "ProtectSystem=strict",
        "ReadWritePaths=/var/lib/labeld /var/log/labeld",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=\n",
        "SystemCallFilter=@system-service",
        "MemoryMax=",
    ] {
        assert!(text.contains(want), "unit lacks {want:?}");
    }
}

#[test]
fn the_deb_unpacks_to_a_binary_that_finds_its_libtorch_through_the_rpath_and_classifies() {
    let out_dir = tempfile::tempdir().unwrap();
    let built = Command::new(Path::new(ROOT).join("scripts/build-deb.sh"))
        .arg(out_dir.path())
        .env("LABELD_DEB_COMPRESS", "none") // fast; `make deb` compresses with zstd
        .env("LABELD_BIN", BIN)
        .output()
        .unwrap();
    assert!(built.status.success(), "build-deb.sh: {}", String::from_utf8_lossy(&built.stderr));
    let deb = String::from_utf8_lossy(&built.stdout).trim().to_string();
    assert!(deb.ends_with("_amd64.deb"), "{deb}");

    let info = Command::new("dpkg-deb").args(["--info", &deb]).output().unwrap();
    let info = String::from_utf8_lossy(&info.stdout);
    assert!(info.contains("Package: labeld") && info.contains("libturbojpeg0"), "{info}");
    let ctrl = out_dir.path().join("ctrl");
    std::fs::create_dir(&ctrl).unwrap();
    let x = Command::new("dpkg-deb").args(["-e", &deb]).arg(&ctrl).status().unwrap();
    assert!(x.success());
    assert_eq!(std::fs::read_to_string(ctrl.join("conffiles")).unwrap().trim(), "/etc/labeld/labeld.toml");
    assert!(std::fs::read_to_string(ctrl.join("postinst")).unwrap().contains("systemd-sysusers"));

    let root = out_dir.path().join("root");
    let x = Command::new("dpkg-deb").args(["-x", &deb]).arg(&root).status().unwrap();
    assert!(x.success());
    for f in [
        "usr/bin/labeld",
        "usr/lib/labeld/lib/libtorch_cpu.so",
        "usr/lib/labeld/lib/libc10.so",
        "usr/share/labeld/models/default.pt",
        "etc/labeld/labeld.toml",
        "lib/systemd/system/labeld.service",
        "usr/lib/sysusers.d/labeld.conf",
        "usr/lib/tmpfiles.d/labeld.conf",
    ] {
        assert!(root.join(f).exists(), "{f} missing from the package");
    }
    assert!(std::fs::read_to_string(root.join("usr/lib/sysusers.d/labeld.conf")).unwrap().contains("u labeld"));

    // The unpacked binary runs with no LD_LIBRARY_PATH: its RUNPATH leads to the private libtorch.
    let bin = root.join("usr/bin/labeld");
    let ldd = Command::new("ldd").arg(&bin).env_remove("LD_LIBRARY_PATH").output().unwrap();
    let ldd = String::from_utf8_lossy(&ldd.stdout);
    let torch = ldd.lines().find(|l| l.contains("libtorch_cpu.so")).unwrap();
    assert!(torch.contains(&format!("{}/usr/bin/../lib/labeld/lib/libtorch_cpu.so", root.display())), "{torch}");
    assert!(!ldd.contains("not found"), "{ldd}");

    // The shipped system config is valid where the package put its model.
    let cfg = std::fs::read_to_string(root.join("etc/labeld/labeld.toml")).unwrap();
    assert!(cfg.contains("/usr/share/labeld/models/default.pt") && cfg.contains("listen = \"127.0.0.1:9187\""));
    let local_cfg = out_dir.path().join("labeld.toml");
    std::fs::write(&local_cfg, cfg.replace("/usr/share/labeld/models/default.pt", root.join("usr/share/labeld/models/default.pt").to_str().unwrap())).unwrap();
    let check = Command::new(&bin).env_remove("LD_LIBRARY_PATH").args(["check-config", "--config"]).arg(&local_cfg).output().unwrap();
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));

    let photo = Path::new(ROOT).join("tests/data/coffee.jpg");
    let out = Command::new(&bin)
        .env_remove("LD_LIBRARY_PATH")
        .current_dir(out_dir.path())
        .args(["classify", "--model"])
        .arg(root.join("usr/share/labeld/models/default.pt"))
        .arg(&photo)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["status"], "ok");
    assert_eq!(r["top"][0]["label"], "espresso", "{r}");

    verify_unit(&root.join("lib/systemd/system/labeld.service"), &bin, out_dir.path());
}
