//! Pillow 9.4's antialiased bilinear resize (`libImaging/Resample.c`), value for value: weights
//! computed in f64 and rounded to 22-bit fixed point as Pillow rounds them, a horizontal pass over
//! only the source rows the vertical pass reads, then a vertical pass, each sum in wrapping 32-bit
//! integers started at one half and clipped to 8 bits. Integer sums do not depend on their order, so
//! the AVX2 and AVX-512 passes give the same bytes as the scalar one.
//!
//! Every output pixel depends only on its own weights, so computing just a window of the output (the
//! centre crop) gives exactly the bytes the full resize has there.

use std::ops::Range;

/// Pillow's `PRECISION_BITS`: 8 bits of result, 2 bits of headroom in an `int`.
const PRECISION_BITS: u32 = 32 - 8 - 2;
/// The rounding term every sum starts from.
const HALF: i32 = 1 << (PRECISION_BITS - 1);

/// A rectangle of the resized image: columns `x..x + width`, rows `y..y + height`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
}

/// The instruction set a pass runs on; all give identical bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Scalar,
    Avx2,
    Avx512,
}

impl Isa {
    /// The widest this CPU runs.
    pub fn detect() -> Isa {
        Isa::available().pop().unwrap_or(Isa::Scalar)
    }

    /// Every instruction set this CPU runs, narrowest first.
    pub fn available() -> Vec<Isa> {
        [Isa::Scalar, Isa::Avx2, Isa::Avx512].into_iter().filter(|i| i.runs_here()).collect()
    }

    /// Whether this CPU has every feature the passes for `self` use.
    fn runs_here(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            match self {
                Isa::Scalar => true,
                Isa::Avx2 => is_x86_feature_detected!("avx2"),
                Isa::Avx512 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Isa::Scalar
        }
    }
}

/// One axis of the resize: for each output index in a range, its first source index and its
/// fixed-point weights (`precompute_coeffs` + `normalize_coeffs_8bpc`).
#[derive(Debug)]
struct Axis {
    /// First source index of each output index.
    start: Vec<usize>,
    /// Taps per output index (Pillow's `xmax - xmin`).
    taps: Vec<usize>,
    /// `stride` weights per output index, zero past its `taps`.
    weights: Vec<i32>,
    stride: usize,
}

/// Pillow's `bilinear_filter`.
fn bilinear(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 { 1.0 - x } else { 0.0 }
}

impl Axis {
    /// The weights of the output indices `out` of a resize from `in_size` to `out_size`, with
    /// Pillow's default box `(0, in_size)` (its coordinates are C floats, hence the f32).
    fn new(in_size: usize, out_size: usize, out: Range<usize>) -> Axis {
        let (in0, in1) = (0.0f32, in_size as f32);
        let scale = f64::from(in1 - in0) / out_size as f64;
        let filterscale = scale.max(1.0);
        let support = 1.0 * filterscale; // the bilinear filter's support is 1
        let stride = support.ceil() as usize * 2 + 1;
        let mut axis = Axis { start: Vec::new(), taps: Vec::new(), weights: vec![0; out.len() * stride], stride };
        let mut w = vec![0.0f64; stride];
        for (i, xx) in out.enumerate() {
            let center = f64::from(in0) + (xx as f64 + 0.5) * scale;
            let ss = 1.0 / filterscale;
            // C's (int) truncates toward zero, as `as` does.
            let xmin = ((center - support + 0.5) as i32).max(0) as usize;
            let xmax = (((center + support + 0.5) as i32).min(in_size as i32) as usize).saturating_sub(xmin);
            let mut ww = 0.0;
            for (x, wx) in w.iter_mut().enumerate().take(xmax) {
                *wx = bilinear(((x + xmin) as f64 - center + 0.5) * ss);
                ww += *wx;
            }
            let row = &mut axis.weights[i * stride..(i + 1) * stride];
            for (k, wx) in row.iter_mut().zip(&w).take(xmax) {
                let k64 = if ww != 0.0 { wx / ww } else { *wx };
                let fixed = k64 * f64::from(1u32 << PRECISION_BITS);
                *k = if k64 < 0.0 { (-0.5 + fixed) as i32 } else { (0.5 + fixed) as i32 };
            }
            axis.start.push(xmin);
            axis.taps.push(xmax);
        }
        axis
    }

    fn len(&self) -> usize {
        self.start.len()
    }

    /// The weights of output index `i`, one per tap.
    fn weights(&self, i: usize) -> &[i32] {
        &self.weights[i * self.stride..i * self.stride + self.taps[i]]
    }

    /// The source indices the whole range reads.
    fn source_span(&self) -> Range<usize> {
        let first = self.start.first().copied().unwrap_or(0);
        let end = self.start.iter().zip(&self.taps).map(|(s, t)| s + t).max().unwrap_or(first);
        first..end
    }

    /// Taps rounded up to `group`, the same for every output index, for the SIMD passes.
    fn padded_taps(&self, group: usize) -> usize {
        self.taps.iter().copied().max().unwrap_or(0).div_ceil(group) * group
    }
}

/// Pillow's `clip8`: the sum's integer part, clamped to a byte.
fn clip8(ss: i32) -> u8 {
    (ss >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resizes `src` (packed RGB, `width` x `height`) to `new_width` x `new_height` as Pillow's
/// `Image.resize((new_width, new_height), Image.BILINEAR)` does, and returns the `window` of the
/// result (packed RGB). The window must lie inside the new size.
pub fn resize_window(src: &[u8], width: u32, height: u32, new_width: u32, new_height: u32, window: Window, isa: Isa) -> Vec<u8> {
    let (w, h) = (width as usize, height as usize);
    debug_assert_eq!(src.len(), w * h * 3);
    debug_assert!(window.x + window.width <= new_width && window.y + window.height <= new_height);
    let cols = window.x as usize..(window.x + window.width) as usize;
    let rows = window.y as usize..(window.y + window.height) as usize;
    let mut out = vec![0u8; cols.len() * rows.len() * 3];
    // ImagingResampleInner skips the pass of a dimension that does not change.
    match (new_width != width, new_height != height) {
        (false, false) => {
            for (r, y) in rows.enumerate() {
                let line = &src[(y * w + cols.start) * 3..(y * w + cols.end) * 3];
                out[r * cols.len() * 3..(r + 1) * cols.len() * 3].copy_from_slice(line);
            }
        }
        (true, false) => {
            let horiz = Axis::new(w, new_width as usize, cols);
            horizontal(src, w, rows, &horiz, &mut out, isa);
        }
        (false, true) => {
            let vert = Axis::new(h, new_height as usize, rows);
            vertical(src, w * 3, cols.start * 3..cols.end * 3, &vert, &mut out, isa);
        }
        (true, true) => {
            let vert = Axis::new(h, new_height as usize, rows);
            let horiz = Axis::new(w, new_width as usize, cols);
            let span = vert.source_span();
            let row_bytes = horiz.len() * 3;
            let mut temp = vec![0u8; span.len() * row_bytes];
            horizontal(src, w, span.clone(), &horiz, &mut temp, isa);
            let shifted = Axis { start: vert.start.iter().map(|s| s - span.start).collect(), ..vert };
            vertical(&temp, row_bytes, 0..row_bytes, &shifted, &mut out, isa);
        }
    }
    out
}

/// The horizontal pass over source `rows` of a `width`-wide image, into `out` (one row per source row).
fn horizontal(src: &[u8], width: usize, rows: Range<usize>, axis: &Axis, out: &mut [u8], isa: Isa) {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: `runs_here` checked every feature the pass is compiled for.
        match isa {
            Isa::Avx512 if isa.runs_here() => return unsafe { x86::horizontal_avx512(src, width, rows, axis, out) },
            Isa::Avx2 if isa.runs_here() => return unsafe { x86::horizontal_avx2(src, width, rows, axis, out) },
            _ => {}
        }
    }
    let _ = isa;
    for (r, y) in rows.enumerate() {
        let line = &src[y * width * 3..(y + 1) * width * 3];
        let dst = &mut out[r * axis.len() * 3..(r + 1) * axis.len() * 3];
        for i in 0..axis.len() {
            horizontal_pixel(line, axis, i, &mut dst[i * 3..i * 3 + 3]);
        }
    }
}

/// One output pixel of the horizontal pass, as `ImagingResampleHorizontal_8bpc` computes it.
fn horizontal_pixel(line: &[u8], axis: &Axis, i: usize, dst: &mut [u8]) {
    let mut ss = [HALF; 3];
    let px = &line[axis.start[i] * 3..];
    for (t, &k) in axis.weights(i).iter().enumerate() {
        for c in 0..3 {
            ss[c] = ss[c].wrapping_add(i32::from(px[t * 3 + c]).wrapping_mul(k));
        }
    }
    for c in 0..3 {
        dst[c] = clip8(ss[c]);
    }
}

/// The vertical pass: for each output row of `axis`, the bytes `cols` of the source rows it reads
/// (`row_bytes` apart in `src`), into `out` (`cols.len()` bytes per row).
fn vertical(src: &[u8], row_bytes: usize, cols: Range<usize>, axis: &Axis, out: &mut [u8], isa: Isa) {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: as in `horizontal`.
        match isa {
            Isa::Avx512 if isa.runs_here() => return unsafe { x86::vertical_avx512(src, row_bytes, cols, axis, out) },
            Isa::Avx2 if isa.runs_here() => return unsafe { x86::vertical_avx2(src, row_bytes, cols, axis, out) },
            _ => {}
        }
    }
    let _ = isa;
    vertical_rows(src, row_bytes, cols, axis, out);
}

/// The vertical pass written so the compiler vectorises it: a row of sums, one source row at a time.
#[inline(always)]
fn vertical_rows(src: &[u8], row_bytes: usize, cols: Range<usize>, axis: &Axis, out: &mut [u8]) {
    let mut ss = vec![0i32; cols.len()];
    for (i, dst) in out.chunks_exact_mut(cols.len()).enumerate().take(axis.len()) {
        ss.fill(HALF);
        for (t, &k) in axis.weights(i).iter().enumerate() {
            let y = axis.start[i] + t;
            let line = &src[y * row_bytes + cols.start..y * row_bytes + cols.end];
            for (s, &p) in ss.iter_mut().zip(line) {
                *s = s.wrapping_add(i32::from(p).wrapping_mul(k));
            }
        }
        for (d, &s) in dst.iter_mut().zip(&ss) {
            *d = clip8(s);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! The passes with `std::arch`: each output pixel's sums in one vector, several taps per
    //! multiply. Weights are laid out once per pass to match the loads.
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::{Axis, HALF, horizontal_pixel, vertical_rows};

    /// Each output pixel's weights laid out for two taps per step in eight i32 lanes: lane `3t + c`
    /// of a step holds tap t's weight for each channel c, lanes 6 and 7 are 0. `pair`: the steps of
    /// pixels 2j and 2j+1 are interleaved, one 16-lane vector per step. Returns the weights and the
    /// steps per pixel.
    fn lane_weights(axis: &Axis, pair: bool) -> (Vec<i32>, usize) {
        let steps = axis.padded_taps(2) / 2;
        let mut w = vec![0i32; (axis.len() + 1) * steps * 8];
        for i in 0..axis.len() {
            for (t, &k) in axis.weights(i).iter().enumerate() {
                let vector = if pair { ((i / 2) * steps + t / 2) * 2 + i % 2 } else { i * steps + t / 2 };
                let base = vector * 8 + (t % 2) * 3;
                w[base..base + 3].fill(k);
            }
        }
        (w, steps)
    }

    /// The `R G B` sums in lanes 0..3 of `sums` → three clipped bytes at `dst` (a fourth byte is
    /// written when `room` says it fits: the next pixel, or the next row, overwrites it).
    #[inline(always)]
    unsafe fn store_rgb(sums: __m128i, dst: *mut u8, room: bool) {
        unsafe {
            let v = _mm_srai_epi32::<{ super::PRECISION_BITS as i32 }>(_mm_add_epi32(sums, _mm_set1_epi32(HALF)));
            // Saturating packs clamp to 0..=255, as clip8 does.
            let v = _mm_packus_epi16(_mm_packs_epi32(v, v), v);
            let word = (_mm_cvtsi128_si32(v) as u32).to_le_bytes();
            if room {
                dst.cast::<[u8; 4]>().write_unaligned(word);
            } else {
                std::ptr::copy_nonoverlapping(word.as_ptr(), dst, 3);
            }
        }
    }

    /// Bytes read from a pixel's first tap: 8 per step, 6 apart.
    fn reach(steps: usize) -> usize {
        (steps.max(1) - 1) * 6 + 8
    }

    /// One output pixel with AVX2, two taps per multiply: the 8 bytes at tap t are `R G B R G B R G`
    /// of taps t, t+1 (and t+2, weighted 0), widened to eight i32 lanes. `px` has `reach(steps)`
    /// readable bytes, `k` `steps` weight vectors, `stride` i32s apart.
    #[inline(always)]
    unsafe fn pixel_avx2(px: *const u8, k: *const i32, steps: usize, stride: usize, dst: *mut u8, room: bool) {
        unsafe {
            let mut acc = _mm256_setzero_si256();
            for s in 0..steps {
                let p = _mm256_cvtepu8_epi32(_mm_loadl_epi64(px.add(s * 6).cast()));
                acc = _mm256_add_epi32(acc, _mm256_mullo_epi32(p, _mm256_loadu_si256(k.add(s * stride).cast())));
            }
            let fold = _mm256_setr_epi32(3, 4, 5, 0, 0, 0, 0, 0);
            let sums = _mm256_add_epi32(acc, _mm256_permutevar8x32_epi32(acc, fold));
            store_rgb(_mm256_castsi256_si128(sums), dst, room);
        }
    }

    #[target_feature(enable = "avx2")]
    pub unsafe fn horizontal_avx2(src: &[u8], width: usize, rows: Range<usize>, axis: &Axis, out: &mut [u8]) {
        let (weights, steps) = lane_weights(axis, false);
        for (r, y) in rows.enumerate() {
            let line = y * width * 3;
            let dst = &mut out[r * axis.len() * 3..(r + 1) * axis.len() * 3];
            for i in 0..axis.len() {
                let first = line + axis.start[i] * 3;
                if first + reach(steps) > src.len() {
                    horizontal_pixel(&src[line..line + width * 3], axis, i, &mut dst[i * 3..i * 3 + 3]);
                    continue;
                }
                // SAFETY: the reads end at `first + reach <= src.len()`, the weights have `steps`
                // vectors per pixel, and the store stays in `dst` (4 bytes only with room).
                unsafe {
                    let k = weights.as_ptr().add(i * steps * 8);
                    pixel_avx2(src.as_ptr().add(first), k, steps, 8, dst.as_mut_ptr().add(i * 3), i * 3 + 4 <= dst.len());
                }
            }
        }
    }

    /// Two output pixels per 512-bit multiply, each laid out as in `pixel_avx2`.
    #[target_feature(enable = "avx512f,avx2")]
    pub unsafe fn horizontal_avx512(src: &[u8], width: usize, rows: Range<usize>, axis: &Axis, out: &mut [u8]) {
        let (weights, steps) = lane_weights(axis, true);
        let fold = _mm512_setr_epi32(3, 4, 5, 0, 0, 0, 0, 0, 11, 12, 13, 0, 0, 0, 0, 0);
        for (r, y) in rows.enumerate() {
            let line = y * width * 3;
            let dst = &mut out[r * axis.len() * 3..(r + 1) * axis.len() * 3];
            let mut i = 0;
            while i < axis.len() {
                let first = line + axis.start[i] * 3;
                let pair = i + 1 < axis.len() && line + axis.start[i + 1] * 3 + reach(steps) <= src.len();
                if first + reach(steps) > src.len() {
                    horizontal_pixel(&src[line..line + width * 3], axis, i, &mut dst[i * 3..i * 3 + 3]);
                    i += 1;
                    continue;
                }
                // SAFETY: as in `horizontal_avx2`; pixel i + 1's reads are checked by `pair`, and its
                // weights are the second half of each 16-lane vector.
                unsafe {
                    let k = weights.as_ptr().add((i / 2) * steps * 16);
                    if !pair {
                        pixel_avx2(src.as_ptr().add(first), k, steps, 16, dst.as_mut_ptr().add(i * 3), i * 3 + 4 <= dst.len());
                        i += 1;
                        continue;
                    }
                    let (a, b) = (src.as_ptr().add(first), src.as_ptr().add(line + axis.start[i + 1] * 3));
                    let mut acc = _mm512_setzero_si512();
                    for s in 0..steps {
                        let bytes = _mm_unpacklo_epi64(_mm_loadl_epi64(a.add(s * 6).cast()), _mm_loadl_epi64(b.add(s * 6).cast()));
                        let p = _mm512_cvtepu8_epi32(bytes);
                        acc = _mm512_add_epi32(acc, _mm512_mullo_epi32(p, _mm512_loadu_si512(k.add(s * 16).cast())));
                    }
                    let sums = _mm512_add_epi32(acc, _mm512_permutexvar_epi32(fold, acc));
                    store_rgb(_mm512_castsi512_si128(sums), dst.as_mut_ptr().add(i * 3), true);
                    store_rgb(_mm512_extracti32x4_epi32::<2>(sums), dst.as_mut_ptr().add(i * 3 + 3), i * 3 + 7 <= dst.len());
                }
                i += 2;
            }
        }
    }

    /// The portable vertical pass, compiled for AVX2.
    #[target_feature(enable = "avx2")]
    pub unsafe fn vertical_avx2(src: &[u8], row_bytes: usize, cols: Range<usize>, axis: &Axis, out: &mut [u8]) {
        vertical_rows(src, row_bytes, cols, axis, out)
    }

    /// The portable vertical pass, compiled for AVX-512.
    #[target_feature(enable = "avx2,avx512f,avx512bw")]
    pub unsafe fn vertical_avx512(src: &[u8], row_bytes: usize, cols: Range<usize>, axis: &Axis, out: &mut [u8]) {
        vertical_rows(src, row_bytes, cols, axis, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// A deterministic image with edges, gradients and noise, so that every weight matters.
    fn pattern(w: u32, h: u32, seed: u32) -> Vec<u8> {
        let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        let mut px = Vec::with_capacity((w * h * 3) as usize);
        for y in 0..h {
            for x in 0..w {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                let noise = (state >> 24) as u8;
                let edge = if (x / 3 + y / 2) % 2 == 0 { 255 } else { 0 };
                px.extend([noise, edge, ((x * 255) / w.max(1)) as u8]);
            }
        }
        px
    }

    /// Pillow's `Image.resize(.., BILINEAR)` of each `(w, h, new_w, new_h)` on `pattern`, run by
    /// Debian's python3 (PIL 9.4, the reference pipeline's).
    fn pillow(cases: &[(u32, u32, u32, u32)]) -> Vec<Vec<u8>> {
        let dir = tempfile::tempdir().unwrap();
        let mut list = Vec::new();
        for (n, &(w, h, nw, nh)) in cases.iter().enumerate() {
            let src = dir.path().join(format!("{n}.in"));
            std::fs::write(&src, pattern(w, h, n as u32)).unwrap();
            list.push(format!("({w},{h},{nw},{nh},{:?},{:?})", src.to_str().unwrap(), dir.path().join(format!("{n}.out")).to_str().unwrap()));
        }
        let script = format!(
            "from PIL import Image\nfor w,h,nw,nh,i,o in [{}]:\n    \
             open(o,'wb').write(Image.frombytes('RGB',(w,h),open(i,'rb').read()).resize((nw,nh),Image.BILINEAR).tobytes())\n",
            list.join(",")
        );
        let run = Command::new("/usr/bin/python3").arg("-c").arg(script).output().expect("run /usr/bin/python3");
        assert!(run.status.success(), "PIL failed: {}", String::from_utf8_lossy(&run.stderr));
        (0..cases.len()).map(|n| std::fs::read(dir.path().join(format!("{n}.out"))).unwrap()).collect()
    }

    fn full(w: u32, h: u32) -> Window {
        Window { x: 0, y: 0, width: w, height: h }
    }

    #[test]
    fn equals_pillow_on_edge_cases_with_every_instruction_set() {
        let cases = [
            (1, 9, 1, 4),       // 1 x N, only the height changes
            (9, 1, 4, 1),       // N x 1, only the width changes
            (1, 1, 5, 3),       // one pixel, scaled up
            (5, 3, 17, 11),     // upscaling both ways
            (37, 23, 11, 7),    // odd sizes, downscaling
            (40, 30, 17, 30),   // only the width changes
            (40, 30, 40, 13),   // only the height changes
            (300, 200, 7, 5),   // a large factor: wide filters
            (451, 300, 384, 256), // torchvision's Resize(256) of a 451x300 photo
            (64, 48, 64, 48),   // nothing changes
            (3, 200, 256, 17066), // an extreme aspect ratio scaled up
            (1000, 3, 85, 256), // up one way, down the other
        ];
        let want = pillow(&cases);
        for isa in Isa::available() {
            for (n, &(w, h, nw, nh)) in cases.iter().enumerate() {
                let got = resize_window(&pattern(w, h, n as u32), w, h, nw, nh, full(nw, nh), isa);
                assert!(got == want[n], "{isa:?} {w}x{h} -> {nw}x{nh}: differs from PIL at byte {:?}", got.iter().zip(&want[n]).position(|(a, b)| a != b));
            }
        }
    }

    #[test]
    fn a_window_is_the_same_bytes_as_that_part_of_the_full_resize() {
        for (w, h, nw, nh) in [(1920, 1080, 455, 256), (640, 427, 383, 256), (100, 80, 300, 240), (455, 256, 455, 256)] {
            let src = pattern(w, h, 7);
            let whole = resize_window(&src, w, h, nw, nh, full(nw, nh), Isa::Scalar);
            let win = Window { x: (nw - 224) / 2 + 1, y: (nh - 224) / 2, width: 224, height: 224 };
            for isa in Isa::available() {
                let part = resize_window(&src, w, h, nw, nh, win, isa);
                for r in 0..224usize {
                    let at = ((win.y as usize + r) * nw as usize + win.x as usize) * 3;
                    assert_eq!(&part[r * 672..(r + 1) * 672], &whole[at..at + 672], "{isa:?} {w}x{h}: row {r}");
                }
            }
        }
    }

    #[test]
    fn weights_are_pillows_fixed_point() {
        // 4 -> 2: output 0 is centred on 1.0 with support 2, taps 0..3 weigh 0.75 0.75 0.25 before
        // normalising by 1.75; times 2^22, rounded half up.
        let axis = Axis::new(4, 2, 0..2);
        assert_eq!(axis.start, [0, 1]);
        assert_eq!(axis.weights(0), [1_797_559, 1_797_559, 599_186]);
        // Upscaling: the filter keeps its unit support, two taps each.
        let axis = Axis::new(2, 4, 0..4);
        assert_eq!(axis.taps, [1, 2, 2, 1]);
        assert_eq!(axis.weights(1), [3_145_728, 1_048_576]);
    }
}
