//! The response cache (`--cache-bytes`, off by default): one model's answer for one image,
//! found again by the image's bytes, so that a repeated image (thumbnails, retries, duplicate
//! uploads, crawlers) skips decoding, the queue and the model.
//!
//! - The key is the BLAKE3 hash of the encoded bytes plus the loaded model version (its
//!   process-unique id: a name and version reloaded later from other files gets another) and
//!   every output option (top-k, probabilities, logits, embeddings). BLAKE3 rather than a faster
//!   non-cryptographic hash: a client able to craft a collision could otherwise plant its own
//!   answer for another client's image. At about 1 GB/s it costs 0.1 ms for a 100 kB JPEG,
//!   against milliseconds of decoding.
//! - Decode options are server-wide (`--max-image-pixels`, `--exif-transpose`) and need no
//!   place in the key; preprocessed pixels are not cached (clients that send them have done
//!   the expensive part already).
//! - Bounded by bytes through moka's weigher (TinyLFU admission, LRU eviction). A version that
//!   is drained has its entries invalidated, and since the version is in the key, a rollout
//!   can never answer from the previous version's entries.
//! - `Cache-Control: no-cache` on a request skips the lookup (the fresh answer is stored);
//!   `no-store` skips the cache entirely.

use crate::batching::{ImagePrediction, Outputs};
use crate::metrics::Metrics;
use moka::notification::RemovalCause;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use std::sync::Arc;
use std::time::Duration;

/// What identifies one answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CacheKey {
    image: [u8; 32],
    /// `ModelHandle::id` of the version that answered.
    model: u64,
    outputs: Outputs,
}

impl CacheKey {
    pub fn new(image: &[u8], model: u64, outputs: Outputs) -> Self {
        Self {
            image: *blake3::hash(image).as_bytes(),
            model,
            outputs,
        }
    }
}

/// How a request may use the cache (`Cache-Control`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheUse {
    /// Answer from the cache when the image is there.
    pub read: bool,
    /// Store fresh answers.
    pub write: bool,
}

impl Default for CacheUse {
    fn default() -> Self {
        Self {
            read: true,
            write: true,
        }
    }
}

impl CacheUse {
    /// From a `Cache-Control` request header's value: `no-cache` revalidates (no read),
    /// `no-store` keeps the answer out too. Other directives are ignored.
    pub fn from_cache_control(value: Option<&str>) -> Self {
        let mut usage = Self::default();
        for directive in value.unwrap_or("").split(',') {
            match directive.trim().to_ascii_lowercase().as_str() {
                "no-cache" => usage.read = false,
                "no-store" => {
                    usage.read = false;
                    usage.write = false;
                }
                _ => {}
            }
        }
        usage
    }
}

pub struct ResponseCache {
    entries: moka::sync::Cache<CacheKey, Arc<ImagePrediction>>,
    bytes: Gauge,
}

impl ResponseCache {
    /// A cache of at most `capacity` bytes; `None` when `capacity` is 0 (off).
    pub fn new(capacity: u64, metrics: &Metrics) -> Option<Self> {
        metrics.cache_capacity.set(capacity as i64);
        if capacity == 0 {
            return None;
        }
        let evictions: Counter = metrics.cache_evictions.clone();
        let entries = moka::sync::Cache::builder()
            .max_capacity(capacity)
            .weigher(|key: &CacheKey, value: &Arc<ImagePrediction>| weight(key, value))
            .eviction_listener(move |_, _, cause| {
                if cause == RemovalCause::Size {
                    evictions.inc();
                }
            })
            .support_invalidation_closures()
            .build();
        Some(Self {
            entries,
            bytes: metrics.cache_bytes.clone(),
        })
    }

    /// The stored answer for `key`, with no stage times: nothing ran.
    pub fn get(&self, key: &CacheKey) -> Option<ImagePrediction> {
        self.entries.get(key).map(|stored| ImagePrediction {
            queue_wait: Duration::ZERO,
            inference: Duration::ZERO,
            batch_size: 0,
            ..(*stored).clone()
        })
    }

    pub fn insert(&self, key: CacheKey, prediction: &ImagePrediction) {
        self.entries.insert(key, Arc::new(prediction.clone()));
    }

    /// Forget a version's answers (`ModelHandle::id`; it was drained).
    pub fn invalidate_model(&self, model: u64) {
        // Fails only without `support_invalidation_closures`, which `new` sets.
        let _ = self
            .entries
            .invalidate_entries_if(move |key, _| key.model == model);
    }

    /// Bring `visionserve_cache_bytes` up to date (moka applies writes in batches).
    pub fn refresh_gauges(&self) {
        self.entries.run_pending_tasks();
        self.bytes.set(self.entries.weighted_size() as i64);
    }
}

/// An entry's bytes, roughly: the key, the answer's vectors and moka's bookkeeping.
fn weight(key: &CacheKey, value: &ImagePrediction) -> u32 {
    const OVERHEAD: usize = 160;
    let floats = |v: &Option<Vec<f32>>| v.as_ref().map_or(0, |v| v.len() * 4);
    let bytes = OVERHEAD
        + std::mem::size_of_val(key)
        + value.top.len() * std::mem::size_of::<(usize, f32)>()
        + floats(&value.probabilities)
        + floats(&value.logits)
        + floats(&value.embeddings);
    bytes.try_into().unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prediction(class: usize) -> ImagePrediction {
        ImagePrediction {
            top: vec![(class, 0.9)],
            queue_wait: Duration::from_millis(3),
            inference: Duration::from_millis(20),
            batch_size: 4,
            ..Default::default()
        }
    }

    #[test]
    fn answers_are_keyed_by_bytes_loaded_version_and_outputs() {
        let metrics = Metrics::new();
        let cache = ResponseCache::new(1 << 20, &metrics).expect("on");
        let key = CacheKey::new(b"jpeg", 1, Outputs::top_k(5));
        cache.insert(key, &prediction(7));
        let hit = cache.get(&key).expect("stored");
        assert_eq!(hit.top, vec![(7, 0.9)]);
        assert_eq!((hit.inference, hit.batch_size), (Duration::ZERO, 0));
        for other in [
            CacheKey::new(b"jpeg!", 1, Outputs::top_k(5)),
            CacheKey::new(b"jpeg", 2, Outputs::top_k(5)),
            CacheKey::new(b"jpeg", 1, Outputs::top_k(3)),
        ] {
            assert!(cache.get(&other).is_none(), "{other:?}");
        }
        cache.invalidate_model(1);
        cache.refresh_gauges();
        assert!(cache.get(&key).is_none());
    }

    #[test]
    fn the_cache_stays_within_its_bytes_and_counts_evictions() {
        let metrics = Metrics::new();
        let cache = ResponseCache::new(10_000, &metrics).expect("on");
        for i in 0..1_000u32 {
            let key = CacheKey::new(&i.to_le_bytes(), 1, Outputs::top_k(1));
            cache.insert(key, &prediction(i as usize));
        }
        cache.refresh_gauges();
        assert!(cache.entries.weighted_size() <= 10_000);
        assert!(metrics.cache_bytes.get() <= 10_000);
        assert!(metrics.cache_evictions.get() > 0 || cache.entries.entry_count() < 1_000);
        assert!(ResponseCache::new(0, &metrics).is_none());
    }

    #[test]
    fn cache_control_no_cache_skips_the_lookup_and_no_store_the_cache() {
        assert_eq!(CacheUse::from_cache_control(None), CacheUse::default());
        let revalidate = CacheUse::from_cache_control(Some("max-age=0, No-Cache"));
        assert_eq!((revalidate.read, revalidate.write), (false, true));
        let none = CacheUse::from_cache_control(Some("no-store"));
        assert_eq!((none.read, none.write), (false, false));
    }
}
