//! Model-alone throughput: the model thread's work (upload, normalise, forward, softmax, top-k)
//! in-process, at fixed batch sizes, without HTTP, decoding or batching.
//!
//!     cargo bench --bench model -- --model weights/tf_efficientnet_lite0 --batch-sizes 1,8
//!
//! `--model` takes the same sources as the server (a folder serves its preferred weights; point
//! at `model.pt` for the TorchScript export). Prints one markdown row per batch size.

use clap::Parser;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use visionserve::backend::device;
use visionserve::backend::worker::{Runner, WorkerSpec};
use visionserve::pipeline::{Outputs, Pixels};
use visionserve::repository::{ModelFiles, ModelOptions};

#[derive(Parser)]
struct Args {
    /// Model folder or weights file.
    #[arg(long)]
    model: PathBuf,
    /// Batch sizes to time.
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    batch_sizes: Vec<usize>,
    /// libtorch intra-op threads (default: libtorch's choice).
    #[arg(long)]
    threads: Option<i32>,
    /// Serve at this input size instead of the config's default.
    #[arg(long)]
    input_size: Option<usize>,
    /// Seconds to measure each batch size.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Leave glibc's malloc at its defaults (to measure what the tuning buys).
    #[arg(long)]
    no_malloc_tuning: bool,
    /// Ignored (cargo bench passes it).
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if !args.no_malloc_tuning {
        device::tune_allocator();
    }
    device::flush_denormals();
    if let Some(threads) = args.threads {
        tch::set_num_threads(threads);
    }
    let _no_grad = tch::no_grad_guard();
    let files = ModelFiles::locate(&args.model).map_err(anyhow::Error::msg)?;
    let options = ModelOptions {
        input_size: args.input_size,
        arch: None,
    };
    let config = files.config.resolve(&options).map_err(anyhow::Error::msg)?;
    let spec = WorkerSpec {
        name: config.architecture.clone(),
        preprocess: config.preprocess.clone(),
        num_classes: config.num_classes,
        device: tch::Device::Cpu,
        kind: tch::Kind::Float,
        max_batch_size: 1,
        intra_op_threads: None,
        files,
    };
    let runner = Runner::load(&spec)?;
    let backend = runner.backend();
    let (h, w) = config.preprocess.input_size;
    let image = Pixels::Rgb8((0..h * w * 3).map(|i| (i * 31 % 251) as u8).collect());
    for batch in &args.batch_sizes {
        let images = vec![&image; *batch];
        for _ in 0..3 {
            runner.run(&images, Outputs::top_k(5))?;
        }
        let (mut runs, start) = (0u32, Instant::now());
        while start.elapsed() < Duration::from_secs_f64(args.seconds) {
            runner.run(&images, Outputs::top_k(5))?;
            runs += 1;
        }
        let per_batch = start.elapsed().as_secs_f64() / f64::from(runs);
        println!(
            "| {} | {backend} | {h}x{w} | {} | {batch} | {:.1} | {:.2} |{}",
            config.architecture,
            tch::get_num_threads(),
            *batch as f64 / per_batch,
            per_batch * 1e3,
            if args.no_malloc_tuning {
                " malloc defaults"
            } else {
                ""
            }
        );
    }
    Ok(())
}
