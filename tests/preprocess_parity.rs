//! Decode + resize + crop must give exactly the u8 pixels of timm's eval transform on Pillow
//! (before ToTensor/Normalize), for every photo and every preprocessing variant the checkpoints
//! use; with `--jpeg-draft`, exactly those of Pillow's `Image.draft` before the same transform.
//! References: tests/fixtures/make_test_data.py.

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
        jpeg_draft: false,
    }
}

/// How many of `got`'s values differ from `want`, and by how much at most.
fn differences(got: &[u8], want: &[u8]) -> (usize, u8) {
    got.iter()
        .zip(want)
        .filter(|(a, b)| a != b)
        .fold((0, 0), |(count, max), (a, b)| {
            (count + 1, max.max(a.abs_diff(*b)))
        })
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
        draft: None,
    };
    let mut failures = Vec::new();
    for case in cases {
        let photo = case["photo"].as_str().unwrap();
        let cfg = config(&case["config"]);
        let want = read(case["file"].as_str().unwrap());
        let image = decode(&read(&format!("photos/{photo}")), &opts)
            .unwrap_or_else(|e| panic!("{photo}: {e}"))
            .image;
        let got = preprocess(&image, &cfg);
        assert_eq!(
            (got.height, got.width),
            (
                case["height"].as_u64().unwrap() as usize,
                case["width"].as_u64().unwrap() as usize
            )
        );
        let (differing, max) = differences(&got.pixels, &want);
        if differing > 0 {
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

/// `--jpeg-draft`: each large JPEG is decoded at the DCT scale Pillow's `draft` picks for the
/// model's resize size (turned with the image under `--exif-transpose`), to the same pixels,
/// and the transform after it gives the same crop, for every config and chroma layout.
#[test]
fn draft_pixels_are_identical_to_pillow_draft() {
    let index = json("draft.json");
    let cases = index.as_array().unwrap();
    assert!(
        cases.len() >= 60,
        "expected the full draft set, got {}",
        cases.len()
    );
    let mut failures = Vec::new();
    let mut scales = std::collections::BTreeSet::new();
    for case in cases {
        let photo = case["photo"].as_str().unwrap();
        let cfg = PreprocessConfig {
            jpeg_draft: true,
            ..config(&case["config"])
        };
        let opts = cfg.decode_options(DecodeOptions {
            max_pixels: 100_000_000,
            exif_transpose: case["exif_transpose"].as_bool().unwrap(),
            draft: None,
        });
        let decoded = decode(&read(photo), &opts).unwrap_or_else(|e| panic!("{photo}: {e}"));
        let scale = decoded.scale.denominator() as u64;
        scales.insert(scale);
        let label = format!("{photo} {} exif={}", case["config"], case["exif_transpose"]);
        if scale != case["scale"].as_u64().unwrap() {
            failures.push(format!(
                "{label}: decoded at 1/{scale}, Pillow at 1/{}",
                case["scale"]
            ));
            continue;
        }
        let got = preprocess(&decoded.image, &cfg);
        let (differing, max) = differences(&got.pixels, &read(case["file"].as_str().unwrap()));
        if differing > 0 {
            failures.push(format!("{label}: {differing} values differ (max {max})"));
        }
    }
    assert_eq!(
        scales.into_iter().collect::<Vec<_>>(),
        [1, 2, 4, 8],
        "every scale is covered"
    );
    assert!(
        failures.is_empty(),
        "{} of {} draft cases differ:\n{}",
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
            draft: None,
        },
    )
    .unwrap()
    .image;
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
            draft: None,
        },
    )
    .unwrap()
    .image;
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
