//! Reader for the binary version of CIFAR-10 (`cifar-10-batches-bin/`).
//!
//! Each file is a bare sequence of 3073-byte records: one label byte (0..9), then the
//! 32x32 image as 1024 red, 1024 green and 1024 blue bytes (CHW, each plane row-major).
//! There is no header, so the record size and the label range are all there is to check.
//! Every error names the file, since a split spans several of them.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::datasets::Split;

/// The directory the official archive unpacks to.
pub const ARCHIVE_DIR: &str = "cifar-10-batches-bin";

pub const HEIGHT: usize = 32;
pub const WIDTH: usize = 32;
pub const CHANNELS: usize = 3;
pub const NUM_CLASSES: usize = 10;
const PLANE: usize = HEIGHT * WIDTH;
/// Bytes per record: the label, then `CHANNELS` planes.
pub const RECORD_BYTES: usize = 1 + CHANNELS * PLANE;

/// The official file names of a split, in the order their records are concatenated.
pub fn file_names(split: Split) -> &'static [&'static str] {
    match split {
        Split::Train => &[
            "data_batch_1.bin",
            "data_batch_2.bin",
            "data_batch_3.bin",
            "data_batch_4.bin",
            "data_batch_5.bin",
        ],
        Split::Test => &["test_batch.bin"],
    }
}

/// Images and labels read from one or more batch files.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Batch {
    /// `labels.len() * 3072` bytes, HWC order per image (our `Dataset` layout).
    pub images: Vec<u8>,
    pub labels: Vec<u8>,
}

/// Reads `paths` in order and concatenates their records (any number per file),
/// converting each image from CHW to HWC.
pub fn read_batches(paths: &[PathBuf]) -> Result<Batch> {
    let mut batch = Batch::default();
    for path in paths {
        append_batch(path, &mut batch)?;
    }
    Ok(batch)
}

fn append_batch(path: &Path, out: &mut Batch) -> Result<()> {
    let p = path.display();
    let bytes = fs::read(path).with_context(|| format!("{p}: cannot read"))?;
    if bytes.len() % RECORD_BYTES != 0 {
        bail!(
            "{p}: size {} bytes is not a multiple of the {RECORD_BYTES}-byte CIFAR-10 record \
             (1 label + {HEIGHT}x{WIDTH}x{CHANNELS} pixels); truncated, or not a file of the binary version?",
            bytes.len()
        );
    }
    let count = bytes.len() / RECORD_BYTES;
    out.labels.reserve(count);
    out.images.reserve(count * (RECORD_BYTES - 1));
    for (i, record) in bytes.chunks_exact(RECORD_BYTES).enumerate() {
        let label = record[0];
        if usize::from(label) >= NUM_CLASSES {
            bail!("{p}: label {label} of record {i} is out of range (expected 0..{NUM_CLASSES})");
        }
        out.labels.push(label);
        let planes = &record[1..];
        out.images
            .extend((0..PLANE).flat_map(|px| (0..CHANNELS).map(move |c| planes[c * PLANE + px])));
    }
    Ok(())
}
