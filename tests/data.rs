//! Tests of `cupbearer::data`: IDX and CIFAR-10 I/O, data set loading, synthetic data and
//! downloads (against a tiny local HTTP server, never the network).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};

use cupbearer::data::{cifar, download, idx, resolve_data_dir, Dataset, DatasetName, Split};
use flate2::write::GzEncoder;
use flate2::Compression;
use sha2::{Digest, Sha256};

fn err_text<T: std::fmt::Debug>(r: anyhow::Result<T>) -> String {
    format!("{:#}", r.expect_err("expected an error"))
}

fn gz(bytes: &[u8]) -> Vec<u8> {
    let mut e = GzEncoder::new(Vec::new(), Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

/// A valid raw IDX image file of `count` 5x3 images.
fn idx_images_bytes(count: u32) -> Vec<u8> {
    let mut b = vec![0, 0, 8, 3];
    for d in [count, 5, 3] {
        b.extend_from_slice(&d.to_be_bytes());
    }
    b.extend((0..count * 15).map(|i| (i * 7 % 256) as u8));
    b
}

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

/// Label of generated CIFAR-10 record `i`.
fn cifar_label(i: usize) -> u8 {
    (i * 3 % 10) as u8
}

/// Pixel (channel `c`, row `y`, column `x`) of generated record `i`; it depends on all
/// four, so that any mix-up of record, channel, row or column shows.
fn cifar_pixel(i: usize, c: usize, y: usize, x: usize) -> u8 {
    (i * 101 + c * 89 + y * 7 + x * 3) as u8
}

/// Batch files in the official CHW layout (written here, independently of the reader):
/// `counts[k]` records in file k, numbered on from `first` across the files.
fn cifar_batches(counts: &[usize], first: usize) -> Vec<Vec<u8>> {
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
fn write_cifar(dir: &Path, split: Split, counts: &[usize], first: usize) {
    let names = cifar::file_names(split);
    assert_eq!(names.len(), counts.len());
    std::fs::create_dir_all(dir).unwrap();
    for (name, bytes) in names.iter().zip(cifar_batches(counts, first)) {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}

/// Checks that `ds` holds generated records `first..first + n`, pixel by pixel in HWC order.
fn assert_cifar(ds: &Dataset, first: usize, n: usize) {
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

// ---------------------------------------------------------------- downloads

/// Serves files under `root` over HTTP/1.1 on 127.0.0.1 (404 for anything else, one
/// thread per connection, `Connection: close`); returns the base URL. The server thread
/// lives until the test process exits.
fn serve(root: PathBuf) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let root = root.clone();
            std::thread::spawn(move || handle(stream, &root));
        }
    });
    base
}

fn handle(mut stream: TcpStream, root: &Path) {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let head = String::from_utf8_lossy(&head);
    let path = head.split_whitespace().nth(1).unwrap_or("/");
    let safe = path.split('/').all(|seg| seg != "..");
    let file = root.join(path.trim_start_matches('/'));
    let (status, body) = match std::fs::read(&file) {
        Ok(body) if safe && file.is_file() => ("200 OK", body),
        _ => ("404 Not Found", b"not found".to_vec()),
    };
    let header = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream
        .write_all(header.as_bytes())
        .and_then(|()| stream.write_all(&body));
}

/// A URL on which nothing listens (connection refused).
fn refused_url() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    format!("http://{}/", listener.local_addr().unwrap())
}

/// A server root with `bad/` (a valid gz of the wrong data) and `corrupt/` (not gzip data).
fn bad_mirrors() -> (tempfile::TempDir, String) {
    let root = tempfile::tempdir().unwrap();
    for (sub, bytes) in [
        ("bad", gz(&idx_images_bytes(3))),
        ("corrupt", vec![0x1f, 0x8b, 8, 0, 9, 9, 9]),
    ] {
        std::fs::create_dir(root.path().join(sub)).unwrap();
        std::fs::write(
            root.path().join(sub).join("train-images-idx3-ubyte.gz"),
            bytes,
        )
        .unwrap();
    }
    let base = serve(root.path().to_path_buf());
    (root, base)
}

fn dir_entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    };
    names.sort();
    names
}

#[test]
fn download_real_mnist_with_fallback_mirror() {
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data");
    if !shared.join("mnist").is_dir() {
        eprintln!("skipped: {} not found", shared.display());
        return;
    }
    let base = serve(shared);
    let data = tempfile::tempdir().unwrap();
    let mirrors = vec![format!("{base}/missing/"), format!("{base}/mnist")]; // no trailing '/'
    let dir = download::download(DatasetName::Mnist, data.path(), &mirrors).unwrap();
    assert_eq!(dir, data.path().join("mnist"));
    let expected: Vec<String> = ["t10k-images", "t10k-labels", "train-images", "train-labels"]
        .iter()
        .map(|f| {
            format!(
                "{f}-idx{}-ubyte.gz",
                if f.ends_with("images") { 3 } else { 1 }
            )
        })
        .collect();
    assert_eq!(dir_entries(&dir), expected);
    let train = Dataset::load(DatasetName::Mnist, Split::Train, data.path()).unwrap();
    let test = Dataset::load(DatasetName::Mnist, Split::Test, data.path()).unwrap();
    assert_eq!(
        (train.len(), test.len(), train.height, train.width),
        (60_000, 10_000, 28, 28)
    );

    // Everything verified is skipped: a mirror list that cannot serve anything still works.
    download::download(DatasetName::Mnist, data.path(), &[refused_url()]).unwrap();

    // A corrupted local file is replaced by a verified download.
    let labels = dir.join("t10k-labels-idx1-ubyte.gz");
    std::fs::write(&labels, gz(b"not the labels")).unwrap();
    download::download(DatasetName::Mnist, data.path(), &mirrors[1..]).unwrap();
    assert_eq!(
        Dataset::load(DatasetName::Mnist, Split::Test, data.path())
            .unwrap()
            .labels,
        test.labels
    );
    assert_eq!(dir_entries(&dir), expected);
}

#[test]
fn download_bad_hash_leaves_nothing_behind() {
    let (_root, base) = bad_mirrors();
    let url = format!("{base}/bad/train-images-idx3-ubyte.gz");

    let fresh = tempfile::tempdir().unwrap();
    let msg = err_text(download::download(
        DatasetName::Mnist,
        fresh.path(),
        &[format!("{base}/bad/")],
    ));
    assert!(
        msg.contains("SHA-256 mismatch") && msg.contains(&url),
        "{msg}"
    );
    assert!(
        msg.contains("ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"),
        "{msg}"
    );
    assert_eq!(
        dir_entries(&fresh.path().join("mnist")),
        Vec::<String>::new()
    );

    // An existing dir keeps its other contents, and gains nothing.
    let existing = tempfile::tempdir().unwrap();
    std::fs::create_dir(existing.path().join("mnist")).unwrap();
    std::fs::write(existing.path().join("mnist/notes.txt"), "mine").unwrap();
    let msg = err_text(download::download(
        DatasetName::Mnist,
        existing.path(),
        &[format!("{base}/bad/")],
    ));
    assert!(msg.contains("SHA-256 mismatch"), "{msg}");
    assert_eq!(dir_entries(&existing.path().join("mnist")), ["notes.txt"]);
}

#[test]
fn download_reports_every_mirror_failure() {
    let (_root, base) = bad_mirrors();
    let refused = refused_url();
    let mirrors = vec![
        format!("{base}/missing/"),
        refused.clone(),
        format!("{base}/corrupt/"),
        format!("{base}/bad/"),
    ];
    let data = tempfile::tempdir().unwrap();
    let msg = err_text(download::download(
        DatasetName::FashionMnist,
        data.path(),
        &mirrors,
    ));
    for part in [
        format!("{base}/missing/train-images-idx3-ubyte.gz: http status: 404"),
        format!("{refused}train-images-idx3-ubyte.gz"),
        format!("{base}/corrupt/train-images-idx3-ubyte.gz: corrupt gzip"),
        format!("{base}/bad/train-images-idx3-ubyte.gz: SHA-256 mismatch"),
    ] {
        assert!(msg.contains(&part), "missing '{part}' in: {msg}");
    }
    assert_eq!(
        dir_entries(&data.path().join("fashion_mnist")),
        Vec::<String>::new()
    );
}

#[test]
fn download_refuses_to_shadow_a_bad_uncompressed_file() {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().join("mnist");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("train-images-idx3-ubyte"), idx_images_bytes(2)).unwrap();
    let msg = err_text(download::download(
        DatasetName::Mnist,
        data.path(),
        &[refused_url()],
    ));
    assert!(
        msg.contains("train-images-idx3-ubyte") && msg.contains("remove it"),
        "{msg}"
    );
    assert_eq!(dir_entries(&dir), ["train-images-idx3-ubyte"]);
}

#[test]
fn default_mirrors_are_https_or_known() {
    let m = download::default_mirrors(DatasetName::Mnist);
    assert_eq!(m[0], "https://ossci-datasets.s3.amazonaws.com/mnist/");
    let f = download::default_mirrors(DatasetName::FashionMnist);
    assert_eq!(f.len(), 2);
    let c = download::default_mirrors(DatasetName::Cifar10);
    assert_eq!(c, ["https://www.cs.toronto.edu/~kriz/"]);
    assert!(m.iter().chain(&f).chain(&c).all(|u| u.ends_with('/')));
    // The real digests cover exactly the files the loader reads.
    let mut files: Vec<&str> = [Split::Train, Split::Test]
        .iter()
        .flat_map(|&s| cifar::file_names(s).iter().copied())
        .collect();
    files.sort();
    let mut hashed: Vec<&str> = download::CIFAR10_SHA256.iter().map(|(f, _)| *f).collect();
    hashed.sort();
    assert_eq!(files, hashed);
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Archive members, `(path, bytes)`.
type Members = Vec<(String, Vec<u8>)>;
/// `(file name, hex SHA-256)`.
type Digests = Vec<(String, String)>;

/// A tar archive of `(path, bytes)` members. Headers are written by hand so that a path
/// the `tar` crate's builder would refuse (`..`) can be tested too.
fn tar_bytes(members: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (path, bytes) in members {
        let mut header = tar::Header::new_gnu();
        header.as_gnu_mut().unwrap().name[..path.len()].copy_from_slice(path.as_bytes());
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        header.set_entry_type(tar::EntryType::Regular);
        header.set_cksum();
        builder.append(&header, bytes.as_slice()).unwrap();
    }
    builder.into_inner().unwrap()
}

/// The members of a generated `cifar-10-binary.tar.gz` (7 train records over the five
/// train files, 3 test records, plus a file that is not extracted) and their digests.
fn cifar_members() -> (Members, Digests) {
    let mut members = Vec::new();
    for (split, counts, first) in [
        (Split::Train, &[2, 1, 0, 3, 1][..], 0),
        (Split::Test, &[3][..], 100),
    ] {
        for (name, bytes) in cifar::file_names(split)
            .iter()
            .zip(cifar_batches(counts, first))
        {
            members.push((format!("cifar-10-batches-bin/{name}"), bytes));
        }
    }
    let hashes = members
        .iter()
        .map(|(p, b)| (p.rsplit('/').next().unwrap().to_string(), sha256_hex(b)))
        .collect();
    members.push((
        "cifar-10-batches-bin/batches.meta.txt".to_string(),
        b"airplane\nautomobile\n".to_vec(),
    ));
    (members, hashes)
}

fn as_refs(hashes: &[(String, String)]) -> Vec<(&str, &str)> {
    hashes
        .iter()
        .map(|(f, h)| (f.as_str(), h.as_str()))
        .collect()
}

/// Serves `cifar-10-binary.tar.gz` variants from subfolders: `good/` (the generated
/// archive), `plain/` (the same, not gzipped: what a server's `Content-Encoding: gzip`
/// leaves), `traversal/` (plus a `..` member), `incomplete/` (no `test_batch.bin`) and
/// `garbage/`. Returns the server root, its base URL and the generated digests.
fn cifar_server() -> (tempfile::TempDir, String, Digests) {
    let (members, hashes) = cifar_members();
    let mut traversal = members.clone();
    traversal.push((
        "cifar-10-batches-bin/../../evil.bin".to_string(),
        b"x".to_vec(),
    ));
    let incomplete: Vec<_> = members
        .iter()
        .filter(|(p, _)| !p.ends_with("test_batch.bin"))
        .cloned()
        .collect();
    let root = tempfile::tempdir().unwrap();
    for (sub, bytes) in [
        ("good", gz(&tar_bytes(&members))),
        ("plain", tar_bytes(&members)),
        ("traversal", gz(&tar_bytes(&traversal))),
        ("incomplete", gz(&tar_bytes(&incomplete))),
        ("garbage", gz(&[7u8; 2000])),
    ] {
        std::fs::create_dir(root.path().join(sub)).unwrap();
        std::fs::write(root.path().join(sub).join("cifar-10-binary.tar.gz"), bytes).unwrap();
    }
    let base = serve(root.path().to_path_buf());
    (root, base, hashes)
}

const CIFAR_FILES: [&str; 6] = [
    "data_batch_1.bin",
    "data_batch_2.bin",
    "data_batch_3.bin",
    "data_batch_4.bin",
    "data_batch_5.bin",
    "test_batch.bin",
];

#[test]
fn download_cifar10_generated_archive() {
    let (_root, base, hashes) = cifar_server();
    let hashes = as_refs(&hashes);
    for sub in ["good", "plain"] {
        let data = tempfile::tempdir().unwrap();
        let mirrors = vec![format!("{base}/missing/"), format!("{base}/{sub}")];
        let dir = download::download_cifar10(data.path(), &mirrors, &hashes).unwrap();
        assert_eq!(dir, data.path().join("cifar10/cifar-10-batches-bin"));
        // Only the verified files, and no temporary directory, are left.
        assert_eq!(dir_entries(&dir), CIFAR_FILES);
        assert_eq!(
            dir_entries(&data.path().join("cifar10")),
            ["cifar-10-batches-bin"]
        );
        let train = Dataset::load(DatasetName::Cifar10, Split::Train, data.path()).unwrap();
        assert_cifar(&train, 0, 7);
        let test = Dataset::load(DatasetName::Cifar10, Split::Test, data.path()).unwrap();
        assert_cifar(&test, 100, 3);
    }

    let data = tempfile::tempdir().unwrap();
    let good = vec![format!("{base}/good/")];
    let dir = download::download_cifar10(data.path(), &good, &hashes).unwrap();
    // Everything verified is skipped: a mirror that cannot serve anything still works.
    download::download_cifar10(data.path(), &[refused_url()], &hashes).unwrap();

    // A corrupted file is replaced; the user's own files stay.
    std::fs::write(dir.join("data_batch_2.bin"), b"not a batch").unwrap();
    std::fs::write(dir.join("notes.txt"), b"mine").unwrap();
    let msg = err_text(download::download_cifar10(
        data.path(),
        &[refused_url()],
        &hashes,
    ));
    assert!(msg.contains("cifar-10-binary.tar.gz"), "{msg}");
    download::download_cifar10(data.path(), &good, &hashes).unwrap();
    let mut expected = CIFAR_FILES.to_vec();
    expected.push("notes.txt");
    expected.sort();
    assert_eq!(dir_entries(&dir), expected);
    let train = Dataset::load(DatasetName::Cifar10, Split::Train, data.path()).unwrap();
    assert_cifar(&train, 0, 7);
    assert_eq!(
        dir_entries(&data.path().join("cifar10")),
        ["cifar-10-batches-bin"]
    );
}

#[test]
fn download_cifar10_bad_checksum_leaves_nothing_behind() {
    let (_root, base, hashes) = cifar_server();
    let url = format!("{base}/good/cifar-10-binary.tar.gz");
    let mirrors = [format!("{base}/good/")];

    // The real digests (via `download`) reject the generated archive at its first file.
    let fresh = tempfile::tempdir().unwrap();
    let msg = err_text(download::download(
        DatasetName::Cifar10,
        fresh.path(),
        &mirrors,
    ));
    for part in [
        url.as_str(),
        "cifar-10-batches-bin/data_batch_1.bin: SHA-256 mismatch",
        "cee916563c9f80d84e3cc88e17fdc0941787f1244f00a67874d45b261883ada5",
        &hashes[0].1,
    ] {
        assert!(msg.contains(part), "missing '{part}' in: {msg}");
    }
    assert_eq!(dir_entries(fresh.path()), Vec::<String>::new());

    // A mismatch on the last file, after five were extracted, leaves nothing either; an
    // existing directory keeps its other contents.
    let mut wrong = hashes.clone();
    wrong[5].1 = "0".repeat(64);
    let existing = tempfile::tempdir().unwrap();
    std::fs::create_dir(existing.path().join("cifar10")).unwrap();
    std::fs::write(existing.path().join("cifar10/notes.txt"), "mine").unwrap();
    for data in [fresh.path(), existing.path()] {
        let msg = err_text(download::download_cifar10(data, &mirrors, &as_refs(&wrong)));
        assert!(
            msg.contains("test_batch.bin: SHA-256 mismatch") && msg.contains(&hashes[5].1),
            "{msg}"
        );
    }
    assert_eq!(dir_entries(fresh.path()), Vec::<String>::new());
    assert_eq!(dir_entries(&existing.path().join("cifar10")), ["notes.txt"]);
}

#[test]
fn download_cifar10_reports_every_mirror_failure() {
    let (_root, base, hashes) = cifar_server();
    let refused = refused_url();
    let mirrors: Vec<String> = ["missing", "traversal", "incomplete", "garbage"]
        .iter()
        .map(|sub| format!("{base}/{sub}/"))
        .chain([refused.clone()])
        .collect();
    let data = tempfile::tempdir().unwrap();
    let msg = err_text(download::download_cifar10(
        data.path(),
        &mirrors,
        &as_refs(&hashes),
    ));
    for part in [
        format!("{base}/missing/cifar-10-binary.tar.gz: http status: 404"),
        format!(
            "{base}/traversal/cifar-10-binary.tar.gz: refusing archive member cifar-10-batches-bin/../../evil.bin"
        ),
        format!(
            "{base}/incomplete/cifar-10-binary.tar.gz: archive lacks cifar-10-batches-bin/test_batch.bin"
        ),
        format!("{base}/garbage/cifar-10-binary.tar.gz"),
        format!("{refused}cifar-10-binary.tar.gz"),
        "CUPBEARER_MIRROR".to_string(),
    ] {
        assert!(msg.contains(&part), "missing '{part}' in: {msg}");
    }
    assert_eq!(dir_entries(data.path()), Vec::<String>::new());
}

/// All assertions that touch process-global env vars live here, since tests run in
/// parallel threads; no other test reads these vars (downloads elsewhere pass mirrors).
#[test]
fn env_precedence() {
    std::env::remove_var("CUPBEARER_DATA_DIR");
    assert_eq!(resolve_data_dir(None), PathBuf::from("data"));
    std::env::set_var("CUPBEARER_DATA_DIR", "/from/env");
    assert_eq!(resolve_data_dir(None), PathBuf::from("/from/env"));
    assert_eq!(
        resolve_data_dir(Some(Path::new("/from/flag"))),
        PathBuf::from("/from/flag")
    );
    std::env::set_var("CUPBEARER_DATA_DIR", "");
    assert_eq!(resolve_data_dir(None), PathBuf::from("data"));
    std::env::remove_var("CUPBEARER_DATA_DIR");

    // CUPBEARER_MIRROR replaces the defaults; explicit mirrors beat it.
    let (_root, base) = bad_mirrors();
    let data = tempfile::tempdir().unwrap();
    std::env::set_var("CUPBEARER_MIRROR", format!("{base}/bad/"));
    let msg = err_text(download::download(DatasetName::Mnist, data.path(), &[]));
    assert!(
        msg.contains(&format!("{base}/bad/train-images-idx3-ubyte.gz")),
        "{msg}"
    );
    assert!(!msg.contains("amazonaws"), "{msg}");
    let msg = err_text(download::download(
        DatasetName::Mnist,
        data.path(),
        &[format!("{base}/corrupt/")],
    ));
    assert!(msg.contains("/corrupt/") && !msg.contains("/bad/"), "{msg}");

    // ... for CIFAR-10 too.
    let (_cifar_root, cifar_base, hashes) = cifar_server();
    std::env::set_var("CUPBEARER_MIRROR", format!("{cifar_base}/good"));
    let dir = download::download_cifar10(data.path(), &[], &as_refs(&hashes)).unwrap();
    assert_eq!(dir_entries(&dir), CIFAR_FILES);
    std::env::remove_var("CUPBEARER_MIRROR");
}
