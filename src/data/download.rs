//! Downloading MNIST / Fashion-MNIST / CIFAR-10 with integrity checks.
//!
//! Files are verified by the SHA-256 of their *decompressed* bytes: mirrors re-compress
//! the data (Debian, for one, ships different `.gz` bytes than Zalando), so hashing the
//! `.gz` itself would reject good copies. Likewise CIFAR-10 is verified file by file after
//! extraction rather than by the bytes of its `.tar.gz`.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use flate2::read::MultiGzDecoder;
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};

use super::datasets::{idx_file_names, DatasetName, Split};
use super::{cifar, idx};

/// Env var holding a base URL that replaces the default mirror list.
pub const MIRROR_ENV: &str = "CUPBEARER_MIRROR";

/// Upper bound on a response body; the largest download is the CIFAR-10 archive (170 MB).
const MAX_BODY_BYTES: u64 = 256 << 20;

/// Upper bound on one file extracted from the CIFAR-10 archive (a real one is 30.7 MB), so
/// that a hostile archive cannot exhaust memory.
const MAX_CIFAR_FILE_BYTES: u64 = 64 << 20;

/// The archive of the binary version of CIFAR-10; it unpacks to `cifar-10-batches-bin/`.
pub const CIFAR10_ARCHIVE: &str = "cifar-10-binary.tar.gz";

const TIMEOUT: Duration = Duration::from_secs(60);

/// SHA-256 of the decompressed IDX files, as `(file name without .gz, hex digest)`.
///
/// MNIST: computed with `zcat f | sha256sum` from the official files in
/// `../shared/data/mnist/`, after checking that `zcat f | md5sum` gives the canonical md5
/// of each uncompressed file (6bbc9ace…, a25bea73…, 2646ac64…, 27ae3e4e…).
const MNIST_SHA256: [(&str, &str); 4] = [
    (
        "train-images-idx3-ubyte",
        "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    ),
    (
        "train-labels-idx1-ubyte",
        "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    ),
    (
        "t10k-images-idx3-ubyte",
        "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    ),
    (
        "t10k-labels-idx1-ubyte",
        "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    ),
];

/// Fashion-MNIST: computed with `zcat f | sha256sum` from the Debian package
/// `dataset-fashion-mnist` (0.0~git20200523.55506a9-1). Debian re-compressed the files, so
/// their `.gz` md5s differ from Zalando's published ones (8d4fb7e6…, 25c81989…,
/// bef4ecab…, bb300cfd…); the decompressed md5s (f4a8712d…, 9018921c…, 8181f547…,
/// 15d48437…) match those that torchvision-style loaders list next to Zalando's `.gz`
/// md5s, and the SHA-256 values below appear in several independent public projects.
const FASHION_MNIST_SHA256: [(&str, &str); 4] = [
    (
        "train-images-idx3-ubyte",
        "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    ),
    (
        "train-labels-idx1-ubyte",
        "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    ),
    (
        "t10k-images-idx3-ubyte",
        "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    ),
    (
        "t10k-labels-idx1-ubyte",
        "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    ),
];

/// SHA-256 of the files extracted from `cifar-10-binary.tar.gz`.
///
/// From ankane/torchvision-ruby (`lib/torchvision/datasets/cifar10.rb`), which checks them
/// on every load. That file also gives the archive's SHA-256 as c4a38c50…a29a59bca1dd, the
/// value tensorflow/datasets publishes (`url_checksums/cifar10.txt`, 170052171 bytes), and
/// the `test_batch.bin` value appears independently in another public project. The official
/// checksum is an md5 of the archive (c32a1d4a…); hashing the extracted files instead also
/// accepts a mirror that re-packed the archive.
pub const CIFAR10_SHA256: [(&str, &str); 6] = [
    (
        "data_batch_1.bin",
        "cee916563c9f80d84e3cc88e17fdc0941787f1244f00a67874d45b261883ada5",
    ),
    (
        "data_batch_2.bin",
        "a591ca11fa1708a91ee40f54b3da4784ccd871ecf2137de63f51ada8b3fa57ed",
    ),
    (
        "data_batch_3.bin",
        "bbe8596564c0f86427f876058170b84dac6670ddf06d79402899d93ceea26f67",
    ),
    (
        "data_batch_4.bin",
        "014e562d6e23c72197cc727519169a60359f5eccd8945ad5a09d710285ff4e48",
    ),
    (
        "data_batch_5.bin",
        "755304fc0b379caeae8c14f0dac912fbc7d6cd469eb67a1029a08a39453a9add",
    ),
    (
        "test_batch.bin",
        "8e2eb146ae340b09e24670f29cabc6326dba54da8789dab6768acf480273f65b",
    ),
];

/// Default mirrors, tried in order; each is a base URL the file name is appended to.
pub fn default_mirrors(name: DatasetName) -> Vec<String> {
    let urls: &[&str] = match name {
        DatasetName::Mnist => &[
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
        ],
        DatasetName::FashionMnist => &[
            "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
            "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
        ],
        DatasetName::Cifar10 => &["https://www.cs.toronto.edu/~kriz/"],
    };
    urls.iter().map(|s| s.to_string()).collect()
}

/// Downloads `name` into `data_dir` and returns the directory that holds its files.
///
/// MNIST and Fashion-MNIST: the four `.gz` files, into `<data_dir>/<name>/`. CIFAR-10: see
/// [`download_cifar10`]. Mirrors: `mirrors` if non-empty, else `$CUPBEARER_MIRROR` if set,
/// else [`default_mirrors`]. Each file is verified (SHA-256 of the decompressed bytes)
/// before it is renamed into place, so an interrupted or bad download never leaves a file
/// that `Dataset::load` would pick up. Files already present and verified are skipped.
pub fn download(name: DatasetName, data_dir: &Path, mirrors: &[String]) -> Result<PathBuf> {
    match name {
        DatasetName::Mnist => download_idx(name, data_dir, mirrors, MNIST_SHA256),
        DatasetName::FashionMnist => download_idx(name, data_dir, mirrors, FASHION_MNIST_SHA256),
        DatasetName::Cifar10 => download_cifar10(data_dir, mirrors, &CIFAR10_SHA256),
    }
}

/// Downloads [`CIFAR10_ARCHIVE`] and extracts the files listed in `sha256` (`(file name,
/// hex SHA-256)`, e.g. [`CIFAR10_SHA256`]; tests pass the digests of a generated archive)
/// from its `cifar-10-batches-bin/` into `<data_dir>/cifar10/cifar-10-batches-bin/`, which
/// it returns. Mirrors as in [`download`].
///
/// Nothing is written there until every file is extracted and verified, in a temporary
/// directory beside it that is then renamed; on failure nothing is left behind. Other
/// archive members are skipped, and one whose path is absolute or has `..` fails the
/// download. If all files are already present and verified, nothing is downloaded.
pub fn download_cifar10(
    data_dir: &Path,
    mirrors: &[String],
    sha256: &[(&str, &str)],
) -> Result<PathBuf> {
    let name = DatasetName::Cifar10;
    let mirrors = resolve_mirrors(name, mirrors);
    let parent = data_dir.join(name.as_str());
    let target = parent.join(cifar::ARCHIVE_DIR);
    if all_present_and_verified(&target, sha256) {
        eprintln!(
            "{}: all files present and verified, skipping",
            target.display()
        );
        return Ok(target);
    }
    let created = !parent.exists();
    fs::create_dir_all(&parent)
        .with_context(|| format!("{}: cannot create directory", parent.display()))?;
    let agent = agent();
    let tmp = parent.join(format!(
        ".{}.part-{}",
        cifar::ARCHIVE_DIR,
        std::process::id()
    ));

    let mut failures = Vec::new();
    let mut installed = false;
    for mirror in &mirrors {
        let url = format!("{mirror}{CIFAR10_ARCHIVE}");
        // A leftover of a killed run with the same pid would make `create_dir` fail.
        let _ = fs::remove_dir_all(&tmp);
        let attempt = fs::create_dir(&tmp)
            .with_context(|| format!("{}: cannot create directory", tmp.display()))
            .and_then(|()| extract_verified(&agent, &url, &tmp, sha256))
            .and_then(|()| install(&tmp, &target, sha256));
        let _ = fs::remove_dir_all(&tmp);
        match attempt {
            Ok(()) => {
                installed = true;
                break;
            }
            Err(e) => failures.push(format!("  {e:#}")),
        }
    }
    if installed {
        return Ok(target);
    }
    if created {
        // Leave no trace of a failed first download.
        let _ = fs::remove_dir(&parent);
    }
    bail!(
        "could not download {CIFAR10_ARCHIVE} from any mirror:\n{}\n(set {MIRROR_ENV} to another mirror's base URL)",
        failures.join("\n")
    )
}

/// Downloads the IDX files listed in `table` into `<data_dir>/<name>/`.
fn download_idx(
    name: DatasetName,
    data_dir: &Path,
    mirrors: &[String],
    table: [(&str, &str); 4],
) -> Result<PathBuf> {
    debug_assert!([Split::Train, Split::Test]
        .iter()
        .flat_map(|&s| idx_file_names(s))
        .all(|f| table.iter().any(|(t, _)| *t == f)));
    let mirrors = resolve_mirrors(name, mirrors);
    let dir = data_dir.join(name.as_str());
    let created = !dir.exists();
    fs::create_dir_all(&dir)
        .with_context(|| format!("{}: cannot create directory", dir.display()))?;
    let agent = agent();

    // Files in table order: train images first, the biggest and most likely to fail.
    let result = table
        .iter()
        .try_for_each(|&(file, sha)| fetch_file(&agent, &mirrors, &dir, file, sha));
    if result.is_err() && created {
        // Leave no trace of a failed first download; fails (harmlessly) if not empty.
        let _ = fs::remove_dir(&dir);
    }
    result.map(|()| dir)
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_connect(Some(TIMEOUT))
        .timeout_recv_response(Some(TIMEOUT))
        .timeout_per_read(Some(TIMEOUT))
        .timeout_per_write(Some(TIMEOUT))
        .build()
        .into()
}

fn resolve_mirrors(name: DatasetName, mirrors: &[String]) -> Vec<String> {
    let list = if !mirrors.is_empty() {
        mirrors.to_vec()
    } else {
        match std::env::var(MIRROR_ENV) {
            Ok(m) if !m.trim().is_empty() => vec![m.trim().to_string()],
            _ => default_mirrors(name),
        }
    };
    // A forgotten trailing slash would otherwise glue the file name onto the last segment.
    list.into_iter()
        .map(|m| if m.ends_with('/') { m } else { m + "/" })
        .collect()
}

/// Ensures `dir/<file>.gz` (or an uncompressed `dir/<file>`) holds verified data.
fn fetch_file(
    agent: &ureq::Agent,
    mirrors: &[String],
    dir: &Path,
    file: &str,
    sha: &str,
) -> Result<()> {
    let gz_name = format!("{file}.gz");
    let raw_path = dir.join(file);
    let gz_path = dir.join(&gz_name);

    // `Dataset::load` prefers the uncompressed file, so a bad one would shadow a good .gz.
    if raw_path.is_file() {
        let actual = local_sha256(&raw_path)?;
        if actual == sha {
            eprintln!(
                "{}: already present and verified, skipping",
                raw_path.display()
            );
            return Ok(());
        }
        bail!(
            "{}: exists but its SHA-256 is {actual}, expected {sha}; remove it and retry",
            raw_path.display()
        );
    }
    if gz_path.is_file() {
        match local_sha256(&gz_path) {
            Ok(actual) if actual == sha => {
                eprintln!(
                    "{}: already present and verified, skipping",
                    gz_path.display()
                );
                return Ok(());
            }
            // Replaced below, once a verified copy has been downloaded.
            Ok(actual) => eprintln!(
                "{}: SHA-256 {actual} != expected {sha}, re-downloading",
                gz_path.display()
            ),
            Err(e) => eprintln!("{e:#}; re-downloading"),
        }
    }

    let mut failures = Vec::new();
    for mirror in mirrors {
        let url = format!("{mirror}{gz_name}");
        match fetch_verified(agent, &url, sha) {
            Ok(gz) => return write_atomically(dir, &gz_path, &gz),
            Err(e) => failures.push(format!("  {e:#}")),
        }
    }
    bail!(
        "could not download {gz_name} from any mirror:\n{}\n(set {MIRROR_ENV} to another mirror's base URL)",
        failures.join("\n")
    )
}

/// GETs `url` and returns its body (at most [`MAX_BODY_BYTES`]) read through a progress
/// bar, which the caller clears when done.
fn get_with_progress(agent: &ureq::Agent, url: &str) -> Result<(ProgressBar, impl Read)> {
    let response = agent.get(url).call().with_context(|| url.to_string())?;
    let body = response.into_body();
    let bar = match body.content_length() {
        Some(len) => ProgressBar::new(len),
        None => ProgressBar::no_length(),
    };
    if let Ok(style) = ProgressStyle::with_template(
        "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(url.rsplit('/').next().unwrap_or(url).to_string());
    let reader = bar.wrap_read(body.into_with_config().limit(MAX_BODY_BYTES).reader());
    Ok((bar, reader))
}

/// Downloads `url`, checks the SHA-256 of the decompressed data and returns gzip bytes.
fn fetch_verified(agent: &ureq::Agent, url: &str, sha: &str) -> Result<Vec<u8>> {
    let (bar, mut body) = get_with_progress(agent, url)?;
    let mut payload = Vec::new();
    let read = body.read_to_end(&mut payload);
    bar.finish_and_clear();
    read.with_context(|| format!("{url}: reading the response failed"))?;

    // A server may send the file with `Content-Encoding: gzip`, which ureq undoes.
    let was_gzip = idx::is_gzip(&payload);
    let actual = if was_gzip {
        sha256_hex(&idx::gunzip(&payload, url)?)
    } else {
        sha256_hex(&payload)
    };
    if actual != sha {
        bail!("{url}: SHA-256 mismatch of the decompressed data: expected {sha}, got {actual}");
    }
    if was_gzip {
        Ok(payload)
    } else {
        idx::gzip(&payload)
    }
}

/// Streams the tar.gz at `url` and writes the `cifar-10-batches-bin/` members named in
/// `sha256` into `dir`, each verified before it is written; fails unless all are there.
fn extract_verified(
    agent: &ureq::Agent,
    url: &str,
    dir: &Path,
    sha256: &[(&str, &str)],
) -> Result<()> {
    let (bar, body) = get_with_progress(agent, url)?;
    let result = (|| -> Result<()> {
        let mut body = BufReader::new(body);
        let head = body
            .fill_buf()
            .with_context(|| format!("{url}: reading the response failed"))?;
        // A server may send the archive with `Content-Encoding: gzip`, which ureq undoes.
        let tar_stream: Box<dyn Read> = if idx::is_gzip(head) {
            Box::new(MultiGzDecoder::new(body))
        } else {
            Box::new(body)
        };
        let mut archive = tar::Archive::new(tar_stream);
        let mut found = vec![false; sha256.len()];
        let entries = archive
            .entries()
            .with_context(|| format!("{url}: not a tar archive"))?;
        for entry in entries {
            let mut entry = entry.with_context(|| format!("{url}: corrupt archive"))?;
            let path = entry
                .path()
                .with_context(|| format!("{url}: corrupt archive"))?
                .into_owned();
            let Some(member) = batches_member(&path, url)? else {
                continue;
            };
            let Some(i) = sha256.iter().position(|&(f, _)| f == member) else {
                continue;
            };
            let (file, sha) = sha256[i];
            if !entry.header().entry_type().is_file() {
                bail!("{url}: {} is not a regular file", path.display());
            }
            let mut bytes = Vec::new();
            (&mut entry)
                .take(MAX_CIFAR_FILE_BYTES + 1)
                .read_to_end(&mut bytes)
                .with_context(|| format!("{url}: {}: corrupt archive", path.display()))?;
            if bytes.len() as u64 > MAX_CIFAR_FILE_BYTES {
                bail!(
                    "{url}: {} is over {MAX_CIFAR_FILE_BYTES} bytes",
                    path.display()
                );
            }
            let actual = sha256_hex(&bytes);
            if actual != sha {
                bail!(
                    "{url}: {}: SHA-256 mismatch: expected {sha}, got {actual}",
                    path.display()
                );
            }
            let out = dir.join(file);
            fs::File::create(&out)
                .and_then(|mut f| f.write_all(&bytes).and_then(|()| f.sync_all()))
                .with_context(|| format!("{}: cannot write", out.display()))?;
            found[i] = true;
        }
        let missing: Vec<String> = sha256
            .iter()
            .zip(&found)
            .filter(|(_, &f)| !f)
            .map(|((file, _), _)| format!("{}/{file}", cifar::ARCHIVE_DIR))
            .collect();
        if !missing.is_empty() {
            bail!("{url}: archive lacks {}", missing.join(", "));
        }
        Ok(())
    })();
    bar.finish_and_clear();
    result
}

/// The file name of an archive member directly under `cifar-10-batches-bin/`, `None` for
/// any other member. Only names from the expected list are ever written, so nothing can
/// land outside the target; an absolute or `..` path still fails the download, since no
/// genuine archive has one.
fn batches_member<'a>(path: &'a Path, url: &str) -> Result<Option<&'a str>> {
    let mut parts = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(part) => parts.push(part),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => bail!(
                "{url}: refusing archive member {}: absolute or `..` path",
                path.display()
            ),
        }
    }
    Ok(match parts[..] {
        [dir, file] if dir == cifar::ARCHIVE_DIR => file.to_str(),
        _ => None,
    })
}

/// Whether `dir` holds every file of `sha256` with the expected digest; reports mismatches.
fn all_present_and_verified(dir: &Path, sha256: &[(&str, &str)]) -> bool {
    let mut ok = true;
    for &(file, sha) in sha256 {
        let path = dir.join(file);
        if !path.is_file() {
            ok = false;
            continue;
        }
        match fs::read(&path) {
            Ok(bytes) if sha256_hex(&bytes) == sha => {}
            Ok(bytes) => {
                eprintln!(
                    "{}: SHA-256 {} != expected {sha}, re-downloading",
                    path.display(),
                    sha256_hex(&bytes)
                );
                ok = false;
            }
            Err(e) => {
                eprintln!("{}: {e}; re-downloading", path.display());
                ok = false;
            }
        }
    }
    ok
}

/// Moves the verified files from `tmp` into `target`: by renaming `tmp` itself when `target`
/// does not exist yet, so that no half-extracted split is ever visible; otherwise file by
/// file (each rename atomic, replacing a bad copy), keeping other files in `target`.
fn install(tmp: &Path, target: &Path, sha256: &[(&str, &str)]) -> Result<()> {
    if !target.exists() {
        return fs::rename(tmp, target)
            .with_context(|| format!("cannot rename {} to {}", tmp.display(), target.display()));
    }
    for &(file, _) in sha256 {
        let (from, to) = (tmp.join(file), target.join(file));
        fs::rename(&from, &to)
            .with_context(|| format!("cannot rename {} to {}", from.display(), to.display()))?;
    }
    Ok(())
}

/// Writes `bytes` to a temporary file in `dir`, then renames it to `target`; on failure the
/// temporary file is removed, so no partial file is ever visible under the final name.
fn write_atomically(dir: &Path, target: &Path, bytes: &[u8]) -> Result<()> {
    let file_name = target
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.part-{}", std::process::id()));
    let result = (|| -> Result<()> {
        let mut f =
            fs::File::create(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
        f.write_all(bytes)
            .and_then(|()| f.sync_all())
            .with_context(|| format!("{}: cannot write", tmp.display()))?;
        fs::rename(&tmp, target)
            .with_context(|| format!("cannot rename {} to {}", tmp.display(), target.display()))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn local_sha256(path: &Path) -> Result<String> {
    let bytes = fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    Ok(sha256_hex(&idx::gunzip_if_gz(
        bytes,
        &path.display().to_string(),
    )?))
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
