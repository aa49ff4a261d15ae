//! File output helpers: nothing half-written is ever left behind.

use std::path::Path;

use anyhow::{Context, Result};

/// Writes `bytes` to a temporary file next to `path` and renames it into place.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!(
        "{}.tmp{}",
        path.extension().and_then(|e| e.to_str()).unwrap_or(""),
        std::process::id()
    ));
    std::fs::write(&tmp, bytes)
        .and_then(|_| std::fs::rename(&tmp, path))
        .inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })
        .with_context(|| format!("writing {}", path.display()))
}

/// Pretty JSON, written atomically.
pub fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    write_atomic(path, text.as_bytes())
}

/// Tensor `name` of a safetensors file at `path`, checked for presence and dtype.
pub fn checked_tensor<'a>(
    st: &'a safetensors::SafeTensors<'a>,
    path: &Path,
    name: &str,
    dtype: safetensors::Dtype,
) -> Result<safetensors::tensor::TensorView<'a>> {
    let t = st
        .tensor(name)
        .with_context(|| format!("{}: missing tensor {name}", path.display()))?;
    if t.dtype() != dtype {
        anyhow::bail!(
            "{}: tensor {name} is {:?}, expected {dtype:?}",
            path.display(),
            t.dtype()
        );
    }
    Ok(t)
}

/// The JSON metadata entry `key` of a safetensors file's bytes, parsed; `what` names
/// the expected kind of file in the error.
pub fn safetensors_metadata<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    path: &Path,
    key: &str,
    what: &str,
) -> Result<T> {
    let (_, header) = safetensors::SafeTensors::read_metadata(bytes)
        .with_context(|| format!("{}: not a safetensors file", path.display()))?;
    let text = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get(key))
        .with_context(|| format!("{}: no `{key}` metadata; not {what}", path.display()))?;
    serde_json::from_str(text).with_context(|| format!("{}: bad `{key}` metadata", path.display()))
}
