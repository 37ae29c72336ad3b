//! Decode request bytes into 8-bit RGB, as `PIL.Image.open(f).convert("RGB")` would.
//!
//! The format is sniffed from the bytes, never trusted from the Content-Type. JPEG goes through
//! libjpeg-turbo (the `turbojpeg` crate), the decoder Pillow bundles, which makes the pixels
//! bit-identical to Pillow's (the `image` crate's zune-jpeg differs by up to 11 levels). PNG,
//! GIF (first frame), WebP and BMP go through the `image` crate. Every image's dimensions are
//! read from its header and checked against the pixel limit before any pixel is decoded, so a
//! decompression bomb is refused without allocating for it.

use super::resize::RgbImage;
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
pub fn decode(bytes: &[u8], opts: &DecodeOptions) -> Result<RgbImage, DecodeError> {
    if bytes.is_empty() {
        return Err(DecodeError::Empty);
    }
    let format = image::guess_format(bytes).map_err(|_| DecodeError::Unsupported {
        detected: describe_unknown(bytes),
    })?;
    let image = match format {
        ImageFormat::Jpeg => decode_jpeg(bytes, opts.max_pixels)?,
        ImageFormat::Png | ImageFormat::Gif | ImageFormat::WebP | ImageFormat::Bmp => {
            decode_with_image_crate(bytes, format, opts.max_pixels)?
        }
        other => {
            return Err(DecodeError::Unsupported {
                detected: format!(" ({other:?})"),
            })
        }
    };
    if opts.exif_transpose {
        Ok(apply_exif_orientation(bytes, format, image))
    } else {
        Ok(image)
    }
}

/// Bytes decoding an image may hold at once, per pixel: the decoder's buffer (up to 4 channels:
/// RGBA, CMYK) and the RGB image converted from it (3); resizing then needs less than that.
pub const DECODE_BYTES_PER_PIXEL: u64 = 7;

/// The most memory decoding `bytes` can take, from the image's header alone (`None` if the
/// header cannot be read: decoding will fail and say why). Images over `max_pixels` are
/// refused before decoding, so they count as that limit.
pub fn decode_memory(bytes: &[u8], max_pixels: u64) -> Option<u64> {
    let format = image::guess_format(bytes).ok()?;
    let (width, height) = match format {
        ImageFormat::Jpeg => {
            let header = turbojpeg::read_header(bytes).ok()?;
            (header.width as u64, header.height as u64)
        }
        _ => {
            let reader = image::ImageReader::with_format(Cursor::new(bytes), format);
            let (w, h) = reader.into_dimensions().ok()?;
            (u64::from(w), u64::from(h))
        }
    };
    Some(width.saturating_mul(height).min(max_pixels) * DECODE_BYTES_PER_PIXEL)
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

fn decode_jpeg(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, DecodeError> {
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
        let cmyk = matches!(
            header.colorspace,
            turbojpeg::Colorspace::CMYK | turbojpeg::Colorspace::YCCK
        );
        let (format, channels) = if cmyk {
            (turbojpeg::PixelFormat::CMYK, 4)
        } else {
            (turbojpeg::PixelFormat::RGB, 3)
        };
        let mut pixels = vec![0u8; header.width * header.height * channels];
        let output = turbojpeg::Image {
            pixels: pixels.as_mut_slice(),
            width: header.width,
            pitch: header.width * channels,
            height: header.height,
            format,
        };
        if let Err(e) = decompressor.decompress(bytes, output) {
            accept_jpeg_warning(e)?;
        }
        if cmyk {
            pixels = cmyk_to_rgb(&pixels);
        }
        Ok(RgbImage::new(header.width, header.height, pixels))
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

/// Read the EXIF orientation with the `image` crate's header parsers and apply it.
fn apply_exif_orientation(bytes: &[u8], format: ImageFormat, image: RgbImage) -> RgbImage {
    let orientation = image::ImageReader::with_format(Cursor::new(bytes), format)
        .into_decoder()
        .and_then(|mut d| d.orientation());
    let Ok(orientation) = orientation else {
        return image;
    };
    if orientation == image::metadata::Orientation::NoTransforms {
        return image;
    }
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
    };

    fn png_bytes(width: u32, height: u32) -> Vec<u8> {
        let img = image::RgbImage::from_fn(width, height, |x, y| image::Rgb([x as u8, y as u8, 7]));
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, ImageFormat::Png).unwrap();
        out.into_inner()
    }

    #[test]
    fn decodes_png_pixels() {
        let img = decode(&png_bytes(3, 2), &OPTS).unwrap();
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
}
