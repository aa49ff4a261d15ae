//! Downloading MNIST / Fashion-MNIST with integrity checks.
//!
//! Files are verified by the SHA-256 of their *decompressed* bytes: mirrors re-compress
//! the data (Debian, for one, ships different `.gz` bytes than Zalando), so hashing the
//! `.gz` itself would reject good copies.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};

use super::datasets::{idx_file_names, DatasetName, Split};
use super::idx;

/// Env var holding a base URL that replaces the default mirror list.
pub const MIRROR_ENV: &str = "CUPBEARER_MIRROR";

/// Upper bound on a response body; the largest file (Fashion-MNIST train images) is
/// 47 MB even when a mirror serves it uncompressed.
const MAX_BODY_BYTES: u64 = 256 << 20;

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
    };
    urls.iter().map(|s| s.to_string()).collect()
}

/// Downloads the four `.gz` files of `name` into `<data_dir>/<name>/` and returns that dir.
///
/// Mirrors: `mirrors` if non-empty, else `$CUPBEARER_MIRROR` if set, else
/// [`default_mirrors`]. Each file is verified (SHA-256 of the decompressed bytes) before it
/// is renamed into place, so an interrupted or bad download never leaves a file that
/// `Dataset::load` would pick up. Files already present and verified are skipped.
pub fn download(name: DatasetName, data_dir: &Path, mirrors: &[String]) -> Result<PathBuf> {
    let mirrors = resolve_mirrors(name, mirrors);
    let dir = data_dir.join(name.as_str());
    let created = !dir.exists();
    fs::create_dir_all(&dir)
        .with_context(|| format!("{}: cannot create directory", dir.display()))?;
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_connect(Some(TIMEOUT))
        .timeout_recv_response(Some(TIMEOUT))
        .timeout_per_read(Some(TIMEOUT))
        .timeout_per_write(Some(TIMEOUT))
        .build()
        .into();

    let result = expected_hashes(name)
        .iter()
        .try_for_each(|&(file, sha)| fetch_file(&agent, &mirrors, &dir, file, sha));
    if result.is_err() && created {
        // Leave no trace of a failed first download; fails (harmlessly) if not empty.
        let _ = fs::remove_dir(&dir);
    }
    result.map(|()| dir)
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

/// Files in download order: train images first, the biggest and most likely to fail.
fn expected_hashes(name: DatasetName) -> [(&'static str, &'static str); 4] {
    let table = match name {
        DatasetName::Mnist => MNIST_SHA256,
        DatasetName::FashionMnist => FASHION_MNIST_SHA256,
    };
    debug_assert!([Split::Train, Split::Test]
        .iter()
        .flat_map(|&s| idx_file_names(s))
        .all(|f| table.iter().any(|(t, _)| *t == f)));
    table
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

/// Downloads `url`, checks the SHA-256 of the decompressed data and returns gzip bytes.
fn fetch_verified(agent: &ureq::Agent, url: &str, sha: &str) -> Result<Vec<u8>> {
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
    let mut payload = Vec::new();
    let read = bar
        .wrap_read(body.into_with_config().limit(MAX_BODY_BYTES).reader())
        .read_to_end(&mut payload);
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
