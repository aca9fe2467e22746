//! Thumbnails: scale a screen (PNG from a hypervisor, or raw pixels from
//! the appliance's own RFB connection) to fit a bounding box and encode it
//! as PNG, with the `image` crate.
//!
//! What it does not do: fetch screens (the backends do) or cache them (the
//! control plane's cache does). It depends on nothing else in the crate but
//! the model.

use image::imageops::FilterType;
use image::{DynamicImage, ImageFormat, RgbaImage};

use super::model::{HvResult, HypervisorError, Thumbnail, ThumbnailSize};

/// Largest source screen accepted, in pixels per side: a hostile or broken
/// server cannot make the appliance decode (and hold) more than
/// 8192 × 8192 × 4 bytes = 256 MiB... which is still too much, so the byte
/// bound below is what really limits it.
pub const MAX_SOURCE_SIDE_PIXELS: u32 = 8192;
/// Largest decoded source image, in bytes (RGBA): 64 MiB, a 4K screen
/// (3840 × 2160 × 4 = 33 MB) with room to spare.
pub const MAX_SOURCE_BYTES: u64 = 64 * 1024 * 1024;

/// The largest size with the source's aspect ratio that fits `size`;
/// never larger than the source, never 0.
pub fn fit(width: u32, height: u32, size: ThumbnailSize) -> (u32, u32) {
    let (w, h) = (u64::from(width.max(1)), u64::from(height.max(1)));
    let (mw, mh) = (
        u64::from(size.max_width.max(1)),
        u64::from(size.max_height.max(1)),
    );
    if w <= mw && h <= mh {
        return (w as u32, h as u32);
    }
    // Scale by the tighter of the two ratios, in integers.
    let (nw, nh) = if w * mh >= h * mw {
        (mw, (h * mw / w).max(1))
    } else {
        ((w * mh / h).max(1), mh)
    };
    (nw as u32, nh as u32)
}

/// A thumbnail from a PNG screenshot (vSphere `/screen`, QEMU
/// `screendump`).
pub fn from_png(png: &[u8], size: ThumbnailSize) -> HvResult<Thumbnail> {
    let mut reader = image::ImageReader::with_format(std::io::Cursor::new(png), ImageFormat::Png);
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_SOURCE_SIDE_PIXELS);
    limits.max_image_height = Some(MAX_SOURCE_SIDE_PIXELS);
    limits.max_alloc = Some(MAX_SOURCE_BYTES);
    reader.limits(limits);
    let img = reader
        .decode()
        .map_err(|e| HypervisorError::Protocol(format!("screenshot is not a usable PNG: {e}")))?;
    encode(img, size)
}

/// A thumbnail from raw RGBA pixels (`width × height × 4` bytes).
pub fn from_rgba(
    width: u32,
    height: u32,
    rgba: Vec<u8>,
    size: ThumbnailSize,
) -> HvResult<Thumbnail> {
    let img = RgbaImage::from_raw(width, height, rgba).ok_or_else(|| {
        HypervisorError::Protocol(format!("{width}x{height} pixels do not match the buffer"))
    })?;
    encode(DynamicImage::ImageRgba8(img), size)
}

fn encode(img: DynamicImage, size: ThumbnailSize) -> HvResult<Thumbnail> {
    let (w, h) = fit(img.width(), img.height(), size);
    let img = if (w, h) == (img.width(), img.height()) {
        img
    } else {
        // Triangle (bilinear) is the cheap filter that still keeps text
        // legible at thumbnail sizes.
        img.resize_exact(w, h, FilterType::Triangle)
    };
    // RGB: a screen has no alpha, and dropping it makes the PNG smaller.
    let img = DynamicImage::ImageRgb8(img.to_rgb8());
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), ImageFormat::Png)
        .map_err(|e| HypervisorError::Protocol(format!("PNG encoding failed: {e}")))?;
    Ok(Thumbnail {
        png,
        width: w,
        height: h,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn size(w: u32, h: u32) -> ThumbnailSize {
        ThumbnailSize {
            max_width: w,
            max_height: h,
        }
    }

    #[test]
    fn fit_keeps_the_aspect_ratio_and_never_scales_up() {
        assert_eq!(fit(720, 400, size(320, 240)), (320, 177));
        assert_eq!(fit(1024, 768, size(320, 240)), (320, 240));
        assert_eq!(fit(400, 1000, size(320, 240)), (96, 240));
        assert_eq!(fit(100, 50, size(320, 240)), (100, 50));
        assert_eq!(fit(10_000, 1, size(320, 240)), (320, 1));
        assert_eq!(fit(0, 0, size(0, 0)), (1, 1));
    }

    #[test]
    fn rgba_pixels_become_a_scaled_png_with_the_same_colours() {
        let (w, h) = (64u32, 32u32);
        let mut px = Vec::with_capacity((w * h * 4) as usize);
        for _ in 0..w * h {
            px.extend_from_slice(&[200, 10, 30, 255]);
        }
        let t = from_rgba(w, h, px, size(16, 16)).unwrap();
        assert_eq!((t.width, t.height), (16, 8));
        let back = image::load_from_memory_with_format(&t.png, ImageFormat::Png)
            .unwrap()
            .to_rgb8();
        assert_eq!(back.dimensions(), (16, 8));
        assert!(back.pixels().all(|p| p.0 == [200, 10, 30]));
        // And the PNG round-trips through from_png unchanged in size.
        let again = from_png(&t.png, size(320, 240)).unwrap();
        assert_eq!((again.width, again.height), (16, 8));
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        assert!(from_png(b"not a png", size(10, 10)).is_err());
        assert!(from_png(&[], size(10, 10)).is_err());
        assert!(from_rgba(10, 10, vec![0; 3], size(10, 10)).is_err());
    }
}
