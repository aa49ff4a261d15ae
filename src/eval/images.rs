//! Image grids as PNG: clean images next to their perturbed versions, so a run's
//! adversarial examples can be inspected at a glance.

use std::path::Path;

use anyhow::{bail, Result};

/// Pixels per image pixel, and the white gap between cells.
const SCALE: usize = 4;
const GAP: usize = 2;
/// Pairs per grid row.
const COLUMNS: usize = 3;

/// Writes `pairs` of (clean, perturbed) HWC images with values in [0, 1] as an RGB PNG:
/// three pairs per row, each pair side by side.
pub fn write_pairs_png(path: &Path, pairs: &[(Vec<f32>, &[f32])], shape: [usize; 3]) -> Result<()> {
    let [h, w, c] = shape;
    if pairs.is_empty() || !(c == 1 || c == 3) {
        bail!("cannot draw {} images with {c} channels", pairs.len());
    }
    let cell_w = 2 * w * SCALE + GAP;
    let cols = pairs.len().min(COLUMNS);
    let rows = pairs.len().div_ceil(COLUMNS);
    let (width, height) = (cols * (cell_w + GAP) + GAP, rows * (h * SCALE + GAP) + GAP);
    let mut rgb = vec![255u8; width * height * 3];
    for (k, (clean, adv)) in pairs.iter().enumerate() {
        let (x0, y0) = (
            GAP + (k % COLUMNS) * (cell_w + GAP),
            GAP + (k / COLUMNS) * (h * SCALE + GAP),
        );
        for (side, img) in [clean.as_slice(), adv].into_iter().enumerate() {
            let left = x0 + side * (w * SCALE + GAP);
            for y in 0..h * SCALE {
                for x in 0..w * SCALE {
                    let p = ((y / SCALE) * w + x / SCALE) * c;
                    let at = ((y0 + y) * width + left + x) * 3;
                    for ch in 0..3 {
                        let v = img[p + if c == 3 { ch } else { 0 }];
                        rgb[at + ch] = (v.clamp(0.0, 1.0) * 255.0).round() as u8;
                    }
                }
            }
        }
    }
    let mut bytes = Vec::new();
    let mut encoder = png::Encoder::new(&mut bytes, width as u32, height as u32);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.write_header()?.write_image_data(&rgb)?;
    crate::io::write_atomic(path, &bytes)
}
