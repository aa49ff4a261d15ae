//! Tests of `cupbearer::data`: IDX and CIFAR-10 I/O, data set loading and synthetic
//! data (downloads: `tests/download.rs`).

mod common;

use std::path::{Path, PathBuf};

use common::fixtures::{assert_cifar, err_text, gz, idx_images_bytes, write_cifar};
use cupbearer::data::{cifar, idx, Dataset, DatasetName, Split};

// ---------------------------------------------------------------- IDX

#[test]
fn idx_round_trip_raw_and_gz() {
    let dir = tempfile::tempdir().unwrap();
    for count in [0usize, 1, 7] {
        for gzip in [false, true] {
            let pixels: Vec<u8> = (0..count * 15).map(|i| (i * 37 % 251) as u8).collect();
            let labels: Vec<u8> = (0..count).map(|i| (i % 10) as u8).collect();
            // Same extension for both: compression must be detected by content.
            let ip = dir.path().join(format!("images-{count}-{gzip}.bin"));
            let lp = dir.path().join(format!("labels-{count}-{gzip}.bin"));
            idx::write_images(&ip, 5, 3, &pixels, gzip).unwrap();
            idx::write_labels(&lp, &labels, gzip).unwrap();
            let on_disk = std::fs::read(&ip).unwrap();
            assert_eq!(on_disk.starts_with(&[0x1f, 0x8b]), gzip);

            let img = idx::read_images(&ip).unwrap();
            assert_eq!((img.count, img.rows, img.cols), (count, 5, 3));
            assert_eq!(img.pixels, pixels);
            assert_eq!(idx::read_labels(&lp).unwrap(), labels);
        }
    }
}

#[test]
fn idx_write_rejects_partial_image() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("partial.idx");
    let msg = err_text(idx::write_images(&p, 5, 3, &[0; 16], false));
    assert!(
        msg.contains("partial.idx") && msg.contains("whole number"),
        "{msg}"
    );
}

#[test]
fn idx_corrupt_inputs_name_file_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, bytes: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    };
    let good = idx_images_bytes(4);

    let mut bad_magic = good.clone();
    bad_magic[3] = 2;
    let cases: Vec<(PathBuf, &str)> = vec![
        (
            write("bad-magic.idx", &bad_magic),
            "bad magic 0x00000802, expected 0x00000803",
        ),
        (
            write("short-pixels.idx", &good[..good.len() - 5]),
            "truncated: header says 4 images of 5x3 (60 bytes) but only 55",
        ),
        (write("short-header.idx", &good[..10]), "truncated header"),
        (write("tiny.idx", &good[..2]), "truncated header"),
        (
            write("trailing.idx", &[&good[..], &[1, 2, 3]].concat()),
            "3 trailing bytes",
        ),
        (
            write("corrupt.gz", &{
                let mut z = gz(&good);
                z.truncate(z.len() / 2);
                z
            }),
            "corrupt gzip",
        ),
        (
            write(
                "garbage.gz",
                &[0x1f, 0x8b, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 1, 2, 3],
            ),
            "corrupt gzip",
        ),
    ];
    for (path, reason) in cases {
        let msg = err_text(idx::read_images(&path));
        let name = path.file_name().unwrap().to_str().unwrap();
        assert!(
            msg.contains(name),
            "{name}: message lacks the file name: {msg}"
        );
        assert!(
            msg.contains(reason),
            "{name}: message lacks '{reason}': {msg}"
        );
    }

    // A labels file passed as images (and vice versa) is recognised as such.
    let labels = dir.path().join("labels.idx");
    idx::write_labels(&labels, &[1, 2, 3], true).unwrap();
    let msg = err_text(idx::read_images(&labels));
    assert!(
        msg.contains("labels.idx") && msg.contains("bad magic 0x00000801"),
        "{msg}"
    );
    assert!(msg.contains("labels"), "{msg}");
    let images = write("images.idx", &good);
    let msg = err_text(idx::read_labels(&images));
    assert!(
        msg.contains("images.idx") && msg.contains("expected 0x00000801"),
        "{msg}"
    );

    let mut short_labels = vec![0, 0, 8, 1, 0, 0, 0, 9];
    short_labels.extend([0; 4]);
    let p = write("short-labels.idx", &short_labels);
    let msg = err_text(idx::read_labels(&p));
    assert!(
        msg.contains("short-labels.idx") && msg.contains("9 labels"),
        "{msg}"
    );

    let missing = dir.path().join("missing.idx");
    assert!(err_text(idx::read_images(&missing)).contains("missing.idx"));
}

// ---------------------------------------------------------------- Dataset::load

/// Writes `n_images` 4x4 images and `labels` as a split of a fake data set in `dir`.
fn write_split(dir: &Path, prefix: &str, n_images: usize, labels: &[u8], gzip: bool) -> Vec<u8> {
    std::fs::create_dir_all(dir).unwrap();
    let ext = if gzip { ".gz" } else { "" };
    let pixels: Vec<u8> = (0..n_images * 16).map(|i| (i * 3 % 256) as u8).collect();
    idx::write_images(
        &dir.join(format!("{prefix}-images-idx3-ubyte{ext}")),
        4,
        4,
        &pixels,
        gzip,
    )
    .unwrap();
    idx::write_labels(
        &dir.join(format!("{prefix}-labels-idx1-ubyte{ext}")),
        labels,
        gzip,
    )
    .unwrap();
    pixels
}

#[test]
fn load_finds_gz_files_in_name_dir() {
    let data = tempfile::tempdir().unwrap();
    let labels = [3, 1, 4, 1, 5, 9, 2];
    let pixels = write_split(&data.path().join("mnist"), "train", 7, &labels, true);
    let ds = Dataset::load(DatasetName::Mnist, Split::Train, data.path()).unwrap();
    assert_eq!(ds.name, "mnist/train");
    assert_eq!(
        (ds.len(), ds.height, ds.width, ds.channels, ds.num_classes),
        (7, 4, 4, 1, 10)
    );
    assert_eq!((ds.sample_dim(), ds.is_empty()), (16, false));
    assert_eq!(ds.labels, labels);
    assert_eq!(ds.images, pixels);
    assert_eq!(ds.image(2), &pixels[32..48]);

    // The test split is a different file set and is not there.
    let msg = err_text(Dataset::load(DatasetName::Mnist, Split::Test, data.path()));
    assert!(msg.contains("t10k-images-idx3-ubyte"), "{msg}");
}

#[test]
fn load_prefers_uncompressed_and_searches_fallback_dirs() {
    let data = tempfile::tempdir().unwrap();
    // MNIST in the flat classic layout, with both raw and .gz present.
    write_split(data.path(), "t10k", 3, &[0, 0, 0], true);
    write_split(data.path(), "t10k", 2, &[8, 8], false);
    let ds = Dataset::load(DatasetName::Mnist, Split::Test, data.path()).unwrap();
    assert_eq!(
        (ds.name.as_str(), ds.labels.as_slice()),
        ("mnist/test", &[8, 8][..])
    );

    // Fashion-MNIST under its upstream spelling, which comes before the Debian folder.
    write_split(&data.path().join("fashion-mnist"), "t10k", 1, &[6], true);
    let ds = Dataset::load(DatasetName::FashionMnist, Split::Test, data.path()).unwrap();
    assert_eq!(
        (ds.name.as_str(), ds.labels.as_slice()),
        ("fashion_mnist/test", &[6][..])
    );
    // ... and `<dir>/fashion_mnist/` before that.
    write_split(&data.path().join("fashion_mnist"), "t10k", 1, &[7], false);
    let ds = Dataset::load(DatasetName::FashionMnist, Split::Test, data.path()).unwrap();
    assert_eq!(ds.labels, [7]);
}

#[test]
fn load_count_mismatch_and_bad_label() {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().join("mnist");
    write_split(&dir, "train", 5, &[1, 2, 3, 4, 5, 6], true);
    let msg = err_text(Dataset::load(DatasetName::Mnist, Split::Train, data.path()));
    for part in [
        "train-images-idx3-ubyte.gz",
        "5 images",
        "train-labels-idx1-ubyte.gz",
        "6 labels",
    ] {
        assert!(msg.contains(part), "missing '{part}': {msg}");
    }

    write_split(&dir, "t10k", 3, &[1, 10, 2], false);
    let msg = err_text(Dataset::load(DatasetName::Mnist, Split::Test, data.path()));
    assert!(
        msg.contains("t10k-labels-idx1-ubyte") && msg.contains("label 10 at index 1"),
        "{msg}"
    );
}

#[test]
fn load_missing_files_says_where_and_how() {
    let data = tempfile::tempdir().unwrap();
    // Only the images: a split needs both files in one directory.
    write_split(&data.path().join("mnist"), "train", 2, &[1, 2], true);
    std::fs::remove_file(data.path().join("mnist/train-labels-idx1-ubyte.gz")).unwrap();
    let msg = err_text(Dataset::load(DatasetName::Mnist, Split::Train, data.path()));
    let d = data.path().display().to_string();
    assert!(
        msg.contains(&format!("cupbearer download mnist --data-dir {d}")),
        "{msg}"
    );
    assert!(
        msg.contains(&data.path().join("mnist").display().to_string()),
        "{msg}"
    );
    assert!(msg.contains("train-labels-idx1-ubyte"), "{msg}");

    // Fashion-MNIST falls back to the Debian package when it is installed.
    match Dataset::load(DatasetName::FashionMnist, Split::Test, data.path()) {
        Err(e) => {
            let msg = format!("{e:#}");
            assert!(msg.contains("cupbearer download fashion_mnist"), "{msg}");
            assert!(
                msg.contains("apt-get install dataset-fashion-mnist"),
                "{msg}"
            );
            assert!(msg.contains("/usr/share/datasets/fashion-mnist"), "{msg}");
        }
        Ok(ds) => {
            assert!(Path::new("/usr/share/datasets/fashion-mnist").is_dir());
            assert_eq!((ds.len(), ds.height, ds.width), (10_000, 28, 28));
        }
    }
}

// ---------------------------------------------------------------- CIFAR-10

#[test]
fn cifar_load_round_trip_hwc() {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().join("cifar10/cifar-10-batches-bin");
    // Files may hold any number of records, none included; they are read in order 1..5.
    write_cifar(&dir, Split::Train, &[2, 1, 0, 3, 1], 0);
    write_cifar(&dir, Split::Test, &[3], 100);

    let train = Dataset::load(DatasetName::Cifar10, Split::Train, data.path()).unwrap();
    assert_eq!(train.name, "cifar10/train");
    assert_cifar(&train, 0, 7);
    let test = Dataset::load(DatasetName::Cifar10, Split::Test, data.path()).unwrap();
    assert_eq!(test.name, "cifar10/test");
    assert_cifar(&test, 100, 3);

    // The reader itself, on one file: the last two train records.
    let batch = cifar::read_batches(&[dir.join("data_batch_4.bin")]).unwrap();
    assert_eq!(batch.labels, train.labels[3..6]);
    assert_eq!(batch.images, train.images[3 * 3072..6 * 3072]);
}

#[test]
fn cifar_load_search_order_and_no_mixing() {
    let data = tempfile::tempdir().unwrap();
    let d = data.path();
    let load_test = || Dataset::load(DatasetName::Cifar10, Split::Test, d).unwrap();

    write_cifar(&d.join("cifar10"), Split::Test, &[1], 200);
    assert_cifar(&load_test(), 200, 1);
    write_cifar(&d.join("cifar-10-batches-bin"), Split::Test, &[1], 300);
    assert_cifar(&load_test(), 300, 1);
    write_cifar(
        &d.join("cifar10/cifar-10-batches-bin"),
        Split::Test,
        &[2],
        400,
    );
    assert_cifar(&load_test(), 400, 2);

    // Train files spread over two directories are not combined.
    write_cifar(&d.join("cifar-10-batches-bin"), Split::Train, &[1; 5], 0);
    std::fs::rename(
        d.join("cifar-10-batches-bin/data_batch_5.bin"),
        d.join("cifar10/data_batch_5.bin"),
    )
    .unwrap();
    let msg = err_text(Dataset::load(DatasetName::Cifar10, Split::Train, d));
    for part in [
        "cifar10 train data not found".to_string(),
        "data_batch_1.bin".to_string(),
        "data_batch_5.bin".to_string(),
        d.join("cifar10/cifar-10-batches-bin").display().to_string(),
        d.join("cifar-10-batches-bin").display().to_string(),
        format!("cupbearer download cifar10 --data-dir {}", d.display()),
        "cifar-10-binary.tar.gz".to_string(),
    ] {
        assert!(msg.contains(&part), "missing '{part}' in: {msg}");
    }
    std::fs::rename(
        d.join("cifar10/data_batch_5.bin"),
        d.join("cifar-10-batches-bin/data_batch_5.bin"),
    )
    .unwrap();
    let train = Dataset::load(DatasetName::Cifar10, Split::Train, d).unwrap();
    assert_cifar(&train, 0, 5);
}

#[test]
fn cifar_corrupt_files_name_file_and_reason() {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().join("cifar10");
    let test_file = dir.join("test_batch.bin");
    let load_test = || {
        err_text(Dataset::load(
            DatasetName::Cifar10,
            Split::Test,
            data.path(),
        ))
    };

    write_cifar(&dir, Split::Test, &[2], 0);
    let good = std::fs::read(&test_file).unwrap();
    std::fs::write(&test_file, &good[..good.len() - 1]).unwrap();
    let msg = load_test();
    assert!(
        msg.contains("test_batch.bin")
            && msg.contains("size 6145 bytes is not a multiple of the 3073-byte"),
        "{msg}"
    );

    let mut bad_label = good.clone();
    bad_label[3073] = 10;
    std::fs::write(&test_file, &bad_label).unwrap();
    let msg = load_test();
    assert!(
        msg.contains("test_batch.bin") && msg.contains("label 10 of record 1 is out of range"),
        "{msg}"
    );

    // The file in error is named even when it is not the first one.
    write_cifar(&dir, Split::Train, &[1; 5], 0);
    let third = dir.join("data_batch_3.bin");
    let mut bytes = std::fs::read(&third).unwrap();
    bytes[0] = 255;
    std::fs::write(&third, bytes).unwrap();
    let msg = err_text(Dataset::load(
        DatasetName::Cifar10,
        Split::Train,
        data.path(),
    ));
    assert!(
        msg.contains("data_batch_3.bin") && msg.contains("label 255 of record 0"),
        "{msg}"
    );

    let missing = dir.join("data_batch_9.bin");
    let msg = err_text(cifar::read_batches(&[
        dir.join("data_batch_1.bin"),
        missing,
    ]));
    assert!(
        msg.contains("data_batch_9.bin") && msg.contains("cannot read"),
        "{msg}"
    );
}

#[test]
fn dataset_truncate() {
    let mut ds = Dataset::synthetic(20, 8, 8, 3);
    let first = ds.image(4).to_vec();
    ds.truncate(100);
    assert_eq!(ds.len(), 20);
    ds.truncate(5);
    assert_eq!((ds.len(), ds.images.len()), (5, 5 * 64));
    assert_eq!(ds.image(4), first);
    ds.truncate(0);
    assert!(ds.is_empty() && ds.images.is_empty());
}

#[test]
fn dataset_name_parse_display_serde() {
    assert_eq!(DatasetName::parse("mnist").unwrap(), DatasetName::Mnist);
    assert_eq!(
        DatasetName::parse("fashion_mnist").unwrap(),
        DatasetName::FashionMnist
    );
    assert_eq!(
        "fashion-mnist".parse::<DatasetName>().unwrap(),
        DatasetName::FashionMnist
    );
    for s in ["cifar10", "CIFAR-10", "cifar_10", " Cifar10 "] {
        assert_eq!(DatasetName::parse(s).unwrap(), DatasetName::Cifar10, "{s}");
    }
    assert_eq!(DatasetName::Cifar10.as_str(), "cifar10");
    let msg = err_text(DatasetName::parse("cifar100"));
    assert!(
        msg.contains("cifar100") && msg.contains("mnist, fashion_mnist, cifar10"),
        "{msg}"
    );
    for n in DatasetName::ALL {
        assert_eq!(n.to_string(), n.as_str());
        assert_eq!(DatasetName::parse(n.as_str()).unwrap(), n);
        let json = serde_json::to_string(&n).unwrap();
        assert_eq!(json, format!("\"{}\"", n.as_str()));
        assert_eq!(serde_json::from_str::<DatasetName>(&json).unwrap(), n);
    }
}

// ---------------------------------------------------------------- synthetic

#[test]
fn synthetic_is_deterministic_balanced_and_corner_free() {
    let a = Dataset::synthetic(200, 28, 28, 7);
    let b = Dataset::synthetic(200, 28, 28, 7);
    let c = Dataset::synthetic(200, 28, 28, 8);
    assert_eq!((a.images.clone(), a.labels.clone()), (b.images, b.labels));
    assert_ne!(a.images, c.images);
    assert_eq!(
        (a.len(), a.images.len(), a.channels, a.num_classes),
        (200, 200 * 784, 1, 10)
    );
    for class in 0..10u8 {
        assert_eq!(a.labels.iter().filter(|&&l| l == class).count(), 20);
    }
    for ds in [
        &a,
        &Dataset::synthetic(30, 5, 9, 1),
        &Dataset::synthetic(10, 2, 2, 1),
    ] {
        let (h, w) = (ds.height, ds.width);
        for i in 0..ds.len() {
            let img = ds.image(i);
            for corner in [0, w - 1, (h - 1) * w, h * w - 1] {
                assert_eq!(img[corner], 0, "image {i} of {}x{w}", h);
            }
        }
    }
}

#[test]
fn synthetic_is_learnable() {
    // A nearest-class-mean classifier, far weaker than an MLP, must already be near perfect
    // on a fresh seed; otherwise smoke-run training would be testing noise.
    let (train, test) = (
        Dataset::synthetic(500, 28, 28, 1),
        Dataset::synthetic(300, 28, 28, 2),
    );
    let d = train.sample_dim();
    let mut means = vec![0f64; 10 * d];
    for i in 0..train.len() {
        let l = usize::from(train.labels[i]);
        for (m, &p) in means[l * d..(l + 1) * d].iter_mut().zip(train.image(i)) {
            *m += f64::from(p) / 50.0;
        }
    }
    let correct = (0..test.len())
        .filter(|&i| {
            let dist = |c: usize| -> f64 {
                means[c * d..(c + 1) * d]
                    .iter()
                    .zip(test.image(i))
                    .map(|(m, &p)| (m - f64::from(p)).powi(2))
                    .sum()
            };
            let best = (0..10)
                .min_by(|&a, &b| dist(a).total_cmp(&dist(b)))
                .unwrap();
            best == usize::from(test.labels[i])
        })
        .count();
    assert!(
        correct as f64 / test.len() as f64 > 0.95,
        "{correct}/{}",
        test.len()
    );
}
