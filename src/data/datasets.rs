//! Image classification data sets: MNIST, Fashion-MNIST, CIFAR-10 and a synthetic stand-in.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{bail, Result};

use super::{cifar, idx};
use crate::gpu::batch::ByteImages;

/// A data set that can be downloaded and loaded from its official files.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DatasetName {
    Mnist,
    FashionMnist,
    Cifar10,
}

impl DatasetName {
    pub const ALL: [DatasetName; 3] = [
        DatasetName::Mnist,
        DatasetName::FashionMnist,
        DatasetName::Cifar10,
    ];

    /// Parses `"mnist"`, `"fashion_mnist"` (`"fashion-mnist"` too, the upstream spelling) or
    /// `"cifar10"` (`"cifar-10"`, `"cifar_10"`), ignoring case.
    pub fn parse(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "mnist" => Ok(Self::Mnist),
            "fashion_mnist" | "fashion-mnist" => Ok(Self::FashionMnist),
            "cifar10" | "cifar-10" | "cifar_10" => Ok(Self::Cifar10),
            _ => {
                let valid: Vec<_> = Self::ALL.iter().map(|n| n.as_str()).collect();
                bail!("unknown data set '{s}'; valid names: {}", valid.join(", "))
            }
        }
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Mnist => "mnist",
            Self::FashionMnist => "fashion_mnist",
            Self::Cifar10 => "cifar10",
        }
    }
}

impl FromStr for DatasetName {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::parse(s)
    }
}

impl fmt::Display for DatasetName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    Train,
    Test,
}

impl Split {
    /// Prefix of the IDX file names (`t10k` is the historic name of the MNIST test set).
    pub(crate) fn file_prefix(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "t10k",
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "test",
        }
    }
}

/// Uncompressed IDX file names (images, labels) of a split.
pub(crate) fn idx_file_names(split: Split) -> [String; 2] {
    let p = split.file_prefix();
    [
        format!("{p}-images-idx3-ubyte"),
        format!("{p}-labels-idx1-ubyte"),
    ]
}

/// Where the Debian package `dataset-fashion-mnist` installs its files.
const DEBIAN_FASHION_MNIST_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// An in-memory labelled image data set of 8-bit pixels.
#[derive(Clone, Debug)]
pub struct Dataset {
    /// e.g. `"mnist/train"`.
    pub name: String,
    pub height: usize,
    pub width: usize,
    pub channels: usize,
    pub num_classes: usize,
    /// `len() * sample_dim()` bytes, HWC order per image.
    pub images: Vec<u8>,
    pub labels: Vec<u8>,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Bytes per image: `height * width * channels`.
    pub fn sample_dim(&self) -> usize {
        self.height * self.width * self.channels
    }

    /// Pixels of image `i` (panics if `i >= len()`, like slice indexing).
    pub fn image(&self, i: usize) -> &[u8] {
        let d = self.sample_dim();
        &self.images[i * d..(i + 1) * d]
    }

    /// The images and labels as the GPU upload takes them.
    pub fn as_images(&self) -> ByteImages<'_> {
        ByteImages {
            name: &self.name,
            pixels: &self.images,
            labels: &self.labels,
            shape: [self.height, self.width, self.channels],
            num_classes: self.num_classes,
        }
    }

    /// Keeps the first `n` samples (no-op if `n >= len()`).
    pub fn truncate(&mut self, n: usize) {
        if n < self.len() {
            self.images.truncate(n * self.sample_dim());
            self.labels.truncate(n);
        }
    }

    /// Loads a split of `name` from the files found under `data_dir`.
    ///
    /// MNIST and Fashion-MNIST: `{train,t10k}-images-idx3-ubyte[.gz]` and
    /// `{train,t10k}-labels-idx1-ubyte[.gz]`, the uncompressed file preferred when both exist
    /// (a user who unpacked the files may have fixed or replaced them). Directories searched,
    /// in order: `<data_dir>/<name>/`, `<data_dir>/fashion-mnist/` (upstream spelling,
    /// Fashion-MNIST only), `<data_dir>/` (MNIST only: the classic flat layout), and for
    /// Fashion-MNIST the Debian package folder `/usr/share/datasets/fashion-mnist/`.
    ///
    /// CIFAR-10 (binary version): `data_batch_{1..5}.bin` (train) or `test_batch.bin` (test)
    /// in `<data_dir>/cifar10/cifar-10-batches-bin/` (where `cupbearer download` puts them),
    /// `<data_dir>/cifar-10-batches-bin/` (the archive unpacked in place) or
    /// `<data_dir>/cifar10/`.
    ///
    /// All files of a split must be in the same directory, so that files of different
    /// copies are never mixed.
    pub fn load(name: DatasetName, split: Split, data_dir: &Path) -> Result<Dataset> {
        let dirs = search_dirs(name, data_dir);
        if name == DatasetName::Cifar10 {
            return load_cifar10(split, &dirs, data_dir);
        }
        let [images_name, labels_name] = idx_file_names(split);
        let found = dirs
            .iter()
            .find_map(|dir| Some((find_file(dir, &images_name)?, find_file(dir, &labels_name)?)));
        let Some((images_path, labels_path)) = found else {
            let searched: Vec<String> = dirs.iter().map(|d| format!("  {}", d.display())).collect();
            let mut how = download_hint(name, data_dir);
            if name == DatasetName::FashionMnist {
                how.push_str(" or `apt-get install dataset-fashion-mnist` (Debian/Ubuntu)");
            }
            bail!(
                "{name} {} data not found: no {images_name}[.gz] with {labels_name}[.gz] in any of:\n{}\nTo get the data, {how}.",
                split.as_str(),
                searched.join("\n"),
            );
        };

        let images = idx::read_images(&images_path)?;
        let labels = idx::read_labels(&labels_path)?;
        let files = [images_path, labels_path].map(|p| p.display().to_string());
        Self::from_idx(format!("{name}/{}", split.as_str()), images, labels, &files)
    }

    /// An MNIST-style split from the bytes of its image and label files (IDX,
    /// gzip-compressed or not), `files` naming them in errors: how the browser loads
    /// the files beside its page or the ones the user picks.
    pub fn from_idx_bytes(
        name: &str,
        images: Vec<u8>,
        labels: Vec<u8>,
        files: &[String; 2],
    ) -> Result<Dataset> {
        let images = idx::parse_images(&files[0], images)?;
        let labels = idx::parse_labels(&files[1], labels)?;
        Self::from_idx(name.to_string(), images, labels, files)
    }

    fn from_idx(
        name: String,
        images: idx::IdxImages,
        labels: Vec<u8>,
        files: &[String; 2],
    ) -> Result<Dataset> {
        if images.count != labels.len() {
            bail!(
                "{} has {} images but {} has {} labels",
                files[0],
                images.count,
                files[1],
                labels.len()
            );
        }
        let num_classes = 10;
        if let Some(i) = labels.iter().position(|&l| usize::from(l) >= num_classes) {
            bail!(
                "{}: label {} at index {i} is out of range (expected 0..{num_classes})",
                files[1],
                labels[i]
            );
        }
        Ok(Dataset {
            name,
            height: images.rows,
            width: images.cols,
            channels: 1,
            num_classes,
            images: images.pixels,
            labels,
        })
    }

    /// A small, deterministic, easily learnable 10-class data set for tests and smoke runs.
    ///
    /// Image `i` has label `i % 10` (balanced). The interior of the image (everything but
    /// a 1-pixel border) is split into a 2x5 grid of cells; class `c` is a bright filled
    /// rectangle in cell `c` with random intensity, on a background of dim random noise.
    /// The border, hence the four corner pixels, stays 0 so that a backdoor trigger placed
    /// in a corner is the only thing ever there. Images smaller than 4x7 cannot hold the
    /// grid; they are produced (no panic) but some classes are then indistinguishable.
    pub fn synthetic(n: usize, height: usize, width: usize, seed: u64) -> Dataset {
        let mut rng = SplitMix64(seed);
        let (ih, iw) = (height.saturating_sub(2), width.saturating_sub(2));
        let mut images = vec![0u8; n * height * width];
        let labels: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
        for (img, &label) in images
            .chunks_exact_mut((height * width).max(1))
            .zip(&labels)
        {
            let (r, c) = (usize::from(label) / 5, usize::from(label) % 5);
            // Cell bounds within the interior, shrunk by a margin so cells never touch.
            let (y0, y1) = (1 + r * ih / 2, 1 + (r + 1) * ih / 2);
            let (x0, x1) = (1 + c * iw / 5, 1 + (c + 1) * iw / 5);
            let my = usize::from(y1 - y0 > 2);
            let mx = usize::from(x1 - x0 > 2);
            let bright = 160 + (rng.next() % 96) as u8;
            for y in 1..height.saturating_sub(1) {
                for x in 1..width.saturating_sub(1) {
                    let noise = (rng.next() % 48) as u8;
                    let in_blob =
                        (y0 + my..y1 - my).contains(&y) && (x0 + mx..x1 - mx).contains(&x);
                    img[y * width + x] = if in_blob { bright - noise / 2 } else { noise };
                }
            }
        }
        Dataset {
            name: format!("synthetic/seed{seed}"),
            height,
            width,
            channels: 1,
            num_classes: 10,
            images,
            labels,
        }
    }
}

fn load_cifar10(split: Split, dirs: &[PathBuf], data_dir: &Path) -> Result<Dataset> {
    let name = DatasetName::Cifar10;
    let files = cifar::file_names(split);
    let Some(dir) = dirs
        .iter()
        .find(|dir| files.iter().all(|f| dir.join(f).is_file()))
    else {
        let searched: Vec<String> = dirs.iter().map(|d| format!("  {}", d.display())).collect();
        bail!(
            "{name} {} data not found: no directory holds all of {} among:\n{}\nTo get the data, {}, or unpack the binary version (cifar-10-binary.tar.gz) into {}.",
            split.as_str(),
            files.join(", "),
            searched.join("\n"),
            download_hint(name, data_dir),
            data_dir.display(),
        );
    };
    let paths: Vec<PathBuf> = files.iter().map(|f| dir.join(f)).collect();
    let batch = cifar::read_batches(&paths)?;
    Ok(Dataset {
        name: format!("{name}/{}", split.as_str()),
        height: cifar::HEIGHT,
        width: cifar::WIDTH,
        channels: cifar::CHANNELS,
        num_classes: cifar::NUM_CLASSES,
        images: batch.images,
        labels: batch.labels,
    })
}

fn download_hint(name: DatasetName, data_dir: &Path) -> String {
    format!(
        "run `cupbearer download {name} --data-dir {}`",
        data_dir.display()
    )
}

/// Directories `Dataset::load` looks in, in order.
fn search_dirs(name: DatasetName, data_dir: &Path) -> Vec<PathBuf> {
    let own = data_dir.join(name.as_str());
    match name {
        DatasetName::Mnist => vec![own, data_dir.to_path_buf()],
        DatasetName::FashionMnist => vec![
            own,
            data_dir.join("fashion-mnist"),
            PathBuf::from(DEBIAN_FASHION_MNIST_DIR),
        ],
        DatasetName::Cifar10 => vec![
            own.join(cifar::ARCHIVE_DIR),
            data_dir.join(cifar::ARCHIVE_DIR),
            own,
        ],
    }
}

/// `dir/file` if it exists, else `dir/file.gz` if that exists.
fn find_file(dir: &Path, file: &str) -> Option<PathBuf> {
    [dir.join(file), dir.join(format!("{file}.gz"))]
        .into_iter()
        .find(|p| p.is_file())
}

/// splitmix64 (Steele et al.): tiny, fast, and good enough for synthetic pixels.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}
