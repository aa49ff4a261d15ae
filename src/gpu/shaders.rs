//! The WGSL kernel files: the built-in sources (`shaders/*.wgsl`, compiled into the
//! binary) and run-time overrides from a directory (`--shader-dir`,
//! `CUPBEARER_SHADER_DIR`), so that an edited kernel runs without rebuilding the crate.
//! Launchers fetch their file through [`crate::gpu::GpuContext::shader`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Every kernel file, by name (the file stem).
pub const BUILTIN: &[(&str, &str)] = &[
    (
        "abstraction",
        include_str!("../../shaders/abstraction.wgsl"),
    ),
    ("adam", include_str!("../../shaders/adam.wgsl")),
    ("attack", include_str!("../../shaders/attack.wgsl")),
    ("batch", include_str!("../../shaders/batch.wgsl")),
    ("beatrix", include_str!("../../shaders/beatrix.wgsl")),
    ("conv", include_str!("../../shaders/conv.wgsl")),
    ("gate", include_str!("../../shaders/gate.wgsl")),
    ("knn", include_str!("../../shaders/knn.wgsl")),
    ("logistic", include_str!("../../shaders/logistic.wgsl")),
    ("loss", include_str!("../../shaders/loss.wgsl")),
    ("matmul", include_str!("../../shaders/matmul.wgsl")),
    ("reduce", include_str!("../../shaders/reduce.wgsl")),
    ("rng", include_str!("../../shaders/rng.wgsl")),
    ("stats", include_str!("../../shaders/stats.wgsl")),
    ("step", include_str!("../../shaders/step.wgsl")),
    ("vae", include_str!("../../shaders/vae.wgsl")),
];

/// The environment variable naming an override directory.
pub const SHADER_DIR_ENV: &str = "CUPBEARER_SHADER_DIR";

/// An overriding file: where it came from and its SHA-256 (recorded in run files).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Override {
    pub kernel: String,
    pub path: PathBuf,
    pub sha256: String,
    /// Whether it differs from the built-in file (an unedited export does not).
    #[serde(default)]
    pub edited: bool,
    #[serde(skip)]
    pub source: String,
}

/// The kernel sources a context compiles: built-in ones, some replaced by files.
#[derive(Clone, Debug, Default)]
pub struct Shaders {
    overrides: BTreeMap<String, Override>,
}

/// The override directory of this process (set once by the CLI), else the environment.
static DEFAULT_DIR: OnceLock<Option<PathBuf>> = OnceLock::new();

/// Sets the override directory every later [`Shaders::from_environment`] uses (the
/// CLI's `--shader-dir`); the first call wins.
pub fn set_default_dir(dir: Option<PathBuf>) {
    let _ = DEFAULT_DIR.set(dir);
}

impl Shaders {
    /// The built-in sources only.
    pub fn builtin() -> Self {
        Shaders::default()
    }

    /// `--shader-dir` if the CLI set one, else `$CUPBEARER_SHADER_DIR`, else built-in.
    pub fn from_environment() -> Result<Self> {
        let dir = match DEFAULT_DIR.get() {
            Some(Some(dir)) => Some(dir.clone()),
            _ => std::env::var_os(SHADER_DIR_ENV).map(PathBuf::from),
        };
        dir.map_or_else(|| Ok(Shaders::builtin()), |d| Shaders::from_dir(&d))
    }

    /// Every `DIR/<name>.wgsl` replaces the built-in file of that name; a `.wgsl` file
    /// that names no kernel file is an error (a typo must not run the built-in).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let entries = std::fs::read_dir(dir)
            .with_context(|| format!("shader dir {}: cannot read it", dir.display()))?;
        let mut overrides = BTreeMap::new();
        for entry in entries {
            let path = entry?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("wgsl") {
                continue;
            }
            let stem = path
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or_default();
            if !BUILTIN.iter().any(|(n, _)| *n == stem) {
                let names: Vec<&str> = BUILTIN.iter().map(|(n, _)| *n).collect();
                bail!(
                    "{}: no kernel file is called {stem}.wgsl; the files are {}.wgsl",
                    path.display(),
                    names.join(".wgsl, ")
                );
            }
            let source = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            overrides.insert(
                stem.to_string(),
                Override {
                    kernel: stem.to_string(),
                    sha256: format!("{:x}", Sha256::digest(source.as_bytes())),
                    edited: BUILTIN.iter().any(|(n, b)| *n == stem && *b != source),
                    path,
                    source,
                },
            );
        }
        Ok(Shaders { overrides })
    }

    /// These sources with kernel file `name` replaced by `source` (edited in memory, as
    /// the browser's kernel panel does); `origin` names it in errors and run files.
    pub fn with_source(mut self, name: &str, source: String, origin: &str) -> Result<Self> {
        let Some((_, builtin)) = BUILTIN.iter().find(|(n, _)| *n == name) else {
            let names: Vec<&str> = BUILTIN.iter().map(|(n, _)| *n).collect();
            bail!(
                "no kernel file is called {name}; the files are {}",
                names.join(", ")
            );
        };
        let edited = *builtin != source;
        self.overrides.insert(
            name.to_string(),
            Override {
                kernel: name.to_string(),
                path: PathBuf::from(origin),
                sha256: format!("{:x}", Sha256::digest(source.as_bytes())),
                edited,
                source,
            },
        );
        Ok(self)
    }

    /// The source of kernel file `name` (panics on a name that is not in [`BUILTIN`]:
    /// launchers name their own files).
    pub fn get(&self, name: &str) -> &str {
        if let Some(o) = self.overrides.get(name) {
            return &o.source;
        }
        BUILTIN
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, s)| *s)
            .unwrap_or_else(|| panic!("no kernel file {name}"))
    }

    /// Where the file of `name` comes from, for error messages.
    pub fn origin(&self, name: &str) -> String {
        match self.overrides.get(name) {
            Some(o) => o.path.display().to_string(),
            None => format!("shaders/{name}.wgsl (built in)"),
        }
    }

    /// The overriding files, by kernel name.
    pub fn overrides(&self) -> Vec<Override> {
        self.overrides.values().cloned().collect()
    }
}

/// Checks a kernel's concatenated source before wgpu sees it, so that a broken file
/// (an edited override, usually) is reported at its own path, line and column with the
/// source line and naga's message; and that the launcher's entry point exists.
pub(crate) fn validate(
    source: &str,
    spec: &crate::gpu::KernelSpec<'_>,
    shaders: &Shaders,
) -> std::result::Result<(), String> {
    let module = validate_source(source, spec.parts, spec.generated, shaders)?;
    if !module.entry_points.iter().any(|ep| ep.name == spec.entry) {
        let files: Vec<String> = spec.parts.iter().map(|p| shaders.origin(p)).collect();
        return Err(format!(
            "no entry point `{}` in {} (the launcher dispatches it)",
            spec.entry,
            files.join(" + ")
        ));
    }
    Ok(())
}

/// Checks kernel file `name` as the engine compiles it, after the files prepended to
/// it ([`NOTES`]): naga's parse and validation, errors at the file's own line:column
/// (how the browser's kernel panel checks an edit before it runs).
pub fn validate_file(shaders: &Shaders, name: &str) -> std::result::Result<(), String> {
    let notes = NOTES
        .iter()
        .find(|n| n.name == name)
        .ok_or_else(|| format!("no kernel file is called {name}"))?;
    let parts: Vec<&str> = notes
        .prepended
        .iter()
        .copied()
        .chain([notes.name])
        .collect();
    let source: String = parts.iter().map(|p| shaders.get(p)).collect();
    validate_source(&source, &parts, None, shaders).map(|_| ())
}

/// naga's parse and validation of `source`, the concatenation of `parts` and then
/// `generated`; an error names the part, line and column it is in.
fn validate_source(
    source: &str,
    parts: &[&str],
    generated: Option<&str>,
    shaders: &Shaders,
) -> std::result::Result<naga::Module, String> {
    // Where each part starts in `source`.
    let mut starts = Vec::new();
    let mut at = 0;
    for p in parts {
        starts.push((shaders.origin(p), shaders.get(p), at));
        at += shaders.get(p).len();
    }
    if let Some(g) = generated {
        starts.push(("generated code".to_string(), g, at));
    }
    let locate = |offset: usize, message: &str| -> String {
        let (origin, text, start) = starts
            .iter()
            .rev()
            .find(|(_, _, s)| *s <= offset)
            .expect("offsets start at 0");
        let local = (offset - start).min(text.len());
        let before = &text[..local];
        let line = before.matches('\n').count() + 1;
        let col = local - before.rfind('\n').map_or(0, |i| i + 1) + 1;
        let code = text.lines().nth(line - 1).unwrap_or("");
        format!("{origin}:{line}:{col}: {message}\n    {code}")
    };
    let module = naga::front::wgsl::parse_str(source).map_err(|e| {
        let offset = e.location(source).map_or(0, |l| l.offset as usize);
        locate(offset, e.message())
    })?;
    let mut validator = naga::valid::Validator::new(
        naga::valid::ValidationFlags::all(),
        naga::valid::Capabilities::all(),
    );
    validator.validate(&module).map_err(|e| {
        let offset = e
            .spans()
            .next()
            .map_or(0, |(span, _)| span.to_range().map_or(0, |r| r.start));
        let mut message = e.as_inner().to_string();
        let mut cause = std::error::Error::source(e.as_inner());
        while let Some(c) = cause {
            message.push_str(&format!(": {c}"));
            cause = c.source();
        }
        locate(offset, &message)
    })?;
    Ok(module)
}

/// What a kernel file is compiled with, where its launcher lives and what checks it.
pub struct FileNotes {
    pub name: &'static str,
    /// Files concatenated before it (shared structs and functions).
    pub prepended: &'static [&'static str],
    pub launcher: &'static str,
    /// The variants the engine compiles, when there are several.
    pub variants: &'static str,
    /// The f64 CPU references the tests check it against.
    pub references: &'static str,
}

pub const NOTES: &[FileNotes] = &[
    FileNotes { name: "abstraction", prepended: &["step"], launcher: "gpu::abstraction", variants: "GRADS override: losses only, or with gradients", references: "cosine_distance_reference, kl_divergence_reference" },
    FileNotes { name: "adam", prepended: &["step"], launcher: "gpu::adam", variants: "", references: "adam_reference" },
    FileNotes { name: "attack", prepended: &["rng", "step"], launcher: "gpu::attack", variants: "entry points start (random start in the eps ball) and update (FGSM / PGD step)", references: "attack_start_reference, attack_update_reference" },
    FileNotes { name: "batch", prepended: &["rng", "step"], launcher: "gpu::batch", variants: "triggers: none, corner pixel, Gaussian noise, WaNet warp (bicubic field, bilinear sampling, noise mode); override constants WRITE_T, F32_PIXELS", references: "data::backdoor::batch_reference (wanet_position, bilinear)" },
    FileNotes { name: "beatrix", prepended: &[], launcher: "gpu::beatrix", variants: "entry points features and deviation", references: "gram_features_reference, gram_deviation_reference" },
    FileNotes { name: "conv", prepended: &[], launcher: "gpu::conv", variants: "entry points im2col, col2im, max pool (+ gradient), global max (+ gradient)", references: "max_pool_reference, max_pool_grad_reference, global_max_reference, global_max_grad_reference; im2col via the conv layer's reference (model::layers)" },
    FileNotes { name: "gate", prepended: &[], launcher: "gpu::gate", variants: "", references: "gate_reference, gate_grad_reference" },
    FileNotes { name: "knn", prepended: &[], launcher: "gpu::knn", variants: "entry points normalize_rows, topk, ranks", references: "order_reference" },
    FileNotes { name: "logistic", prepended: &[], launcher: "gpu::logistic", variants: "entry points irls (per-sample Newton terms) and scale_rows", references: "irls_reference" },
    FileNotes { name: "loss", prepended: &["step"], launcher: "gpu::loss", variants: "", references: "softmax_cross_entropy_reference" },
    FileNotes { name: "matmul", prepended: &[], launcher: "gpu::matmul", variants: "main_tiled (GPUs), or main_regblock generated in Rust after this file (software adapters: bm x 4·bn4 register blocks, 4x4 for products narrower than that; vec4 loads and stores where aligned); override constants A_KMAJOR, B_NMAJOR, BIAS, RELU, RELU_MASK", references: "matmul_reference" },
    FileNotes { name: "reduce", prepended: &[], launcher: "gpu::reduce", variants: "", references: "column_sums_reference" },
    FileNotes { name: "rng", prepended: &[], launcher: "(prepended to batch, attack and vae)", variants: "", references: "rng::rand_u32 (the host's copy of the hash)" },
    FileNotes { name: "stats", prepended: &[], launcher: "gpu::stats", variants: "entry points center, merge_gram, merge_mean, row_dot", references: "mean_and_gram_reference" },
    FileNotes { name: "step", prepended: &[], launcher: "(prepended to adam, loss, abstraction, batch, attack, vae)", variants: "", references: "" },
    FileNotes { name: "vae", prepended: &["step", "rng"], launcher: "gpu::vae", variants: "entry points sample (reparameterisation), vae_loss, latent_grad; override constants NOISE, GRADS", references: "sample_reference, loss_reference, latent_grad_reference" },
];

/// One binding of a kernel file, as naga reads it.
#[derive(Clone, Debug, Serialize)]
pub struct BindingInfo {
    pub group: u32,
    pub binding: u32,
    pub name: String,
    /// `uniform`, `storage, read` or `storage, read_write`.
    pub space: String,
}

/// What `cupbearer kernels list` says of a file.
#[derive(Clone, Debug, Serialize)]
pub struct KernelInfo {
    pub name: String,
    pub origin: String,
    pub entry_points: Vec<(String, [u32; 3])>,
    pub bindings: Vec<BindingInfo>,
    pub override_constants: Vec<String>,
    pub prepended: Vec<String>,
    pub launcher: String,
    pub variants: String,
    pub references: String,
}

/// Parses every kernel file (with the files prepended to it) and describes it.
pub fn describe(shaders: &Shaders) -> Result<Vec<KernelInfo>> {
    NOTES
        .iter()
        .map(|n| {
            let prefix: String = n.prepended.iter().map(|p| shaders.get(p)).collect();
            let own = shaders.get(n.name);
            let module = naga::front::wgsl::parse_str(&format!("{prefix}{own}"))
                .map_err(|e| anyhow::anyhow!("{}: {}", shaders.origin(n.name), e.message()))?;
            let bindings = module
                .global_variables
                .iter()
                .filter_map(|(_, g)| {
                    let rb = g.binding.as_ref()?;
                    let space = match g.space {
                        naga::AddressSpace::Uniform => "uniform".to_string(),
                        naga::AddressSpace::Storage { access } => {
                            if access.contains(naga::StorageAccess::STORE) {
                                "storage, read_write".into()
                            } else {
                                "storage, read".into()
                            }
                        }
                        other => format!("{other:?}"),
                    };
                    Some(BindingInfo {
                        group: rb.group,
                        binding: rb.binding,
                        name: g.name.clone().unwrap_or_default(),
                        space,
                    })
                })
                .collect();
            Ok(KernelInfo {
                name: n.name.into(),
                origin: shaders.origin(n.name),
                entry_points: module
                    .entry_points
                    .iter()
                    .map(|e| (e.name.clone(), e.workgroup_size))
                    .collect(),
                bindings,
                override_constants: module
                    .overrides
                    .iter()
                    .filter_map(|(_, o)| o.name.clone())
                    .collect(),
                prepended: n.prepended.iter().map(|p| p.to_string()).collect(),
                launcher: n.launcher.into(),
                variants: n.variants.into(),
                references: n.references.into(),
            })
        })
        .collect()
}
