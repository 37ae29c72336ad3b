//! Decode + resize + crop must give exactly the u8 pixels of timm's eval transform on Pillow
//! (before ToTensor/Normalize), for every photo and every preprocessing variant the checkpoints
//! use. References: tests/fixtures/make_test_data.py.

mod common;

use common::*;
use visionserve::images::decode::{decode, DecodeOptions};
use visionserve::images::preprocess::{preprocess, CropMode, PreprocessConfig};
use visionserve::images::resize::Filter;

fn config(value: &serde_json::Value) -> PreprocessConfig {
    let size = value["input_size"].as_array().unwrap();
    PreprocessConfig {
        input_size: (
            size[1].as_u64().unwrap() as usize,
            size[2].as_u64().unwrap() as usize,
        ),
        interpolation: match value["interpolation"].as_str().unwrap() {
            "bicubic" => Filter::Bicubic,
            "bilinear" => Filter::Bilinear,
            other => panic!("interpolation {other}"),
        },
        crop_pct: value["crop_pct"].as_f64().unwrap(),
        crop_mode: match value["crop_mode"].as_str().unwrap() {
            "center" => CropMode::Center,
            "squash" => CropMode::Squash,
            other => panic!("crop_mode {other}"),
        },
        mean: [0.5; 3],
        std: [0.5; 3],
    }
}

#[test]
fn pixels_are_identical_to_timm_on_pillow() {
    let index = json("preprocess.json");
    let cases = index.as_array().unwrap();
    assert!(
        cases.len() >= 100,
        "expected the full reference set, got {}",
        cases.len()
    );
    let opts = DecodeOptions {
        max_pixels: 100_000_000,
        exif_transpose: false,
    };
    let mut failures = Vec::new();
    for case in cases {
        let photo = case["photo"].as_str().unwrap();
        let cfg = config(&case["config"]);
        let want = read(case["file"].as_str().unwrap());
        let image = decode(&read(&format!("photos/{photo}")), &opts)
            .unwrap_or_else(|e| panic!("{photo}: {e}"));
        let got = preprocess(&image, &cfg);
        assert_eq!(
            (got.height, got.width),
            (
                case["height"].as_u64().unwrap() as usize,
                case["width"].as_u64().unwrap() as usize
            )
        );
        let differing = got.pixels.iter().zip(&want).filter(|(a, b)| a != b).count();
        if differing > 0 {
            let max = got
                .pixels
                .iter()
                .zip(&want)
                .map(|(a, b)| a.abs_diff(*b))
                .max()
                .unwrap();
            failures.push(format!(
                "{photo} {}: {differing} values differ (max {max})",
                case["config"]
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// `--exif-transpose` rotates as Pillow's `ImageOps.exif_transpose` does; without it the EXIF
/// tag is ignored, as timm ignores it.
#[test]
fn exif_orientation_is_applied_only_when_asked() {
    let jpeg = read("exif/orientation6.jpg");
    let want = json("exif/orientation6.json");
    let plain = decode(
        &jpeg,
        &DecodeOptions {
            max_pixels: 100_000_000,
            exif_transpose: false,
        },
    )
    .unwrap();
    assert_eq!(
        (plain.width, plain.height),
        (451, 300),
        "EXIF ignored by default"
    );
    let rotated = decode(
        &jpeg,
        &DecodeOptions {
            max_pixels: 100_000_000,
            exif_transpose: true,
        },
    )
    .unwrap();
    assert_eq!(
        (rotated.width as u64, rotated.height as u64),
        (
            want["width"].as_u64().unwrap(),
            want["height"].as_u64().unwrap()
        )
    );
    assert_eq!(
        rotated.pixels,
        read("exif/orientation6.transposed.bin"),
        "same pixels as Pillow's exif_transpose"
    );
}
