//! Resize and crop a decoded image to the model's input, exactly as timm's eval transform.
//!
//! timm (`timm.data.transforms_imagenet_eval`) on a PIL image does, for `input_size` (H, W):
//! `scale = floor(size / crop_pct)` per side; then in `center` mode `Resize(scale)` (the
//! shorter side to `scale`, the longer to `int(scale * long / short)`) and in `squash` mode
//! `Resize((scale_h, scale_w))`; then `CenterCrop((H, W))` with offsets rounded half-to-even
//! (Python's `round`), padding with zeros if the crop is larger than the image. Normalisation
//! (`/255`, `-mean`, `/std`) happens on the model's device, see `backend`.

use super::decode::DecodeOptions;
use super::resize::{resize_window, Filter, RgbImage};
use serde::{Deserialize, Serialize};
use std::ops::Range;

/// How the image is fitted to the input size before the center crop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum CropMode {
    /// Keep the aspect ratio: the shorter side goes to `size / crop_pct`.
    Center,
    /// Ignore the aspect ratio: both sides go to `size / crop_pct`.
    Squash,
}

/// The preprocessing a checkpoint was evaluated with (timm `pretrained_cfg` field names).
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct PreprocessConfig {
    /// Model input height and width.
    #[schema(value_type = Vec<usize>, min_items = 2, max_items = 2)]
    pub input_size: (usize, usize),
    pub interpolation: Filter,
    pub crop_pct: f64,
    pub crop_mode: CropMode,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    /// Decode large JPEGs at 1/2, 1/4 or 1/8 of their size, no smaller than the resize step
    /// needs (`--jpeg-draft`, the `jpeg_draft` model option): Pillow's `Image.draft("RGB",
    /// (scale_w, scale_h))` before timm's transform. Off: decoded whole, as timm does.
    pub jpeg_draft: bool,
}

impl PreprocessConfig {
    /// Bytes of one preprocessed image (HWC u8).
    pub fn image_bytes(&self) -> usize {
        self.input_size.0 * self.input_size.1 * 3
    }

    /// How to decode images for this model: `base` (the server's limits), with the draft size
    /// when `jpeg_draft` is on.
    pub fn decode_options(&self, base: DecodeOptions) -> DecodeOptions {
        DecodeOptions {
            draft: self.jpeg_draft.then(|| self.scale_size()),
            ..base
        }
    }

    /// timm's `scale_size`, `math.floor(size / crop_pct)` per side (f64 division, as Python
    /// does), as (width, height): what the resize step fits the image to.
    fn scale_size(&self) -> (usize, usize) {
        let (target_h, target_w) = self.input_size;
        let scale = |size: usize| (size as f64 / self.crop_pct).floor() as usize;
        (scale(target_w), scale(target_h))
    }

    /// The size the image is resized to before cropping, as (width, height).
    fn resized_size(&self, width: usize, height: usize) -> (usize, usize) {
        let (scale_w, scale_h) = self.scale_size();
        match self.crop_mode {
            CropMode::Squash => (scale_w, scale_h),
            CropMode::Center if scale_h == scale_w => shorter_side_to(width, height, scale_h),
            CropMode::Center => keep_ratio_to(width, height, scale_w, scale_h),
        }
    }
}

/// torchvision `Resize(int)`: the shorter side becomes `size`, the longer side
/// `int(size * long / short)` (truncated).
fn shorter_side_to(width: usize, height: usize, size: usize) -> (usize, usize) {
    let (short, long) = if width <= height {
        (width, height)
    } else {
        (height, width)
    };
    // The integer product is exact and one f64 division rounds once, as in Python.
    let new_long = ((size * long) as f64 / short as f64) as usize;
    if width <= height {
        (size, new_long)
    } else {
        (new_long, size)
    }
}

/// timm `ResizeKeepRatio(size, longest=0)`, used by `center` mode for non-square inputs:
/// scale by the smaller of the two side ratios, rounding half-to-even.
fn keep_ratio_to(width: usize, height: usize, target_w: usize, target_h: usize) -> (usize, usize) {
    let ratio = (height as f64 / target_h as f64).min(width as f64 / target_w as f64);
    let w = (width as f64 / ratio).round_ties_even() as usize;
    let h = (height as f64 / ratio).round_ties_even() as usize;
    (w.max(1), h.max(1))
}

/// Resize and center-crop `image` into the model's input size (HWC u8). Only the part of the
/// resized image inside the crop is computed (see `resize_window`).
pub fn preprocess(image: &RgbImage, cfg: &PreprocessConfig) -> RgbImage {
    let (width, height) = cfg.resized_size(image.width, image.height);
    let (width, height) = (width.max(1), height.max(1));
    let (crop_h, crop_w) = cfg.input_size;
    crop_window(width, height, crop_w, crop_h, |columns, rows| {
        resize_window(image, width, height, columns, rows, cfg.interpolation)
    })
}

/// Center-crop a `width` x `height` image that `window(columns, rows)` produces piecewise.
fn crop_window(
    width: usize,
    height: usize,
    crop_w: usize,
    crop_h: usize,
    window: impl FnOnce(Range<usize>, Range<usize>) -> RgbImage,
) -> RgbImage {
    let left = crop_offset(width, crop_w);
    let top = crop_offset(height, crop_h);
    let columns = visible(left, crop_w, width);
    let rows = visible(top, crop_h, height);
    let (dst_x, dst_y) = (
        (columns.start as i64 - left) as usize,
        (rows.start as i64 - top) as usize,
    );
    let inside = window(columns, rows);
    if inside.width == crop_w && inside.height == crop_h {
        return inside;
    }
    let mut out = vec![0u8; crop_w * crop_h * 3];
    let row_bytes = inside.width * 3;
    for (i, src) in inside.pixels.chunks_exact(row_bytes.max(1)).enumerate() {
        let dst = ((dst_y + i) * crop_w + dst_x) * 3;
        out[dst..dst + row_bytes].copy_from_slice(src);
    }
    RgbImage::new(crop_w, crop_h, out)
}

/// The part of `[offset, offset + len)` inside `[0, size)`.
fn visible(offset: i64, len: usize, size: usize) -> Range<usize> {
    let end = (offset + len as i64).clamp(0, size as i64) as usize;
    let start = (offset.max(0) as usize).min(end);
    start..end
}

/// Where the crop starts in image coordinates (negative when the crop is padded).
fn crop_offset(size: usize, crop: usize) -> i64 {
    if crop > size {
        // torchvision pads (crop - size) // 2 on the left/top, then crops at offset 0.
        -(((crop - size) / 2) as i64)
    } else {
        ((size - crop) as f64 / 2.0).round_ties_even() as i64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// torchvision `center_crop`: offsets `int(round((size - crop) / 2))` with Python's
    /// half-to-even rounding; a crop larger than the image is zero-padded, with the odd pixel of
    /// padding on the right/bottom.
    fn center_crop(image: &RgbImage, crop_w: usize, crop_h: usize) -> RgbImage {
        // A "resize" to the image's own size is a plain copy of the window.
        crop_window(
            image.width,
            image.height,
            crop_w,
            crop_h,
            |columns, rows| {
                resize_window(
                    image,
                    image.width,
                    image.height,
                    columns,
                    rows,
                    Filter::Bilinear,
                )
            },
        )
    }

    fn cfg(size: usize, crop_pct: f64, crop_mode: CropMode) -> PreprocessConfig {
        PreprocessConfig {
            input_size: (size, size),
            interpolation: Filter::Bicubic,
            crop_pct,
            crop_mode,
            mean: [0.5; 3],
            std: [0.5; 3],
            jpeg_draft: false,
        }
    }

    #[test]
    fn center_mode_scales_the_shorter_side() {
        // floor(224 / 0.875) = 256; 451x300 -> 256 on the short side, int(256*451/300) = 384.
        let c = cfg(224, 0.875, CropMode::Center);
        assert_eq!(c.resized_size(451, 300), (384, 256));
        assert_eq!(c.resized_size(300, 451), (256, 384));
        // floor(224 / 0.95) = 235 (coatnet_0_rw_224)
        assert_eq!(
            cfg(224, 0.95, CropMode::Center).resized_size(500, 500),
            (235, 235)
        );
    }

    #[test]
    fn squash_mode_ignores_aspect() {
        let c = cfg(384, 1.0, CropMode::Squash);
        assert_eq!(c.resized_size(640, 427), (384, 384));
    }

    #[test]
    fn crop_offsets_round_half_to_even() {
        // (257 - 224) / 2 = 16.5 -> 16; (259 - 224) / 2 = 17.5 -> 18
        assert_eq!(crop_offset(257, 224), 16);
        assert_eq!(crop_offset(259, 224), 18);
        assert_eq!(crop_offset(224, 224), 0);
        assert_eq!(crop_offset(221, 224), -1);
    }

    #[test]
    fn crop_takes_the_center_and_pads_with_zeros() {
        let pixels: Vec<u8> = (0..4 * 3 * 3).map(|i| i as u8 + 1).collect();
        let img = RgbImage::new(4, 3, pixels);
        let out = center_crop(&img, 2, 1);
        // row 1, columns 1..3
        assert_eq!(out.pixels, vec![16, 17, 18, 19, 20, 21]);
        let padded = center_crop(&img, 6, 3);
        assert_eq!(&padded.pixels[..3], &[0, 0, 0]);
        assert_eq!(&padded.pixels[3..6], &[1, 2, 3]);
        assert_eq!(&padded.pixels[15..18], &[0, 0, 0]);
    }

    #[test]
    fn draft_asks_for_what_the_resize_step_needs() {
        let base = DecodeOptions {
            max_pixels: 1000,
            exif_transpose: true,
            draft: None,
        };
        let mut c = cfg(224, 0.875, CropMode::Center);
        assert_eq!(c.decode_options(base).draft, None);
        c.jpeg_draft = true;
        let opts = c.decode_options(base);
        assert_eq!(opts.draft, Some((256, 256)));
        assert_eq!((opts.max_pixels, opts.exif_transpose), (1000, true));
        c.input_size = (192, 320);
        assert_eq!(c.decode_options(base).draft, Some((365, 219)));
    }

    #[test]
    fn preprocess_produces_the_input_size() {
        let img = RgbImage::new(64, 48, vec![7; 64 * 48 * 3]);
        let out = preprocess(&img, &cfg(32, 0.875, CropMode::Center));
        assert_eq!((out.width, out.height), (32, 32));
        assert!(out.pixels.iter().all(|&p| p == 7));
    }
}
