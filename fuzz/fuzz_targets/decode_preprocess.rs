//! Any bytes through labeld's decode + preprocess path: must return Ok or an ImageError, never panic,
//! hang or allocate without bound.
#![no_main]

use labeld::config::Preprocess;
use labeld::infer::preprocess::Preprocessor;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut pre = Preprocessor::new(Preprocess {
        resize: 64,
        crop: 56,
        max_pixels: 4_000_000,
        max_file_bytes: 1 << 24,
        scaled_decode: true,
        ..Preprocess::default()
    });
    let mut out = Vec::new();
    if pre.process(data, &mut out).is_ok() {
        assert_eq!(out.len(), 3 * 56 * 56);
        assert!(out.iter().all(|v| v.is_finite()));
    }
});
