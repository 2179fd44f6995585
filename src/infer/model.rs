//! One TorchScript classifier, owned by exactly one worker thread (tch tensors are not `Sync`).

use std::path::Path;

use tch::{CModule, Device, Kind, Tensor};

use crate::error::Fatal;

pub struct Classifier {
    module: CModule,
    crop: i64,
    classes: usize,
}

impl Classifier {
    /// Loads the model and runs a forward pass to check it accepts `crop`-sized input and returns one
    /// logit per label; then warms it up at batch sizes 1 and `max_batch`, so the first images do not
    /// pay for TorchScript's first-run optimisation.
    pub fn load(path: &Path, crop: u32, labels: usize, max_batch: usize) -> Result<Classifier, Fatal> {
        let fail = |reason: String| Fatal::Model { path: path.to_path_buf(), reason };
        let mut module = CModule::load_on_device(path, Device::Cpu).map_err(|e| fail(first_line(&e.to_string())))?;
        module.set_eval();
        let crop = i64::from(crop);
        let probe = tch::no_grad(|| module.forward_ts(&[Tensor::zeros([1, 3, crop, crop], (Kind::Float, Device::Cpu))]))
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
        let classifier = Classifier { module, crop, classes: labels };
        for n in [1, 1, max_batch, max_batch] {
            let zeros = vec![0f32; n * 3 * (crop * crop) as usize];
            classifier.top_k(&zeros, n, 1).map_err(|e| fail(format!("warm-up at batch size {n} failed: {e}")))?;
        }
        Ok(classifier)
    }

    /// Runs `n` preprocessed images (concatenated CHW data) and returns the `k` best
    /// (class, probability) pairs for each, best first.
    pub fn top_k(&self, data: &[f32], n: usize, k: usize) -> Result<Vec<Vec<(usize, f32)>>, String> {
        let k = k.min(self.classes) as i64;
        let (scores, ids) = tch::no_grad(|| -> Result<(Vec<f32>, Vec<i64>), tch::TchError> {
            let input = Tensor::f_from_slice(data)?.f_view([n as i64, 3, self.crop, self.crop])?;
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
