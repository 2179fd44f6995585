//! The `labeld` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use labeld::config::{Config, DEFAULT_CONFIG};
use labeld::error::Fatal;

#[derive(Parser)]
#[command(
    name = "labeld",
    version = labeld::manual::VERSION,
    about = "Labels images as they arrive: TorchScript classifier, JSON sidecars, CSV log",
    long_about = "Labels images as they arrive: watches inbox folders, runs each new image through a TorchScript \
                  ImageNet classifier (libtorch, CPU), writes a JSON sidecar beside it and a row to a CSV results log. \
                  Optional: an HTTP endpoint (metrics, health, POST /predict, a status page) and MQTT publishing."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Label the inboxes' backlog, then watch them for new images until SIGTERM/SIGINT.
    Run {
        /// Config file.
        #[arg(long, short, env = "LABELD_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Label the backlog, then exit (0 when every image got a result, errors included).
        #[arg(long)]
        once: bool,
    },
    /// Label files or folders now: one JSON object per image on stdout, nothing written to disk.
    /// Exits 1 if any image could not be labelled.
    Classify {
        /// Config file (its [model] and [workers] settings are used). Optional when --model is given.
        #[arg(long, short, env = "LABELD_CONFIG")]
        config: Option<PathBuf>,
        /// TorchScript model to use instead of the config's.
        #[arg(long, short)]
        model: Option<PathBuf>,
        /// Image files or folders (searched recursively).
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Validate a config file and print it resolved.
    CheckConfig {
        /// Config file.
        #[arg(long, short, env = "LABELD_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// GET a URL of labeld's HTTP endpoint (e.g. http://127.0.0.1:9187/healthz), for health checks where
    /// there is no curl: exit 0 on a 2xx answer (its body on stdout), 1 on any other answer or none.
    Probe {
        /// An http:// URL.
        url: String,
        /// Seconds to wait for the connection and for the answer.
        #[arg(long, value_name = "SECONDS", default_value_t = 3)]
        timeout: u64,
    },
    /// Write the man pages labeld(8) and labeld.toml(5) into DIR/man8 and DIR/man5 (run when the .deb is built).
    #[command(hide = true)]
    Man { dir: PathBuf },
}

fn main() -> ExitCode {
    if let Err(e) = labeld::logging::init() {
        eprintln!("labeld: {e}");
        return ExitCode::from(2);
    }
    let cli = Cli::parse();
    match dispatch(cli.command) {
        Ok(code) => code,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("labeld: {e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

fn dispatch(command: Command) -> Result<ExitCode, Fatal> {
    match command {
        Command::Run { config, once } => {
            labeld::shutdown::survive_early_hangups().map_err(|e| Fatal::io("cannot install signal handlers", e))?;
            let config = Config::load(&config)?;
            labeld::app::run(config, once)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Classify { config, model, paths } => {
            let config = match (config, model) {
                (Some(c), None) => Config::load(&c)?,
                (Some(c), Some(m)) => Config::load(&c)?.with_model(&m)?,
                (None, Some(m)) if !std::path::Path::new(DEFAULT_CONFIG).exists() => Config::for_model(&m)?,
                (None, Some(m)) => Config::load(std::path::Path::new(DEFAULT_CONFIG))?.with_model(&m)?,
                (None, None) => Config::load(std::path::Path::new(DEFAULT_CONFIG))?,
            };
            let totals = labeld::app::classify(config, &paths)?;
            Ok(if totals.errors == 0 { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
        Command::CheckConfig { config } => {
            let c = Config::load(&config)?;
            print!("{}", c.describe());
            Ok(ExitCode::SUCCESS)
        }
        Command::Probe { url, timeout } => Ok(labeld::probe::run(&url, std::time::Duration::from_secs(timeout))),
        Command::Man { dir } => {
            labeld::manual::write(Cli::command(), &dir)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
