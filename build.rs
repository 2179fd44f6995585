// Bake libtorch's lib dir into the binary's rpath so it runs without LD_LIBRARY_PATH and never picks
// up a different libtorch installed elsewhere on the machine; build the graph shim against that same
// libtorch, with the flags torch-sys uses for its own shim (libtch). Also name the git commit and the
// libtorch version for `labeld --version`. ONNX Runtime is loaded at run time; the checkout's copy
// (scripts/setup-onnxruntime.sh) is the last place labeld looks for it. Compile the Open Inference
// Protocol's gRPC API (proto/) with protox, so no system protoc is needed.
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    println!("cargo:rerun-if-changed=src/infer/optimize.cpp");
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        panic!("torch-sys did not say where libtorch is (DEP_TCH_LIBTORCH_LIB); set LIBTORCH");
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    println!("cargo:rustc-env=LABELD_LIBTORCH_LIB={lib}");
    println!("cargo:rustc-env=LABELD_LIBTORCH_VERSION={}", libtorch_version(Path::new(&lib)));
    println!("cargo:rustc-env=LABELD_GIT_COMMIT={}", git_commit());
    let root = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    println!("cargo:rustc-env=LABELD_ONNXRUNTIME_DEV={root}/.deps/onnxruntime/lib/libonnxruntime.so");
    let cxx11_abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".to_owned());
    shim(&Path::new(&lib).join("../include"), &cxx11_abi);
    inference_protocol();
}

/// The client side of proto/grpc_predict_v2.proto (KServe's, as published) into OUT_DIR.
fn inference_protocol() {
    println!("cargo:rerun-if-changed=proto/grpc_predict_v2.proto");
    let fds = protox::compile(["grpc_predict_v2.proto"], ["proto"])
        .unwrap_or_else(|e| panic!("proto/grpc_predict_v2.proto: {e}"));
    tonic_prost_build::configure()
        .build_server(false)
        .build_transport(false)
        .compile_fds(fds)
        .unwrap_or_else(|e| panic!("generating the gRPC client for proto/grpc_predict_v2.proto: {e}"));
}

/// Every libtorch distribution (and scripts/setup-libtorch.sh) writes `build-version` beside lib/.
fn libtorch_version(lib: &Path) -> String {
    let file = lib.join("../build-version");
    match std::fs::read_to_string(&file) {
        Ok(v) => {
            println!("cargo:rerun-if-changed={}", file.display());
            v.trim().to_string()
        }
        Err(_) => "unknown".into(),
    }
}

/// The checkout's short commit, "unknown" outside git (a source tarball).
fn git_commit() -> String {
    let git = |args: &[&str]| {
        let out = Command::new("git").args(args).output().ok().filter(|o| o.status.success())?;
        Some(String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    let Some(commit) = git(&["rev-parse", "--short", "HEAD"]) else { return "unknown".into() };
    // Rerun when HEAD moves: a checkout changes HEAD, a commit the branch's ref. Only files that exist:
    // cargo reruns the script on every build for one that does not.
    let branch = git(&["symbolic-ref", "-q", "HEAD"]);
    let mut watched = vec![git(&["rev-parse", "--git-path", "HEAD"]), git(&["rev-parse", "--git-path", "packed-refs"])];
    watched.push(branch.and_then(|b| git(&["rev-parse", "--git-path", &b])));
    for path in watched.into_iter().flatten().filter(|p| Path::new(p).exists()) {
        println!("cargo:rerun-if-changed={path}");
    }
    commit
}

/// Compiles src/infer/optimize.cpp, unless the archive from a previous run was built from the same
/// source and flags: a new commit reruns this script, and the libtorch headers take a minute to compile.
fn shim(include: &Path, cxx11_abi: &str) {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let archive = out.join("liblabeld_optimize.a");
    let stamp = out.join("labeld_optimize.inputs");
    let source = Path::new("src/infer/optimize.cpp");
    let inputs = format!("{}\n{cxx11_abi}\n", include.display());
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let fresh = std::fs::read_to_string(&stamp).is_ok_and(|s| s == inputs)
        && matches!((modified(&archive), modified(source)), (Some(a), Some(s)) if a >= s);
    if fresh {
        // What cc::Build::compile prints.
        println!("cargo:rustc-link-lib=static=labeld_optimize");
        println!("cargo:rustc-link-search=native={}", out.display());
        println!("cargo:rustc-link-lib=stdc++");
        return;
    }
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={cxx11_abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .file(source)
        .compile("labeld_optimize");
    // Written only after a successful compile.
    let _ = std::fs::write(&stamp, inputs);
}
