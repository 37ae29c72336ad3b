//! Native architectures against their reference implementation: checkpoints written by timm
//! (Hub layout) or torchvision with seeded random weights and randomised norm statistics, the
//! same input through both, top-5 identical and max |diff| / max |logit| <= 1e-4 in f32 on
//! CPU, at an even and an odd input size (tests/fixtures/make_parity.py). The embeddings (timm's
//! `forward_head(x, pre_logits=True)`) are held to the same relative tolerance.
//!
//! Each family is checked on both backends: `torch` (the model's forward pass run eagerly on
//! libtorch) and `openvino` (the same description recorded as an ONNX graph and compiled by
//! OpenVINO, through the backend's own runner).

mod common;

use common::parity_data;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};
use visionserve::backend::openvino::OpenVinoPrep;
use visionserve::backend::runner::Runner;
use visionserve::backend::spec::WorkerSpec;
use visionserve::batching::Outputs;
use visionserve::config::Backend;
use visionserve::images::Pixels;
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

/// A unit's files, its config checked against its meta.json.
fn unit_files(
    unit: &Path,
    meta: &serde_json::Value,
) -> (ModelFiles, visionserve::repository::ModelConfig) {
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
    (files, config)
}

fn load_unit(unit: &Path, meta: &serde_json::Value) -> Box<dyn Classifier> {
    let (files, config) = unit_files(unit, meta);
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

/// What a unit's model gives for one input: its logits and embeddings.
type LogitsAndEmbeddings = (Tensor, Tensor);

/// A unit's model on one backend: an input of a size to its outputs.
type RunUnit = Box<dyn FnMut(i64, &Tensor) -> LogitsAndEmbeddings>;

fn check_unit(unit: &Path, backend: Backend) -> Vec<Outcome> {
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(unit.join("meta.json")).unwrap()).unwrap();
    let references: std::collections::HashMap<String, Tensor> =
        Tensor::read_safetensors(unit.join("reference.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    let _guard = tch::no_grad_guard();
    let mut run: RunUnit = match backend {
        Backend::Openvino => {
            let (files, config) = unit_files(unit, &meta);
            Box::new(move |size, input| run_openvino(&files, &config, size, input))
        }
        _ => {
            let model = load_unit(unit, &meta);
            Box::new(move |_, input| {
                let input = if model.wants_channels_last() {
                    models::layers::channels_last(input.shallow_clone()).unwrap()
                } else {
                    input.shallow_clone()
                };
                let got = model.forward_with_embeddings(&input).unwrap();
                (got.logits, got.embeddings.unwrap())
            })
        }
    };
    meta["sizes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|size| {
            let size = size.as_i64().unwrap();
            let input = &references[&format!("input_{size}")];
            let want = &references[&format!("logits_{size}")];
            let (logits, embeddings) = run(size, input);
            let embeddings_rel = references
                .get(&format!("pre_logits_{size}"))
                .map(|want| relative_difference(&embeddings, want));
            Outcome {
                unit: meta["name"].as_str().unwrap().to_owned(),
                size,
                max_rel: relative_difference(&logits, want),
                embeddings_rel,
                same_top5: top5(&logits) == top5(want),
            }
        })
        .collect()
}

/// `input` (`[n, 3, size, size]`, normalised) through the openvino backend's own runner, as
/// the server runs it: the model's ONNX graph compiled by OpenVINO for this size.
fn run_openvino(
    files: &ModelFiles,
    config: &visionserve::repository::ModelConfig,
    size: i64,
    input: &Tensor,
) -> LogitsAndEmbeddings {
    let mut preprocess = config.preprocess.clone();
    preprocess.input_size = (size as usize, size as usize);
    let spec = WorkerSpec {
        name: config.architecture.clone(),
        files: files.clone(),
        preprocess,
        num_classes: config.num_classes,
        device: Device::Cpu,
        kind: Kind::Float,
        max_batch_size: 1,
        backend: Backend::Openvino,
    };
    let runner = Runner::load(&spec, 2, &OpenVinoPrep::default())
        .unwrap_or_else(|e| panic!("{}: {e:#}", spec.name));
    let n = input.size()[0];
    let images: Vec<Pixels> = (0..n)
        .map(|i| Pixels::Normalized(Vec::<f32>::try_from(input.get(i).flatten(0, -1)).unwrap()))
        .collect();
    let outputs = Outputs {
        top_k: 0,
        probabilities: false,
        logits: true,
        embeddings: true,
    };
    let predictions = runner
        .run(&images.iter().collect::<Vec<_>>(), outputs)
        .unwrap();
    let rows = |pick: fn(&visionserve::batching::ImagePrediction) -> &Vec<f32>| {
        let rows: Vec<Tensor> = predictions
            .iter()
            .map(|p| Tensor::from_slice(pick(p)).unsqueeze(0))
            .collect();
        Tensor::cat(&rows, 0)
    };
    (
        rows(|p| p.logits.as_ref().unwrap()),
        rows(|p| p.embeddings.as_ref().unwrap()),
    )
}

/// Check every unit of a family, and that every native preset of it has a unit.
fn check_family(family: &str, presets: &[&str], backend: Backend) {
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
        for o in check_unit(unit, backend) {
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

fn presets(table: &[models::Preset<impl Sized>]) -> Vec<&'static str> {
    table.iter().map(|(n, _)| *n).collect()
}

#[test]
fn efficientnet_family_matches_timm_and_torchvision() {
    let presets = presets(models::efficientnet::PRESETS);
    check_family("efficientnet", &presets, Backend::Torch);
}

#[test]
fn coatnet_family_matches_timm() {
    check_family(
        "coatnet",
        &presets(models::coatnet::PRESETS),
        Backend::Torch,
    );
}

#[test]
fn efficientnet_family_on_openvino_matches_timm_and_torchvision() {
    let presets = presets(models::efficientnet::PRESETS);
    check_family("efficientnet", &presets, Backend::Openvino);
}

#[test]
fn coatnet_family_on_openvino_matches_timm() {
    check_family(
        "coatnet",
        &presets(models::coatnet::PRESETS),
        Backend::Openvino,
    );
}
