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
            }
            // A closed pipe (`| head`) ends the listing quietly instead of panicking.
            let mut out = std::io::stdout().lock();
            match out.write_all(text.as_bytes()) {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
                _ => Ok(()),
            }
        }
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
