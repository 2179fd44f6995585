//! An ONNX model through ONNX Runtime: the "onnxruntime" `Backend`. The shared library is loaded at run
//! time, once per process, from the first place `library()` finds it; nothing of ONNX Runtime is
//! linked into labeld, so a box that only runs TorchScript models never needs it.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use ort::environment::Environment;
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::{TensorElementType, TensorRef, ValueType};

use crate::error::{Fatal, first_line, panic_message};
use crate::infer::backend::{Backend, Failure};

/// The variable that names the library file, ahead of every other place.
pub const LIBRARY_VAR: &str = "LABELD_ONNXRUNTIME";
const LIBRARY_NAME: &str = "libonnxruntime.so";
/// Where `make deps` (scripts/setup-onnxruntime.sh) puts it in the checkout labeld was built in.
const DEV_LIBRARY: &str = env!("LABELD_ONNXRUNTIME_DEV");

/// How the model wants its input tensor laid out.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Layout {
    /// `[N, 3, H, W]`: labeld's NHWC data is transposed into a buffer first.
    Nchw,
    /// `[N, H, W, 3]`: labeld's data as it is.
    Nhwc,
}

/// One session and its transposition buffer; ONNX Runtime's `ort` runs a session from one thread at a
/// time, so each worker gets one of its own.
struct Runner {
    session: Session,
    nchw: Vec<f32>,
}

pub struct OnnxModel {
    runners: Vec<Mutex<Runner>>,
    /// The same model on one session with a pool of every CPU, for a pass that has the box to itself
    /// (ONNX Runtime fixes a session's threads when it is made, so a lone image cannot borrow the
    /// workers' sessions). `None` when that would be no more threads than a worker's.
    alone: Option<Box<OnnxModel>>,
    input: String,
    layout: Layout,
    /// The file takes exactly one image per run (its batch dimension is fixed at 1).
    one_at_a_time: bool,
    crop: usize,
    classes: usize,
}

/// What `load` needs besides the file.
pub struct Load<'a> {
    pub path: &'a Path,
    pub crop: u32,
    pub labels: usize,
    pub max_batch: usize,
    /// Concurrent callers (workers): one session each.
    pub sessions: usize,
    /// Intra-op threads per session.
    pub threads: usize,
    /// Intra-op threads of a pass that has the box to itself (more than `threads`: one more session).
    pub threads_alone: usize,
}

impl OnnxModel {
    /// Opens one session per worker, checks the file's input and output against what labeld sends and
    /// expects back (naming the mismatch), runs the test input (one all-zero image: one finite row of
    /// one logit per label) and warms every session up at batch sizes 1 and `max_batch`.
    pub fn load(l: Load) -> Result<OnnxModel, Fatal> {
        let fail = |reason: String| Fatal::Model { path: l.path.to_path_buf(), reason };
        let env = environment().map_err(|e| fail(e.clone()))?;
        let runner = |threads: usize, spin: bool| -> Result<Mutex<Runner>, Fatal> {
            let session = open(env, l.path, threads, spin).map_err(&fail)?;
            Ok(Mutex::new(Runner { session, nchw: Vec::new() }))
        };
        let runners = (0..l.sessions.max(1)).map(|_| runner(l.threads, false)).collect::<Result<Vec<_>, _>>()?;
        // Its pool may spin between operators: nothing else runs while it does.
        let alone = (l.threads_alone > l.threads).then(|| runner(l.threads_alone, true)).transpose()?;
        let (input, layout, one_at_a_time, classes) = {
            let first = runners[0].lock().unwrap_or_else(|e| e.into_inner());
            let (input, layout, one_at_a_time) = check_input(&first.session, l.crop).map_err(&fail)?;
            let classes = check_output(&first.session, l.labels).map_err(&fail)?;
            (input, layout, one_at_a_time, classes)
        };
        let mut model = OnnxModel { runners, alone: None, input, layout, one_at_a_time, crop: l.crop as usize, classes: classes.unwrap_or(0) };
        // A class count the file leaves open is read from the test input's answer.
        let per_image = 3 * model.crop * model.crop;
        let zeros = vec![0f32; per_image];
        let probe = model.run_on(0, &zeros, 1).map_err(|e| fail(format!("test run on 1 zero image failed: {e}")))?;
        if model.classes == 0 {
            model.classes = probe.1;
        }
        if probe.0 != 1 || probe.1 != model.classes {
            return Err(fail(format!("output shape [{}, {}] for a batch of 1; expected [1, classes]", probe.0, probe.1)));
        }
        if model.classes != l.labels {
            return Err(fail(labels_mismatch(model.classes, l.labels)));
        }
        model.top_k(&zeros, 1, 1).map_err(|e| fail(format!("test run on zeros failed: {e}")))?;
        if let Some(session) = alone {
            let OnnxModel { ref input, layout, one_at_a_time, crop, classes, .. } = model;
            let runners = vec![session];
            model.alone = Some(Box::new(OnnxModel { runners, alone: None, input: input.clone(), layout, one_at_a_time, crop, classes }));
        }
        for m in std::iter::once(&model).chain(model.alone.as_deref()) {
            for runner in 0..m.runners.len() {
                for n in [1, l.max_batch, l.max_batch] {
                    let zeros = vec![0f32; n * per_image];
                    m.run_on(runner, &zeros, n)
                        .and_then(|(_, _, logits)| crate::infer::backend::rank(&logits, n, m.classes, 1).map_err(Failure::Model))
                        .map_err(|e| fail(format!("warm-up at batch size {n} failed: {e}")))?;
                }
            }
        }
        Ok(model)
    }

    /// Runs `n` images on runner `i`: (rows, columns, logits) of the model's output.
    fn run_on(&self, i: usize, data: &[f32], n: usize) -> Result<(usize, usize, Vec<f32>), Failure> {
        let mut runner = self.runners[i].lock().unwrap_or_else(|e| e.into_inner());
        self.run_locked(&mut runner, data, n)
    }

    fn run_locked(&self, runner: &mut Runner, data: &[f32], n: usize) -> Result<(usize, usize, Vec<f32>), Failure> {
        let per_image = 3 * self.crop * self.crop;
        if data.len() != n * per_image {
            return Err(Failure::Model(format!("{} input values for {n} images of {per_image}", data.len())));
        }
        if self.one_at_a_time && n > 1 {
            let mut logits = Vec::with_capacity(n * self.classes);
            for image in data.chunks_exact(per_image) {
                let (rows, columns, one) = self.run_locked(runner, image, 1)?;
                if rows != 1 || columns != self.classes {
                    return Err(Failure::Model(format!("output shape [{rows}, {columns}] for 1 image; expected [1, {}]", self.classes)));
                }
                logits.extend(one);
            }
            return Ok((n, self.classes, logits));
        }
        let (c, s) = (3i64, self.crop as i64);
        let Runner { session, nchw } = runner;
        let (shape, values) = match self.layout {
            Layout::Nhwc => ([n as i64, s, s, c], data),
            Layout::Nchw => {
                to_nchw(data, n, self.crop, nchw);
                ([n as i64, c, s, s], &nchw[..])
            }
        };
        let run = || -> Result<(usize, usize, Vec<f32>), String> {
            let tensor = TensorRef::from_array_view((shape, values)).map_err(|e| first_line(&e.to_string()))?;
            let outputs = session.run(ort::inputs![self.input.as_str() => tensor]).map_err(|e| first_line(&e.to_string()))?;
            let (out_shape, logits) = outputs[0].try_extract_tensor::<f32>().map_err(|e| first_line(&e.to_string()))?;
            match **out_shape {
                [rows, columns] => Ok((rows as usize, columns as usize, logits.to_vec())),
                _ => Err(format!("output shape {:?} for {n} images; expected [{n}, classes]", &**out_shape)),
            }
        };
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(run))
            .map_err(|p| format!("ONNX Runtime panicked: {}", panic_message(&*p)))
            .and_then(|r| r)
            .map_err(Failure::Model)
    }
}

impl Backend for OnnxModel {
    fn engine(&self) -> &'static str {
        "onnxruntime"
    }

    fn classes(&self) -> usize {
        self.classes
    }

    fn alone(&self) -> Option<&dyn Backend> {
        self.alone.as_deref().map(|m| m as &dyn Backend)
    }

    fn logits(&self, data: &[f32], n: usize) -> Result<Vec<f32>, Failure> {
        // A free session if there is one (a worker holds its session only for its own batch).
        let free = self.runners.iter().find_map(|r| r.try_lock().ok());
        let mut runner = match free {
            Some(r) => r,
            None => self.runners[0].lock().unwrap_or_else(|e| e.into_inner()),
        };
        let (rows, columns, logits) = self.run_locked(&mut runner, data, n)?;
        if rows != n || columns != self.classes {
            return Err(Failure::Model(format!("output shape [{rows}, {columns}] for {n} images; expected [{n}, {}]", self.classes)));
        }
        Ok(logits)
    }
}

/// NHWC → NCHW for `n` images of `crop` × `crop`, into `out` (reused between batches).
fn to_nchw(data: &[f32], n: usize, crop: usize, out: &mut Vec<f32>) {
    let plane = crop * crop;
    out.clear();
    out.resize(n * 3 * plane, 0.0);
    for (image, dst) in data.chunks_exact(3 * plane).zip(out.chunks_exact_mut(3 * plane)) {
        for (p, rgb) in image.chunks_exact(3).enumerate() {
            dst[p] = rgb[0];
            dst[plane + p] = rgb[1];
            dst[2 * plane + p] = rgb[2];
        }
    }
}

fn labels_mismatch(classes: usize, labels: usize) -> String {
    format!("model has {classes} classes but the label list has {labels}; set [model] labels to a matching file")
}

/// A session on `path` with `threads` intra-op threads. Spinning (`spin`) keeps the pool's threads
/// awake between a pass's operators, so a pass after an idle gap runs near a hot loop's speed
/// (ResNet-18, 2 threads, a pass 0.5 s after the last: 24–28 ms with it, 31–35 ms without). It stays
/// off for the workers' sessions: their decode threads share these cores under a backlog.
fn open(env: &Environment, path: &Path, threads: usize, spin: bool) -> Result<Session, String> {
    let err = |e: ort::Error<_>| first_line(&e.to_string());
    Session::builder(env)
        .map_err(|e| first_line(&e.to_string()))?
        .with_optimization_level(GraphOptimizationLevel::All)
        .map_err(err)?
        .with_intra_threads(threads.max(1))
        .map_err(err)?
        .with_inter_threads(1)
        .map_err(err)?
        .with_intra_op_spinning(spin)
        .map_err(err)?
        .commit_from_file(path)
        .map_err(|e| format!("ONNX Runtime cannot load it: {}", first_line(&e.to_string())))
}

/// The input's name, layout and whether it takes one image at a time; or what does not fit.
fn check_input(session: &Session, crop: u32) -> Result<(String, Layout, bool), String> {
    let crop = i64::from(crop);
    let expected = format!("one float input [N, 3, {crop}, {crop}] (NCHW) or [N, {crop}, {crop}, 3] (NHWC)");
    let [input] = session.inputs() else {
        let names: Vec<&str> = session.inputs().iter().map(|i| i.name()).collect();
        return Err(format!("expected {expected}; found {} inputs {names:?}", names.len()));
    };
    let (ty, shape) = match input.dtype() {
        ValueType::Tensor { ty, shape, .. } => (*ty, &**shape),
        other => return Err(format!("expected {expected}; input {:?} is {other}", input.name())),
    };
    let found = || format!("expected {expected}; found input {:?} {ty} {}", input.name(), dims(shape));
    if ty != TensorElementType::Float32 {
        return Err(found());
    }
    // -1: a dimension the file leaves open.
    let fits = |d: i64, want: i64| d == want || d == -1;
    let layout = match shape {
        [_, c, h, w] if fits(*c, 3) && fits(*h, crop) && fits(*w, crop) => Layout::Nchw,
        [_, h, w, c] if fits(*c, 3) && fits(*h, crop) && fits(*w, crop) => Layout::Nhwc,
        _ => return Err(found()),
    };
    match shape[0] {
        -1 => Ok((input.name().to_string(), layout, false)),
        1 => Ok((input.name().to_string(), layout, true)),
        _ => Err(format!("{}: a fixed batch of {} images; labeld runs any number (export with a dynamic batch axis, or batch 1)", found(), shape[0])),
    }
}

/// The output's class count (`None`: left open by the file), or what does not fit.
fn check_output(session: &Session, labels: usize) -> Result<Option<usize>, String> {
    let expected = format!("one float output [N, {labels}] (logits, one per label)");
    let [output] = session.outputs() else {
        let names: Vec<&str> = session.outputs().iter().map(|o| o.name()).collect();
        return Err(format!("expected {expected}; found {} outputs {names:?}", names.len()));
    };
    let (ty, shape) = match output.dtype() {
        ValueType::Tensor { ty, shape, .. } => (*ty, &**shape),
        other => return Err(format!("expected {expected}; output {:?} is {other}", output.name())),
    };
    let found = || format!("expected {expected}; found output {:?} {ty} {}", output.name(), dims(shape));
    match shape {
        _ if ty != TensorElementType::Float32 => Err(found()),
        [_, -1] => Ok(None),
        [_, classes] if *classes as usize == labels => Ok(Some(labels)),
        [_, classes] if *classes > 0 => Err(labels_mismatch(*classes as usize, labels)),
        _ => Err(found()),
    }
}

/// A shape as the docs write it, `?` for an open dimension.
fn dims(shape: &[i64]) -> String {
    let d: Vec<String> = shape.iter().map(|&d| if d < 0 { "?".into() } else { d.to_string() }).collect();
    format!("[{}]", d.join(", "))
}

/// The process's ONNX Runtime, loaded the first time an ONNX model is.
fn environment() -> Result<&'static Environment, &'static String> {
    static ENV: OnceLock<Result<Environment, String>> = OnceLock::new();
    ENV.get_or_init(|| {
        let lib = library()?;
        let env = ort::init_from(&lib)
            .map_err(|e| format!("cannot load ONNX Runtime from {}: {e}", lib.display()))?
            .with_name("labeld")
            .build()
            .map_err(|e| format!("cannot start ONNX Runtime from {}: {}", lib.display(), first_line(&e.to_string())))?;
        // Its allocator's info lines would drown labeld's own; warnings and errors stay.
        env.set_log_level(ort::logging::LogLevel::Warning);
        tracing::info!(library = %lib.display(), "ONNX Runtime loaded");
        Ok(env)
    })
    .as_ref()
}

/// The ONNX Runtime library: `LABELD_ONNXRUNTIME` if set; else beside the libtorch this process runs
/// (the .deb ships both in /usr/lib/labeld/lib); else where the checkout's set-up put it.
fn library() -> Result<PathBuf, String> {
    if let Some(file) = std::env::var_os(LIBRARY_VAR) {
        let file = PathBuf::from(file);
        return if file.is_file() {
            Ok(file)
        } else {
            Err(format!("{LIBRARY_VAR}={} is not a file; point it at a libonnxruntime.so (1.31 or newer)", file.display()))
        };
    }
    let mut tried = Vec::new();
    for candidate in libtorch_dir().map(|d| d.join(LIBRARY_NAME)).into_iter().chain([PathBuf::from(DEV_LIBRARY)]) {
        if candidate.is_file() {
            return Ok(candidate);
        }
        tried.push(candidate.display().to_string());
    }
    Err(format!(
        "an ONNX model needs ONNX Runtime's {LIBRARY_NAME}, and it is not at {}; run scripts/setup-onnxruntime.sh \
         (make deps does) or set {LIBRARY_VAR} to the library's path",
        tried.join(" nor at ")
    ))
}

/// The folder of the libtorch_cpu.so mapped into this process.
fn libtorch_dir() -> Option<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.ends_with("/libtorch_cpu.so"))
        .and_then(|p| Path::new(p).parent().map(Path::to_path_buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nhwc_becomes_nchw_image_by_image() {
        // Two images of one pixel each.
        let data = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let mut out = vec![9.0; 100];
        to_nchw(&data, 2, 1, &mut out);
        assert_eq!(out, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        // One 2×2 image: pixels (r, g, b) = (p, 10 + p, 20 + p).
        let data: Vec<f32> = (0..4).flat_map(|p| [p as f32, 10.0 + p as f32, 20.0 + p as f32]).collect();
        to_nchw(&data, 1, 2, &mut out);
        assert_eq!(out, [0.0, 1.0, 2.0, 3.0, 10.0, 11.0, 12.0, 13.0, 20.0, 21.0, 22.0, 23.0]);
    }

    #[test]
    fn shapes_print_open_dimensions_as_question_marks() {
        assert_eq!(dims(&[-1, 3, 224, 224]), "[?, 3, 224, 224]");
    }
}
