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

/// The values of float tensor `name` as f32 (stored as f32, f16, bf16 or f64: files
/// saved with `--dtype` read back transparently), checked for presence, `shape` (when
/// given) and finiteness: a NaN or infinity in stored weights or statistics is an error
/// naming the tensor, not a silently wrong result.
pub fn f32_tensor(
    st: &safetensors::SafeTensors<'_>,
    path: &Path,
    name: &str,
    shape: Option<&[usize]>,
) -> Result<Vec<f32>> {
    let t = st
        .tensor(name)
        .with_context(|| format!("{}: missing tensor {name}", path.display()))?;
    if let Some(shape) = shape.filter(|&s| s != t.shape()) {
        anyhow::bail!(
            "{}: tensor {name} has shape {:?}, expected {shape:?}",
            path.display(),
            t.shape()
        );
    }
    tensor_f32(&t, path, name)
}

/// A tensor's values as f32 (f16, bf16 and f64 converted), checked finite.
pub fn tensor_f32(
    view: &safetensors::tensor::TensorView<'_>,
    path: &Path,
    name: &str,
) -> Result<Vec<f32>> {
    let data = view.data();
    let values: Vec<f32> = match view.dtype() {
        safetensors::Dtype::F32 => data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        safetensors::Dtype::F16 => data
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        safetensors::Dtype::BF16 => data
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        safetensors::Dtype::F64 => data
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
            .collect(),
        other => anyhow::bail!(
            "{}: tensor {name} is {other:?}; weights must be f32, f16, bf16 or f64",
            path.display()
        ),
    };
    check_finite(&values, || format!("{}: tensor {name}", path.display()))?;
    Ok(values)
}

/// The precision tensors are saved in (`--dtype`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SaveDtype {
    #[default]
    F32,
    F16,
    Bf16,
}

/// Rewrites the f32 tensors of the safetensors file at `path` in `dtype` (round to
/// nearest even), atomically, keeping its other tensors and metadata; f32 does nothing.
pub fn store_as(path: &Path, dtype: SaveDtype) -> Result<()> {
    if dtype == SaveDtype::F32 {
        return Ok(());
    }
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .with_context(|| format!("{}: corrupt safetensors file", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)?;
    let mut converted: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, view) in st.tensors() {
        let (dt, data) = if view.dtype() == safetensors::Dtype::F32 {
            let values = tensor_f32(&view, path, &name)?;
            match dtype {
                SaveDtype::F16 => (
                    safetensors::Dtype::F16,
                    values
                        .iter()
                        .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
                        .collect(),
                ),
                _ => (
                    safetensors::Dtype::BF16,
                    values
                        .iter()
                        .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
                        .collect(),
                ),
            }
        } else {
            (view.dtype(), view.data().to_vec())
        };
        converted.push((name, dt, view.shape().to_vec(), data));
    }
    let views = converted
        .iter()
        .map(|(name, dt, shape, data)| {
            Ok((
                name.as_str(),
                safetensors::tensor::TensorView::new(*dt, shape.clone(), data)?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let metadata = meta.metadata().clone();
    let out = safetensors::serialize(views, metadata)?;
    let back = safetensors::SafeTensors::deserialize(&out)?;
    // f16 overflows above 65504: refuse rather than store infinities.
    for (name, view) in back.tensors() {
        if view.dtype() == safetensors::Dtype::I64 {
            continue;
        }
        tensor_f32(&view, path, &name).with_context(|| {
            format!(
                "{} does not fit {dtype:?} (values out of its range)",
                path.display()
            )
        })?;
    }
    write_atomic(path, &out)
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
