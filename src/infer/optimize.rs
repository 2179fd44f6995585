//! Load-time graph work that tch does not expose, done by a small C++ shim (optimize.cpp) built against
//! the same libtorch: precision conversion that reaches a frozen graph's constants, and freezing plus
//! inference optimisation on a copy of the module.

use std::ffi::{CStr, c_char, c_int, c_void};
use std::time::{Duration, Instant};

use tch::{CModule, Kind, Tensor};

unsafe extern "C" {
    fn labeld_convert(module: *mut c_void, dtype: c_int) -> *mut c_char;
    fn labeld_optimize(module: *const c_void, passes: c_int, dtype: c_int, error: *mut *mut c_char) -> *mut c_void;
    fn labeld_clone(module: *const c_void, error: *mut *mut c_char) -> *mut c_void;
}

// tch keeps a CModule's `torch::jit::Module*` in its only, private field and frees it with `delete`; the
// shim needs that pointer and hands back a `new torch::jit::Module`, so the two are moved across by
// transmute. This assertion stops the build if tch ever adds a field.
const _: () = assert!(size_of::<CModule>() == size_of::<*mut c_void>());

/// Graph passes, the same bits as in optimize.cpp.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Passes(c_int);

impl Passes {
    /// `torch::jit::freeze`: attributes become constants, then conv/bn and linear folding.
    pub const FREEZE: Passes = Passes(1);
    /// `torch::jit::optimize_for_inference` (freezes first): oneDNN-prepacked convolutions and more.
    pub const OPTIMIZE_FOR_INFERENCE: Passes = Passes(2);
    /// Frozen 4-D weights stored channels-last, the layout labeld's input already has.
    pub const CHANNELS_LAST: Passes = Passes(4);

    pub const fn union(self, other: Passes) -> Passes {
        Passes(self.0 | other.0)
    }

    pub fn contains(self, other: Passes) -> bool {
        self.0 & other.0 == other.0
    }

    /// The pass names, for the log line.
    pub fn names(self) -> Vec<&'static str> {
        [
            (Passes::FREEZE, "freeze"),
            (Passes::OPTIMIZE_FOR_INFERENCE, "optimize_for_inference"),
            (Passes::CHANNELS_LAST, "channels_last"),
        ]
        .into_iter()
        .filter(|(p, _)| self.contains(*p))
        .map(|(_, name)| name)
        .collect()
    }
}

/// Converts the module's parameters, buffers and graph constants to `kind` in place (an already-frozen
/// model keeps its weights in graph constants, which `CModule::to` leaves alone).
pub fn convert(module: &mut CModule, kind: Kind) -> Result<(), String> {
    let dtype = scalar_type(kind)?;
    // SAFETY: the pointer is the live module `module` owns; the shim neither keeps nor frees it.
    let error = unsafe { labeld_convert(module_ptr(module), dtype) };
    taken_error(error).map_or(Ok(()), Err)
}

/// A new module: a copy of the fp32 `module`, frozen (when `passes` freeze), converted to `kind`, then
/// optimised. `module` itself is left as it was.
pub fn optimized(module: &CModule, passes: Passes, kind: Kind) -> Result<CModule, String> {
    let dtype = scalar_type(kind)?;
    let mut error = std::ptr::null_mut();
    // SAFETY: as in `convert`; the shim only reads the module.
    let new = unsafe { labeld_optimize(module_ptr(module), passes.0, dtype, &mut error) };
    owned_module(new, error)
}

/// A copy of `module` with its own object (attribute values) and graphs, sharing its tensors: runs it
/// without touching its state, at no cost in memory.
pub fn cloned(module: &CModule) -> Result<CModule, String> {
    let mut error = std::ptr::null_mut();
    // SAFETY: as in `convert`; the shim only reads the module.
    let new = unsafe { labeld_clone(module_ptr(module), &mut error) };
    owned_module(new, error)
}

fn owned_module(new: *mut c_void, error: *mut c_char) -> Result<CModule, String> {
    if let Some(e) = taken_error(error) {
        return Err(e);
    }
    if new.is_null() {
        return Err("the graph shim returned no module".into());
    }
    // SAFETY: `new` is a `new torch::jit::Module`, exactly what tch's CModule owns and deletes.
    Ok(unsafe { std::mem::transmute::<*mut c_void, CModule>(new) })
}

fn module_ptr(module: &CModule) -> *mut c_void {
    // SAFETY: CModule is one raw pointer (asserted above); this copies it without taking ownership.
    unsafe { std::mem::transmute_copy::<CModule, *mut c_void>(module) }
}

/// The shim's error text, freed; `None` for a null pointer.
fn taken_error(error: *mut c_char) -> Option<String> {
    if error.is_null() {
        return None;
    }
    // SAFETY: the shim returns a NUL-terminated malloc'ed string that we own from here on.
    let text = unsafe { CStr::from_ptr(error) }.to_string_lossy().into_owned();
    unsafe { libc::free(error.cast()) };
    Some(text)
}

/// c10::ScalarType's number for the kinds labeld runs in.
fn scalar_type(kind: Kind) -> Result<c_int, String> {
    match kind {
        Kind::Float => Ok(6),
        Kind::BFloat16 => Ok(15),
        other => Err(format!("no graph conversion to {other:?}")),
    }
}

/// The passes labeld applies at load: the fastest set measured on ResNet-18 with libtorch 2.13
/// (examples/optimize_speed.rs); channels-last weights matter for bf16, which oneDNN prepacking skips.
pub const PASSES: Passes = Passes::OPTIMIZE_FOR_INFERENCE.union(Passes::CHANNELS_LAST);

/// What load-time optimisation did to a model.
#[derive(Debug, Clone, PartialEq)]
pub enum Optimisation {
    Optimised { passes: Passes, took: Duration },
    /// Running the model as loaded, and why.
    Unoptimised { reason: String },
    /// `[model] optimize = false`.
    Off,
}

impl std::fmt::Display for Optimisation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Optimisation::Optimised { passes, took } => {
                write!(f, "model optimised ({}) in {:.1} s", passes.names().join(", "), took.as_secs_f64())
            }
            Optimisation::Unoptimised { reason } => write!(f, "model not optimised, running it as loaded: {reason}"),
            Optimisation::Off => write!(f, "model not optimised ([model] optimize = false)"),
        }
    }
}

/// The fp32 `module` as loaded, converted to `kind`; optimised with `passes` when that works and gives
/// the same logits on a probe batch, else as loaded. Fails only when the conversion to `kind` fails: a
/// model that cannot be optimised still runs.
pub fn prepared(mut module: CModule, passes: Option<Passes>, kind: Kind, crop: i64) -> Result<(CModule, Optimisation), String> {
    let Some(passes) = passes else {
        if kind != Kind::Float {
            convert(&mut module, kind)?;
        }
        return Ok((module, Optimisation::Off));
    };
    // One optimisation at a time: each holds a second set of weights (folded, prepacked) for a moment.
    static OPTIMISING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = OPTIMISING.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let start = Instant::now();
    let attempt = guarded(|| {
        let fp32 = if kind == Kind::Float { None } else { Some(logits(&cloned(&module)?, Kind::Float, crop)?) };
        let fast = optimized(&module, passes, kind)?;
        Ok((fast, fp32))
    });
    if kind != Kind::Float {
        convert(&mut module, kind)?;
    }
    let checked = attempt.and_then(|(fast, fp32)| guarded(|| same_logits(&module, &fast, fp32.as_ref(), kind, crop).map(|()| fast)));
    let prepared = match checked {
        Ok(fast) => (fast, Optimisation::Optimised { passes, took: start.elapsed() }),
        Err(reason) => (module, Optimisation::Unoptimised { reason: crate::error::first_line(&reason) }),
    };
    // The copies made on the way (frozen, folded, the discarded module) are freed; give their pages back.
    // SAFETY: malloc_trim only releases free heap memory.
    unsafe { libc::malloc_trim(0) };
    Ok(prepared)
}

/// `f`, with a libtorch panic turned into an error.
fn guarded<T>(f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .unwrap_or_else(|p| Err(format!("libtorch panicked: {}", crate::error::panic_message(&*p))))
}

/// Runs copies of both modules on the same probe batch (copies: a stateful model's own counters must
/// see only the calls labeld always made) and compares their logits. fp32: within 1e-3, as folding and
/// oneDNN kernels only reorder float sums. bf16 (8 significant bits, ~3 digits): both modules are the
/// fp32 model plus bf16 rounding, rounded at different places (the optimised one folds batch norms in
/// fp32), so they may differ by up to twice what rounding moved the loaded module away from
/// `fp32_logits` (EfficientNet-Lite0: 0.24 on logits up to 5.8, i.e. 4%), and never by more than 10%
/// of the largest logit, which is no longer rounding.
fn same_logits(loaded: &CModule, optimised: &CModule, fp32_logits: Option<&Tensor>, kind: Kind, crop: i64) -> Result<(), String> {
    let want = logits(&cloned(loaded)?, kind, crop).map_err(|e| format!("the loaded model failed on the probe batch: {e}"))?;
    let got = logits(&cloned(optimised)?, kind, crop).map_err(|e| format!("the optimised model failed on the probe batch: {e}"))?;
    if want.size() != got.size() {
        return Err(format!("the optimised model returns shape {:?}, the loaded one {:?}", got.size(), want.size()));
    }
    let delta = max_abs_difference(&want, &got)?;
    let bound = match fp32_logits {
        Some(fp32) if fp32.size() == want.size() => {
            let largest = want.f_abs().and_then(|t| t.f_max()).and_then(|t| t.f_double_value(&[])).map_err(tch_err)?;
            (2.0 * max_abs_difference(&want, fp32)? + 1e-3).min(0.1 * largest)
        }
        _ => 1e-3,
    };
    // Written so that a NaN difference fails too.
    if !(delta <= bound) {
        return Err(format!("its logits differ from the loaded model's by {delta:.3e} (allowed {bound:.1e})"));
    }
    tracing::debug!("optimised logits within {delta:.3e} of the loaded model's (allowed {bound:.1e})");
    Ok(())
}

fn max_abs_difference(a: &Tensor, b: &Tensor) -> Result<f64, String> {
    a.f_sub(b).and_then(|t| t.f_abs()).and_then(|t| t.f_max()).and_then(|t| t.f_double_value(&[])).map_err(tch_err)
}

fn tch_err(e: tch::TchError) -> String {
    e.to_string().lines().next().unwrap_or_default().to_string()
}

/// fp32 logits for a fixed pseudo-random batch of 2, laid out channels-last like labeld's real input.
fn logits(module: &CModule, kind: Kind, crop: i64) -> Result<Tensor, String> {
    let input = Tensor::f_from_slice(&probe_batch(2, crop))
        .and_then(|t| t.f_view([2, crop, crop, 3]))
        .and_then(|t| t.f_permute([0, 3, 1, 2]))
        .and_then(|t| t.f_to_kind(kind))
        .map_err(tch_err)?;
    let out = tch::no_grad(|| module.forward_ts(&[input])).map_err(tch_err)?;
    out.f_to_kind(Kind::Float).map_err(tch_err)
}

/// `n` images of deterministic values in [-2, 2), roughly what normalised photos hold.
fn probe_batch(n: usize, crop: i64) -> Vec<f32> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    (0..n * 3 * (crop * crop) as usize)
        .map(|_| {
            // xorshift64: fixed, fast, and no global RNG state touched.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32 * 4.0 - 2.0
        })
        .collect()
}
