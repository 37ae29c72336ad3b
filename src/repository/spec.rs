//! The `--model` spec grammar: `NAME=SOURCE?opt=value&...` parsed into a [`ModelSpec`].

use super::config::ModelOptions;
use super::layout::WeightsFormat;
use std::path::Path;

/// One `--model` argument: `NAME=SOURCE?opt=value&...` or `SOURCE`.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    pub name: String,
    pub source: String,
    pub options: ModelOptions,
}

impl ModelSpec {
    pub fn parse(spec: &str) -> Result<Self, String> {
        let (name_and_source, query) = match spec.split_once('?') {
            Some((head, query)) => (head, Some(query)),
            None => (spec, None),
        };
        let (name, source) = match name_and_source.split_once('=') {
            Some((name, source)) if !name.contains('/') && !name.contains(':') => {
                (name.to_owned(), source.to_owned())
            }
            _ => (default_name(name_and_source), name_and_source.to_owned()),
        };
        if name.is_empty() || source.is_empty() {
            return Err(format!("--model {spec:?}: expected NAME=SOURCE or SOURCE"));
        }
        if !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(format!(
                "--model {spec:?}: model names may only use letters, digits, '-', '_' and '.'"
            ));
        }
        let options = query.map(parse_options).transpose()?.unwrap_or_default();
        Ok(Self {
            name,
            source,
            options,
        })
    }
}

/// `input_size=300&arch=...`: the options after a `--model` spec's `?`.
pub fn parse_options(query: &str) -> Result<ModelOptions, String> {
    let mut options = ModelOptions::default();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| format!("model option {pair:?} is not key=value"))?;
        match key {
            "input_size" => {
                let size: usize = value
                    .parse()
                    .map_err(|_| format!("input_size must be a positive integer, not {value:?}"))?;
                if !(16..=4096).contains(&size) {
                    return Err(format!("input_size {size} is outside 16..=4096"));
                }
                options.input_size = Some(size);
            }
            "arch" => options.arch = Some(value.to_owned()),
            "backend" => options.backend = Some(crate::config::Backend::parse(value)?),
            "jpeg_draft" => options.jpeg_draft = Some(parse_switch(key, value)?),
            "dtype" => {
                options.dtype = Some(
                    <crate::config::DType as clap::ValueEnum>::from_str(value, true)
                        .map_err(|_| format!("dtype must be f32, f16 or bf16, not {value:?}"))?,
                )
            }
            "max_batch_size" => options.max_batch_size = Some(parse_count(key, value, 1)?),
            "max_batch_delay_ms" => {
                options.max_batch_delay_ms = Some(parse_count(key, value, 0)? as u64)
            }
            "instances" => options.instances = Some(crate::config::Instances::parse(value)?),
            _ => {
                return Err(format!(
                    "unknown model option {key:?} (known: {})",
                    MODEL_OPTIONS.join(", ")
                ))
            }
        }
    }
    Ok(options)
}

/// Every option a `--model` spec may carry after its `?`.
pub const MODEL_OPTIONS: [&str; 8] = [
    "input_size",
    "arch",
    "backend",
    "jpeg_draft",
    "dtype",
    "max_batch_size",
    "max_batch_delay_ms",
    "instances",
];

/// A whole number of at least `least`.
fn parse_count(key: &str, value: &str, least: usize) -> Result<usize, String> {
    value
        .parse::<usize>()
        .ok()
        .filter(|n| *n >= least)
        .ok_or_else(|| format!("{key} must be a whole number of at least {least}, not {value:?}"))
}

/// An on/off option's value.
fn parse_switch(key: &str, value: &str) -> Result<bool, String> {
    match value {
        "true" | "1" | "on" => Ok(true),
        "false" | "0" | "off" => Ok(false),
        _ => Err(format!(
            "{key} must be true or false (or 1/0, on/off), not {value:?}"
        )),
    }
}

/// A name for a model given only by its source: the folder name, or the Hub repo's model name
/// without its tag (`hf-hub:timm/tf_efficientnetv2_s.in1k` -> `tf_efficientnetv2_s`).
pub(super) fn default_name(source: &str) -> String {
    if let Some(repo) = source.strip_prefix("hf-hub:") {
        let repo = repo.split('@').next().unwrap_or(repo);
        let model = repo.rsplit('/').next().unwrap_or(repo);
        return model.split('.').next().unwrap_or(model).to_owned();
    }
    let path = Path::new(source.trim_end_matches('/'));
    let path = if WeightsFormat::from_path(path).is_some() {
        path.parent().unwrap_or(path)
    } else {
        path
    };
    path.file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("model")
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_model_specs() {
        let s = ModelSpec::parse("lite0=weights/tf_efficientnet_lite0").unwrap();
        assert_eq!(
            (s.name.as_str(), s.source.as_str()),
            ("lite0", "weights/tf_efficientnet_lite0")
        );
        let s = ModelSpec::parse("weights/tf_efficientnet_lite0/").unwrap();
        assert_eq!(s.name, "tf_efficientnet_lite0");
        let s = ModelSpec::parse("weights/tf_efficientnet_lite0/model.pt").unwrap();
        assert_eq!(s.name, "tf_efficientnet_lite0");
        let s = ModelSpec::parse("hf-hub:timm/tf_efficientnetv2_s.in21k_ft_in1k?input_size=300")
            .unwrap();
        assert_eq!(s.name, "tf_efficientnetv2_s");
        assert_eq!(s.source, "hf-hub:timm/tf_efficientnetv2_s.in21k_ft_in1k");
        assert_eq!(s.options.input_size, Some(300));
        assert!(ModelSpec::parse("m=x?size=3")
            .unwrap_err()
            .contains("unknown model option"));
        assert!(ModelSpec::parse("bad name=x").is_err());
    }

    #[test]
    fn parses_jpeg_draft() {
        let on = parse_options("jpeg_draft=true").unwrap();
        assert_eq!(on.jpeg_draft, Some(true));
        assert_eq!(
            parse_options("jpeg_draft=0").unwrap().jpeg_draft,
            Some(false)
        );
        assert_eq!(parse_options("input_size=300").unwrap().jpeg_draft, None);
        let err = parse_options("jpeg_draft=yes please").unwrap_err();
        assert!(err.contains("true or false"), "{err}");
    }
}
