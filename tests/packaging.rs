//! The systemd unit and the Debian package, checked with Debian's own tools.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::{BIN, Notifications, RED, Setup, eventually, solid, wait_for_sidecar};

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
        .expect("run systemd-analyze (Debian package systemd, installed by scripts/setup-system.sh test)");
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
    assert_eq!(std::fs::read_to_string(ctrl.join("conffiles")).unwrap().trim(), "/etc/labeld/labeld.toml\n/etc/logrotate.d/labeld");
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
        "etc/logrotate.d/labeld",
        "lib/systemd/system/labeld.service",
        "usr/lib/sysusers.d/labeld.conf",
        "usr/lib/tmpfiles.d/labeld.conf",
    ] {
        assert!(root.join(f).exists(), "{f} missing from the package");
    }
    assert!(std::fs::read_to_string(root.join("usr/lib/sysusers.d/labeld.conf")).unwrap().contains("u labeld"));
    check_logrotate(&root.join("etc/logrotate.d/labeld"), out_dir.path());

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

    // An ONNX model runs through the ONNX Runtime the package ships beside libtorch.
    let onnx = std::fs::canonicalize(Path::new(ROOT).join("models/default.pt")).unwrap().with_extension("onnx");
    let out = Command::new(&bin)
        .env_remove("LD_LIBRARY_PATH")
        .env_remove("LABELD_ONNXRUNTIME")
        .env("LABELD_LOG", "info")
        .current_dir(out_dir.path())
        .args(["classify", "--model"])
        .arg(&onnx)
        .arg(&photo)
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(root.join("usr/lib/labeld/lib/libonnxruntime.so").is_file());
    assert!(log.contains(&format!("library={}/usr/lib/labeld/lib/libonnxruntime.so", root.display())), "{log}");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((&r["engine"], &r["top"][0]["label"]), (&serde_json::json!("onnxruntime"), &serde_json::json!("espresso")), "{r}");

    verify_unit(&root.join("lib/systemd/system/labeld.service"), &bin, out_dir.path());
    the_man_pages_and_docs_are_in(&root);
}

/// labeld(8) and labeld.toml(5), gzipped where man looks, render without a warning; the README and
/// every guide in docs/ are under /usr/share/doc/labeld.
fn the_man_pages_and_docs_are_in(root: &Path) {
    let pages = [
        ("usr/share/man/man8/labeld.8.gz", &[".TH labeld 8", "labeld check-config", "LABELD_CONFIG", "SIGHUP", "EXIT STATUS"][..]),
        ("usr/share/man/man5/labeld.toml.5.gz", &[".TH LABELD.TOML 5", ".SS [model]", "\\fBmax_body_mb\\fR", ".SS [mqtt]"][..]),
    ];
    for (page, wants) in pages {
        let gz = root.join(page);
        let roff = Command::new("gzip").arg("-dc").arg(&gz).output().unwrap();
        assert!(roff.status.success(), "{page} is not in the package (or not gzipped)");
        let roff = String::from_utf8(roff.stdout).unwrap();
        for want in wants {
            assert!(roff.contains(want), "{page} lacks {want:?}");
        }
        // groff (Debian's groff-base, which man-db needs) with every warning on.
        if Command::new("groff").arg("--version").output().is_err() {
            eprintln!("no groff: {page} checked for its sections only");
            continue;
        }
        let plain = root.join(page.trim_end_matches(".gz"));
        std::fs::write(&plain, &roff).unwrap();
        let out = Command::new("groff").args(["-man", "-Tutf8", "-ww", "-P-cbou"]).env("LC_ALL", "C.UTF-8").arg(&plain).output().unwrap();
        let warnings = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && warnings.trim().is_empty(), "groff on {page}:\n{warnings}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("NAME") && text.contains("SEE ALSO") && text.len() > 2000, "{page} renders to:\n{text}");
    }
    let doc = root.join("usr/share/doc/labeld");
    assert!(doc.join("README.md").exists() && doc.join("labeld.toml.example").exists());
    for guide in std::fs::read_dir(Path::new(ROOT).join("docs")).into_iter().flatten().flatten() {
        let name = guide.file_name().to_string_lossy().into_owned();
        if name.ends_with(".md") {
            assert!(doc.join("docs").join(&name).exists(), "docs/{name} is not in /usr/share/doc/labeld/docs");
        }
    }
}

#[test]
fn version_names_the_commit_and_the_libtorch_it_was_built_with() {
    let out = Command::new(BIN).arg("--version").output().unwrap();
    assert!(out.status.success());
    let line = String::from_utf8(out.stdout).unwrap();
    let libtorch = std::env::var("LIBTORCH").map(|l| Path::new(ROOT).join(l)).unwrap_or_else(|_| Path::new(ROOT).join(".deps/libtorch"));
    let torch_version = std::fs::read_to_string(libtorch.join("build-version")).unwrap_or_else(|_| "unknown".into());
    let git = Command::new("git").args(["rev-parse", "--short", "HEAD"]).current_dir(ROOT).output();
    let commit = match git {
        Ok(o) if o.status.success() => String::from_utf8(o.stdout).unwrap().trim().to_string(),
        _ => "unknown".into(), // a source tarball
    };
    let want = format!("labeld {} (commit {commit}, libtorch {})\n", env!("CARGO_PKG_VERSION"), torch_version.trim());
    assert_eq!(line, want);
}

/// The shipped logrotate entry rotates the CSV log by rename + SIGHUP and keeps the newest rotated log
/// uncompressed (the MQTT outbox reads it until published); `logrotate --debug` parses it where installed.
fn check_logrotate(file: &Path, dir: &Path) {
    let text = std::fs::read_to_string(file).unwrap();
    for want in ["/var/log/labeld/results.csv {", "create 0640 labeld labeld", "delaycompress", "su labeld labeld", "postrotate", "kill --signal=HUP", "endscript"] {
        assert!(text.contains(want), "logrotate entry lacks {want:?}:\n{text}");
    }
    assert!(!text.contains("copytruncate"), "rename + SIGHUP, not copytruncate");
    // --debug parses and plans without rotating or running postrotate; the package's user may not
    // exist on the build machine, so the check reads a copy that names root.
    let copy = dir.join("logrotate.conf");
    std::fs::write(&copy, text.replace(" labeld labeld", " root root")).unwrap();
    let state = dir.join("logrotate.state");
    match Command::new("logrotate").arg("--debug").arg("--state").arg(&state).arg(&copy).output() {
        Ok(out) => {
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success() && !err.contains("error:"), "logrotate --debug:\n{err}");
        }
        Err(e) => eprintln!("logrotate not installed ({e}): its own syntax check skipped"),
    }
}

/// The system calls a systemd syscall-filter group allows, groups expanded.
fn syscall_group(group: &str) -> BTreeSet<String> {
    let out = Command::new("systemd-analyze").arg("syscall-filter").output().expect("run systemd-analyze");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut groups: HashMap<String, Vec<String>> = HashMap::new();
    let mut current = None;
    for line in text.lines() {
        if line.starts_with('@') {
            current = Some(line.trim().to_string());
            groups.entry(line.trim().to_string()).or_default();
        } else if let (Some(g), Some(member)) = (&current, line.strip_prefix("    ")) {
            if !member.starts_with('#') && !member.trim().is_empty() {
                groups.get_mut(g).unwrap().push(member.trim().to_string());
            }
        }
    }
    fn expand(g: &str, groups: &HashMap<String, Vec<String>>, out: &mut BTreeSet<String>) {
        for m in groups.get(g).unwrap_or_else(|| panic!("no syscall group {g}")) {
            if m.starts_with('@') { expand(m, groups, out) } else { out.insert(m.clone()); }
        }
    }
    let mut out = BTreeSet::new();
    expand(group, &groups, &mut out);
    out
}

#[test]
fn every_system_call_labeld_makes_is_allowed_by_the_units_filter() {
    // The unit kills labeld (SIGSYS) on any call outside SystemCallFilter=@system-service: trace a
    // daemon through start, a labelled image, an HTTP upload, a reload and a stop, and compare.
    let unit = std::fs::read_to_string(Path::new(ROOT).join("systemd/labeld.service")).unwrap();
    assert!(unit.contains("SystemCallFilter=@system-service\n"));
    let allowed = syscall_group("@system-service");
    assert!(allowed.contains("openat") && allowed.contains("futex"), "{allowed:?}");

    let s = Setup::new("channel_mean", "[http]\nlisten = \"127.0.0.1:0\"\n[retention]\nmax_age_days = 30\ninterval_s = 10\n");
    // Retention sweeps walk done_dir (with a file that is not labeld's) and remove an old image labeld
    // archived there (its record in the ledger written before the move).
    s.edit_config("settle_ms = 200\n", "settle_ms = 200\non_done = \"move\"\ndone_dir = \"done\"\n");
    std::fs::create_dir_all(s.dir.path().join("done/cam1")).unwrap();
    std::fs::write(s.dir.path().join("done/cam1/theirs.jpg"), b"x").unwrap();
    std::fs::create_dir_all(s.inbox.join("cam1")).unwrap();
    let old = s.inbox.join("cam1/old.png");
    solid(&old, RED, 32, 32);
    std::fs::File::options().write(true).open(&old).unwrap().set_modified(std::time::SystemTime::now() - Duration::from_secs(60 * 86_400)).unwrap();
    let trace = s.dir.path().join("strace.log");
    let log = s.dir.path().join("daemon.log");
    let mut systemd = Notifications::bind(s.dir.path());
    let mut strace = Command::new("strace")
        .args(["-f", "-qq", "-o"])
        .arg(&trace)
        .arg(BIN)
        .args(["run", "--config"])
        .arg(&s.config)
        .env("LABELD_LOG", "info")
        .env("NOTIFY_SOCKET", systemd.socket())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("run strace (Debian package strace, installed by scripts/setup-system.sh test)");
    let wait_log = |needle: &str| {
        eventually(format_args!("{needle:?} in the daemon log"), Duration::from_secs(120), || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            text.contains(needle).then_some(()).ok_or(text)
        });
    };
    systemd.wait_for("READY=1", Duration::from_secs(120));
    wait_log("retention: removed");
    solid(&s.inbox.join("red.png"), RED, 64, 64);
    wait_for_sidecar(&s.dir.path().join("done/red.png"), Duration::from_secs(60));
    let text = std::fs::read_to_string(&log).unwrap();
    let line = text.lines().find(|l| l.contains("HTTP on")).unwrap();
    let addr = line[line.find("addr=").unwrap() + 5..].split_whitespace().next().unwrap().to_string();
    let mut png = std::io::Cursor::new(Vec::new());
    image::RgbImage::from_pixel(32, 32, image::Rgb(RED)).write_to(&mut png, image::ImageFormat::Png).unwrap();
    let r = ureq::post(format!("http://{addr}/predict")).send(&png.into_inner()[..]).unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let pid = String::from_utf8(Command::new("pgrep").args(["-P", &strace.id().to_string()]).output().unwrap().stdout).unwrap();
    let pid = pid.trim().to_string();
    assert!(!pid.is_empty(), "labeld's pid under strace");
    assert!(Command::new("kill").args(["-HUP", &pid]).status().unwrap().success());
    wait_log("config reloaded");
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let status = eventually("labeld stopping under strace", Duration::from_secs(60), || strace.try_wait().unwrap());
    assert!(status.success(), "labeld exit under strace: {status:?}");

    let used: BTreeSet<String> = std::fs::read_to_string(&trace)
        .unwrap()
        .lines()
        .filter_map(|l| {
            let rest = l.split_once(' ')?.1.trim_start();
            let name: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            (!name.is_empty() && rest[name.len()..].starts_with('(')).then_some(name)
        })
        .collect();
    assert!(used.len() > 30 && used.contains("inotify_add_watch") && used.contains("accept4"), "{used:?}");
    let outside: Vec<_> = used.difference(&allowed).collect();
    assert!(outside.is_empty(), "system calls outside @system-service (the unit would kill labeld): {outside:?}");
}

fn packages(role: &str) -> BTreeSet<String> {
    let out = Command::new(Path::new(ROOT).join("scripts/setup-system.sh")).args(["--list", role]).output().unwrap();
    assert!(out.status.success(), "setup-system.sh --list {role}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().lines().map(str::to_string).collect()
}

#[test]
fn make_run_installs_only_what_building_and_running_need() {
    let run = packages("run");
    assert!(run.contains("libturbojpeg0-dev") && run.contains("python3-torch"), "{run:?}");
    let test = packages("test");
    for only_tests in ["chromium", "strace", "systemd", "patchelf", "mosquitto", "mosquitto-clients", "openssl", "groff-base", "logrotate", "time"] {
        assert!(!run.contains(only_tests), "make run would install {only_tests}");
        assert!(test.contains(only_tests) || only_tests == "time", "make test lacks {only_tests}");
    }
    assert!(run.is_subset(&test) && run.is_subset(&packages("deb")) && packages("deb").contains("patchelf"));
    assert!(packages("bench").contains("time"));
    // The image's tools only where images are built: not for make run, not for make test.
    let image = packages("image");
    assert!(run.is_subset(&image) && packages("deb").is_subset(&image), "make image builds the .deb: {image:?}");
    for only_image in ["mmdebstrap", "buildah", "skopeo", "umoci"] {
        assert!(image.contains(only_image), "make image lacks {only_image}");
        assert!(!run.contains(only_image) && !test.contains(only_image), "make run or make test would install {only_image}");
    }
    // The Makefile asks for the right role at each target.
    let make = std::fs::read_to_string(Path::new(ROOT).join("Makefile")).unwrap();
    let recipe = |target: &str| -> String {
        let recipe = make.split(&format!("\n{target}")).nth(1).unwrap_or_else(|| panic!("no {target} in the Makefile"));
        recipe.split("\n\n").next().unwrap().to_string()
    };
    for (target, role) in [("deps:", "run"), ("test:", "test"), ("deb:", "deb"), ("bench:", "bench"), ("image:", "image"), ("image-test:", "image")] {
        let recipe = recipe(target);
        assert!(recipe.contains(&format!("scripts/setup-system.sh {role}")), "{target} does not set up {role}:{recipe}");
    }
    // make test leaves the image tests out (#[ignore]: they need the built image and minutes); make
    // image-test runs them.
    assert!(!recipe("test:").contains("ignored"), "{}", recipe("test:"));
    assert!(recipe("image-test:").contains("--test image -- --include-ignored"), "{}", recipe("image-test:"));
}

/// scripts/packaged-config.py's output for `profile` with `sets` (`section.key=path`).
fn packaged_config(profile: &str, sets: &[String]) -> String {
    let mut cmd = Command::new(Path::new(ROOT).join("scripts/packaged-config.py"));
    cmd.arg(profile);
    for s in sets {
        cmd.args(["--set", s]);
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "packaged-config.py {profile}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

const PATH_KEYS: [&str; 5] = ["model.path", "inbox.path", "inbox.done_dir", "inbox.quarantine", "output.csv"];

/// Line numbers of `text` that are a path key (set or commented) or the comment block right above one,
/// or the header before the first section: what a packaged config may change.
fn path_lines(text: &str) -> BTreeSet<usize> {
    let lines: Vec<&str> = text.lines().collect();
    let mut allowed = BTreeSet::new();
    let mut section = String::new();
    let first_section = lines.iter().position(|l| l.starts_with('[')).unwrap();
    allowed.extend(0..first_section);
    for (i, line) in lines.iter().enumerate() {
        let bare = line.trim_start_matches('#').trim();
        if bare.starts_with('[') {
            section = bare.trim_start_matches('[').split(']').next().unwrap().to_string();
        }
        let key = bare.split('=').next().unwrap().trim();
        if bare.contains('=') && PATH_KEYS.contains(&format!("{section}.{key}").as_str()) {
            allowed.insert(i);
            let mut j = i;
            while j > 0 && lines[j - 1].trim_start().starts_with('#') && !lines[j - 1].trim_start_matches('#').trim().starts_with('[') {
                j -= 1;
                allowed.insert(j);
            }
        }
    }
    allowed
}

/// Sets every path key of a parsed config to "" (the settings a packaged config must share).
fn without_paths(text: &str) -> toml::Value {
    let mut v: toml::Value = toml::from_str(text).unwrap();
    for key in PATH_KEYS {
        let (section, k) = key.split_once('.').unwrap();
        let tables: Vec<&mut toml::Value> = match v.get_mut(section) {
            Some(toml::Value::Array(a)) => a.iter_mut().collect(),
            Some(t) => vec![t],
            None => vec![],
        };
        for t in tables {
            if let Some(x) = t.get_mut(k) {
                *x = toml::Value::String(String::new());
            }
        }
    }
    v
}

/// The .deb's and the container image's /etc/labeld/labeld.toml are config/labeld.toml (what `make run`
/// and `make bench` run) with other paths and nothing else: same keys and values, same comments but
/// those about paths. Changing the script to alter anything else fails here; so does a packaged config
/// that labeld refuses.
#[test]
fn the_packaged_configs_differ_from_the_shipped_one_only_in_paths() {
    let source = std::fs::read_to_string(Path::new(ROOT).join("config/labeld.toml")).unwrap();
    assert_eq!(packaged_config("checkout", &[]), source, "the checkout profile is the file itself");
    let src_lines: Vec<&str> = source.lines().collect();
    let src_allowed = path_lines(&source);
    for profile in ["system", "container"] {
        let text = packaged_config(profile, &[]);
        assert_eq!(without_paths(&text), without_paths(&source), "{profile}: settings other than paths differ");
        let lines: Vec<&str> = text.lines().collect();
        let allowed = path_lines(&text);
        let kept_src: Vec<&str> = src_lines.iter().enumerate().filter(|(i, _)| !src_allowed.contains(i)).map(|(_, l)| *l).collect();
        let kept: Vec<&str> = lines.iter().enumerate().filter(|(i, _)| !allowed.contains(i)).map(|(_, l)| *l).collect();
        assert_eq!(kept, kept_src, "{profile}: lines other than paths and their comments differ");
        assert!(text.contains("path = \"/usr/share/labeld/models/default.pt\"") && text.contains("path = \"/var/lib/labeld/inbox\""), "{text}");
        assert!(!text.contains("../"), "{profile}: a checkout path is left: {text}");

        // Valid as it is once its paths exist: rewritten into a temporary root.
        let dir = tempfile::tempdir().unwrap();
        let model = std::fs::canonicalize(Path::new(ROOT).join("models/default.pt")).unwrap();
        let sets = [
            format!("model.path={}", model.display()),
            format!("inbox.path={}", dir.path().join("inbox").display()),
            format!("output.csv={}", dir.path().join("results.csv").display()),
        ];
        let rewritten = packaged_config(profile, &sets);
        assert_eq!(without_paths(&rewritten), without_paths(&source));
        let file = dir.path().join("labeld.toml");
        std::fs::write(&file, rewritten).unwrap();
        let check = Command::new(BIN).args(["check-config", "--config"]).arg(&file).output().unwrap();
        assert!(check.status.success(), "{profile}: {}", String::from_utf8_lossy(&check.stderr));
    }
    let bad = Command::new(Path::new(ROOT).join("scripts/packaged-config.py")).args(["system", "--set", "workers.count=/x"]).output().unwrap();
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("expected KEY=PATH"), "only path keys can be set");
}
