//! Antialiased resampling of 8-bit RGB images, bit-exact with Pillow's `Image.resize`.
//!
//! timm's eval transform resizes PIL images, so matching timm to the last pixel means matching
//! Pillow's `ImagingResample` (src/libImaging/Resample.c): a separable filter whose support
//! grows with the downscale ratio, coefficients normalised in f64 and then quantised to 22
//! fractional bits, a horizontal pass over only the rows the vertical pass reads, rounding and
//! clamping to u8 between the passes, then the vertical pass; or, since Pillow 13, the vertical
//! pass first when the height shrinks by more than twice what the width does (portrait photos
//! to a square size, for one). This is a re-implementation of
//! that algorithm (Pillow is under the MIT-CMU / HPND licence; the algorithm is credited to
//! Alex Clark and contributors, and to Uploadcare's Pillow-SIMD work on it).
//!
//! The convolutions are vectorised the way Pillow-SIMD (github.com/uploadcare/pillow-simd,
//! `libImaging/Resample.c` and its `ResampleSIMD*` kernels) vectorises them, but keep Pillow's
//! exact 22-bit i32 coefficients where Pillow-SIMD narrows them to i16 (which is why
//! Pillow-SIMD's output is not Pillow's). Every output value is `HALF + sum(weight * input)`
//! in i32, exactly as in Pillow's scalar loops; only the order of the additions changes, and
//! integer addition does not care. The horizontal pass (AVX2, detected at run time) multiplies
//! two taps' R, G, B at a time in one 256-bit vector and convolves four rows together so each
//! weight vector is loaded once for all four. The vertical pass accumulates 32 values of a row
//! in registers over all of an output row's taps (plain Rust that LLVM vectorises, compiled
//! for AVX2 too). Without AVX2 (or off x86-64) the same arithmetic runs as portable code. The
//! tests compare both paths against a straightforward scalar implementation.
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
    let kernels = Kernels::detect();
    resample(src, width, height, columns, rows, filter, kernels)
}

/// Which implementation of the two convolutions runs.
#[derive(Debug, Clone, Copy)]
enum Kernels {
    Portable,
    /// Only constructed by `detect` on a CPU with AVX2.
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

impl Kernels {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") {
            return Kernels::Avx2;
        }
        Kernels::Portable
    }
}

fn resample(
    src: &RgbImage,
    width: usize,
    height: usize,
    columns: Range<usize>,
    rows: Range<usize>,
    filter: Filter,
    kernels: Kernels,
) -> RgbImage {
    assert!(width > 0 && height > 0, "cannot resize to an empty image");
    assert!(
        columns.end <= width && rows.end <= height,
        "window outside the resized image"
    );
    let need_horizontal = width != src.width;
    let need_vertical = height != src.height;
    if need_horizontal && need_vertical && vertical_first(src, width, height) {
        return resample_vertical_first(src, width, height, columns, rows, filter, kernels);
    }
    // Source rows the window reads: all of `rows` when there is no vertical pass.
    let vertical = need_vertical.then(|| Taps::new(src.height, height, rows.clone(), filter));
    let (first_row, last_row) = match &vertical {
        Some(taps) => taps.span(rows.clone()),
        None => (rows.start, rows.end),
    };
    let out_width = columns.len();
    let temp = if need_horizontal {
        let horizontal = Taps::new(src.width, width, columns, filter);
        resample_horizontal(src, &horizontal, first_row..last_row, kernels)
    } else {
        copy_window(src, columns, first_row..last_row)
    };
    match &vertical {
        Some(taps) => {
            let temp = RgbImage::new(out_width, last_row - first_row, temp);
            resample_vertical(&temp, 0..out_width, taps, rows, first_row, kernels)
        }
        None => RgbImage::new(out_width, last_row - first_row, temp),
    }
}

/// Pillow 13's pass order (`ImagingResampleInner`): the vertical pass runs first when the height
/// shrinks, and by more than twice as many pixels as the width does. The order changes the
/// result, since each pass rounds to u8.
fn vertical_first(src: &RgbImage, width: usize, height: usize) -> bool {
    let shrink_h = src.height as i64 - height as i64;
    let shrink_w = src.width as i64 - width as i64;
    shrink_h > 0 && shrink_h > 2 * shrink_w
}

/// The window, vertical pass first: the output `rows` over just the source columns the
/// horizontal taps of `columns` read, then the horizontal pass over those rows.
fn resample_vertical_first(
    src: &RgbImage,
    width: usize,
    height: usize,
    columns: Range<usize>,
    rows: Range<usize>,
    filter: Filter,
    kernels: Kernels,
) -> RgbImage {
    let vertical = Taps::new(src.height, height, rows.clone(), filter);
    let mut horizontal = Taps::new(src.width, width, columns, filter);
    let (first_column, last_column) = horizontal.span(horizontal.output_range());
    let temp = resample_vertical(src, first_column..last_column, &vertical, rows, 0, kernels);
    horizontal.shift_inputs(first_column);
    let out = resample_horizontal(&temp, &horizontal, 0..temp.height, kernels);
    RgbImage::new(horizontal.outputs(), temp.height, out)
}

fn copy_window(src: &RgbImage, columns: Range<usize>, rows: Range<usize>) -> Vec<u8> {
    let mut out = Vec::with_capacity(columns.len() * rows.len() * 3);
    for y in rows {
        let row = (y * src.width + columns.start) * 3;
        out.extend_from_slice(&src.pixels[row..row + columns.len() * 3]);
    }
    out
}

impl Taps {
    /// The source index range the output range `outputs` reads.
    fn span(&self, outputs: Range<usize>) -> (usize, usize) {
        let taps = || outputs.clone().map(|o| self.bounds[o - self.first_output]);
        let first = taps().map(|(first, _)| first).min().unwrap_or(0);
        let last = taps().map(|(first, n)| first + n).max().unwrap_or(0);
        (first, last)
    }

    /// The number of outputs these taps are for.
    fn outputs(&self) -> usize {
        self.bounds.len()
    }

    /// The outputs these taps are for.
    fn output_range(&self) -> Range<usize> {
        self.first_output..self.first_output + self.outputs()
    }

    /// Count input indices from `first` (for an input that starts there).
    fn shift_inputs(&mut self, first: usize) {
        for (start, _) in &mut self.bounds {
            *start -= first;
        }
    }

    /// Every output's (first input index, weights), in order.
    fn iter(&self) -> impl Iterator<Item = (usize, &[i32])> {
        let rows = self.weights.chunks_exact(self.ksize.max(1));
        self.bounds
            .iter()
            .zip(rows)
            .map(|(&(first, n), w)| (first, &w[..n]))
    }
}

/// Horizontal pass over source `rows`: one output row (all of `taps`' outputs) per source
/// row, as a packed RGB buffer.
fn resample_horizontal(
    src: &RgbImage,
    taps: &Taps,
    rows: Range<usize>,
    kernels: Kernels,
) -> Vec<u8> {
    let mut out = vec![0u8; taps.outputs() * rows.len() * 3];
    match kernels {
        #[cfg(target_arch = "x86_64")]
        Kernels::Avx2 if avx2::horizontal_fits(src.width, taps) => {
            // SAFETY: `Kernels::Avx2` exists only where the CPU has AVX2.
            unsafe { avx2::horizontal(src, taps, rows, &mut out) }
        }
        #[cfg(target_arch = "x86_64")]
        Kernels::Avx2 => horizontal(src, taps, rows, &mut out),
        Kernels::Portable => horizontal(src, taps, rows, &mut out),
    }
    out
}

/// The portable horizontal pass: Pillow's loop, three channel accumulators per output pixel.
fn horizontal(src: &RgbImage, taps: &Taps, rows: Range<usize>, out: &mut [u8]) {
    let stride = src.width * 3;
    let out_stride = taps.outputs() * 3;
    if out_stride == 0 {
        return;
    }
    for (y, out_row) in rows.zip(out.chunks_exact_mut(out_stride)) {
        let in_row = &src.pixels[y * stride..(y + 1) * stride];
        for ((first, weights), px) in taps.iter().zip(out_row.chunks_exact_mut(3)) {
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
}

/// Vertical pass producing output `rows` from the `columns` of `src`, whose row 0 is source row
/// `row_offset` (after a horizontal pass, only the rows the taps need exist).
fn resample_vertical(
    src: &RgbImage,
    columns: Range<usize>,
    taps: &Taps,
    rows: Range<usize>,
    row_offset: usize,
    kernels: Kernels,
) -> RgbImage {
    let window = Window {
        stride: src.width * 3,
        offset: columns.start * 3,
        len: columns.len() * 3,
    };
    let mut out = vec![0u8; window.len * rows.len()];
    if window.len > 0 {
        let src = &src.pixels;
        match kernels {
            #[cfg(target_arch = "x86_64")]
            Kernels::Avx2 => {
                // SAFETY: `Kernels::Avx2` exists only where the CPU has AVX2.
                unsafe { vertical_avx2(src, window, taps, rows.clone(), row_offset, &mut out) }
            }
            Kernels::Portable => vertical(src, window, taps, rows.clone(), row_offset, &mut out),
        }
    }
    RgbImage::new(columns.len(), rows.len(), out)
}

/// Where the vertical pass reads in each source row: `len` bytes from `offset`, rows `stride`
/// bytes apart.
#[derive(Clone, Copy)]
struct Window {
    stride: usize,
    offset: usize,
    len: usize,
}

/// The vertical pass compiled for AVX2 (eight i32 lanes per vector instead of SSE2's four).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn vertical_avx2(
    src: &[u8],
    window: Window,
    taps: &Taps,
    rows: Range<usize>,
    row_offset: usize,
    out: &mut [u8],
) {
    vertical(src, window, taps, rows, row_offset, out);
}

/// Values per block of the vertical pass: the block's i32 accumulators stay in registers
/// (four AVX2 vectors) while every tap's source row is added in.
const BLOCK: usize = 32;

/// The vertical pass: every output value is `HALF + sum(weight * source)` over one column of
/// source rows, accumulated one block of the row at a time, tap by tap.
#[inline(always)]
fn vertical(
    src: &[u8],
    window: Window,
    taps: &Taps,
    rows: Range<usize>,
    row_offset: usize,
    out: &mut [u8],
) {
    let Window {
        stride,
        offset,
        len,
    } = window;
    for (yy, out_row) in rows.zip(out.chunks_exact_mut(len)) {
        let (first, weights) = taps.of(yy);
        let start = (first - row_offset) * stride + offset;
        let tap_row = |k: usize| &src[start + k * stride..][..len];
        let mut blocks = out_row.chunks_exact_mut(BLOCK);
        for (b, block) in blocks.by_ref().enumerate() {
            let mut acc = [HALF; BLOCK];
            for (k, &w) in weights.iter().enumerate() {
                let row = &tap_row(k)[b * BLOCK..][..BLOCK];
                for (a, &p) in acc.iter_mut().zip(row) {
                    *a += i32::from(p) * w;
                }
            }
            for (dst, &a) in block.iter_mut().zip(&acc) {
                *dst = clip8(a);
            }
        }
        let tail = blocks.into_remainder();
        let tail_start = len - tail.len();
        let mut acc = [HALF; BLOCK];
        let acc = &mut acc[..tail.len()];
        for (k, &w) in weights.iter().enumerate() {
            let row = &tap_row(k)[tail_start..];
            for (a, &p) in acc.iter_mut().zip(row) {
                *a += i32::from(p) * w;
            }
        }
        for (dst, &a) in tail.iter_mut().zip(acc.iter()) {
            *dst = clip8(a);
        }
    }
}

/// The AVX2 horizontal pass, after Pillow-SIMD's `ImagingResampleHorizontalConvolution8u4x`
/// but with Pillow's exact 22-bit i32 coefficients: one 256-bit accumulator per output pixel
/// and row holds two taps' R, G, B (lanes 0-2 and 3-5; lanes 6-7 get zero weights), fed by
/// eight source bytes zero-extended to i32 and multiplied by that pair's weights. Four rows
/// share each weight vector.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{RgbImage, Taps, HALF, PRECISION_BITS};
    use std::arch::x86_64::*;
    use std::ops::Range;

    /// Tap pairs per output pixel.
    fn pairs(taps: &Taps) -> usize {
        let longest = taps.bounds.iter().map(|&(_, n)| n).max().unwrap_or(0);
        longest.div_ceil(2)
    }

    /// Whether every output's padded taps fit in the source row (they need `2 * pairs`
    /// pixels; only images narrower than that, a few pixels, take the scalar path).
    pub(super) fn horizontal_fits(in_width: usize, taps: &Taps) -> bool {
        2 * pairs(taps) <= in_width && taps.outputs() > 0
    }

    /// Source rows convolved together, sharing each weight vector.
    const ROWS: usize = 4;

    /// The horizontal pass over `rows` of `src` into `out` (`rows.len()` rows of
    /// `taps.outputs()` pixels). Callers must check `horizontal_fits` first.
    #[target_feature(enable = "avx2")]
    pub(super) fn horizontal(src: &RgbImage, taps: &Taps, rows: Range<usize>, out: &mut [u8]) {
        let pairs = pairs(taps);
        let in_width = src.width;
        // Per output: the first source pixel read, moved left where needed so that all
        // `2 * pairs` pixels lie in the row, and the weights shifted to match, zero-padded.
        let mut starts = Vec::with_capacity(taps.outputs());
        let mut weights = Vec::with_capacity(taps.outputs() * pairs);
        let mut padded = vec![0i32; 2 * pairs];
        for (i, &(first, n)) in taps.bounds.iter().enumerate() {
            let start = first.min(in_width - 2 * pairs);
            padded.fill(0);
            let shift = first - start;
            padded[shift..shift + n].copy_from_slice(&taps.weights[i * taps.ksize..][..n]);
            for pair in padded.chunks_exact(2) {
                let (a, b) = (pair[0], pair[1]);
                weights.push(_mm256_setr_epi32(a, a, a, b, b, b, 0, 0));
            }
            starts.push(start * 3);
        }

        let stride = in_width * 3;
        let out_stride = taps.outputs() * 3;
        // Each load reads eight bytes for six, so the last pixel pair of a row reads two
        // bytes past the row: the next row's, or for the image's last row a padded copy.
        let mut last = vec![0u8; stride + 2];
        let row_at = |y: usize| src.pixels.get(y * stride..(y + 1) * stride + 2);
        let mut out_rows = out.chunks_exact_mut(out_stride);
        let mut y = rows.start;
        while y + ROWS <= rows.end && row_at(y + ROWS - 1).is_some() {
            let inputs: [&[u8]; ROWS] = std::array::from_fn(|k| row_at(y + k).unwrap());
            let outs: [&mut [u8]; ROWS] = std::array::from_fn(|_| out_rows.next().unwrap());
            convolve::<ROWS>(inputs, &starts, &weights, pairs, outs);
            y += ROWS;
        }
        for (y, out_row) in (y..rows.end).zip(out_rows) {
            let input = match row_at(y) {
                Some(row) => row,
                None => {
                    last[..stride].copy_from_slice(&src.pixels[y * stride..(y + 1) * stride]);
                    &last
                }
            };
            convolve::<1>([input], &starts, &weights, pairs, [out_row]);
        }
    }

    /// Convolve `N` rows at once: each weight vector loaded serves `N` rows.
    #[target_feature(enable = "avx2")]
    #[inline]
    fn convolve<const N: usize>(
        inputs: [&[u8]; N],
        starts: &[usize],
        weights: &[__m256i],
        pairs: usize,
        outs: [&mut [u8]; N],
    ) {
        let fold = _mm256_setr_epi32(3, 4, 5, 6, 6, 6, 6, 6);
        let init = _mm256_setr_epi32(HALF, HALF, HALF, 0, 0, 0, 0, 0);
        for (x, (&start, w)) in starts.iter().zip(weights.chunks_exact(pairs)).enumerate() {
            let mut pixels = inputs;
            for p in &mut pixels {
                *p = &p[start..start + 6 * pairs + 2];
            }
            let mut acc = [init; N];
            for (j, &wj) in w.iter().enumerate() {
                for k in 0..N {
                    let bytes: [u8; 8] = pixels[k][6 * j..6 * j + 8].try_into().unwrap();
                    let v = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(i64::from_le_bytes(bytes)));
                    acc[k] = _mm256_add_epi32(acc[k], _mm256_mullo_epi32(v, wj));
                }
            }
            for k in 0..N {
                // Lanes 0-2 + lanes 3-5: the R, G, B sums; then Pillow's clip8 by saturation.
                let sum = _mm256_add_epi32(acc[k], _mm256_permutevar8x32_epi32(acc[k], fold));
                let shifted =
                    _mm_srai_epi32::<{ PRECISION_BITS as i32 }>(_mm256_castsi256_si128(sum));
                let words = _mm_packs_epi32(shifted, shifted);
                let bytes = _mm_packus_epi16(words, words);
                let rgbx = _mm_cvtsi128_si32(bytes).to_le_bytes();
                // One four-byte store; the fourth byte is the next pixel's, written next.
                match outs[k][3 * x..].first_chunk_mut::<4>() {
                    Some(dst) => *dst = rgbx,
                    None => outs[k][3 * x..3 * x + 3].copy_from_slice(&rgbx[..3]),
                }
            }
        }
    }
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
    fn the_pass_order_is_pillow_13s() {
        let src = |w, h| RgbImage::new(w, h, vec![0; w * h * 3]);
        // The height shrinks by more than twice what the width does.
        assert!(vertical_first(&src(900, 2300), 480, 480));
        assert!(vertical_first(&src(300, 400), 256, 256));
        // ... or the width grows while the height shrinks.
        assert!(vertical_first(&src(200, 300), 300, 200));
        assert!(!vertical_first(&src(800, 1000), 400, 400));
        assert!(!vertical_first(&src(2300, 900), 480, 480));
        assert!(!vertical_first(&src(300, 200), 200, 300));
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

    /// One output value of a convolution: Pillow's loop over the taps.
    fn convolve(weights: &[i32], input: impl Fn(usize) -> u8) -> u8 {
        let mut acc = HALF;
        for (i, &w) in weights.iter().enumerate() {
            acc += i32::from(input(i)) * w;
        }
        clip8(acc)
    }

    /// The straightforward scalar implementation the vectorised kernels replaced: Pillow's
    /// per-pixel loops, one output value at a time, on the same coefficients, in Pillow 13's
    /// pass order.
    fn scalar_window(
        src: &RgbImage,
        width: usize,
        height: usize,
        columns: Range<usize>,
        rows: Range<usize>,
        filter: Filter,
    ) -> RgbImage {
        let (shrink_w, shrink_h) = (
            src.width as i64 - width as i64,
            src.height as i64 - height as i64,
        );
        if width != src.width && shrink_h > 0 && shrink_h > 2 * shrink_w {
            // Vertical pass over every source column, then the horizontal pass.
            let vertical = Taps::new(src.height, height, rows.clone(), filter);
            let mut temp = Vec::new();
            for yy in rows.clone() {
                let (first, weights) = vertical.of(yy);
                for x in 0..src.width * 3 {
                    temp.push(convolve(weights, |i| {
                        src.pixels[(first + i) * src.width * 3 + x]
                    }));
                }
            }
            let horizontal = Taps::new(src.width, width, columns.clone(), filter);
            let mut out = Vec::new();
            for row in temp.chunks_exact(src.width * 3) {
                for xx in columns.clone() {
                    let (first, weights) = horizontal.of(xx);
                    for c in 0..3 {
                        out.push(convolve(weights, |i| row[(first + i) * 3 + c]));
                    }
                }
            }
            return RgbImage::new(columns.len(), rows.len(), out);
        }
        let vertical =
            (height != src.height).then(|| Taps::new(src.height, height, rows.clone(), filter));
        let (first_row, last_row) = match &vertical {
            Some(taps) => taps.span(rows.clone()),
            None => (rows.start, rows.end),
        };
        let temp_width = columns.len();
        let mut temp = Vec::new();
        let horizontal = Taps::new(src.width, width, columns.clone(), filter);
        for y in first_row..last_row {
            let in_row = &src.pixels[y * src.width * 3..(y + 1) * src.width * 3];
            for xx in columns.clone() {
                if width == src.width {
                    temp.extend_from_slice(&in_row[xx * 3..xx * 3 + 3]);
                    continue;
                }
                let (first, weights) = horizontal.of(xx);
                for c in 0..3 {
                    let mut acc = HALF;
                    for (i, &w) in weights.iter().enumerate() {
                        acc += i32::from(in_row[(first + i) * 3 + c]) * w;
                    }
                    temp.push(clip8(acc));
                }
            }
        }
        let Some(taps) = vertical else {
            return RgbImage::new(temp_width, last_row - first_row, temp);
        };
        let mut out = Vec::new();
        for yy in rows.clone() {
            let (first, weights) = taps.of(yy);
            for x in 0..temp_width * 3 {
                let mut acc = HALF;
                for (i, &w) in weights.iter().enumerate() {
                    acc += i32::from(temp[(first + i - first_row) * temp_width * 3 + x]) * w;
                }
                out.push(clip8(acc));
            }
        }
        RgbImage::new(temp_width, rows.len(), out)
    }

    /// xorshift64: reproducible test data without a dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        /// Uniform in `lo..=hi` (near enough for test data).
        fn between(&mut self, lo: usize, hi: usize) -> usize {
            lo + (self.next() % (hi - lo + 1) as u64) as usize
        }

        /// A non-empty subrange of `0..n`, the whole of it a quarter of the time.
        fn window(&mut self, n: usize) -> Range<usize> {
            if self.next().is_multiple_of(4) {
                return 0..n;
            }
            let (a, b) = (self.between(0, n - 1), self.between(0, n - 1));
            a.min(b)..a.max(b) + 1
        }

        /// Noise, saturated noise (maximal overshoot of the negative lobes) or smooth ramps.
        fn image(&mut self, width: usize, height: usize) -> RgbImage {
            let kind = self.next() % 3;
            let pixels = (0..width * height * 3)
                .map(|i| match kind {
                    0 => self.next() as u8,
                    1 => (self.next() & 1) as u8 * 255,
                    _ => ((i / 3 % width * 5 + i / 3 / width * 3 + i % 3 * 80) % 256) as u8,
                })
                .collect();
            RgbImage::new(width, height, pixels)
        }
    }

    fn assert_kernels_match(
        src: &RgbImage,
        (width, height): (usize, usize),
        columns: Range<usize>,
        rows: Range<usize>,
        filter: Filter,
    ) {
        let want = scalar_window(src, width, height, columns.clone(), rows.clone(), filter);
        for kernels in [Kernels::Portable, Kernels::detect()] {
            let got = resample(
                src,
                width,
                height,
                columns.clone(),
                rows.clone(),
                filter,
                kernels,
            );
            assert!(
                got == want,
                "{kernels:?} {filter:?}: {}x{} -> {width}x{height}, window {columns:?} x {rows:?}",
                src.width,
                src.height
            );
        }
    }

    #[test]
    fn kernels_match_the_scalar_implementation() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let filters = [Filter::Bilinear, Filter::Bicubic];
        // Small images: every edge case of the taps (clamped at both borders, more taps than
        // pixels, upscaling, one-pixel axes, windows at the edges).
        for case in 0..600 {
            let (w, h) = (rng.between(1, 40), rng.between(1, 40));
            let src = rng.image(w, h);
            let size = (rng.between(1, 90), rng.between(1, 90));
            let (columns, rows) = (rng.window(size.0), rng.window(size.1));
            assert_kernels_match(&src, size, columns, rows, filters[case % 2]);
        }
        // Larger ones, with long kernels (up to 9x downscaling).
        for case in 0..10 {
            let (w, h) = (rng.between(1, 300), rng.between(1, 300));
            let src = rng.image(w, h);
            let size = (rng.between(w / 9 + 1, 2 * w), rng.between(h / 9 + 1, 2 * h));
            let (columns, rows) = (rng.window(size.0), rng.window(size.1));
            assert_kernels_match(&src, size, columns, rows, filters[case % 2]);
        }
        // preprocess's shapes: shorter side to 256 and a centered 224 crop, and squashing
        // (portrait photos to a square size run the vertical pass first).
        for (w, h) in [(640, 427), (300, 451), (427, 640), (451, 900)] {
            let src = rng.image(w, h);
            let (rw, rh) = if w <= h {
                (256, 256 * h / w)
            } else {
                (256 * w / h, 256)
            };
            let (left, top) = ((rw - 224) / 2, (rh - 224) / 2);
            for filter in filters {
                assert_kernels_match(&src, (rw, rh), left..left + 224, top..top + 224, filter);
            }
            assert_kernels_match(&src, (384, 384), 0..384, 0..384, Filter::Bicubic);
        }
    }
}
