//! The one binary's subcommands: `serve` (the default: flags alone run the server),
//! `classify` (a batch job over files and folders, in process, through the server's own
//! decoding, preprocessing, batching and models), `models` (the native presets and the released
//! checkpoints they serve), `download` (fill the Hugging Face cache ahead of time) and `export`
//! (a native model as an ONNX graph, for other runtimes).

use crate::backend::ModelHandle;
use crate::config::{self, file::ConfigFile, Config};
use crate::images::files::collect_images;
use crate::infer::{
    ImageInput, ImageOutput, InferError, Inference, Intake, ModelRef, Outputs, Plan, RequestOptions,
};
use crate::v1::{image_result, ImageResult};
use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use futures::StreamExt;
use std::collections::HashSet;
use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Parser)]
#[command(
    name = "visionserve",
    version,
    about = "Image-classification inference server (libtorch)",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// With no subcommand, the flags are `serve`'s.
    #[command(flatten)]
    pub serve: Config,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server (the default when no subcommand is given).
    Serve(Box<Config>),
    /// Classify image files and folders in process and write one result per image.
    Classify(ClassifyArgs),
    /// List the natively implemented architectures and their released checkpoints.
    Models,
    /// Download `hf-hub:ORG/REPO[@REVISION]` checkpoints into the Hugging Face cache.
    Download(DownloadArgs),
    /// Write a native model as an ONNX graph (opset 17, weights included) for ONNX Runtime,
    /// TensorRT, OpenVINO Model Server or any other ONNX runtime.
    Export(ExportArgs),
    /// Print the configuration `serve` would run with (--config file, VISIONSERVE_* variables
    /// and flags together) as a TOML file `--config` reads back.
    Config(Box<ConfigArgs>),
    /// Load-test a server speaking /v1, KServe v2 REST or KServe v2 gRPC (any server, or a
    /// visionserve started with --model): concurrency sweeps or Poisson rates, measured until
    /// stable, with a table, JSON/CSV and an HTML report.
    Bench(Box<crate::bench::BenchArgs>),
    /// Find the configuration that serves the most images per second on this machine while
    /// meeting a p99 latency target: writes visionserve.toml and tune-report.html.
    Tune(Box<crate::tune::TuneArgs>),
}

#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// Print the effective configuration as TOML (secrets left out).
    #[arg(long, required = true)]
    pub print: bool,
    /// Print every key instead, with its default and its help text.
    #[arg(long)]
    pub defaults: bool,
    /// The settings to print: the same flags as `serve`.
    #[command(flatten)]
    pub serve: Config,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// One JSON object per image: {"file", "model", "predictions", "batch_size", "timing_ms"}.
    Jsonl,
    /// One row per prediction: file,rank,index,label,score.
    Csv,
}

#[derive(Debug, Args)]
pub struct ClassifyArgs {
    /// The model: a folder in the Hub layout, a weights file, or `hf-hub:ORG/REPO`, with
    /// `?options` as for `serve --model`.
    #[arg(long)]
    pub model: String,
    /// Classes per image, best first.
    #[arg(long, default_value_t = 5)]
    pub top_k: usize,
    #[arg(long, value_enum, default_value_t = OutputFormat::Jsonl)]
    pub output: OutputFormat,
    /// Write results to this file (appended to) instead of standard output.
    #[arg(long, short = 'o')]
    pub out: Option<PathBuf>,
    /// Skip images already in --out (resume an interrupted job).
    #[arg(long, requires = "out")]
    pub skip_existing: bool,
    /// Where the model runs: `auto`, `cpu` or `cuda:N`.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Largest batch [default: 8 on CPU, 32 on CUDA].
    #[arg(long)]
    pub max_batch_size: Option<usize>,
    /// Image files, and folders searched recursively for .jpg, .jpeg, .png, .webp, .gif, .bmp.
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
}

/// What `visionserve export` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ExportFormat {
    /// ONNX, opset 17: input `input` [batch, 3, H, W] (normalised as the checkpoint's
    /// preprocessing says: `metadata_props` carry it), outputs `logits` and `embeddings`.
    Onnx,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The model: a folder in the Hub layout, a weights file, or `hf-hub:ORG/REPO`, with
    /// `?options` as for `serve --model` (`input_size` sets the graph's input size).
    pub source: String,
    #[arg(long, value_enum, default_value_t = ExportFormat::Onnx)]
    pub format: ExportFormat,
    /// The file to write; a graph over 2 GiB keeps its weights in `<file>.data` beside it.
    #[arg(long, short = 'o')]
    pub output: PathBuf,
    /// Keep the weights in `<file>.data` beside the graph whatever its size (ONNX external
    /// data).
    #[arg(long)]
    pub external_data: bool,
}

#[derive(Debug, Args)]
pub struct DownloadArgs {
    /// `hf-hub:ORG/REPO[@REVISION]` (the prefix may be left out).
    #[arg(required = true)]
    pub sources: Vec<String>,
}

// ---------------------------------------------------------------------------------------------
// The command line, over the environment, over the --config file

/// A parsed command line, with what it was parsed against (for `config --print` and the
/// start-up log of where each setting came from).
pub struct Parsed {
    pub cli: Cli,
    command: clap::Command,
    matches: clap::ArgMatches,
    file: Option<ConfigFile>,
}

/// Why the command line could not be parsed.
pub enum ParseFailure {
    /// clap's own error (it prints itself, usage included, and knows its exit code).
    Clap(clap::Error),
    /// A --config file that cannot be read or holds a bad key or value.
    File(String),
}

/// Parse `args`, with the `--config` file's values (or `$VISIONSERVE_CONFIG`'s) as the
/// defaults beneath the environment and the flags.
pub fn parse_command_line(args: Vec<std::ffi::OsString>) -> Result<Parsed, ParseFailure> {
    let mut command = <Cli as clap::CommandFactory>::command();
    let file = match config::file::requested_path(&args) {
        Some(path) => {
            let check = |spec: &str| crate::repository::ModelSpec::parse(spec).map(drop);
            let file = ConfigFile::read(&path, &command, &check).map_err(ParseFailure::File)?;
            command = file.apply(command);
            Some(file)
        }
        None => None,
    };
    let matches = command
        .try_get_matches_from_mut(args)
        .map_err(ParseFailure::Clap)?;
    let cli =
        <Cli as clap::FromArgMatches>::from_arg_matches(&matches).map_err(ParseFailure::Clap)?;
    Ok(Parsed {
        cli,
        command,
        matches,
        file,
    })
}

impl Parsed {
    /// The command and matches of the subcommand that holds the serve flags (the root when
    /// there is no subcommand).
    fn settings(&self) -> (&clap::Command, &clap::ArgMatches) {
        match self.matches.subcommand() {
            Some((name, matches)) => match self.command.find_subcommand(name) {
                Some(command) => (command, matches),
                None => (&self.command, &self.matches),
            },
            None => (&self.command, &self.matches),
        }
    }

    /// `key=value (origin)` for each setting not at its built-in default.
    pub fn origins(&self) -> Vec<String> {
        let (command, matches) = self.settings();
        config::file::origins(command, matches, self.file.as_ref())
    }

    /// What `visionserve config --print [--defaults]` prints.
    pub fn config_text(&self, defaults: bool) -> String {
        let (command, matches) = self.settings();
        if defaults {
            config::file::defaults_toml(command)
        } else {
            config::file::effective_toml(command, matches)
        }
    }
}

/// The files an earlier run already wrote to `out` (its `file` column or field).
fn already_done(out: &Path, format: OutputFormat) -> Result<HashSet<String>> {
    let file = match std::fs::File::open(out) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(HashSet::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", out.display())),
    };
    let mut done = HashSet::new();
    for line in std::io::BufReader::new(file).lines() {
        let line = line?;
        let name = match format {
            OutputFormat::Jsonl => serde_json::from_str::<serde_json::Value>(&line)
                .ok()
                .and_then(|v| v.get("file").and_then(|f| f.as_str()).map(str::to_owned)),
            OutputFormat::Csv => csv_first_field(&line),
        };
        done.extend(name.filter(|n| n != "file"));
    }
    Ok(done)
}

/// A CSV field: quoted when it holds a comma, a quote or a line break (RFC 4180).
fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_owned()
    }
}

fn csv_first_field(line: &str) -> Option<String> {
    if let Some(rest) = line.strip_prefix('"') {
        let mut field = String::new();
        let mut chars = rest.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    field.push('"');
                    chars.next();
                }
                '"' => return Some(field),
                c => field.push(c),
            }
        }
        None
    } else {
        line.split(',').next().map(str::to_owned)
    }
}

/// A `--output jsonl` line: the file, the model, then the server's per-image result.
#[derive(serde::Serialize)]
struct JsonLine<'a> {
    file: &'a str,
    model: &'a str,
    #[serde(flatten)]
    result: &'a ImageResult,
}

/// One image's result in the chosen format (with a trailing newline).
pub fn render(format: OutputFormat, file: &str, model: &str, result: &ImageResult) -> String {
    match format {
        OutputFormat::Jsonl => {
            // Serialised as the server does (f32 scores print the same digits).
            let line = JsonLine {
                file,
                model,
                result,
            };
            let mut text = serde_json::to_string(&line).expect("a result serialises");
            text.push('\n');
            text
        }
        OutputFormat::Csv => result
            .predictions
            .iter()
            .enumerate()
            .map(|(rank, p)| {
                format!(
                    "{},{},{},{},{}\n",
                    csv_field(file),
                    rank + 1,
                    p.index,
                    csv_field(&p.label),
                    p.score
                )
            })
            .collect(),
    }
}

/// Progress on standard error: a bar with rate and ETA on a terminal, a plain line every few
/// seconds otherwise (logs and CI).
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    total: u64,
    done: u64,
    failed: u64,
    started: Instant,
    last_line: Instant,
}

impl Progress {
    fn new(total: u64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(total);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:40.cyan/blue} {pos}/{len} images  {per_sec}  ETA {eta}  {msg}",
                )
                .expect("a valid template"),
            );
            bar
        });
        Self {
            bar,
            total,
            done: 0,
            failed: 0,
            started: Instant::now(),
            last_line: Instant::now(),
        }
    }

    fn report_failure(&mut self, file: &str, error: &str) {
        self.failed += 1;
        let line = format!("skipped {file}: {error}");
        match &self.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("{line}"),
        }
    }

    fn advance(&mut self) {
        self.done += 1;
        match &self.bar {
            Some(bar) => {
                bar.inc(1);
                if self.failed > 0 {
                    bar.set_message(format!("{} skipped", self.failed));
                }
            }
            None if self.last_line.elapsed() >= Duration::from_secs(5) => {
                self.last_line = Instant::now();
                eprintln!(
                    "{}/{} images, {:.1} images/s",
                    self.done,
                    self.total,
                    self.rate()
                );
            }
            None => {}
        }
    }

    fn rate(&self) -> f64 {
        self.done as f64 / self.started.elapsed().as_secs_f64().max(1e-9)
    }

    fn finish(self, skipped_existing: usize) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        eprintln!(
            "classified {} of {} images in {:.1} s ({:.1} images/s); {} unreadable, {} already done",
            self.done - self.failed,
            self.total,
            self.started.elapsed().as_secs_f64(),
            self.rate(),
            self.failed,
            skipped_existing
        );
    }
}

/// `visionserve classify`: load the model as the server does, then keep its queue full
/// (requests of one image each, enough in flight for full batches while the next ones decode).
pub async fn classify(args: ClassifyArgs) -> Result<()> {
    let mut config = Config::for_models([format!("model={}", args.model)]);
    config.device = args.device.clone();
    config.max_batch_size = args.max_batch_size;
    config.log = "warn".into();
    let files = collect_images(&args.inputs)?;
    let done = match (&args.out, args.skip_existing) {
        (Some(out), true) => already_done(out, args.output)?,
        _ => HashSet::new(),
    };
    let todo: Vec<PathBuf> = files
        .into_iter()
        .filter(|f| !done.contains(&f.display().to_string()))
        .collect();
    let skipped_existing = done.len();

    let mut out: Box<dyn Write> = match &args.out {
        Some(path) => Box::new(std::io::BufWriter::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("opening {}", path.display()))?,
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout())),
    };
    let fresh_csv = args.output == OutputFormat::Csv
        && args
            .out
            .as_ref()
            .is_none_or(|p| std::fs::metadata(p).map(|m| m.len() == 0).unwrap_or(true));
    if fresh_csv {
        out.write_all(b"file,rank,index,label,score\n")?;
    }

    let mut service = crate::server::start_service(&config).await?;
    service.wait_ready().await?;
    let inference = service.inference.clone();
    let model = inference.default_model().to_owned();
    let handle = inference.model(&model)?.clone();
    let top_k = args.top_k.clamp(1, handle.info.num_classes);
    let labels = handle.info.labels.clone();
    // Two full batches in flight plus one decoding per CPU keeps the model busy.
    let in_flight = handle.info.max_batch_size * 2 + crate::budget::Resources::detect().cpus;

    let mut progress = Progress::new(todo.len() as u64);
    let mut results = futures::stream::iter(todo)
        .map(|file| {
            let inference = inference.clone();
            let model = model.clone();
            async move {
                let outcome = classify_file(&inference, &model, &file, top_k).await;
                (file, outcome)
            }
        })
        .buffered(in_flight);
    while let Some((file, outcome)) = results.next().await {
        let name = file.display().to_string();
        match outcome {
            Ok(output) => {
                let result = image_result(&labels, output);
                out.write_all(render(args.output, &name, &model, &result).as_bytes())?;
            }
            Err(e) => progress.report_failure(&name, &e),
        }
        progress.advance();
    }
    out.flush()?;
    progress.finish(skipped_existing);
    service.stop(Instant::now() + Duration::from_secs(10)).await;
    Ok(())
}

async fn classify_file(
    inference: &Arc<Inference>,
    model: &str,
    file: &Path,
    top_k: usize,
) -> Result<ImageOutput, String> {
    let bytes = tokio::fs::read(file).await.map_err(|e| e.to_string())?;
    let intake = FileIntake {
        bytes: bytes.into(),
        top_k,
    };
    let answer = inference
        .infer(ModelRef::parse(model), intake)
        .await
        .map_err(|e| e.to_string())?;
    answer
        .outputs
        .into_iter()
        .next()
        .ok_or_else(|| "no output".to_owned())
}

/// One image file, read, for its top `top_k` classes.
struct FileIntake {
    bytes: bytes::Bytes,
    top_k: usize,
}

impl Intake for FileIntake {
    type Keep = ();
    type Error = InferError;

    fn options(&mut self, _model: &ModelHandle) -> Result<RequestOptions, InferError> {
        Ok(RequestOptions::default())
    }

    async fn read(self, _model: Arc<ModelHandle>) -> Result<Plan<()>, InferError> {
        Ok(Plan {
            images: vec![ImageInput::Encoded(self.bytes)],
            outputs: Outputs::top_k(self.top_k),
            timeout: None,
            priority: None,
            keep: (),
        })
    }
}

/// `visionserve models`: every native architecture, with the released timm checkpoints it
/// serves and their preprocessing.
pub fn models() -> String {
    use crate::models::catalog::{Checkpoint, CHECKPOINTS};
    let mut out = String::new();
    out.push_str(&format!(
        "{:<28} {:<48} {:>5} {:>5} {:>6} {:<7} {:<8} {}\n",
        "architecture",
        "released checkpoint (hf-hub:)",
        "input",
        "test",
        "crop",
        "mode",
        "interp",
        "mean / std"
    ));
    for architecture in crate::models::native_architectures() {
        let released: Vec<&Checkpoint> = CHECKPOINTS
            .iter()
            .filter(|c| c.architecture() == architecture)
            .collect();
        if released.is_empty() {
            out.push_str(&format!(
                "{architecture:<28} (no released weights: any checkpoint of this architecture)\n"
            ));
        }
        for c in released {
            out.push_str(&format!(
                "{:<28} {:<48} {:>5} {:>5} {:>6} {:<7} {:<8} {}\n",
                architecture,
                format!("timm/{}", c.repo),
                c.input,
                c.test_input.map_or("-".to_owned(), |t| t.to_string()),
                c.crop_pct,
                c.crop_mode,
                c.interpolation,
                c.normalization,
            ));
        }
    }
    out
}

/// `visionserve download`: resolve each source through the cache (downloading what it lacks).
pub fn download(args: DownloadArgs) -> Result<()> {
    let mut failed = 0;
    for source in &args.sources {
        let source = if source.starts_with(crate::hub::PREFIX) {
            source.clone()
        } else {
            format!("{}{source}", crate::hub::PREFIX)
        };
        match crate::hub::resolve(&source) {
            Ok(weights) => println!(
                "{source}: {}",
                weights.parent().unwrap_or(&weights).display()
            ),
            Err(e) => {
                eprintln!("{source}: {e}");
                failed += 1;
            }
        }
    }
    if failed > 0 {
        return Err(anyhow!(
            "{failed} of {} downloads failed",
            args.sources.len()
        ));
    }
    Ok(())
}

/// `visionserve export`: build the native model from its checkpoint, record it as an ONNX
/// graph and write it; prints what was written.
pub fn export(args: ExportArgs) -> Result<()> {
    let ExportFormat::Onnx = args.format;
    let spec = crate::repository::ModelSpec::parse(&args.source).map_err(|e| anyhow!(e))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let files = runtime
        .block_on(crate::manage::locate(
            &spec.source,
            spec.options.arch.as_deref(),
        ))
        .map_err(|e| anyhow!(e))?;
    if files.format == crate::repository::WeightsFormat::TorchScript {
        bail!(
            "{} is a TorchScript export: only native architectures can be exported (their graph \
             comes from this crate's own description of them); `visionserve models` lists them",
            files.weights.display()
        );
    }
    let config = files
        .config
        .resolve(&spec.options)
        .map_err(|e| anyhow!(e))?;
    let input_size = config.preprocess.input_size;
    let network = {
        let _no_grad = tch::no_grad_guard();
        crate::models::Network::load(
            &files,
            config.num_classes,
            input_size,
            tch::Device::Cpu,
            tch::Kind::Float,
        )?
    };
    let model = network.to_onnx(&config.architecture, input_size, &export_metadata(&config));
    drop(network);
    let written = if args.external_data {
        model.write_external(&args.output)?
    } else {
        model.write(&args.output)?
    };
    let (h, w) = input_size;
    println!(
        "{}: {} opset {}, input {} [batch, 3, {h}, {w}], outputs {} [batch, {}] and {}, {} MiB of weights",
        written
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(" + "),
        config.architecture,
        crate::models::onnx::OPSET,
        crate::models::onnx::INPUT,
        crate::models::onnx::LOGITS,
        config.num_classes,
        crate::models::onnx::EMBEDDINGS,
        model.weight_bytes() >> 20,
    );
    Ok(())
}

/// What a user of the exported graph needs to feed it and read it: the preprocessing timm
/// evaluated the checkpoint with, and the labels.
fn export_metadata(config: &crate::repository::ModelConfig) -> Vec<(&'static str, String)> {
    let p = &config.preprocess;
    let json = |value: serde_json::Value| value.to_string();
    vec![
        ("architecture", config.architecture.clone()),
        ("num_classes", config.num_classes.to_string()),
        (
            "input_size",
            json(serde_json::json!([3, p.input_size.0, p.input_size.1])),
        ),
        ("interpolation", json(serde_json::json!(p.interpolation))),
        ("crop_pct", p.crop_pct.to_string()),
        ("crop_mode", json(serde_json::json!(p.crop_mode))),
        ("mean", json(serde_json::json!(p.mean))),
        ("std", json(serde_json::json!(p.std))),
        ("labels", json(serde_json::json!(config.labels))),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quotes_what_needs_it_and_reads_it_back() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        let line = format!("{},1,2,x,0.5", csv_field("dir/a, \"b\".jpg"));
        assert_eq!(csv_first_field(&line).unwrap(), "dir/a, \"b\".jpg");
        assert_eq!(csv_first_field("plain.jpg,1,2").unwrap(), "plain.jpg");
    }

    #[test]
    fn resumes_from_either_format() {
        let dir = std::env::temp_dir().join(format!("vs-cli-resume-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let jsonl = dir.join("out.jsonl");
        std::fs::write(&jsonl, "{\"file\":\"a.jpg\"}\n{\"file\":\"b.jpg\"}\n").unwrap();
        let done = already_done(&jsonl, OutputFormat::Jsonl).unwrap();
        assert_eq!(
            done,
            HashSet::from(["a.jpg".to_owned(), "b.jpg".to_owned()])
        );
        let csv = dir.join("out.csv");
        std::fs::write(&csv, "file,rank,index,label,score\n\"x,y.png\",1,3,z,0.1\n").unwrap();
        let done = already_done(&csv, OutputFormat::Csv).unwrap();
        assert_eq!(done, HashSet::from(["x,y.png".to_owned()]));
        assert!(already_done(&dir.join("none"), OutputFormat::Csv)
            .unwrap()
            .is_empty());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn flags_alone_still_serve() {
        let cli = Cli::try_parse_from(["visionserve", "--model", "m=x", "--port", "9"]).unwrap();
        assert!(cli.command.is_none());
        assert_eq!(cli.serve.port, 9);
        let cli = Cli::try_parse_from(["visionserve", "serve", "--model", "m=x"]).unwrap();
        assert!(matches!(cli.command, Some(Command::Serve(_))));
        let cli = Cli::try_parse_from(["visionserve", "classify", "--model", "m", "dir"]).unwrap();
        assert!(matches!(cli.command, Some(Command::Classify(_))));
    }

    #[test]
    fn lists_every_native_architecture() {
        let listing = models();
        for architecture in crate::models::native_architectures() {
            assert!(listing.contains(architecture), "{architecture}");
        }
        assert!(listing.contains("timm/tf_efficientnetv2_s.in21k_ft_in1k"));
    }
}
