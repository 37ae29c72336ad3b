//! What `tune` searches: the settings of one candidate, the axes (each setting and the values
//! worth trying on this machine), and the inputs a search needs (images, top-1 classes).

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// One candidate's settings, by key (the model options' and flags' names); `default` leaves a
/// setting to the server.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Settings(Vec<(&'static str, String)>);

/// Settings given as model options (`[models.NAME]`); the others are server-wide flags.
const MODEL_OPTIONS: [&str; 6] = [
    "backend",
    "instances",
    "max_batch_size",
    "max_batch_delay_ms",
    "dtype",
    "jpeg_draft",
];

/// The value that leaves a setting to the server's own default.
pub const DEFAULT: &str = "default";

impl Settings {
    /// The server's defaults, written out.
    pub fn defaults(cpus: usize, cuda: bool) -> Self {
        Self(vec![
            ("backend", "auto".into()),
            ("instances", "auto".into()),
            ("max_batch_size", if cuda { "32" } else { "8" }.into()),
            ("max_batch_delay_ms", "5".into()),
            ("decode_threads", cpus.max(1).to_string()),
            ("intra_op_threads", DEFAULT.into()),
            ("dtype", "f32".into()),
            ("jpeg_draft", "false".into()),
        ])
    }

    pub fn get(&self, name: &str) -> &str {
        self.0
            .iter()
            .find(|(k, _)| *k == name)
            .map_or(DEFAULT, |(_, v)| v)
    }

    /// These settings with `name` set to `value`.
    pub fn with(&self, name: &str, value: &str) -> Self {
        let mut next = self.clone();
        for (key, current) in &mut next.0 {
            if *key == name {
                *current = value.to_owned();
            }
        }
        next
    }

    /// Every setting that is not left to the server.
    pub fn entries(&self) -> impl Iterator<Item = (&'static str, &str)> {
        self.0
            .iter()
            .filter(|(_, v)| v != DEFAULT)
            .map(|(k, v)| (*k, v.as_str()))
    }

    /// Only what differs from `defaults` (the rest left to the server, as a user would write
    /// it).
    pub fn changed_from(&self, defaults: &Settings) -> Settings {
        Settings(
            self.0
                .iter()
                .map(|(k, v)| {
                    (
                        *k,
                        if defaults.get(k) == v {
                            DEFAULT.to_owned()
                        } else {
                            v.clone()
                        },
                    )
                })
                .collect(),
        )
    }

    /// `backend=auto instances=2 ...`.
    pub fn label(&self) -> String {
        self.entries()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// The settings that differ from `other`, as `key=value`.
    pub fn differences(&self, other: &Settings) -> Vec<String> {
        self.0
            .iter()
            .filter(|(k, v)| other.get(k) != v)
            .map(|(k, v)| format!("{k}={v}"))
            .collect()
    }

    /// `model=value&...` for the model's spec.
    pub fn model_query(&self) -> String {
        self.entries()
            .filter(|(k, _)| MODEL_OPTIONS.contains(k))
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("&")
    }

    /// The server-wide flags (`--decode-threads N`).
    pub fn flags(&self) -> Vec<(String, String)> {
        self.entries()
            .filter(|(k, _)| !MODEL_OPTIONS.contains(k))
            .map(|(k, v)| (format!("--{}", k.replace('_', "-")), v.to_owned()))
            .collect()
    }

    /// `--model NAME=SOURCE?options --flag value ...` for `visionserve serve`.
    pub fn server_args(&self, name: &str, source: &str) -> Vec<String> {
        let mut args = vec![
            "--model".to_owned(),
            model_spec(name, source, &self.model_query()),
        ];
        for (flag, value) in self.flags() {
            args.push(flag);
            args.push(value);
        }
        args
    }
}

/// `NAME=SOURCE?QUERY`, keeping options the user's source already carries (ours come last and
/// so win).
pub fn model_spec(name: &str, source: &str, query: &str) -> String {
    let (source, own) = source.split_once('?').unwrap_or((source, ""));
    let query: Vec<&str> = [own, query].into_iter().filter(|q| !q.is_empty()).collect();
    if query.is_empty() {
        format!("{name}={source}")
    } else {
        format!("{name}={source}?{}", query.join("&"))
    }
}

/// One setting and the values worth trying.
pub struct Axis {
    pub name: &'static str,
    pub values: Vec<String>,
    /// Its values change the answers (bf16, reduced JPEG decoding): the report gives top-1
    /// agreement with the defaults.
    pub changes_outputs: bool,
}

fn axis(name: &'static str, values: Vec<String>) -> Axis {
    let mut unique: Vec<String> = Vec::new();
    for value in values {
        if !unique.contains(&value) {
            unique.push(value);
        }
    }
    Axis {
        name,
        values: unique,
        changes_outputs: false,
    }
}

fn strings<T: ToString>(values: &[T]) -> Vec<String> {
    values.iter().map(ToString::to_string).collect()
}

/// The axes in search order: those that moved throughput most in BENCHMARKS.md first.
pub fn axes(cpus: usize, cuda: bool, allow_bf16: bool, allow_jpeg_draft: bool) -> Vec<Axis> {
    let cpus = cpus.max(1);
    let half = (cpus / 2).max(1);
    let mut axes = Vec::new();
    if !cuda {
        // auto is OpenVINO for a native model on the CPU, libtorch for a TorchScript one.
        axes.push(axis("backend", strings(&["auto", "torch"])));
    }
    axes.push(axis(
        "instances",
        strings(&["auto".to_string(), "1".into(), "2".into(), cpus.to_string()]),
    ));
    let batches: &[usize] = if cuda {
        &[8, 16, 32, 64]
    } else {
        &[1, 2, 4, 8, 16]
    };
    axes.push(axis("max_batch_size", strings(batches)));
    axes.push(axis("max_batch_delay_ms", strings(&[0, 2, 5, 10])));
    axes.push(axis("decode_threads", strings(&[cpus, half])));
    if cpus >= 2 {
        axes.push(axis(
            "intra_op_threads",
            vec![DEFAULT.into(), half.to_string()],
        ));
    }
    if allow_bf16 {
        let mut dtype = axis("dtype", strings(&["f32", "bf16"]));
        dtype.changes_outputs = true;
        axes.push(dtype);
    }
    if allow_jpeg_draft {
        let mut draft = axis("jpeg_draft", strings(&["false", "true"]));
        draft.changes_outputs = true;
        axes.push(draft);
    }
    axes
}

/// Photo-sized JPEGs (1024x768, smooth colour fields with grain, as a camera's are) for a
/// search given no images; written under `dir` and reused.
pub fn synthetic_images(dir: &Path) -> Result<Vec<PathBuf>> {
    let folder = dir.join("tune-images");
    std::fs::create_dir_all(&folder)
        .with_context(|| format!("cannot create {}", folder.display()))?;
    let mut paths = Vec::new();
    for seed in 0..4u32 {
        let path = folder.join(format!("synthetic-{seed}.jpg"));
        if !path.exists() {
            let image = image::RgbImage::from_fn(1024, 768, |x, y| {
                let grain =
                    (x.wrapping_mul(7919) ^ y.wrapping_mul(104_729) ^ seed.wrapping_mul(31)) % 23;
                let channel = |phase: u32| {
                    ((x * (seed + 1) + y * (phase + 2) + phase * 97) / 5 % 256 + grain) as u8
                };
                image::Rgb([channel(0), channel(1), channel(2)])
            });
            image
                .save(&path)
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        paths.push(path);
    }
    Ok(paths)
}

/// Each image's top-1 class from a `/v1` server.
pub async fn top1(url: &str, model: &str, images: &[PathBuf]) -> Result<Vec<usize>> {
    let client = reqwest::Client::new();
    let mut classes = Vec::with_capacity(images.len());
    for path in images {
        let body =
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let response = client
            .post(format!("{url}/v1/models/{model}/classify?top_k=1"))
            .header("content-type", "application/octet-stream")
            .body(body)
            .send()
            .await?
            .error_for_status()?;
        let answer: serde_json::Value = response.json().await?;
        let index = answer["results"][0]["predictions"][0]["index"]
            .as_u64()
            .context("the answer has no top-1 class")?;
        classes.push(index as usize);
    }
    Ok(classes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_split_into_model_options_and_flags() {
        let settings = Settings::defaults(2, false)
            .with("max_batch_size", "4")
            .with("intra_op_threads", "1");
        assert_eq!(
            settings.server_args("m", "weights/x?input_size=256"),
            [
                "--model",
                "m=weights/x?input_size=256&backend=auto&instances=auto&max_batch_size=4&max_batch_delay_ms=5&dtype=f32&jpeg_draft=false",
                "--decode-threads",
                "2",
                "--intra-op-threads",
                "1"
            ]
        );
        let defaults = Settings::defaults(2, false);
        assert_eq!(
            settings.differences(&defaults),
            ["max_batch_size=4", "intra_op_threads=1"]
        );
        assert_eq!(
            settings.changed_from(&defaults).server_args("m", "w"),
            ["--model", "m=w?max_batch_size=4", "--intra-op-threads", "1"]
        );
        // The spec it writes is one the server accepts.
        crate::repository::ModelSpec::parse(&settings.server_args("m", "weights/x")[1]).unwrap();
    }

    #[test]
    fn axes_hold_distinct_values_and_gate_output_changes() {
        let axes = axes(2, false, false, false);
        let instances = axes.iter().find(|a| a.name == "instances").unwrap();
        assert_eq!(instances.values, ["auto", "1", "2"]);
        assert!(axes.iter().all(|a| !a.changes_outputs));
        let all = super::axes(2, false, true, true);
        assert!(all.iter().any(|a| a.name == "dtype" && a.changes_outputs));
        assert!(all
            .iter()
            .any(|a| a.name == "jpeg_draft" && a.changes_outputs));
        assert!(super::axes(2, true, false, false)
            .iter()
            .all(|a| a.name != "backend"));
    }
}
