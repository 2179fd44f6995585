//! The container image (what it relies on in labeld itself, `labeld probe` and JSON logs, is tested in
//! http.rs and daemon.rs). Always run: deploy/*.yaml against what the image is built with. Ignored by
//! `make test`, run by `make image-test` (which builds the image first when it is older than its
//! inputs): the archive `make image` wrote, taken apart and run the way a container runtime runs it,
//! without one (podman cannot start containers on the build machines, docker has no engine there). The
//! config is read from the archive; the root is unpacked (skopeo, umoci); labeld starts as PID 1 of new
//! mount, PID, network, IPC and UTS namespaces, chrooted into the root mounted read-only, as the image's
//! user, with a host folder as its volume; real photos dropped into the volume get their rows; the
//! image's own health check answers; SIGTERM stops it with exit 0.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Polls `fact` every 100 ms until it returns `Some`, or panics with `what` after `timeout`.
fn eventually<T>(timeout: Duration, what: &str, mut fact: impl FnMut() -> Option<T>) -> T {
    let t = Instant::now();
    loop {
        if let Some(v) = fact() {
            return v;
        }
        assert!(t.elapsed() < timeout, "after {timeout:?}: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// deploy/compose.yaml and deploy/kubernetes.yaml, parsed (Debian's python3-yaml, which python3-torch
/// brings), name what the image is built with: its tag, user, volume and health endpoints.
#[test]
fn the_compose_and_kubernetes_files_match_the_image() {
    let read = |rel: &str| std::fs::read_to_string(Path::new(ROOT).join(rel)).unwrap();
    let build = read("scripts/build-image.sh");
    assert!(build.contains("LABELD_IMAGE_UID=10001\n") && build.contains("PORT=9187\n"), "the image's user or port changed: update deploy/ and the docs");
    let container = run(Command::new(Path::new(ROOT).join("scripts/packaged-config.py")).arg("container"));
    assert!(String::from_utf8_lossy(&container.stdout).contains("listen = \"127.0.0.1:9187\""));
    let yaml = |rel: &str| -> Value {
        let script = "import json, sys, yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))";
        let out = run(Command::new("/usr/bin/python3").args(["-c", script]).arg(Path::new(ROOT).join(rel)));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let tag = format!("labeld:{}", env!("CARGO_PKG_VERSION"));
    let probe = |path: &str| serde_json::json!(["labeld", "probe", format!("http://127.0.0.1:9187{path}")]);

    let compose = yaml("deploy/compose.yaml");
    let svc = &compose["services"]["labeld"];
    assert_eq!(svc["image"], tag.as_str());
    assert_eq!(svc["read_only"], true);
    assert!(svc["volumes"][0].as_str().is_some_and(|v| v.ends_with(":/var/lib/labeld")), "{svc}");
    assert!(svc["healthcheck"].is_null(), "the image's own health check applies");

    let k8s = yaml("deploy/kubernetes.yaml");
    assert_eq!((k8s["kind"].as_str(), k8s["spec"]["strategy"]["type"].as_str()), (Some("Deployment"), Some("Recreate")));
    let pod = &k8s["spec"]["template"]["spec"];
    let user = &pod["securityContext"];
    assert_eq!((user["runAsUser"].as_u64(), user["runAsGroup"].as_u64(), user["runAsNonRoot"].as_bool()), (Some(10001), Some(10001), Some(true)));
    let c = &pod["containers"][0];
    assert_eq!(c["image"], tag.as_str());
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["volumeMounts"][0]["mountPath"], VOLUME);
    assert_eq!(c["livenessProbe"]["exec"]["command"], probe("/healthz"));
    assert_eq!(c["startupProbe"]["exec"]["command"], probe("/healthz"));
    assert_eq!(c["readinessProbe"]["exec"]["command"], probe("/readyz"));
}

// ---- the built image ----

/// (header, rows) of a results log; every row must parse and have the header's width.
fn read_csv(path: &Path) -> (csv::StringRecord, Vec<csv::StringRecord>) {
    let mut r = csv::Reader::from_path(path).expect("open results.csv");
    let header = r.headers().expect("csv header").clone();
    let rows: Vec<_> = r.records().map(|x| x.expect("every CSV row parses")).collect();
    assert!(rows.iter().all(|row| row.len() == header.len()), "{rows:?}");
    (header, rows)
}

const VOLUME: &str = "/var/lib/labeld";

fn archive() -> PathBuf {
    let a = Path::new(ROOT).join(format!("target/image/labeld-{}.docker.tar", env!("CARGO_PKG_VERSION")));
    assert!(a.exists(), "no {}: build it with `make image` (`make image-test` does)", a.display());
    a
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e} (scripts/setup-system.sh image installs it)"));
    assert!(out.status.success(), "{cmd:?}: {}\n{}", out.status, text(&out.stderr));
    out
}

/// The image's root, unpacked as a runtime would (skopeo to an OCI layout, then umoci).
struct Unpacked {
    dir: tempfile::TempDir,
    root: PathBuf,
    /// The image config's `config` object: User, Env, Entrypoint, Volumes, Healthcheck, Labels…
    config: Value,
    env: Vec<(String, String)>,
    uid: u32,
    gid: u32,
}

fn unpack() -> Unpacked {
    let archive = archive();
    let source = format!("docker-archive:{}", archive.display());
    let inspected = run(Command::new("skopeo").args(["inspect", "--config", "--raw", &source]));
    let image: Value = serde_json::from_slice(&inspected.stdout).unwrap();
    let config = image["config"].clone();
    let dir = tempfile::tempdir().unwrap();
    let layout = format!("{}:labeld", dir.path().join("oci").display());
    run(Command::new("skopeo").args(["copy", "--quiet", &source, &format!("oci:{layout}")]));
    run(Command::new("umoci").args(["unpack", "--image", &layout]).arg(dir.path().join("bundle")));
    let env = config["Env"]
        .as_array()
        .expect("Env in the image config")
        .iter()
        .filter_map(|e| e.as_str()?.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
        .collect();
    let user = config["User"].as_str().expect("User in the image config");
    let (uid, gid) = user.split_once(':').unwrap_or_else(|| panic!("User {user:?} is not numeric uid:gid"));
    let (uid, gid) = (uid.parse().expect("numeric uid"), gid.parse().expect("numeric gid"));
    Unpacked { root: dir.path().join("bundle/rootfs"), dir, config, env, uid, gid }
}

impl Unpacked {
    /// A command run inside the image the way a runtime runs one: new mount, PID, network, IPC and UTS
    /// namespaces (the command is PID 1), the root read-only, `mounts` (host folder, path inside, read
    /// only?) bound in (their mount points made as a runtime makes them), /proc and /dev, only the
    /// loopback interface, the image's environment, `user`.
    fn container(&self, mounts: &[(&Path, &str, bool)], (uid, gid): (u32, u32), args: &[&str]) -> Command {
        let root = self.root.display().to_string();
        let mut script = String::from("set -e\n");
        for (_, inside, _) in mounts {
            script += &format!("mkdir -p '{root}{inside}'\n");
        }
        script += &format!("mount --bind '{root}' '{root}'\nmount -o remount,bind,ro '{root}'\n");
        for (host, inside, ro) in mounts {
            script += &format!("mount --bind '{}' '{root}{inside}'\n", host.display());
            if *ro {
                script += &format!("mount -o remount,bind,ro '{root}{inside}'\n");
            }
        }
        script += &format!("mount -t proc proc '{root}/proc'\nmount --rbind /dev '{root}/dev'\nip link set lo up\n");
        script += &format!("exec chroot --userspec={uid}:{gid} '{root}' \"$@\"\n");
        let mut c = Command::new("unshare");
        c.args(["--mount", "--pid", "--net", "--ipc", "--uts", "--fork", "sh", "-c", &script, "sh"]);
        c.args(args).env_clear().envs(self.env.iter().map(|(k, v)| (k, v)));
        c
    }

    /// The image's ENTRYPOINT followed by `args`.
    fn entrypoint(&self, args: &[&str]) -> Vec<String> {
        let mut out: Vec<String> = self.config["Entrypoint"].as_array().unwrap().iter().map(|a| a.as_str().unwrap().to_string()).collect();
        out.extend(args.iter().map(|a| a.to_string()));
        out
    }

    fn env(&self, key: &str) -> Option<&str> {
        self.env.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

/// A running container, killed if the test fails first: SIGKILL to its PID 1 ends every process in its
/// PID namespace (unshare's --kill-child does not reach it: switching the user clears that signal).
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            for pid in children(&self.0) {
                let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
            }
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn children(unshare: &Child) -> Vec<i32> {
    let list = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", unshare.id())).unwrap_or_default();
    list.split_whitespace().filter_map(|p| p.parse().ok()).collect()
}

/// The outer pid of the process `unshare --fork` started (PID 1 inside).
fn pid_one(unshare: &Child) -> i32 {
    let pid = eventually(Duration::from_secs(10), "unshare started no child", || children(unshare).first().copied());
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let nspid = status.lines().find(|l| l.starts_with("NSpid:")).unwrap();
    assert!(nspid.ends_with("\t1"), "not PID 1 in its namespace: {nspid}");
    pid
}

#[test]
#[ignore = "needs the image (make image) and root; make image-test runs it"]
fn the_image_is_configured_as_its_users_expect() {
    let img = unpack();
    let c = &img.config;
    assert_eq!(c["User"], "10001:10001");
    assert_eq!((img.uid, img.gid), (10001, 10001));
    let passwd = std::fs::read_to_string(img.root.join("etc/passwd")).unwrap();
    assert!(passwd.contains("\nlabeld:x:10001:10001:"), "the .deb's labeld user is the image's user:\n{passwd}");
    assert_eq!(c["Entrypoint"], serde_json::json!(["labeld", "run"]));
    assert!(c["Cmd"].is_null() || c["Cmd"] == serde_json::json!([]), "{}", c["Cmd"]);
    let volumes: Vec<&String> = c["Volumes"].as_object().expect("Volumes").keys().collect();
    assert_eq!(volumes, ["/etc/labeld", "/var/lib/labeld"]);
    assert_eq!(c["ExposedPorts"], serde_json::json!({"9187/tcp": {}}));
    assert_eq!(c["StopSignal"], "SIGTERM");
    assert_eq!(img.env("LABELD_CONFIG"), Some("/etc/labeld/labeld.toml"));
    assert_eq!(img.env("LABELD_LOG_FORMAT"), Some("json"));
    assert!(img.env("PATH").is_some_and(|p| p.split(':').any(|d| d == "/usr/bin")));
    let hc = &c["Healthcheck"];
    assert_eq!(hc["Test"], serde_json::json!(["CMD", "labeld", "probe", "http://127.0.0.1:9187/healthz"]), "{hc}");
    for (key, at_least_s) in [("Interval", 10), ("Timeout", 1), ("StartPeriod", 30)] {
        assert!(hc[key].as_u64().is_some_and(|ns| ns >= at_least_s * 1_000_000_000), "Healthcheck {key}: {hc}");
    }
    assert!(hc["Retries"].as_u64().is_some_and(|r| r >= 1), "{hc}");

    let labels = &c["Labels"];
    let head = Command::new("git").args(["rev-parse", "HEAD"]).current_dir(ROOT).output().unwrap();
    assert_eq!(labels["org.opencontainers.image.revision"], text(&head.stdout).trim(), "built from another commit: make image");
    assert_eq!(labels["org.opencontainers.image.version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(labels["org.opencontainers.image.title"], "labeld");
    assert!(labels["org.opencontainers.image.description"].as_str().is_some_and(|d| d.contains("inbox")), "{labels}");
    assert!(labels["org.opencontainers.image.created"].as_str().is_some_and(|d| d.ends_with('Z')), "{labels}");
    let origin = Command::new("git").args(["remote", "get-url", "origin"]).current_dir(ROOT).output().unwrap();
    if origin.status.success() {
        assert_eq!(labels["org.opencontainers.image.source"], text(&origin.stdout).trim());
    }

    // What `docker load` names it, and one layer on no base image.
    let manifest = run(Command::new("tar").arg("-xOf").arg(archive()).arg("manifest.json"));
    let manifest: Value = serde_json::from_slice(&manifest.stdout).unwrap();
    // `docker load` names it labeld:<version>, `podman load` docker.io/library/labeld:<version>.
    assert_eq!(manifest[0]["RepoTags"], serde_json::json!([format!("docker.io/library/labeld:{}", env!("CARGO_PKG_VERSION"))]));
    assert_eq!(manifest[0]["Layers"].as_array().map(Vec::len), Some(1), "{manifest}");

    // Slim: no apt, no docs or man pages, no locales; the example config and the copyright files stay.
    for gone in ["usr/bin/apt-get", "usr/share/man/man8", "usr/share/locale/de", "usr/share/doc/labeld/README.md", "var/lib/apt/lists/lock"] {
        assert!(!img.root.join(gone).exists(), "{gone} is in the image");
    }
    let var_tmp: Vec<_> = std::fs::read_dir(img.root.join("var/tmp")).unwrap().flatten().map(|e| e.path()).collect();
    assert!(var_tmp.is_empty(), "left over from the build: {var_tmp:?}");
    for kept in ["usr/share/doc/labeld/labeld.toml.example", "usr/share/doc/libc6/copyright", "etc/ssl/certs/ca-certificates.crt"] {
        assert!(img.root.join(kept).exists(), "{kept} is not in the image");
    }
    // Every file is as its package shipped it (so the stripped labeld is the stripped .deb's), but for
    // the container's config and the docs, man pages and translations dpkg was told to leave out.
    let verify = run(Command::new("chroot").arg(&img.root).args(["dpkg", "--verify"]));
    let (missing, changed): (Vec<&str>, Vec<&str>) = text(&verify.stdout).leak().lines().partition(|l| l.starts_with("missing "));
    assert_eq!(changed, ["??5?????? c /etc/labeld/labeld.toml"]);
    let left_out = ["/usr/share/doc/", "/usr/share/man/", "/usr/share/locale/", "/usr/share/info/", "/usr/share/lintian/"];
    for m in &missing {
        let path = m.trim_start_matches("missing").trim();
        assert!(left_out.iter().any(|d| path.starts_with(d) || format!("{path}/") == *d), "{path} is missing from the image");
    }
    eprintln!("unpacked root: {}", text(&run(Command::new("du").args(["-sh"]).arg(&img.root)).stdout));
}

#[test]
#[ignore = "needs the image (make image) and root; make image-test runs it"]
fn the_image_labels_photos_in_its_volume_as_its_user_and_stops_on_sigterm_as_pid_1() {
    let img = unpack();
    let user = (img.uid, img.gid);
    // A host folder as the volume, owned by the image's user (docs/operations.md: chown 10001:10001).
    let volume = img.dir.path().join("volume");
    std::fs::create_dir(&volume).unwrap();
    std::os::unix::fs::chown(&volume, Some(img.uid), Some(img.gid)).unwrap();
    let mounts = [(volume.as_path(), VOLUME, false)];

    let version = run(&mut img.container(&mounts, user, &["labeld", "--version"]));
    let version = text(&version.stdout);
    let revision = img.config["Labels"]["org.opencontainers.image.revision"].as_str().unwrap().to_string();
    let short = version.split("commit ").nth(1).and_then(|v| v.split(',').next()).unwrap_or_default();
    assert!(version.starts_with(&format!("labeld {} (commit ", env!("CARGO_PKG_VERSION"))), "{version}");
    assert!(!short.is_empty() && revision.starts_with(short), "binary {version:?} vs label {revision}");
    let check = run(&mut img.container(&mounts, user, &["labeld", "check-config"]));
    let check = text(&check.stdout);
    assert!(check.contains("/var/lib/labeld/inbox") && check.contains("127.0.0.1:9187"), "{check}");

    let log = img.dir.path().join("labeld.log");
    let entry = img.entrypoint(&[]);
    let mut daemon = Running(
        img.container(&mounts, user, &entry.iter().map(String::as_str).collect::<Vec<_>>())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    eventually(Duration::from_secs(120), "no \"ready\" in the log", || {
        if let Ok(Some(st)) = daemon.0.try_wait() {
            panic!("the container exited ({st}) before ready:\n{}", log_text());
        }
        log_text().contains("\"message\":\"ready\"").then_some(())
    });
    let pid = pid_one(&daemon.0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(status.contains("\nUid:\t10001\t10001\t10001\t10001\n"), "{status}");

    // The image's own health check, run the way `docker exec` runs it: in labeld's namespaces and root.
    let test: Vec<String> = img.config["Healthcheck"]["Test"].as_array().unwrap().iter().map(|a| a.as_str().unwrap().to_string()).collect();
    assert_eq!(test[0], "CMD");
    let exec = |argv: &[String]| {
        let mut c = Command::new("nsenter");
        c.arg(format!("--target={pid}")).args(["--mount", "--net", "--pid", "--root", "--wd"]);
        c.arg(format!("--setuid={}", img.uid)).arg(format!("--setgid={}", img.gid)).arg("--").args(argv);
        c.env_clear().envs(img.env.iter().map(|(k, v)| (k, v))).output().unwrap()
    };
    let healthy = eventually(Duration::from_secs(60), "the health check never passed", || {
        let out = exec(&test[1..]);
        out.status.success().then_some(out)
    });
    assert_eq!(text(&healthy.stdout), "ok\n");
    let readyz: Vec<String> = test[1..].iter().map(|a| a.replace("/healthz", "/readyz")).collect();
    assert_eq!(text(&exec(&readyz).stdout), "ready\n");

    // A camera drops photos into the volume's inbox.
    let photos = [("chelsea.png", &["tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"][..]), ("coffee.jpg", &["coffee mug", "espresso", "cup"][..]), ("rocket.jpg", &["missile", "projectile", "space shuttle"][..])];
    let inbox = volume.join("inbox");
    assert!(inbox.is_dir(), "labeld made no inbox in its volume");
    for (name, _) in photos {
        std::fs::copy(Path::new(ROOT).join("tests/data").join(name), inbox.join(name)).unwrap();
    }
    let csv = volume.join("results.csv");
    eventually(Duration::from_secs(120), "three rows in the volume's results.csv", || (csv.exists() && read_csv(&csv).1.len() >= 3).then_some(()));

    let st = Command::new("kill").arg("-TERM").arg(pid.to_string()).status().unwrap();
    assert!(st.success());
    let exit = eventually(Duration::from_secs(60), "labeld did not stop on SIGTERM", || daemon.0.try_wait().unwrap());
    assert_eq!(exit.code(), Some(0), "exit {exit}:\n{}", log_text());

    let (header, rows) = read_csv(&csv);
    let col = |row: &csv::StringRecord, name: &str| row[header.iter().position(|h| h == name).unwrap()].to_string();
    assert_eq!(rows.len(), photos.len(), "one row per photo: {rows:?}");
    for (name, labels) in photos {
        let row = rows.iter().find(|r| col(r, "path") == format!("{VOLUME}/inbox/{name}")).unwrap_or_else(|| panic!("no row for {name}: {rows:?}"));
        assert_eq!(col(row, "status"), "ok");
        assert!(labels.contains(&col(row, "label1").as_str()), "{name}: {row:?}");
        let sidecar = inbox.join(format!("{name}.json"));
        assert_eq!(std::fs::metadata(&sidecar).unwrap().uid(), img.uid, "{} owned by the image's user", sidecar.display());
    }
    assert_eq!(std::fs::metadata(&csv).unwrap().uid(), img.uid);

    // Every log line is JSON (the image sets LABELD_LOG_FORMAT=json) and the stop is in it.
    let lines: Vec<Value> = log_text().lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))).collect();
    assert!(lines.iter().all(|l| l["timestamp"].is_string() && l["level"].is_string() && l["message"].is_string()));
    assert!(lines.iter().any(|l| l["message"] == "ready"), "{lines:?}");
}

#[test]
#[ignore = "needs the image (make image) and root; make image-test runs it"]
fn the_image_runs_as_another_user_with_its_own_config_and_model() {
    // docker run --user 4242:4242 -v cam:/var/lib/labeld -v conf:/etc/labeld:ro -v models:/models:ro labeld --once
    let img = unpack();
    let user = (4242, 4242);
    let base = img.dir.path();
    let (volume, conf, models) = (base.join("volume"), base.join("conf"), base.join("models"));
    for d in [&volume, &conf, &models] {
        std::fs::create_dir(d).unwrap();
    }
    std::fs::create_dir(volume.join("inbox")).unwrap();
    for d in [&volume, &volume.join("inbox")] {
        std::os::unix::fs::chown(d, Some(user.0), Some(user.1)).unwrap();
    }
    std::fs::copy(Path::new(ROOT).join("tests/data/coffee.jpg"), volume.join("inbox/coffee.jpg")).unwrap();
    std::fs::copy(img.root.join("usr/share/labeld/models/default.pt"), models.join("own.pt")).unwrap();
    let shipped = std::fs::read_to_string(img.root.join("etc/labeld/labeld.toml")).unwrap();
    let model_line = "path = \"/usr/share/labeld/models/default.pt\"";
    assert!(shipped.contains(model_line), "{shipped}");
    std::fs::write(conf.join("labeld.toml"), shipped.replace(model_line, "path = \"/models/own.pt\"\nname = \"own\"")).unwrap();

    let mounts = [(volume.as_path(), VOLUME, false), (conf.as_path(), "/etc/labeld", true), (models.as_path(), "/models", true)];
    let entry = img.entrypoint(&["--once"]);
    let out = img.container(&mounts, user, &entry.iter().map(String::as_str).collect::<Vec<_>>()).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let (header, rows) = read_csv(&volume.join("results.csv"));
    let col = |name: &str| rows[0][header.iter().position(|h| h == name).unwrap()].to_string();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!((col("model").as_str(), col("label1").as_str()), ("own", "espresso"));
    assert_eq!(std::fs::metadata(volume.join("inbox/coffee.jpg.json")).unwrap().uid(), user.0);
}
