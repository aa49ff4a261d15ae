//! The adversarial abstraction detector (cupbearer 0.0.1's `adversarial_abstraction`):
//! eval-only. For every test batch it starts from a trained abstraction, takes
//! `num_steps` Adam steps in which the abstract steps minimise the loss on trusted data
//! and on the test batch while the τ maps minimise it on trusted data but *maximise* it
//! on the test batch, scores the batch with the finetuned abstraction, and restores it.
//! Anomalies, which the trusted data does not explain, should gain the most.
//!
//! As in the original, a test batch mixes normal and anomalous samples (in the mix's
//! proportions), and the trusted loss is clipped at its level on the whole trusted set
//! (no gradient below it). Fixed: `clip false` works (0.0.1 crashed), and the batch size
//! follows `--detector.max_batch_size` (0.0.1 ignored it).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::abstraction::{Abstraction, AbstractionConfig};
use super::{Detector, LayerScores, MixSamples, SampleSet};
use crate::gpu::adam::adam_reference;
use crate::gpu::GpuContext;
use crate::model::GpuMlp;
use crate::registry::{defaults_of, opt, ConfigSpec, DetectorEntry, Kind, Opt};
use crate::run::{DetectorRunConfig, DETECTOR_FILE};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdversarialAbstractionConfig {
    /// A trained `abstraction` detector run; without one the abstraction starts random.
    pub load_path: Option<PathBuf>,
    /// Trusted samples per finetuning step.
    pub num_train_samples: usize,
    pub num_steps: usize,
    /// Weight of the trusted loss (the test batch gets 1 - w).
    pub normal_weight: f64,
    /// No trusted gradient while the trusted loss is below its initial level.
    pub clip: bool,
    pub learning_rate: f64,
    /// The abstraction's configuration when it starts random.
    pub abstraction: AbstractionConfig,
}

impl Default for AdversarialAbstractionConfig {
    /// The original's defaults.
    fn default() -> Self {
        AdversarialAbstractionConfig {
            load_path: None,
            num_train_samples: 128,
            num_steps: 1,
            normal_weight: 0.5,
            clip: true,
            learning_rate: 1e-3,
            abstraction: AbstractionConfig::default(),
        }
    }
}

/// The trusted samples the finetuning steps cycle through, and the clip level of the
/// trusted loss.
struct TrustedStream<'a> {
    samples: &'a SampleSet<'a>,
    /// Where the next step's samples start.
    next: usize,
    clip_level: Option<f64>,
}

pub struct AdversarialAbstraction {
    config: AdversarialAbstractionConfig,
    base: Option<Abstraction>,
}

impl AdversarialAbstraction {
    pub fn build(config: &serde_json::Value) -> Result<Box<dyn Detector>> {
        let config: AdversarialAbstractionConfig =
            serde_json::from_value(config.clone()).context("adversarial_abstraction config")?;
        if !(config.normal_weight >= 0.0 && config.normal_weight <= 1.0) {
            bail!(
                "normal_weight must be in [0, 1], got {}",
                config.normal_weight
            );
        }
        if config.num_train_samples == 0 {
            bail!("num_train_samples must be >= 1");
        }
        let base = match &config.load_path {
            None => None,
            Some(dir) => {
                let run = DetectorRunConfig::load(dir)?;
                if run.detector_kind != "abstraction" {
                    bail!(
                        "{} holds a {} detector; --detector.load_path needs an abstraction run",
                        dir.display(),
                        run.detector_kind
                    );
                }
                Some(Abstraction::load_trained(
                    &run.detector,
                    &dir.join(DETECTOR_FILE),
                )?)
            }
        };
        Ok(Box::new(AdversarialAbstraction { config, base }))
    }

    /// The abstraction to start every batch from.
    fn start(&self, model: &GpuMlp) -> Result<Abstraction> {
        match &self.base {
            Some(b) => Ok(b.clone()),
            None => {
                eprintln!("Randomly initializing abstraction (no --detector.load_path).");
                let mut config = self.config.abstraction.clone();
                // Random abstractions have no trusted score statistics.
                config.normalize = false;
                let mut a = Abstraction::new(config)?;
                a.init(&model.config, 0)?;
                Ok(a)
            }
        }
    }

    /// Finetunes `base` on one test batch (its normal and anomalous parts) and scores
    /// both parts with the result.
    fn finetune_and_score(
        &self,
        ctx: &GpuContext,
        model: &GpuMlp,
        base: &Abstraction,
        parts: [&SampleSet<'_>; 2],
        trusted: &mut TrustedStream<'_>,
    ) -> Result<[LayerScores; 2]> {
        let clip_level = trusted.clip_level;
        let mut a = base.clone();
        let (flat, taus) = a.flat_params();
        let mut params: Vec<f64> = flat.iter().map(|&v| v as f64).collect();
        let (mut m, mut v) = (vec![0.0; params.len()], vec![0.0; params.len()]);
        let w = self.config.normal_weight;
        let sizes = parts.map(|p| p.indices.len() as f64);
        let total: f64 = sizes.iter().sum();
        for t in 1..=self.config.num_steps {
            // The next trusted samples, cycling through the trusted set.
            let k = self.config.num_train_samples;
            let all = trusted.samples.indices;
            let chosen: Vec<u32> = (0..k)
                .map(|i| all[(trusted.next + i) % all.len()])
                .collect();
            trusted.next = (trusted.next + k) % all.len();
            let t_set = SampleSet {
                indices: &chosen,
                ..*trusted.samples
            };
            let (t_raw, t_grads) = a.losses_and_gradients(ctx, model, &t_set, k, true)?;
            let t_loss = Abstraction::training_loss(&t_raw);
            let t_weight = if clip_level.is_some_and(|c| t_loss < c) {
                0.0
            } else {
                w
            };
            let mut combined: Vec<f32> = t_grads
                .expect("requested")
                .iter()
                .map(|&g| (t_weight * g as f64) as f32)
                .collect();
            for (part, size) in parts.iter().zip(sizes) {
                if part.indices.is_empty() {
                    continue;
                }
                let n = part.indices.len();
                let (_, g) = a.losses_and_gradients(ctx, model, part, n, true)?;
                // The batch's mean loss is the size-weighted mean of its parts'.
                let scale = (1.0 - w) * size / total;
                for (i, (c, &g)) in combined.iter_mut().zip(&g.expect("requested")).enumerate() {
                    // τ maximises the test batch's loss, the abstract steps minimise it.
                    let sign = if i < taus { -1.0 } else { 1.0 };
                    *c += (sign * scale * g as f64) as f32;
                }
            }
            adam_reference(
                &mut params,
                &combined,
                &mut m,
                &mut v,
                self.config.learning_rate,
                t as i32,
            );
            let flat: Vec<f32> = params.iter().map(|&p| p as f32).collect();
            a.set_flat_params(&flat);
        }
        let score = |part: &SampleSet<'_>| -> Result<LayerScores> {
            let n = part.indices.len().max(1);
            let (mut raw, _) = a.losses_and_gradients(ctx, model, part, n, false)?;
            a.standardize(&mut raw)?;
            Ok(raw)
        };
        Ok([score(parts[0])?, score(parts[1])?])
    }
}

impl Detector for AdversarialAbstraction {
    fn kind(&self) -> &'static str {
        "adversarial_abstraction"
    }

    fn config(&self) -> serde_json::Value {
        serde_json::to_value(&self.config).expect("plain struct serialises")
    }

    fn fit(&mut self, _: &GpuContext, _: &GpuMlp, _: &SampleSet<'_>, _: bool) -> Result<()> {
        bail!(
            "adversarial_abstraction is evaluation-only (as in the original): train an \
             `abstraction` detector and pass its run to eval-detector as --detector.load_path"
        )
    }

    fn layer_scores(
        &self,
        _: &GpuContext,
        _: &GpuMlp,
        _: &SampleSet<'_>,
        _: usize,
    ) -> Result<LayerScores> {
        bail!(
            "adversarial_abstraction scores whole test mixes (with trusted data), not single sets"
        )
    }

    fn needs_trusted(&self) -> bool {
        true
    }

    fn score_mix(
        &self,
        ctx: &GpuContext,
        model: &GpuMlp,
        mix: &MixSamples<'_>,
        batch_size: usize,
    ) -> Result<(LayerScores, LayerScores)> {
        let trusted = mix
            .trusted
            .context("adversarial_abstraction needs the task's trusted data")?;
        if trusted.indices.is_empty() {
            bail!("adversarial_abstraction needs trusted samples");
        }
        let base = self.start(model)?;
        // The clip level: the training loss on the whole trusted set.
        let clip_level = if self.config.clip {
            let (raw, _) = base.losses_and_gradients(ctx, model, trusted, 2048, false)?;
            Some(Abstraction::training_loss(&raw))
        } else {
            None
        };
        let (normal, anomalous) = (mix.normal, mix.anomalous);
        let total = normal.indices.len() + anomalous.indices.len();
        let batches = total.div_ceil(batch_size.max(1)).max(1);
        let chunk = |n: usize| n.div_ceil(batches).max(1);
        let (cn, ca) = (chunk(normal.indices.len()), chunk(anomalous.indices.len()));
        let mut out: [Option<LayerScores>; 2] = [None, None];
        let mut stream = TrustedStream {
            samples: trusted,
            next: 0,
            clip_level,
        };
        for b in 0..batches {
            let slice = |set: &SampleSet<'_>, c: usize| -> Vec<u32> {
                let n = set.indices.len();
                set.indices[(b * c).min(n)..((b + 1) * c).min(n)].to_vec()
            };
            let (ni, ai) = (slice(normal, cn), slice(anomalous, ca));
            let parts = [
                SampleSet {
                    indices: &ni,
                    ..*normal
                },
                SampleSet {
                    indices: &ai,
                    ..*anomalous
                },
            ];
            let scored =
                self.finetune_and_score(ctx, model, &base, [&parts[0], &parts[1]], &mut stream)?;
            for ((acc, s), part) in out.iter_mut().zip(scored).zip(&parts) {
                if part.indices.is_empty() {
                    continue;
                }
                match acc {
                    None => *acc = Some(s),
                    Some(a) => {
                        for (dst, src) in a.scores.iter_mut().zip(s.scores) {
                            dst.extend(src);
                        }
                    }
                }
            }
        }
        let [n, a] = out.map(|s| s.context("an empty side of the test mix"));
        Ok((n?, a?))
    }

    fn save(&self, _: &std::path::Path) -> Result<()> {
        bail!("adversarial_abstraction is evaluation-only: nothing to save")
    }
}

const OPTIONS: &[Opt] = &[
    opt(
        "load_path",
        &["/load_path"],
        Kind::Str,
        "A trained abstraction detector run [none: a random abstraction].",
    ),
    opt(
        "num_train_samples",
        &["/num_train_samples"],
        Kind::Int,
        "Trusted samples per finetuning step.",
    ),
    opt(
        "num_steps",
        &["/num_steps"],
        Kind::Int,
        "Finetuning steps per test batch.",
    ),
    opt(
        "normal_weight",
        &["/normal_weight"],
        Kind::Float,
        "Weight of the trusted loss.",
    ),
    opt(
        "clip",
        &["/clip"],
        Kind::Bool,
        "No trusted gradient below the trusted loss's level.",
    ),
    Opt {
        aliases: &["train.learning_rate"],
        ..opt(
            "train.optimizer.learning_rate",
            &["/learning_rate"],
            Kind::Float,
            "Adam learning rate.",
        )
    },
];

/// The registry entry.
pub const ENTRY: DetectorEntry = DetectorEntry {
    name: "adversarial_abstraction",
    doc: "Evaluation only: finetunes an abstraction on each test batch (eval-detector --detector adversarial_abstraction).",
    config: ConfigSpec {
        defaults: defaults_of::<AdversarialAbstractionConfig>,
        options: OPTIONS,
        nested: &[("/abstraction", super::abstraction::OPTIONS)],
        debug: &[
            ("/num_train_samples", "1"),
            ("/num_steps", "1"),
            ("/abstraction/batch_size", "2"),
            ("/abstraction/num_epochs", "1"),
            ("/abstraction/max_steps", "1"),
        ],
    },
    build: AdversarialAbstraction::build,
    load: None,
};
