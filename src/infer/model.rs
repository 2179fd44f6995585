//! One TorchScript classifier through libtorch, loaded once and shared by the worker threads (see
//! `worker::SharedModel`): the "libtorch" `Backend`.

use std::path::Path;

use tch::{CModule, Device, Kind, Tensor};

use crate::config::Precision;
use crate::error::{Fatal, first_line, panic_message};
use crate::infer::backend::{Backend, Failure};
use crate::infer::optimize::{self, Optimisation, Passes};

pub struct Classifier {
    module: CModule,
    crop: i64,
    classes: usize,
    kind: Kind,
    optimisation: Optimisation,
}

// SAFETY: the workers share one Classifier (see worker::SharedModel). A TorchScript module's forward may
// run on several threads at once: each call gets its own interpreter stack, and the graph executor
// guards its plan cache with a lock. labeld never changes a module after loading it (no attribute
// writes, no conversion); a model whose own forward writes its attributes races with itself, as it
// would in any multi-threaded libtorch server (`[workers] count = 1` avoids that).
unsafe impl Sync for Classifier {}

impl Classifier {
    /// Loads the model, converts it to `precision`, optimises its graph with `passes` (`None`: not at
    /// all) when that works and keeps its logits (see `optimize::prepared`), and runs a forward pass to check it accepts
    /// `crop`-sized input and returns one logit per label; then warms it up at batch sizes 1 and
    /// `max_batch`, so the first images do not pay for TorchScript's first-run optimisation.
    pub fn load(
        path: &Path,
        crop: u32,
        labels: usize,
        max_batch: usize,
        precision: Precision,
        passes: Option<Passes>,
    ) -> Result<Classifier, Fatal> {
        let fail = |reason: String| Fatal::Model { path: path.to_path_buf(), reason };
        let precision = runnable_precision(precision, cpu_has_native_bf16());
        let mut module = CModule::load_on_device(path, Device::Cpu).map_err(|e| fail(first_line(&e.to_string())))?;
        module.f_set_eval().map_err(|e| fail(format!("cannot switch the model to eval mode: {}", first_line(&e.to_string()))))?;
        let kind = match precision {
            Precision::Fp32 => Kind::Float,
            Precision::Bf16 => Kind::BFloat16,
        };
        let crop = i64::from(crop);
        let (module, optimisation) = optimize::prepared(module, passes, kind, crop)
            .map_err(|e| fail(format!("cannot convert the model to {}: {}", precision.as_str(), first_line(&e))))?;
        match &optimisation {
            Optimisation::Optimised { .. } | Optimisation::Off => tracing::info!(model = %path.display(), "{optimisation}"),
            Optimisation::Unoptimised { .. } => tracing::warn!(model = %path.display(), "{optimisation}"),
        }
        let probe = tch::no_grad(|| module.forward_ts(&[Tensor::zeros([1, 3, crop, crop], (kind, Device::Cpu))]))
            .map_err(|e| fail(format!("test forward pass on 1x3x{crop}x{crop} failed: {}", first_line(&e.to_string()))))?;
        let size = probe.size();
        if size.len() != 2 || size[0] != 1 {
            return Err(fail(format!("output shape {size:?} for a batch of 1; expected [1, classes]")));
        }
        if size[1] as usize != labels {
            return Err(fail(format!(
                "model has {} classes but the label list has {labels}; set [model] labels to a matching file",
                size[1]
            )));
        }
        let classifier = Classifier { module, crop, classes: labels, kind, optimisation };
        classifier.probe().map_err(|e| fail(format!("test forward pass on zeros failed: {e}")))?;
        for n in [1, max_batch, max_batch] {
            let zeros = vec![0f32; n * 3 * (crop * crop) as usize];
            classifier.ranked_top_k(&zeros, n, 1).map_err(|e| fail(format!("warm-up at batch size {n} failed: {e}")))?;
        }
        // The probe and warm-up activations are freed; give their pages back rather than keep them for
        // the life of the process (they would be reused only by a batch of the same sizes).
        // SAFETY: malloc_trim only releases free heap memory.
        unsafe { libc::malloc_trim(0) };
        Ok(classifier)
    }

    /// Whether load-time graph optimisation applied, and which passes (or why not).
    pub fn optimisation(&self) -> &Optimisation {
        &self.optimisation
    }

    /// The load-time test: one all-zero image must give one finite row of `classes` logits. Run again
    /// when an image fails alone, to tell a bad image (probe passes) from a failing model.
    fn probe(&self) -> Result<(), String> {
        let zeros = vec![0f32; 3 * (self.crop * self.crop) as usize];
        self.ranked_top_k(&zeros, 1, 1).map(drop)
    }

    /// Runs `n` preprocessed images (concatenated HWC data) and returns the `k` best
    /// (class, probability) pairs for each, best first. A model that raises, returns another shape
    /// than `[n, classes]` or a non-finite logit is an error, never a panic.
    fn ranked_top_k(&self, data: &[f32], n: usize, k: usize) -> Result<Vec<Vec<(usize, f32)>>, String> {
        let k = k.min(self.classes) as i64;
        let run = || tch::no_grad(|| self.ranked(data, n, k));
        let (scores, ids) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(run))
            .map_err(|p| format!("libtorch panicked: {}", panic_message(&*p)))??;
        let k = k as usize;
        if scores.len() != n * k || ids.len() != n * k {
            return Err(format!("top-{k} gave {} values for {n} images", scores.len()));
        }
        Ok((0..n)
            .map(|i| (0..k).map(|j| (ids[i * k + j] as usize, scores[i * k + j])).collect())
            .collect())
    }

    fn ranked(&self, data: &[f32], n: usize, k: i64) -> Result<(Vec<f32>, Vec<i64>), String> {
        let tch_err = |e: tch::TchError| first_line(&e.to_string());
        let logits = self.checked_logits(data, n)?;
        let (values, indices) = logits.f_softmax(-1, Kind::Float).and_then(|p| p.f_topk(k, -1, true, true)).map_err(tch_err)?;
        let values = values.f_flatten(0, -1).and_then(|t| Vec::<f32>::try_from(t)).map_err(tch_err)?;
        let indices = indices.f_flatten(0, -1).and_then(|t| Vec::<i64>::try_from(t)).map_err(tch_err)?;
        Ok((values, indices))
    }

    /// The model's `[n, classes]` float logits for `n` NHWC images, checked for shape and finiteness.
    fn checked_logits(&self, data: &[f32], n: usize) -> Result<Tensor, String> {
        let tch_err = |e: tch::TchError| first_line(&e.to_string());
        // NHWC data seen as NCHW: a channels-last tensor, no copy.
        let input = Tensor::f_from_slice(data)
            .and_then(|t| t.f_view([n as i64, self.crop, self.crop, 3]))
            .and_then(|t| t.f_permute([0, 3, 1, 2]))
            .and_then(|t| t.f_to_kind(self.kind))
            .map_err(tch_err)?;
        let logits = self.module.forward_ts(&[input]).map_err(tch_err)?;
        let size = logits.size();
        if size != [n as i64, self.classes as i64] {
            return Err(format!("output shape {size:?} for {n} images; expected [{n}, {}]", self.classes));
        }
        let logits = logits.f_to_kind(Kind::Float).map_err(tch_err)?;
        let finite = logits.f_isfinite().and_then(|t| t.f_all()).and_then(|t| t.f_int64_value(&[])).map_err(tch_err)?;
        if finite == 0 {
            return Err("output has NaN or infinite values".into());
        }
        Ok(logits)
    }
}

/// The precision a model asked to run in `asked` runs in: bf16 only where the CPU computes it natively
/// (AVX-512-BF16, which AMX CPUs also have); elsewhere libtorch emulates it, tens of times slower than
/// fp32, so such a box runs fp32 and says so.
pub fn runnable_precision(asked: Precision, native_bf16: bool) -> Precision {
    if asked == Precision::Bf16 && !native_bf16 {
        tracing::warn!(
            "precision = \"bf16\" but this CPU has no native bfloat16 (AVX-512-BF16): libtorch would emulate it, \
             far slower than fp32; running fp32 (set precision = \"fp32\" to silence this)"
        );
        return Precision::Fp32;
    }
    asked
}

fn cpu_has_native_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        true
    }
}

impl Backend for Classifier {
    fn engine(&self) -> &'static str {
        "libtorch"
    }

    fn classes(&self) -> usize {
        self.classes
    }

    fn threads_follow_caller(&self) -> bool {
        true
    }

    fn logits(&self, data: &[f32], n: usize) -> Result<Vec<f32>, Failure> {
        let run = || {
            tch::no_grad(|| {
                let logits = self.checked_logits(data, n)?;
                logits.f_flatten(0, -1).and_then(|t| Vec::<f32>::try_from(t)).map_err(|e| first_line(&e.to_string()))
            })
        };
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(run))
            .map_err(|p| format!("libtorch panicked: {}", panic_message(&*p)))
            .and_then(|r| r)
            .map_err(Failure::Model)
    }

    /// libtorch's own softmax and topk, so its scores and tie order stay what they always were.
    fn top_k(&self, data: &[f32], n: usize, k: usize) -> Result<Vec<Vec<(usize, f32)>>, Failure> {
        self.ranked_top_k(data, n, k).map_err(Failure::Model)
    }
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_runs_only_where_the_cpu_computes_it_natively() {
        assert_eq!(runnable_precision(Precision::Bf16, true), Precision::Bf16);
        assert_eq!(runnable_precision(Precision::Bf16, false), Precision::Fp32);
        assert_eq!(runnable_precision(Precision::Fp32, false), Precision::Fp32);
        assert_eq!(runnable_precision(Precision::Fp32, true), Precision::Fp32);
    }
}
