//! File helpers: atomic writes (nothing half-written is ever left behind) and checked
//! reads of safetensors tensors (presence, dtype, shape, finite values).

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};

/// Writes `bytes` to a temporary file next to `path` and renames it into place.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |f| f.write_all(bytes))
}

/// [`write_atomic`] with the content written by `fill`: if it fails part-way (a full
/// disk), `path` keeps its old content and the temporary file is removed.
pub fn write_atomic_with(
    path: &Path,
    fill: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>,
) -> Result<()> {
    let tmp = path.with_extension(format!(
        "{}.tmp{}",
        path.extension().and_then(|e| e.to_str()).unwrap_or(""),
        std::process::id()
    ));
    std::fs::File::create(&tmp)
        .and_then(|mut f| {
            fill(&mut f)?;
            f.sync_all()
        })
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

/// A named f32 tensor to write: (name, shape, values).
pub type F32Tensor<'a> = (String, Vec<usize>, &'a [f32]);

/// Writes f32 tensors as safetensors, atomically, with one metadata entry `key`.
pub fn write_f32_safetensors(
    path: &Path,
    tensors: &[F32Tensor<'_>],
    key: &str,
    meta: String,
) -> Result<()> {
    let views = tensors
        .iter()
        .map(|(name, shape, values)| {
            let view = safetensors::tensor::TensorView::new(
                safetensors::Dtype::F32,
                shape.clone(),
                bytemuck::cast_slice(values),
            )?;
            Ok((name.as_str(), view))
        })
        .collect::<Result<Vec<_>>>()?;
    let metadata = std::collections::HashMap::from([(key.to_string(), meta)]);
    write_atomic(path, &safetensors::serialize(views, Some(metadata))?)
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

/// The f32 values of tensor `name`, checked for presence, dtype, `shape` (when given)
/// and finiteness: a NaN or infinity in stored weights or statistics is an error naming
/// the tensor, not a silently wrong result.
pub fn f32_tensor(
    st: &safetensors::SafeTensors<'_>,
    path: &Path,
    name: &str,
    shape: Option<&[usize]>,
) -> Result<Vec<f32>> {
    let t = checked_tensor(st, path, name, safetensors::Dtype::F32)?;
    if let Some(shape) = shape.filter(|&s| s != t.shape()) {
        anyhow::bail!(
            "{}: tensor {name} has shape {:?}, expected {shape:?}",
            path.display(),
            t.shape()
        );
    }
    let values: Vec<f32> = t
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    check_finite(&values, || format!("{}: tensor {name}", path.display()))?;
    Ok(values)
}

/// Fails on the first NaN or infinity in `values`, naming `what` and the index.
pub fn check_finite(values: &[f32], what: impl Fn() -> String) -> Result<()> {
    match values.iter().position(|v| !v.is_finite()) {
        Some(i) => anyhow::bail!(
            "{} holds {} at index {i}: the file is corrupt or the run that wrote it diverged",
            what(),
            values[i]
        ),
        None => Ok(()),
    }
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
