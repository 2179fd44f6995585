//! Per-image forward time of a model, as loaded and with each set of load-time graph passes, at batch
//! 1 and 8, fp32 and bf16, on channels-last input like labeld's. A short run for choosing passes, not
//! a benchmark (that is `make bench`).
//!
//! Run: LIBTORCH=.deps/libtorch cargo run --release --example optimize_speed -- MODEL.pt [THREADS]

use std::time::Instant;

use labeld::infer::optimize::{self, Passes};
use tch::{CModule, Device, Kind, Tensor};

fn main() -> Result<(), String> {
    let args: Vec<String> = std::env::args().collect();
    let path = args.get(1).ok_or("usage: optimize_speed MODEL.pt [THREADS]")?;
    let threads = args.get(2).and_then(|t| t.parse().ok()).unwrap_or(2);
    tch::set_num_threads(threads);
    let variants = [
        ("as loaded", None),
        ("freeze", Some(Passes::FREEZE)),
        ("freeze+channels_last", Some(Passes::FREEZE.union(Passes::CHANNELS_LAST))),
        ("optimize_for_inference", Some(Passes::OPTIMIZE_FOR_INFERENCE)),
        ("optimize_for_inference+channels_last", Some(Passes::OPTIMIZE_FOR_INFERENCE.union(Passes::CHANNELS_LAST))),
    ];
    println!("{threads} intra-op threads; ms per image");
    for kind in [Kind::Float, Kind::BFloat16] {
        for (name, passes) in variants {
            let mut module = CModule::load_on_device(path, Device::Cpu).map_err(|e| e.to_string())?;
            module.set_eval();
            let module = match passes {
                Some(p) => optimize::optimized(&module, p, kind)?,
                None => {
                    optimize::convert(&mut module, kind)?;
                    module
                }
            };
            let per_image: Vec<String> = [1, 8].iter().map(|&n| format!("batch {n}: {:6.1}", ms_per_image(&module, kind, n))).collect();
            println!("{kind:?} {name:38} {}", per_image.join("  "));
        }
    }
    Ok(())
}

fn ms_per_image(module: &CModule, kind: Kind, n: i64) -> f64 {
    let input = Tensor::zeros([n, 224, 224, 3], (Kind::Float, Device::Cpu)).permute([0, 3, 1, 2]).to_kind(kind);
    let run = || tch::no_grad(|| module.forward_ts(&[&input]).expect("forward"));
    for _ in 0..3 {
        drop(run());
    }
    let rounds = if n == 1 { 8 } else { 2 };
    let start = Instant::now();
    for _ in 0..rounds {
        drop(run());
    }
    start.elapsed().as_secs_f64() * 1000.0 / (rounds * n) as f64
}
