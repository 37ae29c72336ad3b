//! Native architectures against their reference implementation: checkpoints written by timm
//! (Hub layout) or torchvision with seeded random weights and randomised norm statistics, the
//! same input through both, top-5 identical and max |diff| / max |logit| <= 1e-4 in f32 on
//! CPU, at an even and an odd input size (tests/fixtures/make_parity.py). The embeddings (timm's
//! `forward_head(x, pre_logits=True)`) are held to the same relative tolerance.

mod common;

use common::parity_data;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};
use visionserve::models::{self, Classifier};
use visionserve::repository::{ModelFiles, ModelOptions};

const TOLERANCE: f64 = 1e-4;

struct Outcome {
    unit: String,
    size: i64,
    max_rel: f64,
    /// The same for the embeddings; `None` for units with no timm reference (torchvision).
    embeddings_rel: Option<f64>,
    same_top5: bool,
}

/// max |got - want| / max |want|.
fn relative_difference(got: &Tensor, want: &Tensor) -> f64 {
    assert_eq!(got.size(), want.size());
    let max_diff = (got - want).abs().max().double_value(&[]);
    max_diff / want.abs().max().double_value(&[])
}

fn load_unit(unit: &Path, meta: &serde_json::Value) -> Box<dyn Classifier> {
    let architecture = meta["architecture"].as_str().unwrap();
    let (source, arch) = match meta["weights"].as_str() {
        Some(file) => (unit.join(file), Some(architecture)),
        None => (unit.to_path_buf(), None),
    };
    let files = ModelFiles::locate_with(&source, arch).unwrap();
    let config = files.config.resolve(&ModelOptions::default()).unwrap();
    assert_eq!(
        config.num_classes as u64,
        meta["num_classes"].as_u64().unwrap(),
        "{}",
        unit.display()
    );
    assert_eq!(
        config.labels.len(),
        config.num_classes,
        "every class has a label"
    );
    models::load(
        &files,
        config.num_classes,
        config.preprocess.input_size,
        Device::Cpu,
        Kind::Float,
    )
    .unwrap_or_else(|e| panic!("{}: {e:#}", unit.display()))
}

fn top5(logits: &Tensor) -> Vec<i64> {
    Vec::<i64>::try_from(logits.topk(5, -1, true, true).1.flatten(0, -1)).unwrap()
}

fn check_unit(unit: &Path) -> Vec<Outcome> {
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(unit.join("meta.json")).unwrap()).unwrap();
    let model = load_unit(unit, &meta);
    let references: std::collections::HashMap<String, Tensor> =
        Tensor::read_safetensors(unit.join("reference.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    let _guard = tch::no_grad_guard();
    meta["sizes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|size| {
            let size = size.as_i64().unwrap();
            let input = &references[&format!("input_{size}")];
            let want = &references[&format!("logits_{size}")];
            let input = if model.wants_channels_last() {
                models::layers::channels_last(input.shallow_clone()).unwrap()
            } else {
                input.shallow_clone()
            };
            let got = model.forward_with_embeddings(&input).unwrap();
            let embeddings_rel = references
                .get(&format!("pre_logits_{size}"))
                .map(|want| relative_difference(got.embeddings.as_ref().unwrap(), want));
            Outcome {
                unit: meta["name"].as_str().unwrap().to_owned(),
                size,
                max_rel: relative_difference(&got.logits, want),
                embeddings_rel,
                same_top5: top5(&got.logits) == top5(want),
            }
        })
        .collect()
}

/// Check every unit of a family, and that every native preset of it has a unit.
fn check_family(family: &str, presets: &[&str]) {
    visionserve::backend::device::flush_denormals();
    let root = parity_data().join(family);
    let mut units: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("{}: {e}", root.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("meta.json").is_file())
        .collect();
    units.sort();
    let names: Vec<String> = units
        .iter()
        .map(|u| u.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    // Presets the fast fixtures leave to `make test-all`, by design (make_parity.py).
    let skipped: serde_json::Value = std::fs::read(root.join("skipped.json"))
        .map(|b| serde_json::from_slice(&b).unwrap())
        .unwrap_or_default();
    let missing: Vec<&&str> = presets
        .iter()
        .filter(|p| !names.iter().any(|n| n == *p) && skipped.get(**p).is_none())
        .collect();
    assert!(missing.is_empty(), "no parity fixture for {missing:?}");
    if let Some(skipped) = skipped.as_object().filter(|s| !s.is_empty()) {
        println!(
            "left to `make test-all`: {:?}",
            skipped.keys().collect::<Vec<_>>()
        );
    }

    let mut failures = Vec::new();
    let mut embeddings_checked = 0;
    for unit in &units {
        for o in check_unit(unit) {
            embeddings_checked += usize::from(o.embeddings_rel.is_some());
            let embeddings = o
                .embeddings_rel
                .map_or("-".to_owned(), |rel| format!("{rel:.2e}"));
            println!(
                "{:<28} {:>4}px  max|diff|/max|logit| = {:.2e}  embeddings {embeddings}  top-5 {}",
                o.unit,
                o.size,
                o.max_rel,
                if o.same_top5 { "same" } else { "DIFFERENT" }
            );
            let embeddings_ok = o.embeddings_rel.is_none_or(|rel| rel <= TOLERANCE);
            if !(o.max_rel <= TOLERANCE && o.same_top5 && embeddings_ok) {
                failures.push(format!(
                    "{} at {}px: rel {:.2e}, embeddings rel {embeddings}, top-5 same: {}",
                    o.unit, o.size, o.max_rel, o.same_top5
                ));
            }
        }
    }
    assert!(
        embeddings_checked > 0,
        "no {family} unit has timm's embeddings (pre_logits_<size>): regenerate the fixtures"
    );
    assert!(
        failures.is_empty(),
        "parity failures:\n{}",
        failures.join("\n")
    );
}

#[test]
fn efficientnet_family_matches_timm_and_torchvision() {
    let presets: Vec<&str> = models::efficientnet::PRESETS
        .iter()
        .map(|(n, _)| *n)
        .collect();
    check_family("efficientnet", &presets);
}

#[test]
fn coatnet_family_matches_timm() {
    let presets: Vec<&str> = models::coatnet::PRESETS.iter().map(|(n, _)| *n).collect();
    check_family("coatnet", &presets);
}
