//! The boundary between labeld and what computes the logits: libtorch in this process, ONNX Runtime in
//! this process, or a model server over the Open Inference Protocol. Decoding, preprocessing, batching,
//! labels, records and the fault/bad-input verdicts are labeld's and the same for every backend; a
//! backend only turns a batch of preprocessed images into logits.

/// Why a batch got no logits.
#[derive(Debug, Clone, PartialEq)]
pub enum Failure {
    /// The model failed on this input (raised, wrong shape, NaN): the worker splits the batch and asks
    /// the model's test input whether the image or the model is at fault, as it always has.
    Model(String),
    /// The compute is not there (a model server down, timing out, answering 5xx, without the model): a
    /// fault, retried with back-off; never split, never an image's error record.
    Unavailable(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Model(e) | Failure::Unavailable(e) => f.write_str(e),
        }
    }
}

/// A loaded model, shared by the worker threads (so `Sync`: each call runs one batch on its own).
pub trait Backend: Send + Sync {
    /// The engine's name as rows and sidecars record it: "libtorch", "onnxruntime", "remote".
    fn engine(&self) -> &'static str;

    /// How many classes the model ranks (the length of each image's logits row).
    fn classes(&self) -> usize;

    /// Whether a pass runs on the calling thread's intra-op threads (libtorch's OpenMP teams): then a
    /// lone image's pass goes to the one thread with every CPU (`infer::solo`).
    fn threads_follow_caller(&self) -> bool {
        false
    }

    /// The model as it runs a pass that has the box to itself, when that is a copy of its own: ONNX
    /// Runtime fixes a session's threads when it is made, so a lone image runs on a session with every
    /// CPU (libtorch's passes follow their caller's threads instead: `threads_follow_caller`).
    fn alone(&self) -> Option<&dyn Backend> {
        None
    }

    /// The logits of `n` preprocessed images, given as one NHWC float buffer (`n × crop × crop × 3`),
    /// as `n × classes` values, image after image.
    fn logits(&self, data: &[f32], n: usize) -> Result<Vec<f32>, Failure>;

    /// The `k` best (class, probability) pairs of each image, best first: softmax over its logits.
    /// A backend whose runtime ranks natively may override this (libtorch does, to keep its exact
    /// scores and tie order).
    fn top_k(&self, data: &[f32], n: usize, k: usize) -> Result<Vec<Vec<(usize, f32)>>, Failure> {
        let logits = self.logits(data, n)?;
        rank(&logits, n, self.classes(), k).map_err(Failure::Model)
    }
}

/// Softmax and top-`k` over `n` rows of `classes` logits: ties keep the lower class id first, as
/// PyTorch's sorted topk does on CPU. Wrong lengths and non-finite logits are the model's failure.
pub fn rank(logits: &[f32], n: usize, classes: usize, k: usize) -> Result<Vec<Vec<(usize, f32)>>, String> {
    if classes == 0 || logits.len() != n * classes {
        return Err(format!("{} logits for {n} images of {classes} classes", logits.len()));
    }
    if logits.iter().any(|v| !v.is_finite()) {
        return Err("output has NaN or infinite values".into());
    }
    let k = k.min(classes);
    Ok(logits
        .chunks_exact(classes)
        .map(|row| {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let exp: Vec<f32> = row.iter().map(|v| (v - max).exp()).collect();
            let sum: f32 = exp.iter().sum();
            let mut ids: Vec<usize> = (0..classes).collect();
            ids.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
            ids.truncate(k);
            ids.into_iter().map(|i| (i, exp[i] / sum)).collect()
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_orders_by_logit_with_ties_on_the_lower_class_and_sums_to_one() {
        let logits = [1.0, 3.0, 3.0, 0.5, /* second image */ 0.0, 0.0, 0.0, 10.0];
        let r = rank(&logits, 2, 4, 3).unwrap();
        assert_eq!(r[0].iter().map(|p| p.0).collect::<Vec<_>>(), [1, 2, 0]);
        assert_eq!(r[1].iter().map(|p| p.0).collect::<Vec<_>>(), [3, 0, 1]);
        let all = rank(&logits[..4], 1, 4, 4).unwrap();
        let sum: f32 = all[0].iter().map(|p| p.1).sum();
        assert!((sum - 1.0).abs() < 1e-6, "{sum}");
        assert_eq!(all[0][0].1, all[0][1].1);
    }

    #[test]
    fn rank_refuses_wrong_lengths_and_non_finite_logits() {
        assert!(rank(&[1.0, 2.0, 3.0], 2, 2, 1).unwrap_err().contains("3 logits for 2 images"));
        assert!(rank(&[1.0, f32::NAN], 1, 2, 1).unwrap_err().contains("NaN"));
        assert!(rank(&[1.0, f32::INFINITY], 1, 2, 1).is_err());
        assert_eq!(rank(&[1.0, 2.0], 1, 2, 5).unwrap()[0].len(), 2);
    }
}
