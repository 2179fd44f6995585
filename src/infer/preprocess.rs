//! Image file → normalized HWC `Vec<f32>`, identical to the reference pipeline's: PIL 9.4
//! `Image.open(..).convert("RGB")` → torchvision `Resize(resize)` (PIL's antialiased bilinear, see
//! `resample`) → `CenterCrop(crop)` → `ToTensor` → `Normalize`, bit for bit (EXIF orientation aside).

use std::io::Cursor;
use std::path::Path;

use image::metadata::Orientation;
use image::{ImageDecoder, ImageReader, Limits};

use std::time::Instant;

use super::resample::{Isa, Window, resize_window};
use crate::config::Preprocess;
use crate::metrics::{Stage, StageTimes};
use crate::vocab::Identity;
use crate::error::ImageError;

/// One per worker: holds the JPEG decoder between images.
pub struct Preprocessor {
    cfg: Preprocess,
    /// The SIMD the resize runs on (every choice gives the same bytes).
    isa: Isa,
    jpeg: Option<turbojpeg::Decompressor>,
    times: StageTimes,
    /// When set, each image's crop is also kept as a small JPEG (for the status page).
    thumbnails: bool,
    thumb: Option<Vec<u8>>,
}

impl Preprocessor {
    pub fn new(cfg: Preprocess) -> Self {
        Self::with_times(cfg, StageTimes::default())
    }

    /// A preprocessor that adds its read/decode/resize time to `times`.
    pub fn with_times(cfg: Preprocess, times: StageTimes) -> Self {
        Preprocessor { cfg, isa: Isa::detect(), jpeg: None, times, thumbnails: false, thumb: None }
    }

    pub fn config(&self) -> &Preprocess {
        &self.cfg
    }

    pub fn set_thumbnails(&mut self, on: bool) {
        self.thumbnails = on;
    }

    /// The thumbnail of the image processed last, if thumbnails are on and it decoded.
    pub fn take_thumb(&mut self) -> Option<Vec<u8>> {
        self.thumb.take()
    }

    /// Number of floats one image produces.
    pub fn len(&self) -> usize {
        3 * (self.cfg.crop as usize) * (self.cfg.crop as usize)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reads (beneath the inbox `root`), decodes and preprocesses one file, appending its tensor data
    /// to `out`. `read` is set to the identity of the file version read, also when it does not decode:
    /// the error record is about that version.
    pub fn load(&mut self, root: &Path, path: &Path, out: &mut Vec<f32>, read: &mut Option<Identity>) -> Result<(), ImageError> {
        let t = Instant::now();
        let file = read_image_file(root, path, self.cfg.max_file_bytes);
        self.times.add(Stage::Read, t.elapsed());
        let (bytes, identity) = file?;
        *read = Some(identity);
        self.process(&bytes, out)
    }

    /// Decodes `bytes` and appends the normalized image (HWC order) to `out`.
    pub fn process(&mut self, bytes: &[u8], out: &mut Vec<f32>) -> Result<(), ImageError> {
        let t = Instant::now();
        let rgb = self.decode_rgb(bytes);
        self.times.add(Stage::Decode, t.elapsed());
        let t = Instant::now();
        let cropped = self.resize_and_crop(rgb?)?;
        normalize_into(&cropped, self.cfg.crop, &self.cfg.mean, &self.cfg.std, out);
        self.times.add(Stage::Resize, t.elapsed());
        self.thumb = if self.thumbnails { thumbnail_jpeg(&cropped, self.cfg.crop) } else { None };
        Ok(())
    }

    fn decode_rgb(&mut self, bytes: &[u8]) -> Result<image::RgbImage, ImageError> {
        if bytes.is_empty() {
            return Err(ImageError::Empty);
        }
        if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
            let rgb = self.decode_jpeg(bytes)?;
            return Ok(match jpeg_orientation(bytes) {
                Some(o) if o != Orientation::NoTransforms => {
                    let mut img = image::DynamicImage::ImageRgb8(rgb);
                    img.apply_orientation(o);
                    img.into_rgb8()
                }
                _ => rgb,
            });
        }
        let reader = || {
            ImageReader::new(Cursor::new(bytes)).with_guessed_format().map_err(|e| ImageError::Read(e.to_string()))
        };
        let probe = reader()?;
        if probe.format().is_none() {
            return Err(ImageError::UnknownFormat);
        }
        // Refuse by the header's dimensions before allocating anything for the pixels.
        let (width, height) = probe.into_dimensions().map_err(|e| ImageError::Decode(e.to_string()))?;
        let pixels = u64::from(width) * u64::from(height);
        if pixels > self.cfg.max_pixels {
            return Err(ImageError::TooLarge { width, height, pixels, limit: self.cfg.max_pixels });
        }
        if pixels == 0 {
            return Err(ImageError::Decode(format!("image has no pixels ({width}x{height})")));
        }
        // A few hundred bytes of PNG can say 1x16777216: refuse what the resize would need, too.
        resize_plan(width, height, self.cfg.resize, self.cfg.max_pixels)?;
        let mut limits = Limits::default();
        // Room for the largest pixel format (16-bit RGBA) at the pixel limit, and no more.
        limits.max_alloc = Some(self.cfg.max_pixels.saturating_mul(8).saturating_add(64 << 20));
        let mut r = reader()?;
        r.limits(limits);
        // A decoder bug must cost one error record, not the daemon.
        let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            // Animated GIF/WebP/PNG: the decoder yields the first frame.
            let mut decoder = r.into_decoder()?;
            let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);
            let mut img = image::DynamicImage::from_decoder(decoder)?;
            img.apply_orientation(orientation);
            Ok::<_, image::ImageError>(img)
        }))
        .map_err(|_| ImageError::Decode("decoder crashed on this file".into()))?
        .map_err(|e| ImageError::Decode(e.to_string()))?;
        Ok(to_rgb_like_pil(decoded))
    }

    /// JPEGs go through libjpeg-turbo with its defaults (ISLOW DCT, fancy upsampling), as PIL decodes
    /// them, so the pixels are PIL's; CMYK/YCCK ones come out as CMYK and take PIL's conversion.
    fn decode_jpeg(&mut self, bytes: &[u8]) -> Result<image::RgbImage, ImageError> {
        let dec = match &mut self.jpeg {
            Some(d) => d,
            None => self.jpeg.insert(
                turbojpeg::Decompressor::new().map_err(|e| ImageError::Decode(format!("JPEG decoder: {e}")))?,
            ),
        };
        let header = dec.read_header(bytes).map_err(|e| ImageError::Decode(e.to_string()))?;
        let cmyk = matches!(header.colorspace, turbojpeg::Colorspace::CMYK | turbojpeg::Colorspace::YCCK);
        let (format, channels) = if cmyk { (turbojpeg::PixelFormat::CMYK, 4) } else { (turbojpeg::PixelFormat::RGB, 3) };
        let (width, height) = (header.width as u32, header.height as u32);
        let pixels = u64::from(width) * u64::from(height);
        if pixels > self.cfg.max_pixels {
            return Err(ImageError::TooLarge { width, height, pixels, limit: self.cfg.max_pixels });
        }
        if pixels == 0 {
            return Err(ImageError::Decode(format!("image has no pixels ({width}x{height})")));
        }
        // Decoding at 1/2, 1/4 or 1/8 scale in the DCT domain is far cheaper, and the resize that
        // follows shrinks the image anyway: take the smallest scale that keeps the shorter side at least
        // `resize` (after EXIF rotation the shorter side is the same).
        let denom = if self.cfg.scaled_decode { scale_denominator(width, height, 2 * self.cfg.resize) } else { 1 };
        let (sw, sh) = (width.div_ceil(denom), height.div_ceil(denom));
        // The plan bounds the decode buffer (sw x sh) as well as the resize's.
        resize_plan(sw, sh, self.cfg.resize, self.cfg.max_pixels)?;
        let mut buf = vec![0u8; sw as usize * sh as usize * channels];
        let out = turbojpeg::Image {
            pixels: buf.as_mut_slice(),
            width: sw as usize,
            pitch: sw as usize * channels,
            height: sh as usize,
            format,
        };
        dec.decompress(bytes, out).map_err(|e| ImageError::Decode(e.to_string()))?;
        let rgb = if cmyk { adobe_cmyk_to_rgb(&buf) } else { buf };
        image::RgbImage::from_raw(sw, sh, rgb).ok_or_else(|| ImageError::Decode("decoded size mismatch".into()))
    }

    /// Resizes as torchvision's `Resize` does and returns its centre crop; only the crop is computed.
    pub fn resize_and_crop(&mut self, rgb: image::RgbImage) -> Result<Vec<u8>, ImageError> {
        let (w, h) = rgb.dimensions();
        let (nw, nh) = resize_plan(w, h, self.cfg.resize, self.cfg.max_pixels)?;
        let c = self.cfg.crop;
        let window = Window { x: center_offset(nw, c), y: center_offset(nh, c), width: c, height: c };
        Ok(resize_window(rgb.as_raw(), w, h, nw, nh, window, self.isa))
    }

    /// Decodes `bytes` to RGB as PIL's `Image.open(..).convert("RGB")` does (and applies EXIF orientation).
    pub fn decode(&mut self, bytes: &[u8]) -> Result<image::RgbImage, ImageError> {
        self.decode_rgb(bytes)
    }
}

/// PIL's `convert("RGB")` of the image as PIL opens it: grayscale replicated, palette expanded,
/// alpha dropped; 16-bit channels keep their high byte (PIL's `;16B` raw modes). One deliberate
/// difference: PIL opens 16-bit grayscale as 32-bit "I" and clips it at 255 on the way to RGB, which
/// turns a machine-vision camera's 16-bit image almost white; labeld keeps its high byte too.
fn to_rgb_like_pil(img: image::DynamicImage) -> image::RgbImage {
    use image::DynamicImage::*;
    let (w, h) = (img.width(), img.height());
    let high = |v: u16| (v >> 8) as u8;
    let rgb: Vec<u8> = match &img {
        ImageRgb16(p) => p.as_raw().iter().map(|&v| high(v)).collect(),
        ImageRgba16(p) => p.as_raw().chunks_exact(4).flat_map(|px| [high(px[0]), high(px[1]), high(px[2])]).collect(),
        ImageLumaA16(p) => p.as_raw().chunks_exact(2).flat_map(|px| [high(px[0]); 3]).collect(),
        ImageLuma16(p) => p.as_raw().iter().flat_map(|&v| [high(v); 3]).collect(),
        _ => return img.into_rgb8(),
    };
    image::RgbImage::from_raw(w, h, rgb).unwrap_or_else(|| img.into_rgb8())
}

/// PIL's CMYK JPEG path: the samples read with Adobe's inverted polarity ("CMYK;I"), then
/// `cmyk2rgb` from libImaging/Convert.c, in its integer arithmetic.
fn adobe_cmyk_to_rgb(cmyk: &[u8]) -> Vec<u8> {
    let muldiv255 = |a: i32, b: i32| {
        let t = a * b + 128;
        ((t >> 8) + t) >> 8
    };
    cmyk.chunks_exact(4)
        .flat_map(|px| {
            let [c, m, y, k] = [0, 1, 2, 3].map(|i| 255 - i32::from(px[i]));
            let nk = 255 - k;
            [c, m, y].map(|v| (nk - muldiv255(v, nk)).clamp(0, 255) as u8)
        })
        .collect()
}

/// Reads an image file beneath its inbox `root` without following a symbolic link at any component
/// and without blocking on a FIFO or device; returns its bytes and the identity of the version read.
/// A verdict on the file (not there, not a regular file, empty, too big) is an `ImageError` for its
/// record; a passing fault (permissions, I/O, descriptors, still being written) is `ImageError::Fault`,
/// which is retried and never recorded.
pub fn read_image_file(root: &Path, path: &Path, max_bytes: u64) -> Result<(Vec<u8>, Identity), ImageError> {
    use crate::beneath::{Beneath, ReadError, is_link_refusal};
    let at = Beneath::new(root, path).map_err(|e| ImageError::Read(e.to_string()))?;
    match at.read(max_bytes) {
        Ok((bytes, _)) if bytes.is_empty() => Err(ImageError::Empty),
        Ok(read) => Ok(read),
        Err(ReadError::Open(e)) if e.kind() == std::io::ErrorKind::NotFound => Err(ImageError::Vanished),
        Err(ReadError::Open(e)) if is_link_refusal(&e) => Err(ImageError::NotRegular("symbolic link (not followed)")),
        Err(ReadError::Open(e) | ReadError::Io(e)) => Err(fault_or_verdict(e)),
        Err(ReadError::NotRegular(kind)) => Err(ImageError::NotRegular(kind)),
        Err(ReadError::TooBig(len)) => {
            Err(ImageError::Read(format!("file is {len} bytes, over the limit of {max_bytes} ([limits] max_file_mb)")))
        }
        Err(ReadError::Changing) => Err(ImageError::Fault("the file changed while it was read (still being written)".into())),
    }
}

/// I/O errors that say something about the moment, not the image, are faults to retry.
fn fault_or_verdict(e: std::io::Error) -> ImageError {
    match e.raw_os_error() {
        Some(libc::EACCES | libc::EPERM | libc::EIO | libc::EMFILE | libc::ENFILE | libc::ENOMEM | libc::EAGAIN | libc::EINTR | libc::ESTALE | libc::ETIMEDOUT) => {
            ImageError::Fault(e.to_string())
        }
        _ => ImageError::Read(e.to_string()),
    }
}

/// The EXIF orientation of a JPEG (APP1 "Exif" segment), if it has one.
pub fn jpeg_orientation(jpeg: &[u8]) -> Option<Orientation> {
    let mut i = 2;
    while i + 4 <= jpeg.len() {
        if jpeg[i] != 0xFF {
            return None;
        }
        let marker = jpeg[i + 1];
        if marker == 0xD8 || (0xD0..=0xD7).contains(&marker) || marker == 0x01 || marker == 0xFF {
            i += if marker == 0xFF { 1 } else { 2 };
            continue;
        }
        if marker == 0xDA || marker == 0xD9 {
            return None; // image data starts: no EXIF before it
        }
        let len = u16::from_be_bytes([jpeg[i + 2], jpeg[i + 3]]) as usize;
        let seg = jpeg.get(i + 4..i + 2 + len)?;
        if marker == 0xE1 && seg.starts_with(b"Exif\0\0") {
            return Orientation::from_exif_chunk(&seg[6..]);
        }
        i += 2 + len;
    }
    None
}

/// The largest of 1, 2, 4, 8 by which a `w`x`h` JPEG can be scaled down while its shorter side stays
/// at least `min_side`.
pub fn scale_denominator(w: u32, h: u32, min_side: u32) -> u32 {
    [8, 4, 2].into_iter().find(|d| w.min(h).div_ceil(*d) >= min_side).unwrap_or(1)
}

/// torchvision's `Resize(int)`: the shorter side becomes `size`, the longer side scales and truncates.
/// Only for sizes `resize_plan` accepted (the longer side of an extreme aspect ratio overflows u32).
pub fn resized_size(w: u32, h: u32, size: u32) -> (u32, u32) {
    let (nw, nh) = resized_size_u64(w, h, size);
    (nw as u32, nh as u32)
}

fn resized_size_u64(w: u32, h: u32, size: u32) -> (u64, u64) {
    let (short, long) = if w <= h { (w, h) } else { (h, w) };
    let new_long = ((u64::from(size) * u64::from(long)) / u64::from(short).max(1)).max(1);
    if w <= h { (u64::from(size), new_long) } else { (new_long, u64::from(size)) }
}

/// The resize target of a `w`x`h` image, checked before anything is allocated for it: the source,
/// the target and the resize's intermediate image (at most target width x source height) each fit in `max(w, nw) x max(h, nh)` pixels, which must not exceed `max_pixels`, or
/// `4 x resize²` if that is more (a small image scaled up is never refused, however low the limit).
pub fn resize_plan(w: u32, h: u32, resize: u32, max_pixels: u64) -> Result<(u32, u32), ImageError> {
    let limit = max_pixels.max(4 * u64::from(resize) * u64::from(resize));
    let (nw, nh) = resized_size_u64(w, h, resize);
    let pixels = nw.max(u64::from(w)).saturating_mul(nh.max(u64::from(h)));
    if pixels > limit {
        return Err(ImageError::ResizeTooLarge {
            width: w,
            height: h,
            resize,
            to_width: nw,
            to_height: nh,
            pixels,
            limit,
        });
    }
    // Both fit in u32: each is at most `pixels`, and a side over u32::MAX would need more than a
    // limit anyone sets; refuse rather than wrap if one does.
    match (u32::try_from(nw), u32::try_from(nh)) {
        (Ok(nw), Ok(nh)) => Ok((nw, nh)),
        _ => Err(ImageError::ResizeTooLarge { width: w, height: h, resize, to_width: nw, to_height: nh, pixels, limit }),
    }
}

/// torchvision's `CenterCrop` offset: `int(round((len - crop) / 2))`, with Python's round-half-to-even.
pub fn center_offset(len: u32, crop: u32) -> u32 {
    let d = len - crop;
    let k = d / 2;
    if d % 2 == 1 && k % 2 == 1 { k + 1 } else { k }
}

/// HWC u8 → HWC f32 as `ToTensor` + `Normalize` compute it in float32: `(v / 255 - mean) / std`,
/// each step rounded (a reciprocal multiply or a fused step would differ in the last bit). A value
/// depends only on its byte and channel, so a 3 x 256 table holds them all. The model sees the
/// result as NCHW in channels-last memory order (a permuted view), which oneDNN runs faster.
pub fn normalize_into(hwc: &[u8], crop: u32, mean: &[f32; 3], std: &[f32; 3], out: &mut Vec<f32>) {
    debug_assert_eq!(hwc.len(), (crop * crop * 3) as usize);
    let table: [[f32; 256]; 3] = std::array::from_fn(|c| std::array::from_fn(|v| (v as f32 / 255.0 - mean[c]) / std[c]));
    out.reserve(hwc.len());
    for px in hwc.chunks_exact(3) {
        for c in 0..3 {
            out.push(table[c][usize::from(px[c])]);
        }
    }
}

/// The crop the model saw, box-averaged down to at most 112 px a side, as a JPEG.
fn thumbnail_jpeg(hwc: &[u8], crop: u32) -> Option<Vec<u8>> {
    let step = crop.div_ceil(112).max(1) as usize;
    let crop = crop as usize;
    let side = crop / step;
    let mut px = Vec::with_capacity(side * side * 3);
    for ty in 0..side {
        for tx in 0..side {
            let mut sum = [0u32; 3];
            for y in ty * step..(ty + 1) * step {
                for x in tx * step..(tx + 1) * step {
                    let i = (y * crop + x) * 3;
                    for c in 0..3 {
                        sum[c] += u32::from(hwc[i + c]);
                    }
                }
            }
            px.extend(sum.map(|v| (v / (step * step) as u32) as u8));
        }
    }
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 80)
        .encode(&px, side as u32, side as u32, image::ExtendedColorType::Rgb8)
        .ok()?;
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resize_matches_torchvision_rounding() {
        assert_eq!(resized_size(451, 300, 256), (384, 256)); // 256*451/300 = 384.85 -> 384
        assert_eq!(resized_size(427, 640, 256), (256, 383)); // portrait
        assert_eq!(resized_size(512, 512, 256), (256, 256));
        assert_eq!(resized_size(1920, 1080, 256), (455, 256));
    }

    #[test]
    fn extreme_aspect_ratios_are_refused_before_the_resize_allocates() {
        let limit = 100_000_000;
        for (w, h) in [(3, 60_000), (1, 1_000_000), (1, 16_777_216), (16_777_216, 1)] {
            match resize_plan(w, h, 256, limit) {
                Err(ImageError::ResizeTooLarge { pixels, limit: l, .. }) => assert!(pixels > l, "{w}x{h}"),
                other => panic!("{w}x{h}: {other:?}"),
            }
        }
        // 1x16777216 at 256 is 256x2^32: the target's long side alone overflows u32.
        let e = resize_plan(1, 16_777_216, 256, limit).unwrap_err().to_string();
        assert!(e.contains("256x4294967296") && e.contains("[limits] max_pixels"), "{e}");
        // Ordinary images, large and small, keep torchvision's size.
        assert_eq!(resize_plan(10_000, 10_000, 256, limit), Ok((256, 256)));
        assert_eq!(resize_plan(1920, 1080, 256, limit), Ok(resized_size(1920, 1080, 256)));
        assert_eq!(resize_plan(40, 30, 256, limit), Ok((341, 256)));
        assert_eq!(resize_plan(256, 1000, 256, limit), Ok((256, 1000)));
        // A low limit still lets a small image be scaled up to the model's size.
        assert_eq!(resize_plan(100, 100, 256, 10_000), Ok((256, 256)));
        assert_eq!(resize_plan(100, 50, 256, 10_000), Ok((512, 256)));
        assert!(resize_plan(100, 10, 256, 10_000).is_err());
    }

    #[test]
    fn scaled_decode_keeps_the_shorter_side_at_least_the_resize_target() {
        assert_eq!(scale_denominator(1920, 1080, 256), 4); // 480x270
        assert_eq!(scale_denominator(4000, 3000, 256), 8); // 500x375
        assert_eq!(scale_denominator(640, 427, 256), 1); // 214 < 256 at 1/2
        assert_eq!(scale_denominator(512, 512, 256), 2);
        assert_eq!(scale_denominator(300, 200, 256), 1);
    }

    #[test]
    fn thumbnail_is_a_small_jpeg_of_the_crop() {
        let crop: Vec<u8> = (0..224 * 224).flat_map(|_| [200u8, 30, 30]).collect();
        let jpeg = thumbnail_jpeg(&crop, 224).unwrap();
        let img = image::load_from_memory(&jpeg).unwrap().into_rgb8();
        assert_eq!(img.dimensions(), (112, 112));
        let p = img.get_pixel(56, 56);
        assert!(p[0] > 180 && p[1] < 60, "{p:?}");
    }

    #[test]
    fn center_crop_rounds_half_to_even_like_python() {
        assert_eq!(center_offset(256, 224), 16);
        assert_eq!(center_offset(257, 224), 16); // round(16.5) == 16
        assert_eq!(center_offset(259, 224), 18); // round(17.5) == 18
        assert_eq!(center_offset(384, 224), 80);
        assert_eq!(center_offset(224, 224), 0);
    }
}
