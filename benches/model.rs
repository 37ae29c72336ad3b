//! Model-alone throughput: the model thread's work (upload, normalise, forward, softmax, top-k)
//! in-process, at fixed batch sizes, without HTTP, decoding or batching.
//!
//!     cargo bench --bench model -- --model weights/tf_efficientnet_lite0 --batch-sizes 1,8
//!
//! `--model` takes the same sources as the server (a folder serves its preferred weights; point
//! at `model.pt` for the TorchScript export), `--backend` the same backends (torch, openvino).
//! Prints one markdown row per batch size.

use clap::Parser;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use visionserve::backend::device;
use visionserve::backend::runner::Runner;
use visionserve::backend::spec::WorkerSpec;
use visionserve::batching::Outputs;
use visionserve::config::{Backend, DType, DeviceChoice};
use visionserve::images::Pixels;
use visionserve::repository::{ModelFiles, ModelOptions};

#[derive(Parser)]
struct Args {
    /// Model folder or weights file.
    #[arg(long)]
    model: PathBuf,
    /// Batch sizes to time.
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    batch_sizes: Vec<usize>,
    /// libtorch intra-op threads per instance (default: libtorch's choice for one instance;
    /// with --instances N, the CPUs divided by N, as the server does).
    #[arg(long)]
    threads: Option<i32>,
    /// Serve at this input size instead of the config's default.
    #[arg(long)]
    input_size: Option<usize>,
    /// Seconds to measure each batch size.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Sleep this many milliseconds after each batch (only the batches are timed), as a server
    /// answering one client at a time leaves the model idle between requests. On the project's
    /// VM a batch after an idle spell runs slower than back-to-back ones (BENCHMARKS.md, "Idle
    /// cores"), which the default of 0 hides. With a gap, images/s is the rate while busy (with
    /// --instances, each copy's busy rate summed), not the throughput over the wall time.
    #[arg(long, default_value_t = 0.0)]
    gap_ms: f64,
    /// Leave glibc's malloc at its defaults (to measure what the tuning buys).
    #[arg(long)]
    no_malloc_tuning: bool,
    /// Element type the model runs in (f32, bf16 on CPU; f16 too on CUDA).
    #[arg(long, value_enum, default_value_t = DType::F32)]
    dtype: DType,
    /// cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// What runs the model: torch (libtorch) or openvino (native models, CPU); auto (the
    /// default) decides as the server does.
    #[arg(long, value_enum, default_value_t = Backend::Auto)]
    backend: Backend,
    /// Independent copies of the model, each run by its own thread (as the server's
    /// `--instances`); images/s is their sum.
    #[arg(long, default_value_t = 1)]
    instances: usize,
    /// Also print the mean time of each phase of a batch (ms): preparing the input, the forward
    /// pass, and the outputs (softmax, top-k, copies), as three more columns.
    #[arg(long)]
    phases: bool,
    /// Ignored (cargo bench passes it).
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if !args.no_malloc_tuning {
        device::tune_allocator();
    }
    // The server's own resolution: `auto`, and a CUDA index checked against the devices.
    let device = device::resolve(DeviceChoice::parse(&args.device).map_err(anyhow::Error::msg)?)?;
    let kind = device::kind(args.dtype, device)?;
    if device.is_cuda() {
        // As the server's model thread: cuDNN picks its fastest kernels during the warm-up runs.
        tch::Cuda::cudnn_set_benchmark(true);
    }
    let files = ModelFiles::locate(&args.model).map_err(anyhow::Error::msg)?;
    let options = ModelOptions {
        input_size: args.input_size,
        ..ModelOptions::default()
    };
    let config = files.config.resolve(&options).map_err(anyhow::Error::msg)?;
    let spec = WorkerSpec {
        name: config.architecture.clone(),
        preprocess: config.preprocess.clone(),
        num_classes: config.num_classes,
        device,
        kind,
        max_batch_size: 1,
        files,
        backend: args.backend,
    };
    let openvino = visionserve::backend::openvino::OpenVinoPrep::for_copies(args.instances);
    let (h, w) = config.preprocess.input_size;
    let threads = args.threads.or_else(|| {
        (args.instances > 1).then(|| {
            let cpus = visionserve::budget::Resources::detect().cpus;
            (cpus / args.instances).max(1) as i32
        })
    });
    for batch in &args.batch_sizes {
        // Each instance loads its own copy and warms up; then all start timing together (the
        // barrier) and run for the same wall time, so that their rates add up.
        let ready = std::sync::Barrier::new(args.instances.max(1));
        let per_instance = std::thread::scope(|scope| {
            let runs: Vec<_> = (0..args.instances)
                .map(|_| {
                    scope.spawn(|| time_batches(&spec, &openvino, &args, threads, *batch, &ready))
                })
                .collect();
            runs.into_iter()
                .map(|run| run.join().expect("bench thread panicked"))
                .collect::<anyhow::Result<Vec<Timed>>>()
        })?;
        let images_per_s: f64 = per_instance.iter().map(|t| t.images_per_s).sum();
        let per_batch_ms =
            per_instance.iter().map(|t| t.per_batch_ms).sum::<f64>() / per_instance.len() as f64;
        let phases = if args.phases {
            let [input, forward, output] = per_instance[0].phases_ms;
            format!(" {input:.2} | {forward:.2} | {output:.2} |")
        } else {
            String::new()
        };
        println!(
            "| {} | {} | {h}x{w} | {} | {batch} | {:.1} | {:.2} |{phases}{}{}",
            config.architecture,
            per_instance[0].backend,
            per_instance[0].threads,
            images_per_s,
            per_batch_ms,
            match args.dtype {
                DType::F32 => String::new(),
                other => format!(" {other:?}").to_lowercase(),
            },
            if args.instances > 1 {
                format!(" x{} instances", args.instances)
            } else {
                String::new()
            },
        );
        if args.no_malloc_tuning {
            println!("(glibc malloc defaults)");
        }
    }
    Ok(())
}

struct Timed {
    backend: &'static str,
    threads: i32,
    images_per_s: f64,
    per_batch_ms: f64,
    /// Mean input, forward and output milliseconds per batch.
    phases_ms: [f64; 3],
}

/// Load the model on this thread, warm it up at `batch`, wait for the other instances, then
/// run it for `--seconds`.
fn time_batches(
    spec: &WorkerSpec,
    openvino: &visionserve::backend::openvino::OpenVinoPrep,
    args: &Args,
    threads: Option<i32>,
    batch: usize,
    ready: &std::sync::Barrier,
) -> anyhow::Result<Timed> {
    device::flush_denormals();
    let _ = tch::get_num_threads();
    let threads = threads.unwrap_or_else(tch::get_num_threads);
    tch::set_num_threads(threads);
    let _no_grad = tch::no_grad_guard();
    let (h, w) = spec.preprocess.input_size;
    let image = Pixels::Rgb8((0..h * w * 3).map(|i| (i * 31 % 251) as u8).collect());
    let images = vec![&image; batch];
    let warmed = Runner::load(spec, threads as usize, openvino).and_then(|runner| {
        for _ in 0..3 {
            runner.run(&images, Outputs::top_k(5))?;
        }
        Ok(runner)
    });
    // Every instance reaches the barrier, warmed up or not, so that a failed one cannot leave
    // the others waiting.
    ready.wait();
    let runner = warmed?;
    let (mut runs, mut busy, start) = (0u32, Duration::ZERO, Instant::now());
    let mut phases = [Duration::ZERO; 3];
    let gap = Duration::from_secs_f64(args.gap_ms / 1e3);
    while start.elapsed() < Duration::from_secs_f64(args.seconds) {
        let batch_started = Instant::now();
        let (_, timed) = runner.run_timed(&images, Outputs::top_k(5))?;
        busy += batch_started.elapsed();
        for (sum, phase) in phases
            .iter_mut()
            .zip([timed.input, timed.infer, timed.output])
        {
            *sum += phase;
        }
        runs += 1;
        if !gap.is_zero() {
            std::thread::sleep(gap);
        }
    }
    let per_batch = busy.as_secs_f64() / f64::from(runs);
    Ok(Timed {
        backend: runner.execution().backend,
        threads,
        images_per_s: batch as f64 / per_batch,
        per_batch_ms: per_batch * 1e3,
        phases_ms: phases.map(|p| p.as_secs_f64() * 1e3 / f64::from(runs)),
    })
}
