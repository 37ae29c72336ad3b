//! Decode and preprocess cost per image (single thread), for the test photos.
//!
//!     make test-data && cargo bench --bench preprocess
//!
//! Prints one row per photo: decode and resize+crop milliseconds (median of repeated runs).

use std::path::PathBuf;
use std::time::Instant;
use visionserve::pipeline::decode::{decode, DecodeOptions};
use visionserve::pipeline::preprocess::{preprocess, CropMode, PreprocessConfig};
use visionserve::pipeline::resize::Filter;

fn median_ms(mut f: impl FnMut(), runs: usize) -> f64 {
    let mut times: Vec<f64> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[runs / 2]
}

fn main() {
    let data = std::env::var_os("VISIONSERVE_TEST_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/test-data"));
    let cfg = PreprocessConfig {
        input_size: (224, 224),
        interpolation: Filter::Bicubic,
        crop_pct: 0.875,
        crop_mode: CropMode::Center,
        mean: [0.5; 3],
        std: [0.5; 3],
    };
    let opts = DecodeOptions {
        max_pixels: 100_000_000,
        exif_transpose: false,
    };
    println!("| photo | size | decode ms | resize+crop ms |");
    println!("|---|---|---|---|");
    for photo in [
        "chelsea.jpg",
        "rocket.jpg",
        "astronaut.png",
        "hubble_deep_field.jpg",
        "retina.jpg",
    ] {
        let bytes =
            std::fs::read(data.join("photos").join(photo)).expect("run `make test-data` first");
        let image = decode(&bytes, &opts).unwrap();
        let decode_ms = median_ms(|| drop(decode(&bytes, &opts).unwrap()), 31);
        let resize_ms = median_ms(|| drop(preprocess(&image, &cfg)), 31);
        println!(
            "| {photo} | {}x{} | {decode_ms:.2} | {resize_ms:.2} |",
            image.width, image.height
        );
    }
}
