//! Antialiased resampling of 8-bit RGB images, bit-exact with Pillow's `Image.resize`.
//!
//! timm's eval transform resizes PIL images, so matching timm to the last pixel means matching
//! Pillow's `ImagingResample` (src/libImaging/Resample.c): a separable filter whose support
//! grows with the downscale ratio, coefficients normalised in f64 and then quantised to 22
//! fractional bits, a horizontal pass over only the rows the vertical pass reads, rounding and
//! clamping to u8 between the passes, then the vertical pass. This is a re-implementation of
//! that algorithm (Pillow is under the MIT-CMU / HPND licence; the algorithm is credited to
//! Alex Clark and contributors, and to Uploadcare's Pillow-SIMD work on it).
//!
//! Faster resizers (`fast_image_resize`, libtorch's uint8 AA kernels) differ from Pillow by one
//! to four levels on 10-20 % of the values because they quantise coefficients differently.

/// The resampling filters timm's checkpoints use (`pretrained_cfg.interpolation`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Filter {
    Bilinear,
    Bicubic,
}

impl Filter {
    fn support(self) -> f64 {
        match self {
            Filter::Bilinear => 1.0,
            Filter::Bicubic => 2.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        let x = x.abs();
        match self {
            Filter::Bilinear => {
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            Filter::Bicubic => {
                // Keys' cubic convolution with a = -0.5, written exactly as Pillow evaluates it.
                const A: f64 = -0.5;
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
        }
    }
}

/// Fixed-point precision of the filter coefficients: 8 bits of pixel value and 2 bits of
/// headroom for negative lobes and sums above 1.0 leave 22 fractional bits in an i32.
use std::ops::Range;

const PRECISION_BITS: u32 = 32 - 8 - 2;
const HALF: i32 = 1 << (PRECISION_BITS - 1);

/// An 8-bit RGB image stored row-major, 3 bytes per pixel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<u8>,
}

impl RgbImage {
    pub fn new(width: usize, height: usize, pixels: Vec<u8>) -> Self {
        assert_eq!(
            pixels.len(),
            width * height * 3,
            "RGB buffer does not match its size"
        );
        Self {
            width,
            height,
            pixels,
        }
    }
}

/// The taps of one output pixel along one axis: `weights[i]` multiplies input `first + i`.
struct Taps {
    /// Row-major `[outputs][ksize]` fixed-point weights.
    weights: Vec<i32>,
    /// Per output pixel: (first input index, number of taps).
    bounds: Vec<(usize, usize)>,
    ksize: usize,
    /// The first output these taps are for (only the window's outputs are computed).
    first_output: usize,
}

impl Taps {
    /// Pillow's `precompute_coeffs` followed by `normalize_coeffs_8bpc`, for a box that spans
    /// the whole input axis, computed only for `outputs` (each output's taps depend on its
    /// index alone, so this equals the matching slice of Pillow's table).
    fn new(in_size: usize, out_size: usize, outputs: Range<usize>, filter: Filter) -> Self {
        let scale = in_size as f64 / out_size as f64;
        let filterscale = scale.max(1.0);
        let support = filter.support() * filterscale;
        let ksize = support.ceil() as usize * 2 + 1;
        let inv_filterscale = 1.0 / filterscale;

        let first_output = outputs.start;
        let mut weights = vec![0i32; outputs.len() * ksize];
        let mut bounds = Vec::with_capacity(outputs.len());
        let mut row = vec![0f64; ksize];
        for (i, xx) in outputs.enumerate() {
            let center = (xx as f64 + 0.5) * scale;
            // `(int)` in C truncates toward zero; `as i64` does the same.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let taps = xmax.saturating_sub(xmin);
            let mut total = 0.0;
            for (x, w) in row.iter_mut().enumerate().take(taps) {
                *w = filter.weight((x as f64 + xmin as f64 - center + 0.5) * inv_filterscale);
                total += *w;
            }
            let out = &mut weights[i * ksize..i * ksize + taps];
            for (dst, &w) in out.iter_mut().zip(&row[..taps]) {
                let w = if total != 0.0 { w / total } else { w };
                *dst = quantize(w);
            }
            bounds.push((xmin, taps));
        }
        Self {
            weights,
            bounds,
            ksize,
            first_output,
        }
    }

    fn of(&self, out_index: usize) -> (usize, &[i32]) {
        let i = out_index - self.first_output;
        let (first, taps) = self.bounds[i];
        let start = i * self.ksize;
        (first, &self.weights[start..start + taps])
    }
}

/// Round a normalised weight half away from zero into the fixed-point format, as Pillow does.
fn quantize(w: f64) -> i32 {
    let scaled = w * f64::from(1u32 << PRECISION_BITS);
    if w < 0.0 {
        (scaled - 0.5) as i32
    } else {
        (scaled + 0.5) as i32
    }
}

/// Pillow's `clip8`: drop the fractional bits and clamp to a byte.
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resize `src` to `width` x `height` exactly as `PIL.Image.resize((width, height), filter)`.
pub fn resize(src: &RgbImage, width: usize, height: usize, filter: Filter) -> RgbImage {
    resize_window(src, width, height, 0..width, 0..height, filter)
}

/// The `columns` x `rows` window of `resize(src, width, height, filter)`, computed without
/// the rest of the image. Every output pixel depends only on its own taps, so the window is
/// bit-identical to cropping the full resize; a center crop thus skips the discarded border
/// (for a 4:3 photo cropped square, about 40 % of the work).
pub fn resize_window(
    src: &RgbImage,
    width: usize,
    height: usize,
    columns: Range<usize>,
    rows: Range<usize>,
    filter: Filter,
) -> RgbImage {
    assert!(width > 0 && height > 0, "cannot resize to an empty image");
    assert!(
        columns.end <= width && rows.end <= height,
        "window outside the resized image"
    );
    let need_horizontal = width != src.width;
    let need_vertical = height != src.height;
    // Source rows the window reads: all of `rows` when there is no vertical pass.
    let vertical = need_vertical.then(|| Taps::new(src.height, height, rows.clone(), filter));
    let (first_row, last_row) = match &vertical {
        Some(taps) => taps.span(rows.clone()),
        None => (rows.start, rows.end),
    };
    let temp = if need_horizontal {
        let horizontal = Taps::new(src.width, width, columns.clone(), filter);
        resample_horizontal(src, &horizontal, columns, first_row, last_row)
    } else {
        copy_window(src, columns, first_row, last_row)
    };
    match &vertical {
        Some(taps) => resample_vertical(&temp, taps, rows, first_row),
        None => temp,
    }
}

fn copy_window(
    src: &RgbImage,
    columns: Range<usize>,
    first_row: usize,
    last_row: usize,
) -> RgbImage {
    let width = columns.len();
    let mut out = Vec::with_capacity(width * (last_row - first_row) * 3);
    for y in first_row..last_row {
        let row = (y * src.width + columns.start) * 3;
        out.extend_from_slice(&src.pixels[row..row + width * 3]);
    }
    RgbImage::new(width, last_row - first_row, out)
}

impl Taps {
    /// The source index range the output range `outputs` reads.
    fn span(&self, outputs: Range<usize>) -> (usize, usize) {
        let taps = || outputs.clone().map(|o| self.bounds[o - self.first_output]);
        let first = taps().map(|(first, _)| first).min().unwrap_or(0);
        let last = taps().map(|(first, n)| first + n).max().unwrap_or(0);
        (first, last)
    }
}

/// Horizontal pass over source rows `first_row..last_row`, producing output `columns`.
fn resample_horizontal(
    src: &RgbImage,
    taps: &Taps,
    columns: Range<usize>,
    first_row: usize,
    last_row: usize,
) -> RgbImage {
    let out_width = columns.len();
    let rows = last_row - first_row;
    let mut out = vec![0u8; out_width * rows * 3];
    let src_stride = src.width * 3;
    for (y, out_row) in out.chunks_exact_mut(out_width * 3).enumerate() {
        let in_row = &src.pixels[(first_row + y) * src_stride..(first_row + y + 1) * src_stride];
        for (xx, px) in columns.clone().zip(out_row.chunks_exact_mut(3)) {
            let (first, weights) = taps.of(xx);
            let input = &in_row[first * 3..(first + weights.len()) * 3];
            let (mut r, mut g, mut b) = (HALF, HALF, HALF);
            for (&w, p) in weights.iter().zip(input.chunks_exact(3)) {
                r += i32::from(p[0]) * w;
                g += i32::from(p[1]) * w;
                b += i32::from(p[2]) * w;
            }
            px[0] = clip8(r);
            px[1] = clip8(g);
            px[2] = clip8(b);
        }
    }
    RgbImage::new(out_width, rows, out)
}

/// Vertical pass producing output `rows`; `row_offset` is the source row that `src`'s row 0
/// corresponds to (the horizontal pass only produced the rows the taps need).
fn resample_vertical(
    src: &RgbImage,
    taps: &Taps,
    rows: Range<usize>,
    row_offset: usize,
) -> RgbImage {
    let stride = src.width * 3;
    let mut out = vec![0u8; stride * rows.len()];
    let mut acc = vec![0i32; stride];
    for (yy, out_row) in rows.zip(out.chunks_exact_mut(stride)) {
        let (first, weights) = taps.of(yy);
        acc.fill(HALF);
        // Row-at-a-time accumulation reads the source sequentially and vectorises; the sum
        // per value is the same as Pillow's per-pixel loop because i32 addition is exact.
        for (i, &w) in weights.iter().enumerate() {
            let row = first + i - row_offset;
            let in_row = &src.pixels[row * stride..(row + 1) * stride];
            for (a, &p) in acc.iter_mut().zip(in_row) {
                *a += i32::from(p) * w;
            }
        }
        for (dst, &a) in out_row.iter_mut().zip(&acc) {
            *dst = clip8(a);
        }
    }
    let height = out.len() / stride.max(1);
    RgbImage::new(src.width, height, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gradient(width: usize, height: usize) -> RgbImage {
        let pixels = (0..width * height * 3)
            .map(|i| ((i * 7919) % 251) as u8)
            .collect();
        RgbImage::new(width, height, pixels)
    }

    #[test]
    fn same_size_is_a_copy() {
        let img = gradient(5, 4);
        assert_eq!(resize(&img, 5, 4, Filter::Bicubic), img);
    }

    #[test]
    fn constant_image_stays_constant() {
        // Normalised weights sum to one, so a flat image must stay flat in both directions.
        let img = RgbImage::new(37, 23, vec![200; 37 * 23 * 3]);
        for filter in [Filter::Bilinear, Filter::Bicubic] {
            for (w, h) in [(10, 7), (80, 50), (37, 9)] {
                let out = resize(&img, w, h, filter);
                assert_eq!((out.width, out.height), (w, h));
                assert!(out.pixels.iter().all(|&p| p == 200), "{filter:?} {w}x{h}");
            }
        }
    }

    #[test]
    fn a_window_equals_the_crop_of_the_full_resize() {
        let img = gradient(97, 61);
        for filter in [Filter::Bilinear, Filter::Bicubic] {
            for (w, h) in [(40, 30), (97, 25), (30, 61), (150, 90)] {
                let full = resize(&img, w, h, filter);
                let (cols, rows) = (w / 4..w - w / 5, h / 3..h - 1);
                let window = resize_window(&img, w, h, cols.clone(), rows.clone(), filter);
                for (i, y) in rows.clone().enumerate() {
                    let want = &full.pixels[(y * w + cols.start) * 3..(y * w + cols.end) * 3];
                    let got = &window.pixels[i * cols.len() * 3..(i + 1) * cols.len() * 3];
                    assert_eq!(got, want, "{filter:?} {w}x{h} row {y}");
                }
            }
        }
    }

    #[test]
    fn downscale_support_grows_with_ratio() {
        let taps = Taps::new(100, 10, 0..10, Filter::Bicubic);
        // scale 10: support 20, so each output pixel reads up to 41 inputs.
        assert_eq!(taps.ksize, 41);
        let (first, weights) = taps.of(5);
        assert_eq!(first, 35);
        assert_eq!(weights.len(), 40);
        let sum: i64 = weights.iter().map(|&w| i64::from(w)).sum();
        assert!((sum - (1 << PRECISION_BITS)).abs() <= weights.len() as i64);
    }

    #[test]
    fn quantize_rounds_half_away_from_zero() {
        assert_eq!(quantize(0.5), 1 << 21);
        assert_eq!(quantize(-0.25), -(1 << 20));
        assert_eq!(clip8(-5), 0);
        assert_eq!(clip8(300 << PRECISION_BITS), 255);
    }
}
