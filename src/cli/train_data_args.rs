//! The training-data flags of `train-classifier`, which `import-model` shares (there
//! they say what the imported model was trained on).

use anyhow::{bail, Context, Result};
use clap::ValueEnum;

use crate::data::augment::Augment;
use crate::data::backdoor::{Backdoor, Corner, Trigger, DEFAULT_NOISE_STD};
use crate::data::DatasetName;
use crate::run::TrainDataConfig;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum TriggerKind {
    Corner,
    Noise,
    Wanet,
}

#[derive(clap::Args)]
pub struct TrainDataArgs {
    /// Training data: a data set (mnist, fashion_mnist, cifar10), or `backdoor` = a data set
    /// (--train_data.original) poisoned with a trigger (--train_data.backdoor).
    #[arg(long, value_name = "DATA")]
    train_data: String,
    /// The clean data set under a backdoor: mnist, fashion_mnist or cifar10.
    #[arg(long, value_name = "DATASET")]
    train_data_original: Option<DatasetName>,
    /// Trigger of the training backdoor.
    #[arg(long, value_enum, value_name = "TRIGGER")]
    train_data_backdoor: Option<TriggerKind>,
    /// Fraction of training samples poisoned (per epoch). The original's default of 1.0
    /// poisons every image and yields a constant classifier; 0.05 is what it intended.
    #[arg(long, default_value_t = 0.05, value_name = "P")]
    train_data_backdoor_p_backdoor: f32,
    /// Trigger pixel: top-left, top-right, bottom-left or bottom-right (the names mean
    /// what they say; the original swapped top-right and bottom-left).
    #[arg(long, default_value = "top-left", value_name = "CORNER")]
    train_data_backdoor_corner: Corner,
    /// Label given to poisoned samples.
    #[arg(long, default_value_t = 0, value_name = "CLASS")]
    train_data_backdoor_target_class: u32,
    /// Standard deviation of the noise trigger.
    #[arg(long, default_value_t = DEFAULT_NOISE_STD, value_name = "STD")]
    train_data_backdoor_std: f32,
    /// Clip noisy images to [0, 1] (the original 0.0.1 did not).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    train_data_backdoor_clip: bool,
    /// WaNet: the control grid is K x K (2..=8).
    #[arg(long, default_value_t = 4, value_name = "K")]
    train_data_backdoor_control_grid_width: u32,
    /// WaNet: the mean magnitude of the control grid's displacements (a value f moves a
    /// pixel by about f/2 pixels, as in the upstream).
    #[arg(long, default_value_t = 0.5, value_name = "S")]
    train_data_backdoor_warping_strength: f32,
    /// WaNet: scale of the warped coordinates about the image centre.
    #[arg(long, default_value_t = 1.0, value_name = "R")]
    train_data_backdoor_grid_rescale: f32,
    /// WaNet: the further share of samples warped with random jitter that keep their
    /// label (the paper's noise mode).
    #[arg(long, default_value_t = 0.0, value_name = "P")]
    train_data_backdoor_p_noise: f32,
    /// WaNet: the seed of the control grid [default: --seed].
    #[arg(long, value_name = "SEED")]
    train_data_backdoor_grid_seed: Option<u32>,
    /// Use only the first N training samples.
    #[arg(long, value_name = "N")]
    pub(super) train_data_max_size: Option<usize>,
    /// Augment the training batches as the later upstream does (crop p 0.8 with padding
    /// 5, rotation p 0.5 by up to 10 degrees, horizontal flip p 0.5 for CIFAR-10 only),
    /// before the trigger. Off by default; the options below change one part and imply
    /// it (`false` with one of them is refused).
    #[arg(long, action = clap::ArgAction::Set, value_name = "BOOL")]
    train_data_augment: Option<bool>,
    /// Augmentation: probability of a random crop of the zero-padded image.
    #[arg(long, value_name = "P")]
    train_data_augment_crop_p: Option<f32>,
    /// Augmentation: zero padding on each side before the crop (offsets in [0, 2·padding]).
    #[arg(long, value_name = "N")]
    train_data_augment_padding: Option<u32>,
    /// Augmentation: probability of a rotation (nearest neighbour, zero fill).
    #[arg(long, value_name = "P")]
    train_data_augment_rotation_p: Option<f32>,
    /// Augmentation: the largest rotation angle, in degrees.
    #[arg(long, value_name = "DEGREES")]
    train_data_augment_degrees: Option<f32>,
    /// Augmentation: probability of a horizontal flip.
    #[arg(long, value_name = "P")]
    train_data_augment_flip_p: Option<f32>,
}

impl TrainDataArgs {
    /// The data set and trigger, checked against a model of `output_dim` classes; a
    /// WaNet grid is drawn from `seed` unless its own seed is given.
    pub fn resolve(&self, output_dim: usize, seed: u32) -> Result<TrainDataConfig> {
        let (dataset, backdoor) = match self.train_data.as_str() {
            "backdoor" => {
                let original = self.train_data_original.context(
                    "--train_data backdoor needs --train_data.original (mnist, fashion_mnist or cifar10)",
                )?;
                let kind = self.train_data_backdoor.context(
                    "--train_data backdoor needs --train_data.backdoor (corner, noise or wanet)",
                )?;
                let trigger = match kind {
                    TriggerKind::Corner => Trigger::Corner {
                        corner: self.train_data_backdoor_corner,
                    },
                    TriggerKind::Noise => Trigger::Noise {
                        std: self.train_data_backdoor_std,
                        clip: self.train_data_backdoor_clip,
                    },
                    TriggerKind::Wanet => Trigger::Wanet {
                        control_grid_width: self.train_data_backdoor_control_grid_width,
                        warping_strength: self.train_data_backdoor_warping_strength,
                        grid_rescale: self.train_data_backdoor_grid_rescale,
                        p_noise: self.train_data_backdoor_p_noise,
                        grid_seed: self.train_data_backdoor_grid_seed.unwrap_or(seed),
                    },
                };
                let b = Backdoor {
                    trigger,
                    p_backdoor: self.train_data_backdoor_p_backdoor,
                    target_class: self.train_data_backdoor_target_class,
                };
                b.validate(output_dim)?;
                (original, Some(b))
            }
            name => (
                DatasetName::parse(name)
                    .context("--train_data takes `backdoor` or a data set name")?,
                None,
            ),
        };
        Ok(TrainDataConfig {
            dataset,
            max_size: self.train_data_max_size,
            backdoor,
            augment: self.augment(dataset)?,
        })
    }

    /// The upstream's augmentation for `dataset` with the parts given on the command
    /// line replaced; None unless asked for (a part implies it; `false` with a part is
    /// a contradiction, not a silent choice).
    fn augment(&self, dataset: DatasetName) -> Result<Option<Augment>> {
        let parts = [
            ("crop_p", self.train_data_augment_crop_p.is_some()),
            ("padding", self.train_data_augment_padding.is_some()),
            ("rotation_p", self.train_data_augment_rotation_p.is_some()),
            ("degrees", self.train_data_augment_degrees.is_some()),
            ("flip_p", self.train_data_augment_flip_p.is_some()),
        ];
        let given: Vec<&str> = parts.iter().filter(|p| p.1).map(|p| p.0).collect();
        match (self.train_data_augment, given.is_empty()) {
            (Some(false), false) => bail!(
                "--train_data.augment false contradicts --train_data.augment.{}: drop one",
                given.join(", --train_data.augment.")
            ),
            (None | Some(false), true) => return Ok(None),
            _ => {}
        }
        let d = Augment::upstream(dataset);
        Ok(Some(Augment {
            crop_p: self.train_data_augment_crop_p.unwrap_or(d.crop_p),
            padding: self.train_data_augment_padding.unwrap_or(d.padding),
            rotation_p: self.train_data_augment_rotation_p.unwrap_or(d.rotation_p),
            degrees: self.train_data_augment_degrees.unwrap_or(d.degrees),
            flip_p: self.train_data_augment_flip_p.unwrap_or(d.flip_p),
        }))
    }
}
