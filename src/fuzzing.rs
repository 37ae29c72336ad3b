//! Entry points for the `cargo fuzz` targets in `fuzz/` (feature `fuzzing`, off in every other
//! build). Each runs one path that untrusted bytes take through the server, exactly as a
//! request would, and must return without panicking, whatever the input.

use crate::http::{self, RequestLimits};
use crate::images::decode::{decode_memory, DecodeOptions};
use crate::images::preprocess::{CropMode, PreprocessConfig};
use crate::images::resize::Filter;
use crate::images::{self, DecodePool};
use std::sync::OnceLock;
use std::time::Duration;

/// Small enough that a fuzzer's huge-header inputs are refused quickly, as the server's limit
/// refuses real ones.
const MAX_PIXELS: u64 = 4_000_000;

/// The image path: format sniffing, header checks, decoding (whole, or drafted for JPEGs),
/// resizing and cropping, for both of timm's resamplers and crop modes (chosen by the first
/// byte).
pub fn image(data: &[u8]) {
    let Some((&selector, bytes)) = data.split_first() else {
        return;
    };
    let config = PreprocessConfig {
        input_size: (224, 224),
        interpolation: if selector & 1 == 0 {
            Filter::Bicubic
        } else {
            Filter::Bilinear
        },
        crop_pct: if selector & 2 == 0 { 0.875 } else { 1.0 },
        crop_mode: if selector & 4 == 0 {
            CropMode::Center
        } else {
            CropMode::Squash
        },
        mean: [0.485, 0.456, 0.406],
        std: [0.229, 0.224, 0.225],
        jpeg_draft: selector & 16 != 0,
    };
    let options = config.decode_options(DecodeOptions {
        max_pixels: MAX_PIXELS,
        exif_transpose: selector & 8 != 0,
        draft: None,
    });
    let _ = decode_memory(bytes, &options);
    if let Ok(prepared) = images::prepare(bytes, &options, &config) {
        match prepared.pixels {
            images::Pixels::Rgb8(pixels) => assert_eq!(pixels.len(), config.image_bytes()),
            images::Pixels::Normalized(_) => unreachable!("prepare yields u8 pixels"),
        }
    }
}

/// A `/v1` request body as `read_images` takes it: the first byte picks the content type
/// (raw, JSON or multipart with a fixed boundary), the rest is the body.
pub fn v1_body(data: &[u8]) {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let content_type = match selector % 3 {
        0 => "application/octet-stream",
        1 => "application/json",
        _ => "multipart/form-data; boundary=fuzz",
    };
    runtime().block_on(http::fuzz_read_images(
        content_type,
        body.to_vec(),
        limits(),
        pool(),
    ));
}

/// A v2 REST inference body: the first two bytes give the JSON header's length
/// (`Inference-Header-Content-Length`), the rest is the body.
pub fn v2_body(data: &[u8]) {
    if data.len() < 2 {
        return;
    }
    let split = usize::from(u16::from_le_bytes([data[0], data[1]]));
    http::fuzz_parse_v2(bytes::Bytes::copy_from_slice(&data[2..]), split);
}

fn limits() -> RequestLimits {
    RequestLimits {
        max_images_per_request: 32,
        max_body_bytes: 1 << 20,
        body_timeout: Duration::from_secs(5),
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
    })
}

fn pool() -> &'static DecodePool {
    static POOL: OnceLock<DecodePool> = OnceLock::new();
    POOL.get_or_init(|| DecodePool::new(1))
}
