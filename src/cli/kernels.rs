//! `cupbearer kernels`: list the WGSL kernel files (entry points, bindings, override
//! constants, variants, the CPU references that check them) and export them as the
//! starting point of a `--shader-dir`.

use std::path::{Path, PathBuf};

use std::fmt::Write as _;
use std::io::Write as _;

use anyhow::{bail, Context, Result};

use crate::gpu::shaders::{describe, Shaders, BUILTIN};

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: KernelsCommand,
}

#[derive(clap::Subcommand)]
enum KernelsCommand {
    /// Every kernel file: entry points, bindings, override constants, the variants the
    /// engine compiles, its launcher and CPU references (of --shader-dir's files where
    /// they override).
    List {
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Write the built-in kernel files into DIR, to edit and run with --shader-dir DIR.
    Export {
        dir: PathBuf,
        /// Replace existing files.
        #[arg(long)]
        overwrite: bool,
    },
    /// Run every kernel variant against its f64 CPU reference on odd shapes, and the
    /// finite-difference gradient checks that use it (of --shader-dir's files where they
    /// override): max abs / rel error and pass/fail per check and variant; exit status 1
    /// on any failure.
    Check {
        /// Only the checks that exercise this kernel file (e.g. matmul).
        #[arg(long, value_name = "NAME")]
        kernel: Option<String>,
        /// Every comparison, not one line per variant.
        #[arg(long, short)]
        verbose: bool,
        /// Write every comparison as JSON to FILE (`-` for stdout).
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
    },
    /// Time the training step's kernels one by one (ms inside a step, GFLOP/s, GB/s, and
    /// the first run's ms: the driver's compile, cold with MESA_SHADER_CACHE_DISABLE=true),
    /// the whole MLP (and CNN) step, a 1024^3 matmul and the covariance statistics: the
    /// built-in kernel files and, side by side, --shader-dir's edited ones.
    Bench {
        /// Timed repetitions per measurement (the median is reported).
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
        reps: u32,
        /// Also time the CNN step (about 0.5 s per step on a CPU).
        #[arg(long)]
        cnn: bool,
        /// Write the figures as JSON to FILE (`-` for stdout).
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
    },
}

pub fn run(args: Args) -> Result<()> {
    match args.command {
        KernelsCommand::List { json } => {
            let infos = describe(&Shaders::from_environment()?)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&infos)?);
                return Ok(());
            }
            let mut text = String::new();
            for k in infos {
                let _ = writeln!(text, "{}.wgsl  ({})", k.name, k.origin);
                if !k.prepended.is_empty() {
                    let _ = writeln!(text, "  compiled after: {}", k.prepended.join(", "));
                }
                for (name, [x, y, z]) in &k.entry_points {
                    let _ = writeln!(text, "  entry point {name} @workgroup_size({x}, {y}, {z})");
                }
                for b in &k.bindings {
                    let (g, i, n, s) = (b.group, b.binding, &b.name, &b.space);
                    let _ = writeln!(text, "  @group({g}) @binding({i}) {n} ({s})");
                }
                if !k.override_constants.is_empty() {
                    let _ = writeln!(
                        text,
                        "  override constants: {}",
                        k.override_constants.join(", ")
                    );
                }
                if !k.variants.is_empty() {
                    let _ = writeln!(text, "  variants: {}", k.variants);
                }
                let _ = writeln!(text, "  launcher: {}", k.launcher);
                if !k.references.is_empty() {
                    let _ = writeln!(text, "  checked against: {}", k.references);
                }
                let checks: Vec<&str> = crate::checks::select(Some(&k.name))?
                    .iter()
                    .map(|c| c.name)
                    .collect();
                let _ = writeln!(
                    text,
                    "  checks (cupbearer kernels check --kernel {}): {}",
                    k.name,
                    checks.join(", ")
                );
            }
            // A closed pipe (`| head`) ends the listing quietly instead of panicking.
            let mut out = std::io::stdout().lock();
            match out.write_all(text.as_bytes()) {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
                _ => Ok(()),
            }
        }
        KernelsCommand::Check {
            kernel,
            verbose,
            json,
        } => check(kernel.as_deref(), verbose, json.as_deref()),
        KernelsCommand::Bench { reps, cnn, json } => bench(reps as usize, cnn, json.as_deref()),
        KernelsCommand::Export { dir, overwrite } => {
            let paths = export(&dir, overwrite)?;
            println!(
                "{} kernel files -> {} (edit them, then run any command with --shader-dir {})",
                paths.len(),
                dir.display(),
                dir.display()
            );
            Ok(())
        }
    }
}

fn check(kernel: Option<&str>, verbose: bool, json: Option<&Path>) -> Result<()> {
    let to_stdout = json == Some(Path::new("-"));
    // With JSON on stdout the table goes to stderr, so that stdout parses.
    let say = |line: String| {
        if to_stdout {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
    };
    let report = crate::workflows::kernels::check(kernel, |check, outcomes| {
        say(format!("{}  [{}]", check.name, check.files.join(", ")));
        for line in variant_lines(outcomes, verbose) {
            say(line);
        }
    })?;
    let failed: Vec<_> = report.failures().collect();
    let total = report.outcomes.len();
    match json {
        Some(p) if p == Path::new("-") => println!("{}", serde_json::to_string_pretty(&report)?),
        Some(p) => crate::io::write_atomic(p, serde_json::to_string_pretty(&report)?.as_bytes())?,
        None => {}
    }
    if !failed.is_empty() {
        let names: std::collections::BTreeSet<_> = failed
            .iter()
            .map(|o| format!("{} {}", o.check, o.variant).trim().to_string())
            .collect();
        let names: Vec<String> = names.into_iter().collect();
        bail!(
            "{} of {total} comparisons failed, on {} ({})",
            failed.len(),
            report.adapter,
            names.join("; ")
        );
    }
    say(format!(
        "all {total} comparisons passed on {}",
        report.adapter
    ));
    Ok(())
}

fn bench(reps: usize, cnn: bool, json: Option<&Path>) -> Result<()> {
    use crate::checks::bench::{BenchOptions, KernelTime};
    let r = crate::workflows::kernels::bench(BenchOptions { reps, cnn })?;
    let mut text = String::new();
    let other = r.overridden.as_ref();
    let _ = writeln!(text, "adapter: {}", r.builtin.adapter);
    let _ = writeln!(
        text,
        "{:<3} {:<10} {:<44} {:>9} {:>8} {:>7} {:>9}{}",
        "#",
        "file",
        "kernel",
        "ms",
        "GFLOP/s",
        "GB/s",
        "first ms",
        if other.is_some() {
            "   edited ms   ratio"
        } else {
            ""
        }
    );
    let row = |text: &mut String, i: String, t: &KernelTime, o: Option<&KernelTime>| {
        let name: String = t.kernel.chars().take(44).collect();
        let gflops = t.gflops.map_or("-".to_string(), |g| format!("{g:.2}"));
        let _ = write!(
            text,
            "{i:<3} {:<10} {name:<44} {:>9.3} {gflops:>8} {:>7.2} {:>9.1}",
            t.file, t.ms, t.gbps, t.first_ms
        );
        if let Some(o) = o {
            let _ = write!(text, "   {:>9.3} {:>7.2}", o.ms, o.ms / t.ms);
        }
        text.push('\n');
    };
    for (i, t) in r.builtin.mlp_step_kernels.iter().enumerate() {
        let o = other.map(|o| &o.mlp_step_kernels[i]);
        row(&mut text, i.to_string(), t, o);
    }
    row(
        &mut text,
        "-".into(),
        &r.builtin.matmul_1024,
        other.map(|o| &o.matmul_1024),
    );
    let cov = other.map(|o| &o.covariance_4096x256);
    row(&mut text, "-".into(), &r.builtin.covariance_4096x256, cov);
    let step = |name: &str, b: Option<f64>, o: Option<f64>| {
        let (Some(b), text) = (b, name) else {
            return String::new();
        };
        match o {
            Some(o) => format!(
                "{text}: {b:.2} ms built-in, {o:.2} ms edited (ratio {:.2})\n",
                o / b
            ),
            None => format!("{text}: {b:.2} ms\n"),
        }
    };
    text.push_str(&step(
        "an empty submit and its wait",
        Some(r.builtin.submit_ms),
        other.map(|o| o.submit_ms),
    ));
    text.push_str(&step(
        "MLP training step (batch 128, one submit)",
        Some(r.builtin.mlp_step_ms),
        other.map(|o| o.mlp_step_ms),
    ));
    text.push_str(&step(
        "CNN training step (batch 128, one submit)",
        r.builtin.cnn_step_ms,
        other.and_then(|o| o.cnn_step_ms),
    ));
    let report = serde_json::to_string_pretty(&r)?;
    match json {
        Some(p) if p == Path::new("-") => {
            eprint!("{text}");
            println!("{report}");
        }
        Some(p) => {
            print!("{text}");
            crate::io::write_atomic(p, report.as_bytes())?;
        }
        None => print!("{text}"),
    }
    Ok(())
}

/// One line per variant (every comparison with `verbose`), and every failure with why.
fn variant_lines(outcomes: &[crate::checks::Outcome], verbose: bool) -> Vec<String> {
    let error = |v: f64| {
        if v.is_nan() {
            "-".to_string()
        } else {
            format!("{v:.1e}")
        }
    };
    let line = |label: &str, group: &[&crate::checks::Outcome]| {
        let max =
            |f: fn(&crate::checks::Outcome) -> f64| group.iter().map(|o| f(o)).fold(0.0, f64::max);
        let ok = group.iter().all(|o| o.passed);
        format!(
            "  {label:<58} {:>3} cases  max abs {:>7}  max rel {:>7}  {:>8} of tolerance  {}",
            group.len(),
            error(max(|o| o.max_abs_error)),
            error(max(|o| o.max_rel_error)),
            match max(|o| o.tolerance_used) {
                u if u <= 1.0 => format!("{:.0}%", 100.0 * u),
                u if u.is_finite() => format!("{u:.1}x"),
                _ => "inf".to_string(),
            },
            if ok { "ok" } else { "FAILED" }
        )
    };
    let mut lines = Vec::new();
    let mut variants: Vec<&str> = Vec::new();
    for o in outcomes {
        if !variants.contains(&o.variant.as_str()) {
            variants.push(&o.variant);
        }
    }
    for v in variants {
        let group: Vec<_> = outcomes.iter().filter(|o| o.variant == v).collect();
        if verbose {
            for o in &group {
                lines.push(line(&format!("{v} / {}", o.case), &[o]));
            }
        } else {
            lines.push(line(if v.is_empty() { "(all)" } else { v }, &group));
        }
        for o in group.iter().filter(|o| !o.passed) {
            let why = o.message.as_deref().unwrap_or("");
            lines.push(format!("    FAILED {}: {why}", o.case));
        }
    }
    lines
}

/// Writes every built-in kernel file into `dir` (the starting point of an override
/// directory); existing files are refused unless `overwrite`.
pub fn export(dir: &Path, overwrite: bool) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let paths: Vec<PathBuf> = BUILTIN
        .iter()
        .map(|(n, _)| dir.join(format!("{n}.wgsl")))
        .collect();
    if let (false, Some(p)) = (overwrite, paths.iter().find(|p| p.exists())) {
        bail!(
            "refusing to overwrite {}: choose another directory or pass --overwrite",
            p.display()
        );
    }
    for (path, (_, source)) in paths.iter().zip(BUILTIN) {
        crate::io::write_atomic(path, source.as_bytes())?;
    }
    Ok(paths)
}
