//! One TorchScript classifier, owned by exactly one worker thread (tch tensors are not `Sync`).

use std::path::Path;

use tch::{CModule, Device, Kind, Tensor};

use crate::config::Precision;
use crate::error::Fatal;

pub struct Classifier {
    module: CModule,
    crop: i64,
    classes: usize,
    kind: Kind,
}

impl Classifier {
    /// Loads the model and runs a forward pass to check it accepts `crop`-sized input and returns one
    /// logit per label; then warms it up at batch sizes 1 and `max_batch`, so the first images do not
    /// pay for TorchScript's first-run optimisation.
    pub fn load(path: &Path, crop: u32, labels: usize, max_batch: usize, precision: Precision) -> Result<Classifier, Fatal> {
        let fail = |reason: String| Fatal::Model { path: path.to_path_buf(), reason };
        let mut module = CModule::load_on_device(path, Device::Cpu).map_err(|e| fail(first_line(&e.to_string())))?;
        module.set_eval();
        let kind = match precision {
            Precision::Fp32 => Kind::Float,
            Precision::Bf16 => Kind::BFloat16,
        };
        if kind != Kind::Float {
            // tch's CModule::to has no fallible form.
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| module.to(Device::Cpu, kind, false)))
                .map_err(|_| fail(format!("cannot convert the model to {}", precision.as_str())))?;
        }
        let crop = i64::from(crop);
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
        let classifier = Classifier { module, crop, classes: labels, kind };
        for n in [1, 1, max_batch, max_batch] {
            let zeros = vec![0f32; n * 3 * (crop * crop) as usize];
            classifier.top_k(&zeros, n, 1).map_err(|e| fail(format!("warm-up at batch size {n} failed: {e}")))?;
        }
        Ok(classifier)
    }

    /// Runs `n` preprocessed images (concatenated HWC data) and returns the `k` best
    /// (class, probability) pairs for each, best first.
    pub fn top_k(&self, data: &[f32], n: usize, k: usize) -> Result<Vec<Vec<(usize, f32)>>, String> {
        let k = k.min(self.classes) as i64;
        let (scores, ids) = tch::no_grad(|| -> Result<(Vec<f32>, Vec<i64>), tch::TchError> {
            // NHWC data seen as NCHW: a channels-last tensor, no copy.
            let input = Tensor::f_from_slice(data)?
                .f_view([n as i64, self.crop, self.crop, 3])?
                .f_permute([0, 3, 1, 2])?
                .f_to_kind(self.kind)?;
            let logits = self.module.forward_ts(&[input])?;
            let probs = logits.f_to_kind(Kind::Float)?.f_softmax(-1, Kind::Float)?;
            let (values, indices) = probs.f_topk(k, -1, true, true)?;
            Ok((Vec::<f32>::try_from(values.f_flatten(0, -1)?)?, Vec::<i64>::try_from(indices.f_flatten(0, -1)?)?))
        })
        .map_err(|e| first_line(&e.to_string()))?;
        let k = k as usize;
        Ok((0..n)
            .map(|i| (0..k).map(|j| (ids[i * k + j] as usize, scores[i * k + j])).collect())
            .collect())
    }
}

/// libtorch errors carry a C++ backtrace; operators need the first line.
fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or(s).to_string()
}
