//! Decode request bytes into 8-bit RGB, as `PIL.Image.open(f).convert("RGB")` would.
//!
//! The format is sniffed from the bytes, never trusted from the Content-Type. JPEG goes through
//! libjpeg-turbo (the `turbojpeg` crate), the decoder Pillow bundles, which makes the pixels
//! bit-identical to Pillow's (the `image` crate's zune-jpeg differs by up to 11 levels). PNG,
//! GIF (first frame), WebP and BMP go through the `image` crate. Every image's dimensions are
//! read from its header and checked against the pixel limit before any pixel is decoded, so a
//! decompression bomb is refused without allocating for it.
//!
//! With `--jpeg-draft` a large JPEG is decoded at 1/2, 1/4 or 1/8 of its size: libjpeg-turbo
//! scales the inverse DCT, skipping most of the work. The scale is chosen as Pillow's
//! `Image.draft("RGB", size)` chooses it, and the pixels are Pillow's to the bit (both run
//! libjpeg-turbo's scaled IDCT with the same settings).

use super::resize::RgbImage;
use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, ImageFormat};
use std::cell::RefCell;
use std::io::Cursor;

/// The formats we decode, for error messages.
pub const ACCEPTED_FORMATS: &str = "JPEG, PNG, WebP, GIF (first frame) or BMP";

#[derive(Debug, Clone, Copy)]
pub struct DecodeOptions {
    /// Largest accepted width x height, checked from the header before decoding.
    pub max_pixels: u64,
    /// Rotate/flip by the EXIF orientation tag (timm and Pillow do not unless asked).
    pub exif_transpose: bool,
    /// `--jpeg-draft`: the (width, height) the resize step needs, as displayed (after EXIF
    /// orientation when `exif_transpose` is on). A JPEG at least twice that size on both sides
    /// is decoded smaller; see [`DecodeScale::for_draft`].
    pub draft: Option<(usize, usize)>,
}

/// The size an image was decoded at, relative to its own: JPEGs can be decoded at 1/2, 1/4 or
/// 1/8 with `--jpeg-draft`; everything else is decoded whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum DecodeScale {
    Full,
    Half,
    Quarter,
    Eighth,
}

impl DecodeScale {
    pub const ALL: [DecodeScale; 4] = [Self::Full, Self::Half, Self::Quarter, Self::Eighth];

    /// Each side is divided by this (rounding up).
    pub fn denominator(self) -> usize {
        match self {
            Self::Full => 1,
            Self::Half => 2,
            Self::Quarter => 4,
            Self::Eighth => 8,
        }
    }

    /// The `scale` label of `visionserve_decoded_images_total`.
    pub fn label(self) -> &'static str {
        match self {
            Self::Full => "1/1",
            Self::Half => "1/2",
            Self::Quarter => "1/4",
            Self::Eighth => "1/8",
        }
    }

    /// Pillow's `JpegImageFile.draft(mode, size)`: the smallest scale at which both sides still
    /// divide at least that many times into `wanted` (`min(w // want_w, h // want_h)`, integer
    /// division), so the decoded image is never smaller than `wanted` on either side.
    pub fn for_draft(width: usize, height: usize, wanted: (usize, usize)) -> Self {
        let (want_w, want_h) = (wanted.0.max(1), wanted.1.max(1));
        let fits = (width / want_w).min(height / want_h);
        Self::ALL
            .into_iter()
            .rev()
            .find(|scale| fits >= scale.denominator())
            .unwrap_or(Self::Full)
    }

    /// A side of `size` pixels at this scale (libjpeg's `TJSCALED`: rounded up).
    pub fn apply(self, size: usize) -> usize {
        size.div_ceil(self.denominator())
    }

    fn factor(self) -> turbojpeg::ScalingFactor {
        turbojpeg::ScalingFactor::new(1, self.denominator())
    }
}

/// A decoded image and the scale it was decoded at.
#[derive(Debug, PartialEq)]
pub struct Decoded {
    pub image: RgbImage,
    pub scale: DecodeScale,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DecodeError {
    #[error("the image is empty (0 bytes)")]
    Empty,
    #[error("unsupported image format{detected}: send {ACCEPTED_FORMATS}")]
    Unsupported { detected: String },
    #[error(
        "image is {width}x{height} = {pixels} pixels, above the limit of {limit} pixels; \
         downscale it before sending"
    )]
    TooManyPixels {
        width: u64,
        height: u64,
        pixels: u64,
        limit: u64,
    },
    #[error("cannot decode {format} data: {reason}")]
    Corrupt {
        format: &'static str,
        reason: String,
    },
    #[error("image is {width}x{height}, an aspect ratio above {MAX_ASPECT_RATIO}:1; crop it before sending")]
    AspectRatio { width: u64, height: u64 },
}

/// Longest side over shortest side accepted. Far beyond any photograph, and it bounds the work a
/// small file can cause: a 1 x 40,000,000 PNG passes the pixel limit in 160 KB, and resizing
/// its short side to 256 would make a 10-gigapixel axis.
pub const MAX_ASPECT_RATIO: u64 = 100;

/// Decode `bytes` into RGB, refusing images above `opts.max_pixels`.
pub fn decode(bytes: &[u8], opts: &DecodeOptions) -> Result<Decoded, DecodeError> {
    if bytes.is_empty() {
        return Err(DecodeError::Empty);
    }
    let format = image::guess_format(bytes).map_err(|_| DecodeError::Unsupported {
        detected: describe_unknown(bytes),
    })?;
    let orientation = if opts.exif_transpose {
        exif_orientation(bytes, format)
    } else {
        None
    };
    let decoded = match format {
        ImageFormat::Jpeg => {
            let draft = opts.draft.map(|wanted| as_stored(wanted, orientation));
            decode_jpeg(bytes, opts.max_pixels, draft)?
        }
        ImageFormat::WebP => Decoded {
            image: decode_webp(bytes, opts.max_pixels)?,
            scale: DecodeScale::Full,
        },
        ImageFormat::Png | ImageFormat::Gif | ImageFormat::Bmp => Decoded {
            image: decode_with_image_crate(bytes, format, opts.max_pixels)?,
            scale: DecodeScale::Full,
        },
        other => {
            return Err(DecodeError::Unsupported {
                detected: format!(" ({other:?})"),
            })
        }
    };
    Ok(match orientation {
        Some(orientation) => Decoded {
            image: orient(decoded.image, orientation),
            ..decoded
        },
        None => decoded,
    })
}

/// Bytes decoding an image may hold at once, per decoded pixel: the decoder's buffer (up to 4
/// channels: RGBA, CMYK) and the RGB image converted from it (3); resizing then needs less than
/// that.
pub const DECODE_BYTES_PER_PIXEL: u64 = 7;

/// The most memory decoding `bytes` can take, from the image's header alone (`None` if the
/// header cannot be read: decoding will fail and say why). Images over `max_pixels` are
/// refused before decoding, so they count as that limit. A JPEG decoded smaller (`draft`)
/// counts at that size.
pub fn decode_memory(bytes: &[u8], opts: &DecodeOptions) -> Option<u64> {
    let format = image::guess_format(bytes).ok()?;
    if format == ImageFormat::Jpeg {
        let header = turbojpeg::read_header(bytes).ok()?;
        return Some(jpeg_memory(&header, opts));
    }
    let reader = image::ImageReader::with_format(Cursor::new(bytes), format);
    let (w, h) = reader.into_dimensions().ok()?;
    let pixels = u64::from(w).saturating_mul(u64::from(h));
    Some(pixels.min(opts.max_pixels) * DECODE_BYTES_PER_PIXEL)
}

/// A JPEG's decoded pixels at the scale it will be decoded at, plus, for a progressive JPEG,
/// libjpeg's coefficient buffer: the whole image's DCT coefficients at full size (2 bytes
/// each), whatever the output scale.
fn jpeg_memory(header: &turbojpeg::DecompressHeader, opts: &DecodeOptions) -> u64 {
    let (width, height) = (header.width, header.height);
    let pixels = (width as u64).saturating_mul(height as u64);
    if pixels > opts.max_pixels {
        return opts.max_pixels * DECODE_BYTES_PER_PIXEL;
    }
    let scale = match opts.draft {
        _ if !jpeg_can_scale(header) => DecodeScale::Full,
        None => DecodeScale::Full,
        // The EXIF orientation is read only when decoding: count the larger of both readings.
        Some(wanted) if opts.exif_transpose => DecodeScale::for_draft(width, height, wanted)
            .min(DecodeScale::for_draft(width, height, (wanted.1, wanted.0))),
        Some(wanted) => DecodeScale::for_draft(width, height, wanted),
    };
    let decoded = (scale.apply(width) * scale.apply(height)) as u64;
    let coefficients = if header.is_progressive {
        pixels * coefficient_bytes_per_pixel(header)
    } else {
        0
    };
    decoded * DECODE_BYTES_PER_PIXEL + coefficients
}

/// Bytes of DCT coefficients per pixel: 2 per sample of each component at its sampling.
fn coefficient_bytes_per_pixel(header: &turbojpeg::DecompressHeader) -> u64 {
    use turbojpeg::{Colorspace, Subsamp};
    if matches!(header.colorspace, Colorspace::CMYK | Colorspace::YCCK) {
        return 8;
    }
    match header.subsamp {
        Subsamp::Gray => 2,
        Subsamp::Sub2x2 | Subsamp::Sub4x1 | Subsamp::Sub1x4 => 3,
        Subsamp::Sub2x1 | Subsamp::Sub1x2 => 4,
        Subsamp::None => 6,
        _ => 8,
    }
}

/// libjpeg-turbo cannot scale lossless JPEGs (they have no DCT).
fn jpeg_can_scale(header: &turbojpeg::DecompressHeader) -> bool {
    !header.is_lossless
}

/// Name what we saw when the bytes are no image we know, so the client can tell a wrong upload
/// (HTML, JSON, text) from a wrong format.
fn describe_unknown(bytes: &[u8]) -> String {
    let head = &bytes[..bytes.len().min(512)];
    if std::str::from_utf8(head).is_ok() || head.iter().all(|b| b.is_ascii()) {
        " (the data looks like text)".to_owned()
    } else {
        String::new()
    }
}

fn check_pixels(width: u64, height: u64, limit: u64) -> Result<(), DecodeError> {
    let pixels = width.saturating_mul(height);
    if pixels > limit {
        return Err(DecodeError::TooManyPixels {
            width,
            height,
            pixels,
            limit,
        });
    }
    if pixels == 0 {
        return Err(DecodeError::Corrupt {
            format: "image",
            reason: format!("it declares an empty size {width}x{height}"),
        });
    }
    if width.max(height) > MAX_ASPECT_RATIO * width.min(height) {
        return Err(DecodeError::AspectRatio { width, height });
    }
    Ok(())
}

thread_local! {
    // A TurboJPEG handle is cheap to reuse and not free to create; decode threads are pooled.
    static JPEG_DECODER: RefCell<Option<turbojpeg::Decompressor>> = const { RefCell::new(None) };
}

/// Progressive JPEGs can carry thousands of tiny scans that each cost a full pass; libjpeg-turbo
/// recommends a scan limit for untrusted input.
const JPEG_SCAN_LIMIT: u32 = 500;

fn jpeg_error(e: turbojpeg::Error) -> DecodeError {
    DecodeError::Corrupt {
        format: "JPEG",
        reason: e.to_string(),
    }
}

/// Decode a JPEG, at the scale Pillow's `draft` would pick when `draft` is the size needed (as
/// stored, before EXIF orientation).
fn decode_jpeg(
    bytes: &[u8],
    max_pixels: u64,
    draft: Option<(usize, usize)>,
) -> Result<Decoded, DecodeError> {
    JPEG_DECODER.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            let mut decompressor = turbojpeg::Decompressor::new().map_err(jpeg_error)?;
            decompressor
                .set_scan_limit(JPEG_SCAN_LIMIT)
                .map_err(jpeg_error)?;
            *slot = Some(decompressor);
        }
        let decompressor = slot.as_mut().expect("initialised above");
        let header = decompressor.read_header(bytes).map_err(jpeg_error)?;
        check_pixels(header.width as u64, header.height as u64, max_pixels)?;
        let scale = match draft {
            Some(wanted) if jpeg_can_scale(&header) => {
                DecodeScale::for_draft(header.width, header.height, wanted)
            }
            _ => DecodeScale::Full,
        };
        // Set every time: the handle is reused across images.
        decompressor
            .set_scaling_factor(scale.factor())
            .map_err(jpeg_error)?;
        let (width, height) = (scale.apply(header.width), scale.apply(header.height));
        let cmyk = matches!(
            header.colorspace,
            turbojpeg::Colorspace::CMYK | turbojpeg::Colorspace::YCCK
        );
        let (format, channels) = if cmyk {
            (turbojpeg::PixelFormat::CMYK, 4)
        } else {
            (turbojpeg::PixelFormat::RGB, 3)
        };
        let mut pixels = vec![0u8; width * height * channels];
        let output = turbojpeg::Image {
            pixels: pixels.as_mut_slice(),
            width,
            pitch: width * channels,
            height,
            format,
        };
        if let Err(e) = decompressor.decompress(bytes, output) {
            accept_jpeg_warning(e)?;
        }
        if cmyk {
            pixels = cmyk_to_rgb(&pixels);
        }
        Ok(Decoded {
            image: RgbImage::new(width, height, pixels),
            scale,
        })
    })
}

/// TurboJPEG reports libjpeg *warnings* as errors after decoding the whole image. Pillow
/// ignores warnings except running out of data, where it raises "image file is truncated";
/// we do the same: a truncated file is refused, other warnings keep the decoded pixels.
fn accept_jpeg_warning(e: turbojpeg::Error) -> Result<(), DecodeError> {
    let message = e.to_string();
    if message.contains("Premature end of JPEG file") {
        return Err(DecodeError::Corrupt {
            format: "JPEG",
            reason: "the file is truncated".to_owned(),
        });
    }
    if message.contains("Corrupt JPEG data") {
        return Ok(());
    }
    Err(jpeg_error(e))
}

/// Pillow opens CMYK JPEGs as inverted ("CMYK;I", Adobe's convention) and converts to RGB with
/// `cmyk2rgb`: `v = (255 - k) - c * (255 - k) / 255` per channel, with its rounding.
fn cmyk_to_rgb(cmyk: &[u8]) -> Vec<u8> {
    fn muldiv255(a: i32, b: i32) -> i32 {
        let t = a * b + 128;
        ((t >> 8) + t) >> 8
    }
    let mut rgb = Vec::with_capacity(cmyk.len() / 4 * 3);
    for px in cmyk.chunks_exact(4) {
        let nk = i32::from(px[3]); // inverted K: 255 - k
        for &c in &px[..3] {
            let c = 255 - i32::from(c);
            rgb.push((nk - muldiv255(c, nk)).clamp(0, 255) as u8);
        }
    }
    rgb
}

fn image_error(format: ImageFormat, e: image::ImageError) -> DecodeError {
    let reason = match &e {
        image::ImageError::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            "the file is truncated".to_owned()
        }
        _ => e.to_string(),
    };
    DecodeError::Corrupt {
        format: format_name(format),
        reason,
    }
}

fn format_name(format: ImageFormat) -> &'static str {
    match format {
        ImageFormat::Png => "PNG",
        ImageFormat::Gif => "GIF",
        ImageFormat::WebP => "WebP",
        ImageFormat::Bmp => "BMP",
        ImageFormat::Jpeg => "JPEG",
        _ => "image",
    }
}

/// A still WebP through libwebp, the decoder Pillow itself runs (Pillow 13 bundles libwebp 1.6,
/// as `libwebp-sys` 0.14 does), so lossy files give Pillow's pixels by construction; a 12 MP
/// photo decoded in 373 ms through the `image` crate's decoder and 209 through Pillow's.
/// `WebPDecodeRGB` gives the colour channels that Pillow's RGBA decode has before timm's
/// `convert("RGB")` drops alpha. Animated files keep the `image` crate's first frame.
fn decode_webp(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, DecodeError> {
    let corrupt = |reason: String| DecodeError::Corrupt {
        format: "WebP",
        reason,
    };
    // SAFETY: WebPBitstreamFeatures is plain integers (all-zero is valid), and libwebp reads
    // at most `bytes.len()` bytes from the pointer it is given.
    let mut features: libwebp_sys::WebPBitstreamFeatures = unsafe { std::mem::zeroed() };
    let status =
        unsafe { libwebp_sys::WebPGetFeatures(bytes.as_ptr(), bytes.len(), &mut features) };
    if status != libwebp_sys::VP8StatusCode::VP8_STATUS_OK {
        return Err(corrupt(webp_status(status)));
    }
    if features.has_animation != 0 {
        return decode_with_image_crate(bytes, ImageFormat::WebP, max_pixels);
    }
    let (width, height) = (features.width as usize, features.height as usize);
    check_pixels(width as u64, height as u64, max_pixels)?;
    let mut pixels = vec![0u8; width * height * 3];
    // SAFETY: the output buffer is width * height * 3 bytes with a stride of width * 3, which is
    // what libwebp writes for this file's dimensions (it refuses a buffer too small).
    let written = unsafe {
        libwebp_sys::WebPDecodeRGBInto(
            bytes.as_ptr(),
            bytes.len(),
            pixels.as_mut_ptr(),
            pixels.len(),
            (width * 3) as std::ffi::c_int,
        )
    };
    if written.is_null() {
        return Err(corrupt("the file is truncated or corrupt".to_owned()));
    }
    Ok(RgbImage::new(width, height, pixels))
}

fn webp_status(status: libwebp_sys::VP8StatusCode) -> String {
    use libwebp_sys::VP8StatusCode as S;
    match status {
        S::VP8_STATUS_NOT_ENOUGH_DATA => "the file is truncated".to_owned(),
        S::VP8_STATUS_UNSUPPORTED_FEATURE => {
            "it uses a feature libwebp does not support".to_owned()
        }
        S::VP8_STATUS_BITSTREAM_ERROR => "its bitstream is corrupt".to_owned(),
        other => format!("libwebp could not read it ({other:?})"),
    }
}

fn decode_with_image_crate(
    bytes: &[u8],
    format: ImageFormat,
    max_pixels: u64,
) -> Result<RgbImage, DecodeError> {
    let reader = image::ImageReader::with_format(Cursor::new(bytes), format);
    let decoder = reader.into_decoder().map_err(|e| image_error(format, e))?;
    let (width, height) = decoder.dimensions();
    check_pixels(u64::from(width), u64::from(height), max_pixels)?;
    let decoded = DynamicImage::from_decoder(decoder).map_err(|e| image_error(format, e))?;
    Ok(to_rgb(decoded))
}

/// `convert("RGB")`: alpha is dropped (not composited), grey is replicated, and 16-bit samples
/// keep their high byte as Pillow's "RGB;16B" unpacker does.
fn to_rgb(image: DynamicImage) -> RgbImage {
    let (width, height) = (image.width() as usize, image.height() as usize);
    let pixels = match image {
        DynamicImage::ImageRgb8(buf) => buf.into_raw(),
        DynamicImage::ImageRgb16(buf) => buf.into_raw().iter().map(|&v| (v >> 8) as u8).collect(),
        DynamicImage::ImageRgba16(buf) => buf
            .into_raw()
            .chunks_exact(4)
            .flat_map(|p| [(p[0] >> 8) as u8, (p[1] >> 8) as u8, (p[2] >> 8) as u8])
            .collect(),
        other => other.into_rgb8().into_raw(),
    };
    RgbImage::new(width, height, pixels)
}

/// The EXIF orientation, read with the `image` crate's header parsers; `None` when there is
/// nothing to do (no tag, an unreadable one, or "no transforms").
fn exif_orientation(bytes: &[u8], format: ImageFormat) -> Option<Orientation> {
    let orientation = image::ImageReader::with_format(Cursor::new(bytes), format)
        .into_decoder()
        .and_then(|mut d| d.orientation())
        .ok()?;
    (orientation != Orientation::NoTransforms).then_some(orientation)
}

/// Whether `orientation` swaps width and height.
fn transposes(orientation: Orientation) -> bool {
    matches!(
        orientation,
        Orientation::Rotate90
            | Orientation::Rotate270
            | Orientation::Rotate90FlipH
            | Orientation::Rotate270FlipH
    )
}

/// A displayed (width, height) as the image stores it, before `orientation` is applied.
fn as_stored(size: (usize, usize), orientation: Option<Orientation>) -> (usize, usize) {
    match orientation {
        Some(o) if transposes(o) => (size.1, size.0),
        _ => size,
    }
}

/// Rotate/flip `image` as Pillow's `ImageOps.exif_transpose` does.
fn orient(image: RgbImage, orientation: Orientation) -> RgbImage {
    let buffer = image::RgbImage::from_raw(image.width as u32, image.height as u32, image.pixels)
        .expect("buffer matches its dimensions");
    let mut dynamic = DynamicImage::ImageRgb8(buffer);
    dynamic.apply_orientation(orientation);
    let (w, h) = (dynamic.width() as usize, dynamic.height() as usize);
    RgbImage::new(w, h, dynamic.into_rgb8().into_raw())
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPTS: DecodeOptions = DecodeOptions {
        max_pixels: 1 << 24,
        exif_transpose: false,
        draft: None,
    };

    /// Draft decoding for a model whose resize step needs 256 x 256.
    const DRAFT: DecodeOptions = DecodeOptions {
        draft: Some((256, 256)),
        ..OPTS
    };

    /// A `width` x `height` JPEG of a gradient, made by libjpeg-turbo.
    fn jpeg_bytes(
        width: usize,
        height: usize,
        setup: impl Fn(&mut turbojpeg::Compressor),
    ) -> Vec<u8> {
        let pixels: Vec<u8> = (0..width * height)
            .flat_map(|i| [(i % width) as u8, (i / width) as u8, 90])
            .collect();
        let image = turbojpeg::Image {
            pixels: pixels.as_slice(),
            width,
            pitch: width * 3,
            height,
            format: turbojpeg::PixelFormat::RGB,
        };
        let mut compressor = turbojpeg::Compressor::new().unwrap();
        setup(&mut compressor);
        compressor.compress_to_vec(image).unwrap()
    }

    fn png_bytes(width: u32, height: u32) -> Vec<u8> {
        let img = image::RgbImage::from_fn(width, height, |x, y| image::Rgb([x as u8, y as u8, 7]));
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, ImageFormat::Png).unwrap();
        out.into_inner()
    }

    #[test]
    fn decodes_png_pixels() {
        let decoded = decode(&png_bytes(3, 2), &OPTS).unwrap();
        assert_eq!(decoded.scale, DecodeScale::Full);
        let img = decoded.image;
        assert_eq!((img.width, img.height), (3, 2));
        assert_eq!(&img.pixels[3..6], &[1, 0, 7]);
    }

    #[test]
    fn refuses_empty_text_and_unknown() {
        assert_eq!(decode(b"", &OPTS), Err(DecodeError::Empty));
        let err = decode(b"hello, this is not an image", &OPTS).unwrap_err();
        assert!(err.to_string().contains("looks like text"), "{err}");
        assert!(err.to_string().contains("JPEG, PNG"), "{err}");
    }

    #[test]
    fn refuses_too_many_pixels_before_decoding() {
        let opts = DecodeOptions {
            max_pixels: 5,
            ..OPTS
        };
        match decode(&png_bytes(3, 2), &opts) {
            Err(DecodeError::TooManyPixels {
                pixels: 6,
                limit: 5,
                ..
            }) => {}
            other => panic!("expected TooManyPixels, got {other:?}"),
        }
    }

    #[test]
    fn refuses_extreme_aspect_ratios_before_decoding() {
        assert!(matches!(
            decode(&png_bytes(202, 2), &OPTS),
            Err(DecodeError::AspectRatio {
                width: 202,
                height: 2
            })
        ));
        assert!(decode(&png_bytes(200, 2), &OPTS).is_ok());
    }

    /// A `width` x `height` WebP of a gradient, made by libwebp (lossy at quality 90, or lossless).
    fn webp_bytes(width: usize, height: usize, lossless: bool) -> Vec<u8> {
        let pixels: Vec<u8> = (0..width * height)
            .flat_map(|i| [(i % width) as u8, (i / width) as u8, 90])
            .collect();
        let (w, h, stride) = (width as i32, height as i32, (width * 3) as i32);
        let mut out: *mut u8 = std::ptr::null_mut();
        // SAFETY: `pixels` holds height rows of `stride` bytes; libwebp allocates `out`, which is
        // copied and then freed with WebPFree.
        unsafe {
            let size = if lossless {
                libwebp_sys::WebPEncodeLosslessRGB(pixels.as_ptr(), w, h, stride, &mut out)
            } else {
                libwebp_sys::WebPEncodeRGB(pixels.as_ptr(), w, h, stride, 90.0, &mut out)
            };
            assert!(size > 0, "libwebp encoded nothing");
            let bytes = std::slice::from_raw_parts(out, size).to_vec();
            libwebp_sys::WebPFree(out.cast());
            bytes
        }
    }

    #[test]
    fn decodes_webp_with_libwebp() {
        let lossless = decode(&webp_bytes(40, 30, true), &OPTS).unwrap().image;
        assert_eq!((lossless.width, lossless.height), (40, 30));
        assert_eq!(&lossless.pixels[3 * 41..3 * 42], &[1, 1, 90]);
        let lossy = decode(&webp_bytes(40, 30, false), &OPTS).unwrap().image;
        assert_eq!((lossy.width, lossy.height), (40, 30));
        let near = |a: u8, b: u8| a.abs_diff(b) <= 8;
        let pixel = &lossy.pixels[3 * (10 * 40 + 20)..3 * (10 * 40 + 21)];
        assert!(
            near(pixel[0], 20) && near(pixel[1], 10) && near(pixel[2], 90),
            "{pixel:?}"
        );
    }

    #[test]
    fn webp_is_checked_before_decoding_and_refused_when_broken() {
        let bytes = webp_bytes(40, 30, false);
        let small = DecodeOptions {
            max_pixels: 1000,
            ..OPTS
        };
        assert!(matches!(
            decode(&bytes, &small),
            Err(DecodeError::TooManyPixels { pixels: 1200, .. })
        ));
        let err = decode(&bytes[..bytes.len() - 40], &OPTS).unwrap_err();
        assert!(
            matches!(err, DecodeError::Corrupt { format: "WebP", .. }),
            "{err:?}"
        );
        let err = decode(&bytes[..20], &OPTS).unwrap_err();
        assert!(
            matches!(err, DecodeError::Corrupt { format: "WebP", .. }),
            "{err:?}"
        );
    }

    #[test]
    fn truncated_png_is_corrupt() {
        let bytes = png_bytes(64, 64);
        let err = decode(&bytes[..bytes.len() / 2], &OPTS).unwrap_err();
        assert!(
            matches!(err, DecodeError::Corrupt { format: "PNG", .. }),
            "{err:?}"
        );
    }

    #[test]
    fn cmyk_conversion_matches_pillow_formula() {
        // Inverted storage: raw 255 means no ink. No ink and no black is white.
        assert_eq!(cmyk_to_rgb(&[255, 255, 255, 255]), vec![255, 255, 255]);
        // Full black (inverted k = 0) is black whatever the inks.
        assert_eq!(cmyk_to_rgb(&[10, 200, 255, 0]), vec![0, 0, 0]);
        // Full cyan ink, no black: red channel 0, others 255.
        assert_eq!(cmyk_to_rgb(&[0, 255, 255, 255]), vec![0, 255, 255]);
    }

    #[test]
    fn draft_scale_is_pillows() {
        // min(w // 256, h // 256), then the largest of 8, 4, 2 that fits.
        assert_eq!(
            DecodeScale::for_draft(4032, 3024, (256, 256)),
            DecodeScale::Eighth
        );
        assert_eq!(
            DecodeScale::for_draft(2048, 2048, (256, 256)),
            DecodeScale::Eighth
        );
        assert_eq!(
            DecodeScale::for_draft(2047, 4000, (256, 256)),
            DecodeScale::Quarter
        );
        assert_eq!(
            DecodeScale::for_draft(1024, 600, (256, 256)),
            DecodeScale::Half
        );
        assert_eq!(
            DecodeScale::for_draft(511, 4000, (256, 256)),
            DecodeScale::Full
        );
        assert_eq!(
            DecodeScale::for_draft(100, 100, (256, 256)),
            DecodeScale::Full
        );
        // Each side against its own target.
        assert_eq!(
            DecodeScale::for_draft(2000, 600, (100, 300)),
            DecodeScale::Half
        );
        assert_eq!(
            DecodeScale::for_draft(2000, 600, (300, 100)),
            DecodeScale::Quarter
        );
        // Sides round up, as libjpeg's TJSCALED.
        assert_eq!(DecodeScale::Eighth.apply(4033), 505);
    }

    #[test]
    fn draft_decodes_large_jpegs_smaller_and_leaves_the_rest() {
        let big = jpeg_bytes(1030, 700, |_| {});
        let exact = decode(&big, &OPTS).unwrap();
        assert_eq!(exact.scale, DecodeScale::Full);
        assert_eq!((exact.image.width, exact.image.height), (1030, 700));
        // min(1030 // 256, 700 // 256) = 2: half size, rounded up.
        let draft = decode(&big, &DRAFT).unwrap();
        assert_eq!(draft.scale, DecodeScale::Half);
        assert_eq!((draft.image.width, draft.image.height), (515, 350));
        // The decoder handle is reused: the next image is whole again.
        assert_eq!(decode(&big, &OPTS).unwrap(), exact);
        let small = jpeg_bytes(500, 333, |_| {});
        assert_eq!(decode(&small, &DRAFT).unwrap().scale, DecodeScale::Full);
        // Not a JPEG: decoded whole.
        assert_eq!(
            decode(&png_bytes(1030, 700), &DRAFT).unwrap().scale,
            DecodeScale::Full
        );
    }

    #[test]
    fn lossless_jpegs_are_decoded_whole() {
        let lossless = jpeg_bytes(600, 600, |c| c.set_lossless(true).unwrap());
        let decoded = decode(&lossless, &DRAFT).unwrap();
        assert_eq!(decoded.scale, DecodeScale::Full);
        assert_eq!(
            decode_memory(&lossless, &DRAFT),
            Some(600 * 600 * DECODE_BYTES_PER_PIXEL)
        );
    }

    #[test]
    fn the_pixel_limit_applies_to_the_stored_size() {
        let big = jpeg_bytes(1030, 700, |_| {});
        let opts = DecodeOptions {
            max_pixels: 1030 * 700 - 1,
            ..DRAFT
        };
        assert!(matches!(
            decode(&big, &opts),
            Err(DecodeError::TooManyPixels { .. })
        ));
    }

    #[test]
    fn memory_counts_what_is_decoded() {
        let big = jpeg_bytes(1030, 700, |_| {});
        assert_eq!(
            decode_memory(&big, &OPTS),
            Some(1030 * 700 * DECODE_BYTES_PER_PIXEL)
        );
        assert_eq!(
            decode_memory(&big, &DRAFT),
            Some(515 * 350 * DECODE_BYTES_PER_PIXEL)
        );
        // A progressive JPEG keeps every coefficient at full size: 4:2:0 is 3 bytes a pixel.
        let progressive = jpeg_bytes(1030, 700, |c| {
            c.set_progressive(true).unwrap();
            c.set_subsamp(turbojpeg::Subsamp::Sub2x2).unwrap();
        });
        assert_eq!(
            decode_memory(&progressive, &DRAFT),
            Some(515 * 350 * DECODE_BYTES_PER_PIXEL + 1030 * 700 * 3)
        );
        // With EXIF orientation on, the orientation is not read yet: the larger count is taken.
        let tall_target = DecodeOptions {
            exif_transpose: true,
            draft: Some((100, 300)),
            ..OPTS
        };
        let wide = jpeg_bytes(2000, 600, |_| {});
        assert_eq!(
            decode_memory(&wide, &tall_target),
            Some(1000 * 300 * DECODE_BYTES_PER_PIXEL)
        );
    }

    #[test]
    fn the_draft_target_is_turned_with_the_image() {
        assert_eq!(
            as_stored((100, 300), Some(Orientation::Rotate90)),
            (300, 100)
        );
        assert_eq!(
            as_stored((100, 300), Some(Orientation::Rotate270FlipH)),
            (300, 100)
        );
        assert_eq!(
            as_stored((100, 300), Some(Orientation::Rotate180)),
            (100, 300)
        );
        assert_eq!(as_stored((100, 300), None), (100, 300));
    }
}
