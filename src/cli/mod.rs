//! The `cupbearer` command line. Every flag has a kebab-case name and also accepts the
//! Python original's dotted spelling (`--train_data.original` = `--train-data-original`):
//! [`normalize_flag`] rewrites dots and underscores in flag names to dashes.

mod detector_args;
mod download;
mod eval_detector;
mod import_model;
mod kernels;
mod make_adversarial_examples;
mod suite;
mod train_classifier;
mod train_data_args;
mod train_detector;

use std::ffi::OsString;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::registry::Registry;

const AFTER_HELP: &str = "Flags also accept the original cupbearer's dotted spelling: \
`--train_data.original mnist` is `--train-data-original mnist`, `--dir.full logs/x` is `--dir-full logs/x`.";

#[derive(Parser)]
#[command(
    name = "cupbearer",
    version,
    about = "Mechanistic anomaly detection on a GPU compute engine (WGSL on wgpu)",
    after_help = AFTER_HELP,
    // As with the original's argparse, a repeated flag takes its last value.
    args_override_self = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Kernel files to use instead of the built-in ones: DIR/<name>.wgsl replaces
    /// shaders/<name>.wgsl (`cupbearer kernels export DIR` writes them all to start
    /// from) [default: $CUPBEARER_SHADER_DIR].
    #[arg(long, global = true, value_name = "DIR")]
    shader_dir: Option<std::path::PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Train a classifier (optionally on backdoored data) and write a run directory.
    #[command(alias = "train_classifier", after_help = AFTER_HELP, args_override_self = true)]
    TrainClassifier(train_classifier::Args),
    /// Fit an anomaly detector on a task's trusted data and write a detector run dir.
    #[command(alias = "train_detector", after_help = AFTER_HELP, args_override_self = true)]
    TrainDetector(train_detector::Args),
    /// Score a task's test mix with a trained detector: AUROC, AP, scores and plots.
    #[command(alias = "eval_detector", after_help = AFTER_HELP, args_override_self = true)]
    EvalDetector(eval_detector::Args),
    /// Attack a classifier run's model (FGSM or PGD) and store the adversarial examples
    /// in the run directory.
    #[command(alias = "make_adversarial_examples", after_help = AFTER_HELP, args_override_self = true)]
    MakeAdversarialExamples(make_adversarial_examples::Args),
    /// Every detector of a suite against every task of it: cached classifiers,
    /// resumable cells, a leaderboard.
    #[command(after_help = AFTER_HELP, args_override_self = true)]
    Suite(suite::Args),
    /// Import a classifier trained elsewhere (PyTorch or Flax naming, f32/f16/bf16
    /// safetensors) into a classifier run directory.
    #[command(alias = "import_model", after_help = AFTER_HELP, args_override_self = true)]
    ImportModel(import_model::Args),
    /// Download a data set from public mirrors, verifying SHA-256 checksums.
    Download(download::Args),
    /// The WGSL kernel files: list them, or export them to edit (--shader-dir).
    Kernels(kernels::Args),
}

/// `--optim` / `--detector.train.optimizer`: the original offered only Adam.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Optimizer {
    Adam,
}

/// Output, data and reproducibility flags every command shares.
#[derive(clap::Args)]
struct CommonArgs {
    /// Seeds every random draw (initialisation, shuffling, coin flips, noise): the same
    /// seed gives the same result.
    #[arg(long, default_value_t = 0)]
    seed: u32,
    /// Output directory.
    #[arg(long, value_name = "DIR")]
    dir_full: Option<std::path::PathBuf>,
    /// Parent of the output dir when --dir.full is not given
    /// [default: logs/<command> where the command writes by default].
    #[arg(long, value_name = "DIR")]
    dir_base: Option<std::path::PathBuf>,
    /// Name of the output dir under --dir.base [default: the current time].
    #[arg(long, value_name = "NAME")]
    dir_run: Option<String>,
    /// Data directory [default: $CUPBEARER_DATA_DIR, else ./data].
    #[arg(long, value_name = "DIR")]
    data_dir: Option<std::path::PathBuf>,
    /// Replace existing outputs.
    #[arg(long)]
    overwrite: bool,
    /// No progress output.
    #[arg(long, short)]
    quiet: bool,
    /// Smoke test in seconds, as in the original: 2 samples, hidden dims 2 2, one step,
    /// batches of 2; nothing is written unless --dir.full is given.
    #[arg(long)]
    debug: bool,
}

impl CommonArgs {
    /// The output dir: --dir.full, else --dir.base/--dir.run with `default_base`; in
    /// --debug mode only an explicit --dir.full.
    fn output_dir(&self, default_base: Option<&std::path::Path>) -> Option<std::path::PathBuf> {
        if self.debug && self.dir_full.is_none() {
            return None;
        }
        let base = self.dir_base.as_deref().or(default_base);
        match (self.dir_full.as_deref(), base) {
            (None, None) => None,
            (full, base) => Some(crate::run::resolve_run_dir(
                full,
                base.unwrap_or(std::path::Path::new(".")),
                self.dir_run.as_deref(),
            )),
        }
    }
}

/// Parses a library enum by its serde name (`axis_aligned`, also spelt `axis-aligned`),
/// keeping the library free of clap; serde's error lists the valid names.
fn serde_enum<T: serde::de::DeserializeOwned>(s: &str) -> Result<T, String> {
    serde_json::from_value(serde_json::Value::String(s.replace('-', "_")))
        .map_err(|e| e.to_string())
}

/// `--a.b_c=v` -> `--a-b-c=v`; values and positional arguments are left alone.
pub fn normalize_flag(arg: OsString) -> OsString {
    let Some(s) = arg.to_str() else { return arg };
    let Some(flag) = s.strip_prefix("--") else {
        return arg;
    };
    let (name, value) = match flag.split_once('=') {
        Some((n, v)) => (n, Some(v)),
        None => (flag, None),
    };
    let mut out = format!("--{}", name.replace(['.', '_'], "-"));
    if let Some(v) = value {
        out.push('=');
        out.push_str(v);
    }
    out.into()
}

/// The `cupbearer` command with the built-in detectors and tasks.
pub fn main() -> ExitCode {
    main_with(&Registry::builtin())
}

/// The `cupbearer` command with the detectors and tasks of `registry`: a crate that
/// registers its own gets the whole command line for them.
pub fn main_with(registry: &Registry) -> ExitCode {
    let (args, options) = detector_args::split_options(std::env::args_os());
    let listing = format!(
        "{}\n{}\n{AFTER_HELP}",
        registry.detectors_help(),
        registry.tasks_help()
    );
    let command = Cli::command()
        .mut_subcommand("train-detector", |c| c.after_help(listing.clone()))
        .mut_subcommand("eval-detector", |c| c.after_help(listing.clone()));
    let cli = match Cli::from_arg_matches(&command.get_matches_from(args)) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let detector_command = matches!(
        cli.command,
        Command::TrainDetector(_) | Command::EvalDetector(_)
    );
    if let (false, Some((key, _))) = (
        detector_command,
        options.task.first().or(options.detector.first()),
    ) {
        eprintln!(
            "error: unexpected option {key:?}: only train-detector and eval-detector take \
             --task.* and --detector.* flags"
        );
        return ExitCode::from(2);
    }
    if cli.shader_dir.is_some() {
        crate::gpu::shaders::set_default_dir(cli.shader_dir.clone());
        // A submit stuck behind a hung kernel never returns: the watchdog ends the run.
        crate::gpu::watchdog::set_hang_handler(|hang| {
            eprintln!("error: {hang}");
            exit_now()
        });
    }
    let result = match cli.command {
        Command::TrainClassifier(args) => train_classifier::run(args),
        Command::TrainDetector(mut args) => {
            args.options = options;
            train_detector::run(args, registry)
        }
        Command::EvalDetector(mut args) => {
            args.options = options;
            eval_detector::run(args, registry)
        }
        Command::MakeAdversarialExamples(args) => make_adversarial_examples::run(args),
        Command::Suite(args) => suite::run(args, registry),
        Command::Download(args) => download::run(args),
        Command::ImportModel(args) => import_model::run(args),
        Command::Kernels(args) => kernels::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            if e.chain().any(|c| c.is::<crate::gpu::GpuHang>()) {
                exit_now();
            }
            ExitCode::FAILURE
        }
    }
}

/// Exits with status 1 at once: the exit handlers of a software driver join its worker
/// threads, one of which still runs the hung kernel.
fn exit_now() -> ! {
    use std::io::Write as _;
    let _ = std::io::stderr().flush();
    let _ = std::io::stdout().flush();
    #[cfg(unix)]
    // SAFETY: _exit ends the process; nothing runs after it.
    unsafe {
        libc::_exit(1)
    }
    #[cfg(not(unix))]
    std::process::exit(1)
}
