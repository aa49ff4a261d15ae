//! Minimal reader/writer for the IDX format used by MNIST and Fashion-MNIST.
//!
//! Layout (big endian): a 4-byte magic `0x0000_08nn` (`08` = unsigned byte data,
//! `nn` = number of dimensions), one `u32` per dimension, then the raw bytes.
//! Files may be gzip-compressed; compression is recognised by its magic bytes rather
//! than by the file name, because mirrors and users rename files freely.
//!
//! Every error names the file, since the caller usually juggles several of them.

use std::fs;
use std::io::{Read, Write};
use std::path::Path;

use anyhow::{bail, Context, Result};
use flate2::read::MultiGzDecoder;
use flate2::write::GzEncoder;
use flate2::Compression;

/// Magic number of an IDX file of unsigned bytes with 3 dimensions (images).
pub const IMAGES_MAGIC: u32 = 0x0000_0803;
/// Magic number of an IDX file of unsigned bytes with 1 dimension (labels).
pub const LABELS_MAGIC: u32 = 0x0000_0801;

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// Images read from an IDX file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdxImages {
    pub count: usize,
    pub rows: usize,
    pub cols: usize,
    /// Row-major pixels, `count * rows * cols` bytes.
    pub pixels: Vec<u8>,
}

/// Reads an IDX image file (magic `0x00000803`), gzip-compressed or not.
pub fn read_images(path: &Path) -> Result<IdxImages> {
    parse_images(&path.display().to_string(), read_file(path)?)
}

/// Parses the bytes of an IDX image file (gzip-compressed or not) called `name` in
/// errors: how the browser, which has no file system, loads what the user picked.
pub fn parse_images(name: &str, bytes: Vec<u8>) -> Result<IdxImages> {
    let bytes = gunzip_if_gz(bytes, name)?;
    let dims = parse_header(name, &bytes, IMAGES_MAGIC)?;
    let (count, rows, cols) = (dims[0], dims[1], dims[2]);
    let body = &bytes[16..];
    let expected = count
        .checked_mul(rows)
        .and_then(|n| n.checked_mul(cols))
        .with_context(|| format!("{name}: header dimensions {count}x{rows}x{cols} overflow"))?;
    check_body_len(name, body.len(), expected, || {
        format!("{count} images of {rows}x{cols}")
    })?;
    Ok(IdxImages {
        count,
        rows,
        cols,
        pixels: body.to_vec(),
    })
}

/// Reads an IDX label file (magic `0x00000801`), gzip-compressed or not.
pub fn read_labels(path: &Path) -> Result<Vec<u8>> {
    parse_labels(&path.display().to_string(), read_file(path)?)
}

/// [`parse_images`] for a label file.
pub fn parse_labels(name: &str, bytes: Vec<u8>) -> Result<Vec<u8>> {
    let bytes = gunzip_if_gz(bytes, name)?;
    let count = parse_header(name, &bytes, LABELS_MAGIC)?[0];
    let body = &bytes[8..];
    check_body_len(name, body.len(), count, || format!("{count} labels"))?;
    Ok(body.to_vec())
}

/// Writes `pixels.len() / (rows * cols)` images as an IDX image file.
pub fn write_images(
    path: &Path,
    rows: usize,
    cols: usize,
    pixels: &[u8],
    gzip: bool,
) -> Result<()> {
    let p = path.display();
    let per_image = rows.saturating_mul(cols);
    let count = pixels.len().checked_div(per_image).unwrap_or(0);
    if count * per_image != pixels.len() {
        bail!(
            "{p}: {} pixels is not a whole number of {rows}x{cols} images",
            pixels.len()
        );
    }
    let mut out = header(path, IMAGES_MAGIC, &[count, rows, cols])?;
    out.extend_from_slice(pixels);
    write_maybe_gz(path, &out, gzip)
}

/// Writes an IDX label file.
pub fn write_labels(path: &Path, labels: &[u8], gzip: bool) -> Result<()> {
    let mut out = header(path, LABELS_MAGIC, &[labels.len()])?;
    out.extend_from_slice(labels);
    write_maybe_gz(path, &out, gzip)
}

/// Returns `bytes` decompressed if they start with the gzip magic, unchanged otherwise.
/// `what` names the source (a path or URL) in the error message.
pub(crate) fn gunzip_if_gz(bytes: Vec<u8>, what: &str) -> Result<Vec<u8>> {
    if is_gzip(&bytes) {
        gunzip(&bytes, what)
    } else {
        Ok(bytes)
    }
}

/// Whether `bytes` start with the gzip magic `1f 8b`.
pub(crate) fn is_gzip(bytes: &[u8]) -> bool {
    bytes.starts_with(&GZIP_MAGIC)
}

/// Decompresses a gzip stream; `what` names the source (a path or URL) in the error.
pub(crate) fn gunzip(bytes: &[u8], what: &str) -> Result<Vec<u8>> {
    // Multi-member aware: `cat a.gz b.gz` is a valid gzip file.
    let mut out = Vec::with_capacity(bytes.len().saturating_mul(4));
    MultiGzDecoder::new(bytes)
        .read_to_end(&mut out)
        .with_context(|| format!("{what}: corrupt gzip stream"))?;
    Ok(out)
}

/// Gzip-compresses `bytes` in memory.
pub(crate) fn gzip(bytes: &[u8]) -> Result<Vec<u8>> {
    let mut enc = GzEncoder::new(Vec::with_capacity(bytes.len() / 3), Compression::default());
    enc.write_all(bytes)?;
    Ok(enc.finish()?)
}

fn read_file(path: &Path) -> Result<Vec<u8>> {
    fs::read(path).with_context(|| format!("{}: cannot read", path.display()))
}

fn write_maybe_gz(path: &Path, bytes: &[u8], gz: bool) -> Result<()> {
    let p = path.display();
    let data = if gz {
        gzip(bytes).with_context(|| format!("{p}: gzip compression failed"))?
    } else {
        bytes.to_vec()
    };
    fs::write(path, data).with_context(|| format!("{p}: cannot write"))
}

/// Checks the magic and returns the dimensions declared by the header.
fn parse_header(p: &str, bytes: &[u8], magic: u32) -> Result<Vec<usize>> {
    let kind = kind_name(magic);
    let ndim = (magic & 0xff) as usize;
    let header_len = 4 + 4 * ndim;
    let word = |i: usize| u32::from_be_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
    if bytes.len() < 4 {
        bail!(
            "{p}: truncated header: file has {} bytes, {kind} need a {header_len}-byte header",
            bytes.len()
        );
    }
    let found = word(0);
    if found != magic {
        let hint = match found {
            IMAGES_MAGIC | LABELS_MAGIC => format!(" (this is an {} file)", kind_name(found)),
            _ => String::new(),
        };
        bail!("{p}: bad magic 0x{found:08x}, expected 0x{magic:08x} ({kind}){hint}");
    }
    if bytes.len() < header_len {
        bail!(
            "{p}: truncated header: file has {} bytes, {kind} need a {header_len}-byte header",
            bytes.len()
        );
    }
    Ok((0..ndim).map(|d| word(4 + 4 * d) as usize).collect())
}

fn check_body_len(
    p: &str,
    actual: usize,
    expected: usize,
    what: impl Fn() -> String,
) -> Result<()> {
    if actual < expected {
        bail!(
            "{p}: truncated: header says {} ({expected} bytes) but only {actual} bytes follow",
            what()
        );
    }
    if actual > expected {
        bail!(
            "{p}: {} trailing bytes: header says {} ({expected} bytes) but {actual} bytes follow (wrong or concatenated file?)",
            actual - expected,
            what()
        );
    }
    Ok(())
}

fn header(path: &Path, magic: u32, dims: &[usize]) -> Result<Vec<u8>> {
    let mut out = magic.to_be_bytes().to_vec();
    for &d in dims {
        let d = u32::try_from(d).with_context(|| {
            format!(
                "{}: dimension {d} does not fit the IDX u32 header",
                path.display()
            )
        })?;
        out.extend_from_slice(&d.to_be_bytes());
    }
    Ok(out)
}

fn kind_name(magic: u32) -> &'static str {
    match magic {
        IMAGES_MAGIC => "IDX images",
        LABELS_MAGIC => "IDX labels",
        _ => "IDX",
    }
}
