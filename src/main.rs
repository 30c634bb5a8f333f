//! The `tokitai-serve` binary: parse the command line, set up logging, and
//! run the chosen subcommand. Serving itself is [`tokitai_serve::run`].

use std::net::TcpListener;
use std::process::ExitCode;

use clap::Parser;
use tokitai_serve::cli::{self, Cli, Command, EXIT_FAILURE, EXIT_USAGE};
use tokitai_serve::config::{Config, LogFormat};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let code = match cli.command {
        Some(Command::Infer(args)) => cli::infer(&args),
        Some(Command::Synth(args)) => cli::synth(&args),
        Some(Command::Serve(args)) => serve(&args),
        None => serve(&cli.serve),
    };
    ExitCode::from(code as u8)
}

fn serve(args: &cli::ServeArgs) -> i32 {
    let config = match args.load_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_USAGE;
        }
    };
    init_logging(&config);
    let listener = match TcpListener::bind(config.bind_addr()) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: cannot listen on {}: {e}", config.server.bind);
            return EXIT_FAILURE;
        }
    };
    let listeners = match tokitai_serve::Listeners::bind(listener, &config) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_FAILURE;
        }
    };
    let result = actix_rt::System::new()
        .block_on(async move { tokitai_serve::serve(listeners, config, shutdown_signal(), hangups()).await });
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e}");
            EXIT_FAILURE
        }
    }
}

/// Completes on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing a SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// Yields once per SIGHUP: re-read the models.
fn hangups() -> impl futures_util::Stream<Item = ()> + Unpin {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = signal(SignalKind::hangup()).expect("installing a SIGHUP handler");
    futures_util::stream::poll_fn(move |cx| hup.poll_recv(cx))
}

fn init_logging(config: &Config) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.logging.level));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match config.logging.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}
