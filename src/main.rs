//! The `visionserve` binary: parse the subcommand (`serve` by default), set up logging, then
//! serve until SIGTERM/SIGINT, or run `classify`, `models`, `download` or `export`.

use opentelemetry_sdk::trace::SdkTracer;
use std::io::IsTerminal;
use std::process::ExitCode;
use tracing::Level;
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};
use visionserve::cli::{Command, ParseFailure};
use visionserve::config::{Config, LogFormat};

fn main() -> ExitCode {
    // Allocator and float-mode settings must precede libtorch's first allocation.
    visionserve::tune_process();
    let parsed = match visionserve::cli::parse_command_line(std::env::args_os().collect()) {
        Ok(parsed) => parsed,
        Err(ParseFailure::Clap(e)) => e.exit(),
        Err(ParseFailure::File(message)) => {
            eprintln!("error: {message}");
            return ExitCode::from(2);
        }
    };
    if let Some(Command::Config(args)) = &parsed.cli.command {
        print!("{}", parsed.config_text(args.defaults));
        return ExitCode::SUCCESS;
    }
    let origins = parsed.origins();
    match parsed.cli.command {
        None => serve(parsed.cli.serve, &origins),
        Some(Command::Serve(config)) => serve(*config, &origins),
        Some(Command::Config(_)) => unreachable!("printed above"),
        Some(Command::Classify(args)) => {
            init_logging_with("warn", LogFormat::Text);
            finish(runtime().and_then(|rt| rt.block_on(visionserve::cli::classify(args))))
        }
        Some(Command::Bench(args)) => {
            init_logging_with("warn", LogFormat::Text);
            finish(visionserve::bench::run(*args))
        }
        Some(Command::Tune(args)) => {
            init_logging_with("warn", LogFormat::Text);
            finish(visionserve::tune::run(*args))
        }
        Some(Command::Models) => {
            print!("{}", visionserve::cli::models());
            ExitCode::SUCCESS
        }
        Some(Command::Download(args)) => {
            init_logging_with("warn", LogFormat::Text);
            finish(visionserve::cli::download(args))
        }
        Some(Command::Export(args)) => {
            init_logging_with("warn", LogFormat::Text);
            finish(visionserve::cli::export(args))
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start the async runtime: {e}"))
}

fn finish(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(config: Config, origins: &[String]) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The gRPC exporter's channel is spawned on the runtime: build it inside.
    let traces = {
        let _entered = runtime.enter();
        visionserve::telemetry::init(&visionserve::telemetry::Settings {
            endpoint: config.otlp_endpoint.clone(),
            service_name: config.otlp_service_name.clone(),
            sample_ratio: config.trace_sample_ratio,
        })
    };
    let traces = match traces {
        Ok(traces) => traces,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    init_logging(
        &config.log,
        config.log_format,
        traces.as_ref().map(|t| t.tracer.clone()),
    );
    if !origins.is_empty() {
        tracing::info!(settings = %origins.join(", "), "configuration (not at their defaults)");
    }
    if let Some(traces) = &traces {
        tracing::info!(to = %traces.describe, "exporting OpenTelemetry traces");
    }
    let shutdown_timeout = config.shutdown_timeout();
    let result = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind((config.host.as_str(), config.port))
            .await
            .map_err(|e| {
                anyhow::anyhow!("cannot listen on {}:{}: {e}", config.host, config.port)
            })?;
        visionserve::run(config, listener, shutdown_signal()).await
    });
    // After the drain, while the runtime (which carries the gRPC exporter) still runs.
    if let Some(traces) = &traces {
        visionserve::telemetry::shutdown(&traces.provider);
    }
    // `run` has already waited up to --shutdown-timeout; blocking work still running (a model
    // thread's join, a decode) must not keep the process alive past it.
    runtime.shutdown_timeout(shutdown_timeout.min(std::time::Duration::from_secs(1)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging_with(default_filter: &str, format: LogFormat) {
    init_logging(default_filter, format, None);
}

/// One subscriber for the log and the traces: the log keeps its own filter (`--log`), and
/// the OpenTelemetry layer, when traces are exported, sees visionserve's spans at INFO and
/// its warnings and errors (as span events) whatever `--log` says.
fn init_logging(default_filter: &str, format: LogFormat, tracer: Option<SdkTracer>) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let log = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let log: Box<dyn Layer<Registry> + Send + Sync> = match format {
        LogFormat::Json => log
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_filter(filter)
            .boxed(),
        LogFormat::Text => log.with_filter(filter).boxed(),
    };
    let traces = tracer.map(|tracer| {
        tracing_opentelemetry::layer()
            .with_tracer(tracer)
            // Busy/idle times, thread names and source locations on every span: not needed.
            .with_tracked_inactivity(false)
            .with_threads(false)
            .with_location(false)
            .with_target(false)
            .with_filter(filter_fn(|meta| {
                meta.target().starts_with("visionserve")
                    && if meta.is_span() {
                        *meta.level() <= Level::INFO
                    } else {
                        *meta.level() <= Level::WARN
                    }
            }))
    });
    tracing_subscriber::registry().with(log).with(traces).init();
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("SIGINT received"),
        _ = terminate => tracing::info!("SIGTERM received"),
    }
}
