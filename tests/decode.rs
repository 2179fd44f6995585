//! The decode + preprocess path on awkward but valid images: EXIF rotation, CMYK, 16-bit, grayscale,
//! and on files that are not what they claim.

use std::path::Path;

use labeld::config::Preprocess;
use labeld::error::ImageError;
use labeld::infer::preprocess::{Preprocessor, jpeg_orientation, read_image_file};

fn cfg() -> Preprocess {
    Preprocess { resize: 64, crop: 56, scaled_decode: true, ..Preprocess::default() }
}

fn tensor(bytes: &[u8]) -> Vec<f32> {
    let mut out = Vec::new();
    Preprocessor::new(cfg()).process(bytes, &mut out).unwrap();
    out
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// A 96x48 test card: red left third, green middle, blue right; white top rows.
fn card() -> image::RgbImage {
    image::RgbImage::from_fn(96, 48, |x, y| {
        if y < 8 {
            image::Rgb([255, 255, 255])
        } else {
            [image::Rgb([220, 30, 30]), image::Rgb([30, 220, 30]), image::Rgb([30, 30, 220])][(x / 32) as usize]
        }
    })
}

fn jpeg(img: &image::RgbImage) -> Vec<u8> {
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 95).encode_image(img).unwrap();
    out
}

/// Inserts an EXIF APP1 segment carrying `orientation` right after the JPEG's SOI marker.
fn with_exif_orientation(jpeg: &[u8], orientation: u16) -> Vec<u8> {
    let mut tiff = b"MM\0\x2A\0\0\0\x08".to_vec(); // big-endian TIFF header, IFD0 at offset 8
    tiff.extend(1u16.to_be_bytes()); // one entry
    tiff.extend(0x0112u16.to_be_bytes()); // Orientation
    tiff.extend(3u16.to_be_bytes()); // SHORT
    tiff.extend(1u32.to_be_bytes());
    tiff.extend(orientation.to_be_bytes());
    tiff.extend([0, 0]);
    tiff.extend(0u32.to_be_bytes()); // no next IFD
    let mut seg = b"Exif\0\0".to_vec();
    seg.extend(tiff);
    let mut out = jpeg[..2].to_vec();
    out.extend([0xFF, 0xE1]);
    out.extend(((seg.len() + 2) as u16).to_be_bytes());
    out.extend(seg);
    out.extend(&jpeg[2..]);
    out
}

#[test]
fn exif_rotated_jpegs_are_turned_upright() {
    let card = card();
    let plain = jpeg(&card);
    // Orientation 6: the stored pixels must be turned 90° clockwise to display upright.
    let stored = image::imageops::rotate270(&card);
    let tagged = with_exif_orientation(&jpeg(&stored), 6);
    assert_eq!(jpeg_orientation(&tagged), Some(image::metadata::Orientation::Rotate90));
    let upright = tensor(&plain);
    let from_tagged = tensor(&tagged);
    assert!(max_diff(&upright, &from_tagged) < 0.1, "rotated JPEG differs from the upright one");
    // Without applying the tag the result would be clearly different.
    let ignored = tensor(&jpeg(&stored));
    assert!(max_diff(&upright, &ignored) > 1.0);
    // Orientation 3 (180°).
    let tagged = with_exif_orientation(&jpeg(&image::imageops::rotate180(&card)), 3);
    assert!(max_diff(&upright, &tensor(&tagged)) < 0.1);
}

#[test]
fn a_cmyk_jpeg_decodes_to_the_same_picture() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    let cmyk = std::fs::read(root.join("coffee_cmyk.jpg")).unwrap();
    let rgb = image::open(root.join("coffee.jpg")).unwrap().resize_exact(300, 200, image::imageops::FilterType::Triangle).into_rgb8();
    let mut png = Vec::new();
    rgb.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
    let (a, b) = (tensor(&cmyk), tensor(&png));
    let mean_diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).sum::<f32>() / a.len() as f32;
    assert!(mean_diff < 0.15, "CMYK JPEG decodes to a different picture (mean |diff| {mean_diff})");
}

#[test]
fn sixteen_bit_and_grayscale_pngs_decode_to_their_high_byte() {
    let card = card();
    let png = |img: image::DynamicImage| {
        let mut v = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut v), image::ImageFormat::Png).unwrap();
        v
    };
    let eight = tensor(&png(image::DynamicImage::ImageRgb8(card.clone())));
    let sixteen = image::ImageBuffer::<image::Rgb<u16>, _>::from_fn(96, 48, |x, y| {
        let p = card.get_pixel(x, y);
        image::Rgb([p[0] as u16 * 257, p[1] as u16 * 257, p[2] as u16 * 257])
    });
    assert_eq!(max_diff(&eight, &tensor(&png(image::DynamicImage::ImageRgb16(sixteen)))), 0.0);

    let gray = image::GrayImage::from_fn(96, 48, |x, _| image::Luma([(x * 2) as u8]));
    let as_rgb = image::DynamicImage::ImageLuma8(gray.clone()).into_rgb8();
    let g16 = image::ImageBuffer::<image::Luma<u16>, _>::from_fn(96, 48, |x, y| image::Luma([gray.get_pixel(x, y)[0] as u16 * 257]));
    let want = tensor(&png(image::DynamicImage::ImageRgb8(as_rgb)));
    assert_eq!(max_diff(&want, &tensor(&png(image::DynamicImage::ImageLuma8(gray)))), 0.0);
    // 16-bit grayscale keeps its high byte, like 16-bit colour (PIL would clip it at 255: almost white).
    assert_eq!(max_diff(&want, &tensor(&png(image::DynamicImage::ImageLuma16(g16)))), 0.0);
}

#[test]
fn files_that_vanish_or_are_not_regular_are_told_apart() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let read = |p: &std::path::Path, max| read_image_file(root, p, max).map(|(b, _)| b);
    assert_eq!(read(&root.join("gone.jpg"), 1 << 20), Err(ImageError::Vanished));
    std::fs::create_dir(root.join("d.jpg")).unwrap();
    assert_eq!(read(&root.join("d.jpg"), 1 << 20), Err(ImageError::NotRegular("directory")));
    let target = root.join("t.jpg");
    std::fs::write(&target, b"x").unwrap();
    std::os::unix::fs::symlink(&target, root.join("l.jpg")).unwrap();
    assert_eq!(read(&root.join("l.jpg"), 1 << 20), Err(ImageError::NotRegular("symbolic link (not followed)")));
    // A folder that is a link: the file behind it is not read.
    std::os::unix::fs::symlink(root, root.join("linked")).unwrap();
    assert_eq!(read(&root.join("linked/t.jpg"), 1 << 20), Err(ImageError::NotRegular("symbolic link (not followed)")));
    let fifo = root.join("f.jpg");
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    assert_eq!(read(&fifo, 1 << 20), Err(ImageError::NotRegular("FIFO")));
    std::fs::write(&target, vec![1u8; 2000]).unwrap();
    assert!(matches!(read(&target, 1000), Err(ImageError::Read(m)) if m.contains("max_file_mb")));
    let (bytes, id) = read_image_file(root, &target, 1 << 20).unwrap();
    assert_eq!((bytes.len(), id.size), (2000, 2000));
}

#[test]
fn hostile_headers_are_refused_before_decoding() {
    let mut pre = Preprocessor::new(Preprocess { max_pixels: 10_000, ..cfg() });
    let mut out = Vec::new();
    let big = jpeg(&image::RgbImage::new(200, 100));
    assert!(matches!(pre.process(&big, &mut out), Err(ImageError::TooLarge { width: 200, height: 100, .. })));
    // A JPEG whose SOF claims 65000x65000.
    let mut liar = jpeg(&image::RgbImage::new(8, 8));
    let sof = liar.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
    liar[sof + 5..sof + 9].copy_from_slice(&[0xFD, 0xE8, 0xFD, 0xE8]);
    let mut pre = Preprocessor::new(cfg());
    assert!(matches!(pre.process(&liar, &mut out), Err(ImageError::TooLarge { .. })));
    assert!(out.is_empty());
}
