//! Where a lone image's forward pass loses time: the same model, batch 1, back to back ("hot") and
//! after an idle gap, loaded with one thread count and run with another (as the adaptive layout does:
//! workers load with their share, a lone image runs with every CPU). A short run for finding the cause,
//! not a benchmark (that is `make bench`).
//!
//! An ONNX file (MODEL.onnx) is measured as the daemon runs it: a worker's one-thread session and the
//! session with every CPU that a lone image runs on.
//!
//! Run: cargo run --release --example idle_gap -- MODEL.pt|MODEL.onnx [GAP_MS] [ROUNDS] [BUSY_MS]

use std::time::{Duration, Instant};

use labeld::config::Precision;
use labeld::infer::backend::Backend;
use labeld::infer::model::Classifier;
use labeld::infer::optimize::PASSES;

fn main() -> Result<(), String> {
    // As in the daemon: the model runs on a thread of its own, not the process's first thread.
    std::thread::spawn(measure).join().map_err(|_| "the measuring thread panicked".to_string())?
}

fn measure() -> Result<(), String> {
    let args: Vec<String> = std::env::args().collect();
    let path = args.get(1).ok_or("usage: idle_gap MODEL.pt [GAP_MS] [ROUNDS] [BUSY_MS]")?;
    let gap = Duration::from_millis(args.get(2).and_then(|g| g.parse().ok()).unwrap_or(500));
    let rounds: usize = args.get(3).and_then(|r| r.parse().ok()).unwrap_or(10);
    let spin = Duration::from_millis(args.get(4).and_then(|s| s.parse().ok()).unwrap_or(10));
    let image = vec![0.5f32; 3 * 224 * 224];
    println!("ms per forward pass, batch 1, median of {rounds} (min..max); gap {} ms", gap.as_millis());
    if path.ends_with(".onnx") {
        return measure_onnx(std::path::Path::new(path), gap, rounds, &image);
    }
    for (load_threads, run_threads) in [(2, 2), (1, 2), (1, 1)] {
        labeld::infer::layout::set_threads(load_threads);
        let model = Classifier::load(std::path::Path::new(path), 224, 1000, 4, Precision::Fp32, Some(PASSES)).map_err(|e| e.to_string())?;
        labeld::infer::layout::set_threads(run_threads);
        let pass = || timed_pass(&model, &image);
        let (hot, gapped) = hot_and_gapped(&pass, gap, rounds)?;
        // The same gap, then a pass on a small image first (it reads every weight, little else).
        let small = vec![0.5f32; 3 * 64 * 64];
        let (mut warmed, mut warm_ms) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            std::thread::sleep(gap);
            let t = Instant::now();
            let _ = model.logits(&small, 1);
            warm_ms.push(t.elapsed().as_secs_f64() * 1e3);
            warmed.push(pass()?);
        }
        // The same gap, then every CPU kept busy for `spin` first (as it is while a lone image is decoded).
        let mut spun = Vec::new();
        for _ in 0..rounds {
            std::thread::sleep(gap);
            busy_everywhere(spin);
            spun.push(pass()?);
        }
        println!(
            "loaded with {load_threads} thread(s), run with {run_threads}: hot {}  after the gap {}  after the gap and a 64x64 pass {} (that pass {})  after the gap and {} ms busy on every CPU {}",
            summary(hot),
            summary(gapped),
            summary(warmed),
            summary(warm_ms),
            spin.as_millis(),
            summary(spun)
        );
    }
    Ok(())
}

/// A worker's session (one thread) and the lone-image session (every CPU), hot and after the gap.
fn measure_onnx(path: &std::path::Path, gap: Duration, rounds: usize, image: &[f32]) -> Result<(), String> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let load = labeld::infer::onnx::Load { path, crop: 224, labels: 1000, max_batch: 4, sessions: 1, threads: 1, threads_alone: cpus };
    let model = labeld::infer::onnx::OnnxModel::load(load).map_err(|e| e.to_string())?;
    let sessions: [(&str, &dyn Backend); 2] = [("a worker's session, 1 thread", &model), ("the lone-image session", model.alone().unwrap_or(&model))];
    for (name, m) in sessions {
        let (hot, gapped) = hot_and_gapped(&|| timed_pass(m, image), gap, rounds)?;
        println!("ONNX Runtime, {name} ({cpus} CPUs): hot {}  after the gap {}", summary(hot), summary(gapped));
    }
    Ok(())
}

/// One forward pass of `image` (batch 1), in ms.
fn timed_pass(model: &dyn Backend, image: &[f32]) -> Result<f64, String> {
    let t = Instant::now();
    model.logits(image, 1).map_err(|e| e.to_string())?;
    Ok(t.elapsed().as_secs_f64() * 1e3)
}

/// After three warm-up passes: `rounds` passes back to back, then `rounds` passes each after `gap`.
fn hot_and_gapped(pass: &dyn Fn() -> Result<f64, String>, gap: Duration, rounds: usize) -> Result<(Vec<f64>, Vec<f64>), String> {
    for _ in 0..3 {
        pass()?;
    }
    let hot = (0..rounds).map(|_| pass()).collect::<Result<_, _>>()?;
    let mut gapped = Vec::new();
    for _ in 0..rounds {
        std::thread::sleep(gap);
        gapped.push(pass()?);
    }
    Ok((hot, gapped))
}

/// Keeps every CPU busy for `d` (a spinning thread per CPU), then returns.
fn busy_everywhere(d: Duration) {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let until = Instant::now() + d;
    std::thread::scope(|s| {
        for _ in 0..cpus {
            s.spawn(|| {
                while Instant::now() < until {
                    std::hint::spin_loop();
                }
            });
        }
    });
}

fn summary(mut v: Vec<f64>) -> String {
    v.sort_by(f64::total_cmp);
    format!("{:6.1} ({:.1}..{:.1})", v[v.len() / 2], v[0], v[v.len() - 1])
}
