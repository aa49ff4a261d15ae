//! The runtime registry of detectors and tasks, and their options.
//!
//! Each detector or task file declares one [`DetectorEntry`] / [`TaskEntry`]: its name,
//! the defaults of its config struct, the [`Opt`]s that set fields of that config
//! (`--detector.<key>` / `--task.<key>` on the command line) and its constructors.
//! [`Registry::builtin`] holds the built-in ones; a crate that uses cupbearer adds its own
//! with [`Registry::register_detector`] / [`Registry::register_task`] and hands the
//! registry to the workflows (or to [`crate::cli::main_with`]).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::detectors::{self, Detector};
use crate::tasks::{self, Task};

/// The value type of an option on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Bool,
    /// A non-negative integer.
    Int,
    Float,
    /// A string (a path, or an enum variant checked when the config is built).
    Str,
    /// One or more non-negative integers.
    Ints,
    /// One or more activation layers, by index (`1`) or name (`layer1`).
    Layers,
    /// Accepted for compatibility with the original, and ignored.
    Ignored,
}

/// One option of a detector's or task's config.
#[derive(Clone, Copy, Debug)]
pub struct Opt {
    /// The key after `--detector.` / `--task.`, in the original's dotted spelling
    /// (dashes or underscores are accepted for its dots and underscores).
    pub key: &'static str,
    /// Other accepted keys.
    pub aliases: &'static [&'static str],
    /// JSON pointers of the config fields it sets (several when fields share a flag);
    /// none for [`Kind::Ignored`].
    pub fields: &'static [&'static str],
    pub kind: Kind,
    /// Must be given (the config's default is only a placeholder).
    pub required: bool,
    pub doc: &'static str,
}

/// An optional option setting `fields`.
pub const fn opt(
    key: &'static str,
    fields: &'static [&'static str],
    kind: Kind,
    doc: &'static str,
) -> Opt {
    Opt {
        key,
        aliases: &[],
        fields,
        kind,
        required: false,
        doc,
    }
}

/// The original's detector training flags that have no effect here; every detector
/// accepts them.
pub const IGNORED_DETECTOR_OPTIONS: &[Opt] = &[
    opt(
        "train.optimizer",
        &[],
        Kind::Ignored,
        "Adam is the only optimiser.",
    ),
    opt(
        "train.check_val_every_n_epoch",
        &[],
        Kind::Ignored,
        "The original's validation sets never worked.",
    ),
    opt(
        "train.enable_progress_bar",
        &[],
        Kind::Ignored,
        "Progress bars follow --quiet.",
    ),
    opt(
        "train.pbar",
        &[],
        Kind::Ignored,
        "Progress bars follow --quiet.",
    ),
    opt(
        "abstraction.cls",
        &[],
        Kind::Ignored,
        "The original's class path of the abstraction; use --detector.abstraction.",
    ),
];

/// `key = value` pairs, as from `--detector.key value` flags: the key in any spelling,
/// the values as given (several for [`Kind::Ints`]).
pub type RawOptions = Vec<(String, Vec<String>)>;

/// What an entry's config is built from: its defaults, options and `--debug` sizes.
#[derive(Clone, Copy)]
pub struct ConfigSpec {
    /// The config struct's `Default`, as JSON ([`defaults_of`]).
    pub defaults: fn() -> Value,
    pub options: &'static [Opt],
    /// Options of a nested config (pointer of its field, its options with pointers
    /// relative to it), e.g. the abstraction inside the adversarial abstraction's.
    pub nested: &'static [(&'static str, &'static [Opt])],
    /// Field values of `--debug` runs (tiny sizes): JSON pointer, JSON value.
    pub debug: &'static [(&'static str, &'static str)],
}

/// `T::default()` as JSON, for [`ConfigSpec::defaults`].
pub fn defaults_of<T: Default + serde::Serialize>() -> Value {
    serde_json::to_value(T::default()).expect("config structs serialise")
}

impl ConfigSpec {
    /// Every option with the pointer prefix of its fields ("" for the entry's own).
    fn all<'a>(&'a self, extra: &'a [Opt]) -> impl Iterator<Item = (&'static str, &'a Opt)> + 'a {
        let own = self.options.iter().chain(extra).map(|o| ("", o));
        own.chain(
            self.nested
                .iter()
                .flat_map(|&(prefix, opts)| opts.iter().map(move |o| (prefix, o))),
        )
    }
}

/// Builds an unfitted detector from its JSON config.
pub type BuildDetector = fn(&Value) -> Result<Box<dyn Detector>>;
/// Loads a fitted detector: its JSON config, its `detector.safetensors`.
pub type LoadDetector = fn(&Value, &Path) -> Result<Box<dyn Detector>>;

/// A detector type.
#[derive(Clone, Copy)]
pub struct DetectorEntry {
    pub name: &'static str,
    pub doc: &'static str,
    pub config: ConfigSpec,
    /// An unfitted detector from its config.
    pub build: BuildDetector,
    /// A fitted one from its config and `detector.safetensors`; None for
    /// evaluation-only detectors, which train-detector refuses.
    pub load: Option<LoadDetector>,
}

/// What a task is built with besides its config.
#[derive(Clone, Debug)]
pub struct TaskEnv {
    pub data_dir: PathBuf,
    /// The command's `--seed` (tasks that compute samples draw from it).
    pub seed: u32,
}

/// A task type.
#[derive(Clone, Copy)]
pub struct TaskEntry {
    pub name: &'static str,
    pub doc: &'static str,
    pub config: ConfigSpec,
    pub build: fn(&Value, &TaskEnv) -> Result<Box<dyn Task>>,
}

/// The detectors and tasks a command can use, by name.
#[derive(Clone, Default)]
pub struct Registry {
    detectors: Vec<DetectorEntry>,
    tasks: Vec<TaskEntry>,
}

impl Registry {
    /// The built-in detectors and tasks.
    pub fn builtin() -> Self {
        let mut r = Registry::default();
        r.register_detector(detectors::mahalanobis::ENTRY);
        r.register_detector(detectors::abstraction::ENTRY);
        r.register_detector(detectors::adversarial_abstraction::ENTRY);
        r.register_detector(detectors::spectral::ENTRY);
        r.register_detector(detectors::que::ENTRY);
        r.register_detector(detectors::supervised_probe::ENTRY);
        r.register_detector(detectors::beatrix::ENTRY);
        r.register_detector(detectors::ted::ENTRY);
        r.register_detector(detectors::finetuning::ENTRY);
        r.register_detector(detectors::vae::ENTRY);
        r.register_task(tasks::backdoor::ENTRY);
        r.register_task(tasks::adversarial::ENTRY);
        r
    }

    /// Adds a detector type, replacing one of the same name.
    pub fn register_detector(&mut self, entry: DetectorEntry) {
        self.detectors.retain(|e| e.name != entry.name);
        self.detectors.push(entry);
    }

    /// Adds a task type, replacing one of the same name.
    pub fn register_task(&mut self, entry: TaskEntry) {
        self.tasks.retain(|e| e.name != entry.name);
        self.tasks.push(entry);
    }

    pub fn detectors(&self) -> &[DetectorEntry] {
        &self.detectors
    }

    pub fn tasks(&self) -> &[TaskEntry] {
        &self.tasks
    }

    pub fn detector(&self, name: &str) -> Result<&DetectorEntry> {
        self.detectors
            .iter()
            .find(|e| canonical(e.name) == canonical(name))
            .with_context(|| {
                let names: Vec<_> = self.detectors.iter().map(|e| e.name).collect();
                format!("unknown detector {name:?}; available: {}", names.join(", "))
            })
    }

    pub fn task(&self, name: &str) -> Result<&TaskEntry> {
        self.tasks
            .iter()
            .find(|e| canonical(e.name) == canonical(name))
            .with_context(|| {
                let names: Vec<_> = self.tasks.iter().map(|e| e.name).collect();
                format!("unknown task {name:?}; available: {}", names.join(", "))
            })
    }

    pub fn build_detector(&self, name: &str, config: &Value) -> Result<Box<dyn Detector>> {
        (self.detector(name)?.build)(config)
    }

    pub fn load_detector(
        &self,
        name: &str,
        config: &Value,
        path: &Path,
    ) -> Result<Box<dyn Detector>> {
        let entry = self.detector(name)?;
        let Some(load) = entry.load else {
            bail!("{name} is evaluation-only: nothing is stored to load");
        };
        if !path.is_file() {
            bail!("{} is missing: not a trained detector run", path.display());
        }
        load(config, path)
    }

    pub fn build_task(&self, name: &str, config: &Value, env: &TaskEnv) -> Result<Box<dyn Task>> {
        (self.task(name)?.build)(config, env)
    }

    /// `-h` text: every detector's options with their defaults and docs.
    pub fn detectors_help(&self) -> String {
        let mut s = String::from("Detectors and their --detector.<key> options:\n");
        for e in &self.detectors {
            let _ = writeln!(s, "\n  {}: {}", e.name, e.doc);
            options_help(&mut s, "detector", &e.config);
        }
        s.push_str("\n  every detector also accepts (and ignores) the original's:");
        for o in IGNORED_DETECTOR_OPTIONS {
            let _ = write!(s, " --detector.{}", o.key);
        }
        s.push('\n');
        s
    }

    /// `-h` text: every task's options with their defaults and docs.
    pub fn tasks_help(&self) -> String {
        let mut s = String::from("Tasks and their --task.<key> options:\n");
        for e in &self.tasks {
            let _ = writeln!(s, "\n  {}: {}", e.name, e.doc);
            options_help(&mut s, "task", &e.config);
        }
        s
    }
}

fn options_help(s: &mut String, prefix: &str, spec: &ConfigSpec) {
    let defaults = (spec.defaults)();
    let mut seen = Vec::new();
    for (base, o) in spec.all(&[]) {
        if seen.contains(&o.key) {
            continue;
        }
        seen.push(o.key);
        let default = match (o.required, o.fields.first()) {
            (true, _) => "required".to_string(),
            (false, Some(f)) => match defaults.pointer(&format!("{base}{f}")) {
                Some(Value::Null) | None => "none".to_string(),
                Some(Value::String(v)) => v.clone(),
                // f32 fields: their shortest spelling, not the widened f64's.
                Some(Value::Number(n)) if n.is_f64() => {
                    let x = n.as_f64().unwrap_or_default();
                    if f64::from(x as f32) == x {
                        format!("{}", x as f32)
                    } else {
                        format!("{x}")
                    }
                }
                Some(v) => v.to_string(),
            },
            (false, None) => "ignored".to_string(),
        };
        let _ = writeln!(
            s,
            "    --{prefix}.{:<34} {} [default: {default}]",
            o.key, o.doc
        );
    }
}

/// A key in one spelling: dots, dashes and underscores all become dashes.
fn canonical(key: &str) -> String {
    key.replace(['.', '_'], "-")
}

impl DetectorEntry {
    /// The config from `--detector.<key>` options (see [`resolve_config`]).
    pub fn resolve(&self, raw: &RawOptions, debug: bool) -> Result<Value> {
        let what = Target {
            prefix: "detector",
            name: self.name,
            extra: IGNORED_DETECTOR_OPTIONS,
        };
        resolve_config(&self.config, &what, raw, debug)
    }
}

impl TaskEntry {
    /// The config from `--task.<key>` options (see [`resolve_config`]).
    pub fn resolve(&self, raw: &RawOptions, debug: bool) -> Result<Value> {
        let what = Target {
            prefix: "task",
            name: self.name,
            extra: &[],
        };
        resolve_config(&self.config, &what, raw, debug)
    }
}

/// Whose options are resolved: the flag prefix, the entry's name, options every entry
/// of the kind accepts.
struct Target<'a> {
    prefix: &'a str,
    name: &'a str,
    extra: &'a [Opt],
}

/// Builds an entry's config: its defaults, then `--debug` sizes if `debug`, then each
/// raw option in order (a later one wins).
fn resolve_config(
    spec: &ConfigSpec,
    t: &Target<'_>,
    raw: &RawOptions,
    debug: bool,
) -> Result<Value> {
    let what = format!("{} {}", t.prefix, t.name);
    let prefix = t.prefix;
    let mut config = (spec.defaults)();
    if debug {
        for (field, value) in spec.debug {
            let value: Value = serde_json::from_str(value).expect("debug values are JSON");
            *config.pointer_mut(field).expect("debug fields exist") = value;
        }
    }
    let matches = |o: &Opt, wanted: &str| {
        canonical(o.key) == wanted || o.aliases.iter().any(|a| canonical(a) == wanted)
    };
    for (key, values) in raw {
        let wanted = canonical(key);
        let hits: Vec<_> = spec
            .all(t.extra)
            .filter(|(_, o)| matches(o, &wanted))
            .collect();
        if hits.is_empty() {
            let keys: Vec<String> = spec
                .all(&[])
                .map(|(_, o)| format!("--{prefix}.{}", o.key))
                .collect();
            bail!(
                "{what} has no option {key:?}; its options: {}",
                if keys.is_empty() {
                    "none".to_string()
                } else {
                    keys.join(", ")
                }
            );
        }
        for (base, o) in hits {
            let value =
                parse_value(o, values).with_context(|| format!("{what}: option {}", o.key))?;
            for field in o.fields {
                let pointer = format!("{base}{field}");
                let slot = pointer_slot(&mut config, &pointer).with_context(|| {
                    format!("{what}: option {} names no config field {pointer}", o.key)
                })?;
                *slot = value.clone();
            }
        }
    }
    let given = |o: &Opt| raw.iter().any(|(k, _)| matches(o, &canonical(k)));
    if let Some(o) = spec.options.iter().find(|o| o.required && !given(o)) {
        bail!("{what} needs --{prefix}.{}: {}", o.key, o.doc);
    }
    Ok(config)
}

/// The slot of `pointer` in `config`, creating it in its parent object if missing (an
/// optional field absent from the defaults).
fn pointer_slot<'a>(config: &'a mut Value, pointer: &str) -> Option<&'a mut Value> {
    let (parent, last) = pointer.rsplit_once('/')?;
    let object = if parent.is_empty() {
        config
    } else {
        config.pointer_mut(parent)?
    };
    Some(object.as_object_mut()?.entry(last).or_insert(Value::Null))
}

fn parse_value(o: &Opt, values: &[String]) -> Result<Value> {
    let one = || -> Result<&str> {
        match values {
            [v] => Ok(v),
            [] => bail!("needs a value"),
            _ => bail!("takes one value, got {}", values.len()),
        }
    };
    Ok(match o.kind {
        Kind::Ignored => Value::Null,
        Kind::Bool => match one()? {
            "true" | "True" | "1" => Value::Bool(true),
            "false" | "False" | "0" => Value::Bool(false),
            v => bail!("expected true or false, got {v:?}"),
        },
        Kind::Int => Value::from(parse_int(one()?)?),
        Kind::Float => {
            let v = one()?;
            let x: f64 = v
                .parse()
                .map_err(|_| anyhow::anyhow!("expected a number, got {v:?}"))?;
            if !x.is_finite() {
                bail!("expected a finite number, got {v:?}");
            }
            Value::from(x)
        }
        Kind::Str => Value::String(one()?.to_string()),
        Kind::Ints | Kind::Layers => {
            if values.is_empty() {
                bail!("needs at least one value");
            }
            let int = |v: &String| match (o.kind, v.strip_prefix("layer")) {
                (Kind::Layers, Some(index)) => parse_int(index),
                _ => parse_int(v),
            };
            Value::Array(
                values
                    .iter()
                    .map(|v| int(v).map(Value::from))
                    .collect::<Result<_>>()?,
            )
        }
    })
}

fn parse_int(v: &str) -> Result<u64> {
    v.parse()
        .map_err(|_| anyhow::anyhow!("expected a non-negative integer, got {v:?}"))
}
