//! `hf-hub:ORG/REPO[@REVISION]` sources: files in the standard Hugging Face cache, downloaded
//! with the `hf-hub` crate when missing.
//!
//! Honours what `huggingface_hub` users set: `HF_HOME` (cache in `$HF_HOME/hub`),
//! `HF_HUB_CACHE` (the cache folder itself), `HF_HUB_OFFLINE=1` (never touch the network),
//! `HF_TOKEN` (or the token file `huggingface-cli login` writes) and `HF_ENDPOINT`. Files
//! already in the cache are used without any network access.

use crate::repository::CONFIG_FILE;
use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};
use std::path::PathBuf;

pub const PREFIX: &str = "hf-hub:";

/// Weight files a timm Hub repo may hold, in order of preference.
const HUB_WEIGHTS: [&str; 2] = ["model.safetensors", "pytorch_model.bin"];

fn cache() -> Cache {
    match std::env::var_os("HF_HUB_CACHE") {
        Some(dir) => Cache::new(PathBuf::from(dir)),
        None => Cache::from_env(),
    }
}

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .is_ok_and(|v| matches!(v.trim(), "1" | "true" | "TRUE" | "yes" | "ON" | "on"))
}

fn token(cache: &Cache) -> Option<String> {
    ["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|t| !t.trim().is_empty()))
        .or_else(|| cache.token())
}

/// The local path of the repo's weights file (its config.json sits next to it), fetching
/// what the cache lacks unless offline. Blocking: call from a blocking context.
pub fn resolve(source: &str) -> Result<PathBuf, String> {
    let spec = source.strip_prefix(PREFIX).unwrap_or(source);
    let (repo_id, revision) = match spec.split_once('@') {
        Some((id, rev)) => (id, rev),
        None => (spec, "main"),
    };
    if repo_id.split('/').count() != 2 || repo_id.starts_with('/') || repo_id.ends_with('/') {
        return Err(format!("{source:?}: expected hf-hub:ORG/REPO[@REVISION], e.g. hf-hub:timm/tf_efficientnetv2_s.in21k_ft_in1k"));
    }
    let repo = Repo::with_revision(repo_id.to_owned(), RepoType::Model, revision.to_owned());
    let cache = cache();
    let cached = cache.repo(repo.clone());
    let config = cached.get(CONFIG_FILE);
    let weights = HUB_WEIGHTS.iter().find_map(|f| cached.get(f));
    if let (Some(_), Some(weights)) = (config, weights) {
        return Ok(weights);
    }
    if offline() {
        return Err(format!(
            "{repo_id}@{revision} is not in the Hugging Face cache at {} and HF_HUB_OFFLINE is set; \
             download it first (e.g. `huggingface-cli download {repo_id}`) or unset HF_HUB_OFFLINE",
            cache.path().display()
        ));
    }
    let api = ApiBuilder::from_cache(cache.clone())
        .with_token(token(&cache))
        .with_progress(false)
        .with_endpoint(
            std::env::var("HF_ENDPOINT").unwrap_or_else(|_| "https://huggingface.co".into()),
        )
        .build()
        .map_err(|e| format!("cannot set up Hugging Face Hub access: {e}"))?;
    let remote = api.repo(repo);
    tracing::info!(repo = repo_id, revision, cache = %cache.path().display(), "downloading from the Hugging Face Hub");
    remote
        .get(CONFIG_FILE)
        .map_err(|e| format!("downloading {repo_id}/{CONFIG_FILE}: {e}"))?;
    let mut last_error = String::new();
    for file in HUB_WEIGHTS {
        match remote.get(file) {
            Ok(path) => return Ok(path),
            Err(e) => last_error = format!("{e}"),
        }
    }
    Err(format!(
        "downloading the weights of {repo_id} ({}): {last_error}",
        HUB_WEIGHTS.join(" or ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_malformed_ids() {
        assert!(resolve("hf-hub:tf_efficientnetv2_s")
            .unwrap_err()
            .contains("ORG/REPO"));
        assert!(resolve("hf-hub:a/b/c").unwrap_err().contains("ORG/REPO"));
    }
}
