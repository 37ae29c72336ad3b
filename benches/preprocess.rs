//! Decode and preprocess cost per image (single thread), for the test photos.
//!
//!     make test-data && cargo bench --bench preprocess
//!     cargo bench --bench preprocess -- --image rocket.jpg --model weights/tf_efficientnet_lite0
//!
//! Prints one row per photo: decode and resize+crop milliseconds (median of repeated runs), whole
//! and as `--jpeg-draft` decodes it (the DCT scale it picks, then its decode and resize+crop). By
//! default the test photos at 224 (bicubic, crop_pct 0.875); `--image` times those files instead,
//! and `--model` uses that model's own preprocessing (its size, filter and crop), as the server
//! would for it (`benches/levers.py` uses both for the 1-client latency budget).
//! `benches/preprocess_vs_pillow.py` interleaves it with Pillow's own decode + timm's transform.

use clap::Parser;
use std::path::PathBuf;
use std::time::Instant;
use visionserve::images::decode::{decode, DecodeOptions};
use visionserve::images::preprocess::{preprocess, CropMode, PreprocessConfig};
use visionserve::images::resize::Filter;
use visionserve::repository::{ModelFiles, ModelOptions};

#[derive(Parser)]
struct Args {
    /// A photo to time, repeatable (default: the test photos under $VISIONSERVE_TEST_DATA/photos).
    #[arg(long)]
    image: Vec<PathBuf>,
    /// Preprocess as this model's config says (default: 224, bicubic, crop_pct 0.875).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Timed runs per photo and stage (the median is printed).
    #[arg(long, default_value_t = 31)]
    runs: usize,
    /// Ignored (cargo bench passes it).
    #[arg(long, hide = true)]
    bench: bool,
}

const TEST_PHOTOS: [&str; 5] = [
    "chelsea.jpg",
    "rocket.jpg",
    "astronaut.png",
    "hubble_deep_field.jpg",
    "retina.jpg",
];

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

fn main() -> Result<(), String> {
    // As the server does: without it every whole decode maps fresh pages for its output, and
    // page faults were a third of a 12 MP decode's time here.
    visionserve::backend::device::tune_allocator();
    let args = Args::parse();
    let cfg = match &args.model {
        Some(model) => {
            let files = ModelFiles::locate(model)?;
            files.config.resolve(&ModelOptions::default())?.preprocess
        }
        None => PreprocessConfig {
            input_size: (224, 224),
            interpolation: Filter::Bicubic,
            crop_pct: 0.875,
            crop_mode: CropMode::Center,
            mean: [0.5; 3],
            std: [0.5; 3],
            jpeg_draft: false,
        },
    };
    let draft_cfg = PreprocessConfig {
        jpeg_draft: true,
        ..cfg.clone()
    };
    let photos = if args.image.is_empty() {
        let data = std::env::var_os("VISIONSERVE_TEST_DATA")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("target/test-data"));
        TEST_PHOTOS
            .iter()
            .map(|p| data.join("photos").join(p))
            .collect()
    } else {
        args.image.clone()
    };
    let opts = DecodeOptions {
        max_pixels: 100_000_000,
        exif_transpose: false,
        draft: None,
    };
    let draft_opts = draft_cfg.decode_options(opts);
    println!("| photo | size | decode ms | resize+crop ms | draft scale | draft decode ms | draft resize+crop ms |");
    println!("|---|---|---|---|---|---|---|");
    for path in photos {
        let bytes = std::fs::read(&path)
            .map_err(|e| format!("{}: {e} (run `make test-data` first)", path.display()))?;
        let [(image, decode_ms, resize_ms), (draft, draft_decode_ms, draft_resize_ms)] =
            [(&opts, &cfg), (&draft_opts, &draft_cfg)].map(|(opts, cfg)| {
                let image = decode(&bytes, opts).map_err(|e| format!("{}: {e}", path.display()));
                let decode_ms = median_ms(|| drop(decode(&bytes, opts)), args.runs);
                let resize_ms = match &image {
                    Ok(d) => median_ms(|| drop(preprocess(&d.image, cfg)), args.runs),
                    Err(_) => f64::NAN,
                };
                (image, decode_ms, resize_ms)
            });
        let (image, draft) = (image?, draft?);
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        println!(
            "| {name} | {}x{} | {decode_ms:.2} | {resize_ms:.2} | {} | {draft_decode_ms:.2} | {draft_resize_ms:.2} |",
            image.image.width,
            image.image.height,
            draft.scale.label()
        );
    }
    Ok(())
}
