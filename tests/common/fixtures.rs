//! Data fixtures shared by the data and download tests: gzip, IDX and CIFAR-10 bytes
//! written independently of the readers.

use std::io::Write;
use std::path::Path;

use cupbearer::data::{Dataset, Split};
use flate2::write::GzEncoder;
use flate2::Compression;

pub fn err_text<T: std::fmt::Debug>(r: anyhow::Result<T>) -> String {
    format!("{:#}", r.expect_err("expected an error"))
}

pub fn gz(bytes: &[u8]) -> Vec<u8> {
    let mut e = GzEncoder::new(Vec::new(), Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

/// A valid raw IDX image file of `count` 5x3 images.
pub fn idx_images_bytes(count: u32) -> Vec<u8> {
    let mut b = vec![0, 0, 8, 3];
    for d in [count, 5, 3] {
        b.extend_from_slice(&d.to_be_bytes());
    }
    b.extend((0..count * 15).map(|i| (i * 7 % 256) as u8));
    b
}

/// Label of generated CIFAR-10 record `i`.
pub fn cifar_label(i: usize) -> u8 {
    (i * 3 % 10) as u8
}

/// Pixel (channel `c`, row `y`, column `x`) of generated record `i`; it depends on all
/// four, so that any mix-up of record, channel, row or column shows.
pub fn cifar_pixel(i: usize, c: usize, y: usize, x: usize) -> u8 {
    (i * 101 + c * 89 + y * 7 + x * 3) as u8
}

/// Batch files in the official CHW layout (written here, independently of the reader):
/// `counts[k]` records in file k, numbered on from `first` across the files.
pub fn cifar_batches(counts: &[usize], first: usize) -> Vec<Vec<u8>> {
    let mut i = first;
    counts
        .iter()
        .map(|&n| {
            let mut file = Vec::new();
            for _ in 0..n {
                file.push(cifar_label(i));
                for c in 0..3 {
                    for y in 0..32 {
                        file.extend((0..32).map(|x| cifar_pixel(i, c, y, x)));
                    }
                }
                i += 1;
            }
            file
        })
        .collect()
}

/// Writes the files of `split` into `dir` (see [`cifar_batches`]).
pub fn write_cifar(dir: &Path, split: Split, counts: &[usize], first: usize) {
    let names = cupbearer::data::cifar::file_names(split);
    assert_eq!(names.len(), counts.len());
    std::fs::create_dir_all(dir).unwrap();
    for (name, bytes) in names.iter().zip(cifar_batches(counts, first)) {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}

/// Checks that `ds` holds generated records `first..first + n`, pixel by pixel in HWC order.
pub fn assert_cifar(ds: &Dataset, first: usize, n: usize) {
    assert_eq!(
        (ds.len(), ds.height, ds.width, ds.channels, ds.num_classes),
        (n, 32, 32, 3, 10)
    );
    assert_eq!(ds.images.len(), n * 3072);
    for k in 0..n {
        let i = first + k;
        assert_eq!(ds.labels[k], cifar_label(i), "label of image {k}");
        let img = ds.image(k);
        for y in 0..32 {
            for x in 0..32 {
                for c in 0..3 {
                    assert_eq!(
                        img[(y * 32 + x) * 3 + c],
                        cifar_pixel(i, c, y, x),
                        "image {k}, y {y}, x {x}, channel {c}"
                    );
                }
            }
        }
    }
}
